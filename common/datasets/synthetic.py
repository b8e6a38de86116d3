"""``synthetic``: deterministic CIFAR-shaped images (3x32x32, 10 classes), generated per
sample, so no download and no files. Sample ``k`` of a split is a pure function of
``(seed, split, k)``, so a process can generate just its own shard.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from common.datasets import DataError
from common.training import stable_seed

NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)

# Synthetic data: image ~ AMPLITUDE * class_pattern + NUISANCE * smooth_field + NOISE * white
# (then rescaled to about unit variance).
# The class pattern and the per-sample nuisance field have the same (low-frequency)
# spectrum, so a CNN cannot simply low-pass the difficulty away: it has to learn the ten
# templates. Tuned so a small CNN trained on ~1000 samples reaches roughly 25-70% test
# accuracy after 1-2 epochs (not instantly 100%) and the Bayes error stays a few percent.
SYNTHETIC_TEST_SIZE = 2000
SYNTHETIC_AMPLITUDE = 0.35
SYNTHETIC_NUISANCE = 1.0
SYNTHETIC_NOISE = 1.0
SYNTHETIC_PATTERN_RES = 8  # patterns and nuisance fields are 8x8 noise upsampled to 32x32
# Rescale so a synthetic image has about unit variance, like a CIFAR-normalized one.
_SYNTHETIC_SCALE = (SYNTHETIC_AMPLITUDE**2 + SYNTHETIC_NUISANCE**2 + SYNTHETIC_NOISE**2) ** -0.5
_SYNTHETIC_CHUNK = 256  # samples combined per vectorised step (keeps work in cache)


def labels(spec, split: str, num_devices: int | None) -> np.ndarray:
    n = _synthetic_train_size(spec, num_devices) if split == "train" else spec.test_samples or SYNTHETIC_TEST_SIZE
    return _synthetic_labels(spec.seed, split, n)


def test_indices(spec) -> np.ndarray:
    """The test set of N samples is samples 0..N-1 of the test stream (independent of
    the training stream); N = data.test_samples, or SYNTHETIC_TEST_SIZE."""
    return np.arange(spec.test_samples or SYNTHETIC_TEST_SIZE)


def samples(spec, split: str, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return synthetic_samples(idx, seed=spec.seed, split=split)


def synthetic_samples(indices, *, seed: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic samples ``indices`` of ``split`` ("train" or "test"): ``(x [n,3,32,32], y [n])``.

    Sample ``k`` depends only on ``(seed, split, k)``, never on which other samples are
    generated with it or on the size of the set it belongs to.
    """
    if split not in ("train", "test"):
        raise DataError(f"synthetic split must be 'train' or 'test', got {split!r}")
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and idx.min() < 0:
        raise DataError("synthetic sample indices must be >= 0")
    n = len(idx)
    if n == 0:
        return torch.empty((0, *IMAGE_SHAPE)), torch.empty(0, dtype=torch.int64)
    y = torch.from_numpy(_synthetic_labels(seed, split, int(idx.max()) + 1)[idx])
    seeds = _sample_seeds(stable_seed("synthetic-noise", seed, split), idx)
    patterns = _synthetic_patterns(seed)
    res = SYNTHETIC_PATTERN_RES
    x = torch.empty((n, *IMAGE_SHAPE))
    low = torch.empty(_SYNTHETIC_CHUNK, 3, res, res)
    gen = torch.Generator()
    for start in range(0, n, _SYNTHETIC_CHUNK):
        stop = min(n, start + _SYNTHETIC_CHUNK)
        xc, lc = x[start:stop], low[: stop - start]
        # Per-sample generator: the random draws of sample k never depend on its neighbours.
        for j in range(stop - start):
            gen.manual_seed(seeds[start + j])
            torch.randn(3, res, res, generator=gen, out=lc[j])
            torch.randn(*IMAGE_SHAPE, generator=gen, out=xc[j])
        xc.mul_(SYNTHETIC_NOISE * _SYNTHETIC_SCALE)
        xc.add_(_smooth_fields(lc), alpha=SYNTHETIC_NUISANCE * _SYNTHETIC_SCALE)
        xc.add_(patterns[y[start:stop]], alpha=SYNTHETIC_AMPLITUDE * _SYNTHETIC_SCALE)
    return x, y


def _synthetic_train_size(spec, num_devices: int | None) -> int:
    if spec.samples_per_device == 0:
        return spec.synthetic_train_size
    if num_devices is None:
        raise DataError(
            "a synthetic training set with data.samples_per_device > 0 has "
            "num_devices * samples_per_device samples; pass num_devices"
        )
    return num_devices * spec.samples_per_device


def _synthetic_labels(seed: int, split: str, n: int) -> np.ndarray:
    """Labels of samples ``0..n-1``. A prefix of a longer call: label k does not depend on n."""
    rng = np.random.default_rng(stable_seed("synthetic-labels", seed, split))
    return rng.integers(0, NUM_CLASSES, size=n, dtype=np.int64)


def _sample_seeds(base: int, idx: np.ndarray) -> list[int]:
    """One well-mixed 64-bit seed per sample index (splitmix64 of ``base + k``)."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps on purpose
        z = np.uint64(base) + idx.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z.tolist()


def _upsample_matrix(res: int) -> torch.Tensor:
    """(32, res) matrix M so that M @ img @ M.T is the bilinear upsampling of a res x res image."""
    eye = torch.eye(res).reshape(res, 1, res)
    rows = F.interpolate(eye, size=IMAGE_SHAPE[1], mode="linear", align_corners=False)
    return rows.reshape(res, IMAGE_SHAPE[1]).T.contiguous()


def _smooth_fields(low: torch.Tensor) -> torch.Tensor:
    """Upsample [n,3,r,r] noise to [n,3,32,32] and give each field zero mean, unit std."""
    m = _upsample_matrix(low.shape[-1])
    fields = m @ low @ m.T
    fields -= fields.mean(dim=(1, 2, 3), keepdim=True)
    fields /= fields.std(dim=(1, 2, 3), keepdim=True)
    return fields


def _synthetic_patterns(seed: int) -> torch.Tensor:
    """The ten fixed class templates [10,3,32,32] of ``seed`` (smooth, zero mean, unit std)."""
    gen = torch.Generator().manual_seed(stable_seed("synthetic-patterns", seed))
    res = SYNTHETIC_PATTERN_RES
    return _smooth_fields(torch.randn(NUM_CLASSES, 3, res, res, generator=gen))


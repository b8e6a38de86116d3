"""Datasets and deterministic sharding for CIFAR-shaped image classification.

Every dataset here yields images of shape 3x32x32 (float32, normalized) and int64 labels
in ``0..NUM_CLASSES-1``. Three sources:

* ``synthetic`` -- generated on the fly, the offline default. Sample ``k`` of a split is
  a pure function of ``(seed, split, k)``, so a process can generate just its own shard.
* ``cifar10`` -- ``torchvision.datasets.CIFAR10`` under ``root`` (optionally downloaded).
* ``imagefolder`` -- ``root/train/<class>/*`` and ``root/test/<class>/*`` image files.

Sharding (``shard_indices``) is a pure function of the training labels, the number of
devices and a seed. A device's shard index is its position among the *sorted* device
names, so every process computes the same partition from the same configuration.

All randomness is seeded from ``_stable_seed`` (SHA-256 of the parts), never from
Python's ``hash()``, which is salted per process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common.errors import TestbedError
from common.training import stable_seed

NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)
DATASETS = ("synthetic", "cifar10", "imagefolder")
DISTRIBUTIONS = ("balanced", "imbalanced")

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")

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

MAX_SHARD_TRIES = 100  # Dirichlet redraws before giving up on min_samples


class DataError(TestbedError, ValueError):
    """The data configuration or the files on disk are unusable; the message says how to fix it."""


@dataclass(frozen=True)
class DataSpec:
    """What data a run uses. Mirrors the ``[data]`` section of the testbed file (plus ``seed``).

    ``samples_per_device``: 0 splits the whole training set over the devices; otherwise
    each balanced device gets exactly this many samples, and for ``imbalanced`` the pool
    of ``num_devices * samples_per_device`` samples is split unequally.
    ``test_samples``: 0 = whole test set; otherwise the first N of a seeded permutation.
    ``synthetic_train_size`` is the synthetic training-set size when
    ``samples_per_device == 0``; otherwise the synthetic set has exactly
    ``num_devices * samples_per_device`` samples.
    """

    dataset: str
    root: str = "data"
    download: bool = False
    distribution: str = "balanced"
    alpha: float = 0.5
    samples_per_device: int = 0
    test_samples: int = 0
    synthetic_train_size: int = 50000
    seed: int = 0
    image_size: int = 0  # 0: the data set's own size; else resized to image_size x image_size


# --------------------------------------------------------------------------- public API


def train_labels(spec: DataSpec, *, num_devices: int | None = None) -> np.ndarray:
    """Labels (int64, one per sample, in dataset order) of the whole training set.

    Cheap: no image is decoded or generated. ``num_devices`` is needed only for a
    synthetic set with ``samples_per_device > 0``, whose size is
    ``num_devices * samples_per_device``; it is ignored otherwise.
    """
    _check_spec(spec)
    if spec.dataset == "synthetic":
        return _synthetic_labels(spec.seed, "train", _synthetic_train_size(spec, num_devices))
    if spec.dataset == "cifar10":
        return np.asarray(_cifar10(spec, train=True).targets, dtype=np.int64)
    _, labels, _ = _imagefolder_listing(spec.root, "train")
    return labels


def shard_indices(
    labels: np.ndarray,
    *,
    num_devices: int,
    distribution: str,
    alpha: float,
    samples_per_device: int,
    seed: int,
    min_samples: int = 1,
) -> list[np.ndarray]:
    """Split sample indices ``0..len(labels)-1`` into ``num_devices`` disjoint shards.

    ``balanced``: a seeded permutation of all indices; device ``j`` gets the slice
    ``[j*n, (j+1)*n)`` with ``n = samples_per_device`` or ``len(labels) // num_devices``.

    ``imbalanced`` (label skew): the pool is the first ``num_devices * samples_per_device``
    indices of the permutation (everything when 0); each class's pool indices are split
    among the devices in proportions drawn from ``Dirichlet(alpha * ones(num_devices))``.
    Smaller ``alpha`` means more skew. If a device ends up with fewer than ``min_samples``
    the proportions are redrawn (at most ``MAX_SHARD_TRIES`` times). ``min_samples`` is the
    smallest allowed shard for either distribution (default 1: no empty shard).

    Returns one int64 array per device, each sorted ascending. Deterministic in
    ``(labels, num_devices, distribution, alpha, samples_per_device, seed)``.
    Raises ``DataError`` if the request cannot be met.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"labels must be a 1-D array, got shape {labels.shape}")
    if num_devices < 1:
        raise DataError(f"num_devices must be >= 1, got {num_devices}")
    if samples_per_device < 0:
        raise DataError(f"data.samples_per_device must be >= 0, got {samples_per_device}")
    _check_distribution(distribution, alpha)
    total = len(labels)
    wanted = num_devices * samples_per_device
    if wanted > total:
        raise DataError(
            f"{num_devices} devices x data.samples_per_device = {samples_per_device} needs "
            f"{wanted} training samples but the training set has {total}; lower "
            "data.samples_per_device (0 = split the whole set evenly) or use fewer devices"
        )
    rng = np.random.default_rng(stable_seed("shard_indices", seed))
    order = rng.permutation(total)
    if distribution == "balanced":
        shards = _balanced_split(order, num_devices, samples_per_device, min_samples)
    else:
        pool = order[:wanted] if samples_per_device else order
        shards = _dirichlet_split(pool, labels, num_devices, alpha, min_samples, rng)
    return [np.sort(s).astype(np.int64) for s in shards]


def load_train_shard(spec: DataSpec, *, devices: list[str], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The training shard of ``device``: ``(x float32 [n,3,32,32] normalized, y int64 [n])``.

    The shard index is ``device``'s position among the sorted names in ``devices``, so the
    result depends only on ``spec``, the *set* of device names and ``device``. Only this
    shard's images are materialised. Samples appear in ascending dataset order.
    """
    return _resized(spec, *_train_shard(spec, devices=devices, device=device))


def _train_shard(spec: DataSpec, *, devices: list[str], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    rank, num_devices = _device_rank(devices, device)
    _check_spec(spec)
    if spec.dataset == "synthetic":
        labels = train_labels(spec, num_devices=num_devices)
        idx = _shards_for(spec, labels, num_devices)[rank]
        return synthetic_samples(idx, seed=spec.seed, split="train")
    if spec.dataset == "cifar10":
        ds = _cifar10(spec, train=True)  # loaded once: labels for sharding and pixels
        idx = _shards_for(spec, np.asarray(ds.targets, dtype=np.int64), num_devices)[rank]
        return _cifar10_subset(ds, idx)
    paths, labels, _ = _imagefolder_listing(spec.root, "train")
    idx = _shards_for(spec, labels, num_devices)[rank]
    return _decode_images([paths[i] for i in idx]), torch.from_numpy(labels[idx].copy())


def shard_sizes(spec: DataSpec, *, devices: list[str]) -> dict[str, int]:
    """How many training samples each device's shard holds (labels only: no image is
    decoded). The central uses it to know what a missing device costs."""
    _check_spec(spec)
    names = sorted(devices)
    labels = train_labels(spec, num_devices=len(names))
    return {n: len(idx) for n, idx in zip(names, _shards_for(spec, labels, len(names)))}


def load_test_set(spec: DataSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation set: ``(x float32 [n,3,32,32] normalized, y int64 [n])``.

    ``spec.test_samples == 0`` means the whole test set (``SYNTHETIC_TEST_SIZE`` samples
    for synthetic data); otherwise the first N indices of a seeded permutation of the test
    set, in ascending order. A synthetic test set of N samples is samples ``0..N-1`` of
    the synthetic test stream (which is independent of the training stream).
    """
    return _resized(spec, *_test_set(spec))


def _resized(spec: DataSpec, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images resized to ``spec.image_size`` (bilinear, antialiased: a pure function of
    each image, so a device's shard is the same whoever loads it)."""
    size = spec.image_size
    if size and x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).contiguous()
    return x, y


def _test_set(spec: DataSpec) -> tuple[torch.Tensor, torch.Tensor]:
    _check_spec(spec)
    if spec.dataset == "synthetic":
        n = spec.test_samples or SYNTHETIC_TEST_SIZE
        return synthetic_samples(np.arange(n), seed=spec.seed, split="test")
    if spec.dataset == "cifar10":
        ds = _cifar10(spec, train=False)
        return _cifar10_subset(ds, _test_subset(spec, len(ds.targets)))
    _, class_to_idx = _imagefolder_classes(spec.root)
    paths, labels, _ = _imagefolder_listing(spec.root, "test", class_to_idx)
    idx = _test_subset(spec, len(labels))
    return _decode_images([paths[i] for i in idx]), torch.from_numpy(labels[idx].copy())


def shard_sizes(spec: DataSpec, *, devices: list[str]) -> dict[str, int]:
    """Number of training samples of each device, without decoding or generating images.

    (For cifar10 the batch files are still read: labels and pixels share them.)
    """
    _check_devices(devices)
    _check_spec(spec)
    labels = train_labels(spec, num_devices=len(devices))
    shards = _shards_for(spec, labels, len(devices))
    return {name: len(shards[rank]) for rank, name in enumerate(sorted(devices))}


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


# --------------------------------------------------------------------------- checks


def _check_spec(spec: DataSpec) -> None:
    if spec.dataset not in DATASETS:
        raise DataError(f"unknown data.dataset {spec.dataset!r}; use one of {', '.join(DATASETS)}")
    _check_distribution(spec.distribution, spec.alpha)
    if spec.samples_per_device < 0:
        raise DataError(f"data.samples_per_device must be >= 0, got {spec.samples_per_device}")
    if spec.test_samples < 0:
        raise DataError(f"data.test_samples must be >= 0, got {spec.test_samples}")
    if spec.synthetic_train_size < 1:
        raise DataError(f"synthetic_train_size must be >= 1, got {spec.synthetic_train_size}")


def _check_distribution(distribution: str, alpha: float) -> None:
    if distribution not in DISTRIBUTIONS:
        raise DataError(
            f"unknown data.distribution {distribution!r}; use one of {', '.join(DISTRIBUTIONS)}"
        )
    if distribution == "imbalanced" and not alpha > 0:
        raise DataError(f"data.alpha must be > 0 for an imbalanced split, got {alpha}")


def _check_devices(devices: list[str]) -> None:
    if not devices:
        raise DataError("the device list is empty; a shard needs at least one device")
    if len(set(devices)) != len(devices):
        raise DataError(f"device names must be unique, got {sorted(devices)}")


def _device_rank(devices: list[str], device: str) -> tuple[int, int]:
    """(index of ``device`` among the sorted names, number of devices)."""
    _check_devices(devices)
    ordered = sorted(devices)
    if device not in ordered:
        raise DataError(f"device {device!r} is not in the device list {ordered}")
    return ordered.index(device), len(ordered)


# --------------------------------------------------------------------------- sharding


def _shards_for(spec: DataSpec, labels: np.ndarray, num_devices: int) -> list[np.ndarray]:
    return shard_indices(
        labels,
        num_devices=num_devices,
        distribution=spec.distribution,
        alpha=spec.alpha,
        samples_per_device=spec.samples_per_device,
        seed=spec.seed,
    )


def _balanced_split(order: np.ndarray, num_devices: int, per_device: int, min_samples: int) -> list[np.ndarray]:
    n = per_device or len(order) // num_devices
    if n < min_samples:
        raise DataError(
            f"a balanced split of {len(order)} training samples over {num_devices} devices gives "
            f"{n} samples per device (need at least {min_samples}); use fewer devices "
            "or a larger training set"
        )
    return [order[j * n : (j + 1) * n] for j in range(num_devices)]


def _dirichlet_split(
    pool: np.ndarray,
    labels: np.ndarray,
    num_devices: int,
    alpha: float,
    min_samples: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Split ``pool`` by class with Dirichlet proportions, redrawing until min_samples holds."""
    if len(pool) < num_devices * min_samples:
        raise DataError(
            f"an imbalanced split of {len(pool)} samples cannot give each of {num_devices} "
            f"devices at least {min_samples}; raise data.samples_per_device or use fewer devices"
        )
    pool_labels = labels[pool]
    # Members of each class in permutation order (already random), split by proportions.
    by_class = [pool[pool_labels == c] for c in np.unique(pool_labels)]
    for _ in range(MAX_SHARD_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
        for members in by_class:
            props = rng.dirichlet(np.full(num_devices, alpha))
            cuts = np.round(np.cumsum(props)[:-1] * len(members)).astype(np.int64)
            for j, piece in enumerate(np.split(members, cuts)):
                parts[j].append(piece)
        shards = [np.concatenate(p) for p in parts]
        if min(len(s) for s in shards) >= min_samples:
            return shards
    raise DataError(
        f"could not draw an imbalanced split (alpha = {alpha}) giving each of {num_devices} "
        f"devices at least {min_samples} samples in {MAX_SHARD_TRIES} tries; raise data.alpha, "
        "raise data.samples_per_device or use fewer devices"
    )


def _test_subset(spec: DataSpec, total: int) -> np.ndarray:
    if spec.test_samples == 0:
        return np.arange(total)
    if spec.test_samples > total:
        raise DataError(
            f"data.test_samples = {spec.test_samples} but the test set has only {total} "
            "samples; lower it (0 = whole test set)"
        )
    rng = np.random.default_rng(stable_seed("test_subset", spec.seed))
    return np.sort(rng.permutation(total)[: spec.test_samples])


# --------------------------------------------------------------------------- synthetic


def _synthetic_train_size(spec: DataSpec, num_devices: int | None) -> int:
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


# --------------------------------------------------------------------------- cifar10 / images


def _normalize_uint8_hwc(images: np.ndarray) -> torch.Tensor:
    """uint8 [n,32,32,3] -> float32 [n,3,32,32]: ToTensor's /255, then CIFAR-10 mean/std."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(torch.float32)
    x = x.contiguous().div_(255.0)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def _cifar10(spec: DataSpec, *, train: bool):
    """torchvision's CIFAR10 for one split, with missing or broken files turned into DataError."""
    from torchvision.datasets import CIFAR10  # imported lazily: synthetic runs do not need it

    folder = os.path.join(spec.root, CIFAR10_FOLDER)
    if not spec.download:
        missing = [f for f in CIFAR10_FILES if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise DataError(
                f"data.root {spec.root!r} has no complete {CIFAR10_FOLDER}/ folder (missing: "
                f"{', '.join(missing)}); set data.download = true to fetch CIFAR-10, or point "
                f"data.root at a folder that contains {CIFAR10_FOLDER}/"
            )
    try:
        return CIFAR10(spec.root, train=train, download=spec.download)
    except RuntimeError as exc:  # torchvision's "not found or corrupted" (md5 mismatch)
        raise DataError(
            f"CIFAR-10 files under {folder!r} failed torchvision's integrity check ({exc}); "
            "delete the folder and set data.download = true, or point data.root at an intact copy"
        ) from exc
    except OSError as exc:  # download failure (no network, ...)
        raise DataError(
            f"could not download CIFAR-10 into {spec.root!r} ({exc}); download it elsewhere and "
            f"point data.root at the folder that contains {CIFAR10_FOLDER}/"
        ) from exc


def _cifar10_subset(ds, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    # Index the uint8 HWC array directly: no per-sample PIL round trip, no augmentation.
    x = _normalize_uint8_hwc(ds.data[idx])
    y = torch.from_numpy(np.asarray(ds.targets, dtype=np.int64)[idx])
    return x, y


def _imagefolder_classes(root: str) -> tuple[list[str], dict[str, int]]:
    """Class names (sorted folder names under root/train) and their indices."""
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir):
        raise DataError(
            f"data.root {root!r} has no train/ folder; an imagefolder dataset needs "
            "root/train/<class>/*.png|jpg and root/test/<class>/..., one sub-folder per class"
        )
    classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    if not classes:
        raise DataError(f"{train_dir!r} has no class sub-folders; put each class's images in train/<class>/")
    if len(classes) > NUM_CLASSES:
        raise DataError(
            f"{train_dir!r} has {len(classes)} class folders but the models have "
            f"{NUM_CLASSES} outputs; use at most {NUM_CLASSES} classes"
        )
    return classes, {name: i for i, name in enumerate(classes)}


def _imagefolder_listing(
    root: str, split: str, class_to_idx: dict[str, int] | None = None
) -> tuple[list[str], np.ndarray, list[str]]:
    """(file paths, int64 labels, class names) of root/<split>, in ImageFolder's order.

    Classes are always those of root/train, so train and test indices agree.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    if class_to_idx is None:
        _, class_to_idx = _imagefolder_classes(root)
    classes = sorted(class_to_idx, key=class_to_idx.get)
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise DataError(f"data.root {root!r} has no {split}/ folder; create {split}/<class>/ with images")
    unknown = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and e.name not in class_to_idx)
    if unknown:
        raise DataError(f"{split_dir!r} has class folders {unknown} that train/ does not have")
    present = [c for c in classes if os.path.isdir(os.path.join(split_dir, c))]
    samples = make_dataset(split_dir, {c: class_to_idx[c] for c in present}, IMG_EXTENSIONS, allow_empty=True)
    found = {label for _, label in samples}
    empty = [c for c in present if class_to_idx[c] not in found]  # train: present == classes
    if empty:
        raise DataError(
            f"class folders {empty} under {split_dir!r} contain no images "
            f"({', '.join(IMG_EXTENSIONS)}); add images or remove the folders"
        )
    paths = [p for p, _ in samples]
    labels = np.fromiter((label for _, label in samples), dtype=np.int64, count=len(samples))
    return paths, labels, classes


def _decode_images(paths: list[str]) -> torch.Tensor:
    """Decode image files to normalized float32 [n,3,32,32], resizing any that are not 32x32."""
    from PIL import Image

    size = IMAGE_SHAPE[1:]
    out = np.empty((len(paths), *size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                im.draft("RGB", size)  # JPEG only: decode at reduced scale, much faster
                im = im.convert("RGB")
                if im.size != size:
                    im = im.resize(size, Image.BILINEAR)
                out[i] = np.asarray(im)
        except OSError as exc:
            raise DataError(f"cannot read image {path!r} ({exc}); delete or replace the file") from exc
    return _normalize_uint8_hwc(out)

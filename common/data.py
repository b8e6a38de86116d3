"""Datasets and deterministic sharding for image classification.

Every data set is an entry of the registry in ``common/datasets`` (synthetic, cifar10,
cifar100, mnist, fashionmnist, imagefolder); this module is what they share: sharding,
the test subset, resizing to ``image_size`` and the checks. Images are float32,
normalized, [n,C,H,W]; labels int64 in ``0..classes-1``.

Sharding (``shard_indices``) is a pure function of the training labels, the number of
devices and a seed. A device's shard index is its position among the *sorted* device
names, so every process computes the same partition from the same configuration.

All randomness is seeded from ``stable_seed`` (SHA-256 of the parts), never from
Python's ``hash()``, which is salted per process.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common.datasets import DATASETS, DataError, dataset_info  # noqa: F401 - DataError is part of this API
from common.datasets.synthetic import NUM_CLASSES, SYNTHETIC_TEST_SIZE, synthetic_samples  # noqa: F401
from common.datasets.tvsets import SETS as _TVSETS
from common.training import stable_seed

DISTRIBUTIONS = ("balanced", "imbalanced")
CIFAR10_MEAN, CIFAR10_STD = _TVSETS["cifar10"].mean, _TVSETS["cifar10"].std
CIFAR10_FOLDER = _TVSETS["cifar10"].folder
CIFAR10_FILES = _TVSETS["cifar10"].files

MAX_SHARD_TRIES = 100  # Dirichlet redraws before giving up on min_samples


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
    return _source(spec).labels(spec, "train", num_devices)


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
    """The training shard of ``device``: ``(x float32 [n,C,H,W] normalized, y int64 [n])``.

    The shard index is ``device``'s position among the sorted names in ``devices``, so the
    result depends only on ``spec``, the *set* of device names and ``device``. Only this
    shard's images are materialised. Samples appear in ascending dataset order.
    """
    return _resized(spec, *_train_shard(spec, devices=devices, device=device))


def _train_shard(spec: DataSpec, *, devices: list[str], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    rank, num_devices = _device_rank(devices, device)
    _check_spec(spec)
    src = _source(spec)
    idx = _shards_for(spec, src.labels(spec, "train", num_devices), num_devices)[rank]
    return src.samples(spec, "train", idx)


def load_test_set(spec: DataSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation set: ``(x float32 [n,C,H,W] normalized, y int64 [n])``.

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
    src = _source(spec)
    if hasattr(src, "test_indices"):
        idx = src.test_indices(spec)
    else:
        idx = _test_subset(spec, len(src.labels(spec, "test", None)))
    return src.samples(spec, "test", idx)


def _source(spec: DataSpec):
    """The module that implements ``spec.dataset`` (see ``common.datasets``)."""
    return importlib.import_module(dataset_info(spec.dataset).module)


def shard_sizes(spec: DataSpec, *, devices: list[str]) -> dict[str, int]:
    """Number of training samples of each device, without decoding or generating images.

    (For cifar10 the batch files are still read: labels and pixels share them.)
    """
    _check_devices(devices)
    _check_spec(spec)
    labels = train_labels(spec, num_devices=len(devices))
    shards = _shards_for(spec, labels, len(devices))
    return {name: len(shards[rank]) for rank, name in enumerate(sorted(devices))}


# --------------------------------------------------------------------------- checks


def _check_spec(spec: DataSpec) -> None:
    if spec.dataset not in DATASETS:
        raise DataError(f"unknown data.dataset {spec.dataset!r}; use one of {', '.join(DATASETS)}")
    if spec.image_size < 0:
        raise DataError(f"data.image_size must be >= 0, got {spec.image_size}")
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

"""Tests for common/data.py: sharding, synthetic data, CIFAR-10 and image-folder loading.

Everything runs offline on data the tests make themselves (never /work/shared/data).
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.data import (
    CIFAR10_FOLDER,
    CIFAR10_MEAN,
    CIFAR10_STD,
    NUM_CLASSES,
    SYNTHETIC_TEST_SIZE,
    DataError,
    DataSpec,
    load_test_set,
    load_train_shard,
    shard_indices,
    shard_sizes,
    synthetic_samples,
    train_labels,
)

DEVICES = ["dev-c", "dev-a", "dev-b", "dev-d"]  # deliberately unsorted


def _shards(labels, **kw):
    args = dict(num_devices=4, distribution="balanced", alpha=0.5, samples_per_device=0, seed=0)
    args.update(kw)
    return shard_indices(labels, **args)


def _labels(n=10_000, seed=123):
    return np.random.default_rng(seed).integers(0, NUM_CLASSES, size=n)


def _normalized(hwc_uint8: np.ndarray) -> torch.Tensor:
    """Reference normalization (ToTensor then Normalize) for expected values."""
    x = torch.tensor(hwc_uint8, dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
    return (x - torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)


# --------------------------------------------------------------------------- shard_indices


@pytest.mark.parametrize("distribution", ["balanced", "imbalanced"])
def test_shards_deterministic_and_seed_dependent(distribution):
    labels = _labels()
    a = _shards(labels, distribution=distribution, seed=7)
    b = _shards(labels, distribution=distribution, seed=7)
    c = _shards(labels, distribution=distribution, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("distribution", ["balanced", "imbalanced"])
@pytest.mark.parametrize("per_device", [0, 500])
def test_shards_disjoint_sorted_int64(distribution, per_device):
    labels = _labels()
    shards = _shards(labels, distribution=distribution, samples_per_device=per_device)
    assert len(shards) == 4
    joined = np.concatenate(shards)
    assert len(np.unique(joined)) == len(joined)
    assert joined.min() >= 0 and joined.max() < len(labels)
    for s in shards:
        assert s.dtype == np.int64
        assert np.all(np.diff(s) > 0)
    if per_device:  # the imbalanced pool is num_devices * samples_per_device
        assert len(joined) == 4 * per_device
    elif distribution == "imbalanced":
        assert len(joined) == len(labels)


def test_balanced_sizes():
    labels = _labels(1003)
    assert [len(s) for s in _shards(labels)] == [250] * 4  # len // num_devices, rest unused
    assert [len(s) for s in _shards(labels, samples_per_device=100)] == [100] * 4
    with pytest.raises(DataError, match="samples_per_device"):
        _shards(labels, samples_per_device=300)  # 4 * 300 > 1003
    with pytest.raises(DataError, match="fewer devices"):
        _shards(labels[:3])  # 3 // 4 == 0: a shard would be empty


def test_imbalanced_unequal_and_label_skewed():
    labels = np.repeat(np.arange(NUM_CLASSES), 1000)
    shards = _shards(labels, distribution="imbalanced", alpha=0.1, num_devices=8)
    sizes = [len(s) for s in shards]
    assert max(sizes) > 1.5 * min(sizes)
    # Total-variation distance of each device's label distribution from uniform.
    tv = []
    for s in shards:
        frac = np.bincount(labels[s], minlength=NUM_CLASSES) / len(s)
        tv.append(0.5 * np.abs(frac - 1 / NUM_CLASSES).sum())
    assert np.mean(tv) > 0.4
    # Balanced shards of the same labels are close to uniform, for contrast.
    for s in _shards(labels, num_devices=8):
        frac = np.bincount(labels[s], minlength=NUM_CLASSES) / len(s)
        assert 0.5 * np.abs(frac - 1 / NUM_CLASSES).sum() < 0.1


def test_imbalanced_min_samples_honoured_and_impossible_raises():
    labels = _labels(2000)
    shards = _shards(labels, distribution="imbalanced", alpha=0.1, num_devices=10, min_samples=50)
    assert min(len(s) for s in shards) >= 50
    with pytest.raises(DataError, match="at least"):
        _shards(labels, distribution="imbalanced", num_devices=10, min_samples=300)
    with pytest.raises(DataError, match="tries"):  # feasible on paper, never drawn
        _shards(labels, distribution="imbalanced", alpha=0.01, num_devices=10, min_samples=199)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 400),
    num_devices=st.integers(1, 9),
    per_device=st.integers(0, 40),
    distribution=st.sampled_from(["balanced", "imbalanced"]),
    alpha=st.floats(0.05, 5.0),
    seed=st.integers(0, 2**40),
)
def test_shard_properties(n, num_devices, per_device, distribution, alpha, seed):
    """Any successful split is disjoint, sorted, in range and of the promised sizes."""
    labels = np.random.default_rng(seed).integers(0, NUM_CLASSES, size=n)
    try:
        shards = shard_indices(labels, num_devices=num_devices, distribution=distribution,
                               alpha=alpha, samples_per_device=per_device, seed=seed)
    except DataError:
        return  # not enough samples for this request; the message is tested elsewhere
    assert len(shards) == num_devices and all(len(s) >= 1 for s in shards)
    joined = np.concatenate(shards)
    assert len(np.unique(joined)) == len(joined) and (joined < n).all() and (joined >= 0).all()
    assert all(np.all(np.diff(s) > 0) for s in shards)
    if distribution == "balanced":
        assert {len(s) for s in shards} == {per_device or n // num_devices}
    else:
        assert len(joined) == (num_devices * per_device or n)


def test_unknown_distribution_and_bad_alpha():
    with pytest.raises(DataError, match="data.distribution"):
        _shards(_labels(), distribution="skewed")
    with pytest.raises(DataError, match="alpha"):
        _shards(_labels(), distribution="imbalanced", alpha=0.0)


# --------------------------------------------------------------------------- synthetic


def test_unknown_dataset_raises():
    with pytest.raises(DataError, match="data.dataset"):
        train_labels(DataSpec("imagenet"))
    with pytest.raises(DataError, match="data.distribution"):
        load_test_set(DataSpec("synthetic", distribution="weird"))


def test_synthetic_shard_shapes_sizes_and_device_order():
    spec = DataSpec("synthetic", samples_per_device=200)
    x, y = load_train_shard(spec, devices=DEVICES, device="dev-b")
    assert x.shape == (200, 3, 32, 32) and x.dtype == torch.float32 and x.is_contiguous()
    assert y.shape == (200,) and y.dtype == torch.int64 and y.is_contiguous()
    assert 0 <= y.min() and y.max() < NUM_CLASSES
    x2, y2 = load_train_shard(spec, devices=sorted(DEVICES), device="dev-b")
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert shard_sizes(spec, devices=DEVICES) == {d: 200 for d in DEVICES}
    with pytest.raises(DataError, match="not in the device list"):
        load_train_shard(spec, devices=DEVICES, device="dev-z")


def test_synthetic_sample_independent_of_context():
    spec = DataSpec("synthetic", synthetic_train_size=4000)
    labels = train_labels(spec)
    shard_a = _shards(labels)[1]  # "dev-b" is second in sorted order
    xa, ya = load_train_shard(spec, devices=DEVICES, device="dev-b")
    # Generated alone, one at a time.
    for pos in (0, 17, len(shard_a) - 1):
        k = int(shard_a[pos])
        xk, yk = synthetic_samples([k], seed=0, split="train")
        assert torch.equal(xk[0], xa[pos]) and yk[0] == ya[pos] == labels[k]
    # In a different device set (other shard, other neighbours).
    other = ["x1", "x2", "x3"]
    shards_o = _shards(labels, num_devices=3)
    xo, _ = load_train_shard(spec, devices=other, device="x2")
    common, pos_a, pos_o = np.intersect1d(shard_a, shards_o[1], return_indices=True)
    assert len(common) > 10
    assert torch.equal(xa[pos_a], xo[pos_o])
    # A synthetic set sized by samples_per_device is a prefix of the same stream.
    spec_small = DataSpec("synthetic", samples_per_device=50)
    n = 4 * 50
    assert np.array_equal(train_labels(spec_small, num_devices=4), labels[:n])


def test_synthetic_train_labels_need_num_devices_when_per_device_set():
    with pytest.raises(DataError, match="num_devices"):
        train_labels(DataSpec("synthetic", samples_per_device=10))


def test_synthetic_test_set_deterministic_and_distinct_from_train():
    x1, y1 = load_test_set(DataSpec("synthetic"))
    x2, y2 = load_test_set(DataSpec("synthetic"))
    assert x1.shape == (SYNTHETIC_TEST_SIZE, 3, 32, 32) and y1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    xs, ys = load_test_set(DataSpec("synthetic", test_samples=100))
    assert torch.equal(xs, x1[:100]) and torch.equal(ys, y1[:100])
    xt, _ = synthetic_samples(np.arange(100), seed=0, split="train")
    assert not torch.allclose(xt, xs)  # separate stream
    x3, _ = load_test_set(DataSpec("synthetic", test_samples=100, seed=1))
    assert not torch.allclose(x3, xs)


def test_synthetic_learnable_but_not_trivial():
    """A nearest-class-mean classifier fitted on 1000 samples beats chance but is not perfect."""
    spec = DataSpec("synthetic", samples_per_device=1000, test_samples=1000, seed=3)
    x, y = load_train_shard(spec, devices=["only"], device="only")
    xt, yt = load_test_set(spec)
    means = torch.stack([x[y == c].mean(0) for c in range(NUM_CLASSES)]).flatten(1)
    pred = torch.cdist(xt.flatten(1), means).argmin(1)
    acc = (pred == yt).float().mean().item()
    assert 0.5 < acc < 0.995, acc
    # Raw pixels are noisy: a single training image is a poor template (1-nearest neighbour).
    nn_pred = y[torch.cdist(xt[:300].flatten(1), x.flatten(1)).argmin(1)]
    assert (nn_pred == yt[:300]).float().mean().item() < 0.9


def test_synthetic_imbalanced_shards_cover_pool():
    spec = DataSpec("synthetic", distribution="imbalanced", alpha=0.3, samples_per_device=100)
    sizes = shard_sizes(spec, devices=DEVICES)
    assert sum(sizes.values()) == 400 and len(set(sizes.values())) > 1
    x, y = load_train_shard(spec, devices=DEVICES, device="dev-a")
    assert len(x) == len(y) == sizes["dev-a"]


# --------------------------------------------------------------------------- cifar10


def _write_fake_cifar10(root, per_batch=20, test_size=30):
    """A tiny CIFAR-10 in torchvision's python-pickle layout. Returns (train, test) as (hwc, labels)."""
    folder = root / CIFAR10_FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def write(name, n):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)  # rows are CHW, flattened
        labels = rng.integers(0, NUM_CLASSES, size=n).tolist()
        entry = {"batch_label": name, "labels": labels, "data": data, "filenames": [f"{i}.png" for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        return data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1), np.array(labels)

    train = [write(f"data_batch_{i}", per_batch) for i in range(1, 6)]
    test = write("test_batch", test_size)
    meta = {"label_names": [f"class{i}" for i in range(NUM_CLASSES)], "num_cases_per_batch": per_batch, "num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    train_x = np.concatenate([x for x, _ in train])
    train_y = np.concatenate([y for _, y in train])
    return (train_x, train_y), test


@pytest.fixture
def fake_cifar10(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    # The fixture cannot match the real files' md5 sums; accept any file that exists.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    return tmp_path, *_write_fake_cifar10(tmp_path)


def test_cifar10_shard_and_test_set(fake_cifar10):
    root, (train_x, train_y), (test_x, test_y) = fake_cifar10
    spec = DataSpec("cifar10", root=str(root), seed=5)
    labels = train_labels(spec)
    assert np.array_equal(labels, train_y) and labels.dtype == np.int64
    idx = _shards(labels, seed=5)[2]
    x, y = load_train_shard(spec, devices=DEVICES, device="dev-c")
    assert x.shape == (25, 3, 32, 32) and x.dtype == torch.float32 and x.is_contiguous()
    assert y.dtype == torch.int64 and np.array_equal(y.numpy(), train_y[idx])
    assert torch.allclose(x, _normalized(train_x[idx]), atol=1e-5)
    assert shard_sizes(spec, devices=DEVICES) == {d: 25 for d in DEVICES}

    xt, yt = load_test_set(spec)
    assert torch.allclose(xt, _normalized(test_x), atol=1e-5) and np.array_equal(yt.numpy(), test_y)
    sub = DataSpec("cifar10", root=str(root), test_samples=10, seed=5)
    xs, ys = load_test_set(sub)
    assert xs.shape == (10, 3, 32, 32)
    assert torch.equal(xs, load_test_set(sub)[0])
    chosen = [int(np.flatnonzero((xt == row).flatten(1).all(1))[0]) for row in xs]
    assert chosen == sorted(chosen) and np.array_equal(ys.numpy(), test_y[chosen])
    with pytest.raises(DataError, match="test_samples"):
        load_test_set(DataSpec("cifar10", root=str(root), test_samples=31))


def test_cifar10_missing_folder_names_the_fix(tmp_path):
    spec = DataSpec("cifar10", root=str(tmp_path / "nowhere"))
    for call in (lambda: train_labels(spec), lambda: load_test_set(spec)):
        with pytest.raises(DataError) as err:
            call()
        text = str(err.value)
        assert "nowhere" in text and "data.download = true" in text and CIFAR10_FOLDER in text


def test_cifar10_corrupted_files_raise_data_error(tmp_path):
    _write_fake_cifar10(tmp_path)  # real md5 check stays on: the fake files "are corrupted"
    with pytest.raises(DataError, match="integrity"):
        train_labels(DataSpec("cifar10", root=str(tmp_path)))


# --------------------------------------------------------------------------- imagefolder


def _write_imagefolder(root, per_class=4, classes=("cat", "dog", "emu")):
    """PNG images (exact pixels) plus one odd-sized JPEG in train/dog. Returns train pixels by path."""
    from PIL import Image

    rng = np.random.default_rng(1)
    pixels = {}
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
                path = root / split / c / f"img{i}.png"
                Image.fromarray(arr).save(path)
                pixels[str(path)] = arr
    big = Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8))
    big.save(root / "train" / "dog" / "zbig.jpg", quality=90)
    gray = Image.fromarray(rng.integers(0, 256, size=(32, 32), dtype=np.uint8), mode="L")
    gray.save(root / "train" / "emu" / "zgray.png")
    return pixels


def test_imagefolder_labels_shard_and_resize(tmp_path):
    pixels = _write_imagefolder(tmp_path)
    spec = DataSpec("imagefolder", root=str(tmp_path))
    labels = train_labels(spec)
    # Sorted class folders: cat=0, dog=1, emu=2; files sorted within each class.
    assert labels.tolist() == [0] * 4 + [1] * 5 + [2] * 5
    x, y = load_train_shard(spec, devices=["solo"], device="solo")
    assert x.shape == (14, 3, 32, 32) and x.dtype == torch.float32 and x.is_contiguous()
    assert y.tolist() == labels.tolist()  # one device: everything, ascending order
    pngs = sorted(p for p in pixels if "/train/" in p)
    png_pos = [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12]  # positions of the 32x32 colour PNGs
    expected = _normalized(np.stack([pixels[p] for p in pngs]))
    assert torch.allclose(x[png_pos], expected, atol=1e-5)
    assert torch.isfinite(x).all()

    shards = shard_sizes(spec, devices=["a", "b"])
    assert shards == {"a": 7, "b": 7}
    xa, ya = load_train_shard(spec, devices=["b", "a"], device="a")
    idx = _shards(labels, num_devices=2)[0]
    assert torch.equal(xa, x[idx]) and torch.equal(ya, y[idx])

    xt, yt = load_test_set(spec)
    assert xt.shape == (12, 3, 32, 32) and yt.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="no train/ folder"):
        train_labels(DataSpec("imagefolder", root=str(tmp_path)))
    _write_imagefolder(tmp_path, per_class=1)
    (tmp_path / "train" / "fox").mkdir()
    with pytest.raises(DataError, match="fox"):
        train_labels(DataSpec("imagefolder", root=str(tmp_path)))
    (tmp_path / "train" / "fox" / "broken.png").write_bytes(b"not an image")
    spec = DataSpec("imagefolder", root=str(tmp_path))
    assert len(train_labels(spec)) == 6  # 3 PNGs + jpg + gray + broken: listing decodes nothing
    with pytest.raises(DataError, match="broken.png"):
        load_train_shard(spec, devices=["solo"], device="solo")
    (tmp_path / "test" / "yak").mkdir()
    with pytest.raises(DataError, match="yak"):
        load_test_set(spec)

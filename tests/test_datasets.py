"""The data-set registry: MNIST, FashionMNIST and CIFAR-100 from tiny files in torchvision's
own on-disk formats (written here), resizing, and Dirichlet label skew for any class count."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest
import torch

from common.data import DataError, DataSpec, load_test_set, load_train_shard, shard_indices, shard_sizes, train_labels
from common.datasets import DATASETS
from common.datasets.tvsets import SETS

DEVICES = ["b", "a", "c"]


def _idx(path, magic: int, dims: tuple[int, ...], data: np.ndarray) -> None:
    """One file in the IDX format MNIST ships in (big-endian header, uint8 body)."""
    with open(path, "wb") as f:
        f.write(struct.pack(">i", magic) + b"".join(struct.pack(">i", d) for d in dims) + data.tobytes())


def write_mnist(root, folder: str, n_train: int = 30, n_test: int = 12):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(3)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        _idx(raw / f"{split}-images-idx3-ubyte", 0x803, (n, 28, 28), x)
        _idx(raw / f"{split}-labels-idx1-ubyte", 0x801, (n,), y)
        out[split] = (x, y.astype(np.int64))
    return out


def write_cifar100(root, n_train: int = 300, n_test: int = 20):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(4)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, size=n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "fine_labels": fine, "coarse_labels": [c // 5 for c in fine]}, f, protocol=2)
        out[name] = (data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1), np.array(fine))
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)],
                     "coarse_label_names": [f"s{i}" for i in range(20)]}, f, protocol=2)
    return out


def _normalized(pixels: np.ndarray, name: str) -> torch.Tensor:
    s = SETS[name]
    x = torch.from_numpy(pixels).float().div(255)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    c = x.shape[1]
    return (x - torch.tensor(s.mean).view(1, c, 1, 1)) / torch.tensor(s.std).view(1, c, 1, 1)


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")])
def test_mnist_family_from_idx_files(tmp_path, name, folder):
    files = write_mnist(tmp_path, folder)
    spec = DataSpec(name, root=str(tmp_path), seed=2)
    labels = train_labels(spec)
    assert np.array_equal(labels, files["train"][1])
    x, y = load_train_shard(spec, devices=DEVICES, device="a")
    idx = shard_indices(labels, num_devices=3, distribution="balanced", alpha=0.5, samples_per_device=0, seed=2)[0]
    assert x.shape == (10, 1, 28, 28) and x.dtype == torch.float32
    assert torch.allclose(x, _normalized(files["train"][0][idx], name), atol=1e-5)
    assert np.array_equal(y.numpy(), labels[idx])
    xt, yt = load_test_set(spec)
    assert xt.shape == (12, 1, 28, 28) and np.array_equal(yt.numpy(), files["t10k"][1])
    assert DATASETS[name].shape == (1, 28, 28) and DATASETS[name].classes == 10
    # resized for a small model: a pure function of each image
    small = DataSpec(name, root=str(tmp_path), seed=2, image_size=8)
    xs, ys = load_train_shard(small, devices=DEVICES, device="a")
    assert xs.shape == (10, 1, 8, 8) and torch.equal(ys, y)


def test_cifar100_with_dirichlet_skew_over_100_classes(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar
    # the tiny files cannot match the real md5 sums; accept any file that exists
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    files = write_cifar100(tmp_path)
    spec = DataSpec("cifar100", root=str(tmp_path), distribution="imbalanced", alpha=0.3, seed=1)
    labels = train_labels(spec)
    assert np.array_equal(labels, files["train"][1]) and labels.max() > 90
    sizes = shard_sizes(spec, devices=DEVICES)
    assert sum(sizes.values()) == 300 and len(set(sizes.values())) > 1  # unequal shards
    x, y = load_train_shard(spec, devices=DEVICES, device="c")
    assert x.shape == (sizes["c"], 3, 32, 32) and len(y) == sizes["c"]
    xt, yt = load_test_set(spec)
    assert torch.allclose(xt, _normalized(files["test"][0], "cifar100"), atol=1e-5)
    assert np.array_equal(yt.numpy(), files["test"][1])


@pytest.mark.parametrize("classes", [2, 3, 100])
def test_dirichlet_label_skew_for_any_class_count(classes):
    labels = np.random.default_rng(0).integers(0, classes, size=3000)
    shards = shard_indices(labels, num_devices=5, distribution="imbalanced", alpha=0.1, samples_per_device=0,
                           seed=7)
    together = np.concatenate(shards)
    assert len(together) == len(set(together.tolist())) == 3000  # disjoint, everything used
    # strong skew: each device's label mix is far from the overall one
    overall = np.bincount(labels, minlength=classes) / len(labels)
    tv = [0.5 * np.abs(np.bincount(labels[s], minlength=classes) / len(s) - overall).sum() for s in shards]
    assert np.mean(tv) > 0.3
    again = shard_indices(labels, num_devices=5, distribution="imbalanced", alpha=0.1, samples_per_device=0, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST/raw"), ("fashionmnist", "FashionMNIST/raw"),
                                         ("cifar100", "cifar-100-python")])
def test_missing_files_name_the_folder_and_the_fix(tmp_path, name, folder):
    with pytest.raises(DataError) as err:
        train_labels(DataSpec(name, root=str(tmp_path / "none")))
    assert folder in str(err.value) and "data.download = true" in str(err.value)


def test_the_model_is_sized_by_the_data_set():
    from common.config import build_config
    from tests.test_config import _set, local_raw
    assert build_config(_set(local_raw(), "data.dataset", "cifar100")).model_key == "vgg5/3x32x32/100"
    cfg = build_config(_set(_set(local_raw(), "data.dataset", "mnist"), "model.name", "resnet18"))
    assert cfg.model_key == "resnet18/1x28x28/10"

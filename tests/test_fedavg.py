"""FedAvg as a pure function: exact weighted means, summation in the order given, errors."""

from __future__ import annotations

import itertools
import struct

import pytest
import torch

from central.fedavg import fedavg
from central.strategies import FedAvg


def _bits32(x: float) -> bytes:
    return struct.pack("<f", x)


def test_weighted_mean_is_exact_for_simple_numbers():
    a = {"w": torch.tensor([1.0, 2.0, -4.0]), "b": torch.tensor(8.0)}
    b = {"w": torch.tensor([3.0, 6.0, 4.0]), "b": torch.tensor(0.0)}
    out = fedavg([(a, 1), (b, 3)])  # weights 1/4 and 3/4: exact in binary
    assert torch.equal(out["w"], torch.tensor([2.5, 5.0, 2.0]))
    assert torch.equal(out["b"], torch.tensor(2.0))
    assert out["w"].dtype == torch.float32 and out["b"].shape == ()


def test_equal_samples_is_the_plain_mean():
    ups = [({"w": torch.tensor([float(i), 10.0 * i])}, 50) for i in range(4)]
    assert torch.equal(fedavg(ups)["w"], torch.tensor([1.5, 15.0]))


def test_single_update_is_returned_unchanged_and_inputs_are_not_mutated():
    w = {"a": torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), "n": torch.tensor(7)}
    before = {k: v.clone() for k, v in w.items()}
    out = fedavg([(w, 123)])
    for k in w:
        assert torch.equal(out[k], before[k]) and out[k].dtype == before[k].dtype
        assert torch.equal(w[k], before[k])
        assert out[k].data_ptr() != w[k].data_ptr()  # a new tensor, not the caller's


def test_a_zero_sample_update_contributes_nothing():
    a = {"w": torch.tensor([2.0])}
    b = {"w": torch.tensor([1000.0])}
    assert torch.equal(fedavg([(a, 5), (b, 0)])["w"], torch.tensor([2.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_float_dtypes_are_kept(dtype):
    a = {"w": torch.tensor([1.0, 3.0], dtype=dtype)}
    b = {"w": torch.tensor([3.0, 5.0], dtype=dtype)}
    out = fedavg([(a, 1), (b, 1)])["w"]
    assert out.dtype == dtype
    assert torch.equal(out, torch.tensor([2.0, 4.0], dtype=dtype))


def test_integer_tensors_are_rounded_and_keep_their_dtype():
    # batch norm's num_batches_tracked: 10 * 1/4 + 11 * 3/4 = 10.75 -> 11; 10 * 3/4 + 11 * 1/4 = 10.25 -> 10
    a = {"n": torch.tensor(10, dtype=torch.int64), "v": torch.tensor([0, 100], dtype=torch.int32)}
    b = {"n": torch.tensor(11, dtype=torch.int64), "v": torch.tensor([3, 101], dtype=torch.int32)}
    out = fedavg([(a, 1), (b, 3)])
    assert out["n"].dtype == torch.int64 and out["n"].item() == 11
    assert out["v"].dtype == torch.int32 and out["v"].tolist() == [2, 101]  # 2.25 -> 2, 100.75 -> 101
    out = fedavg([(a, 3), (b, 1)])
    assert out["n"].item() == 10
    assert out["v"].tolist() == [1, 100]  # 0.75 -> 1, 100.25 -> 100


def _sequential_reference(values: list[float], samples: list[int]) -> float:
    """What fedavg promises: acc += value * (n / total) in float64, in the order given."""
    total = sum(samples)
    acc = 0.0
    for v, n in zip(values, samples):
        acc += v * (n / total)
    return struct.unpack("<f", struct.pack("<f", acc))[0]


def test_summation_follows_the_order_given():
    # float32 values 2**60, -2**60 and 1 span more than float64's 53 bits: 2**58 + 0.25
    # rounds back to 2**58, so when the big terms cancel decides whether 0.25 survives.
    big, small = float(2 ** 60), 1.0
    values = [big, -big, small, 3.0]
    samples = [1, 1, 1, 1]
    results: dict[bytes, list] = {}
    for order in itertools.permutations(range(4)):
        ups = [({"w": torch.tensor([values[i]], dtype=torch.float32)}, samples[i]) for i in order]
        got = fedavg(ups)["w"].item()
        want = _sequential_reference([values[i] for i in order], [samples[i] for i in order])
        assert _bits32(got) == _bits32(want), order
        again = fedavg(ups)["w"].item()  # deterministic
        assert _bits32(again) == _bits32(got)
        results.setdefault(_bits32(got), []).append(order)
    # the order really matters for these values: several different results
    assert len(results) >= 2
    cancel_first = fedavg([({"w": torch.tensor([v])}, 1) for v in [big, -big, small, 3.0]])["w"].item()
    small_first = fedavg([({"w": torch.tensor([v])}, 1) for v in [big, small, -big, 3.0]])["w"].item()
    assert cancel_first == 1.0   # (0.25 + 0.75)
    assert small_first == 0.75   # the 0.25 was lost to 2**58's rounding


def test_summation_order_with_unequal_samples():
    # weights 2/7, 3/7, 2/7 (inexact): still exactly the float64 sequence in the order given
    big = float(2 ** 62)
    values = [big, 2.0, -big]
    samples = [2, 3, 2]
    for order in itertools.permutations(range(3)):
        ups = [({"w": torch.tensor([values[i]])}, samples[i]) for i in order]
        got = fedavg(ups)["w"].item()
        want = _sequential_reference([values[i] for i in order], [samples[i] for i in order])
        assert _bits32(got) == _bits32(want), order


def test_strategy_class_is_the_function():
    ups = [({"w": torch.tensor([1.0, 5.0])}, 2), ({"w": torch.tensor([3.0, 1.0])}, 6)]
    (a, state), b = FedAvg().aggregate(ups), fedavg(ups)
    assert state == {}
    assert torch.equal(a["w"], b["w"]) and torch.equal(a["w"], torch.tensor([2.5, 2.0]))


def test_keys_keep_the_first_updates_order():
    a = {"z": torch.tensor(1.0), "a": torch.tensor(2.0), "m": torch.tensor(3.0)}
    b = {"z": torch.tensor(1.0), "a": torch.tensor(2.0), "m": torch.tensor(3.0)}
    assert list(fedavg([(a, 1), (b, 1)])) == ["z", "a", "m"]


def test_errors():
    w = {"w": torch.tensor([1.0, 2.0])}
    with pytest.raises(ValueError):
        fedavg([])
    with pytest.raises(ValueError):
        fedavg([(w, 0)])
    with pytest.raises(ValueError):
        fedavg([(w, 0), (w, 0)])
    with pytest.raises(ValueError):
        fedavg([(w, 5), (w, -1)])  # positive total, but a negative count
    with pytest.raises(ValueError):  # a key missing
        fedavg([(w, 1), ({}, 1)])
    with pytest.raises(ValueError):  # an extra key
        fedavg([(w, 1), ({"w": torch.tensor([1.0, 2.0]), "x": torch.tensor(1.0)}, 1)])
    with pytest.raises(ValueError):  # a different key
        fedavg([(w, 1), ({"v": torch.tensor([1.0, 2.0])}, 1)])
    with pytest.raises(ValueError):  # a different shape
        fedavg([(w, 1), ({"w": torch.tensor([1.0, 2.0, 3.0])}, 1)])
    with pytest.raises(ValueError):  # same count of elements, different shape
        fedavg([({"w": torch.zeros(2, 3)}, 1), ({"w": torch.zeros(3, 2)}, 1)])

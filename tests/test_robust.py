"""Updates judged against the round and the robust aggregators (``central.robust``):
pure functions, no network; and a round of six devices trained here, one of them hostile,
for every strategy (``scripts.bench_robust`` runs the same at a larger size)."""

from __future__ import annotations

import math

import pytest
import torch

from central import robust
from central.fedavg import fedavg
from central.strategies import make_strategy


def _w(*xs: float, n: int = 0) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(xs, dtype=torch.float32), "n": torch.tensor(n)}


CURRENT = _w(0.0, 0.0)


def test_distance_is_the_l2_norm_of_the_move_over_float_tensors():
    assert robust.distance(_w(3.0, 4.0, n=7), CURRENT) == 5.0
    assert robust.distance(_w(3e30, 4e30), CURRENT) == pytest.approx(5e30)
    assert robust.distance({"w": torch.tensor([3e38, 3e38]), "n": torch.tensor(0)}, CURRENT) == pytest.approx(
        math.sqrt(2) * 3e38, rel=1e-6)


def test_ratios_compare_each_move_with_the_median_of_the_others():
    assert robust.ratios([1.0, 2.0, 3.0, 100.0]) == [1 / 3, 2 / 3, 3 / 2, 50.0]
    assert robust.ratios([5.0]) == [1.0]                  # alone: nothing to judge it by
    assert robust.ratios([0.0, 0.0, 1.0]) == [0.0, 0.0, math.inf]
    assert robust.ratios([0.0, 0.0]) == [1.0, 1.0]
    # two devices: the far one is judged by the other alone, not by a median it pulls up
    assert robust.ratios([1.0, 1e30]) == pytest.approx([1e-30, 1e30])


def test_judge_refuses_only_what_is_beyond_the_factor_and_zero_turns_it_off():
    dists = [1.0, 1.2, 0.9, 1.1, 9.0, 1e30]
    assert robust.judge(dists, 10.0) == [False] * 5 + [True]
    assert robust.judge(dists, 5.0) == [False] * 4 + [True, True]
    assert robust.judge(dists, 0.0) == [False] * 6
    # the smallest move is never beyond its peers: something is always left to sum
    for dists in ([1.0, 100.0, 10_000.0], [0.0, 5.0], [2.0, 2.0, 2.0]):
        assert not all(robust.judge(dists, 1.01))


def test_coordinate_median_odd_even_and_integers_as_fedavg():
    ups = [(_w(1.0, 10.0, n=2), 1), (_w(2.0, -5.0, n=4), 1), (_w(1e30, 0.0, n=6), 2)]
    got = robust.coordinate_median(ups)
    assert got["w"].tolist() == [2.0, 0.0] and got["n"] == fedavg(ups)["n"]
    got = robust.coordinate_median(ups + [(_w(3.0, 1.0), 1)])
    assert got["w"].tolist() == [2.5, 0.5]
    assert got["w"].dtype == torch.float32


def test_trimmed_mean_drops_the_extremes_of_each_coordinate():
    ups = [(_w(float(x), float(-x)), 1) for x in (1, 2, 3, 4, 1000)]
    assert robust.trimmed_mean(ups, 0.2)["w"].tolist() == [3.0, -3.0]
    assert robust.trimmed_mean(ups, 0.0)["w"].tolist() == pytest.approx([202.0, -202.0])
    with pytest.raises(ValueError):
        robust.trimmed_mean(ups, 0.5)


def test_multi_krum_keeps_the_updates_near_their_neighbours():
    ups = [(_w(1.0, 1.0), 10), (_w(1.1, 0.9), 20), (_w(0.9, 1.0), 30), (_w(1.0, 1.1), 40), (_w(-50.0, 80.0), 1)]
    got, kept = robust.multi_krum(ups, byzantine=1)
    assert kept == [0, 1, 2, 3]
    assert torch.equal(got["w"], fedavg(ups[:4])["w"])
    _, kept = robust.multi_krum(ups, byzantine=1, keep=1)
    assert len(kept) == 1 and kept[0] != 4
    # fewer updates than Krum wants: still an answer, never the outlier
    got, kept = robust.multi_krum([ups[0], ups[4], ups[1]], byzantine=1)
    assert 1 not in kept
    with pytest.raises(ValueError):
        robust.multi_krum(ups, byzantine=-1)


def test_norm_clip_bounds_each_move_and_is_fedavg_when_nothing_is_clipped():
    current = _w(1.0, 1.0)
    ups = [(_w(2.0, 1.0), 1), (_w(1.0, 2.0), 1), (_w(1.0 + 3e4, 1.0 - 4e4), 2)]
    got, bound = robust.norm_clip(ups, current, 0.0)
    assert bound == 1.0  # the median of 1, 1 and 5e4
    # the far move counts as one of length 1 in its direction
    want = torch.tensor([1.0, 1.0], dtype=torch.float64) + (
        torch.tensor([1.0, 0.0]) * 0.25 + torch.tensor([0.0, 1.0]) * 0.25 + torch.tensor([0.6, -0.8]) * 0.5)
    assert torch.allclose(got["w"].double(), want, atol=1e-6)
    loose, _ = robust.norm_clip(ups, current, 1e9)
    assert torch.allclose(loose["w"], fedavg(ups)["w"])


def test_every_robust_strategy_is_pure_and_deterministic():
    ups = [(_w(float(i), float(-i), n=i), i + 1) for i in range(5)] + [(_w(1e30, -1e30), 3)]
    before = [{k: v.clone() for k, v in w.items()} for w, _ in ups]
    base = {"mu": 0.01, "server_lr": 1.0, "server_momentum": 0.9, "trim_fraction": 0.2, "krum_byzantine": 1,
            "krum_keep": 0, "clip_norm": 0.0, "refuse_factor": 10.0}
    for name in ("median", "trimmed_mean", "krum", "clip"):
        s = make_strategy({**base, "name": name})
        a, _ = s.aggregate(ups, current=CURRENT)
        b, _ = s.aggregate(ups, current=CURRENT)
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert bool(torch.isfinite(a["w"]).all()) and float(a["w"].abs().max()) <= 4.0, (name, a)
    assert all(torch.equal(w[k], b[k]) for (w, _), b in zip(ups, before) for k in w)

"""The central's judging of updates (``central.judge``) without a network: an update far
from the others is refused and recorded, the others are left as they came."""

from __future__ import annotations

import torch

from central.judge import Judge, update_problem
from central.results import RunResults
from common import messages as m
from common.events import EventLog
from common.models import build_model, state_spec


def _update(device: str, weights: dict[str, torch.Tensor], samples: int = 10) -> m.DeviceUpdate:
    return m.DeviceUpdate(round=1, device=device, edge="edge1", samples=samples, steps=1, train_seconds=0.0,
                          weights=weights)


def test_an_update_far_beyond_the_others_is_refused_and_recorded_once(tmp_path):
    start = dict(build_model("vgg5", seed=0).state_dict())
    moved = {d: {k: (v + 0.01 * (i + 1) if v.is_floating_point() else v) for k, v in start.items()}
             for i, d in enumerate(["device1", "device2", "device3"])}
    moved["device4"] = {k: (v * 1e6 if v.is_floating_point() else v) for k, v in start.items()}
    updates = {d: _update(d, w) for d, w in moved.items()}
    results = RunResults(run_dir=str(tmp_path), header={})
    events = EventLog(process="central", role="central")
    events.open(str(tmp_path))
    lines: list[str] = []
    judge = Judge(factor=10.0, results=results, events=events, say=lines.append)
    ratio_max, refused = judge(1, start, updates)
    assert sorted(updates) == ["device1", "device2", "device3"]  # the others, as they came
    assert all(updates[d].weights is moved[d] for d in updates)
    assert [x["device"] for x in refused] == ["device4"] and ratio_max is not None and ratio_max > 1e3
    (failure,) = results.summary["failures"]
    assert failure["device"] == "device4" and failure["ratio"] > 10 and failure["distance"] > 0
    assert "strategy.refuse_factor = 10" in failure["reason"] and lines == [
        f"  refused: device4's update of round 1: {failure['reason']}"]
    assert Judge(factor=0.0, results=results, events=events, say=lines.append)(1, start, dict(updates))[1] == []
    assert judge(1, start, {"device1": updates["device1"]}) == (None, [])  # nothing to weigh it against


def test_an_update_the_strategy_cannot_sum_says_why():
    spec = state_spec("vgg5")
    ok = dict(build_model("vgg5", seed=0).state_dict())
    nan = {**ok, "l6.fc.bias": torch.full_like(ok["l6.fc.bias"], float("nan"))}
    check = dict(devices={"device1"}, spec=spec, shard_samples={"device1": 10})
    assert update_problem(_update("device1", ok), **check) == ""
    assert update_problem(_update("device9", ok), **check) == "unknown device device9"
    assert update_problem(_update("device1", nan), **check) == "l6.fc.bias holds values that are not finite"
    assert update_problem(_update("device1", ok, samples=0), **check) == "no samples"
    assert update_problem(_update("device1", ok, samples=11), **check) == "claims 11 samples, its shard has 10"

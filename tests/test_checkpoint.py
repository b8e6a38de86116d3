"""The central's round checkpoint: written atomically, read back exactly, refused when
damaged (nothing is ever unpickled)."""

from __future__ import annotations

import json

import pytest
import torch

from central import checkpoint
from common.models import build_model, state_sha256
from common.plan import RoundPlan


def test_a_checkpoint_reads_back_bit_for_bit_with_the_plan_of_the_next_round(tmp_path):
    w = dict(build_model("vgg5", seed=3).state_dict())
    checkpoint.save(str(tmp_path), 4, w, {"rounds": [{"round": 4}], "status": "running"})
    checkpoint.save_plan(str(tmp_path), RoundPlan(round=5, lr=0.01, momentum=0.9, batch_size=8, local_epochs=1,
                                                  participants=("device2", "device1")))
    ck = checkpoint.load(str(tmp_path))
    assert ck.round == 4 and state_sha256(ck.weights) == state_sha256(w) and list(ck.weights) == list(w)
    assert ck.plan is not None and ck.plan.participants == ("device1", "device2") and ck.rng is not None
    assert ck.summary["rounds"] == [{"round": 4}]
    assert not list(tmp_path.glob("*.tmp"))


def test_a_plan_of_another_round_is_not_taken(tmp_path):
    w = dict(build_model("vgg5", seed=3).state_dict())
    checkpoint.save_plan(str(tmp_path), RoundPlan(round=4, lr=0.01, momentum=0.9, batch_size=8, local_epochs=1,
                                                  participants=("device1",)))
    checkpoint.save(str(tmp_path), 4, w, {})
    assert checkpoint.load(str(tmp_path)).plan is None  # round 4's plan: that round is done


@pytest.mark.parametrize("damage", ["no-meta", "bad-json", "other-weights", "truncated"])
def test_a_damaged_checkpoint_is_refused_with_what_is_wrong(tmp_path, damage):
    w = dict(build_model("vgg5", seed=3).state_dict())
    if damage != "no-meta":
        checkpoint.save(str(tmp_path), 2, w, {})
    meta, weights = tmp_path / checkpoint.META, tmp_path / checkpoint.weights_name(2)
    if damage == "bad-json":
        meta.write_text("{not json")
    elif damage == "other-weights":
        d = json.loads(meta.read_text())
        d["weights_sha256"] = "0" * 64
        meta.write_text(json.dumps(d))
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(str(tmp_path))


def test_a_checkpoint_cut_short_after_its_weights_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    """A full disk (or a signal) between the new weights and the JSON that names them: the
    previous checkpoint is still the one read, whole; no temporary file is left."""
    import errno
    w1, w2 = dict(build_model("vgg5", seed=1).state_dict()), dict(build_model("vgg5", seed=2).state_dict())
    checkpoint.save(str(tmp_path), 1, w1, {"rounds": [1]})
    real = checkpoint.write_json_atomic

    def full(path, data, **kw):
        def fill(f):
            f.write(b"{")
            raise OSError(errno.ENOSPC, "No space left on device")
        from common.atomic import write_atomic
        write_atomic(path, fill)
    monkeypatch.setattr(checkpoint, "write_json_atomic", full)
    with pytest.raises(OSError):
        checkpoint.save(str(tmp_path), 2, w2, {"rounds": [1, 2]})
    monkeypatch.setattr(checkpoint, "write_json_atomic", real)
    ck = checkpoint.load(str(tmp_path))
    assert ck.round == 1 and state_sha256(ck.weights) == state_sha256(w1) and ck.summary == {"rounds": [1]}
    assert not list(tmp_path.glob("*.tmp"))
    checkpoint.save(str(tmp_path), 2, w2, {"rounds": [1, 2]})  # the next one that works replaces it
    assert checkpoint.load(str(tmp_path)).round == 2
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [checkpoint.weights_name(2)]


def test_a_device_checkpoint_round_trips_and_a_cleared_one_stays_gone(tmp_path):
    from common.training import make_optimizer
    from device import state as disk
    model = build_model("vgg5", seed=1)
    opt = make_optimizer(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    plan = RoundPlan(round=3, lr=0.1, momentum=0.9, batch_size=2, local_epochs=1, participants=("device1",))
    w = disk.Writer(str(tmp_path / "d1"))
    w.submit(run="r", round=3, step=4, steps=8, edge="edge2", last_round=2, plan=plan,
             start=dict(build_model("vgg5", seed=0).state_dict()), model=dict(model.state_dict()),
             optimizer=opt.state_dict())
    w.flush()
    got = disk.load(str(tmp_path / "d1"))
    assert got is not None and (got.run, got.round, got.step, got.edge, got.plan) == ("r", 3, 4, "edge2", plan)
    assert state_sha256(got.model) == state_sha256(dict(model.state_dict()))
    opt2 = make_optimizer(build_model("vgg5", seed=0).parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(got.optimizer)  # the momentum buffers come back
    assert all(torch.equal(a["momentum_buffer"], b["momentum_buffer"])
               for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()))
    (tmp_path / "d1" / disk.TENSORS).write_bytes(b"\0" * 64)  # damaged: not used
    assert disk.load(str(tmp_path / "d1")) is None
    w.clear()
    assert disk.load(str(tmp_path / "d1")) is None and not list((tmp_path / "d1").iterdir())

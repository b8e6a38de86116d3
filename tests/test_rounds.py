"""The central's round logic without a network: the pure ``RoundTracker``, and the round
loop of ``CentralServer`` talking to fake edges through its registry seam."""

from __future__ import annotations

import dataclasses
import io
import queue
import time

import pytest
import torch

from central.edges import EdgeJoined, EdgeLost, EdgeMessage
from central.rounds import RoundTracker
from central.server import CentralServer, RunAborted
from common import messages as m
from common import security
from common.config import build_config
from common.events import EventLog
from common.models import build_model, state_sha256


def tracker(grace=5.0, participants=("d1", "d2", "d3")) -> RoundTracker:
    return RoundTracker(round=2, participants=frozenset(participants), shard_samples={"d1": 10, "d2": 20, "d3": 30},
                        grace_s=grace, started=0.0)


def test_complete_when_everyone_delivered_or_was_dropped():
    t = tracker()
    t.presence({"d1", "d2", "d3"}, 0.0)
    for d in ("d1", "d2"):
        assert t.offer(d, 2) == "take"
        t.take(d, object())
    assert not t.complete and t.waiting_for == ["d3"]
    t.presence({"d1", "d2"}, 1.0)          # d3 is attached nowhere from t=1
    assert t.expire(5.9) == [] and t.next_deadline() == 6.0
    (x,) = t.expire(6.5)
    assert x.device == "d3" and x.samples == 30 and "device_grace_s" in x.reason
    assert t.complete


def test_coming_back_within_the_grace_cancels_it():
    t = tracker(grace=2.0)
    t.presence({"d1"}, 0.0)
    t.presence({"d1", "d2", "d3"}, 1.5)    # back (on any edge) before the grace ran out
    assert t.expire(10.0) == [] and t.next_deadline() is None


def test_updates_are_taken_once_and_late_or_foreign_ones_are_named():
    t = tracker(grace=0.0, participants=("d1", "d2"))
    t.presence({"d1"}, 0.0)
    assert t.offer("d1", 2) == "take"
    t.take("d1", object())
    assert t.offer("d1", 2) == "duplicate"
    assert t.offer("d1", 1) == "stale" and t.offer("d1", 3) == "from the future"
    assert t.offer("d9", 2) == "not a participant"
    t.expire(1.0)
    assert t.offer("d2", 2) == "late"


def test_a_refused_update_drops_its_device_at_once_and_a_copy_of_it_is_not_late():
    t = tracker()
    t.presence({"d1", "d2", "d3"}, 0.0)
    t.take("d1", object())
    x = t.refuse("d2", "update refused: bad shape", 1.0)
    assert x is not None and x.refused and x.samples == 20 and x.absent_s == 0.0 and x.reason.endswith("bad shape")
    assert t.waiting_for == ["d3"] and t.next_deadline() is None  # nobody absent: nothing to wait out
    assert t.offer("d2", 2) == "refused"           # its copy, sent again after a lost link: not "late"
    assert t.refuse("d1", "x", 1.0) is None and t.refuse("d2", "x", 1.0) is None  # taken, or already out
    assert t.dropped["d2"] is x
    t.take("d3", object())
    assert t.complete and not t.drop("d3", "x", 2.0)
    assert not t.expire(100.0)


# -- the round loop against fake edges ------------------------------------------------------------

def config(devices=("device1", "device2"), rounds=2, grace=1.0):
    raw = {"run": {"round_timeout": 30.0, "startup_timeout": 10.0}, "central": {"host": "127.0.0.1", "port": 1},
           "edges": {"edge1": {"host": "127.0.0.1", "port": 2}},
           "devices": {d: {"edge": "edge1", "host": "127.0.0.1", "control_port": 10 + i} for i, d in enumerate(devices)},
           "training": {"rounds": rounds},
           "faults": {"heartbeat_s": 0.05, "dead_after_s": 0.2, "device_grace_s": grace}}
    return build_config(raw)


class FakeEdges:
    """Stands in for ``EdgeRegistry``: one edge that answers every RoundStart with an
    update per device it serves, except the ones told to vanish."""

    def __init__(self, devices, vanish=(), spoil=()):
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.live = {"edge1"}
        self.devices = list(devices)
        self.vanish = set(vanish)
        self.spoil = set(spoil)  # these send a weight of the wrong shape
        self.greeting = None
        self.sent: list = []
        self.queue.put(EdgeJoined("edge1", False))
        self.queue.put(EdgeMessage("edge1", m.EdgeStatus(edge="edge1", attached=self.devices)))

    def broadcast(self, msg):
        self.sent.append(("*", msg))
        if isinstance(msg, m.RoundStart):
            r = msg.round_plan.round
            here = [d for d in self.devices if d not in self.vanish]
            self.queue.put(EdgeMessage("edge1", m.EdgeStatus(edge="edge1", attached=here)))
            for d in here:
                weights = {**msg.weights, "l0.conv.bias": torch.zeros(3)} if d in self.spoil else msg.weights
                upd = m.DeviceUpdate(round=r, device=d, edge="edge1", samples=10, steps=1, train_seconds=0.0,
                                     weights=weights)
                self.queue.put(EdgeMessage("edge1", upd))
                self.queue.put(EdgeMessage("edge1", upd))  # sent again after a lost link: taken once

    def send(self, edge, msg):
        self.sent.append((edge, msg))
        return True


def server(cfg, edges):
    test = (torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.int64))
    import tempfile
    return CentralServer(cfg, creds=security.SharedKey(b"k" * 32), events=EventLog(process="central", role="central"), run_name="t",
                         run_dir=tempfile.mkdtemp(), test_set=test, shard_samples={"device1": 10, "device2": 10},
                         out=io.StringIO(), registry=edges)


def test_rounds_take_each_update_once_and_acknowledge_every_copy():
    cfg = config()
    edges = FakeEdges(cfg.device_names)
    srv = server(cfg, edges)
    srv._wait_for_testbed()
    w0 = dict(build_model("vgg5", seed=0).state_dict())
    out = srv._rounds(w0)
    assert state_sha256(out) == state_sha256(w0)  # every device sent the weights back: the mean is the same
    acks = [msg for e, msg in edges.sent if isinstance(msg, m.UpdateAck)]
    assert len(acks) == 8  # 2 rounds x 2 devices x 2 copies, every copy acknowledged
    rounds = srv.results.summary["rounds"]
    assert [r["missing"] for r in rounds] == [[], []] and all(r["samples"] == 20 for r in rounds)


def test_a_device_gone_past_its_grace_is_dropped_and_the_next_round_goes_without_it():
    cfg = config(grace=0.3)
    edges = FakeEdges(cfg.device_names, vanish={"device2"})
    srv = server(cfg, edges)
    srv._wait_for_testbed()
    srv._rounds(dict(build_model("vgg5", seed=0).state_dict()))
    r1, r2 = srv.results.summary["rounds"]
    assert r1["missing"] == ["device2"] and r1["dropped"][0]["samples"] == 10 and r1["samples_lost"] == 10
    assert r2["missing"] == ["device2"] and "round started" in r2["dropped"][0]["reason"]
    starts = [msg for e, msg in edges.sent if isinstance(msg, m.RoundStart)]
    assert starts[1].round_plan.participants == ("device1",)
    kinds = [f["kind"] for f in srv.results.summary["faults"]]
    assert kinds.count("device_dropped") == 2


def test_a_lost_edge_is_recorded_and_its_devices_count_as_absent():
    cfg = config(grace=0.2, rounds=1)
    edges = FakeEdges(cfg.device_names, vanish={"device1", "device2"})
    srv = server(cfg, edges)
    srv._wait_for_testbed()
    edges.queue.put(EdgeLost("edge1", "edge edge1 sent nothing for 0.2 s", 0.2))
    with pytest.raises(RunAborted, match="no device"):
        srv.cfg = dataclasses.replace(srv.cfg, run=dataclasses.replace(srv.cfg.run, round_timeout=0.5))
        srv._rounds(dict(build_model("vgg5", seed=0).state_dict()))
    assert srv.results.summary["faults"][0]["kind"] == "peer_silent"


def test_a_held_device_is_not_dropped_while_held_and_its_absence_counts_from_when_it_went():
    t = tracker(grace=1.0)
    t.presence({"d1", "d3"}, 0.0)          # d2 is not seen from t=0
    assert t.expire(5.0, held=frozenset({"d2"})) == [] and t.next_deadline(frozenset({"d2"})) is None
    (x,) = t.expire(5.0)                    # the hold is over: gone since 0.0
    assert x.device == "d2" and x.absent_s == 5.0


def test_devices_of_an_edge_whose_uplink_broke_are_held_for_the_central_grace():
    cfg = config()
    srv = server(cfg, FakeEdges(cfg.device_names))
    srv._pump(0.0)
    assert srv.present == {"device1", "device2"}
    srv._handle(EdgeLost("edge1", "edge edge1 closed the connection", 0.0))
    now = time.monotonic()
    assert srv.held(now) == {"device1", "device2"}
    assert srv.held(now + cfg.faults.central_grace_s + 1) == frozenset()
    srv._handle(EdgeJoined("edge1", True))
    srv._handle(EdgeMessage("edge1", m.EdgeStatus(edge="edge1", attached=["device1"])))
    assert srv.held(now) == {"device2"} and "device1" not in srv.orphans  # seen again: no longer held


def test_a_device_whose_update_is_refused_is_dropped_and_the_round_ends_with_the_others():
    """The round does not wait for the refused device until run.round_timeout: it is
    dropped at once, recorded once as a failure with the samples it cost, and named in the
    round's dropped and refused lists; its copy sent again is acknowledged and ignored."""
    cfg = config()
    edges = FakeEdges(cfg.device_names, spoil={"device2"})
    srv = server(cfg, edges)
    srv._wait_for_testbed()
    w0 = dict(build_model("vgg5", seed=0).state_dict())
    out = srv._rounds(w0)
    assert state_sha256(out) == state_sha256(w0)  # device1's update alone, summed
    s = srv.results.summary
    for r in s["rounds"]:
        assert r["devices"] == ["device1"] and r["missing"] == ["device2"] and r["refused"] == ["device2"]
        (d,) = r["dropped"]
        assert d["device"] == "device2" and d["samples"] == 10 and r["samples_lost"] == 10
        assert d["reason"].startswith("update refused: l0.conv.bias is torch.float32 [3]"), d
    assert [(f["round"], f["device"], f["samples"]) for f in s["failures"]] == [(1, "device2", 10), (2, "device2", 10)]
    assert s["faults"] == []  # no timeout, no grace ran out: the refusal is its only record
    assert len([msg for e, msg in edges.sent if isinstance(msg, m.UpdateAck)]) == 8
    assert "refused: device2's update of round 1" in srv.out.getvalue()


@pytest.mark.parametrize("spoil, why", [
    (lambda w: w.update({"l0.conv.weight": torch.zeros(1)}), "l0.conv.weight is torch.float32 [1]"),
    (lambda w: w.update({"l0.conv.bias": w["l0.conv.bias"].double()}), "float64"),
    (lambda w: w["l6.fc.bias"].__setitem__(0, float("nan")), "not finite"),
    (lambda w: w.pop("l0.conv.bias"), "do not match the model"),
])
def test_an_update_the_strategy_cannot_sum_is_refused_acknowledged_and_recorded(spoil, why):
    cfg = config(rounds=1)
    srv = server(cfg, FakeEdges(cfg.device_names))
    weights = {k: v.clone() for k, v in build_model("vgg5", seed=0).state_dict().items()}
    spoil(weights)
    assert why in srv._check_update(m.DeviceUpdate(round=1, device="device1", edge="edge1", samples=10, steps=1,
                                                   train_seconds=0.0, weights=weights))
    ok = build_model("vgg5", seed=0).state_dict()
    assert srv._check_update(m.DeviceUpdate(round=1, device="device1", edge="edge1", samples=10, steps=1,
                                            train_seconds=0.0, weights=ok)) == ""
    for samples in (11, 9, 10**12):  # the weight in the average is the shard's size, no more, no less
        assert "its shard has 10" in srv._check_update(m.DeviceUpdate(
            round=1, device="device1", edge="edge1", samples=samples, steps=1, train_seconds=0.0, weights=ok))


def test_an_update_for_a_round_not_started_yet_is_held_and_taken_when_it_starts():
    """A resumed central gets the updates its edges kept before it starts the round they
    belong to: they are held, not ignored (else the round would wait for them forever)."""
    cfg = config(rounds=1)
    edges = FakeEdges(cfg.device_names, vanish={"device1"})  # device1's update arrives before the round
    srv = server(cfg, edges)
    srv._pump(0.0)
    w0 = dict(build_model("vgg5", seed=0).state_dict())
    srv._handle(EdgeMessage("edge1", m.DeviceUpdate(round=1, device="device1", edge="edge1", samples=10, steps=1,
                                                    train_seconds=0.0, weights=w0)))
    assert ("device1", 1) in srv.early
    srv._wait_for_testbed()
    srv._rounds(w0)
    (r1,) = srv.results.summary["rounds"]
    assert r1["missing"] == [] and r1["devices"] == ["device1", "device2"]

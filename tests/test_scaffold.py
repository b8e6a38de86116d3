"""SCAFFOLD (``common.strategies.scaffold``) and the strategy seam it plugs into.

Fast: the seam's config checks, the server's arithmetic, the device's fold of what the
central returns (exactly once), the central's return path (a refused update keeps its
device's c_i), and split training (device part plus an edge session that waits for the
device's c_i, then migrates half-way) equal to the whole model trained with the same
algorithm in one process. Slow (one test, two small testbed runs): a run with a move, a
killed edge, a drop and a killed-and-restarted device ends bit-identical to the same run
without them, and to the in-process reference."""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import pytest
import torch

from central.fedavg import fedavg
from common import config as config_mod
from common import messages as m
from common import strategies
from common.errors import ConfigError, LocalProtocolError
from common.models import build_model, split_model, state_sha256
from common.plan import Algo, RoundPlan
from common.strategies.base import Failure, KeptState, returns_of, round_share
from common.strategies.scaffold import Scaffold, ScaffoldStep
from common.training import LOSS, ReferenceRun, make_optimizer, named_parameters, set_threads, train_reference_round
from edge.session import EdgeSession
from tests.test_config import _set, local_raw
from tests.test_rounds import config as tr_config

MODEL, CUT, LR = "vgg5", 3, 0.05


def _param_keys() -> list[str]:
    return [n for n, _ in named_parameters(build_model(MODEL, seed=0))]


# -- the seam ------------------------------------------------------------------------------


def test_a_key_of_another_strategy_names_the_strategy_it_belongs_to():
    with pytest.raises(ConfigError, match="belongs to fedprox") as err:
        config_mod.build_config(_set(local_raw(), "strategy.mu", 0.5))  # name = "fedavg"
    assert err.value.key == "strategy.mu"
    with pytest.raises(ConfigError, match="belongs to fedavgm, scaffold"):
        config_mod.build_config(_set(local_raw(), "strategy.server_lr", 0.5))
    raw = _set(_set(local_raw(), "strategy.name", "scaffold"), "strategy.server_lr", 0.5)
    cfg = config_mod.build_config(raw)
    assert cfg.strategy == {"name": "scaffold", "refuse_factor": config_mod.REFUSE_FACTOR, "server_lr": 0.5}
    assert strategies.make(cfg.strategy) == Scaffold(server_lr=0.5)


def test_the_plan_carries_the_strategy_as_a_typed_value_checked_on_arrival():
    plan = RoundPlan(round=1, lr=0.1, momentum=0.0, batch_size=4, local_epochs=1, participants=("a",),
                     algo=Algo("fedprox", {"mu": 0.1}))
    assert RoundPlan.from_wire(plan.to_wire()) == plan and plan.to_wire()["algo"] == {"name": "fedprox",
                                                                                       "params": {"mu": 0.1}}
    base = {**plan.to_wire()}
    for bad in ({"name": "fedsgd", "params": {}}, {"name": "fedprox", "params": {}},
                {"name": "fedprox", "params": {"mu": float("nan")}}, {"name": "fedprox", "params": {"mu": -1.0}},
                {"name": "fedavg", "params": {"mu": 0.1}}, {"name": "scaffold"}, "scaffold"):
        with pytest.raises(LocalProtocolError, match="algo"):
            RoundPlan.from_wire({**base, "algo": bad})


def test_round_tensors_go_to_each_part_and_returns_to_their_device():
    tensors = {"*/c/l0.conv.weight": torch.ones(1), "*/c/l5.fc.weight": torch.ones(1),
               "d1/delta/l0.conv.weight": torch.zeros(1), "d2/delta/l5.fc.weight": torch.full((1,), 2.0)}
    assert sorted(round_share(tensors, ["l0.conv.weight"])) == ["c/l0.conv.weight"]
    got = returns_of(tensors, "d2")
    assert sorted(got) == ["delta/l5.fc.weight"] and got["delta/l5.fc.weight"].item() == 2.0


def test_server_update_and_the_returns_are_option_two_and_pure():
    """delta_i = (x - y_i) / (K lr) - c; c+ = c + sum(delta_i) / N; x+ = x + lr_g (avg - x);
    the device's c_i + delta_i is the paper's c_i - c + (x - y_i) / (K lr)."""
    x = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(0)}
    y1, y2 = {"w": torch.tensor([0.5, 2.0]), "n": torch.tensor(2)}, {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(4)}
    s = Scaffold(server_lr=0.5)
    s.bind(["w"])
    state = {"c/w": torch.tensor([0.1, 0.0]), "adopt/d1": torch.tensor(3)}
    before = {k: v.clone() for k, v in state.items()}
    args = dict(current=x, state=state, clients=[("d1", 2), ("d2", 4)], lr=0.25)
    back = s.client_returns([(y1, 1), (y2, 3)], **args)
    w, new = s.aggregate([(y1, 1), (y2, 3)], **args)
    d1 = (x["w"] - y1["w"]) / (2 * 0.25) - state["c/w"]
    d2 = (x["w"] - y2["w"]) / (4 * 0.25) - state["c/w"]
    assert sorted(back) == ["d1", "d2"] and back["d1"]["delta/w"].dtype == torch.float32
    assert torch.allclose(back["d1"]["delta/w"], d1) and torch.allclose(back["d2"]["delta/w"], d2)
    n = 3  # two results and a failure: the round's participants
    w3, new3 = s.aggregate([(y1, 1), (y2, 3)], [Failure("d3", "late", 1)], **args)
    assert torch.allclose(new["c/w"], state["c/w"] + (d1 + d2) / 2) and torch.allclose(new3["c/w"], state["c/w"] + (d1 + d2) / n)
    assert sorted(new) == ["adopt/d1", "c/w"]  # only c: the devices keep their c_i (and the central's own ints pass)
    avg = (y1["w"] * 1 + y2["w"] * 3) / 4
    assert torch.allclose(w["w"], x["w"] + 0.5 * (avg - x["w"]))
    assert torch.equal(w["n"], fedavg([(y1, 1), (y2, 3)])["n"])  # integer tensors take FedAvg's value
    assert all(torch.equal(state[k], before[k]) for k in state)
    c_i = torch.tensor([0.2, -0.2])
    kept = KeptState({"ci/w": c_i.clone()}, 2)
    assert kept.adopt(ScaffoldStep, 3, back["d1"], {"w": x["w"]})
    assert torch.allclose(kept.tensors["ci/w"], c_i - state["c/w"] + (x["w"] - y1["w"]) / (2 * 0.25))
    with pytest.raises(ValueError):
        s.aggregate([(y1, 1)], current=x, state=state)  # no (device, steps): cannot be done


def test_a_device_folds_each_return_exactly_once():
    """adopt > round: folded; adopt == round: nothing (a DeviceRound sent again, a central
    resumed, a refused or late update never aggregated); adopt < round: an error."""
    like = {"w": torch.zeros(2)}
    kept = KeptState()
    assert kept.adopt(ScaffoldStep, 0, {}, like) is False and kept.tensors == {}  # nothing aggregated yet
    assert kept.adopt(ScaffoldStep, 2, {"delta/w": torch.tensor([1.0, -1.0])}, like) and kept.round == 2
    once = kept.tensors["ci/w"].clone()
    assert kept.adopt(ScaffoldStep, 2, {"delta/w": torch.tensor([1.0, -1.0])}, like) is False
    assert torch.equal(kept.tensors["ci/w"], once)
    assert kept.adopt(ScaffoldStep, 5, {"delta/w": torch.tensor([0.5, 0.5])}, like) and kept.round == 5
    assert torch.equal(kept.tensors["ci/w"], torch.tensor([1.5, -0.5]))
    with pytest.raises(ValueError, match="round 4 .* round 5"):
        kept.adopt(ScaffoldStep, 4, {"delta/w": torch.tensor([0.5, 0.5])}, like)
    with pytest.raises(ValueError, match="one per parameter"):
        kept.adopt(ScaffoldStep, 6, {}, like)
    with pytest.raises(ValueError, match="not finite"):
        kept.adopt(ScaffoldStep, 6, {"delta/w": torch.tensor([float("nan"), 0.0])}, like)
    assert kept.round == 5 and sorted(kept.share(["w", "v"])) == ["ci/w"] and kept.share(["v"]) == {}


def test_a_refused_update_keeps_its_devices_variate_and_the_central_keeps_only_files():
    """The central's return path (``central.returns``) with fake edges: round 2's update of
    device2 is refused, so round 3 returns to it what round 1 did (adopt 1: the device
    keeps its c_i); each device's files of older rounds go once a newer checkpoint names
    a newer one, and the central's state holds c and one int per device."""
    from central.returns import FOLDER, adopted
    from tests.test_rounds import FakeEdges, server

    class Edges(FakeEdges):
        def broadcast(self, msg):
            if isinstance(msg, m.RoundStart):
                self.spoil = {"device2"} if msg.round_plan.round == 2 else set()
            super().broadcast(msg)

    cfg = dataclasses.replace(tr_config(rounds=3), strategy={**tr_config().strategy, "name": "scaffold", "server_lr": 1.0})
    edges = Edges(cfg.device_names)
    srv = server(cfg, edges)
    srv._wait_for_testbed()
    srv._rounds(dict(build_model("vgg5", seed=0).state_dict()))
    starts = [msg for _, msg in edges.sent if isinstance(msg, m.RoundStart)]
    assert [s.adopt for s in starts] == [{}, {"device1": 1, "device2": 1}, {"device1": 2, "device2": 1}]
    assert sorted({k.split("/")[0] for k in starts[2].algo}) == ["*", "device1", "device2"]
    for k, t in returns_of(starts[1].algo, "device2").items():  # round 1's delta again: nothing new to fold
        assert torch.equal(t, returns_of(starts[2].algo, "device2")[k])
    assert starts[2].round_plan.round == 3 and srv.results.summary["rounds"][1]["refused"] == ["device2"]
    assert adopted(srv.strategy_state) == {"device1": 3, "device2": 3}
    assert {k.split("/")[0] for k in srv.strategy_state} == {"c", "adopt"}
    folder = os.path.join(srv.results.run_dir, FOLDER)
    assert sorted(os.listdir(folder)) == ["device1.3.safetensors", "device2.3.safetensors"]


def test_the_correction_is_c_minus_ci_and_zero_state_is_plain_sgd():
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(3))
    p2 = torch.nn.Parameter(p1.detach().clone())
    p3 = torch.nn.Parameter(p1.detach().clone())
    plain = make_optimizer([("w", p1)], lr=0.1, momentum=0.0)
    first = make_optimizer([("w", p2)], lr=0.1, momentum=0.0, algo=Algo("scaffold", {}), tensors={})
    corr = make_optimizer([("w", p3)], lr=0.1, momentum=0.0, algo=Algo("scaffold", {}),
                          tensors={"c/w": torch.tensor([1.0, 0.0, 0.0]), "ci/w": torch.tensor([0.0, 2.0, 0.0])})
    for opt, p in ((plain, p1), (first, p2), (corr, p3)):
        opt.zero_grad()
        p.sum().backward()
        opt.step()
    assert torch.equal(p1, p2)
    assert torch.allclose(p3 - p1, -0.1 * torch.tensor([1.0, -2.0, 0.0]))


# -- split = whole ----------------------------------------------------------------------


def _variates() -> tuple[dict[str, torch.Tensor], KeptState]:
    """SCAFFOLD after one round of two clients: the round's tensors (c) and device "d"'s
    kept c_i, far from zero."""
    g = torch.Generator().manual_seed(7)
    x = build_model(MODEL, seed=2).state_dict()
    s = Scaffold()
    s.bind(_param_keys())
    ys = [{k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in x.items()}
          for _ in range(2)]
    args = dict(current=x, state={}, clients=[("d", 4), ("e", 6)], lr=LR)
    back = s.client_returns([(ys[0], 3), (ys[1], 5)], **args)
    _, state = s.aggregate([(ys[0], 3), (ys[1], 5)], **args)
    kept = KeptState()
    kept.adopt(ScaffoldStep, 1, back["d"], {n: p.detach() for n, p in named_parameters(build_model(MODEL, seed=0))})
    return s.round_tensors(state), kept


def test_scaffold_split_equals_whole_and_survives_a_move():
    """The device part and the edge session each correct their own gradients; the session
    waits for the device's c_i (no step before it), then moves (snapshot, checksum,
    rebuild) half-way with its correction in its optimizer state; the result is the whole
    model trained with SCAFFOLD in one piece, bit for bit."""
    algo, (tensors, kept) = Algo("scaffold", {}), _variates()
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(4)]
    whole = build_model(MODEL, seed=2)
    keys = [k for k in whole.state_dict()]
    opt = make_optimizer(named_parameters(whole), lr=LR, momentum=0.9, algo=algo,
                         tensors={**round_share(tensors, keys), **kept.share(keys)})
    for x, y in data:
        opt.zero_grad()
        LOSS(whole(x), y).backward()
        opt.step()

    dev, edge = split_model(build_model(MODEL, seed=2), CUT)
    dev_keys, edge_keys = list(dev.state_dict()), list(edge.state_dict())
    dev_opt = make_optimizer(named_parameters(dev), lr=LR, momentum=0.9, algo=algo,
                             tensors={**round_share(tensors, dev_keys), **kept.share(dev_keys)})
    session = EdgeSession(device="d", round=2, mode="fedfly", model=MODEL, split_layer=CUT, lr=LR, momentum=0.9,
                          part_state={k: v.clone() for k, v in edge.state_dict().items()}, algo=algo,
                          algo_tensors=round_share(tensors, edge_keys), awaits_state=True)
    assert session.awaits_state and not any("scaffold_corr" in st for st in session.optimizer.state.values())
    session.take_state(kept.share(edge_keys))  # the device's ClientState
    assert not session.awaits_state
    for step, (x, y) in enumerate(data):
        if step == 2:
            meta, snap, checksum = session.snapshot()
            assert any(k.endswith("/scaffold_corr") for k in snap)
            assert meta["optimizer"]["param_groups"][0]["algo"] == {"name": "scaffold", "params": {}}
            session = EdgeSession.from_snapshot(meta, snap, checksum, expect_model=MODEL, expect_split=CUT)
        dev_opt.zero_grad()
        act = dev(x)
        grads = []
        session.train_step(step, act.detach(), y, lambda gr, loss: grads.append(gr))
        act.backward(grads[0])
        dev_opt.step()
    assert state_sha256(whole.state_dict()) == state_sha256({**dev.state_dict(), **session.weights()})
    plain = build_model(MODEL, seed=2)
    train_reference_round(plain, torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]),
                          [torch.arange(4 * i, 4 * i + 4) for i in range(4)], lr=LR, momentum=0.9)
    assert state_sha256(plain.state_dict()) != state_sha256(whole.state_dict())  # the correction did something


def test_the_edge_takes_ci_from_the_device_and_trains_no_step_before_it():
    """The edge's core (with ``tests.seams``'s fakes): RoundStart carries c and
    device1's delta (adopt 1); its DeviceRound carries c for its part and the whole delta;
    the session waits for device1's c_i (a step before it costs the link, a reattach is
    asked for it, one that does not fit costs the link), then corrects by c - c_i."""
    from edge.ports import CentralMessage, DeviceMessage
    from tests.seams import DEV_KEYS, EDGE_KEYS, WEIGHTS, attach, make_core, of
    params = _param_keys()
    core = make_core()
    p = attach(core)
    plan = RoundPlan(round=2, lr=0.01, momentum=0.9, batch_size=4, local_epochs=1,
                     participants=("device1", "device2"), algo=Algo("scaffold", {}))
    algo = {**{f"*/c/{k}": torch.full_like(WEIGHTS[k], 0.5) for k in params},
            **{f"device1/delta/{k}": torch.full_like(WEIGHTS[k], 0.25) for k in params}}
    core.handle(CentralMessage(m.RoundStart(plan=plan.to_wire(), weights=WEIGHTS, algo=algo, adopt={"device1": 1})))
    (work,) = of(p, m.DeviceRound)
    assert work.adopt == 1 and sorted(work.algo) == sorted([f"c/{k}" for k in params if k in DEV_KEYS]
                                                           + [f"delta/{k}" for k in params])
    g = torch.Generator().manual_seed(0)
    step0 = m.Activations(round=2, step=0, batch={"x": torch.randn(4, 64, 8, 8, generator=g),
                                                  "y": torch.randint(0, 10, (4,), generator=g)})
    core.handle(DeviceMessage(p, "device1", step0))
    assert p.closed and "before its ClientState" in p.notice.detail and not of(p, m.Gradients)
    p = attach(core, kind="resume", round=2, step=0, source="edge1", why="reconnect")
    assert of(p, m.AttachReply)[0].client_state
    edge_params = [k for k in params if k in EDGE_KEYS]
    core.handle(DeviceMessage(p, "device1", m.ClientState(round=2, state={f"ci/{edge_params[0]}": torch.ones(3)})))
    assert p.closed and "ClientState" in p.notice.detail
    p = attach(core, kind="resume", round=2, step=0, source="edge1", why="reconnect")
    ci = {f"ci/{k}": torch.full_like(WEIGHTS[k], 2.0) for k in edge_params}
    core.handle(DeviceMessage(p, "device1", m.ClientState(round=2, state=ci)))
    session = core.entries["device1"].session
    assert not session.awaits_state and not p.closed
    assert all(torch.equal(session.optimizer.state[q]["scaffold_corr"], torch.full_like(q, -1.5))
               for _, q in session.named_parameters())
    core.handle(DeviceMessage(p, "device1", step0))
    assert of(p, m.Gradients) and session.step == 1
    p = attach(core, kind="resume", round=2, step=1, source="edge1", why="reconnect")
    assert not of(p, m.AttachReply)[0].client_state  # the session has it


def test_a_snapshot_naming_an_unknown_algorithm_is_refused():
    from common.errors import MigrationError
    session = EdgeSession(device="d", round=1, mode="fedfly", model=MODEL, split_layer=CUT, lr=LR, momentum=0.9,
                          part_state=split_model(build_model(MODEL, seed=0), CUT)[1].state_dict())
    meta, snap, _ = session.snapshot()
    meta["optimizer"]["param_groups"][0]["algo"] = {"name": "nope", "params": {}}
    from edge.checksum import snapshot_checksum
    with pytest.raises(MigrationError, match="nope"):
        EdgeSession.from_snapshot(meta, snap, snapshot_checksum(meta, snap), expect_model=MODEL, expect_split=CUT)


# -- a testbed run with moves and faults ---------------------------------------------------


def reference_sha(cfg_path, rounds: int) -> str:
    """The run in this process (``ReferenceRun``): each device's whole model trained with
    SCAFFOLD and its own c_i, the server's update over the devices in name order."""
    from common.cli import data_spec
    from common.config import load_config
    from common.data import load_train_shard
    cfg = load_config(str(cfg_path))
    old = torch.get_num_threads()
    set_threads(cfg.training.threads)
    try:
        shards = {d: load_train_shard(data_spec(cfg), devices=cfg.device_names, device=d) for d in cfg.device_names}
        t = cfg.training
        ref = ReferenceRun(strategies.make(cfg.strategy), cfg.model_key, lr=t.lr, momentum=t.momentum,
                           batch_size=t.batch_size, local_epochs=t.local_epochs, seed=cfg.run.seed)
        weights = build_model(cfg.model_key, seed=cfg.run.seed).state_dict()
        for r in range(1, rounds + 1):
            weights = ref.round(r, weights, shards)
        return state_sha256(weights)
    finally:
        torch.set_num_threads(old)


@pytest.mark.process
@pytest.mark.timeout(1800)  # three rounds on a loaded machine
def test_scaffold_with_a_move_a_killed_edge_a_drop_and_a_restarted_device_ends_as_in_one_process(tmp_path, monkeypatch):
    """Three rounds of two devices, one testbed run. In round 2 (control variates no longer
    zero) device1 moves to edge2 (an offer: its correction goes with the session), then
    edge2 is killed (both sessions come back from the replicas on edge1); in round 3
    device2's radio drops for a moment, and device1's process is killed mid-round and
    started again (its c_i from its disk, folded in once: not again by the new process).
    It ends with the model trained in one process (``ReferenceRun``), which a run without
    any of it ends with too: split equals whole, and faults change nothing."""
    from tests import test_faults
    from tests.test_faults import _config, _run, _wait_status
    monkeypatch.setattr(test_faults, "RUN_TIMEOUT", 900.0)  # three rounds on a loaded machine
    # slower to call a peer dead than test_faults' settings: a loaded machine must not
    # lose links the test did not cut (a device dropped from a round would end elsewhere)
    kw = dict(rounds=3, faults={"checkpoint_steps": 2, "heartbeat_s": 0.5, "dead_after_s": 4.0,
                                "device_grace_s": 120.0})
    cfg = _config(tmp_path, "faulty", moves=[{"device": "device1", "to": "edge2", "round": 2, "at": 0.25}],
                  drops=[{"device": "device2", "round": 3, "at": 0.5, "seconds": 0.3}], **kw)
    cfg.write_text(cfg.read_text() + "\n[strategy]\nname = \"scaffold\"\nserver_lr = 1.0\n")
    slow = {d: [f"devices.{d}.slowdown=5"] for d in ("device1", "device2")}

    def during(bed):
        _wait_status(cfg, "device1", lambda st: st.round == 2 and st.edge == "edge2" and st.step >= 4,
                     timeout=240.0)
        os.kill(bed.procs["edge2"].pid, signal.SIGKILL)
        _wait_status(cfg, "device1", lambda st: st.round == 3 and 3 <= st.step < st.steps - 1, timeout=240.0)
        os.kill(bed.procs["device1"].pid, signal.SIGKILL)
        bed.procs["device1"].wait()
        bed.start("device", "device1", *slow["device1"])

    summary, _, _ = _run(cfg, tmp_path / "f", during=during, device_args=slow)
    assert summary["status"] == "finished" and summary["strategy"]["name"] == "scaffold"
    assert all(r["missing"] == [] for r in summary["rounds"]), summary["rounds"]
    assert [mv["round"] for mv in summary["migrations"]] == [2], summary["migrations"]
    assert any(f.get("recovery") == "replica" for f in summary["faults"]), summary["faults"]
    assert any(f["kind"] == "restarted" and f["process"] == "device1" for f in summary["faults"]), summary["faults"]
    assert not any(f["kind"] == "protocol_error" for f in summary["faults"])  # no step before its ClientState
    run = cfg.parent / "runs" / "faulty"

    def folds(name: str) -> list[int]:
        return [json.loads(x)["adopt"] for x in (run / name).read_text().splitlines() if '"state_folded"' in x]
    assert folds("events-device1.jsonl") == [1, 2] and folds("events-device1.1.jsonl") == []
    assert sorted(p.name for p in (run / "client-returns").iterdir()) == ["device1.3.safetensors",
                                                                         "device2.3.safetensors"]
    assert summary["final_model_sha256"] == reference_sha(cfg, rounds=3)

"""Devices move: exactness of every mode under moves, the migration records, the
controller CLI and the scenario scripts against a running testbed, and bad moves."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import pytest

from common.security import CONTROLLER
from tests.test_exactness import reference_sha
from tests.testbed import ROOT, Testbed, _env, kill_tree, mobility, read_summary, run_launch, write_config

pytestmark = pytest.mark.process  # whole-testbed runs: the slow tier (tests/conftest.py)

SAMPLES, BATCH = 200, 50          # 4 steps per round
STEPS = SAMPLES // BATCH
DEVICES = 3                       # device1 and device2 start on edge1, device3 on edge2
# One move, a move back, two moves of one device in one round, two devices at once.
MOVES = [
    {"device": "device1", "to": "edge2", "round": 1, "at": 0.5},
    {"device": "device1", "to": "edge1", "round": 2, "at": 0.25},
    {"device": "device1", "to": "edge2", "round": 2, "at": 0.75},
    {"device": "device3", "to": "edge1", "round": 2, "at": 0.25},
]


def _run(tmp_path, name, **kw):
    cfg = write_config(tmp_path / name, edges=2, devices=DEVICES, rounds=2, samples_per_device=SAMPLES,
                       batch_size=BATCH, **kw)
    status, out, summary = run_launch(cfg)
    assert status == 0, out
    assert summary["status"] == "finished"
    return summary


def _reference(tmp_path, **kw) -> str:
    """The final model of the same run without moves, trained in this process: each
    device's whole model, FedAvg in name order (a testbed run without moves ends with it,
    tests/test_exactness.py; every mode does with no move). No testbed run needed."""
    cfg = write_config(tmp_path / "reference", edges=2, devices=DEVICES, rounds=2, samples_per_device=SAMPLES,
                       batch_size=BATCH, **kw)
    return reference_sha(cfg, rounds=2)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """Final weights of the run without moves (modes fedfly and restart share it: with no
    move they run the same code)."""
    return _reference(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    """``moved(mode)``: (folder, summary) of the run with MOVES in that mode, made once
    for the tests that check it."""
    runs = {}

    def get(mode):
        if mode not in runs:
            tmp = tmp_path_factory.mktemp(f"moved-{mode}")
            runs[mode] = tmp / mode, _run(tmp, mode, mode=mode, moves=MOVES)
        return runs[mode]
    return get


def _check_migrations(summary, mode):
    migs = summary["migrations"]
    assert len(migs) == len(MOVES)
    got = sorted((m["device"], m["round"], m["to"], m["step"]) for m in migs)
    want = sorted((m["device"], m["round"], m["to"], math.floor(m["at"] * STEPS)) for m in MOVES)
    assert got == want
    for m in migs:
        assert m["mode"] == mode and m["pause_ms"] > 0 and m["transfer_ms"] >= 0
        assert set(m) >= {"device", "from", "to", "round", "step", "pause_ms", "state_bytes", "transfer_ms"}
        if mode == "fedfly":
            assert m["state_bytes"] > 1_000_000  # VGG-5's edge part at split 3, with momentum
        else:
            assert m["state_bytes"] == 0
    # each device's update counted once per round, through the edge it ended on
    for r in summary["rounds"]:
        assert r["samples"] == DEVICES * SAMPLES and r["missing"] == []
    assert summary["devices"]["device1"]["edges"] == ["edge2", "edge2"]
    assert summary["devices"]["device3"]["edges"] == ["edge2", "edge1"]


@pytest.mark.parametrize("mode", ["fedfly", "restart"])
def test_moves_leave_the_model_bit_identical(moved, baseline, mode):
    folder, summary = moved(mode)
    _check_migrations(summary, mode)
    assert summary["final_model_sha256"] == baseline
    if mode == "fedfly":  # mobility.offer: the source sent the session as the device left
        events = _edge_events(folder)
        offered = [line for line in events if '"migrated_in"' in line and '"offered": true' in line]
        assert len(offered) >= 2, "\n".join(line for line in events if "offer" in line)  # the first may find no kept link yet
        # every move was announced a step ahead, once the edge's gradient was in (its
        # session went while the device computed), and its edge heard it there
        import json
        announced = sorted((json.loads(line)["process"], e["round"], e["step"], e["to"])
                           for f in (folder / "runs").rglob("events-device*.jsonl")
                           for line in f.read_text().splitlines() if '"move_announced"' in line
                           for e in [json.loads(line)])
        assert announced == sorted((m["device"], m["round"], math.floor(m["at"] * STEPS), m["to"]) for m in MOVES)
        left = sorted((e["device"], e["round"], e["step"], e["to"])
                      for e in map(json.loads, events) if e["event"] == "left")
        assert left == announced


def test_preconnected_moves_leave_the_model_bit_identical(tmp_path, baseline):
    # make-before-break: the device opens its link to the next edge a step ahead
    summary = _run(tmp_path, "pre", moves=MOVES, extra={"mobility": {"preconnect": True}})
    _check_migrations(summary, "fedfly")
    assert summary["final_model_sha256"] == baseline
    events = (tmp_path / "pre" / "runs").rglob("events-device1.jsonl")
    moved = [line for f in events for line in f.read_text().splitlines() if '"moved"' in line]
    assert len(moved) == 3 and all('"preconnected": true' in line for line in moved)


def test_pulled_moves_leave_the_model_bit_identical(tmp_path, baseline):
    # mobility.offer = false: the destination pulls the session once the device attached
    # (the path of an unplanned move), not offered by the source as the device leaves
    summary = _run(tmp_path, "pull", moves=MOVES, extra={"mobility": {"offer": False}})
    _check_migrations(summary, "fedfly")
    assert summary["final_model_sha256"] == baseline
    events = _edge_events(tmp_path / "pull")
    assert not any('"offered": true' in line or '"event": "left"' in line for line in events)


def test_relayed_moves_leave_the_model_bit_identical(tmp_path, baseline):
    # mobility.handover = "relay": the session stays on the edge where the round began,
    # and the edge the device moved to forwards its steps there; nothing is copied
    summary = _run(tmp_path, "relay", moves=MOVES, extra={"mobility": {"handover": "relay"}})
    assert summary["final_model_sha256"] == baseline
    migs = summary["migrations"]
    got = sorted((m["device"], m["round"], m["to"], m["step"]) for m in migs)
    assert got == sorted((m["device"], m["round"], m["to"], math.floor(m["at"] * STEPS)) for m in MOVES)
    assert all(m["state_bytes"] == 0 and m["pause_ms"] > 0 for m in migs)
    # each move's record says what served it: relayed to the round's edge, or, back there, its own session
    assert {(m["device"], m["round"], m["to"]): m["how"] for m in migs} == {
        ("device1", 1, "edge2"): "relayed", ("device1", 2, "edge1"): "relayed", ("device1", 2, "edge2"): "here",
        ("device3", 2, "edge1"): "relayed"}
    for r in summary["rounds"]:
        assert r["samples"] == DEVICES * SAMPLES and r["missing"] == []
    events = _edge_events(tmp_path / "relay")
    assert any('"event": "relaying"' in line for line in events)
    assert not any('"event": "migrated_in"' in line for line in events)


def _edge_events(folder) -> list[str]:
    return [line for f in (folder / "runs").rglob("events-edge*.jsonl") for line in f.read_text().splitlines()]


def test_restart_costs_the_lost_steps(moved):
    """In mode restart the moving device redoes the steps before the move; in fedfly it
    does not (seen in the edges' event logs as the number of edge steps trained).
    device1's first move, round 1 at step 2 to edge2, of the restart run with MOVES."""
    folder, summary = moved("restart")
    (events,) = (folder / "runs").rglob("events-edge2.jsonl")
    import json
    done = [json.loads(l) for l in events.read_text().splitlines() if '"device_done"' in l]
    d1 = [e for e in done if e["device"] == "device1" and e["round"] == 1]
    assert d1 and d1[0]["edge_steps"] == STEPS  # restarted at 0 on edge2, trained every step there
    (first,) = [m for m in summary["migrations"] if m["device"] == "device1" and m["round"] == 1]
    assert (first["step"], first["to"]) == (2, "edge2")


def test_classic_moves_only_reconnect(tmp_path):
    moved = _run(tmp_path, "moved", mode="classic", moves=MOVES)
    _check_migrations(moved, "classic")
    assert moved["final_model_sha256"] == _reference(tmp_path, mode="classic")


@pytest.mark.parametrize("split,distribution,mode", [(1, "imbalanced", "fedfly"), (5, "imbalanced", "restart"),
                                                     (0, "balanced", "fedfly")])
def test_exact_for_other_splits_and_data(tmp_path, split, distribution, mode):
    moves = [{"device": "device2", "to": "edge2", "round": 1, "at": 0.6},
             {"device": "device3", "to": "edge1", "round": 2, "at": 0.5},
             {"device": "device2", "to": "edge1", "round": 2, "at": 0.3}]
    kw = dict(split_layer=split, distribution=distribution, mode=mode)
    moved = _run(tmp_path, "moved", moves=moves, **kw)
    assert len(moved["migrations"]) == 3
    assert moved["final_model_sha256"] == _reference(tmp_path, **kw)


def _wait_up(cfg, device: str, *, attached: bool = False) -> None:
    """Until ``device``'s control port answers (and, with ``attached``, an edge has taken it:
    only then is a move to the edge it is on refused as "already on")."""
    from central.mobility import status
    from common.config import load_config
    c = load_config(str(cfg))
    deadline = time.monotonic() + 120
    while True:
        try:
            reply = status(c, device, creds=c.credentials(CONTROLLER))
            if not attached or reply.link == "attached":
                return
        except Exception:
            pass
        assert time.monotonic() < deadline, f"{device} never came up" + (" and attached" if attached else "")
        time.sleep(0.2)


def test_controller_and_scenarios_against_a_running_testbed(tmp_path):
    """Live moves at whatever step they land on, a move before the first round, refused
    moves, and the scenario scripts; the run still ends bit-identical to the run without
    moves."""
    from central.mobility import move
    from common.config import load_config

    # Steps stretched (a sleep: it costs no CPU) so that the controller's calls land
    # mid-run; rounds enough that the six controller processes started after round 1 began
    # are done before the run ends even on a busy machine (they are done in round 2; the
    # refusals' are started before it begins: round 1 waits for device4).
    slow = {f"devices.device{i}": {"slowdown": 10.0} for i in range(1, 5)}
    rounds = 4
    cfg = write_config(tmp_path / "live", edges=2, devices=4, rounds=rounds, samples_per_device=200, batch_size=10,
                       extra=slow)
    c = load_config(str(cfg))
    bed = Testbed(cfg, log_dir=tmp_path / "logs")
    try:
        bed.start("central")
        bed.start("edge", "edge1")
        bed.start("edge", "edge2")
        for d in ("device1", "device2", "device3"):  # no round before device4 is up
            bed.start("device", d)
        # device1 is up and idle (no round has started): a move now applies at round 1 step 0
        _wait_up(cfg, "device1")
        ok = mobility(cfg, "move", "--device", "device1", "--to", "edge2")
        assert ok.returncode == 0, ok.stderr
        again = move(c, "device1", "edge2", creds=c.credentials(CONTROLLER))
        assert not again.accepted and "already pending" in again.reason
        for d in ("device2", "device3"):  # attached: a move to its own edge is refused only then
            _wait_up(cfg, d, attached=True)
        # refused moves change nothing and the run goes on (the controller's three at once)
        refused = {args: subprocess.Popen([sys.executable, "-m", "central.mobility", "move", "--config", str(cfg),
                                           "--device", args[0], "--to", args[1]], cwd=ROOT, env=_env(),
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for args in (("device9", "edge1"), ("device3", "edge9"), ("device3", "edge2"))}
        try:
            r = move(c, "device3", "edge7", creds=c.credentials(CONTROLLER))
            assert not r.accepted and "unknown edge" in r.reason
            r = move(c, "device3", "edge2", creds=c.credentials(CONTROLLER))
            assert not r.accepted and "already on edge2" in r.reason and r.edge == "edge2"
            outs = {}
            for args, p in refused.items():
                _, err = p.communicate(timeout=120)
                outs[args] = p.returncode, err
        finally:
            for p in refused.values():
                if p.poll() is None:
                    kill_tree(p)
        code, err = outs[("device9", "edge1")]
        assert code == 2 and "device9" in err
        code, err = outs[("device3", "edge9")]
        assert code == 2 and "edge9" in err  # a bad argument, caught before asking
        code, err = outs[("device3", "edge2")]
        assert code == 3 and "already on edge2" in err  # the device refuses
        bed.start("device", "device4")
        _wait_up(cfg, "device4")
        # a live move mid-round, and the scenario scripts
        r = mobility(cfg, "move", "--device", "device3", "--to", "edge1", "--when-round", "1",
                     "--when-fraction", "0.3", "--wait")
        assert r.returncode == 0 and "now on edge1" in r.stdout, r.stderr
        env = {**_env(), "PYTHON": sys.executable}
        sh = subprocess.run(["bash", "scripts/scenarios/move_half.sh", str(cfg), "device2", "edge2", "2"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert sh.returncode == 0, sh.stderr
        sh = subprocess.run(["bash", "scripts/scenarios/ping_pong.sh", str(cfg), "device4", "edge1", "edge2", "2"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert sh.returncode == 0, sh.stderr
        # the run without moves (slowdown does not change results), in this process while
        # the run's last rounds go on
        still = reference_sha(cfg, rounds=rounds)
        codes = bed.wait_all(timeout=300)
        assert codes == {n: 0 for n in codes}, {n: bed.log(n)[-2000:] for n, c in codes.items() if c}
    finally:
        bed.stop()
    summary = read_summary("results: " + str(next(p for p in (tmp_path / "live" / "runs").iterdir()
                                                   if not p.name.startswith("."))))  # not .device-state
    assert summary["status"] == "finished"
    migs = summary["migrations"]
    first = [m for m in migs if m["device"] == "device1"]
    assert first and (first[0]["round"], first[0]["step"], first[0]["to"]) == (1, 0, "edge2")
    assert {m["device"] for m in migs} == {"device1", "device2", "device3", "device4"}
    assert len([m for m in migs if m["device"] == "device4"]) == 2
    assert summary["final_model_sha256"] == still

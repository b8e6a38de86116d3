"""Unplanned mobility and silent peers, with real processes on loopback.

Every role is started one by one (``Testbed``), never by the launcher, whose own policy
would hide a fault. Faults come from outside the processes under test: a TCP proxy of our
own (``tests.faultproxy``) between a device and its edge that cuts or blackholes a
connection at an exact frame and byte; SIGSTOP and SIGKILL by PID; ``ss -K``; and the
controller's ``drop``. The test of a fault the run survives is the test of the whole
issue: **the final model is bit-identical to the run without the fault**.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.security import CONTROLLER
from tests.test_exactness import reference_sha
from tests.testbed import ROOT, Testbed, _env, free_ports, kill_tree, mobility, write_config

pytestmark = pytest.mark.process  # whole-testbed runs: the slow tier (tests/conftest.py)

SAMPLES, BATCH = 200, 25           # 8 steps a round: small, and every phase is reached
# A device's steps stretched (devices.slowdown) so that a fault lands where the test waits
# for it: WIDE where the window is 3 steps or more, NARROW where it is 2 steps or the test
# needs the run to go on a while after the fault. The stretch is a sleep: it costs the
# suite wall time in every slowed round, and nothing else, so a test whose checks need no
# later round slowed slows only its fault's (``rounds``: devices.NAME.slowdown_rounds).
WIDE, NARROW = 10, 30
FAULTS = {"heartbeat_s": 0.2, "dead_after_s": 1.0, "device_grace_s": 8.0, "central_grace_s": 30.0, "give_up_s": 60.0}
RUN_TIMEOUT = 180.0


def _config(tmp: Path, name: str, *, mode: str = "fedfly", faults: dict | None = None, moves=None, rounds: int = 2,
            samples: int = SAMPLES, batch: int = BATCH, devices: int = 2, drops=None, mobility: dict | None = None):
    return write_config(tmp / name, edges=2, devices=devices, rounds=rounds, samples_per_device=samples,
                        batch_size=batch, mode=mode, moves=moves, drops=drops,
                        extra={"faults": {**FAULTS, **(faults or {})}, "run": {"name": name},
                               **({"mobility": mobility} if mobility else {})})


def _slow(device: str, factor: int, rounds: tuple[int, ...] = ()) -> dict[str, list[str]]:
    """``device`` stretched ``factor`` times in ``rounds`` (empty: every round)."""
    return {device: [f"devices.{device}.slowdown={factor}", f"devices.{device}.slowdown_rounds={list(rounds)}"]}


def _summary(cfg: Path) -> dict:
    runs = cfg.parent / "runs"
    (run,) = [p for p in runs.iterdir() if (p / "summary.json").exists()]
    return json.loads((run / "summary.json").read_text())


class Proxy:
    """``tests.faultproxy`` in its own process, stopped by its PID."""

    def __init__(self, log_dir: Path, name: str, to_port: int, rules: list[str], extra: list[str] = ()) -> None:
        self.port = free_ports(1)[0]
        self.log = log_dir / f"proxy-{name}.log"
        log_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "tests.faultproxy", "--listen", str(self.port), "--to", f"127.0.0.1:{to_port}",
               "--lifetime", str(RUN_TIMEOUT + 60)]
        for r in rules:
            cmd += ["--rule", r]
        cmd += list(extra)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while '"listening"' not in self.log.read_text():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]

    def stop(self) -> None:
        if self.proc.poll() is None:
            kill_tree(self.proc)


def _run(cfg: Path, tmp: Path, *, proxies: dict[str, dict[str, list[str]]] | None = None, during=None,
         device_args: dict[str, list[str]] | None = None,
         proxy_args: list[str] = ()) -> tuple[dict, dict[str, Proxy], Testbed]:
    """Start central, edges, proxies (per device, per edge: rules; ``proxy_args`` to every
    proxy), devices, one by one; call ``during(bed)`` while it runs; wait for the
    central; stop everything by PID."""
    from common.config import load_config
    c = load_config(str(cfg))
    bed = Testbed(cfg, log_dir=tmp / "logs")
    started: dict[str, Proxy] = {}
    try:
        bed.start("central")
        for e in sorted(c.edges):
            bed.start("edge", e)
        for d in sorted(c.devices):
            extra = list((device_args or {}).get(d, []))
            for edge, rules in ((proxies or {}).get(d) or {}).items():
                px = Proxy(tmp / "logs", f"{d}-{edge}", c.edges[edge].port, rules, proxy_args)
                started[f"{d}-{edge}"] = px
                extra.append(f"edges.{edge}.port={px.port}")
            bed.start("device", d, *extra)
        if during is not None:
            during(bed)
        code = bed.wait("central", RUN_TIMEOUT)
        assert code == 0, bed.log("central")[-3000:]
    finally:
        bed.stop()
        for px in started.values():
            px.stop()
    return _summary(cfg), started, bed


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """The final model of the run without any fault, trained in this process: each
    device's whole model, FedAvg in name order, which a testbed run without faults ends
    with (tests/test_exactness.py, where a clean run with these deadlines also records no
    fault). fedfly and restart share it (with no move they run the same code), and so does
    the run with the move the move phase uses (moves change nothing: tests/test_mobility.py)."""
    return reference_sha(_config(tmp_path_factory.mktemp("baseline"), "base"), rounds=2)


@pytest.fixture(scope="module")
def one_round(tmp_path_factory):
    """The same for a run of one round: where the fault and its recovery are over within
    round 1, a second round (slowed, as the first) would prove nothing more."""
    return reference_sha(_config(tmp_path_factory.mktemp("one-round"), "base", rounds=1), rounds=1)


MOVE = [{"device": "device1", "to": "edge2", "round": 1, "at": 0.5}]
# Where a device's link breaks (rules of the proxy between the device and its first edge,
# "home", or the edge it moves to, "to": only device1 moves).
PHASES = {
    # the edge never sees step 2: the device sends it again and it is trained once
    "activations": {"home": ["up:Activations:3:50%:reset"]},
    # the edge trained step 2 and its gradient is lost: answered again from the kept reply
    "gradient": {"home": ["down:Gradients:3:50%:reset"]},
    # the round's update is cut on its way, and (another run) its acknowledgement
    "upload": {"home": ["up:DeviceDone:1:50%:reset"]},
    "upload-ack": {"home": ["down:DoneAck:1:0:reset"]},
    # a planned move to edge2: edge2 takes the session over, but its answer never reaches
    # the device, which comes back to edge1: the session must end up in one place
    "move": {"to": ["down:AttachReply:1:5:reset"]},
}
HOME = {"device1": "edge1", "device2": "edge2"}  # write_config's placement


# Every phase in mode fedfly; in mode restart the move (its own path) and one cut of the
# device's link: the other cuts take the same path in both modes (the device comes back
# to the edge that holds its session), and the suite's time is better spent elsewhere.
# A run cuts device1's link at its phases and device2's at theirs, in turn (each rule of a
# proxy fires once, at the N-th such frame of its life): they train on different edges,
# so one cut does not touch the other's link. The move has a run of its own: after its
# cut the device may end the round on either edge, and a later cut would miss.
CUTS = [({"device1": ("activations", "upload"), "device2": ("gradient", "upload-ack")}, "fedfly"),
        ({"device1": ("move",)}, "fedfly"), ({"device1": ("move",), "device2": ("activations",)}, "restart")]


def _cut_id(cut: dict, mode: str) -> str:
    return "+".join(p for phases in cut.values() for p in phases) + "-" + mode


@pytest.mark.parametrize("cut, mode", CUTS, ids=[_cut_id(c, m) for c, m in CUTS])
def test_a_cut_at_any_phase_loses_nothing(tmp_path, baseline, cut, mode):
    moves = MOVE if cut["device1"][0] == "move" else None
    name = _cut_id(cut, mode)
    cfg = _config(tmp_path, name, mode=mode, moves=moves)
    rules: dict[str, dict[str, list[str]]] = {}
    for d, phases in cut.items():
        for phase in phases:
            for where, r in PHASES[phase].items():
                rules.setdefault(d, {}).setdefault(HOME[d] if where == "home" else MOVE[0]["to"], []).extend(r)
    summary, proxies, bed = _run(cfg, tmp_path, proxies=rules)
    assert summary["status"] == "finished"
    assert all(r["missing"] == [] for r in summary["rounds"]), summary["rounds"]
    assert summary["final_model_sha256"] == baseline
    for d, phases in cut.items():
        (px,) = [p for k, p in proxies.items() if k.startswith(f"{d}-")]
        cuts = [e for e in px.events() if e["event"] == "cut"]
        assert len(cuts) == len(phases), (d, phases, px.events())  # each fault really happened
        lost = [f for f in summary["faults"] if f["process"] == d and f["kind"] in ("link_lost", "peer_silent")]
        assert len(lost) >= len(phases), (d, phases, summary["faults"])
        if "gradient" in phases and mode == "fedfly":
            events = (Path(cfg).parent / "runs" / name / f"events-{HOME[d]}.jsonl").read_text()
            assert '"step_replayed"' in events  # answered from the kept reply, not trained twice


def _wait_status(cfg: Path, device: str, pred, timeout: float = 90.0):
    got = {}
    _when(cfg, {device: (pred, lambda st: got.update(st=st))}, timeout)
    return got["st"]


def _when(cfg: Path, actions: dict, timeout: float = 90.0) -> None:
    """``actions``: device -> (predicate on its status, what to do then with the status);
    each is done as soon as its device is in the state wanted, in whichever order."""
    from central.mobility import status
    from common.config import load_config
    c = load_config(str(cfg))
    deadline = time.monotonic() + timeout
    pending = dict(actions)
    while pending:
        for device, (pred, act) in list(pending.items()):
            try:
                st = status(c, device, creds=c.credentials(CONTROLLER))
            except Exception:  # noqa: BLE001 - not up yet
                continue
            if pred(st):
                del pending[device]
                act(st)
        assert time.monotonic() < deadline or not pending, f"{sorted(pending)} never reached the state wanted"
        time.sleep(0.05)


def _mid_round(st) -> bool:
    return st.round == 1 and st.steps > 0 and 1 <= st.step < st.steps - 1


def test_ss_k_reset_of_a_device_link_loses_nothing(tmp_path, one_round):
    """What a Wi-Fi drop looks like to the kernel: the connection is reset under both ends."""
    if os.geteuid() != 0 or shutil.which("ss") is None:
        pytest.skip("ss -K needs root (CAP_NET_ADMIN) and iproute2's ss")
    cfg = _config(tmp_path, "ssk", faults={}, samples=SAMPLES, batch=BATCH, rounds=1)
    from common.config import load_config
    c = load_config(str(cfg))
    port = c.edges["edge1"].port

    def during(bed):
        # device1's steps are slowed so that the reset lands mid-round
        _wait_status(cfg, "device1", _mid_round)
        r = subprocess.run(["ss", "-K", "dst", "127.0.0.1", "dport", "=", str(port)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr

    summary, _, _ = _run(cfg, tmp_path, during=during, device_args=_slow("device1", WIDE))
    assert summary["final_model_sha256"] == one_round
    assert any(f["process"] in ("device1", "device2") and f["kind"] == "link_lost" for f in summary["faults"]), \
        summary["faults"]


def test_controller_drop_and_reappear_elsewhere_loses_nothing(tmp_path, baseline):
    """A radio loss longer than the deadline: the edge notices the silence, the device
    comes back on the other edge, which pulls its session."""
    cfg = _config(tmp_path, "drop")

    def during(bed):
        # the scenario script: half-way through round 1, 1.5 s without a link, back on edge2
        env = {**_env(), "PYTHON": sys.executable}
        r = subprocess.run(["bash", "scripts/scenarios/drop_reappear.sh", str(cfg), "device1", "1.5", "edge2", "1"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "attached again on edge2" in r.stdout and "link=attached" in r.stdout, r.stdout
        st = mobility(cfg, "status")
        assert "device1 edge=edge2" in st.stdout and "link=attached" in st.stdout, st.stdout

    # round 1 only: the drop, the re-attach and the status after it all fall in round 1
    # (half of it, 30x stretched, is still to come after the re-attach)
    summary, _, bed = _run(cfg, tmp_path, during=during, device_args=_slow("device1", NARROW, (1,)))
    assert summary["final_model_sha256"] == baseline
    silent = [f for f in summary["faults"] if f["kind"] == "peer_silent" and f["peer"] == "device1"]
    assert silent and silent[0]["process"] == "edge1"
    assert FAULTS["dead_after_s"] <= silent[0]["detected_s"] < FAULTS["dead_after_s"] + 3
    back = [f for f in summary["faults"] if f["process"] == "device1"]
    assert back and "edge2" in back[0]["detail"] and back[0]["down_s"] >= 1.5
    assert summary["devices"]["device1"]["edges"][0] == "edge2"


def test_a_drop_from_the_config_trace_reappears_where_the_trace_says_and_loses_nothing(tmp_path, baseline):
    """``[[mobility.drops]]``: the same radio loss as the controller's, from the testbed
    file (reproducible: the step it happens at is fixed)."""
    cfg = _config(tmp_path, "trace", drops=[{"device": "device1", "round": 1, "at": 0.5, "seconds": 1.5,
                                              "to": "edge2"}])
    summary, _, _ = _run(cfg, tmp_path)
    assert summary["final_model_sha256"] == baseline
    (back,) = [f for f in summary["faults"] if f["process"] == "device1"]
    assert "cut by the trace" in back["detail"] and "back on edge2 (pulled)" in back["detail"], back
    assert back["round"] == 1 and back["step"] == 4 and back["down_s"] >= 1.5
    assert summary["devices"]["device1"]["edges"][0] == "edge2"


def test_silent_device_is_dropped_from_the_round_and_the_run_ends(tmp_path):
    """SIGSTOP: a host that says nothing and closes nothing. Its edge notices within the
    deadline, the central drops it after its grace, and the run finishes without it."""
    cfg = _config(tmp_path, "silentdev", faults={"device_grace_s": 2.0}, rounds=2)

    def during(bed):
        _wait_status(cfg, "device2", _mid_round)
        os.kill(bed.procs["device2"].pid, signal.SIGSTOP)

    summary, _, _ = _run(cfg, tmp_path, during=during, device_args=_slow("device2", WIDE))
    assert summary["status"] == "finished"
    r1, r2 = summary["rounds"]
    assert r1["missing"] == ["device2"] and r1["dropped"][0]["samples"] == SAMPLES and r1["samples_lost"] == SAMPLES
    assert r2["missing"] == ["device2"] and r2["samples"] == SAMPLES
    silent = [f for f in summary["faults"] if f["kind"] == "peer_silent" and f["peer"] == "device2"]
    assert silent and FAULTS["dead_after_s"] <= silent[0]["detected_s"] < FAULTS["dead_after_s"] + 3
    dropped = [f for f in summary["faults"] if f["kind"] == "device_dropped" and f["peer"] == "device2"]
    assert dropped and dropped[0]["samples_lost"] == SAMPLES


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """``killed(mode)``: the summary of one run in that mode where, mid-round, edge2 is
    SIGKILLed while device2 trains on it, and device1's process on edge1 is SIGKILLed and
    started again with the same name; made once for the two tests that check it (the
    lost edge's and the restarted device's: edge1 takes both devices back at once)."""
    runs = {}

    def get(mode):
        if mode not in runs:
            tmp = tmp_path_factory.mktemp(f"killed-{mode}")
            cfg = _config(tmp, f"killed-{mode}", mode=mode)

            def during(bed):
                def restart_device1(_):
                    os.kill(bed.procs["device1"].pid, signal.SIGKILL)
                    bed.procs["device1"].wait()
                    bed.start("device", "device1")

                # each as soon as its device is mid-round (the two train side by side)
                _when(cfg, {"device2": (_mid_round, lambda _: os.kill(bed.procs["edge2"].pid, signal.SIGKILL)),
                            "device1": (_mid_round, restart_device1)})

            slow = {**_slow("device1", WIDE), **_slow("device2", WIDE)}
            runs[mode] = _run(cfg, tmp, during=during, device_args=slow)[0]
        return runs[mode]
    return get


@pytest.mark.parametrize("how, mode", [("sigstop", "fedfly"), ("sigkill", "fedfly"), ("sigkill", "restart")])
def test_lost_edge_does_not_stop_the_run_and_loses_nothing(tmp_path, baseline, killed, how, mode):
    """An edge that goes silent or dies mid-round: its device reconnects to the other edge
    and does its round again there from the round's weights; the run finishes, exactly.
    (The killed edge's runs are ``killed``'s, where device1 is restarted too.)"""
    if how == "sigkill":
        summary = killed(mode)
    else:
        cfg = _config(tmp_path, f"edge-{how}-{mode}", mode=mode)

        def during(bed):
            _wait_status(cfg, "device2", _mid_round)
            os.kill(bed.procs["edge2"].pid, signal.SIGSTOP)
            # once device2 is back on edge1, edge2 wakes up: the central takes it back
            _wait_status(cfg, "device2", lambda st: st.edge == "edge1" and st.link == "attached")
            os.kill(bed.procs["edge2"].pid, signal.SIGCONT)

        # NARROW: the run must go on after edge2 wakes until the central has it back; in
        # round 1 only: device2 does that round again on edge1, 30x stretched, after it
        summary, _, _ = _run(cfg, tmp_path, during=during, device_args=_slow("device2", NARROW, (1,)))
        assert any(f["kind"] == "edge_back" and f["peer"] == "edge2" for f in summary["faults"]), summary["faults"]
    assert summary["status"] == "finished"
    assert all(r["missing"] == [] for r in summary["rounds"]), summary["rounds"]
    assert summary["final_model_sha256"] == baseline
    central = [f for f in summary["faults"] if f["process"] == "central" and f["peer"] == "edge2"]
    assert central and central[0]["kind"] == ("peer_silent" if how == "sigstop" else "edge_lost")
    device = [f for f in summary["faults"] if f["process"] == "device2"]
    # fedfly: the session died with the edge; restart: the mode never moves one (the round again)
    assert device and device[0]["recovery"] == ("restart" if mode == "fedfly" else "fresh"), device
    assert "edge1" in device[0]["detail"] and summary["devices"]["device2"]["edges"] == ["edge1", "edge1"]


@pytest.mark.parametrize("mode", ["fedfly", "restart"])
def test_restarted_device_rejoins_its_round_exactly(baseline, killed, mode):
    """A device process killed mid-round and started again with the same name: its edge
    gives it the round again from the round's weights (within its grace): nothing lost.
    (``killed``'s run: edge2 dies at the same time, so edge1 takes device2 in as well.)"""
    summary = killed(mode)
    assert summary["status"] == "finished"
    assert all(r["missing"] == [] for r in summary["rounds"]), summary["rounds"]
    assert summary["final_model_sha256"] == baseline
    again = [f for f in summary["faults"] if f["kind"] == "restarted" and f["process"] == "device1"]
    assert again and again[0]["recovery"] == "restart" and again[0]["replayed"] >= 1, summary["faults"]


def test_a_lost_gradient_is_answered_by_the_edge_the_controller_sends_the_device_to(tmp_path, baseline):
    """faults.reconnect = "controller": after its link breaks the device waits for the
    controller's word; it is sent to edge2, which pulls the session from edge1 together
    with the reply to the step whose gradient was lost, and answers that step from it."""
    cfg = _config(tmp_path, "ctl", faults={"reconnect": "controller"})

    def during(bed):
        # in round 1 (a device reports "connecting" before its first attach)
        _wait_status(cfg, "device1", lambda st: st.link == "reconnecting" and st.round >= 1, timeout=120)
        r = mobility(cfg, "move", "--device", "device1", "--to", "edge2", "--wait", "--timeout", "60")
        assert r.returncode == 0 and "now on edge2" in r.stdout, r.stderr

    summary, proxies, _ = _run(cfg, tmp_path, during=during,
                               proxies={"device1": {"edge1": ["down:Gradients:3:50%:reset"]}})
    assert summary["final_model_sha256"] == baseline
    events = (Path(cfg).parent / "runs" / "ctl" / "events-edge2.jsonl").read_text()
    assert '"step_replayed"' in events and '"migrated_in"' in events
    (fault,) = [f for f in summary["faults"] if f["process"] == "device1"]
    assert "back on edge2 (pulled)" in fault["detail"] and fault["replayed"] == 0


@pytest.mark.parametrize("when, mode", [("mid-round", "fedfly"), ("between-rounds", "restart")])
def test_a_killed_central_resumed_from_its_checkpoint_loses_nothing(tmp_path, baseline, when, mode):
    """SIGKILL of the central, then ``python -m central --resume RUN_DIR``: the edges and
    devices wait for it (faults.central_grace_s), it goes on from the last completed round
    (the round cut short again, with its plan; updates its edges had delivered are sent
    again), and the final model is the run's without the crash."""
    name = f"central-{when}-{mode}"
    cfg = _config(tmp_path, name, mode=mode)
    run_dir = tmp_path / name / "runs" / name
    from common.config import load_config
    c = load_config(str(cfg))
    bed = Testbed(cfg, log_dir=tmp_path / "logs")
    try:
        bed.start("central")
        for e in sorted(c.edges):
            bed.start("edge", e)
        for d in sorted(c.devices):
            bed.start("device", d, *(_slow(d, WIDE)[d] if d == "device1" else []))
        if when == "mid-round":
            _wait_status(cfg, "device1", lambda st: st.round == 2 and 1 <= st.step < st.steps - 1)
        else:
            deadline = time.monotonic() + RUN_TIMEOUT
            ck = run_dir / "checkpoint.json"  # written at start (round 0) and after every round
            while not (ck.exists() and json.loads(ck.read_text())["round"] == 1):
                assert time.monotonic() < deadline and bed.procs["central"].poll() is None, bed.log("central")
                time.sleep(0.02)
        os.kill(bed.procs["central"].pid, signal.SIGKILL)
        bed.procs["central"].wait()
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "running"
        bed.start("central", "central-resumed", args=("--resume", str(run_dir)))
        code = bed.wait("central-resumed", RUN_TIMEOUT)
        assert code == 0, bed.log("central-resumed")[-3000:]
        bed.wait_all(60)
    finally:
        bed.stop()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and [r["round"] for r in summary["rounds"]] == [1, 2]
    assert summary["final_model_sha256"] == baseline
    (restart,) = [f for f in summary["faults"] if f["kind"] == "restarted" and f["process"] == "central"]
    assert restart["round"] == 2 and restart["samples_lost"] == 0
    assert (run_dir / "events-central.jsonl").exists() and (run_dir / "events-central.1.jsonl").exists()


def test_a_run_name_in_use_is_refused_and_a_finished_run_is_not_resumed(tmp_path):
    from tests.testbed import ROOT as root
    cfg = _config(tmp_path, "taken", rounds=1)
    run_dir = tmp_path / "taken" / "runs" / "taken"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"status": "finished", "mode": "fedfly"}))
    r = subprocess.run([sys.executable, "-m", "central", "--config", str(cfg)], cwd=root, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "run.name" in r.stderr and f"--resume {run_dir}" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "central.launch", "--config", str(cfg)], cwd=root, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "exists already" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "central", "--config", str(cfg), "--resume", str(run_dir)], cwd=root,
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "checkpoint.json" in r.stderr, r.stderr


@pytest.mark.parametrize("how", ["sigkill"])
def test_a_killed_edge_costs_only_the_steps_since_the_last_replica(tmp_path, one_round, how):
    """faults.checkpoint_steps = 2: every 2 steps each session is copied to the buddy edge
    and the device keeps its own state. The edge is killed mid-round: the device goes to
    the other edge (the buddy), which installs the copy; both go back to that step and
    train the steps since again. Nothing else is done again, and the result is exact."""
    cfg = _config(tmp_path, f"replica-{how}", faults={"checkpoint_steps": 2}, rounds=1)

    def during(bed):
        _wait_status(cfg, "device2", lambda st: st.round == 1 and 5 <= st.step < st.steps - 1)
        os.kill(bed.procs["edge2"].pid, signal.SIGKILL)

    summary, _, bed = _run(cfg, tmp_path, during=during, device_args=_slow("device2", NARROW))
    assert summary["status"] == "finished" and all(r["missing"] == [] for r in summary["rounds"])
    assert summary["final_model_sha256"] == one_round
    (edge,) = [f for f in summary["faults"] if f["process"] == "edge1" and f["recovery"] == "replica"]
    assert edge["peer"] == "edge2" and 0 <= edge["replayed"] <= 3, edge  # at most about K steps again
    (dev,) = [f for f in summary["faults"] if f["process"] == "device2"]
    assert dev["recovery"] == "replica" and dev["replayed"] == edge["replayed"], dev


def test_a_source_edge_dying_in_the_middle_of_a_handover_costs_only_the_steps_since_a_replica(tmp_path, one_round):
    """A planned move edge1 -> edge2 whose session is cut half-way both ways it can go
    (``mobility.offer``: the offer edge1 sends as the device leaves, then edge2's pull: each link resets, as
    when the source dies mid-transfer), then edge1 is killed: edge2 (edge1's buddy) goes
    on from its copy; the run finishes without edge1, exactly. (Links die of 3 s of silence
    here, not 1: the offer goes on edge1's kept link to edge2, and under a loaded suite a
    1 s silence once ended that link just before the move, so the session was pulled and
    never offered. The cuts and the kill are resets, which no deadline waits for.)"""
    cfg = _config(tmp_path, "src-dies", faults={"checkpoint_steps": 2, "dead_after_s": 3.0}, moves=MOVE, rounds=1,
                  mobility={"offer": True})
    from common.config import load_config
    c = load_config(str(cfg))
    bed = Testbed(cfg, log_dir=tmp_path / "logs")
    pull = Proxy(tmp_path / "logs", "edge2-edge1", c.edges["edge1"].port, ["down:SessionSnapshot:1:50%:reset"])
    offer = Proxy(tmp_path / "logs", "edge1-edge2", c.edges["edge2"].port, ["up:SessionOffer:1:50%:reset"])
    try:
        bed.start("central")
        bed.start("edge", "edge1", f"edges.edge2.port={offer.port}")  # edge1 reaches edge2 through a proxy
        bed.start("edge", "edge2", f"edges.edge1.port={pull.port}")  # and edge2 reaches edge1 through another
        for d in sorted(c.devices):
            bed.start("device", d, *(_slow(d, WIDE)[d] if d == "device1" else []))
        _wait_status(cfg, "device1", lambda st: st.edge == "edge2" and st.link == "attached", timeout=120)
        os.kill(bed.procs["edge1"].pid, signal.SIGKILL)
        code = bed.wait("central", RUN_TIMEOUT)
        assert code == 0, bed.log("central")[-3000:]
    finally:
        bed.stop()
        pull.stop()
        offer.stop()
    for proxy in (offer, pull):
        assert any(e.get("event") == "cut" for e in proxy.events()), proxy.log.read_text()
    summary = _summary(cfg)
    assert summary["status"] == "finished" and all(r["missing"] == [] for r in summary["rounds"])
    assert summary["final_model_sha256"] == one_round
    rec = [f for f in summary["faults"] if f["process"] == "edge2" and f["recovery"] == "replica"]
    assert rec and rec[0]["peer"] == "edge1" and rec[0]["replayed"] <= 2, summary["faults"]


def test_a_destination_edge_dying_after_a_handover_sends_the_device_back_to_the_copy_it_left(tmp_path, one_round):
    """The move edge1 -> edge2 completes; edge2 dies before its own first copy is made
    (checkpoint_steps = 3, the move at step 4): edge1 kept what it handed over, the device
    kept its state at the move, and the round goes on from there."""
    cfg = _config(tmp_path, "dst-dies", faults={"checkpoint_steps": 3}, moves=MOVE, rounds=1)

    def during(bed):
        _wait_status(cfg, "device1", lambda st: st.edge == "edge2" and st.round == 1 and st.step >= 5)
        os.kill(bed.procs["edge2"].pid, signal.SIGKILL)

    summary, _, _ = _run(cfg, tmp_path, during=during, device_args=_slow("device1", NARROW))
    assert summary["status"] == "finished" and all(r["missing"] == [] for r in summary["rounds"])
    assert summary["final_model_sha256"] == one_round
    rec = [f for f in summary["faults"] if f["process"] == "edge1" and f["recovery"] == "replica"]
    assert rec and rec[0]["peer"] == "edge2", summary["faults"]


def test_a_killed_device_started_again_goes_on_from_its_disk_checkpoint(tmp_path, one_round):
    """faults.checkpoint_steps = 2: the device writes its state to disk every 2 steps. Its
    process is killed mid-round and started again: it attaches at the step it saved, its
    edge goes back to the same step with the buddy's copy, and the round ends exactly."""
    cfg = _config(tmp_path, "dev-disk", faults={"checkpoint_steps": 2}, rounds=1)
    state = {}

    def during(bed):
        state["at"] = _wait_status(cfg, "device1", lambda st: st.round == 1 and 5 <= st.step < st.steps - 1).step
        os.kill(bed.procs["device1"].pid, signal.SIGKILL)
        bed.procs["device1"].wait()
        bed.start("device", "device1")  # at full speed: the fault is in, nothing waits for it now

    summary, _, bed = _run(cfg, tmp_path, during=during, device_args=_slow("device1", NARROW))
    assert summary["status"] == "finished" and all(r["missing"] == [] for r in summary["rounds"]), summary["rounds"]
    assert summary["final_model_sha256"] == one_round
    run = Path(cfg).parent / "runs" / "dev-disk"
    assert sorted(p.name for p in run.glob("events-device1*.jsonl")) == ["events-device1.1.jsonl",
                                                                        "events-device1.jsonl"]
    second_life = (run / "events-device1.1.jsonl").read_text().splitlines()
    resumed = [json.loads(x) for x in second_life if '"resumed_from_disk"' in x]
    assert resumed and resumed[0]["round"] == 1 and resumed[0]["step"] >= 4 and resumed[0]["resume_step"] >= 4, resumed
    assert not (Path(cfg).parent / "runs" / ".device-state" / "device1" / "state.json").exists()  # cleared at the end


def test_chaos_soak_ends_bit_identical(tmp_path, baseline):
    """``central.launch --chaos``: the launcher SIGKILLs a random role (central, edge or
    device) about every 3 s, 3 times, and starts each again (faults.on_death = restart;
    the central with --resume). With checkpoint_steps = 2 the run still ends with the
    model of the run without any kill."""
    cfg = _config(tmp_path, "chaos", faults={"checkpoint_steps": 2})
    cmd = [sys.executable, "-m", "central.launch", "--config", str(cfg), "--chaos", "3", "--chaos-max", "3",
           "--chaos-seed", "7", "--set", "devices.device1.slowdown=15", "--set", "devices.device2.slowdown=15"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT + 120)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert proc.returncode == 0, (out[-2000:], err[-3000:])
    kills = [line for line in err.splitlines() if "chaos: killing" in line]
    assert kills, err
    summary = _summary(cfg)
    assert summary["status"] == "finished" and summary["final_model_sha256"] == baseline, (kills, summary["faults"])


def test_a_relay_whose_holder_dies_falls_back_and_loses_nothing(tmp_path, one_round):
    """``mobility.handover = "relay"``: device1 moves to edge2 early in round 1; its session
    stays on edge1 and edge2 relays its steps there. edge1 is killed mid-relay: edge2 loses
    the relay's link and the device's link with it; the device attaches again, edge2 falls
    back to a pull, which finds no holder, and the round starts again on edge2 from its
    weights (no replicas in this run): exact, at the cost of the steps done."""
    cfg = _config(tmp_path, "relay-kill", moves=[{"device": "device1", "to": "edge2", "round": 1, "at": 0.25}],
                  mobility={"handover": "relay"}, rounds=1)

    def during(bed):
        _wait_status(cfg, "device1", lambda st: st.edge == "edge2" and st.round == 1 and 3 <= st.step < st.steps - 1,
                     timeout=240.0)
        os.kill(bed.procs["edge1"].pid, signal.SIGKILL)

    summary, _, _ = _run(cfg, tmp_path, during=during, device_args=_slow("device1", WIDE))
    assert summary["status"] == "finished"
    assert all(r["missing"] == [] for r in summary["rounds"]), summary["rounds"]
    assert summary["final_model_sha256"] == one_round
    failed = [f for f in summary["faults"] if f["kind"] == "handover_failed" and f["process"] == "edge2"]
    assert failed and failed[0]["recovery"] == "restart" and failed[0]["peer"] == "edge1", summary["faults"]

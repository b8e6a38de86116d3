"""The real processes on loopback: a whole run, a wrong key, a bad config."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from common import security
from common.security import CONTROLLER
from tests.testbed import ROOT, Testbed, _env, kill_tree, run_launch, run_dir_of, write_config

pytestmark = pytest.mark.process  # whole-testbed runs: the slow tier (tests/conftest.py)

ROUND_FIELDS = {"round", "seconds", "test_accuracy", "test_loss", "samples"}


def test_full_run_learns_and_writes_every_result(tmp_path):
    cfg = write_config(tmp_path, edges=2, devices=4, rounds=3, samples_per_device=300, batch_size=50)
    status, out, summary = run_launch(cfg)
    assert status == 0, out
    assert summary is not None, out
    assert summary["mode"] == "fedfly" and summary["status"] == "finished"
    assert len(summary["rounds"]) == 3
    for rec in summary["rounds"]:
        assert ROUND_FIELDS <= set(rec)
        assert 0.0 <= rec["test_accuracy"] <= 1.0
        assert rec["samples"] == 4 * 300
    accs = [r["test_accuracy"] for r in summary["rounds"]]
    assert accs[-1] > 0.2, accs  # chance is 0.1
    assert set(summary["devices"]) == {f"device{i}" for i in range(1, 5)}
    for dev in summary["devices"].values():
        assert dev["samples"] == 300 and len(dev["round_seconds"]) == 3
    assert summary["migrations"] == []
    assert len(summary["final_model_sha256"]) == 64
    assert summary["threads"] == 1
    run_dir = run_dir_of(out)
    from common.models import state_sha256
    from common.tensorfile import read_tensors
    weights, meta = read_tensors(str(run_dir / "final_model.safetensors"))
    assert state_sha256(weights) == summary["final_model_sha256"] == meta["sha256"]
    logs = {p.name for p in run_dir.glob("events-*.jsonl")}
    assert logs == {"events-central.jsonl", "events-edge1.jsonl", "events-edge2.jsonl"} | \
        {f"events-device{i}.jsonl" for i in range(1, 5)}
    first = json.loads((run_dir / "events-edge1.jsonl").read_text().splitlines()[0])
    assert {"ts", "process", "event", "cpu_percent", "rss_mb"} <= set(first)
    # the progress line and the final table
    assert "round 3/3" in out and "ETA" in out and "final model sha256" in out


def test_wrong_key_is_refused(tmp_path):
    """The edge starts first and dials the central until it answers, so that its refusal
    comes as the central starts listening, and the central's start-up deadline (the check
    that nobody valid joined) can be short."""
    from common.config import load_config
    cfg = write_config(tmp_path, edges=1, devices=1, rounds=1, extra={"run": {"startup_timeout": 3.0}})
    other = tmp_path / "other.key"
    other.write_text("ab" * 32)
    port = load_config(str(cfg)).edges["edge1"].port
    bed = Testbed(cfg, log_dir=tmp_path / "logs")
    try:
        edge = bed.start("edge", "edge1", f'security.key_file="{other}"', "run.startup_timeout=120")
        deadline = time.monotonic() + 120
        while True:  # the edge listens, then dials the central
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and edge.poll() is None, bed.log("edge1")
                time.sleep(0.1)
        bed.start("central")
        assert bed.wait("edge1", 60) == 1
        assert "could not prove" in bed.log("edge1") or "did not accept" in bed.log("edge1")
        assert bed.wait("central", 60) == 1  # nobody valid joined: start-up times out, run aborted
        events = next((tmp_path / "runs").glob("*/events-central.jsonl")).read_text()
        assert '"refused"' in events
        del edge
    finally:
        bed.stop()


def test_bad_config_names_the_key(tmp_path):
    cfg = write_config(tmp_path, edges=1, devices=1)
    status, out, _ = run_launch(cfg, "training.lrr=0.1", timeout=60)
    assert status == 2 and "training.lrr" in out
    r = subprocess.run([sys.executable, "-m", "device", "--config", str(cfg), "--name", "device1",
                        "--set", "devices.device1.edge=edge9"], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "devices.device1.edge" in r.stderr and "edge1" in r.stderr


def _children_when_up(proc, count: int, timeout: float = 120):
    import psutil
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = psutil.Process(proc.pid).children()
        if len(kids) >= count:
            return kids
        time.sleep(0.2)
    raise AssertionError("the launcher did not start its processes")


def _launch(cfg):
    return subprocess.Popen([sys.executable, "-m", "central.launch", "--config", str(cfg)], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_launcher_stops_everything_when_a_process_dies(tmp_path):
    import psutil
    cfg = write_config(tmp_path, edges=1, devices=2, rounds=50, samples_per_device=400, batch_size=20)
    proc = _launch(cfg)
    try:
        kids = _children_when_up(proc, 4)
        time.sleep(0.5)  # the launcher watches its roles from their start: a death at any time
        victim = next(k for k in kids if "device2" in " ".join(k.cmdline()))
        victim.kill()
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 1
        assert "device device2" in out and "died" in out
        gone, alive = psutil.wait_procs(kids, timeout=10)
        assert not alive
    finally:
        if proc.poll() is None:
            kill_tree(proc)


def test_launcher_stops_everything_on_ctrl_c(tmp_path):
    import psutil
    cfg = write_config(tmp_path, edges=1, devices=1, rounds=50, samples_per_device=400, batch_size=20)
    proc = _launch(cfg)
    try:
        kids = _children_when_up(proc, 3)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130 and "interrupted" in out
        gone, alive = psutil.wait_procs(kids, timeout=10)
        assert not alive
    finally:
        if proc.poll() is None:
            kill_tree(proc)


def test_garbage_and_strangers_lose_their_connection_not_the_run(tmp_path):
    """A peer with the key that sends garbage gets a typed error and is dropped; a peer
    without the key is refused; the edge and the run go on and finish."""
    from common import codec, transport
    from common import messages as m
    from common.config import load_config
    cfg = write_config(tmp_path, edges=1, devices=1, rounds=3, samples_per_device=400, batch_size=20)
    c = load_config(str(cfg))
    bed = Testbed(cfg, log_dir=tmp_path / "logs")
    try:
        bed.start_all(["edge1"], ["device1"])
        edge = c.edges["edge1"]
        conn = transport.connect(edge.host, edge.port, creds=c.credentials(CONTROLLER), peer="edge1", retry_for=60)
        conn.sock.sendall(codec.PREFIX.pack(b"FF", 1, 5, 0) + b"\xc1garb")
        reply = conn.recv(timeout=30)
        assert isinstance(reply, m.ErrorNotice) and reply.kind == "RemoteProtocolError"
        conn.close()
        try:
            transport.connect(edge.host, edge.port, creds=security.SharedKey(b"x" * 32), peer="edge1")
            raise AssertionError("a wrong key was accepted")
        except Exception as exc:
            assert type(exc).__name__ == "AuthenticationError"
        with socket.create_connection((edge.host, edge.port)) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 64)
            s.settimeout(30)
            try:
                assert s.recv(100) == b""  # dropped without a word...
            except ConnectionResetError:
                pass  # ...or with a reset, as it had unread bytes
        codes = bed.wait_all(timeout=300)
        assert codes == {"central": 0, "edge1": 0, "device1": 0}
    finally:
        bed.stop()
    events = next((tmp_path / "runs").glob("*/events-edge1.jsonl")).read_text()
    assert '"protocol_error"' in events and '"refused"' in events


def test_on_death_restart_brings_a_killed_edge_back_and_stop_names_it(tmp_path):
    """faults.on_death: "restart" starts a SIGKILLed edge again (the run finishes), "stop"
    tears the testbed down naming it. The launcher's log says which."""
    import signal as _signal

    import psutil
    for policy in ("restart", "stop"):
        # device1's steps stretched (a sleep) so that the run is still going when edge2 dies
        cfg = write_config(tmp_path / policy, edges=2, devices=2, rounds=2, samples_per_device=200, batch_size=25,
                           extra={"faults": {"on_death": policy, "heartbeat_s": 0.2, "dead_after_s": 1.0},
                                  "devices.device1": {"slowdown": 10}})
        proc = subprocess.Popen([sys.executable, "-m", "central.launch", "--config", str(cfg)], cwd=ROOT, env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            edge = None
            while edge is None:
                assert time.monotonic() < deadline and proc.poll() is None
                kids = psutil.Process(proc.pid).children()
                edge = next((k for k in kids if "edge2" in " ".join(k.cmdline())), None)
                if edge is None or not list((tmp_path / policy / "runs").glob("*/events-edge2.jsonl")):
                    edge = None
                    time.sleep(0.1)
            time.sleep(1.0)
            os.kill(edge.pid, _signal.SIGKILL)
            out, err = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                kill_tree(proc)
        if policy == "restart":
            assert proc.returncode == 0 and "started edge edge2 again" in err, err[-2000:]
        else:
            assert proc.returncode == 1 and "edge edge2" in err and "stopping the testbed" in err, err[-2000:]

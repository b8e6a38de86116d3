"""A run always ends well (issue 26, item 5), with the real processes on loopback: a
signal at any moment leaves a summary.json that says how the run ended; a controller
waiting on a run that ends first returns; a launcher on taken ports stops at once and
names the holder; a full disk under ``run.out`` is a clear error and damages nothing.
Every process is stopped by its PID whatever happens."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from central import checkpoint, runstatus
from tests.testbed import ROOT, Testbed, _env, kill_tree, run_dir_of, write_config

pytestmark = [pytest.mark.process, pytest.mark.timeout(600)]


def _launch(cfg: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "central.launch", "--config", str(cfg)]
    for o in overrides:
        cmd += ["--set", o]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(what, probe, timeout: float = 240.0, proc: subprocess.Popen | None = None):
    """Poll ``probe()`` until it returns something true (a bound, not a timed assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = probe()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended before {what}: {proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {timeout} s")


def _runs(tmp: Path) -> list[Path]:
    return sorted(p for p in (tmp / "runs").glob("*") if p.is_dir())


def _summary(run_dir: Path) -> dict | None:
    return runstatus.read(str(run_dir))


def _end(proc: subprocess.Popen, timeout: float = 120) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise AssertionError(f"pid {proc.pid} did not end within {timeout} s")
    return out


def test_settle_says_how_a_run_ended_only_where_nobody_did(tmp_path):
    d = tmp_path / "run"
    assert runstatus.settle(str(d), "stopped", "SIGTERM to the launcher", {"run_name": "run"})
    s = _summary(d)
    assert (s["status"], s["reason"], s["run_name"], s["rounds"]) == ("stopped", "SIGTERM to the launcher", "run", [])
    (d / "summary.json").write_text(json.dumps({"status": "running", "rounds": [{"round": 1}], "run_name": "run"}))
    assert runstatus.settle(str(d), "failed", "central died")
    assert _summary(d) == {"status": "failed", "reason": "central died", "rounds": [{"round": 1}], "run_name": "run"}
    assert not runstatus.settle(str(d), "stopped", "later")  # it says how it ended already
    assert _summary(d)["status"] == "failed" and not list(d.glob("*.tmp"))
    with pytest.raises(ValueError):
        runstatus.settle(str(d), "running", "")
    assert runstatus.exit_code("finished") == 0 and runstatus.exit_code("failed") == 1
    assert runstatus.exit_code("stopped", "SIGTERM") == 143 and runstatus.exit_code("stopped", "SIGINT") == 130


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_central_signalled_before_round_1_says_it_was_stopped(tmp_path, sig):
    """The central alone (no edge will come): summary.json exists from the start, and a
    signal while it waits for the testbed ends it "stopped", with the reason."""
    cfg = write_config(tmp_path, edges=1, devices=1, rounds=2)
    bed = Testbed(cfg, log_dir=tmp_path / "logs")
    try:
        proc = bed.start("central")
        run_dir = _wait_for("summary.json", lambda: next((d for d in _runs(tmp_path) if _summary(d)), None),
                            proc=proc)
        assert _summary(run_dir)["status"] == "running"
        proc.send_signal(sig)
        code = bed.wait("central", 120)
        s = _summary(run_dir)
        assert s["status"] == "stopped" and sig.name in s["reason"] and "after round 0" in s["reason"], s
        assert s["rounds"] == [] and code == 128 + sig, code
        assert "stopped" in bed.log("central")
    finally:
        bed.stop()


def test_a_launcher_stopped_at_once_and_mid_run_leaves_a_summary_that_says_so(tmp_path):
    """SIGTERM to the launcher as soon as it has started its roles (before any of them is
    up), and again in another run after round 1: both runs' summary.json say "stopped"
    with the reason, the second with its completed rounds; no process is left."""
    cfg = write_config(tmp_path, edges=1, devices=2, rounds=40, samples_per_device=200, batch_size=20)
    # at once: the roles are still importing (some before the central can write anything)
    proc = _launch(cfg, 'run.name="early"')
    try:
        _wait_for("the launcher's first line", lambda: proc.stdout.readline().startswith("launch:"))
        kids = psutil.Process(proc.pid).children()
        proc.send_signal(signal.SIGTERM)
        out = _end(proc)
        assert proc.returncode == 130, out
        s = _summary(tmp_path / "runs" / "early")
        assert s is not None and s["status"] == "stopped" and "SIGTERM" in s["reason"], (s, out)
        _, alive = psutil.wait_procs(kids, timeout=10)
        assert not alive
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    proc = _launch(cfg, 'run.name="later"')
    run_dir = tmp_path / "runs" / "later"
    try:
        _wait_for("round 1", lambda: (s := _summary(run_dir)) and len(s["rounds"]) >= 1, proc=proc)
        kids = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        out = _end(proc)
        assert proc.returncode == 130, out
        s = _summary(run_dir)
        assert s["status"] == "stopped" and "SIGTERM" in s["reason"], s
        done = len(s["rounds"])
        assert 1 <= done < 40 and f"after round {done} of 40" in s["reason"], s
        assert len(s["final_model_sha256"]) == 64
        ck = checkpoint.load(str(run_dir))  # what was written is whole and can be resumed
        assert ck.round in (done - 1, done)  # the summary of a round is written before its checkpoint
        _, alive = psutil.wait_procs(kids, timeout=10)
        assert not alive
    finally:
        if proc.poll() is None:
            kill_tree(proc)


def test_a_launcher_whose_ports_are_taken_stops_at_once_naming_the_holder(tmp_path):
    cfg = write_config(tmp_path, edges=1, devices=1, rounds=1)
    from common.config import load_config
    c = load_config(str(cfg))
    holder = socket.create_server((c.edges["edge1"].host, c.edges["edge1"].port))
    try:
        proc = _launch(cfg)
        try:
            out = _end(proc, timeout=60)
        finally:
            if proc.poll() is None:
                kill_tree(proc)
        assert proc.returncode == 1, out
        assert f"edge edge1 cannot listen on {c.edges['edge1'].host}:{c.edges['edge1'].port}" in out, out
        assert f"pid {os.getpid()}" in out, out
        assert "central cannot" not in out and not _runs(tmp_path)  # nothing else started, no run folder
    finally:
        holder.close()


def test_a_controller_waiting_on_a_run_that_ends_returns_and_says_so(tmp_path):
    """``move --when-round 9`` (the run has 1 round) and the scenario script on the same
    move: both return once the run is over, status 4, with the reason."""
    cfg = write_config(tmp_path, edges=2, devices=2, rounds=1, samples_per_device=100)
    proc = _launch(cfg)
    ctl = script = None
    try:
        cmd = [sys.executable, "-m", "central.mobility", "move", "--config", str(cfg), "--device", "device1",
               "--to", "edge2", "--wait", "--when-round", "9", "--timeout", "600"]
        ctl = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        script = subprocess.Popen(["bash", "scripts/scenarios/move_half.sh", str(cfg), "device2", "edge1", "9"],
                                  cwd=ROOT, env={**_env(), "PYTHON": sys.executable}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        out = _end(proc, timeout=300)
        assert proc.returncode == 0, out
        c_out, c_err = ctl.communicate(timeout=120)
        s_out, s_err = script.communicate(timeout=120)
        assert ctl.returncode == 4 and "the run has ended" in c_err, (ctl.returncode, c_out, c_err)
        assert script.returncode == 4 and "the run has ended" in s_err and "move_half.sh: stopped" in s_err, s_err
    finally:
        for p in (proc, ctl, script):
            if p is not None and p.poll() is None:
                kill_tree(p)


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 16 MiB under the test's folder (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where = tmp_path / "disk"
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_under_run_out_is_a_clear_error_and_damages_nothing(tmp_path, small_disk):
    """The run folder on a small tmpfs, filled up after round 1: the run ends (no hang),
    the central says the results cannot be written and why, and the summary.json and
    checkpoint written before are whole and readable."""
    cfg = write_config(tmp_path, edges=1, devices=2, rounds=30, samples_per_device=200, batch_size=20)
    proc = _launch(cfg, f'run.out="{small_disk}"', 'run.name="full"')
    run_dir = small_disk / "full"
    try:
        _wait_for("round 1", lambda: (s := _summary(run_dir)) and len(s["rounds"]) >= 1, proc=proc)
        with open(small_disk / "filler", "wb") as f:  # every byte left
            try:
                while True:
                    f.write(b"\0" * (1 << 16))
                    f.flush()
            except OSError:
                pass
        out = _end(proc, timeout=400)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert proc.returncode != 0, out
    assert "No space left on device" in out and "the results cannot be written" in out, out
    s = json.loads((run_dir / "summary.json").read_text())  # whole: it parses
    assert s["rounds"] and s["rounds"][0]["round"] == 1 and len(s["rounds"]) < 30  # it stopped, at once
    ck = checkpoint.load(str(run_dir))  # whole: the hash matches
    assert ck.round >= 1
    assert not list(run_dir.glob("*.tmp"))
    assert run_dir_of(out) is not None

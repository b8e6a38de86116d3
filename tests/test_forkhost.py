"""``run.device_host = "on"`` (or ``central.launch --device-host``): every device forked from
one host process that imported torch once (common/forkhost.py) is still a device of its own,
trains the same bits, and its death is seen and reported as a started device's (and it is
forked again)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from common.config import load_config
from tests.testbed import ROOT, _env, kill_tree, read_summary, write_config

pytestmark = [pytest.mark.process]


def _hosted(cfg, until) -> tuple[subprocess.Popen, psutil.Process | None, dict[int, tuple[str, set[int]]]]:
    """Start the launcher (no option: the config's key decides); until ``until(forked)`` is true
    (or the launcher ends), note each forked child: pid -> (its process name, the ports it
    listens on)."""
    launcher = subprocess.Popen([sys.executable, "-m", "central.launch", "--config", str(cfg)],
                                cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    host, forked = None, {}
    deadline = time.monotonic() + 60
    while launcher.poll() is None and time.monotonic() < deadline and not until(forked):
        try:
            kids = psutil.Process(launcher.pid).children()
            host = host or next((k for k in kids if "common.forkhost" in k.cmdline()), None)
            for child in host.children() if host else []:
                ports = {c.laddr.port for c in child.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
                if ports:
                    forked[child.pid] = (child.name(), ports)
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.1)
    return launcher, host, forked


def test_forked_devices_are_processes_of_their_own_train_the_same_bits_and_their_death_is_seen(tmp_path):
    """One round, a device moving between the edges, faults.on_death = "restart", and the
    host asked for by the config alone (run.device_host; the option is the same switch,
    tests/test_device_host.py): each device is a child of the host with its own PID, name
    and control port; device2, killed as soon as it listens, is reported dead (PID and
    status) and forked again; the final model is the in-process reference's, which is the
    same run's without the host (tests/test_exactness.py)."""
    from tests.test_exactness import reference_sha
    cfg_path = write_config(tmp_path, edges=2, devices=4, rounds=1, samples_per_device=16, batch_size=4,
                            moves=[{"device": "device1", "to": "edge2", "round": 1, "at": 0.5}],
                            extra={"data": {"image_size": 8, "test_samples": 50},
                                   "faults": {"on_death": "restart"}, "run": {"device_host": "on"},
                                   # device2's steps stretched: the round cannot end before it dies
                                   "devices.device2": {"slowdown": 100}})
    cfg = load_config(str(cfg_path))
    killed: list[int] = []

    def kill_device2_then_see_all(f) -> bool:
        # device2 dies the moment it is seen listening: before the round ends, which it
        # holds back (its slowdown); killed once the others were up, it had at times
        # finished the one short round already
        if not killed:
            pid = next((pid for pid, (name, _) in f.items() if name == "device2"), None)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        return bool(killed) and len({name for name, _ in f.values()}) == 4

    launcher, host, seen = _hosted(cfg_path, kill_device2_then_see_all)
    try:
        out, _ = launcher.communicate(timeout=120)
    finally:
        kill_tree(launcher)
    victim = killed[0] if killed else None
    # the first child seen of each name (device2 forked again may have been seen too)
    first = {}
    for pid, (name, ports) in seen.items():
        first.setdefault(name, (pid, ports))
    forked = {pid: (name, ports) for name, (pid, ports) in first.items()}
    assert launcher.returncode == 0, out
    assert 'launch: the devices forked from one host (run.device_host = "on"' in out
    assert f"device device2 (pid {victim}) died with status -9" in out
    assert "started device device2 again" in out
    assert host is not None and host.pid not in forked
    assert len(set(forked)) == 4
    assert sorted(forked.values()) == sorted((d, {cfg.devices[d].control_port}) for d in cfg.device_names)
    summary = read_summary(out)
    assert [(mv["device"], mv["to"]) for mv in summary["migrations"]] == [("device1", "edge2")]
    assert summary["final_model_sha256"] == reference_sha(cfg_path, rounds=1)
    # the host and every device it forked are gone with the launcher
    assert not psutil.pid_exists(host.pid)
    assert all(not psutil.pid_exists(pid) for pid in forked)

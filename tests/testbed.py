"""Helpers for tests that run the real processes on loopback.

Every process a test starts is tracked by PID and stopped by the test (``Testbed.stop``
or ``run_launch``'s own clean-up), whatever happens.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from scripts.benchlib import free_ports, render_toml  # one copy of the testbed-file helpers

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"


def write_config(tmp: Path, *, edges: int = 2, devices: int = 4, rounds: int = 2, mode: str = "fedfly",
                 moves: list[dict] | None = None, samples_per_device: int = 200, batch_size: int = 50,
                 split_layer: int = 3, distribution: str = "balanced", seed: int = 1, threads: int = 1,
                 host: str = LOOPBACK, extra: dict[str, dict[str, Any]] | None = None,
                 device_edges: dict[str, str] | None = None, name: str = "testbed.toml",
                 drops: list[dict] | None = None) -> Path:
    """A testbed file with free loopback ports and its own key."""
    tmp.mkdir(parents=True, exist_ok=True)
    key = tmp / "test.key"
    if not key.exists():
        key.write_text(secrets.token_hex(32))
    ports = free_ports(1 + edges + devices)
    edge_names = [f"edge{i + 1}" for i in range(edges)]
    dev_names = [f"device{i + 1}" for i in range(devices)]
    sections: dict[str, dict[str, Any]] = {
        "run": {"mode": mode, "seed": seed, "out": str(tmp / "runs"), "round_timeout": 300.0, "startup_timeout": 120.0},
        "security": {"key_file": str(key)},
        "central": {"host": host, "port": ports[0]},
        "model": {"name": "vgg5", "split_layer": split_layer},
        "data": {"dataset": "synthetic", "distribution": distribution, "samples_per_device": samples_per_device,
                 "test_samples": 500, "alpha": 0.5},
        "training": {"rounds": rounds, "batch_size": batch_size, "lr": 0.01, "momentum": 0.9, "local_epochs": 1,
                     "threads": threads},
    }
    for i, e in enumerate(edge_names):
        sections[f"edges.{e}"] = {"host": host, "port": ports[1 + i]}
    for i, d in enumerate(dev_names):
        first = (device_edges or {}).get(d, edge_names[i * edges // devices])
        sections[f"devices.{d}"] = {"edge": first, "host": host, "control_port": ports[1 + edges + i]}
    for sec, vals in (extra or {}).items():
        sections.setdefault(sec, {}).update(vals)
    path = tmp / name
    path.write_text(render_toml(sections, moves, drops))
    return path


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("FEDFLY_SET", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def kill_tree(proc: subprocess.Popen) -> None:
    """Stop ``proc`` and every process below it, by PID."""
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    for p in [proc, *kids]:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()
    psutil.wait_procs(kids, timeout=5)


def run_launch(config: Path, *overrides: str, timeout: float = 300) -> tuple[int, str, dict | None]:
    """Run the whole testbed through ``central.launch``; (status, output, summary or None)."""
    cmd = [sys.executable, "-m", "central.launch", "--config", str(config)]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out = proc.stdout.read() if proc.stdout else ""
        raise AssertionError(f"testbed did not finish within {timeout} s:\n{out}")
    return proc.returncode, out, read_summary(out)


def run_dir_of(output: str) -> Path | None:
    for line in output.splitlines():
        if line.startswith("results: "):
            return ROOT / line.split(": ", 1)[1].strip()
    return None


def read_summary(output: str) -> dict | None:
    d = run_dir_of(output)
    if d is None or not (d / "summary.json").exists():
        return None
    return json.loads((d / "summary.json").read_text())


class Testbed:
    """Start roles one by one (for tests that talk to a running testbed); ``stop`` kills
    every one of them by PID."""

    __test__ = False

    def __init__(self, config: Path, *overrides: str, log_dir: Path) -> None:
        self.config = config
        self.overrides = list(overrides)
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, role: str, name: str = "central", *extra: str, args: tuple[str, ...] = ()) -> subprocess.Popen:
        """Start ``role`` (``name``: its config name; for the central, only the name of its
        log and entry here). ``extra``: overrides; ``args``: more arguments."""
        cmd = [sys.executable, "-m", role, "--config", str(self.config), *args]
        if role != "central":
            cmd += ["--name", name]
        for o in self.overrides + list(extra):
            cmd += ["--set", o]
        log = open(self.log_dir / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs[name] = proc
        return proc

    def start_all(self, edges: list[str], devices: list[str]) -> None:
        self.start("central")
        for e in edges:
            self.start("edge", e)
        for d in devices:
            self.start("device", d)

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def wait(self, name: str, timeout: float) -> int:
        try:
            return self.procs[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} did not exit within {timeout} s:\n{self.log(name)[-3000:]}")

    def wait_all(self, timeout: float) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        return {n: self.wait(n, max(1.0, deadline - time.monotonic())) for n in self.procs}

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                kill_tree(proc)


def mobility(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "central.mobility", *args, "--config", str(config)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=timeout)

"""What the benchmarks share: testbed files on free loopback ports, running the launcher
with a bounded time, reading ``summary.json``, statistics and plain-text tables.

Every benchmark module (``scripts/bench_*.py``) has ``describe(scale)`` (its configuration,
printed first), ``run(out, scale)`` (returns a JSON-able result with ``config`` and
``figures``) and ``report(result)`` (the figures as text, printed last). ``scale`` is
``"quick"`` (minutes), ``"full"`` (the paper's scale) or ``"tiny"`` (seconds, smoke tests).
Timing measurements go through ``quietly``/``launch_timed``, which notice and re-measure
what other processes on the machine disturbed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil

from common.atomic import write_json_atomic
from scripts.smaps import rollup

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
# Where ``python -m scripts.bench`` puts its results unless told otherwise (gitignored).
DEFAULT_OUT = ROOT / "bench-results"
# The CIFAR-10 JPEG archive shipped beside the repository (never copied into it).
CIFAR_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


# -- testbed files -----------------------------------------------------------------------

def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that were free a moment ago (all bound at once, so
    no two are the same)."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind((LOOPBACK, 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {v!r}")


def render_toml(sections: dict[str, dict[str, Any]], moves: list[dict] | None = None,
                drops: list[dict] | None = None) -> str:
    """A testbed file's text: one table per section, then one [[mobility.moves]] per move
    and one [[mobility.drops]] per drop."""
    lines: list[str] = []
    for sec, vals in sections.items():
        lines.append(f"[{sec}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in vals.items()]
        lines.append("")
    for kind, items in (("moves", moves), ("drops", drops)):
        for item in items or []:
            lines.append(f"[[mobility.{kind}]]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in item.items()]
            lines.append("")
    return "\n".join(lines)


def device_names(n: int) -> list[str]:
    # Zero-padded so that sorted order (FedAvg's and the shards') is numeric order.
    width = len(str(n))
    return [f"device{i + 1:0{width}d}" for i in range(n)]


def edge_names(n: int) -> list[str]:
    return [f"edge{i + 1}" for i in range(n)]


def write_config(folder: Path, name: str, *, edges: int = 2, devices: int = 1, rounds: int = 2,
                 mode: str = "fedfly", moves: list[dict] | None = None, samples_per_device: int = 1000,
                 batch_size: int = 100, split_layer: int = 3, distribution: str = "balanced",
                 dataset: str = "synthetic", data_root: str = "", test_samples: int = 1000,
                 seed: int = 1, threads: int = 1, alpha: float = 0.5, lr: float = 0.01,
                 device_edges: dict[str, str] | None = None, run_timeout: float = 1800.0,
                 drops: list[dict] | None = None, extra: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write ``folder/<name>.toml``: a testbed on free loopback ports, with its own key file
    in ``folder`` and results under ``folder/runs``. Devices start on the edges in turn
    (``device_edges`` overrides); ``moves`` are ``[[mobility.moves]]`` tables."""
    folder.mkdir(parents=True, exist_ok=True)
    key = folder / "bench.key"
    if not key.exists():
        key.write_text(secrets.token_hex(32))
        key.chmod(0o600)
    ports = free_ports(1 + edges + devices)
    edges_ = edge_names(edges)
    devices_ = device_names(devices)
    data: dict[str, Any] = {"dataset": dataset, "distribution": distribution, "alpha": alpha,
                            "samples_per_device": samples_per_device, "test_samples": test_samples}
    if data_root:
        data["root"] = data_root
    sections: dict[str, dict[str, Any]] = {
        # every process started, as the figures were measured, unless a benchmark asks for a
        # host (bench_scale's fleet: --device-host)
        "run": {"mode": mode, "seed": seed, "out": str(folder / "runs"), "name": name,
                "round_timeout": run_timeout, "startup_timeout": 300.0, "device_host": "off", "edge_host": "off"},
        "security": {"key_file": str(key)},
        "central": {"host": LOOPBACK, "port": ports[0]},
        "model": {"name": "vgg5", "split_layer": split_layer},
        "data": data,
        "training": {"rounds": rounds, "batch_size": batch_size, "lr": lr, "momentum": 0.9,
                     "local_epochs": 1, "threads": threads},
    }
    for i, e in enumerate(edges_):
        sections[f"edges.{e}"] = {"host": LOOPBACK, "port": ports[1 + i]}
    for i, d in enumerate(devices_):
        first = (device_edges or {}).get(d, edges_[i % edges])
        sections[f"devices.{d}"] = {"edge": first, "host": LOOPBACK, "control_port": ports[1 + edges + i]}
    for sec, vals in (extra or {}).items():
        sections.setdefault(sec, {}).update(vals)
    path = folder / f"{name}.toml"
    path.write_text(render_toml(sections, moves, drops))
    return path


def ping_pong_moves(device: str, edges: tuple[str, str], first_edge: str,
                    plan: list[tuple[int, float]]) -> list[dict]:
    """Moves of ``device`` at ``(round, at)`` points, each to the edge it is not on."""
    here, moves = first_edge, []
    for rnd, at in sorted(plan):
        to = edges[1] if here == edges[0] else edges[0]
        moves.append({"device": device, "to": to, "round": rnd, "at": at})
        here = to
    return moves


# -- running the launcher ----------------------------------------------------------------

# -- other load on the machine -----------------------------------------------------------

# A run during which other processes used more than this share of the machine's CPU time
# is "disturbed": its timings say more about the neighbours than about the testbed.
MAX_FOREIGN_SHARE = 0.15
QUIET_RETRIES = 2          # re-runs of a disturbed timing run
QUIET_WAIT_S = 90.0        # before a re-run, wait up to this long for the machine to calm down
# Seconds that waiting and re-running may add to one process's benchmarks, in all: on a
# machine that is never quiet the suite still ends in bounded time (and says so).
RETRY_BUDGET_S = 900.0
_retry_spent = [0.0]


def _busy_seconds() -> float:
    t = psutil.cpu_times()
    # guest time is already inside user time on Linux; steal is time the hypervisor gave away
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


def _own_seconds() -> float:
    # Children count once reaped: the launcher reaps every role, we reap the launcher.
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class ForeignLoad:
    """``with ForeignLoad() as fl: ...`` then ``fl.share``: the CPU time that processes other
    than this one and its (reaped) children used meanwhile, as a share of all CPUs' time."""

    def __enter__(self) -> "ForeignLoad":
        self._t0, self._busy0, self._own0 = time.monotonic(), _busy_seconds(), _own_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = max(1e-9, time.monotonic() - self._t0)
        foreign = (_busy_seconds() - self._busy0) - (_own_seconds() - self._own0)
        self.share = max(0.0, foreign / (wall * (os.cpu_count() or 1)))


def wait_quiet(limit_s: float) -> float:
    """Wait (at most ``limit_s``) until the 1-minute load average is below half the CPUs;
    returns the load average when done."""
    cpus = os.cpu_count() or 1
    deadline = time.monotonic() + limit_s
    load = os.getloadavg()[0]
    while load > cpus / 2 and time.monotonic() < deadline:
        time.sleep(5)
        load = os.getloadavg()[0]
    return load


def quietly(measure: Callable[[int], Any], *, what: str, retries: int = QUIET_RETRIES,
            max_share: float = MAX_FOREIGN_SHARE) -> tuple[Any, list[float]]:
    """Run ``measure(attempt)`` (a timing measurement) under ``ForeignLoad``; while other
    processes took more than ``max_share`` of the machine, wait for quiet and run it again
    (at most ``retries`` more times, within ``RETRY_BUDGET_S`` for the whole process).
    Returns (the least disturbed result, every attempt's foreign share)."""
    attempts: list[tuple[float, Any]] = []
    for attempt in range(retries + 1):
        if attempt:
            if _retry_spent[0] >= RETRY_BUDGET_S:
                print(f"   {what}: other processes took {attempts[-1][0]:.0%} of the CPUs; the re-run budget "
                      f"({RETRY_BUDGET_S:.0f} s) is spent, keeping this measurement", flush=True)
                break
            print(f"   {what}: other processes took {attempts[-1][0]:.0%} of the CPUs; waiting for quiet "
                  f"and measuring again ({attempt}/{retries})", flush=True)
            t_retry = time.monotonic()
            wait_quiet(QUIET_WAIT_S)
        with ForeignLoad() as fl:
            result = measure(attempt)
        if attempt:
            _retry_spent[0] += time.monotonic() - t_retry
        attempts.append((fl.share, result))
        if fl.share <= max_share:
            break
    best = min(attempts, key=lambda a: a[0])
    return best[1], [round(a[0], 3) for a in attempts]


@dataclass
class RunOutcome:
    status: int
    seconds: float
    run_dir: Path | None
    summary: dict | None
    output_path: Path
    foreign_share: float = 0.0
    attempts: list[float] = field(default_factory=list)  # foreign share of each attempt (launch_timed)

    @property
    def ok(self) -> bool:
        return self.status == 0 and self.summary is not None and self.summary.get("status") == "finished"


def _env(root: Path = ROOT) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("FEDFLY_SET", None)  # a stray override would silently change a benchmark
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it, by PID."""
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    for target in [pid, *(k.pid for k in kids)]:
        try:
            os.kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    psutil.wait_procs(kids, timeout=5)


def launch(config: Path, *overrides: str, timeout: float, echo: bool = False,
           sample_memory: bool = False, code: Path | None = None, args: tuple[str, ...] = ()) -> RunOutcome:
    """Run the whole testbed of ``config`` through ``central.launch`` (with the launcher
    options ``args``); its output goes to ``<config>.out``. Kills the launcher's process
    tree after ``timeout`` seconds (status 124). With ``sample_memory`` the result's
    summary gets ``bench_memory`` (peak summed RSS, PSS and USS of the testbed's processes,
    sampled every second, PSS by role at its peak, and the machine's used memory before
    and at its peak: ``_sample_memory``). ``foreign_share`` says how
    much of the machine other processes used meanwhile (``ForeignLoad``). ``code``: run
    the testbed from another checkout of the project (a baseline), not this one."""
    root = ROOT if code is None else Path(code).resolve()
    cmd = [sys.executable, "-m", "central.launch", "--config", str(config), *args]
    for o in overrides:
        cmd += ["--set", o]
    out_path = config.with_suffix(".out")
    t0 = time.monotonic()
    peak = {"rss_mb": 0.0, "uss_mb": 0.0, "pss_mb": 0.0, "processes": 0, "pss_by_role_mb": {},
            "machine_used_before_mb": _machine_used_mb(), "machine_used_mb": 0.0}
    with ForeignLoad() as foreign, open(out_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=_env(root), stdout=out, stderr=subprocess.STDOUT, text=True)
        status = None
        while status is None:
            try:
                status = proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                if time.monotonic() - t0 > timeout:
                    kill_tree(proc.pid)
                    proc.wait()
                    status = 124
                    out.write(f"\nbench: killed the testbed after {timeout:.0f} s\n")
                elif sample_memory:
                    _sample_memory(proc.pid, peak)
    seconds = time.monotonic() - t0
    text = out_path.read_text(errors="replace")
    if echo:
        print(text)
    run_dir = None
    for line in text.splitlines():
        if line.startswith("results: "):
            run_dir = (root / line.split(": ", 1)[1].strip()).resolve()
    summary = None
    if run_dir is not None and (run_dir / "summary.json").exists():
        summary = json.loads((run_dir / "summary.json").read_text())
        if sample_memory:
            summary["bench_memory"] = peak
    return RunOutcome(status, seconds, run_dir, summary, out_path, foreign.share)


def _machine_used_mb() -> float:
    vm = psutil.virtual_memory()
    return (vm.total - vm.available) / 2**20


def _role(p: psutil.Process) -> str:
    """central, edge, device, host (a fork host) or launcher, from the command line; a
    forked child has its host's, and its parent is the host."""
    cmd = p.cmdline()
    if "common.forkhost" in cmd:
        parent = p.parent()
        return cmd[cmd.index("--role") + 1] if parent and "common.forkhost" in parent.cmdline() else "host"
    for role in ("central.launch", "central", "edge", "device"):
        if role in cmd:
            return "launcher" if role == "central.launch" else role
    return "other"


def _sample_memory(pid: int, peak: dict) -> None:
    """Sum RSS, PSS and USS (private) over the testbed's processes (the launcher and all
    below it); keep each one's peak, PSS by role at PSS's peak, and the machine's used
    memory (total less available: page cache that can be dropped is not used)."""
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    rss = uss = pss = 0
    by_role: dict[str, float] = {}
    for p in procs:
        try:
            mb = rollup(p.pid)
            role = _role(p)
        except (OSError, psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += mb["rss"]
        pss += mb["pss"]
        uss += mb["uss"]
        by_role[role] = by_role.get(role, 0.0) + mb["pss"]
    peak["rss_mb"] = max(peak["rss_mb"], rss)
    peak["uss_mb"] = max(peak["uss_mb"], uss)
    if pss > peak["pss_mb"]:
        peak["pss_mb"], peak["pss_by_role_mb"] = pss, by_role
    peak["processes"] = max(peak["processes"], len(procs))
    peak["machine_used_mb"] = max(peak["machine_used_mb"], _machine_used_mb())


class RunFailed(RuntimeError):
    """A testbed run did not finish; the message says where its output is."""


def launch_ok(config: Path, *overrides: str, timeout: float, **kw: Any) -> RunOutcome:
    """``launch`` that raises ``RunFailed`` (with the end of the output) unless the run finished."""
    res = launch(config, *overrides, timeout=timeout, **kw)
    if not res.ok:
        tail = "\n".join(res.output_path.read_text(errors="replace").splitlines()[-25:])
        raise RunFailed(f"run {config.stem} ended with status {res.status} (output: {res.output_path})\n{tail}")
    return res


def launch_timed(config: Path, *overrides: str, timeout: float, **kw: Any) -> RunOutcome:
    """``launch_ok`` for a run whose timings matter: re-run (``quietly``) while other
    processes disturbed it. The outcome's ``attempts`` lists each attempt's foreign share."""
    def attempt(n: int) -> RunOutcome:
        # a fresh run folder, named after the caller's run.name if it gave one (two runs of
        # one config, e.g. bench_split's key and TLS runs, must not both re-run as one name)
        named = [o.split("=", 1)[1].strip('"') for o in overrides if o.startswith("run.name=")]
        again = [f'run.name="{(named[-1] if named else config.stem)}-again{n}"'] if n else []
        return launch_ok(config, *overrides, *again, timeout=timeout, **kw)

    res, shares = quietly(attempt, what=config.stem)
    res.attempts = shares
    return res


# -- numbers -----------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between closest ranks."""
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summarize(values: list[float]) -> dict[str, float]:
    """count, median, p95, min, max, mean of ``values``."""
    if not values:
        return {"count": 0}
    return {"count": len(values), "median": statistics.median(values), "p95": percentile(values, 95),
            "min": min(values), "max": max(values), "mean": statistics.fmean(values)}


def table(headers: list[str], rows: list[list[Any]], *, floatfmt: str = ".3f") -> str:
    """A plain-text table, right-aligned, floats formatted with ``floatfmt``."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v)
    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """What the figures depend on: CPU, memory, load, versions."""
    import torch
    load = os.getloadavg()
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(), "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "mem_total_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "mem_available_gb": round(psutil.virtual_memory().available / 2**30, 1),
            "loadavg": [round(x, 2) for x in load]}


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(str(path), data, indent=2)


def out_dir(given: str | None) -> Path:
    """The output folder: ``given``, or ``bench-results/<timestamp>``."""
    path = Path(given) if given else DEFAULT_OUT / time.strftime("%Y%m%d-%H%M%S")
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def print_config(title: str, config: dict[str, Any]) -> None:
    print(f"== {title}", flush=True)
    for k, v in config.items():
        print(f"   {k}: {v}", flush=True)


def standalone(name: str, describe: Callable[[str], dict], run: Callable[[Path, str], dict],
               report: Callable[[dict], str], argv: list[str] | None = None, *,
               options: Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], None]] | None = None) -> int:
    """``python -m scripts.bench_<name> --quick|--full [--out DIR]``: one benchmark alone.
    ``options(parser)`` adds a benchmark's own options and returns what applies them
    (called with the parsed arguments, before ``describe`` and ``run``)."""
    p = argparse.ArgumentParser(prog=f"scripts.bench_{name}", description=f"FedFly benchmark: {name}")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_const", const="quick", dest="scale", help="minutes (default)")
    g.add_argument("--full", action="store_const", const="full", dest="scale", help="the paper's scale")
    g.add_argument("--tiny", action="store_const", const="tiny", dest="scale", help="seconds; smoke tests only")
    p.add_argument("--out", default=None, help="results folder (default bench-results/<timestamp>)")
    apply = options(p) if options is not None else None
    args = p.parse_args(argv)
    if apply is not None:
        apply(args)
    scale = args.scale or "quick"
    out = out_dir(args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    print_config(f"{name} ({scale})", describe(scale))
    result = run(out, scale)
    write_json(out / "result.json", result)
    print(report(result), flush=True)
    return 0

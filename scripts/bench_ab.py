"""Before/after a change, side by side in one run: the code at a git revision against this
checkout, the runs interleaved so that the machine's load falls on both sides alike.

    python -m scripts.bench_ab [--before REV] [--repeat N] [--only pause,split,replication] [--out DIR]
    python -m scripts.bench_ab --report-only --out DIR     # the comparison of what DIR/ab/runs.json holds

"before" is checked out into a temporary git worktree (``git worktree add --detach``),
removed at the end; "after" is this checkout. Every testbed runs from its side's code
(``benchlib.launch(code=...)``); the testbed files are written by this code, with keys
both sides read. Default ``--before``: c43b7f8, the parent of e468520, where the handover
seam of issue 23 began. Measured, each once per side per pass, the sides alternating
(before, after, then after, before, ...):

- ``pause``: a planned move's pause (the device's view; ``pause_ms`` of ``summary.json``),
  TLS, the default policy (break-before-make, the session offered), ``bench_migration``'s
  ping-pong (one warm-up round with two moves, then 9 moves in one measured round):
  ``alone`` (one device) and ``pair`` (one device training on each edge).
- ``split``: split training over TCP (1 central, 1 edge, 1 device, the key mode) against
  the same rounds trained in one process (``bench_split.in_process`` of that side's code,
  in a process of its own): the in-process seconds per round over the device's.
- ``replication``: ``bench_replication``'s testbed (2 edges, 2 devices) with
  ``faults.checkpoint_steps`` 0 and K (``--k``, default 1: a copy every step, the dearest):
  the training time with K over without, minus 1.

Printed per figure: each side's runs, their median, the noise (the spread, max - min, of
one side's repeated runs), after / before of the medians, and the median over passes of
after - before within a pass (back to back, so the load of the moment falls on both); with the load average
before every run and the share of the CPUs other processes took during it. Nothing is
re-run for load (the point of interleaving is that load hits both sides alike); a run
that fails is reported and left out. ``runs.json`` holds every run as it ends, so an
interrupted comparison can still be reported (``--report-only``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from scripts import bench_migration, bench_replication, benchlib

BEFORE = "c43b7f8"
BENCHES = ("pause", "split", "replication")
SPLIT_SAMPLES, SPLIT_ROUNDS = 1000, 3          # 10 steps a round, round 1 a warm-up
REPL_SAMPLES, REPL_ROUNDS = 1000, 3            # 20 steps a round (batch 50), round 1 a warm-up
PAUSE_ROUNDS = 1                               # measured rounds, 9 moves each


def add_worktree(rev: str) -> Path:
    """``rev`` checked out, detached, in a new temporary folder."""
    path = Path(tempfile.mkdtemp(prefix="fedfly-ab-")) / "before"
    subprocess.run(["git", "-C", str(benchlib.ROOT), "worktree", "add", "--detach", str(path), rev],
                   check=True, capture_output=True, text=True)
    return path


def remove_worktree(path: Path) -> None:
    subprocess.run(["git", "-C", str(benchlib.ROOT), "worktree", "remove", "--force", str(path)],
                   check=False, capture_output=True)
    try:
        path.parent.rmdir()
    except OSError:
        pass


def _run(cfg: Path, code: Path, *overrides: str, timeout: float = 900) -> benchlib.RunOutcome:
    return benchlib.launch_ok(cfg, *overrides, timeout=timeout, code=code)


def pause(out: Path, code: Path, tag: str) -> dict[str, float]:
    from common import pki
    from common.config import load_config
    figures = {}
    for scenario in ("alone", "pair"):
        cfg = bench_migration._matrix_config(out, scenario, "tls", "break", PAUSE_ROUNDS, tag)
        pki.ensure(load_config(str(cfg)))
        res = _run(cfg, code)
        migs = [mv for mv in res.summary["migrations"] if mv["round"] > 1]
        figures[f"pause {scenario}, TLS (ms)"] = statistics.median(mv["pause_ms"] for mv in migs)
    return figures


def split(out: Path, code: Path, tag: str) -> dict[str, float]:
    cfg = benchlib.write_config(out, f"split-{tag}", edges=1, devices=1, rounds=SPLIT_ROUNDS, mode="fedfly",
                                samples_per_device=SPLIT_SAMPLES, batch_size=100, split_layer=3, test_samples=200,
                                extra={"security": {"mode": "key"}})
    probe = ("import json, sys; from pathlib import Path; from scripts.bench_split import in_process; "
             "print(json.dumps(in_process(Path(sys.argv[1]), int(sys.argv[2]))))")
    r = subprocess.run([sys.executable, "-c", probe, str(cfg), str(SPLIT_ROUNDS)], cwd=code, env=benchlib._env(code),
                       capture_output=True, text=True, timeout=900, check=True)
    local = json.loads(r.stdout.strip().splitlines()[-1])
    res = _run(cfg, code)
    tcp = next(iter(res.summary["devices"].values()))["round_seconds"][1:]
    steps = -(-SPLIT_SAMPLES // 100)
    return {"split over TCP / in one process (x)": statistics.median(local) / statistics.median(tcp),
            "split step over TCP (ms)": statistics.median(tcp) / steps * 1000}


def replication(out: Path, code: Path, tag: str, k: int) -> dict[str, float]:
    secs = {}
    for kk in (0, k):
        res = _run(bench_replication._config(out, f"k{kk}-{tag}", kk, REPL_SAMPLES, REPL_ROUNDS), code)
        secs[kk] = bench_replication._train_seconds(res.summary)
    return {f"replication K={k} overhead (%)": (secs[k] / secs[0] - 1) * 100, "training K=0 (s)": secs[0]}


def run(out: Path, before: Path, repeat: int, benches: list[str], k: int) -> dict[str, Any]:
    sides = {"before": before, "after": benchlib.ROOT}
    measure: dict[str, Callable[[Path, Path, str], dict[str, float]]] = {
        "pause": pause, "split": split, "replication": lambda o, c, t: replication(o, c, t, k)}
    runs: list[dict[str, Any]] = []
    for rep in range(repeat):
        order = ("before", "after") if rep % 2 == 0 else ("after", "before")
        for bench in benches:
            for side in order:
                load = os.getloadavg()
                try:
                    with benchlib.ForeignLoad() as fl:
                        figures = measure[bench](out / bench, sides[side], f"{side}-{rep}")
                except (benchlib.RunFailed, subprocess.SubprocessError) as exc:
                    print(f"   {bench:11} {side:6} pass {rep}: FAILED, left out: {str(exc).splitlines()[0]}", flush=True)
                    continue
                row = {"bench": bench, "side": side, "repeat": rep, "figures": figures,
                       "loadavg_before": [round(x, 2) for x in load], "foreign_cpu_share": round(fl.share, 3)}
                runs.append(row)
                benchlib.write_json(out / "runs.json", runs)  # so far: an interrupted run keeps what it measured
                print(f"   {bench:11} {side:6} pass {rep}: " + ", ".join(f"{n} {v:.3f}" for n, v in figures.items())
                      + f"; load {load[0]:.1f}, others took {fl.share:.0%}", flush=True)
    return {"benchmark": "ab", "runs": runs, "machine": benchlib.machine()}


def finish(out: Path, result: dict[str, Any], before: str) -> None:
    rows = compare(result)
    result.update(before=before, comparison=rows)
    benchlib.write_json(out / "result.json", result)
    print(report(result, rows), flush=True)


def compare(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per figure: each side's values, median and spread, and after / before."""
    names = list(dict.fromkeys(n for r in result["runs"] for n in r["figures"]))
    rows = []
    for name in names:
        vals = {s: [r["figures"][name] for r in result["runs"] if r["side"] == s and name in r["figures"]]
                for s in ("before", "after")}
        if not vals["before"] or not vals["after"]:
            continue
        med = {s: statistics.median(v) for s, v in vals.items()}
        by_pass = {(r["repeat"], r["side"]): r["figures"][name] for r in result["runs"] if name in r["figures"]}
        diffs = [by_pass[(p, "after")] - by_pass[(p, "before")] for p, side in by_pass
                 if side == "after" and (p, "before") in by_pass]
        rows.append({"figure": name, **{f"{s}_runs": v for s, v in vals.items()},
                     "paired_diffs": diffs, "paired_diff_median": statistics.median(diffs) if diffs else float("nan"),
                     **{f"{s}_median": m for s, m in med.items()},
                     **{f"{s}_spread": max(v) - min(v) for s, v in vals.items()},
                     "after_over_before": med["after"] / med["before"] if med["before"] else float("nan")})
    return rows


def report(result: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    table = [[r["figure"], " ".join(f"{v:.2f}" for v in r["before_runs"]), r["before_median"], r["before_spread"],
              " ".join(f"{v:.2f}" for v in r["after_runs"]), r["after_median"], r["after_spread"],
              r["after_over_before"], r["paired_diff_median"]] for r in rows]
    loads = [r["loadavg_before"][0] for r in result["runs"]]
    shares = [r["foreign_cpu_share"] for r in result["runs"]]
    return "\n".join([
        benchlib.table(["figure", "before runs", "before med", "spread", "after runs", "after med", "spread",
                        "after/before", "paired a-b"], table, floatfmt=".3f"),
        f"load average (1 min) before the runs: {min(loads):.1f}..{max(loads):.1f}, median "
        f"{statistics.median(loads):.1f}, on {os.cpu_count()} CPUs; others took {min(shares):.0%}..{max(shares):.0%} "
        f"of the CPUs during them",
        "spread: max - min of one side's repeated runs (the run-to-run noise); after/before: of the medians; "
        "paired a-b: the median over passes of after - before within one pass (the two ran back to back)"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts.bench_ab", description=__doc__.splitlines()[0])
    p.add_argument("--before", default=BEFORE, help=f"the git revision of 'before' (default {BEFORE})")
    p.add_argument("--repeat", type=int, default=3, help="passes; each runs every figure once per side")
    p.add_argument("--only", default=",".join(BENCHES), help=f"a subset of {', '.join(BENCHES)}")
    p.add_argument("--k", type=int, default=1, help="replication: faults.checkpoint_steps against 0")
    p.add_argument("--out", default=None)
    p.add_argument("--report-only", action="store_true", help="run nothing: compare what --out DIR/ab/runs.json holds")
    args = p.parse_args(argv)
    benches = [b for b in args.only.split(",") if b]
    if set(benches) - set(BENCHES):
        p.error(f"--only: choose from {', '.join(BENCHES)}")
    out = benchlib.out_dir(args.out) / "ab"
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        runs = json.loads((out / "runs.json").read_text())
        finish(out, {"benchmark": "ab", "runs": runs, "machine": benchlib.machine()}, args.before)
        return 0
    benchlib.print_config("before/after", {"before": args.before, "after": f"this checkout ({benchlib.ROOT})",
                                           "passes": args.repeat, "figures": benches, "K": args.k,
                                           "loadavg": [round(x, 2) for x in os.getloadavg()]})
    before = add_worktree(args.before)
    try:
        result = run(out, before, args.repeat, benches, args.k)
    finally:
        remove_worktree(before)
    finish(out, result, args.before)
    return 0


if __name__ == "__main__":
    sys.exit(main())

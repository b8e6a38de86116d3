"""The benchmark suite (``make bench``): runs each benchmark, writes its figures and pictures,
and ends with a table of the issue's goals.

    python -m scripts.bench [--quick | --full] [--out DIR] [--only NAMES] [--skip NAMES]
                            [--wait-quiet SECONDS]
    python -m scripts.bench --report-only --out DIR

``--quick`` (the default) takes minutes on a 2-core machine; ``--full`` runs the paper's
scale (100 rounds of CIFAR-10 for the accuracy benchmark, thousands of samples per device
elsewhere) and takes many hours (see BENCHMARKS.md). Benchmarks, in order: codec, split,
migration, sweep, accuracy, scale, faults, replication, memory (``--only``/``--skip`` take comma-separated
names).

Writes into DIR (default ``bench-results/<timestamp>/``): ``<name>/result.json`` per
benchmark (with its testbed files and run folders beside it), ``results.json`` (all of
them, the machine, the goal checks) and ``figures/*.png`` (when matplotlib is installed).
Each benchmark prints its configuration first and its figures last. The goal checks are
information: the exit status is 0 unless a benchmark could not run (then 1).

Timings are taken on a machine other people may be using: every timed testbed run and
in-process measurement records the share of CPU time that other processes took meanwhile,
and one that was disturbed (over ``benchlib.MAX_FOREIGN_SHARE``) is measured again after
the load drops, within a bounded budget (``benchlib.quietly``). ``--report-only`` re-checks
the goals and redraws the figures of an earlier run without running anything.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from typing import Any, Callable

from scripts import benchlib

NAMES = ("codec", "split", "migration", "sweep", "accuracy", "scale", "faults", "replication", "memory")


def _module(name: str):
    return __import__(f"scripts.bench_{name}", fromlist=["run"])


def goals(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goals for this machine, checked against the results that exist."""
    checks: list[dict[str, Any]] = []

    def add(goal: str, measured: str, target: str, ok: bool) -> None:
        checks.append({"goal": goal, "measured": measured, "target": target, "pass": bool(ok)})

    if "migration" in results:
        f = results["migration"]["figures"]
        add("migration pause, median", f"{f['pause_ms']['median']:.1f} ms (p95 {f['pause_ms']['p95']:.1f})",
            "<= 20 ms", f["pause_ms"]["median"] <= 20)
        add("migration pause / plain socket, same bytes, open connection", f"{f['pause_over_plain']:.1f}x "
            f"({f['plain_transfer_ms']['median']:.2f} ms plain)", "<= 5x", f["pause_over_plain"] <= 5)
        add("migration pause / plain socket, same bytes, new connection", f"{f['pause_over_plain_connect']:.1f}x "
            f"({f['plain_connect_transfer_ms']['median']:.2f} ms plain)", "<= 5x", f["pause_over_plain_connect"] <= 5)
    if "memory" in results:
        r = results["memory"]
        slowest = max(r["light"].values(), key=lambda v: v["seconds"])
        biggest = max(v["max_rss_mb"] for v in r["light"].values())
        add("roles that do not train: start, peak RSS", f"{slowest['seconds']:.2f} s, {biggest:.0f} MB",
            "< 1 s, < 60 MB", slowest["seconds"] < 1 and biggest < 60)
        for b in r["breakdown"]:
            if b["model"] == "vgg5":
                add(f"VGG-5 device above torch, private (malloc {b['malloc']})", f"{b['added_over_torch_uss']:.0f} MB",
                    "<= 64 MB", b["added_over_torch_uss"] <= 64)
        from scripts.bench_memory import probe_accounts
        for malloc, a in probe_accounts(r):
            add(f"VGG-5 device process above torch, private, between steps (malloc {malloc})",
                f"{a['steady']:.0f} MB (in a step, at its peak: {a['peak']:.0f} MB)", "<= 64 MB", a["steady"] <= 64)
    if "sweep" in results:
        for name, s in results["sweep"]["figures"].items():
            add(f"sweep {name}: saving vs ideal f/(1+f), every point", f"largest gap {s['max_gap_pp']:.1f} pp",
                "<= 2 pp", s["max_gap_pp"] <= 2)
    if "split" in results:
        f = results["split"]["figures"]
        add("split over TCP / in-process samples/s", f"{f['ratio']:.3f}x", ">= 0.95x", f["ratio"] >= 0.95)
    if "codec" in results:
        f = results["codec"]["figures"]
        add("codec encode+decode, session snapshot", f"{f['encode_decode']['gb_per_s']:.2f} GB/s", ">= 2 GB/s",
            f["encode_decode"]["gb_per_s"] >= 2)
    if "accuracy" in results:
        runs = results["accuracy"]["figures"]["runs"]
        same = sum(r["identical_to_fedfly_static"] for r in runs)
        add("no accuracy loss: final weights equal to fedfly without moves", f"{same}/{len(runs)} runs", "all",
            same == len(runs))
    if "scale" in results:
        f = results["scale"]["figures"]
        add(f"scale: 1 central, 4 edges, {f['devices_wanted']} devices, moves every round",
            f"{f['status']} with {f['devices']} devices", "finished", f["status"] == "finished"
            and f["devices"] == f["devices_wanted"])
    if "faults" in results:
        f = results["faults"]["figures"]
        if f.get("detected_s"):
            add("a silent device noticed by its edge within faults.dead_after_s (+ one heartbeat)",
                f"{f['detected_s']['max']:.2f} s max", f"<= {f['dead_after_s'] + 1:g} s",
                f["detected_s"]["max"] <= f["dead_after_s"] + 1)
        add("final model with drops, reconnects and radio losses = without", "bit-identical"
            if f["identical_to_reference"] else "different", "bit-identical", f["identical_to_reference"])
    if "replication" in results:
        f = results["replication"]["figures"]
        add("replication every 10 steps: training slowdown", f"{f['slowdown']['10'] * 100:+.1f}%", "< 3%",
            f["slowdown"]["10"] < 0.03)
        add("edge killed: final model = without the kill", "bit-identical" if f["recovery_identical"] else
            "different", "bit-identical", f["recovery_identical"])
    return checks


def goal_table(checks: list[dict[str, Any]]) -> str:
    rows = [[c["goal"], c["measured"], c["target"], "PASS" if c["pass"] else "MISS"] for c in checks]
    return benchlib.table(["goal", "measured", "target", ""], rows)


def run_suite(scale: str, out, names: list[str], wait_s: float, say: Callable[[str], None] = print) -> int:
    machine = benchlib.machine()
    say(f"FedFly benchmarks, {scale} scale, into {out}")
    say(f"machine: {machine['cpus']} CPUs, {machine['mem_total_gb']} GB ({machine['mem_available_gb']} GB available), "
        f"load {machine['loadavg']}, Python {machine['python']}, torch {machine['torch']}")
    results: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    started = time.monotonic()
    for name in names:
        mod = _module(name)
        if wait_s:
            benchlib.wait_quiet(wait_s)
        benchlib.print_config(f"{name} ({scale})", mod.describe(scale))
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        load_before = os.getloadavg()
        t0 = time.monotonic()
        try:
            result = mod.run(folder, scale)
        except Exception as exc:  # one benchmark failing must not lose the others' figures
            failed[name] = f"{type(exc).__name__}: {exc}"
            say(f"{name}: FAILED: {failed[name]}")
            traceback.print_exc()
            continue
        result["seconds"] = time.monotonic() - t0
        result["loadavg_before"] = [round(x, 2) for x in load_before]
        result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        benchlib.write_json(folder / "result.json", result)
        results[name] = result
        say(mod.report(result))
        say(f"({name}: {result['seconds']:.0f} s, load {result['loadavg_before'][0]:.1f} -> "
            f"{result['loadavg_after'][0]:.1f})")
    checks = goals(results)
    benchlib.write_json(out / "results.json", {"scale": scale, "machine": machine, "results": results,
                                               "goals": checks, "failed": failed,
                                               "seconds": time.monotonic() - started})
    try:
        from scripts.plot import bench_figures
        import matplotlib  # noqa: F401
    except ImportError:
        say("figures: matplotlib is not installed (pip install -e '.[plot]'); no PNGs written")
    else:
        for path in bench_figures(results, out / "figures"):
            say(f"figure: {path}")
    say("")
    say(f"== goals ({scale} scale, {time.strftime('%Y-%m-%d')}, {(time.monotonic() - started) / 60:.1f} min)")
    say(goal_table(checks))
    for name, why in failed.items():
        say(f"{name}: could not run: {why}")
    return 1 if failed else 0


def report_only(out, say: Callable[[str], None] = print) -> int:
    """Re-check the goals and redraw the figures of an existing results folder."""
    import json
    path = out / "results.json"
    if not path.exists():
        say(f"scripts.bench: error: {path} does not exist")
        return 2
    data = json.loads(path.read_text())
    results = data["results"]
    data["goals"] = goals(results)
    benchlib.write_json(path, data)
    for name in NAMES:
        if name in results:
            say(_module(name).report(results[name]))
    try:
        from scripts.plot import bench_figures
        for fig in bench_figures(results, out / "figures"):
            say(f"figure: {fig}")
    except ImportError:
        say("figures: matplotlib is not installed (pip install -e '.[plot]'); no PNGs written")
    machine = data.get("machine", {})
    say(f"== goals ({data.get('scale')} scale, run {machine.get('date', '?')}, load before {machine.get('loadavg')})")
    say(goal_table(data["goals"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts.bench", description="FedFly benchmark suite")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_const", const="quick", dest="scale", help="minutes (default)")
    g.add_argument("--full", action="store_const", const="full", dest="scale", help="the paper's scale: hours")
    g.add_argument("--tiny", action="store_const", const="tiny", dest="scale", help="seconds; smoke tests only")
    p.add_argument("--out", default=None, help="results folder (default bench-results/<timestamp>)")
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(NAMES)}")
    p.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: re-check the goals and redraw the figures of the results in --out")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each benchmark, wait up to this long for the load average to drop below half the CPUs")
    args = p.parse_args(argv)
    only = [n for n in args.only.split(",") if n]
    skip = [n for n in args.skip.split(",") if n]
    unknown = sorted(set(only + skip) - set(NAMES))
    if unknown:
        p.error(f"unknown benchmark {unknown[0]!r}; use {', '.join(NAMES)}")
    names = [n for n in NAMES if (not only or n in only) and n not in skip]
    if args.report_only:
        if not args.out:
            p.error("--report-only needs --out DIR (a folder written by an earlier run)")
        return report_only(benchlib.out_dir(args.out))
    return run_suite(args.scale or "quick", benchlib.out_dir(args.out), names, args.wait_quiet)


if __name__ == "__main__":
    sys.exit(main())

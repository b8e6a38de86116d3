"""PNG figures from a run folder or a benchmark folder.

    python -m scripts.plot PATH [--out DIR]

PATH may be:

* a run folder (it holds ``summary.json``): ``accuracy.png`` (test accuracy per round) and
  ``round_times.png`` (the central's round seconds and each device's training seconds per
  round, rounds with a move, drop, kill or recovery marked), and from ``scripts.report``
  ``run.png`` (the figure for a paper: both, and a timeline of every device: its edge,
  its training, each move, drop and recovery with its pause), ``timeline.png`` and
  ``report.html`` (one self-contained page with the figure and the run's key numbers),
  written into the run folder;
* a folder of run folders (``runs/``): ``accuracy.png`` and ``round_times.png`` with every
  run on them, one line per run labelled with its name and mode;
* a benchmark folder (it holds ``results.json`` from ``scripts.bench``, or
  ``<benchmark>/result.json`` files): ``sweep.png``, ``accuracy.png``, ``round_times.png``,
  ``migration.png``, ``split.png``, ``scale.png`` for the benchmarks that are there,
  written into ``PATH/figures``.

``--out`` writes elsewhere. Prints the path of every file written. Needs matplotlib (the
``plot`` extra: ``pip install -e '.[plot]'``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

PAPER_SAVINGS = {0.5: 0.33, 0.9: 0.45}  # FedFly paper: saving when the device moves at 50% / 90%
COLORS = {"fedfly": "tab:blue", "restart": "tab:orange", "classic": "tab:green", "centralised": "black"}
DPI = 90


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path, written: list[Path]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)
    written.append(path)


# -- run folders -------------------------------------------------------------------------

def _label(summary: dict[str, Any], many: bool) -> str:
    return f"{summary.get('run_name', '?')} ({summary.get('mode', '?')})" if many else summary.get("mode", "run")


def run_figures(summaries: list[dict[str, Any]], out: Path,
                marks: list[dict[int, Counter]] | None = None) -> list[Path]:
    """accuracy.png and round_times.png for one run or several runs side by side;
    ``marks``: per run, how many moves, drops, kills, recoveries each round had
    (``scripts.report.marks_per_round``; default: the summary's migrations)."""
    from scripts.report import MARK_KINDS, MARK_STYLE, round_axis
    from scripts.timeline import marks_per_round
    plt = _plt()
    marks = marks or [marks_per_round(None, s) for s in summaries]
    all_rounds = sorted({r["round"] for s in summaries for r in s["rounds"]})
    written: list[Path] = []
    many = len(summaries) > 1
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for s in summaries:
        rounds = [r["round"] for r in s["rounds"]]
        ax.plot(rounds, [r["test_accuracy"] for r in s["rounds"]], marker="o", ms=3,
                label=_label(s, many), color=None if many else COLORS.get(s.get("mode")))
    round_axis(ax, all_rounds)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Test accuracy per round")
    _save(fig, out / "accuracy.png", written)

    fig, ax = plt.subplots(figsize=(8, 4.2))
    shown: set[str] = set()
    top = max((r["seconds"] for s in summaries for r in s["rounds"]), default=1.0)
    for s, per_round in zip(summaries, marks):
        rounds = [r["round"] for r in s["rounds"]]
        line, = ax.plot(rounds, [r["seconds"] for r in s["rounds"]], marker="o", ms=3, lw=2,
                        label=f"{_label(s, many)}: round")
        devices = s.get("devices", {})
        if len(devices) <= 8:
            for name, d in sorted(devices.items()):
                ax.plot(range(1, len(d["round_seconds"]) + 1), d["round_seconds"], lw=0.8, ls="--",
                        label=f"{name}" if not many else None)
        for mv in s.get("migrations", []):
            ax.axvline(mv["round"], color=line.get_color(), alpha=0.15, lw=4)
        ys = {r["round"]: r["seconds"] for r in s["rounds"]}
        for rnd, counts in sorted(per_round.items()):
            # one symbol per kind, stacked above the round's point
            kinds = [k for k in MARK_KINDS if counts.get(k)]
            for i, kind in enumerate(kinds):
                marker, color, noun, _ = MARK_STYLE[kind]
                ax.scatter([rnd], [ys.get(rnd, 0) + 0.07 * top * i], marker=marker, s=50, color=color, zorder=5,
                           label=f"round with {noun}" if kind not in shown else None)
                shown.add(kind)
    round_axis(ax, all_rounds)
    ax.set_ylabel("seconds")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Round time (solid: central's round; dashed: each device's training)")
    _save(fig, out / "round_times.png", written)
    return written


# -- benchmark folders -------------------------------------------------------------------

def sweep_figure(result: dict[str, Any], path: Path, written: list[Path]) -> None:
    plt = _plt()
    settings = result["figures"]
    fig, axes = plt.subplots(len(settings), 2, figsize=(11, 3.8 * len(settings)), squeeze=False)
    for row, (name, s) in enumerate(settings.items()):
        pts = s["points"]
        xs = list(range(len(pts)))
        labels = [f"{p['f']:.0%}" for p in pts]
        ax = axes[row][0]
        w = 0.38
        for mode, shift in (("fedfly", -w / 2), ("restart", w / 2)):
            med = [p[f"{mode}_s"] for p in pts]
            # whiskers: the spread of the repetitions behind each median
            spread = [[m - min(p[f"{mode}_rounds_s"]) for m, p in zip(med, pts)],
                      [max(p[f"{mode}_rounds_s"]) - m for m, p in zip(med, pts)]]
            ax.bar([x + shift for x in xs], med, w, yerr=spread, capsize=2, label=mode, color=COLORS[mode],
                   error_kw={"elinewidth": 0.8, "ecolor": "black"})
        t0 = s["no_move_round_s"]["fedfly"]
        ax.plot(xs, [t0] * len(xs), color=COLORS["fedfly"], ls=":", label="no move (T)")
        ax.plot(xs, [t0 * (1 + p["f_effective"]) for p in pts], color=COLORS["restart"], ls="--",
                label="ideal restart T(1+f)")
        ax.set_xticks(xs, labels)
        ax.set_xlabel("device moves at this share of its round")
        ax.set_ylabel("moving device's round time (s)")
        ax.set_title(f"{name} ({s['devices']} dev.): {s['mover']}, {s['steps']} steps/round\n"
                     f"median of {s.get('repetitions', 1)} repetitions (whiskers: min-max)", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
        ax = axes[row][1]
        ax.bar(xs, [p["saving"] * 100 for p in pts], 0.6, color="tab:purple", label="measured 1 - fedfly/restart")
        ax.plot(xs, [p["ideal"] * 100 for p in pts], color="black", marker="o", ms=3, label="ideal f/(1+f)")
        px = [xs[i] for i, p in enumerate(pts) if round(p["f"], 2) in PAPER_SAVINGS]
        py = [PAPER_SAVINGS[round(p["f"], 2)] * 100 for p in pts if round(p["f"], 2) in PAPER_SAVINGS]
        ax.scatter(px, py, marker="*", s=120, color="red", zorder=5, label="paper (FedFly)")
        ax.set_xticks(xs, labels)
        ax.set_xlabel("device moves at this share of its round")
        ax.set_ylabel("saving of fedfly over restart (%)")
        ax.set_ylim(bottom=min(0, min(p["saving"] * 100 for p in pts) - 5))
        ax.set_title(f"{name}: saving (largest gap to ideal {s['max_gap_pp']:.1f} pp)")
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    _save(fig, path, written)


def sweep_round_times(result: dict[str, Any], path: Path, written: list[Path]) -> None:
    """The moving device's round time per round in the first repetition, moves marked."""
    plt = _plt()
    settings = result["figures"]
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4), squeeze=False)
    for col, (name, s) in enumerate(settings.items()):
        ax = axes[0][col]
        for mode in ("fedfly", "restart"):
            run = next(r for r in s["runs"] if r["mode"] == mode)
            secs = run["round_seconds"]
            rounds = list(range(1, len(secs) + 1))
            ax.plot(rounds, secs, marker="o", ms=3, color=COLORS[mode], label=mode)
            for rnd, step, _pause in run["moves"]:
                ax.scatter([rnd], [secs[rnd - 1]], marker="v", s=40, color="red", zorder=5)
        for rnd, f in run["schedule"]:
            if f is not None:
                ax.annotate(f"{f:.0%}", (rnd, 0), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
        ax.scatter([], [], marker="v", color="red", label="migration")
        from scripts.report import round_axis
        round_axis(ax, rounds)
        ax.set_xlabel("round (label: where in the round the device moved)")
        ax.set_ylabel(f"{s['mover']} round time (s)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"sweep {name}, repetition 1 (round 1: warm-up, 2 moves)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path, written)


def accuracy_figure(result: dict[str, Any], path: Path, written: list[Path]) -> None:
    plt = _plt()
    f = result["figures"]
    dists = sorted({r["distribution"] for r in f["runs"]})
    fig, axes = plt.subplots(1, len(dists), figsize=(6 * len(dists), 4.2), squeeze=False)
    for col, dist in enumerate(dists):
        ax = axes[0][col]
        runs = [r for r in f["runs"] if r["distribution"] == dist]
        # Identical curves lie on top of each other: wide lines under narrow ones keep all visible.
        widths = {"fedfly": 6.0, "restart": 3.5, "classic": 1.2}
        for r in runs:
            xs = range(1, len(r["accuracy"]) + 1)
            ax.plot(xs, r["accuracy"], color=COLORS[r["mode"]], ls="-" if r["moves"] else "--",
                    lw=widths[r["mode"]] * (0.6 if r["moves"] else 1.0), alpha=0.8,
                    label=f"{r['mode']}{' + moves' if r['moves'] else ''}")
        c = f["centralised"][dist]
        ax.plot([e["epoch"] for e in c], [e["test_accuracy"] for e in c], color=COLORS["centralised"], lw=1.5,
                marker="o", ms=3, label="centralised (union, same epochs)")
        ax.set_xlabel("round (= epoch for centralised)")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.xaxis.get_major_locator().set_params(integer=True)
        same = sum(bool(r.get("identical_to_fedfly_static")) for r in runs)
        ax.set_title(f"{dist} ({result.get('dataset', '')}): {same}/{len(runs)} runs end with identical weights",
                     fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path, written)


def migration_figure(result: dict[str, Any], path: Path, written: list[Path]) -> None:
    plt = _plt()
    f = result["figures"]
    migs = [mv for mv in result.get("migrations", []) if mv["round"] > 1]
    fig, ax = plt.subplots(figsize=(8, 4))
    data = [[mv["pause_ms"] for mv in migs], [mv["transfer_ms"] for mv in migs]]
    try:
        ax.boxplot(data, orientation="horizontal", whis=(5, 95), showfliers=True)
    except TypeError:  # matplotlib < 3.10 has no ``orientation``
        ax.boxplot(data, vert=False, whis=(5, 95), showfliers=True)
    ax.set_yticks([1, 2], ["pause (device)", "edge-to-edge pull"])
    for value, style, label in ((f["plain_transfer_ms"]["median"], "--", "plain socket, same bytes"),
                                (f["plain_connect_transfer_ms"]["median"], ":", "plain socket + connect"),
                                (5 * f["plain_transfer_ms"]["median"], "-.", "goal: 5x plain socket"),
                                (20.0, "-", "goal: 20 ms")):
        ax.axvline(value, ls=style, color="red" if label.startswith("goal") else "gray",
                   label=f"{label} ({value:.1f} ms)")
    ax.set_xlabel("milliseconds per migration")
    ax.set_xlim(left=0)
    ax.set_title(f"{f['moves']} migrations of {f['state_bytes']['median'] / 1e6:.2f} MB (whiskers: p5-p95)")
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path, written)


def split_figure(result: dict[str, Any], path: Path, written: list[Path]) -> None:
    plt = _plt()
    f = result["figures"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = ["split over TCP", "one process"]
    vals = [f["tcp_samples_per_s"], f["in_process_samples_per_s"]]
    ax.barh(names, vals, color=[COLORS["fedfly"], "gray"])
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.0f}", va="center", fontsize=8)
    ax.set_xlabel("training samples per second (VGG-5, batch 100)")
    ax.set_title(f"Split training over TCP: {f['ratio']:.2f}x in-process (goal 0.95x)")
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path, written)


def scale_figure(result: dict[str, Any], path: Path, written: list[Path]) -> None:
    plt = _plt()
    f = result["figures"]
    if not f["rounds"]:
        return
    fig, ax = plt.subplots(figsize=(7, 3.6))
    xs = [r["round"] for r in f["rounds"]]
    comp = [r["longest_device_s"] for r in f["rounds"]]
    over = [max(0.0, r["overhead_s"]) for r in f["rounds"]]
    ax.bar(xs, comp, label="longest device training", color=COLORS["fedfly"])
    ax.bar(xs, over, bottom=comp, label="overhead beyond compute", color="tab:red")
    ax.bar(xs, [r["eval_seconds"] for r in f["rounds"]], bottom=[c + o for c, o in zip(comp, over)],
           label="evaluation (central)", color="gray")
    ax.set_xlabel("round")
    ax.set_ylabel("seconds")
    ax.set_xticks(xs)
    ax.set_title(f"1 central, 4 edges, {f['devices']} devices: {f['status']}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path, written)


BENCH_FIGURES = [("sweep", "sweep.png", sweep_figure), ("sweep", "round_times.png", sweep_round_times),
                 ("accuracy", "accuracy.png", accuracy_figure), ("migration", "migration.png", migration_figure),
                 ("split", "split.png", split_figure), ("scale", "scale.png", scale_figure)]


def load_bench(folder: Path) -> dict[str, dict[str, Any]]:
    """Benchmark results by name, from ``results.json`` or ``<name>/result.json``."""
    results: dict[str, dict[str, Any]] = {}
    combined = folder / "results.json"
    if combined.exists():
        results.update(json.loads(combined.read_text()).get("results", {}))
    for path in sorted(folder.glob("*/result.json")):
        results.setdefault(path.parent.name, json.loads(path.read_text()))
    return results


def bench_figures(results: dict[str, dict[str, Any]], out: Path) -> list[Path]:
    written: list[Path] = []
    for name, filename, draw in BENCH_FIGURES:
        if name in results and "figures" in results[name]:
            draw(results[name], out / filename, written)
    return written


def plot(path: Path, out: Path | None = None) -> list[Path]:
    """Write the figures for ``path`` (see the module docstring); returns the paths written.
    Raises ``FileNotFoundError`` when ``path`` holds nothing to plot."""
    import matplotlib
    from scripts.report import load_run, write_report
    from scripts.timeline import marks_per_round
    path = Path(path)
    results = {} if (path / "summary.json").exists() else load_bench(path)
    if results:
        return bench_figures(results, out or path / "figures")
    with matplotlib.rc_context({"text.parse_math": False}):  # run and device names are text, not TeX
        if (path / "summary.json").exists():
            summary, timeline = load_run(path)
            written = run_figures([summary], out or path, [marks_per_round(timeline, summary)])
            return written + write_report(summary, timeline, out or path)
        runs = [load_run(p.parent) for p in sorted(path.glob("*/summary.json"))]
        if runs:
            return run_figures([s for s, _ in runs], out or path, [marks_per_round(t, s) for s, t in runs])
    raise FileNotFoundError(f"{path} holds no summary.json, results.json or */summary.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts.plot", description="PNG figures from a run or benchmark folder")
    p.add_argument("path", help="a run folder, a folder of run folders, or a benchmark folder")
    p.add_argument("--out", default=None, help="write the PNGs here instead")
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("scripts.plot: error: matplotlib is not installed; pip install -e '.[plot]'", file=sys.stderr)
        return 2
    try:
        written = plot(Path(args.path), Path(args.out) if args.out else None)
    except (FileNotFoundError, ValueError) as exc:  # ValueError: a summary.json that is not JSON
        print(f"scripts.plot: error: {exc}", file=sys.stderr)
        return 2
    for w in written:
        print(w)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A run folder as a reader sees it: the figure for a paper, and one HTML page.

``write_report(*load_run(run_dir), out)`` writes

* ``run.png``: test accuracy per round, round time per round (each device's training
  beside it, rounds with a move, drop, kill or recovery marked), and below them the
  timeline of every process: which edge each device was on, when it trained, each move
  (its pause), each drop (its time without a link) and recovery, each process that died;
* ``timeline.png``: that timeline alone, larger;
* ``report.html``: one self-contained page with the figure and the run's key numbers
  (``scripts.report_page``).

The timeline needs the run's ``events-*.jsonl``; without them the page and ``run.png``
have the per-round panels only. Called by ``python -m scripts.plot RUN_DIR``.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

from scripts.report_page import html_page
from scripts.timeline import MARK_KINDS, Mark, Timeline, marks_per_round, read_timeline

DPI = 90
# How each kind of mark is drawn: (matplotlib marker, colour, what a round had, the
# timeline's legend label).
MARK_STYLE = {
    "move": ("v", "tab:blue", "a move", "move (label: pause)"),
    "drop": ("x", "red", "a link drop", "link dropped / left the round"),
    "kill": ("X", "black", "a process lost", "process killed / lost"),
    "restart": ("s", "tab:purple", "a restart", "process started again"),
    "recovery": ("^", "tab:green", "a recovery", "recovered (label: time down)"),
}
EDGE_COLORS = ["tab:cyan", "tab:orange", "tab:olive", "tab:pink", "tab:brown", "tab:gray", "gold", "lightcoral"]
ANNOTATE_AT_MOST = 40  # marks: beyond this many, labels would cover the bars
CLOSE = 0.012          # marks nearer than this share of the time axis would cover each other...
MARK_GAP_PT = 8        # ...so they go side by side, this many points apart


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def round_axis(ax, rounds: list[int]) -> None:
    """Whole rounds only on the x axis: a tick per round when they fit, else integer ticks."""
    from matplotlib.ticker import MaxNLocator
    if rounds and len(rounds) <= 25:
        ax.set_xticks(sorted(set(rounds)))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")


def edge_colors(timeline: Timeline | None) -> dict[str, str]:
    return {e: EDGE_COLORS[i % len(EDGE_COLORS)] for i, e in enumerate(timeline.edges if timeline else ())}


# -- the panels ----------------------------------------------------------------------------

def draw_accuracy(ax, summary: dict[str, Any]) -> None:
    rounds = [r["round"] for r in summary["rounds"]]
    acc = [r["test_accuracy"] for r in summary["rounds"]]
    ax.plot(rounds, acc, marker="o", ms=4, color="tab:blue")
    if acc:
        ax.annotate(f"{acc[-1]:.3f}", (rounds[-1], acc[-1]), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=8)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("Test accuracy per round", fontsize=10)
    ax.grid(alpha=0.3)
    round_axis(ax, rounds)


def draw_round_times(ax, summary: dict[str, Any], per_round: dict[int, Counter]) -> None:
    rounds = [r["round"] for r in summary["rounds"]]
    secs = [r["seconds"] for r in summary["rounds"]]
    ax.bar(rounds, secs, 0.6, color="lightsteelblue", label="round (central)")
    evals = [r.get("eval_seconds") or 0.0 for r in summary["rounds"]]
    if any(evals):
        ax.bar(rounds, evals, 0.6, bottom=secs, color="0.85", label="then its evaluation")
        secs = [a + b for a, b in zip(secs, evals)]
    devices = summary.get("devices", {})
    if devices:
        xs, ys = [], []
        for d in devices.values():
            for i, s in enumerate(d.get("round_seconds", [])):
                if i < len(rounds):
                    xs.append(rounds[i])
                    ys.append(s)
        ax.scatter(xs, ys, s=12, color="dimgray", zorder=3, label="a device's training")
    top = max(secs, default=1.0)
    shown: set[str] = set()
    for rnd, counts in sorted(per_round.items()):
        y = (secs[rounds.index(rnd)] if rnd in rounds else 0.0) + 0.06 * top
        for kind in MARK_KINDS:
            if counts.get(kind):
                marker, color, noun, _ = MARK_STYLE[kind]
                ax.scatter([rnd], [y], marker=marker, s=45, color=color, zorder=5,
                           label=f"round with {noun}" if kind not in shown else None)
                if counts[kind] > 1:
                    ax.annotate(f"{counts[kind]}", (rnd, y), textcoords="offset points", xytext=(6, -3), fontsize=7)
                shown.add(kind)
                y += 0.08 * top
    ax.set_ylabel("seconds")
    ax.set_ylim(0, top * (1.15 + 0.08 * len(shown)))
    ax.set_title("Time per round", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    # beside the panel: above the bars it would hide the marks
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    round_axis(ax, rounds)


def _clusters(marks: tuple[Mark, ...], close: float) -> list[list[Mark]]:
    """``marks`` (in time order) in runs whose neighbours are less than ``close`` apart."""
    out: list[list[Mark]] = []
    for mk in marks:
        if out and mk.t - out[-1][-1].t < close:
            out[-1].append(mk)
        else:
            out.append([mk])
    return out


def draw_timeline(ax, timeline: Timeline) -> None:
    """One row per process, top to bottom; seconds on x, the central's rounds shaded and
    numbered on a second axis above."""
    from matplotlib.patches import Patch
    from matplotlib.transforms import offset_copy
    colors = edge_colors(timeline)
    rows = list(timeline.rows)
    n = len(rows)
    for i, (r, a, b) in enumerate(timeline.rounds):
        if i % 2 == 0:
            ax.axvspan(a, b, color="0.93", zorder=0)
    annotate = sum(len(r.marks) for r in rows) <= ANNOTATE_AT_MOST
    starts = [s.start for r in rows if r.role == "device" for s in r.on]
    ends = [s.end for r in rows for s in r.on] + [b for _, _, b in timeline.rounds]
    span = (max(ends, default=1.0) - min(starts + [0.0])) or 1.0
    ax.set_xlim(min(starts + [0.0]) - 0.01 * span, max(ends, default=1.0) + 0.01 * span)
    for i, row in enumerate(rows):
        y = n - 1 - i
        if row.role == "device":
            ax.broken_barh([(s.start, s.end - s.start) for s in row.on], (y - 0.1, 0.2),
                           facecolors=[colors.get(s.edge, "0.6") for s in row.on], alpha=0.45, zorder=1)
            # white edges: where one round (or one edge's part of it) ends and the next begins
            ax.broken_barh([(s.start, s.end - s.start) for s in row.training], (y - 0.32, 0.64),
                           facecolors=[colors.get(s.edge, "0.6") for s in row.training], edgecolor="white", lw=0.6,
                           zorder=2)
            ax.broken_barh([(s.start, s.end - s.start) for s in row.unused], (y - 0.32, 0.64),
                           facecolors=[colors.get(s.edge, "0.6") for s in row.unused], edgecolor="0.3", hatch="..",
                           alpha=0.35, lw=0.6, zorder=2)
            ax.broken_barh([(s.start, s.end - s.start) for s in row.down], (y - 0.32, 0.64), facecolors="none",
                           edgecolor="red", hatch="////", lw=0.8, zorder=3)
        else:
            ax.broken_barh([(s.start, s.end - s.start) for s in row.on], (y - 0.08, 0.16),
                           facecolors=colors.get(row.name, "0.55"), zorder=1)
        for cluster in _clusters(row.marks, CLOSE * span):
            # marks closer than a symbol's width: side by side, one label after them
            labels = []
            for k, mk in enumerate(cluster):
                marker, color, _, _ = MARK_STYLE[mk.kind]
                at = offset_copy(ax.transData, fig=ax.figure, x=MARK_GAP_PT * k, units="points")
                ax.scatter([mk.t], [y + 0.42], marker=marker, s=40, color=color, zorder=5, clip_on=False, transform=at)
                if mk.pause_s:
                    labels.append((f"{mk.pause_s * 1000:.0f} ms" if mk.pause_s < 1 else f"{mk.pause_s:.2f} s", color))
            if annotate and labels:
                colors_used = {c for _, c in labels}
                ax.annotate(" / ".join(t for t, _ in labels), (cluster[0].t, y + 0.42), textcoords="offset points",
                            xytext=(5 + MARK_GAP_PT * (len(cluster) - 1), 1), fontsize=7, zorder=6,
                            color=colors_used.pop() if len(colors_used) == 1 else "black")
    ax.set_yticks(range(n), [f"{r.name}" for r in reversed(rows)], fontsize=8)
    ax.set_ylim(-0.6, n - 0.3)
    ax.set_xlabel("seconds from the start of round 1")
    ax.grid(axis="x", alpha=0.3)
    if timeline.rounds:
        top = ax.twiny()
        top.set_xlim(ax.get_xlim())
        top.set_xticks([(a + b) / 2 for _, a, b in timeline.rounds], [str(r) for r, _, _ in timeline.rounds],
                       fontsize=8)
        top.tick_params(length=0)
        top.set_xlabel("round (shaded: every other round)", fontsize=8)
    handles = [Patch(color=colors[e], label=f"on {e} (thick: training)") for e in timeline.edges]
    if any(r.unused for r in rows):
        handles.append(Patch(facecolor="0.85", edgecolor="0.3", hatch="..", label="training not used (round over)"))
    if any(r.down for r in rows):
        handles.append(Patch(facecolor="none", edgecolor="red", hatch="////", label="link down"))
    present = {mk.kind for r in rows for mk in r.marks}
    for kind in MARK_KINDS:
        if kind in present:
            marker, color, _, label = MARK_STYLE[kind]
            handles.append(ax.scatter([], [], marker=marker, color=color, label=label))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0)


# -- the figures and the page --------------------------------------------------------------

def run_figure(summary: dict[str, Any], timeline: Timeline | None):
    """The paper figure: accuracy and time per round, then the timeline (when there is one)."""
    plt = _plt()
    rows = len(timeline.rows) if timeline else 0
    tl_h = 1.2 + 0.42 * rows if timeline else 0.0
    fig = plt.figure(figsize=(12, 3.6 + tl_h))
    grid = fig.add_gridspec(2 if timeline else 1, 2, height_ratios=[3.6, tl_h] if timeline else [1])
    draw_accuracy(fig.add_subplot(grid[0, 0]), summary)
    draw_round_times(fig.add_subplot(grid[0, 1]), summary, marks_per_round(timeline, summary))
    if timeline:
        draw_timeline(fig.add_subplot(grid[1, :]), timeline)
    what = " on ".join(str(summary[k]) for k in ("model", "dataset") if summary.get(k))
    fig.suptitle(", ".join(x for x in (f"{summary.get('run_name', 'run')}: {summary.get('mode', '?')}", what,
                                       f"{len(summary.get('devices', {}))} devices") if x), fontsize=11)
    fig.tight_layout()
    return fig


def timeline_figure(timeline: Timeline):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(13, 1.6 + 0.5 * len(timeline.rows)))
    draw_timeline(ax, timeline)
    ax.set_title("Every process over time: where each device was, when it trained, what happened to it", fontsize=10)
    fig.tight_layout()
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    _plt().close(fig)
    return buf.getvalue()


def load_run(run_dir: Path) -> tuple[dict[str, Any], Timeline | None]:
    """The run's summary, and its timeline (None without events files). Raises
    ``FileNotFoundError`` without ``summary.json``, ``ValueError`` if it is not JSON."""
    summary = json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))
    try:
        return summary, read_timeline(Path(run_dir), finished=summary.get("status") != "running")
    except FileNotFoundError:
        return summary, None


def write_report(summary: dict[str, Any], timeline: Timeline | None, out: Path) -> list[Path]:
    """``run.png``, ``timeline.png`` (when there is a timeline) and ``report.html`` into
    ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    import matplotlib
    # names and titles come from the run: a '$' in one is text, not TeX
    with matplotlib.rc_context({"text.parse_math": False}):
        figure = _png(run_figure(summary, timeline))
        (out / "run.png").write_bytes(figure)
        written.append(out / "run.png")
        if timeline is not None:
            (out / "timeline.png").write_bytes(_png(timeline_figure(timeline)))
            written.append(out / "timeline.png")
    (out / "report.html").write_text(html_page(summary, timeline, figure), encoding="utf-8")
    written.append(out / "report.html")
    return written

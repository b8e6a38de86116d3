"""The run's HTML page: one self-contained file (the figure inside as a ``data:`` URI, no
other file or address) with the run's key numbers, what happened in order, and its
rounds, migrations and faults. Pure: no plotting; every text from the run is escaped."""

from __future__ import annotations

import base64
import html
import statistics
from collections import Counter
from typing import Any

from scripts.timeline import Timeline, marks_per_round


def key_numbers(summary: dict[str, Any], timeline: Timeline | None) -> list[tuple[str, str]]:
    """(name, value) pairs: what a reader of the run wants first."""
    rounds = summary.get("rounds", [])
    migs = summary.get("migrations", [])
    acc = [r["test_accuracy"] for r in rounds]
    out = [("run", str(summary.get("run_name", "?"))), ("mode", str(summary.get("mode", "?"))),
           ("status", str(summary.get("status", "?"))),
           ("model / data", f"{summary.get('model', '?')} on {summary.get('dataset', '?')} "
                            f"({summary.get('distribution', '?')})"),
           ("strategy", str((summary.get("strategy") or {}).get("name", "?"))),
           ("devices / edges", f"{len(summary.get('devices', {}))} / {len(summary.get('edges', []) or [])}"),
           ("rounds", f"{len(rounds)} of {(summary.get('training') or {}).get('rounds', '?')}")]
    if acc:
        best = max(range(len(acc)), key=lambda i: acc[i])
        out += [("final test accuracy", f"{acc[-1]:.4f}"),
                ("best test accuracy", f"{acc[best]:.4f} (round {rounds[best]['round']})"),
                ("final test loss", f"{rounds[-1]['test_loss']:.4f}"),
                ("round time, median (min-max)", f"{statistics.median(r['seconds'] for r in rounds):.2f} s "
                 f"({min(r['seconds'] for r in rounds):.2f}-{max(r['seconds'] for r in rounds):.2f})")]
    if summary.get("total_seconds") is not None:
        out.append(("whole run", f"{summary['total_seconds']:.1f} s"))
    out.append(("migrations", str(len(migs))))
    if migs:
        out += [("migration pause, median", f"{statistics.median(mv['pause_ms'] for mv in migs):.1f} ms"),
                ("edge-to-edge transfer, median", f"{statistics.median(mv['transfer_ms'] for mv in migs):.1f} ms"),
                ("state moved, median", f"{statistics.median(mv['state_bytes'] for mv in migs) / 1e6:.2f} MB")]
    if timeline is not None:
        kinds = Counter(mk.kind for r in timeline.rows for mk in r.marks)
        out += [("link drops", str(kinds["drop"])), ("processes killed / lost", str(kinds["kill"])),
                ("recoveries", str(kinds["recovery"]))]
    out += [("faults recorded", str(len(summary.get("faults", [])))),
            ("samples lost", str(sum(r.get("samples_lost", 0) or 0 for r in rounds))),
            ("final model sha256", str(summary.get("final_model_sha256")))]
    return out


def _table(head: list[str] | None, rows: list[list[Any]]) -> str:
    e = html.escape
    th = "<tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>" if head else ""
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{th}{body}</table>"


def _num(v: Any, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else ("" if v is None else str(v))


def html_page(summary: dict[str, Any], timeline: Timeline | None, figure_png: bytes) -> str:
    """The page: the figure, key numbers, rounds, migrations, faults; no external asset."""
    e = html.escape
    img = base64.b64encode(figure_png).decode("ascii")
    per_round = marks_per_round(timeline, summary)
    rounds = [[r["round"], _num(r["seconds"], ".2f"), _num(r["test_accuracy"], ".4f"), _num(r["test_loss"], ".4f"),
               r.get("samples", ""), ", ".join(r.get("missing", []) or []) or "-",
               ", ".join(f"{n} {k}" for k, n in sorted(per_round.get(r["round"], Counter()).items())) or "-"]
              for r in summary.get("rounds", [])]
    migs = [[mv.get("round"), mv.get("step"), mv.get("device"), f"{mv.get('from')} -> {mv.get('to')}",
             _num(mv.get("pause_ms"), ".1f"), _num(mv.get("transfer_ms"), ".1f"),
             _num((mv.get("state_bytes") or 0) / 1e6, ".2f")] for mv in summary.get("migrations", [])]
    faults = [[f.get("round", ""), f.get("kind"), f.get("process"), f.get("peer"), _num(f.get("down_s"), ".2f"),
               f.get("replayed", ""), f.get("recovery", ""), f.get("detail", "")] for f in summary.get("faults", [])]
    happened = [[f"{mk.t:.2f}", row.name, mk.kind, mk.text,
                 (f"{mk.pause_s * 1000:.1f} ms" if mk.pause_s < 1 else f"{mk.pause_s:.2f} s") if mk.pause_s else ""]
                for row in (timeline.rows if timeline else ()) for mk in row.marks]
    happened.sort(key=lambda x: float(x[0]))
    title = f"FedFly run {summary.get('run_name', '?')}"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:1200px;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 8px;"
        "font-size:13px;text-align:left}th{background:#f0f0f0}img{max-width:100%}"
        "figcaption{font-size:13px;color:#444}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        "<h2>Key numbers</h2>", _table(None, [list(kv) for kv in key_numbers(summary, timeline)]),
        "<h2>Figure</h2>", f'<figure><img alt="accuracy, round time and timeline of the run" '
                           f'src="data:image/png;base64,{img}">',
        "<figcaption>Top: test accuracy and time per round (bars: the central's round; dots: each device's "
        "training; symbols above a bar: the round had a move, drop, kill or recovery). Bottom: every process "
        "over time; a device's thin bar is the edge it is attached to, the thick bar its training (colour: "
        "the edge), hatched red: its link down; labels give a move's pause and a recovery's time down."
        + ("" if timeline else " (No events files: no timeline.)") + "</figcaption></figure>",
        "<h2>What happened, in order</h2>",
        _table(["second", "process", "what", "detail", "pause / down"], happened) if happened else "<p>nothing</p>",
        "<h2>Rounds</h2>", _table(["round", "seconds", "accuracy", "loss", "samples", "missing", "marks"], rounds),
        "<h2>Migrations</h2>", _table(["round", "step", "device", "edges", "pause ms", "transfer ms", "MB"], migs)
        if migs else "<p>none</p>",
        "<h2>Faults</h2>", _table(["round", "kind", "process", "peer", "down s", "steps again", "recovery", "detail"],
                                  faults) if faults else "<p>none</p>",
        "</body></html>"]
    return "\n".join(parts) + "\n"

"""Mobility models: where devices go, as moves the device takes at its step boundaries.

Pure and torch-free (the config builds them when it loads). Two kinds of move come out:

- a ``Move`` (round, fraction of the round) for round-based traces, the schedule's kind;
- a ``TimedMove`` (seconds since the device started training) for time-based traces and
  the random-waypoint model; the device takes it at the first step boundary at or after
  that time (``device/moves.py``, ``TimedMoves``).

``read_trace`` reads a CSV trace, either ``time_s,device,edge`` or ``round,at,device,edge``
(the header line says which). ``waypoint_trace`` is the random-waypoint model over a grid
of edge cells: the area is ``columns`` x ``rows`` square cells of ``cell_m`` metres, cell k
(row-major) served by edge k (edges in name order; with more cells than edges, edge
k mod n). Each device starts at the centre of its first edge's cell, picks a uniform
random point of the area, walks there at ``speed_mps``, pauses ``pause_s``, and so on;
each time it enters a cell of another edge it moves there. Seeded per (seed, device).
"""

from __future__ import annotations

import csv
import hashlib
import math
import random
from dataclasses import dataclass


class TraceError(ValueError):
    """A trace file or a mobility model that cannot be used; the text says where and why."""


@dataclass(frozen=True)
class TimedMove:
    time_s: float   # seconds since the device started its first round
    device: str
    to: str


@dataclass(frozen=True)
class RoundMove:
    round: int
    at: float
    device: str
    to: str


TIME_HEADER = ["time_s", "device", "edge"]
ROUND_HEADER = ["round", "at", "device", "edge"]


def read_trace(path: str) -> list[TimedMove | RoundMove]:
    """Every row of a trace CSV, in file order. Raises ``TraceError`` naming the line."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r and not r[0].lstrip().startswith("#")]
    except OSError as exc:
        raise TraceError(f"cannot read {path}: {exc.strerror}") from None
    if not rows:
        raise TraceError(f"{path} is empty; its first line must be {','.join(TIME_HEADER)} or {','.join(ROUND_HEADER)}")
    header = [h.strip() for h in rows[0]]
    if header not in (TIME_HEADER, ROUND_HEADER):
        raise TraceError(f"{path}: the header is {','.join(header)}; use {','.join(TIME_HEADER)} "
                         f"or {','.join(ROUND_HEADER)}")
    out: list[TimedMove | RoundMove] = []
    for line, row in enumerate(rows[1:], start=2):
        row = [c.strip() for c in row]
        if len(row) != len(header):
            raise TraceError(f"{path} line {line}: {len(row)} fields, the header has {len(header)}")
        try:
            if header == TIME_HEADER:
                t = float(row[0])
                if not (math.isfinite(t) and t >= 0):
                    raise ValueError("time_s must be >= 0")
                out.append(TimedMove(t, row[1], row[2]))
            else:
                rnd, at = int(row[0]), float(row[1])
                if not 0 < at < 1:
                    raise ValueError("at must be a fraction of the round, 0 < at < 1")
                out.append(RoundMove(rnd, at, row[2], row[3]))
        except ValueError as exc:
            raise TraceError(f"{path} line {line}: {exc}") from None
    return out


def _rng(seed: int, device: str) -> random.Random:
    digest = hashlib.sha256(f"waypoint|{seed}|{device}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def grid_shape(edges: int, columns: int = 0) -> tuple[int, int]:
    """(columns, rows) of the cell grid: ``columns`` (0: ceil(sqrt(edges))) by enough rows."""
    cols = columns or math.ceil(math.sqrt(edges))
    return cols, math.ceil(edges / cols)


def waypoint_trace(*, devices: dict[str, str], edges: list[str], cell_m: float, speed_mps: float,
                   pause_s: float = 0.0, columns: int = 0, seed: int = 0,
                   horizon_s: float = 3600.0) -> list[TimedMove]:
    """The random-waypoint model's moves for every device (``devices``: name -> first
    edge) up to ``horizon_s`` seconds, sorted by (time, device)."""
    edges = sorted(edges)
    cols, rows = grid_shape(len(edges), columns)
    width, height = cols * cell_m, rows * cell_m

    def edge_at(x: float, y: float) -> str:
        cx, cy = min(int(x // cell_m), cols - 1), min(int(y // cell_m), rows - 1)
        return edges[(cy * cols + cx) % len(edges)]

    out: list[TimedMove] = []
    for device in sorted(devices):
        rng = _rng(seed, device)
        k = edges.index(devices[device])
        x, y = (k % cols + 0.5) * cell_m, (k // cols + 0.5) * cell_m
        here, t = devices[device], 0.0
        while t < horizon_s:
            nx, ny = rng.uniform(0, width), rng.uniform(0, height)
            dist = math.hypot(nx - x, ny - y)
            duration = dist / speed_mps
            # where the straight walk crosses a cell border: fractions of the walk
            cuts = {0.0, 1.0}
            for a, b in ((x, nx), (y, ny)):
                if a != b:
                    lo, hi = sorted((a, b))
                    first = math.floor(lo / cell_m) + 1
                    cuts.update((i * cell_m - a) / (b - a) for i in range(first, math.floor(hi / cell_m) + 1))
            fr = sorted(c for c in cuts if 0 <= c <= 1)
            for f0, f1 in zip(fr, fr[1:]):
                mid = (f0 + f1) / 2
                cell = edge_at(x + (nx - x) * mid, y + (ny - y) * mid)
                when = t + f0 * duration
                if cell != here and when < horizon_s:
                    out.append(TimedMove(round(when, 6), device, cell))
                    here = cell
            x, y, t = nx, ny, t + duration + pause_s
    return sorted(out, key=lambda mv: (mv.time_s, mv.device))

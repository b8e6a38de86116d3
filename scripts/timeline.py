"""What every process of a run did, and when, read back from its event logs.

    timeline = read_timeline(run_dir)

Pure: JSON Lines in, frozen records out; no plotting here (``scripts.report`` draws it).
Times are seconds from the central's first round start, from each line's ``ts`` (the
wall clock of the process that wrote it: on several hosts, as good as their clocks agree).

Each events file is one life of one process (``events-<name>.jsonl``, then
``events-<name>.1.jsonl`` after a restart). A life without its goodbye
(``shutdown``, or the central's ``finished``) in a run that went on died: it is
a ``kill`` mark, placed where a peer first saw it go (its last line is often seconds
before that), or at its last line when nobody said. A line that is not JSON (the torn last
line of a killed process) is skipped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from collections import Counter
from typing import Any, Iterable

GOODBYES = {"shutdown", "finished"}  # the central writes "finished" however its run ended
# Mark kinds, in the order a legend lists them.
MARK_KINDS = ("move", "drop", "kill", "restart", "recovery")
_FILE = re.compile(r"^events-(?P<name>.+?)(?:\.(?P<life>\d+))?\.jsonl$")


@dataclass(frozen=True)
class Span:
    """``start``..``end`` seconds; ``edge``: where a device was (or the process itself, for
    an edge's or the central's life)."""
    start: float
    end: float
    edge: str


@dataclass(frozen=True)
class Mark:
    """One thing that happened to a process at ``t``: ``kind`` is one of ``MARK_KINDS``;
    ``pause_s``: what it cost (a move's pause, a drop's time without a link)."""
    t: float
    kind: str
    text: str
    pause_s: float = 0.0


@dataclass(frozen=True)
class Row:
    """One process: ``on`` where it was attached (a device) or alive (an edge, the central);
    ``training`` the parts of its rounds it trained, by edge; ``unused`` the parts of rounds
    it gave up (over before its update was delivered); ``down`` its link down."""
    name: str
    role: str
    on: tuple[Span, ...]
    training: tuple[Span, ...]
    down: tuple[Span, ...]
    marks: tuple[Mark, ...]
    unused: tuple[Span, ...] = ()


@dataclass(frozen=True)
class Timeline:
    t0: float                                     # wall clock of second 0
    rounds: tuple[tuple[int, float, float], ...]  # (round, start, end) as the central ran them
    rows: tuple[Row, ...]                         # the central, edges, then devices, by name
    edges: tuple[str, ...]


def read_events(path: Path) -> list[dict[str, Any]]:
    """The lines of one events file that are JSON objects with a number ``ts``."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("ts"), (int, float)) and isinstance(rec.get("event"), str):
                out.append(rec)
    return out


def lives(run_dir: Path) -> dict[str, list[list[dict[str, Any]]]]:
    """Each process's lives (lists of its events, in order), by the name in the file name:
    the ``process`` field of a line can name someone else (the central's ``fault`` lines
    carry the reporter's name)."""
    found: dict[str, list[tuple[int, list[dict[str, Any]]]]] = {}
    for path in sorted(Path(run_dir).glob("events-*.jsonl")):
        mt = _FILE.match(path.name)
        if mt:
            found.setdefault(mt["name"], []).append((int(mt["life"] or 0), read_events(path)))
    return {name: [evs for _, evs in sorted(ls, key=lambda x: x[0])] for name, ls in found.items()}


def _rounds(central: list[list[dict[str, Any]]]) -> list[tuple[int, float, float]]:
    starts: dict[int, float] = {}
    done: dict[int, tuple[int, float, float]] = {}
    for ev in (e for life in central for e in life):
        if ev["event"] == "round_start" and isinstance(ev.get("round"), int):
            starts[ev["round"]] = ev["ts"]  # a resumed central starts a round again: the last start counts
        elif ev["event"] == "round_done" and ev.get("round") in starts:
            done[ev["round"]] = (ev["round"], starts[ev["round"]], ev["ts"])
    return [done[r] for r in sorted(done)]


def _lost_seen(name: str, after: float, before: float, everyone: Iterable[dict[str, Any]]) -> float | None:
    """When a peer first said ``name`` was gone, in ``after``..``before``."""
    seen = []
    for ev in everyone:
        if not after <= ev["ts"] < before:
            continue
        e = ev["event"]
        if (e == "link_lost" and ev.get("edge") == name) or (e == "detached" and ev.get("device") == name) \
                or (e == "fault" and ev.get("peer") == name and ev.get("kind") in ("edge_lost", "peer_silent")) \
                or (name == "central" and e in ("central_link_lost", "central_down")):
            seen.append(ev["ts"])
    return min(seen) if seen else None


class _DeviceRow:
    """Walks one device's events into spans and marks."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.on: list[Span] = []
        self.windows: list[tuple[float, float, bool]] = []  # (start, end, its update delivered)
        self.down: list[Span] = []
        self.marks: list[Mark] = []
        self.edge: str | None = None
        self.since = 0.0
        self.lost_at: float | None = None
        self.cut_at: float | None = None
        self.round_at: float | None = None

    def leave(self, t: float) -> None:
        if self.edge is not None:
            self.on.append(Span(self.since, t, self.edge))
        self.edge = None

    def join(self, edge: str, t: float) -> None:
        if edge == self.edge:
            return
        self.leave(t)
        self.edge, self.since = edge, t

    def end_round(self, t: float, used: bool = True) -> None:
        if self.round_at is not None:
            self.windows.append((self.round_at, t, used))
        self.round_at = None

    def feed(self, ev: dict[str, Any], t: float) -> None:
        e = ev["event"]
        if e == "attached":
            self.join(str(ev.get("edge", "?")), t)
        elif e == "round_start":
            self.end_round(t)
            self.round_at = t
        elif e == "round_done":
            self.end_round(t)
        elif e == "round_over":
            self.end_round(t, used=bool(ev.get("delivered")))
        elif e == "moved":
            pause = float(ev.get("pause_ms") or 0.0) / 1000
            self.leave(t - pause)
            self.join(str(ev.get("to", "?")), t)
            self.marks.append(Mark(t - pause, "move", f"{ev.get('source', '?')} -> {ev.get('to', '?')} "
                                   f"(round {ev.get('round', '?')} step {ev.get('step', '?')}, "
                                   f"{ev.get('how') or 'moved'})",
                                   pause))
        elif e == "move_failed":
            self.marks.append(Mark(t, "move", f"move to {ev.get('to', '?')} failed: {ev.get('reason', '')}"))
        elif e == "cut":
            self.cut_at = t
        elif e == "link_lost":
            start = self.cut_at if ev.get("cut") and self.cut_at is not None else t - float(ev.get("silent_s") or 0.0)
            self.leave(start)
            self.lost_at, self.cut_at = start, None
            self.marks.append(Mark(start, "drop", f"link to {ev.get('edge', '?')} lost "
                                   f"(round {ev.get('round', '?')} step {ev.get('step', '?')})"))
        elif e == "reattached":
            start = self.lost_at if self.lost_at is not None else t
            self.down.append(Span(start, t, ""))
            self.lost_at = None
            self.join(str(ev.get("edge", "?")), t)
            how = ev.get("how") or ev.get("action")
            self.marks.append(Mark(t, "recovery", f"back on {ev.get('edge', '?')} ({how}) "
                                   f"at step {ev.get('resume_step', '?')}", t - start))
        elif e == "rollback":
            n = int(ev.get("step") or 0) - int(ev.get("to") or 0)
            again = f"{n} step{'' if n == 1 else 's'} again"
            # what a move or a recovery just before cost (a restart-mode move: the whole round)
            if self.marks and self.marks[-1].kind in ("move", "recovery") and t - self.marks[-1].t < 1.0:
                last = self.marks.pop()
                self.marks.append(Mark(last.t, last.kind, f"{last.text}, {again}", last.pause_s))
            else:
                self.marks.append(Mark(t, "recovery", f"back to step {ev.get('to', '?')}: {again}"))
        elif e == "resumed_from_disk":
            self.marks.append(Mark(t, "recovery",
                                   f"resumed from its disk checkpoint at step {ev.get('resume_step', '?')}"))

    def finish(self, t: float) -> None:
        self.end_round(t)
        if self.lost_at is not None:
            self.down.append(Span(self.lost_at, t, ""))
            self.lost_at = None
        self.leave(t)

    def training(self, used: bool = True) -> list[Span]:
        """The round windows (``used``: delivered, or not) cut by where the device was: a
        window's part on each edge."""
        out = []
        for a, b, _ in (w for w in self.windows if w[2] == used):
            for s in self.on:
                lo, hi = max(a, s.start), min(b, s.end)
                if hi > lo:
                    out.append(Span(lo, hi, s.edge))
        return out


def read_timeline(run_dir: Path, *, finished: bool = True) -> Timeline:
    """The run's timeline from its events files. ``finished``: the run is over, so a life
    with no goodbye died (while a run is going, a last life with no goodbye died only if a
    peer saw it go).
    Raises ``FileNotFoundError`` when there is no events file."""
    procs = lives(run_dir)
    if not procs:
        raise FileNotFoundError(f"{run_dir} holds no events-*.jsonl")
    everyone = sorted((ev for ls in procs.values() for life in ls for ev in life), key=lambda ev: ev["ts"])
    rounds = _rounds(procs.get("central", []))
    t0 = rounds[0][1] if rounds else everyone[0]["ts"]
    # A device the central gave up on for a round: its own log may not say (a silent host)
    left: dict[str, list[Mark]] = {}
    for ev in (e for life in procs.get("central", []) for e in life):
        if ev["event"] == "fault" and ev.get("kind") == "device_dropped":
            left.setdefault(str(ev.get("peer")), []).append(Mark(
                ev["ts"] - t0, "drop", f"left round {ev.get('round', '?')} ({ev.get('samples_lost', 0)} samples lost): "
                f"{ev.get('detail', '')}"))
    rows = []
    for name in sorted(procs, key=lambda n: (n != "central", not n.startswith("edge"), n)):
        ls = [life for life in procs[name] if life]
        if not ls:
            continue
        role = next((ev.get("role") for life in ls for ev in life if ev.get("process") == name and ev.get("role")), "?")
        dev = _DeviceRow(name) if role == "device" else None
        alive: list[Span] = []
        marks: list[Mark] = []
        for i, life in enumerate(ls):
            start = life[0]["ts"] - t0
            if i:
                marks.append(Mark(start, "restart", f"{name} started again (life {i + 1})"))
            for ev in life:
                if dev is not None:
                    dev.feed(ev, ev["ts"] - t0)
            last = life[-1]
            end = last["ts"] - t0
            # (a goodbye need not be the last line: an edge says it lost the central after it)
            if not any(ev["event"] in GOODBYES for ev in life):
                nxt = ls[i + 1][0]["ts"] if i < len(ls) - 1 else float("inf")
                seen = _lost_seen(name, last["ts"], nxt, everyone)
                if seen is not None or finished or i < len(ls) - 1:
                    end = (seen if seen is not None else last["ts"]) - t0
                    marks.append(Mark(end, "kill", f"{name} died "
                                      + ("(when a peer saw it go)" if seen else "(its last line)")))
            alive.append(Span(start, end, name))
            if dev is not None:
                dev.finish(end)
        if dev is not None:
            rows.append(Row(name, role, tuple(dev.on), tuple(dev.training()), tuple(dev.down),
                            tuple(sorted(dev.marks + marks + left.get(name, []), key=lambda mk: mk.t)),
                            tuple(dev.training(used=False))))
        else:
            rows.append(Row(name, role, tuple(alive), (), (), tuple(marks)))
    edges = sorted({s.edge for r in rows if r.role == "device" for s in r.on}
                   | {r.name for r in rows if r.role == "edge"})
    return Timeline(t0, tuple((r, a - t0, b - t0) for r, a, b in rounds), tuple(rows), tuple(edges))


def marks_per_round(timeline: Timeline | None, summary: dict[str, Any]) -> dict[int, Counter]:
    """How many marks of each kind fell in each round (a mark before the first round counts
    for it, one after the last for the last). Without a timeline: the migrations only."""
    out: dict[int, Counter] = {}
    if timeline is None or not timeline.rounds:
        for mv in summary.get("migrations", []):
            out.setdefault(mv["round"], Counter())["move"] += 1
        return out
    starts = [(r, a) for r, a, _ in timeline.rounds]
    for row in timeline.rows:
        for mk in row.marks:
            rnd = starts[0][0]
            for r, a in starts:
                if mk.t >= a:
                    rnd = r
            out.setdefault(rnd, Counter())[mk.kind] += 1
    return out

"""Where a device is told to go: move sources.

A ``MoveSource`` answers one question at every step boundary: should the device move now,
and to which edge? The training loop asks its sources in order (``MoveSources``) and
moves at once if one answers; it never needs to know where the answer came from. Sources
here: the config's schedule (``[[mobility.moves]]`` and a round-based trace), the
time-based moves of a trace or of the random-waypoint model (``TimedMoves``), and the
controller's commands (the control port). Another mobility model is one more class with
the same method.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Protocol

from common.config import Drop, Move
from common.mobility_models import TimedMove
from device.control import Position


class MoveSource(Protocol):
    def due(self, round: int, step: int, steps: int) -> str | None:
        """The edge to move to before step ``step`` (of ``steps``) of ``round``, or None.
        Each answer is given once."""


class _Schedule:
    """Items (``Move`` or ``Drop``) due at the step boundary floor(at x steps) of their
    round; each is given once."""

    def __init__(self, items: Iterable) -> None:
        self._items = sorted(items, key=lambda x: (x.round, x.at))
        self._done: set = set()

    def next_due(self, round: int, step: int, steps: int):
        for x in self._items:
            if x.round == round and x not in self._done and x.step(steps) <= step:
                self._done.add(x)
                return x
        return None

    def ahead(self, round: int, step: int, steps: int):
        """The item ``next_due`` will give at the next boundary (before step ``step + 1``),
        without taking it."""
        for x in self._items:
            if x.round == round and x not in self._done and x.step(steps) <= step + 1:
                return x
        return None


class ScheduledMoves(_Schedule):
    """``[[mobility.moves]]``: move before step floor(at x steps) of the round named."""

    def __init__(self, moves: Iterable[Move]) -> None:
        super().__init__(moves)

    def due(self, round: int, step: int, steps: int) -> str | None:
        mv = self.next_due(round, step, steps)
        return mv.to if mv is not None else None

    def upcoming(self, round: int, step: int, steps: int) -> str | None:
        """The edge a move due at the next boundary (before step ``step + 1``) goes to."""
        mv = self.ahead(round, step, steps)
        return mv.to if mv is not None else None


class ScheduledDrops(_Schedule):
    """``[[mobility.drops]]``: a trace of radio losses, each at the step boundary
    floor(at x steps) of its round; each fires once."""

    def __init__(self, drops: Iterable[Drop]) -> None:
        super().__init__(drops)

    def due(self, round: int, step: int, steps: int) -> Drop | None:
        return self.next_due(round, step, steps)


class TimedMoves:
    """Moves at times (seconds since the device's first step boundary: a time-based trace
    or the random-waypoint model), each taken at the first step boundary at or after its
    time. When several came due during one step, only the last counts: the device goes
    straight to the cell it is in now."""

    def __init__(self, moves: Iterable[TimedMove], *, clock: Callable[[], float] = time.monotonic) -> None:
        self._moves = sorted(moves, key=lambda mv: mv.time_s)
        self._next = 0
        self._clock = clock
        self._t0: float | None = None

    def due(self, round: int, step: int, steps: int) -> str | None:
        now = self._clock()
        if self._t0 is None:
            self._t0 = now
        elapsed, to = now - self._t0, None
        while self._next < len(self._moves) and self._moves[self._next].time_s <= elapsed:
            to = self._moves[self._next].to
            self._next += 1
        return to


class CommandedMoves:
    """The mobility controller's ``move`` commands, taken at the next boundary."""

    def __init__(self, pos: Position) -> None:
        self._pos = pos

    def due(self, round: int, step: int, steps: int) -> str | None:
        return self._pos.take_pending()


class MoveSources:
    """Several sources, asked in order."""

    def __init__(self, *sources: MoveSource) -> None:
        self.sources = list(sources)

    def due(self, round: int, step: int, steps: int) -> str | None:
        for src in self.sources:
            to = src.due(round, step, steps)
            if to is not None:
                return to
        return None

    def upcoming(self, round: int, step: int, steps: int) -> str | None:
        """Where a move known now will go at the next boundary, if any (from the sources
        that know ahead: a schedule; the controller's commands start their preconnect
        when the command is accepted, ``ControlServer.on_move``)."""
        for src in self.sources:
            ahead = getattr(src, "upcoming", None)
            to = ahead(round, step, steps) if ahead is not None else None
            if to is not None:
                return to
        return None

"""Where a device is told to go: move sources.

A ``MoveSource`` answers one question at every step boundary: should the device move now,
and to which edge? The training loop asks its sources in order (``MoveSources``) and
moves at once if one answers; it never needs to know where the answer came from. Sources
here: the config's schedule (``[[mobility.moves]]``) and the controller's commands (the
control port). A mobility model (a trace, a random walk over cells) is one more class
with the same method.
"""

from __future__ import annotations

from typing import Iterable, Protocol

from common.config import Drop, Move
from device.control import Position


class MoveSource(Protocol):
    def due(self, round: int, step: int, steps: int) -> str | None:
        """The edge to move to before step ``step`` (of ``steps``) of ``round``, or None.
        Each answer is given once."""


class ScheduledMoves:
    """``[[mobility.moves]]``: move before step floor(at x steps) of the round named."""

    def __init__(self, moves: Iterable[Move]) -> None:
        self._moves = sorted(moves, key=lambda mv: (mv.round, mv.at))
        self._done: set[Move] = set()

    def due(self, round: int, step: int, steps: int) -> str | None:
        for mv in self._moves:
            if mv.round == round and mv not in self._done and mv.step(steps) <= step:
                self._done.add(mv)
                return mv.to
        return None


class ScheduledDrops:
    """``[[mobility.drops]]``: a trace of radio losses, each at the step boundary
    floor(at x steps) of its round; each fires once."""

    def __init__(self, drops: Iterable[Drop]) -> None:
        self._drops = sorted(drops, key=lambda d: (d.round, d.at))
        self._done: set[Drop] = set()

    def due(self, round: int, step: int, steps: int) -> Drop | None:
        for d in self._drops:
            if d.round == round and d not in self._done and d.step(steps) <= step:
                self._done.add(d)
                return d
        return None


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

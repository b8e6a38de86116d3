"""What the device's link gives back to the training loop.

Every call of ``device.link.EdgeLink`` that may meet the edge's decisions (attach, re-attach
after a loss, a move, a step, the round's update) ends in one of these values, never in an
exception: exceptions are left for real errors (a refused device, a wrong key, garbage
from the edge). The loop reads them as "maybe move; step; maybe finish":

- ``TrainFrom``: go on from the step the device is at (nothing to undo).
- ``Rollback``: go on from an earlier step the device kept (0: the round's weights).
- ``Delivered``: the round's update is taken (the edge acknowledged it).
- ``RoundOver``: the round ended for this device without that acknowledgement.
- ``RunOver``: the central ended the run.
- ``NoEdge``: no edge took the device (or its edge took another process's link in its place); it stops.

``read_attach`` is the one place an edge's ``AttachReply`` becomes one of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from common import messages as m


@dataclass(frozen=True, slots=True)
class TrainFrom:
    """Go on from ``step``, the step the device is at (0 when it is between rounds)."""
    step: int


@dataclass(frozen=True, slots=True)
class Rollback:
    """Round ``round`` goes on from ``step`` (0: from the round's weights), not from where
    the device was; ``how`` is the edge's word for where its session came from."""
    round: int
    step: int
    how: str


@dataclass(frozen=True, slots=True)
class Delivered:
    """The edge acknowledged the update of ``round``: the central has it."""
    round: int


@dataclass(frozen=True, slots=True)
class RoundOver:
    """Round ``round`` ended for this device (``delivered``: its update was taken after
    all). ``next`` is the next round's work when it came with the news."""
    round: int
    delivered: bool = False
    next: m.DeviceRound | None = None
    reason: str = ""

    def __str__(self) -> str:
        return f"round {self.round} is over for this device{': ' + self.reason if self.reason else ''}"


@dataclass(frozen=True, slots=True)
class RunOver:
    """The edge relayed the central's Shutdown."""
    reason: str


@dataclass(frozen=True, slots=True)
class NoEdge:
    """No edge would take the device (for ``faults.give_up_s``, or tries at one place
    failed too often), or its edge took another process's connection in its place
    (``Replaced``); ``detail`` says what was tried."""
    detail: str


Outcome = Union[TrainFrom, Rollback, Delivered, RoundOver, RunOver, NoEdge]
# the outcomes that end the device's run, wherever they are met
Ends = (RunOver, NoEdge)


def read_attach(reply: m.AttachReply, *, round: int, step: int, in_round: bool) -> Outcome:
    """What an edge's acceptance means for a device at ``step`` of ``round`` (``in_round``
    False: idle between rounds, where every answer means "wait for a round here").
    ``reply.ok`` is assumed: a refusal is not an outcome."""
    if not in_round:
        return TrainFrom(0)
    if reply.action == "done":
        return RoundOver(round, delivered=True, reason="its update was taken")
    if reply.action == "wait":
        return RoundOver(round, reason=reply.how or "no work here now")
    if reply.round != round:
        return RoundOver(round, reason=f"the edge is in round {reply.round}")
    if reply.resume_step != step:
        return Rollback(round, reply.resume_step, reply.how)
    return TrainFrom(step)

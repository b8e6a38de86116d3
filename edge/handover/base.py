"""The seam between the edge's core and a handover policy: how a session follows a
moving device.

The core (``edge.core.EdgeCore``) owns the session store: every device's entry, its state
in the lifecycle table (``edge.lifecycle``), its link. A policy owns one way of moving a
session between edges, both sides of it: what the edge a device leaves does (the source)
and what the edge it attaches to does (the destination), the peer messages that carry it,
and the deadlines it keeps. The core calls a policy at fixed points, always on its own
thread (so a policy never locks), and never in the middle of a step:

    leaving(e, msg)                  the device leaves, naming the edge it goes to (source)
    link_lost(e)                     the device's link broke while its session trained here
    attached_elsewhere(e, req, source)
                                     the device attached naming another edge (destination);
                                     False: nothing moves, the core starts the round afresh
    peer_handlers()                  the peer messages it takes, by type (either side)
    OPENS, UNASKED                   the peer messages that may open a link another edge
                                     makes to us, and the answers that come unasked on a
                                     link we made (``edge.handover.PEER_FIRST``, ``UNASKED``:
                                     the server and the kept links read them there)
    session_lost_here(e, req)        the device names this edge, whose session is gone
    device_message(ev)               a device's message, before the core's own handling
    outcome(ev)                      a worker's ``PullOutcome`` arrives (destination)
    tick(now)                        deadlines pass
    peer_lost(port)                  a peer edge's link is lost
    round_start(r)                   a round starts here (what was of older rounds goes)

What a policy asks of the session store is the core's own small surface: ``entries``,
``move`` (the one place an entry changes state, checked against the table), ``reply``
(the attach answer to a device), ``fresh`` / ``takes_part`` / ``begin_resume``, the
``forward`` pointers ("it went on to ..."), ``delivered``, ``attach_keys``, and the
ports to the world (``fetcher``, ``central``, ``events``, ``clock``).

A new policy is one file with one subclass and one line in ``edge.handover.POLICIES``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, ClassVar

from common import messages as m
from edge.ports import DeviceMessage, Port, PullOutcome

if TYPE_CHECKING:
    from edge.core import EdgeCore, Entry


class Handover:
    """One policy, both sides. The defaults are those of a move that carries no state:
    a device that leaves is held as for a lost link, and nothing is fetched."""

    name: ClassVar[str] = ""
    # What may be the first message on a link another edge opens to us (each names its
    # sender as ``target``), and what its peer sends back unasked on a kept link we opened
    # (to the core, not to a fetch that waits): each policy adds its own.
    OPENS: ClassVar[tuple[type[m.Message], ...]] = ()
    UNASKED: ClassVar[tuple[type[m.Message], ...]] = ()

    def __init__(self, core: "EdgeCore") -> None:
        self.core = core

    # -- source side -------------------------------------------------------------------------

    def leaving(self, e: "Entry", msg: m.Leaving) -> None:
        """``e`` is ACTIVE and its device said it goes to ``msg.to``; its link is still set
        (and is closed by the policy)."""
        self.core.events.emit("left", device=e.device, round=msg.round, step=msg.step, to=msg.to, offered=False)
        self.core.detach(e)

    def link_lost(self, e: "Entry") -> None:
        """``e`` went from ACTIVE to DETACHED: the device is most likely moving."""

    # -- destination side --------------------------------------------------------------------

    def attached_elsewhere(self, e: "Entry", req: m.AttachRequest, source: str) -> bool:
        """The device attached here naming ``source``'s session, in the current round
        (``req.round``) which it takes part in. True: the policy answers the device (now or
        later); False: no state moves, and the core starts the device's round here."""
        return False

    def session_lost_here(self, e: "Entry", req: m.AttachRequest) -> bool:
        """The device says its session is here at a step past 0, and it is not. True: the
        policy recovers it (answers later); False: the core starts the round again."""
        return False

    def device_message(self, ev: DeviceMessage) -> bool:
        """A device's message, before the core sees it: True if the policy took it (a
        relay forwards the steps of a device whose session is on another edge)."""
        return False

    def outcome(self, ev: PullOutcome) -> None:
        """A worker's outcome that no policy expected (a stale one): nothing to do."""

    # -- both --------------------------------------------------------------------------------

    def peer_handlers(self) -> dict[type, Callable[[Port, m.Message], None]]:
        return {}

    def tick(self, now: float) -> None:
        pass

    def peer_lost(self, port: Port) -> None:
        pass

    def round_start(self, r: int) -> None:
        pass

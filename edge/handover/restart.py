"""Restart: no state moves (the SplitFed-style baseline; ``run.mode = "restart"``, and
mode classic, whose device trains alone). The destination starts the device's round
again from the round's weights; the source is told to let go, off the device's path:

Destination B (core + a worker)                    Source A (its core)
    the device attaches naming A
    answer the device: the round from step 0
    SessionDrop(device, round, proofs) ---------->  proof checked; the session goes unless
                                                    a device link serves it here (it came
                                                    back after the drop was sent)
                               <------------------  SessionReleased (always)

Fedfly uses the same drop when the device is at step 0 (the round's weights are the whole
session) and as the source side of every policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from common import messages as m
from edge.handover.base import Handover
from edge.lifecycle import Event, State
from edge.ports import Port

if TYPE_CHECKING:
    from edge.core import Entry

S, E = State, Event


class Restart(Handover):
    name = "restart"
    OPENS = (m.PeerHello, m.SessionDrop)

    # -- destination side --------------------------------------------------------------------

    def attached_elsewhere(self, e: "Entry", req: m.AttachRequest, source: str) -> bool:
        core = self.core
        if source in core.peers:
            core.fetcher.drop(device=e.device, source=source, round=req.round, proofs=req.proofs)
        return False

    # -- source side -------------------------------------------------------------------------

    def peer_handlers(self) -> dict[type, Callable[[Port, m.Message], None]]:
        return {m.SessionDrop: self.on_drop, m.PeerHello: lambda port, msg: None}

    def on_drop(self, port: Port, msg: m.SessionDrop) -> None:
        """Another edge took the device over without its state (modes restart and classic,
        or fedfly at step 0). A session here that no device link serves goes; a linked
        device is left alone (it came back here after that drop was sent), as is a session
        of a newer round than the drop's. The peer is always answered."""
        core = self.core
        if not core.proven(msg, core.attach_keys.get(msg.device), core.name):
            core.refuse(port, msg.device, "refused")
            return
        try:
            e = core.entries.get(msg.device)
            if e is None or (e.session is not None and e.session.round > msg.round):
                pass  # nothing here, or a drop from an older round: nothing to do
            elif e.port is None and e.state in (S.DETACHED, S.HANDING_OVER, S.DELIVERING):
                core.move(e, E.DROP)
                core.entries.pop(msg.device, None)
            elif e.port is not None:
                core.move(e, E.DROP_LINKED)
            core.point(msg.device, msg.round, msg.target, newer_only=True)
            core.events.emit("session_dropped", device=msg.device, round=msg.round, to=msg.target)
        finally:
            port.post(m.SessionReleased(device=msg.device))

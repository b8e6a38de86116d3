"""The link changing edge: back on one after a loss, or a planned move to another.

Both end on a new link to an edge and give back what that edge's answer means for the
training loop (``device.outcomes``). Where to try and when is the route's
(``device.reconnect``); one try at one edge, and taking the link it gives, is the link's
(``EdgeLink.attach``, ``install``, ``read``). A planned move may have gone ahead of itself:
its ``Leaving`` said a step early (``announce``), or its connection opened early
(``preconnect``, make-before-break).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from common import messages as m
from common import transport
from common.link import Link
from common.security import Identity
from device.outcomes import Ends, NoEdge, Outcome
from device.preconnect import Preconnect
from device.reconnect import Lost, Route, back_route, nearest

if TYPE_CHECKING:
    from device.link import EdgeLink

log = logging.getLogger("device")


class Roam:
    """The moves of one ``EdgeLink`` from edge to edge (it owns this)."""

    def __init__(self, link: EdgeLink) -> None:
        self.link = link
        self._lock = threading.Lock()
        self._pre: Preconnect | None = None  # mobility.preconnect: a link opened ahead of a move
        # ``announce``: the link a Leaving went out on ahead of a move, and that move
        self._announced: tuple[Link, str, int, int] | None = None

    # -- after a loss ------------------------------------------------------------------------------

    def route_back(self, lost_at: float, silent: bool) -> Route:
        """Where and when to try after a loss at ``lost_at`` (``reconnect.back_route``), from
        where the link is now; a radio loss, or else a pending move command, names the edge."""
        lk, faults = self.link, self.link.faults
        return back_route(edges=sorted(lk.cfg.edges), on=lk.edge, lost_at=lost_at, silent=silent,
                          told=lambda: lk.radio.to or lk.pos.peek_pending() or "", policy=faults.reconnect,
                          dead_s=faults.dead_after_s, grace_s=faults.device_grace_s, give_up_s=faults.give_up_s,
                          not_before=lambda: lk.radio.until,
                          nearest=lambda edges: nearest(lk.cfg.edges, edges, creds=lk.creds,
                                                        timeout=faults.dead_after_s))

    def back(self, lost: Lost) -> Outcome:
        """Back on an edge after ``lost``; returns what its answer means for the training
        loop (``TrainFrom``: go on, sending again what was in flight), or ``NoEdge`` after
        ``faults.give_up_s``."""
        lk, faults = self.link, self.link.faults
        t_lost = time.monotonic()
        # when the link really went: the cut itself, or the edge's last sign of life
        last_heard = lk.radio.at if lost.cut else t_lost - lost.silent_s
        old_edge, old = lk.edge, lk.current
        lk.set_link_state("cut" if lost.cut else "reconnecting")
        log.warning("%s: link to %s lost (%s); reconnecting", lk.name, old_edge, lost.detail)
        lk.events.emit("link_lost", edge=old_edge, detail=lost.detail[:200], silent_s=round(lost.silent_s, 3),
                       cut=lost.cut, round=lk.where.round, step=lk.where.step)
        gen = 0

        def each_pass() -> None:  # the radio is back (the route waited out the cut)
            nonlocal old, gen
            if old is not None:
                old.close(drain=False)  # the old connection is of no use
                old = None
            lk.set_link_state("reconnecting")
            gen = lk.radio.gen

        def attempt(edge: str) -> Outcome | None:
            got = lk.attach(edge, "reconnect", timeout=max(2 * faults.dead_after_s, 10.0))
            if isinstance(got, Lost):
                lk.events.emit("reconnect_failed", edge=edge, detail=got.detail[:200])
                return None
            if isinstance(got, Ends):
                return got
            return self._back(edge, *got, lost=lost, old_edge=old_edge, last_heard=last_heard, gen=gen)

        outcome = self.route_back(t_lost, lost.silent_s > 0).search(attempt, each_pass=each_pass)
        return outcome if outcome is not None else NoEdge(f"no edge took {lk.name} for "
                                                          f"{faults.give_up_s:.0f} s")

    def _back(self, edge: str, link: Link, reply: m.AttachReply, *, lost: Lost, old_edge: str, last_heard: float,
              gen: int) -> Outcome:
        """Reattached to ``edge`` after ``lost``: the link installed, the cut served (``gen``:
        the cut it was, if one), the fault reported; what the edge's answer means."""
        lk = self.link
        source = lk.edge
        lk.install(edge, link, reply)
        lk.cut_served(gen)
        if edge == lk.pos.peek_pending():
            lk.pos.take_pending()  # the controller's move is done by this reconnect
        back = time.monotonic()
        lk.events.emit("reattached", edge=edge, source=source, action=reply.action,
                       resume_step=reply.resume_step, how=reply.how, down_s=round(back - last_heard, 3))
        w = lk.where
        replayed = w.step - reply.resume_step if reply.action == "continue" and w.in_round else 0
        lk.report(m.FaultReport(
            kind="peer_silent" if lost.silent_s else "link_lost", process=lk.name, peer=old_edge,
            round=w.round, step=w.step, detail=(lost.detail + (f"; back on {edge} ({reply.how})"
                                                                  if edge != old_edge else ""))[:300],
            detected_s=round(lost.silent_s, 3), down_s=round(back - last_heard, 3),
            replayed=max(0, replayed), recovery=reply.how or reply.action))
        return lk.read(reply)

    # -- a planned move ------------------------------------------------------------------------------

    def announce(self, to: str, round: int, step: int) -> None:
        """A move to ``to`` before ``step`` of ``round`` is planned: say so now, on the link
        we are on (mode fedfly with offers; the training loop calls this once the edge's
        gradient for the step before is in, before the device's own backward pass). The
        edge sends the session to ``to`` at once, after the step it trains, so that it
        travels while the device still computes, and not during the move's pause. The
        move itself (``move``) then only leaves. Nothing else goes on this link: the edge
        closes it."""
        lk = self.link
        link = lk.current
        if link is None or link.silent or lk.mode != "fedfly" or not lk.cfg.mobility.offer or to == lk.edge:
            return  # (a silent link: a radio loss under way, which would swallow it)
        if link.post(m.Leaving(round=round, step=step, to=to)):
            self._announced = (link, to, round, step)
            lk.events.emit("move_announced", to=to, round=round, step=step)

    def move(self, to: str, round: int, step: int) -> Outcome:
        """A planned move at a step boundary: leave the current edge, attach to ``to``
        naming it, on the connection opened ahead for it (``preconnect``) if there is one.
        If ``to`` cannot take the device, the link policy finds it a place (the edge it
        left first). Returns what the training loop does next (``TrainFrom``: go on here),
        as ``EdgeLink.step`` does."""
        lk = self.link
        source = lk.edge
        t0 = time.perf_counter()
        announced, self._announced = self._announced, None
        ahead = self._take_preconnect(to)
        old = lk.current
        lk.set_link_state("reconnecting")
        self._leave(old, to, round, step, announced=old is not None and announced == (old, to, round, step),
                    ahead=ahead is not None)
        got = lk.attach(to, "move", timeout=max(2 * lk.faults.dead_after_s, 10.0), ahead=ahead)
        marks: dict = {"preconnected": True} if ahead is not None else {}
        if isinstance(got, Lost):
            if ahead is not None:
                ahead.discard()
            lk.events.emit("move_failed", to=to, round=round, step=step, reason=got.detail[:200], **marks)
            log.warning("%s: move to %s failed (%s)", lk.name, to, got.detail)
            return self.back(Lost(f"move to {to} failed: {got.detail}"))
        if isinstance(got, Ends):
            return got
        link, reply = got
        lk.install(to, link, reply)
        pause_ms = (time.perf_counter() - t0) * 1000
        lk.report(m.MigrationReport(device=lk.name, source=source, target=to, round=round, step=step,
                                    mode=lk.mode, pause_ms=pause_ms, state_bytes=reply.state_bytes,
                                    transfer_ms=reply.transfer_ms, how=reply.how))
        if ahead is not None:
            marks.update(connect_wait_ms=_ms(ahead.taken_at - t0), connect_ms=ahead.connect_ms)
        lk.events.emit("moved", source=source, to=to, round=round, step=step, pause_ms=pause_ms,
                       state_bytes=reply.state_bytes, transfer_ms=reply.transfer_ms,
                       resume_step=reply.resume_step, how=reply.how, **marks)
        return lk.read(reply)

    def _leave(self, old: Link | None, to: str, round: int, step: int, *, announced: bool, ahead: bool) -> None:
        """Close the link a move leaves. A move ``announced`` a step ahead finds its session
        offered to ``to`` already: what is still queued, the Leaving too, goes first.
        Otherwise, with offers, the last message on it says where the device goes: the
        source sends the session there now, while the device connects (it keeps it until
        the destination confirms); without, the source keeps it until it is pulled. On a
        connection opened ``ahead`` (make-before-break) no ``Leaving`` goes (the attach is
        there at once: the old link's end tells the source the device left, which readies
        the snapshot for the destination's pull), and the old link is closed on another
        thread while the attach goes out on the new one."""
        if old is None:
            return
        if ahead:
            threading.Thread(target=old.close, kwargs={"drain": announced}, name="close-old-link",
                             daemon=True).start()
        elif announced:
            old.close()
        elif self.link.mode == "fedfly" and self.link.cfg.mobility.offer:
            old.close(notice=m.Leaving(round=round, step=step, to=to))
        else:
            old.close(drain=False)

    # -- make-before-break (mobility.preconnect) ----------------------------------------------

    def preconnect(self, edge: str) -> None:
        """Open and secure a connection to ``edge`` in the background while the device
        still trains where it is, for a move expected at the next boundary: the move then
        pays only for the handover of its session. A later call for another edge discards
        this one; an unused connection is closed once older than ``faults.dead_after_s``
        (the edge would hang up on a connection that says nothing for longer)."""
        lk, dead = self.link, self.link.faults.dead_after_s
        with self._lock:
            kept = self._pre
            if edge == lk.edge or (kept is not None and kept.edge == edge and not kept.stale()):
                return
            ep = lk.cfg.edges[edge]
            pre = self._pre = Preconnect(edge, lambda: transport.connect(
                ep.host, ep.port, creds=lk.creds, expect=Identity("edge", edge), peer=f"edge {edge}",
                timeout=dead), max_age_s=dead)
        if kept is not None:
            kept.discard()
        lk.events.emit("preconnect", to=edge, round=lk.where.round, step=lk.where.step)
        pre.start()

    def _take_preconnect(self, edge: str) -> Preconnect | None:
        """The connection opened ahead for a move to ``edge``, if there is one (any other
        is discarded)."""
        with self._lock:
            pre, self._pre = self._pre, None
        if pre is not None and (pre.edge != edge or pre.stale()):
            pre.discard()
            return None
        return pre

    def close(self) -> None:
        """A connection opened ahead and not taken is closed."""
        with self._lock:
            pre, self._pre = self._pre, None
        if pre is not None:
            pre.discard()


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)

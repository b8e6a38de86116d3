"""The device's one link to an edge: attach, re-attach after a loss, resume, move.

The training loop sees four calls: ``wait_round`` (idle until the next round's work),
``step`` (one step's activations out, its gradient back), ``finish`` (the round's update,
until the central has it) and ``move`` (a planned move, on a link opened ahead or not).
Whatever happens to the link underneath (a reset at any byte, an edge that goes silent,
a radio cut by the controller), these calls carry on: the link reconnects with bounded
backoff, to the edge the policy (``faults.reconnect``) names, attaches naming the exact
round and step the device is at, and resends what was in flight. The edge answers a step it
already trained from its kept reply and trains a step it never saw, so **every step is
applied exactly once on both sides**. What reaches the loop is a value
(``device.outcomes``): go on from here; go back to a step the device kept, when the edge
cannot go on from where the device is (its session was lost with its edge; 0: the round
again from its weights: exact, only slower); the round or the run is over; or no edge
takes the device. Exceptions are left for real errors.

Every attach names the edge of the device's last successful attach as the session's
source: that one copy counts, wherever the device turns up next.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from common import messages as m
from common import transport
from common.config import Config
from common.errors import AuthenticationError, PeerSilent, ProtocolError, TransportError
from common.limits import retry
from common.link import Link
from common.security import Credentials, Identity, attach_proofs, edge_key
from device import reconnect
from device.control import Position
from device.outcomes import Delivered, Ends, NoEdge, Outcome, RoundOver, RunOver, TrainFrom, read_attach
from device.preconnect import Preconnect
from device.state import attach_secret

log = logging.getLogger("device")

_LOST = "lost"
_CUT = "cut"
# Consecutive failed tries at one position (an edge that refuses us the same way every
# time) before the device stops instead of looping.
MAX_FAILURES_AT_ONE_PLACE = 20


class AttachRefused(ProtocolError):
    """The edge answered the attach with a refusal."""


@dataclass(frozen=True)
class _Lost:
    """A link that ended, or a try at one that failed: why (``error``: what connecting or
    attaching raised, a refusal too), how long the edge had been silent, whether a cut
    did it."""
    detail: str
    silent_s: float = 0.0
    cut: bool = False
    error: Exception | None = None


@dataclass
class _Where:
    """What the device would name in an attach."""
    round: int = 0
    step: int = 0
    steps: int = 0
    in_round: bool = False  # False: idle between rounds


class EdgeLink:
    def __init__(self, *, cfg: Config, name: str, creds: Credentials, events, pos: Position,
                 report: Callable[[m.Message], None] | None = None) -> None:
        self.cfg = cfg
        self.name = name
        self.creds = creds
        self.events = events
        self.pos = pos
        self.faults = cfg.faults
        self.mode = cfg.mode
        self.edge = cfg.devices[name].edge  # the edge of the last successful attach
        self.last_round = 0                 # last round whose update the central confirmed
        self.where = _Where()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._link: Link | None = None
        self._lock = threading.Lock()
        self._cut_at = 0.0
        self._cut_until = 0.0
        self._cut_to = ""
        self._cut_gen = 0                   # counts cuts: a reattach clears only the cut it served
        self._cut_why = "controller"
        self._held: list[m.Message] = []    # reports to send once linked again
        self.checkpoints: list[int] = []    # steps of the current round the device can go back to
        self.run_hint = ""                  # the run of a checkpoint read from disk (before any attach)
        self.run_name: str | None = None
        self._pre: Preconnect | None = None  # mobility.preconnect: a link opened ahead of a move
        # ``announce``: the link a Leaving went out on ahead of a move, and that move
        self._announced: tuple[Link, str, int, int] | None = None
        # the device's kept state for its edge's part of the round (SCAFFOLD's c_i), sent
        # whenever an edge's session waits for it (``hold_state``, ``AttachReply.client_state``)
        self._state: m.ClientState | None = None
        self._state_asked = 0  # the round an edge asked for it before the loop had it (0: none)
        self.secret = attach_secret(cfg.run.out, name)  # for the proofs of its attaches

    # -- state for status and reports ----------------------------------------------------------

    def _set_link_state(self, state: str) -> None:
        with self.pos.lock:
            self.pos.link = state
            self.pos.edge = self.edge

    def at(self, round: int, step: int, steps: int, *, in_round: bool = True) -> None:
        """Where the device is now (the training loop calls this at every boundary)."""
        self.where = _Where(round, step, steps, in_round)
        with self.pos.lock:
            self.pos.round, self.pos.step, self.pos.steps = round, step, steps

    def report(self, msg: m.Message) -> None:
        """Send a report (move, fault) to the central through the edge; held while unlinked."""
        link = self._link
        if link is None or link.silent or not link.post(msg):
            self._held.append(msg)  # a silenced link (a cut) would swallow it

    # -- connecting ----------------------------------------------------------------------------

    def _request(self, why: str) -> m.AttachRequest:
        w = self.where
        if not w.in_round:
            return m.AttachRequest(device=self.name, kind="join", round=0, step=0, source=self.edge,
                                   last_round=self.last_round, why=why)
        return m.AttachRequest(device=self.name, kind="resume", round=w.round, step=w.step, source=self.edge,
                               last_round=self.last_round, why=why, checkpoints=list(self.checkpoints),
                               run=self.run_name or self.run_hint)

    def _signed(self, req: m.AttachRequest, edge: str) -> m.AttachRequest:
        """``req`` as sent to ``edge``: with that edge's key for the proofs of this device,
        and the proofs, for every edge, that this attach to ``edge`` is real (the
        edge that holds the session hands it over only against one)."""
        return dataclasses.replace(req, edge_key=edge_key(self.secret, edge),
                                   proofs=attach_proofs(self.secret, device=self.name, target=edge,
                                                        edges=sorted(self.cfg.edges)))

    def _attach(self, edge: str, why: str, *, timeout: float,
                ahead: Preconnect | None = None) -> tuple[Link, m.AttachReply] | _Lost | RunOver | NoEdge:
        """Connect to ``edge``, attach, wait for its answer. The attach goes out with the
        handshake's last flight (``transport.connect``'s ``first``), not a round trip after
        it; on a connection opened ``ahead`` of a move (``preconnect``), once that one is
        secured. Returns the link (not yet ours) with the edge's acceptance; ``_Lost`` for
        a try that failed (``error``: what connecting raised, or ``AttachRefused``); or
        ``RunOver`` or ``NoEdge`` (``Ends``)."""
        dead = self.faults.dead_after_s
        try:
            if ahead is None:
                req = self._signed(self._request(why), edge)
                ep = self.cfg.edges[edge]
                conn = transport.connect(ep.host, ep.port, creds=self.creds, expect=Identity("edge", edge),
                                         peer=f"edge {edge}", timeout=min(timeout, dead), first=req)
            else:
                conn = ahead.result(timeout)
                req = self._signed(self._request(why), edge)
        except (TransportError, ProtocolError, TimeoutError) as exc:
            return _Lost(str(exc), error=exc)
        inbox = self._inbox
        link = Link(conn, name=f"edge {edge}", heartbeat_s=self.faults.heartbeat_s, dead_after_s=dead,
                    on_message=lambda l, msg: inbox.put((l, msg)),
                    on_lost=lambda l, exc: inbox.put((l, _LOST)))
        link.start()
        if ahead is not None:
            link.post(req)
        try:
            got = self._await(_is_attach_reply, link=link, limit=timeout, during_attach=True)
        except BaseException:
            link.close(drain=False)
            raise
        if not isinstance(got, m.AttachReply):
            link.close(drain=False)
            return got  # type: ignore[return-value]  # (while attaching: _Lost or Ends only)
        if not got.ok:
            link.close(drain=False)
            refused = AttachRefused(f"{edge} refused {self.name}: {got.reason}")
            return _Lost(str(refused), error=refused)
        return link, got

    def _install(self, edge: str, link: Link, reply: m.AttachReply) -> None:
        old = self._link
        with self._lock:
            self._link = link
            self.edge = edge
            cut_active = time.monotonic() < self._cut_until
        if old is not None and old is not link:
            old.close(drain=False)
        if reply.run_name and self.run_name is None:
            self.run_name = reply.run_name
            self.events.open(os.path.join(self.cfg.run.out, reply.run_name))
        self._set_link_state("attached")
        if reply.client_state:  # before anything else: the session trains no step without it
            if self._state is not None and self._state.round == reply.round:
                link.post(self._state)
            else:
                self._state_asked = reply.round
        held, self._held = self._held, []
        for msg in held:
            link.post(msg)
        if cut_active:  # a cut came while we were attaching: it applies to this link too
            link.go_silent()
            self._inbox.put((link, _CUT))

    def join(self) -> m.AttachReply | RunOver | NoEdge:
        """The first attach, to the config's edge, retried while it is not up yet. A device
        started again while that edge is down (killed, or out of reach) does not wait for
        it for ever: after half of ``run.startup_timeout`` it tries the other edges too. (Not
        sooner: at the testbed's start an edge may take that long to come up on a loaded
        host, and a device must not start somewhere its config does not say.) Returns the
        edge's acceptance, or ``NoEdge`` after ``run.startup_timeout``. Raises
        ``AttachRefused`` or ``AuthenticationError``: a refusal or a wrong key never heals
        by trying again."""
        t0 = time.monotonic()
        home = self.edge
        edges = sorted(self.cfg.edges)
        i = edges.index(home)
        others = edges[i + 1:] + edges[:i]
        tried: list[str] = []
        last: str | None = None

        def attempt() -> m.AttachReply | RunOver | NoEdge | None:
            nonlocal tried, last
            tried = [home] + (others if time.monotonic() - t0 >= self.cfg.run.startup_timeout / 2 else [])
            last = None
            for edge in tried:
                got = self._attach(edge, "start", timeout=self.cfg.run.startup_timeout)
                if isinstance(got, _Lost):
                    if isinstance(got.error, (AttachRefused, AuthenticationError)):
                        raise got.error
                    last = got.detail
                    continue
                if isinstance(got, Ends):
                    return got
                link, reply = got
                self._install(edge, link, reply)
                self.events.emit("attached", edge=edge, home=home, action=reply.action, how=reply.how)
                return reply
            return None

        got = retry(attempt, deadline=t0 + self.cfg.run.startup_timeout)
        return got if got is not None else NoEdge(f"cannot attach to {' or '.join(tried)}: {last}")

    # -- receiving -------------------------------------------------------------------------------

    def _await(self, match: Callable[[m.Message], bool], *, link: Link | None = None, limit: float | None = None,
               during_attach: bool = False) -> m.Message | _Lost | RunOver | NoEdge | RoundOver:
        """The next message from ``link`` (default: ours) that ``match``es; or ``_Lost``
        when that link ends, ``RunOver`` on a Shutdown, ``NoEdge`` on a Replaced (another
        process attached with this device's name), ``RoundOver`` when the device's round
        ends without it (not while attaching)."""
        link = link or self._link
        if link is None:
            return _Lost("no link")
        limit = self.cfg.run.round_timeout if limit is None else limit
        deadline = time.monotonic() + limit
        while True:
            try:
                src, msg = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return _Lost(f"no answer from {link.name} within {limit:.0f} s")
            if src is not link:
                continue  # from a link we left
            if msg is _LOST:
                reason = link.lost_reason
                silent = time.monotonic() - link.conn.last_received if isinstance(reason, PeerSilent) else 0.0
                return _Lost(f"{link.name}: {reason}", silent_s=silent)
            if msg is _CUT:
                return _Lost(f"{link.name}: cut by the {self._cut_why}", cut=True)
            if isinstance(msg, m.Shutdown):
                return RunOver(msg.reason)
            if isinstance(msg, m.Replaced):
                return NoEdge(f"{link.name} took a newer connection of {self.name} in this one's place: "
                              f"another process runs as {self.name}")
            if isinstance(msg, m.ErrorNotice):
                link.close(drain=False)
                return _Lost(f"{link.name} reported {msg.kind}: {msg.detail}")
            if isinstance(msg, m.DoneAck):
                self.last_round = max(self.last_round, msg.round)
            if match(msg):
                return msg
            if during_attach:
                continue
            if isinstance(msg, m.StandBy) and self.where.in_round and msg.round == self.where.round:
                return RoundOver(msg.round, reason=msg.reason)
            if isinstance(msg, m.DeviceRound) and self.where.in_round and \
                    msg.round_plan.round > self.where.round:
                return RoundOver(self.where.round, next=msg, reason="a newer round started")

    # -- losing the link and coming back ----------------------------------------------------------

    def cut(self, seconds: float, to: str, *, why: str = "controller") -> None:
        """A radio loss (the controller's ``drop``, or the config's trace): silence on the
        link now, for ``seconds``, then reconnect to ``to`` (or as the policy says). Called
        from the control thread or the training loop."""
        with self._lock:
            self._cut_gen += 1
            self._cut_at = time.monotonic()
            self._cut_until = self._cut_at + seconds
            self._cut_to = to
            link = self._link
        self._set_link_state("cut")
        self.events.emit("cut", seconds=seconds, to=to, edge=self.edge, by=why)
        self._cut_why = why
        if link is not None:
            link.go_silent()
            self._inbox.put((link, _CUT))

    def _candidates(self, lost_at: float, silent: bool, failed: dict[str, float]) -> list[str]:
        """Edges to try, in order (``reconnect.candidates``), from where the link is now."""
        return reconnect.candidates(
            edges=sorted(self.cfg.edges), on=self.edge, told=self._cut_to or self.pos.peek_pending() or "",
            policy=self.faults.reconnect, lost_at=lost_at, now=time.monotonic(), silent=silent, failed=failed,
            dead_s=self.faults.dead_after_s, grace_s=self.faults.device_grace_s,
            nearest=lambda edges: reconnect.nearest(self.cfg.edges, edges, creds=self.creds,
                                                    timeout=self.faults.dead_after_s))

    def _reattach(self, lost: _Lost) -> Outcome:
        """Back on an edge after ``lost``; returns what its answer means for the training
        loop (``TrainFrom``: go on, sending again what was in flight), or ``NoEdge`` after
        ``faults.give_up_s``."""
        t_lost = time.monotonic()
        # when the link really went: the cut itself, or the edge's last sign of life
        last_heard = self._cut_at if lost.cut else t_lost - lost.silent_s
        old_edge, old = self.edge, self._link
        self._set_link_state("cut" if lost.cut else "reconnecting")
        log.warning("%s: link to %s lost (%s); reconnecting", self.name, old_edge, lost.detail)
        self.events.emit("link_lost", edge=old_edge, detail=lost.detail[:200], silent_s=round(lost.silent_s, 3),
                         cut=lost.cut, round=self.where.round, step=self.where.step)
        failed: dict[str, float] = {}

        def attempt() -> Outcome | None:
            nonlocal old
            while (wait := self._cut_until - time.monotonic()) > 0:
                time.sleep(wait)  # (a cut that comes meanwhile makes the wait longer)
            if old is not None:
                old.close(drain=False)  # the radio is back: the old connection is of no use
                old = None
            self._set_link_state("reconnecting")
            with self._lock:
                gen = self._cut_gen
            for edge in self._candidates(t_lost, lost.silent_s > 0, failed):
                got = self._attach(edge, "reconnect", timeout=max(2 * self.faults.dead_after_s, 10.0))
                if isinstance(got, _Lost):
                    self.events.emit("reconnect_failed", edge=edge, detail=got.detail[:200])
                    failed[edge] = time.monotonic()
                    continue
                if isinstance(got, Ends):
                    return got
                return self._back(edge, *got, lost=lost, old_edge=old_edge, last_heard=last_heard, gen=gen)
            return None

        outcome = retry(attempt, deadline=t_lost + self.faults.give_up_s)
        return outcome if outcome is not None else NoEdge(f"no edge took {self.name} for "
                                                          f"{self.faults.give_up_s:.0f} s")

    def _back(self, edge: str, link: Link, reply: m.AttachReply, *, lost: _Lost, old_edge: str, last_heard: float,
              gen: int) -> Outcome:
        """Reattached to ``edge`` after ``lost``: the link installed, the cut served (``gen``:
        the cut it was, if one), the fault reported; what the edge's answer means."""
        source = self.edge
        self._install(edge, link, reply)
        with self._lock:
            if self._cut_gen == gen:  # a newer cut names its own edge
                self._cut_to = ""
        if edge == self.pos.peek_pending():
            self.pos.take_pending()  # the controller's move is done by this reconnect
        back = time.monotonic()
        self.events.emit("reattached", edge=edge, source=source, action=reply.action,
                         resume_step=reply.resume_step, how=reply.how, down_s=round(back - last_heard, 3))
        w = self.where
        replayed = w.step - reply.resume_step if reply.action == "continue" and w.in_round else 0
        self.report(m.FaultReport(
            kind="peer_silent" if lost.silent_s else "link_lost", process=self.name, peer=old_edge,
            round=w.round, step=w.step, detail=(lost.detail + (f"; back on {edge} ({reply.how})"
                                                                  if edge != old_edge else ""))[:300],
            detected_s=round(lost.silent_s, 3), down_s=round(back - last_heard, 3),
            replayed=max(0, replayed), recovery=reply.how or reply.action))
        return self._read(reply)

    def _read(self, reply: m.AttachReply) -> Outcome:
        """An edge's acceptance as what the training loop does next (``read_attach``)."""
        w = self.where
        outcome = read_attach(reply, round=w.round, step=w.step, in_round=w.in_round)
        if isinstance(outcome, RoundOver) and outcome.delivered:
            self.last_round = max(self.last_round, w.round)
        return outcome

    # -- what the training loop calls ---------------------------------------------------------------

    def _exchange(self, msg: m.Message, match: Callable[[m.Message], bool], *,
                  now: bool = False) -> m.Message | Outcome:
        """Send ``msg`` and return the reply that ``match``es, sending it again on the next
        link after a loss; or the outcome that stopped it (never ``TrainFrom``: that one
        means "send it again"). ``now``: sent on this thread (``Link.send``), not by the
        link's writer; the device waits for the answer anyway."""
        failures = 0
        while True:
            link = self._link
            if link is None or not (link.send(msg) if now else link.post(msg)):
                lost = _Lost("not linked")
            else:
                got = self._await(match)
                if type(got) is not _Lost:
                    return got  # the reply, or the end of the round or run
                failures += 1
                if failures > MAX_FAILURES_AT_ONE_PLACE:
                    return NoEdge(f"{self.name}: {failures} tries at round {self.where.round} step "
                                  f"{self.where.step} failed; last: {got.detail}")
                lost = got
            outcome = self._reattach(lost)
            if type(outcome) is not TrainFrom:
                return outcome

    def hold_state(self, msg: m.ClientState, *, now: bool) -> None:
        """The kept state for the edge's part of round ``msg.round``, sent on every attach
        whose answer asks for it; ``now``: sent on this link too (the edge that sent the
        round waits for it), as it is when this link's attach asked before the loop had it."""
        self._state = msg
        asked, self._state_asked = self._state_asked, 0
        link = self._link
        if (now or asked == msg.round) and link is not None:
            link.post(msg)

    def step(self, round: int, step: int, x: torch.Tensor, y: torch.Tensor) -> m.Gradients | Outcome:
        """One step with the edge: activations out, the gradient at the cut back; or the
        outcome that stopped it (``Rollback``, ``RoundOver``, ``RunOver``, ``NoEdge``)."""
        msg = m.Activations(round=round, step=step, batch={"x": x, "y": y})
        return self._exchange(msg, lambda r: isinstance(r, m.Gradients) and (r.round, r.step) == (round, step),
                              now=True)

    def finish(self, done: m.DeviceDone) -> Outcome:
        """The round's update, until the central has it: ``Delivered``, or the outcome that
        stopped it (as ``step``)."""
        r = done.round
        got = self._exchange(done, lambda msg: isinstance(msg, m.DoneAck) and msg.round == r)
        if isinstance(got, m.DoneAck):
            self.last_round = max(self.last_round, r)
            return Delivered(r)
        return got  # type: ignore[return-value]  # (an outcome: only a DoneAck matches)

    def wait_round(self) -> m.DeviceRound | RunOver | NoEdge:
        """Idle until the next round's work (reconnecting as needed)."""
        while True:
            got = self._await(lambda msg: isinstance(msg, m.DeviceRound), limit=1e9)
            if isinstance(got, _Lost):
                outcome = self._reattach(got)
                if type(outcome) is not TrainFrom:  # idle, only the run's end
                    return outcome  # type: ignore[return-value]
                continue
            if not isinstance(got, m.DeviceRound):
                return got  # type: ignore[return-value]  # (idle: RunOver or NoEdge only)
            if got.round_plan.round > self.last_round:
                return got

    def announce(self, to: str, round: int, step: int) -> None:
        """A move to ``to`` before ``step`` of ``round`` is planned: say so now, on the link
        we are on (mode fedfly with offers; the training loop calls this once the edge's
        gradient for the step before is in, before the device's own backward pass). The
        edge sends the session to ``to`` at once, after the step it trains, so that it
        travels while the device still computes, and not during the move's pause. The
        move itself (``move``) then only leaves. Nothing else goes on this link: the edge
        closes it."""
        link = self._link
        if link is None or link.silent or self.mode != "fedfly" or not self.cfg.mobility.offer or to == self.edge:
            return  # (a silent link: a radio loss under way, which would swallow it)
        if link.post(m.Leaving(round=round, step=step, to=to)):
            self._announced = (link, to, round, step)
            self.events.emit("move_announced", to=to, round=round, step=step)

    def move(self, to: str, round: int, step: int) -> Outcome:
        """A planned move at a step boundary: leave the current edge, attach to ``to``
        naming it, on the connection opened ahead for it (``preconnect``) if there is one.
        If ``to`` cannot take the device, the link policy finds it a place (the edge it
        left first). Returns what the training loop does next (``TrainFrom``: go on here),
        as ``step`` does."""
        source = self.edge
        t0 = time.perf_counter()
        announced, self._announced = self._announced, None
        ahead = self._take_preconnect(to)
        old = self._link
        self._set_link_state("reconnecting")
        self._leave(old, to, round, step, announced=old is not None and announced == (old, to, round, step),
                    ahead=ahead is not None)
        got = self._attach(to, "move", timeout=max(2 * self.faults.dead_after_s, 10.0), ahead=ahead)
        marks: dict = {"preconnected": True} if ahead is not None else {}
        if isinstance(got, _Lost):
            if ahead is not None:
                ahead.discard()
            self.events.emit("move_failed", to=to, round=round, step=step, reason=got.detail[:200], **marks)
            log.warning("%s: move to %s failed (%s)", self.name, to, got.detail)
            return self._reattach(_Lost(f"move to {to} failed: {got.detail}"))
        if isinstance(got, Ends):
            return got
        link, reply = got
        self._install(to, link, reply)
        pause_ms = (time.perf_counter() - t0) * 1000
        self.report(m.MigrationReport(device=self.name, source=source, target=to, round=round, step=step,
                                      mode=self.mode, pause_ms=pause_ms, state_bytes=reply.state_bytes,
                                      transfer_ms=reply.transfer_ms, how=reply.how))
        if ahead is not None:
            marks.update(connect_wait_ms=_ms(ahead.taken_at - t0), connect_ms=ahead.connect_ms)
        self.events.emit("moved", source=source, to=to, round=round, step=step, pause_ms=pause_ms,
                         state_bytes=reply.state_bytes, transfer_ms=reply.transfer_ms,
                         resume_step=reply.resume_step, how=reply.how, **marks)
        return self._read(reply)

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
        elif self.mode == "fedfly" and self.cfg.mobility.offer:
            old.close(notice=m.Leaving(round=round, step=step, to=to))
        else:
            old.close(drain=False)

    def close(self) -> None:
        link = self._link
        if link is not None:
            link.close(drain=False)
        pre, self._pre = self._pre, None
        if pre is not None:
            pre.discard()

    # -- make-before-break (mobility.preconnect) ----------------------------------------------

    def preconnect(self, edge: str) -> None:
        """Open and secure a connection to ``edge`` in the background while the device
        still trains where it is, for a move expected at the next boundary: the move then
        pays only for the handover of its session. A later call for another edge discards
        this one; an unused connection is closed once older than ``faults.dead_after_s``
        (the edge would hang up on a connection that says nothing for longer)."""
        with self._lock:
            kept = self._pre
            if edge == self.edge or (kept is not None and kept.edge == edge and not kept.stale()):
                return
            ep = self.cfg.edges[edge]
            pre = self._pre = Preconnect(edge, lambda: transport.connect(
                ep.host, ep.port, creds=self.creds, expect=Identity("edge", edge), peer=f"edge {edge}",
                timeout=self.faults.dead_after_s), max_age_s=self.faults.dead_after_s)
        if kept is not None:
            kept.discard()
        self.events.emit("preconnect", to=edge, round=self.where.round, step=self.where.step)
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


def _is_attach_reply(msg: m.Message) -> bool:
    return isinstance(msg, m.AttachReply)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)

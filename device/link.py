"""The device's one link to an edge: attach, re-attach after a loss, resume, move.

The training loop sees four calls: ``wait_round`` (idle until the next round's work),
``step`` (one step's activations out, its gradient back), ``finish`` (the round's update,
until the central has it) and ``move`` (a planned move, on a link opened ahead or not).
Whatever happens to the link underneath (a reset at any byte, an edge that goes silent,
a radio cut by the controller), these calls carry on: the link reconnects with bounded
backoff, to the edge the policy (``faults.reconnect``) names (``device.reconnect``: where
next and when; ``device.roam``: the way back, and planned moves), attaches naming the exact
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
from common.link import Link
from common.security import Credentials, Identity, attach_proofs, edge_key
from device.control import Position
from device.outcomes import Delivered, Ends, NoEdge, Outcome, RoundOver, RunOver, TrainFrom, read_attach
from device.preconnect import Preconnect
from device.reconnect import Cut, Lost, first_route
from device.roam import Roam
from device.state import attach_secret

log = logging.getLogger("device")

_LOST = "lost"
_CUT = "cut"
# Consecutive failed tries at one position (an edge that refuses us the same way every
# time) before the device stops instead of looping.
MAX_FAILURES_AT_ONE_PLACE = 20


class AttachRefused(ProtocolError):
    """The edge answered the attach with a refusal."""


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
        self.radio = Cut()                  # the last radio loss (``cut``; Cut(): none yet)
        self._held: list[m.Message] = []    # reports to send once linked again
        self.checkpoints: list[int] = []    # steps of the current round the device can go back to
        self.run_hint = ""                  # the run of a checkpoint read from disk (before any attach)
        self.run_name: str | None = None
        self.roam = Roam(self)              # its moves from edge to edge: after a loss, planned
        # the device's kept state for its edge's part of the round (SCAFFOLD's c_i), sent
        # whenever an edge's session waits for it (``hold_state``, ``AttachReply.client_state``)
        self._state: m.ClientState | None = None
        self._state_asked = 0  # the round an edge asked for it before the loop had it (0: none)
        self.secret = attach_secret(cfg.run.out, name)  # for the proofs of its attaches

    # -- state for status and reports ----------------------------------------------------------

    @property
    def current(self) -> Link | None:
        """The link to the edge in use (None before the first attach)."""
        return self._link

    def set_link_state(self, state: str) -> None:
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

    def attach(self, edge: str, why: str, *, timeout: float,
               ahead: Preconnect | None = None) -> tuple[Link, m.AttachReply] | Lost | RunOver | NoEdge:
        """Connect to ``edge``, attach, wait for its answer. The attach goes out with the
        handshake's last flight (``transport.connect``'s ``first``), not a round trip after
        it; on a connection opened ``ahead`` of a move (``preconnect``), once that one is
        secured. Returns the link (not yet ours) with the edge's acceptance; ``Lost`` for
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
            return Lost(str(exc), error=exc)
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
            return got  # type: ignore[return-value]  # (while attaching: Lost or Ends only)
        if not got.ok:
            link.close(drain=False)
            refused = AttachRefused(f"{edge} refused {self.name}: {got.reason}")
            return Lost(str(refused), error=refused)
        return link, got

    def install(self, edge: str, link: Link, reply: m.AttachReply) -> None:
        old = self._link
        with self._lock:
            self._link = link
            self.edge = edge
            cut_active = time.monotonic() < self.radio.until
        if old is not None and old is not link:
            old.close(drain=False)
        if reply.run_name and self.run_name is None:
            self.run_name = reply.run_name
            self.events.open(os.path.join(self.cfg.run.out, reply.run_name))
        self.set_link_state("attached")
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
        home = self.edge
        route = first_route(edges=sorted(self.cfg.edges), home=home, started=time.monotonic(),
                            startup_s=self.cfg.run.startup_timeout)
        last: str | None = None

        def attempt(edge: str) -> m.AttachReply | RunOver | NoEdge | None:
            nonlocal last
            got = self.attach(edge, "start", timeout=self.cfg.run.startup_timeout)
            if isinstance(got, Lost):
                if isinstance(got.error, (AttachRefused, AuthenticationError)):
                    raise got.error
                last = got.detail
                return None
            if isinstance(got, Ends):
                return got
            link, reply = got
            self.install(edge, link, reply)
            self.events.emit("attached", edge=edge, home=home, action=reply.action, how=reply.how)
            return reply

        got = route.search(attempt)
        return got if got is not None else NoEdge(f"cannot attach to {' or '.join(route.tried)}: {last}")

    # -- receiving -------------------------------------------------------------------------------

    def _await(self, match: Callable[[m.Message], bool], *, link: Link | None = None, limit: float | None = None,
               during_attach: bool = False) -> m.Message | Lost | RunOver | NoEdge | RoundOver:
        """The next message from ``link`` (default: ours) that ``match``es; or ``Lost``
        when that link ends, ``RunOver`` on a Shutdown, ``NoEdge`` on a Replaced (another
        process attached with this device's name), ``RoundOver`` when the device's round
        ends without it (not while attaching)."""
        link = link or self._link
        if link is None:
            return Lost("no link")
        limit = self.cfg.run.round_timeout if limit is None else limit
        deadline = time.monotonic() + limit
        while True:
            try:
                src, msg = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return Lost(f"no answer from {link.name} within {limit:.0f} s")
            if src is not link:
                continue  # from a link we left
            if msg is _LOST:
                reason = link.lost_reason
                silent = time.monotonic() - link.conn.last_received if isinstance(reason, PeerSilent) else 0.0
                return Lost(f"{link.name}: {reason}", silent_s=silent)
            if msg is _CUT:
                return Lost(f"{link.name}: cut by the {self.radio.by}", cut=True)
            if isinstance(msg, m.Shutdown):
                return RunOver(msg.reason)
            if isinstance(msg, m.Replaced):
                return NoEdge(f"{link.name} took a newer connection of {self.name} in this one's place: "
                              f"another process runs as {self.name}")
            if isinstance(msg, m.ErrorNotice):
                link.close(drain=False)
                return Lost(f"{link.name} reported {msg.kind}: {msg.detail}")
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
            at = time.monotonic()
            self.radio = Cut(gen=self.radio.gen + 1, at=at, until=at + seconds, to=to, by=why)
            link = self._link
        self.set_link_state("cut")
        self.events.emit("cut", seconds=seconds, to=to, edge=self.edge, by=why)
        if link is not None:
            link.go_silent()
            self._inbox.put((link, _CUT))

    def cut_served(self, gen: int) -> None:
        """A reattach served cut ``gen``: its edge is spent (a newer cut names its own)."""
        with self._lock:
            if self.radio.gen == gen:
                self.radio = dataclasses.replace(self.radio, to="")

    def read(self, reply: m.AttachReply) -> Outcome:
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
                lost = Lost("not linked")
            else:
                got = self._await(match)
                if type(got) is not Lost:
                    return got  # the reply, or the end of the round or run
                failures += 1
                if failures > MAX_FAILURES_AT_ONE_PLACE:
                    return NoEdge(f"{self.name}: {failures} tries at round {self.where.round} step "
                                  f"{self.where.step} failed; last: {got.detail}")
                lost = got
            outcome = self.roam.back(lost)
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
            if isinstance(got, Lost):
                outcome = self.roam.back(got)
                if type(outcome) is not TrainFrom:  # idle, only the run's end
                    return outcome  # type: ignore[return-value]
                continue
            if not isinstance(got, m.DeviceRound):
                return got  # type: ignore[return-value]  # (idle: RunOver or NoEdge only)
            if got.round_plan.round > self.last_round:
                return got

    def announce(self, to: str, round: int, step: int) -> None:
        """Say on this link, a step ahead, that a move to ``to`` comes (``Roam.announce``)."""
        self.roam.announce(to, round, step)

    def move(self, to: str, round: int, step: int) -> Outcome:
        """A planned move at a step boundary; what the training loop does next, as ``step``
        (``Roam.move``)."""
        return self.roam.move(to, round, step)

    def preconnect(self, edge: str) -> None:
        """Open a connection to ``edge`` ahead of a move expected next (``Roam.preconnect``)."""
        self.roam.preconnect(edge)

    def close(self) -> None:
        link = self._link
        if link is not None:
            link.close(drain=False)
        self.roam.close()


def _is_attach_reply(msg: m.Message) -> bool:
    return isinstance(msg, m.AttachReply)


"""The edge's core: one thread that owns every device's entry and session on this edge.

Concurrency model. Link threads (devices, peer edges, the central) and handover workers
only turn what happens into events on one queue (``submit``); ``run`` takes them one at
a time and is the only code that reads or changes the session table, which therefore has
no lock. Steps are trained beside it, on the edge's one training thread
(``edge.trainer``): while a device's step trains there, the core holds every event that
concerns that device, or no device in particular, and handles them in their order when
the step is done (``_waits``), so nothing can snapshot, move or drop a session while it
trains; events of other devices (an attach, an install, a pull) go on at once, so a
handover never waits for another device's step. Without a trainer (the tests' seam) the
core trains each step itself, between two events. Nothing here blocks on the network:
replies go out through ports, whose writer threads send them.

Every change of an entry's state goes through ``_move``, which checks it against the
table in ``edge.lifecycle``; a message that the table does not allow costs that one
link (a typed error, the link closed), never the edge.
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from common import messages as m
from common.errors import LocalProtocolError, MigrationError, RemoteProtocolError
from common.events import EventLog
from common.plan import RoundPlan
from common.security import proof_holds
from common.models import num_classes, part_keys, state_spec, weights_problem
from edge.migration import buddy_of
from edge.lifecycle import Event, State, TransitionError, allowed, check_transition
from edge.ports import (CentralDown, CentralMessage, CentralPort, CentralUp, DeviceAttach, DeviceLost, DeviceMessage,
                        Fetcher, PeerLost, PeerMessage, Port, PullOutcome, Stop, Tick)
from edge.session import EdgeSession, SparePart
from edge.trainer import StepDone, StepJob, Trainer

log = logging.getLogger("edge")

E, S = Event, State
# A handed-over session may have moved on again before a pull reached it; each hop names
# the next edge. More hops than edges means a loop (a bug): give up and restart the round.
MAX_FORWARD_HOPS = 8
TICK_S = 0.5


@dataclass
class RoundInfo:
    plan: RoundPlan
    weights: dict[str, torch.Tensor]

    @property
    def round(self) -> int:
        return self.plan.round


@dataclass
class Entry:
    """One device on this edge: its state in the lifecycle, its session, its link."""
    device: str
    state: State = State.GONE
    session: EdgeSession | None = None
    port: Port | None = None              # the device's current link, if linked
    update: m.DeviceUpdate | None = None  # DELIVERING: what went to the central
    pending: m.AttachRequest | None = None  # PULLING: the attach to answer
    pull_token: int = 0                   # PULLING: which fetch counts (older outcomes are stale)
    pull_at: float = 0.0                  # PULLING: when the fetch started (its deadline)
    handover_at: float = 0.0              # HANDING_OVER: when the snapshot went
    handed: "Replica | None" = None       # HANDING_OVER: what went (kept as a replica once confirmed)
    hops: int = 0
    attach_at: float = 0.0
    handover: tuple[Port, str, str] | None = None  # HANDING_OVER: (peer port, checksum, target)
    last_round: int = 0                   # the device's word: last round whose update it knows taken
    offer_token: int = 0                  # PULLING: the source said the session is offered to us (this pull's token)
    offered: bool = False                 # HANDING_OVER: by an offer (when the device left), not a pull
    no_offer: int = 0                     # PULLING: this pull (its token) replaces an offer that failed


@dataclass
class Forward:
    round: int
    target: str


@dataclass
class Offer:
    """A session another edge offered us when its device left for here (``OfferNotice``,
    then its ``SessionOffer``): used if the device attaches naming that edge at that
    position, declined otherwise."""
    port: Port
    source: str
    round: int
    step: int
    at: float
    body: m.SessionOffer | None = None
    checksum: str = ""  # from its ``OfferSealed``
    token: int = 0   # the pull of the entry that waits for it (0: none waits yet)
    built: object = None  # ``Fetcher.prepare_offer``'s handle: verified and rebuilt from the seal on

    @property
    def ready(self) -> bool:
        return self.body is not None and bool(self.checksum)

    def matches(self, source: str, round: int, step: int) -> bool:
        """Is this the session a device that names ``source`` at ``round``/``step`` needs?"""
        return (self.source, self.round, self.step) == (source, round, step)


@dataclass
class Replica:
    """A copy of another edge's session, kept for the day that edge dies. Kept as it came
    (verified only when it is used)."""
    source: str
    round: int
    step: int
    meta: dict
    checksum: str
    tensors: dict[str, torch.Tensor]
    edge_key: str = ""  # ``source``'s key for the device's proofs of attachment


@dataclass
class Models:
    """The model layout this edge serves: which keys are the device's and the edge's, for
    the model's cut and for each device that cuts elsewhere (``devices.NAME.split_layer``)."""
    name: str
    split: int
    device_keys: list[str]
    edge_keys: list[str]
    splits: dict[str, int] = field(default_factory=dict)

    def cut(self, device: str) -> int:
        return self.splits.get(device, self.split)

    def keys(self, device: str) -> tuple[list[str], list[str]]:
        """(device part's keys, edge part's keys) of ``device``'s cut."""
        cut = self.cut(device)
        return (self.device_keys, self.edge_keys) if cut == self.split else part_keys(self.name, cut)


class EdgeCore:
    def __init__(self, *, name: str, mode: str, models: Models, seed: int, devices: set[str], peers: set[str],
                 central: CentralPort, fetcher: Fetcher, events: EventLog, spare: SparePart | None = None,
                 clock: Callable[[], float] = time.monotonic, handover_deadline_s: float = 30.0,
                 checkpoint_steps: int = 0, edges: list[str] | None = None, offers: bool = False,
                 trainer: Trainer | None = None, cut_first: bool = True,
                 inbox: queue.SimpleQueue | None = None) -> None:
        """``inbox``: the queue of events the core handles (``submit``), shared with the
        parts built before it that report to it (the central's link, the fetcher, the
        trainer); a new one if None."""
        self.name = name
        self.role = f"edge {name}"
        self.mode = mode
        self.models = models
        self.num_classes = num_classes(models.name)
        self.spec = state_spec(models.name)  # what a round's weights must hold
        self.seed = seed
        self.known_devices = devices
        self.central = central
        self.fetcher = fetcher
        self.events = events
        self.spare = spare
        self.clock = clock
        # a fetch (or a confirmation) not done by then has failed: the device is not kept waiting
        self.handover_deadline_s = handover_deadline_s
        self.peers = peers
        # replication (mode fedfly): every checkpoint_steps steps a copy of each session goes
        # to this edge's buddy; this edge keeps the copies of the edge it is buddy of
        self.edges = sorted(edges or (peers | {name}))
        self.buddy_of = lambda edge: buddy_of(edge, self.edges)
        self.checkpoint_steps = checkpoint_steps if mode == "fedfly" and self.buddy_of(name) else 0
        self.replicas: dict[str, list[Replica]] = {}  # per device, the newest few (oldest first)
        self.entries: dict[str, Entry] = {}
        self.forward: dict[str, Forward] = {}
        self.delivered: dict[str, int] = {}   # device -> last round whose update the central confirmed
        self.current: RoundInfo | None = None
        self.run_name: str | None = None
        self.up = False                        # welcomed by the central
        self.parked: list[DeviceAttach] = []   # attaches that came before the central's welcome
        # device -> the key it gave us in its latest attach: a peer takes its session only
        # with a proof made with it (``common.security.proof_holds``)
        self.attach_keys: dict[str, str] = {}
        self.offers: dict[str, Offer] = {}     # device -> the session its last edge offered us
        self.make_offers = offers and mode == "fedfly"  # mobility.offer: keep links open to offer on
        self.cut_first = cut_first  # training.cut_gradient_first: the cut's gradient before the weights'
        # what another edge may send us, by message type
        self._peer_handlers: dict[type, Callable[[Port, m.Message], None]] = {
            m.SessionPull: self._on_pull, m.SessionInstalled: self._on_installed, m.SessionDrop: self._on_drop,
            m.SessionReplica: self._on_replica, m.ReplicaPull: self._on_replica_pull,
            m.OfferNotice: self._on_offer_notice, m.SessionOffer: self._on_offer, m.OfferSealed: self._on_offer_sealed,
            m.OfferDeclined: self._on_offer_declined, m.SessionReleased: self._on_offer_answered,
            m.PullRefused: self._on_offer_answered, m.PeerHello: lambda port, msg: None}
        self._queue: queue.SimpleQueue = inbox if inbox is not None else queue.SimpleQueue()
        # steps on the training thread (None: trained here, between two events)
        self.trainer = trainer
        self.training: set[str] = set()         # devices whose step is on the trainer now
        self._held: list[object] = []           # events that wait for a step (``_waits``), in order
        self._held_all = False                  # one of them concerns no device: all after it wait too
        self._token = 0
        self._last_status: list[str] | None = None
        self.stopped: Stop | None = None
        self.closing: list[Port] = []  # device links told to shut down (the server waits for them)

    # -- the loop ----------------------------------------------------------------------------

    def submit(self, event: object) -> None:
        """Thread-safe: hand an event to the core."""
        self._queue.put(event)

    def run(self) -> Stop:
        """Handle events until a ``Stop``; returns it."""
        while self.stopped is None:
            try:
                ev = self._queue.get(timeout=TICK_S)
            except queue.Empty:
                ev = Tick()
            self.handle(ev)
        return self.stopped

    def drain(self) -> None:
        """Handle every event queued now (tests drive the core with this)."""
        while True:
            try:
                ev = self._queue.get_nowait()
            except queue.Empty:
                return
            self.handle(ev)

    def handle(self, ev: object) -> None:
        if self._waits(ev):
            self._held.append(ev)
            return
        try:
            if isinstance(ev, StepDone):
                self._on_step_done(ev)
            elif isinstance(ev, DeviceMessage):
                self._on_device_message(ev)
            elif isinstance(ev, DeviceAttach):
                self._on_attach(ev)
            elif isinstance(ev, DeviceLost):
                self._on_device_lost(ev)
            elif isinstance(ev, PeerMessage):
                self._on_peer_message(ev)
            elif isinstance(ev, PeerLost):
                self._on_peer_lost(ev)
            elif isinstance(ev, PullOutcome):
                self._on_pull_outcome(ev)
            elif isinstance(ev, CentralMessage):
                self._on_central(ev.msg)
            elif isinstance(ev, CentralUp):
                self._on_central_up(ev)
            elif isinstance(ev, CentralDown):
                self.events.emit("central_down", detail=ev.detail)
            elif isinstance(ev, Stop):
                self._stop(ev)
            elif isinstance(ev, Tick):
                self._on_tick()
            else:  # pragma: no cover - a wiring bug
                raise LocalProtocolError(f"{self.role}: unknown event {type(ev).__name__}")
        except Exception as exc:  # noqa: BLE001 - one bad event must not stop the edge
            log.exception("%s: handling %s failed", self.role, type(ev).__name__)
            self.events.emit("core_error", on=type(ev).__name__, error=type(exc).__name__, detail=str(exc)[:300])
        self._report_status()

    @staticmethod
    def _scope(ev: object) -> tuple[m.Scope, str | None]:
        """What an event belongs to, as its message declares (``Message.SCOPE``), and for
        a session the device. A type with no declaration counts as the whole edge's."""
        if isinstance(ev, (DeviceMessage, DeviceLost, PullOutcome)):
            msg = getattr(ev, "msg", None)
            scope = msg.SCOPE if msg is not None else m.Scope.SESSION
            return (scope or m.Scope.EDGE), ev.device
        if isinstance(ev, DeviceAttach):
            return m.Scope.SESSION, ev.req.device
        if isinstance(ev, (PeerMessage, CentralMessage)):
            scope = type(ev.msg).SCOPE or m.Scope.EDGE
            device = getattr(ev.msg, "device", None) if scope is m.Scope.SESSION else None
            if scope is m.Scope.SESSION and not isinstance(device, str):
                return m.Scope.EDGE, None  # a session's message that names none: all wait
            return scope, device
        return m.Scope.EDGE, None  # the central's link coming and going

    def _waits(self, ev: object) -> bool:
        """Must ``ev`` wait for a step on the trainer? Yes if it belongs to that step's
        device's session or to the whole edge (the central, a round's start; not a stop or
        a tick), or if such an event already waits (the order of events is kept). What
        belongs to nothing that orders with a step (``Scope.FREE``) never waits."""
        if not self.training or isinstance(ev, (StepDone, Stop, Tick)):
            # a stop only closes links, and a step may hang; a tick's deadlines are of
            # handovers, never of a session that trains (a slow edge's step is over 0.5 s)
            return False
        scope, device = self._scope(ev)
        if scope is m.Scope.FREE:
            return False  # changes nothing: what may follow it must not wait behind it
        if self._held_all:
            return True
        if scope is m.Scope.EDGE:
            self._held_all = True
            return True
        return device in self.training

    def _on_step_done(self, ev: StepDone) -> None:
        self.training.discard(ev.device)
        held, self._held, self._held_all = self._held, [], False
        try:
            e = self.entries.get(ev.device)
            if e is not None and e.session is ev.job.session:
                try:
                    self._stepped(e, ev)
                except (TransitionError, RemoteProtocolError) as exc:
                    self._drop_link(e, RemoteProtocolError(str(exc)))
        finally:  # whatever the step's end raised, what waited for it is handled, in order
            for later in held:
                if self.stopped is not None:
                    break  # as ``run`` would: nothing after a stop is handled
                self.handle(later)  # what must still wait is held again

    # -- table -------------------------------------------------------------------------------

    def _entry(self, device: str) -> Entry:
        e = self.entries.get(device)
        if e is None:
            e = Entry(device)
            self.entries[device] = e
        return e

    def _move(self, e: Entry, event: Event, to: State) -> None:
        """The one place an entry changes state: checked against the table; what belongs
        to the state left behind is cleared here."""
        check_transition(self.role, e.device, e.state, event, to)
        was = e.state
        if to != was:
            self.events.emit("session_state", device=e.device, state=to.value, was=was.value, on=event.value)
            if was is S.HANDING_OVER:
                e.handover = None       # a late confirmation is refused from now on
                if to is not S.GONE and e.session is not None:
                    e.session.unshare()  # what went may still be on its way: train on copies
            elif was is S.PULLING:
                e.pull_token = 0        # a late outcome of the fetch is stale from now on
                e.pending = None
            elif was is S.DELIVERING:
                e.update = None         # the update is the central link's to deliver now
        e.state = to
        if to in (S.GONE, S.IDLE):
            e.session = None
        if to is S.GONE and e.port is None:
            self.entries.pop(e.device, None)

    def _report_status(self) -> None:
        linked = sorted(d for d, e in self.entries.items() if e.port is not None)
        if linked != self._last_status and self.up:
            self._last_status = linked
            self.central.send(m.EdgeStatus(edge=self.name, attached=linked))

    # -- the central -------------------------------------------------------------------------

    def _on_central_up(self, ev: CentralUp) -> None:
        first = not self.up and self.run_name is None
        self.run_name = ev.run_name
        self.up = True
        self._last_status = None  # send it again: the central may have lost it
        self.events.emit("central_up", run=ev.run_name, first=first)
        parked, self.parked = self.parked, []
        for att in parked:
            self._on_attach(att)

    def _on_central(self, msg: m.Message) -> None:
        if isinstance(msg, m.RoundStart):
            self._on_round_start(msg)
        elif isinstance(msg, m.UpdateAck):
            self._on_update_acked(msg)
        elif isinstance(msg, m.Shutdown):
            self._stop(Stop(reason=msg.reason))
        else:
            raise RemoteProtocolError(f"{self.role}: the central sent {msg.TYPE}, which it never should")

    def _stop(self, stop: Stop) -> None:
        if self.stopped is not None:
            return
        self.stopped = stop
        self.events.emit("shutdown", reason=stop.reason)
        for e in self.entries.values():
            if e.port is not None:
                e.port.close(notice=m.Shutdown(reason=stop.reason))
                self.closing.append(e.port)

    def _on_round_start(self, msg: m.RoundStart) -> None:
        plan = msg.round_plan
        if problem := weights_problem(msg.weights, self.spec):  # before any session is built from them
            raise RemoteProtocolError(f"{self.role}: RoundStart of round {plan.round}: {problem}")
        if self.current is not None and plan.round <= self.current.round:
            return  # sent again after we rejoined: we have it
        self.current = RoundInfo(plan, msg.weights)
        self.models.splits.update(plan.cuts)  # cuts chosen at start (split_layer = "auto")
        r = plan.round
        self.central.round_started(r)
        self.replicas = {d: kept for d, reps in self.replicas.items() if (kept := [x for x in reps if x.round >= r])}
        self.forward = {d: f for d, f in self.forward.items() if f.round >= r}
        for d, o in list(self.offers.items()):
            if o.round < r:
                self._decline(d)
        if self.make_offers:
            for peer in sorted(self.peers):
                self.fetcher.offer_link(peer)  # links to offer sessions on, opened now (in the background)
        self.events.emit("round_start", round=r, participants=list(plan.participants))
        for e in list(self.entries.values()):
            try:
                self._entry_round_start(e, r)
            except Exception as exc:  # noqa: BLE001 - one entry's bug must not cost the others their round
                log.exception("%s: round %d start for %s failed", self.role, r, e.device)
                self.events.emit("core_error", on="RoundStart", device=e.device, error=type(exc).__name__,
                                 detail=str(exc)[:300])

    def _entry_round_start(self, e: Entry, r: int) -> None:
        if e.session is not None and e.session.round >= r:
            return
        if e.state is S.PULLING and e.pending is not None and e.pending.round >= r:
            self._resolve_pending(e)  # it was waiting for this very round
            return
        old_round = e.session.round if e.session is not None else (e.pending.round if e.pending else 0)
        if e.port is None:
            self._move(e, E.ROUND_START, S.GONE)
            return
        answered = e.state is S.PULLING
        if answered:
            # The device waits for an answer to its attach: its round is over.
            self._reply(e, action="wait", round=old_round, how="round over")
        e.pending = None
        if self._takes_part(e.device, r):
            self._start_session(e, E.ROUND_START)
        else:
            self._move(e, E.ROUND_START, S.IDLE)
            e.session = None
            if old_round and not answered:
                e.port.post(m.StandBy(round=old_round, reason=f"round {old_round} is over; "
                                      f"{e.device} is not in round {r}"))

    def _takes_part(self, device: str, r: int) -> bool:
        info = self.current
        return (info is not None and info.round == r and device in info.plan.participants
                and self.delivered.get(device, 0) < r)

    def _on_update_acked(self, msg: m.UpdateAck) -> None:
        self.central.acked(msg.device, msg.round)
        self.delivered[msg.device] = max(self.delivered.get(msg.device, 0), msg.round)
        e = self.entries.get(msg.device)
        if e is None or e.state is not S.DELIVERING or e.update is None or e.update.round != msg.round:
            return
        e.update = None
        if e.port is not None:
            e.port.post(m.DoneAck(round=msg.round))
            self._move(e, E.UPDATE_ACKED, S.IDLE)
            e.session = None
        else:
            self._move(e, E.UPDATE_ACKED, S.GONE)

    # -- devices: attach ---------------------------------------------------------------------

    def _reply(self, e: Entry, *, ok: bool = True, reason: str = "", action: str = "wait", round: int = 0,
               resume_step: int = 0, how: str = "", state_bytes: int = 0, transfer_ms: float = 0.0) -> None:
        assert e.port is not None
        e.port.post(m.AttachReply(ok=ok, reason=reason, run_name=self.run_name or "", mode=self.mode, action=action,
                                  round=round, resume_step=resume_step, how=how, state_bytes=state_bytes,
                                  transfer_ms=transfer_ms))

    def _on_attach(self, ev: DeviceAttach) -> None:
        req = ev.req
        if not self.up:
            self.parked.append(ev)
            return
        if req.device not in self.known_devices:
            ev.port.post(m.AttachReply(ok=False, reason=f"{req.device!r} is not a device of this testbed",
                                       run_name="", mode=self.mode, action="wait", round=0, resume_step=0, how="",
                                       state_bytes=0, transfer_ms=0.0))
            ev.port.close()
            return
        e = self._entry(req.device)
        if e.port is not None and e.port is not ev.port:
            e.port.close(notice=m.Shutdown(reason="replaced by a newer connection of the same device"), drain=False)
        e.port = ev.port
        e.attach_at = ev.at or self.clock()
        e.last_round = max(e.last_round, req.last_round)
        if req.edge_key:
            self.attach_keys[req.device] = req.edge_key
        self.events.emit("attached", device=req.device, kind=req.kind, why=req.why, source=req.source,
                         round=req.round, step=req.step, state=e.state.value)
        if req.kind == "resume" and req.run and self.run_name and req.run != self.run_name:
            # state of another run (left on a device's disk by a crash): of no use here
            self.events.emit("other_run", device=req.device, run=req.run)
            self._attach_join(e)
        elif req.kind == "join":
            self._attach_join(e)
        else:
            self._attach_resume(e, req)

    def _attach_join(self, e: Entry) -> None:
        """The device holds no round state: the current round from its start if it takes
        part (a restarted device does the whole round again, exactly), else wait."""
        if e.state is S.DELIVERING:
            self._move(e, E.JOIN, S.DELIVERING)
            self._reply(e, action="wait", how="delivering")
            return
        info = self.current
        self._reply(e, action="wait", how="join")
        if info is not None and self._takes_part(e.device, info.round) and e.last_round < info.round:
            old = e.session
            if old is not None and old.round == info.round and old.step > 0:
                # a device process started again with nothing: its round again from the start
                self.central.send(m.FaultReport(kind="restarted", process=e.device, peer=self.name, round=info.round,
                                                step=old.step, detail="the device process started again without "
                                                "a checkpoint: its round again from the round's weights",
                                                detected_s=0.0, down_s=0.0, replayed=old.step, recovery="restart",
                                                samples_lost=0))
            if e.state is S.PULLING:
                e.pull_token = 0  # the fetch no longer counts
            e.pending = None
            self._start_session(e, E.JOIN)
        else:
            self._move(e, E.JOIN, S.IDLE)
            e.session = None

    def _attach_resume(self, e: Entry, req: m.AttachRequest) -> None:
        event = E.RESUME_HERE if req.source == self.name else E.RESUME_FROM
        r, s = req.round, req.step
        if e.state is S.DELIVERING:
            self._move(e, event, S.DELIVERING)
            upd = e.update
            if upd is not None and (upd.round, upd.steps) == (r, s):
                # It lost our DoneAck: it sends its update again and gets the ack once the
                # central confirms.
                self._reply(e, action="continue", round=r, resume_step=s, how="delivering")
            else:
                # Its round's update is on its way from here; whatever the device holds of
                # that round is not what counts.
                self._reply(e, action="wait", round=r, how="delivering")
            return
        if e.state is S.PULLING:
            self._move(e, event, S.PULLING)  # the fetch goes on; its outcome answers this link
            e.pending = req
            return
        ours = e.session
        if ours is not None and ours.round == r and ours.position_matches(s) and (
                event is E.RESUME_HERE or e.state is S.HANDING_OVER):
            # Its session is here: a link that came back (or a device that returned before
            # our handover finished; the late confirmation will be refused).
            if e.state is S.HANDING_OVER:
                self.events.emit("handover_cancelled", device=e.device, round=r, step=s)
                e.handover = None
            self._move(e, event, S.ACTIVE)
            self._reply(e, action="continue", round=r, resume_step=s, how="here")
            return
        self._begin_resume(e, event, req)

    def _begin_resume(self, e: Entry, event: Event, req: m.AttachRequest) -> None:
        """The session is not here (or not where the device is): fetch it, rebuild it from
        the round's weights, or tell the device its round is over."""
        r, s = req.round, req.step
        info = self.current
        fwd = self.forward.get(e.device)
        if self.delivered.get(e.device, 0) >= r:
            self._move(e, event, S.IDLE)
            e.session = None
            self._reply(e, action="done", round=r, how="delivered")
            return
        if info is None or info.round < r:
            # We have not been told of round r yet (our link to the central lags): wait for it.
            self._move(e, event, S.PULLING)
            e.pending = req
            e.pull_token = 0
            self.events.emit("awaiting_round", device=e.device, round=r)
            return
        if info.round > r or not self._takes_part(e.device, r):
            self._move(e, event, S.IDLE)
            self._reply(e, action="wait", round=r, how="round over")
            if self._takes_part(e.device, info.round):
                self._start_session(e, E.ROUND_START)
            return
        source = req.source
        if event is E.RESUME_HERE and fwd is not None and fwd.round == r:
            source = fwd.target  # we handed it on; the device missed the other edge's reply
        needs_state = self.mode == "fedfly" and s > 0
        if source != self.name and needs_state:
            self._pull(e, event, req, source)
            return
        if source != self.name and source in self.peers:
            # No state to fetch; tell the old edge to let go (not on the device's path).
            self.fetcher.drop(device=e.device, source=source, round=r, proofs=req.proofs)
        # Modes restart and classic keep no state to fetch (restart: the round from its
        # weights; classic: the device trains alone); fedfly at step 0: the round's weights
        # are the whole session. Here with no session at all: the round again, exactly.
        resume = 0 if self.mode == "restart" else s
        how = "fresh"
        if source == self.name and needs_state:
            if self.checkpoint_steps and req.checkpoints:
                # The device went back (a process restarted from its disk checkpoint), or
                # our session is gone: the buddy's copy at a step the device holds.
                self._move(e, event, S.PULLING)
                e.pending, e.hops = req, 0
                self._pull_failed(e, source=self.name, detail=f"no session of {e.device} at step {s} here")
                return
            resume, how = 0, "restart"  # the device says its session is here, and it is not
        self._fresh(e, event, info, resume)
        self._reply(e, action="continue", round=r, resume_step=resume, how=how)

    def _pull(self, e: Entry, event: Event, req: m.AttachRequest, source: str) -> None:
        self._move(e, event, S.PULLING)
        self._token += 1
        e.pull_token = self._token
        e.pending = req
        e.hops = 0
        e.pull_at = self.clock()
        o = self.offers.get(e.device)
        if o is not None and o.matches(source, req.round, req.step):
            # it left there for here: its session is on its way (or here) already
            o.token = e.pull_token
            self.events.emit("offer_awaited", device=e.device, source=source, round=o.round, step=o.step,
                             arrived=o.ready)
            if o.ready:
                self._take_offer(e, o)
            return
        if o is not None:
            self._decline(e.device)
        self._pull_again(e, source)

    def _pull_again(self, e: Entry, source: str) -> None:
        """Fetch the session the PULLING entry's attach names from ``source`` (its deadline
        starts now; the fetch counts under the entry's current token)."""
        req = e.pending
        assert req is not None
        e.pull_at = self.clock()
        self.fetcher.pull(device=e.device, source=source, round=req.round, step=req.step, token=e.pull_token,
                          proofs=req.proofs)

    def _prepare(self, device: str, o: Offer) -> object:
        assert o.body is not None
        return self.fetcher.prepare_offer(device=device, source=o.source, offer=o.body, checksum=o.checksum)

    def _take_offer(self, e: Entry, o: Offer) -> None:
        assert o.body is not None
        del self.offers[e.device]
        if o.built is None:
            o.built = self._prepare(e.device, o)
        self.fetcher.take_offer(device=e.device, source=o.source, token=e.pull_token, offer=o.body,
                                checksum=o.checksum, port=o.port, since=o.at, prepared=o.built)

    def _decline(self, device: str, *, why: str = "declined") -> None:
        """Forget the offer for ``device`` and tell its source (which keeps the session for
        a pull). An entry that waited for it pulls instead."""
        o = self.offers.pop(device)
        o.port.post(m.OfferDeclined(device=device, round=o.round, step=o.step))
        self._offer_lost(device, o, why)

    def _offer_lost(self, device: str, o: Offer, why: str) -> None:
        self.events.emit("offer_dropped", device=device, source=o.source, round=o.round, step=o.step, why=why)
        if o.built is not None:
            # its rebuild took the spare part; if it has not taken it yet, this refill does
            # nothing and the next install builds its own part (rare; a refill started at the
            # end of every rebuild would instead compete with the install that follows)
            self._refill()
        e = self.entries.get(device)
        if e is not None and self._waits_on(e, o):
            e.offer_token = 0
            e.no_offer = e.pull_token
            self._pull_again(e, o.source)

    @staticmethod
    def _waits_on(e: Entry, o: Offer) -> bool:
        """Is ``e``'s current fetch waiting for offer ``o``?"""
        return bool(o.token) and e.state is S.PULLING and e.pull_token == o.token and e.pending is not None

    def _resolve_pending(self, e: Entry) -> None:
        """A PULLING entry that waited for the round's weights: decide again, now."""
        req = e.pending
        assert req is not None
        if e.port is None:
            self._move(e, E.ROUND_START, S.GONE)
            return
        self._begin_resume(e, E.PULLED, req)

    def _fresh(self, e: Entry, event: Event, info: RoundInfo, step: int) -> None:
        e.session = self._new_session(e.device, info)
        e.session.step = step
        self._move(e, event, S.ACTIVE if e.port is not None else S.DETACHED)

    def _new_session(self, device: str, info: RoundInfo) -> EdgeSession:
        edge_state = None if self.mode == "classic" else {k: info.weights[k] for k in self.models.keys(device)[1]}
        return EdgeSession(device=device, round=info.round, mode=self.mode, model=self.models.name,
                           split_layer=self.models.cut(device), lr=info.plan.lr, momentum=info.plan.momentum,
                           part_state=edge_state, seed=self.seed, prox_mu=info.plan.prox_mu)

    def _start_session(self, e: Entry, event: Event) -> None:
        """A fresh session of the current round, and the round's work sent to the device."""
        info = self.current
        assert info is not None and e.port is not None
        self._fresh(e, event, info, 0)
        dev_keys, edge_keys = self.models.keys(e.device)
        keys = dev_keys + (edge_keys if self.mode == "classic" else [])
        e.port.post(m.DeviceRound(plan=info.plan.to_wire(), weights={k: info.weights[k] for k in keys}))

    def _on_pull_outcome(self, ev: PullOutcome) -> None:
        e = self.entries.get(ev.device)
        if e is None or e.state is not S.PULLING or e.pull_token != ev.token or e.pending is None:
            if ev.session is not None:
                self.events.emit("pull_stale", device=ev.device, source=ev.source)
                self._unconfirmed(ev)
            return
        req = e.pending
        r, s = req.round, req.step
        if ev.offered and ev.session is None:
            # the offered copy failed its checks (the source was told): pull it instead
            self.events.emit("offer_failed", device=e.device, source=ev.source, detail=ev.error[:200])
            e.no_offer = e.pull_token
            self._pull_again(e, ev.source)
            return
        if ev.replica:
            if ev.session is not None and ev.session.step in req.checkpoints and ev.session.step <= s:
                self._install_replica(e, ev.session, source=ev.source, state_bytes=ev.state_bytes,
                                      transfer_ms=ev.transfer_ms)
            else:
                self._pull_failed(e, source=ev.source, detail=ev.error or (ev.refused.reason if ev.refused
                                                                           else "replica at the wrong step"),
                                  replica_tried=True)
            return
        if ev.session is not None and not ev.session.position_matches(s):
            # The device attached again, at another step, while this copy was on its way:
            # it is not the one that counts. Ask again where the device says it is.
            self.events.emit("pull_superseded", device=e.device, source=ev.source, round=r, step=s,
                             got_step=ev.session.step)
            self._unconfirmed(ev)
            self._begin_resume(e, E.PULLED, req)
            return
        if ev.session is not None:
            self._install_pulled(e, ev.session, source=ev.source, state_bytes=ev.state_bytes,
                                 transfer_ms=ev.transfer_ms, offered=ev.offered)
            if ev.confirm is not None:  # after the device's answer: the source's release is not on its path
                port, installed, _ = ev.confirm
                port.post(installed)
            return
        refused = ev.refused
        if refused is not None and refused.offered and not ev.replica and e.no_offer == e.pull_token \
                and e.hops < MAX_FORWARD_HOPS:
            # the offer failed here, and the source has not heard it yet (the news is on the
            # other link): ask again
            e.hops += 1
            self._pull_again(e, ev.source)
            return
        if refused is not None and refused.offered and not ev.replica and e.no_offer != e.pull_token:
            # its source offered it to us when the device left: that copy is on its way
            o = self.offers.get(e.device)
            if o is not None and o.matches(ev.source, r, s):
                o.token = e.pull_token
                if o.ready:
                    self._take_offer(e, o)
            else:
                e.offer_token = e.pull_token  # its notice is still on its way
            self.events.emit("offer_awaited", device=e.device, source=ev.source, round=r, step=s,
                             arrived=o is not None and o.ready, after_pull=True)
            return
        linked = S.IDLE if e.port is not None else S.GONE
        if refused is not None and refused.delivered:
            e.pending = None
            self._move(e, E.PULLED, linked)
            if e.port is not None:
                self._reply(e, action="done", round=r, how="delivered")
            return
        if refused is not None and refused.moved_to == self.name and e.session is not None and \
                e.session.round == r and e.session.position_matches(s):
            # It moved here earlier and we still hold it: the pointer led back to us.
            self._install_pulled(e, e.session, source=self.name, state_bytes=0, transfer_ms=0.0)
            return
        if refused is not None and refused.moved_to and refused.moved_to != self.name and e.hops < MAX_FORWARD_HOPS:
            e.hops += 1
            self._pull_again(e, refused.moved_to)
            return
        # The session cannot be had (its edge is gone or refuses): the round again from its
        # weights here. Exact, at the cost of the steps done.
        detail = ev.error or (refused.reason if refused is not None else "unknown")
        self._pull_failed(e, source=ev.source, detail=detail)

    def _unconfirmed(self, ev: PullOutcome) -> None:
        """An offered session that was not installed: its source is told, and keeps it."""
        if ev.confirm is not None:
            port, _, declined = ev.confirm
            port.post(declined)
            self._refill()

    def _refill(self) -> None:
        """The spare part was taken: another one, later (``SparePart.refill_soon``)."""
        if self.spare is not None:
            self.spare.refill_soon()

    def _install_pulled(self, e: Entry, session: EdgeSession, *, source: str, state_bytes: int,
                        transfer_ms: float, offered: bool = False) -> None:
        req = e.pending
        assert req is not None
        r, s = req.round, req.step
        e.pending = None
        e.session = session
        if e.device in self.offers:
            self._decline(e.device, why="pulled meanwhile")  # it came the other way first
        self.events.emit("migrated_in", device=e.device, source=source, round=r, step=s,
                         state_bytes=state_bytes, transfer_ms=transfer_ms, offered=offered)
        if e.port is None:
            self._move(e, E.PULLED, S.DETACHED)
            session.prepare_snapshot()
        else:
            self._move(e, E.PULLED, S.ACTIVE)
            self._reply(e, action="continue", round=r, resume_step=s, how="pulled" if source != self.name else "here",
                        state_bytes=state_bytes, transfer_ms=transfer_ms)
        if source != self.name:
            self._refill()  # after the answer, and later still (``REFILL_DELAY_S``)

    def _pull_failed(self, e: Entry, *, source: str, detail: str, replica_tried: bool = False) -> None:
        req = e.pending
        assert req is not None
        r, s = req.round, req.step
        info = self.current
        if not replica_tried and self.checkpoint_steps and req.checkpoints and info is not None and info.round == r:
            # The session died with its edge: a copy at a step the device can go back to.
            lost = source or req.source
            rep = self._replica_at(e.device, r, [c for c in req.checkpoints if c <= s])
            if rep is not None:
                try:  # from copies: the session adopts what it is built from, and the replica stays kept
                    session = EdgeSession.from_snapshot(rep.meta, {k: v.clone() for k, v in rep.tensors.items()},
                                                        rep.checksum,
                                                        expect_model=self.models.name, expect_split=self.models.cut(e.device),
                                                        spare=self.spare)
                except MigrationError as exc:
                    self.events.emit("replica_damaged", device=e.device, detail=str(exc)[:200])
                else:
                    self.events.emit("pull_failed", device=e.device, source=source, round=r, step=s, detail=detail)
                    self._install_replica(e, session, source=self.name, state_bytes=0, transfer_ms=0.0)
                    return
            keeper = self.buddy_of(lost)
            if keeper is not None and keeper != self.name and keeper in self.peers:
                self.events.emit("pull_failed", device=e.device, source=source, round=r, step=s, detail=detail)
                self._token += 1
                e.pull_token = self._token
                e.pull_at = self.clock()
                self.fetcher.pull_replica(device=e.device, source=keeper, round=r, steps=list(req.checkpoints),
                                          token=e.pull_token, proofs=req.proofs)
                return
        self.events.emit("pull_failed", device=e.device, source=source, round=r, step=s, detail=detail)
        self.central.send(m.FaultReport(kind="handover_failed", process=self.name, peer=source, round=r, step=s,
                                        detail=detail[:200], detected_s=0.0, down_s=0.0, replayed=s,
                                        recovery="restart", samples_lost=0))
        e.pending = None
        info = self.current
        if info is None or info.round != r or not self._takes_part(e.device, r):
            self._move(e, E.PULLED, S.IDLE if e.port is not None else S.GONE)
            if e.port is not None:
                self._reply(e, action="wait", round=r, how="round over")
            return
        self._fresh(e, E.PULLED, info, 0)
        if e.port is not None:
            self._reply(e, action="continue", round=r, resume_step=0, how="restart")

    def _install_replica(self, e: Entry, session: EdgeSession, *, source: str, state_bytes: int,
                         transfer_ms: float) -> None:
        """The device and the session go back to the replica's step; the steps since are
        trained again (same batches, same seeds: the same result)."""
        req = e.pending
        assert req is not None
        r, s, c = req.round, req.step, session.step
        self.central.send(m.FaultReport(kind="handover_failed", process=self.name, peer=req.source, round=r, step=s,
                                        detail=f"session of {e.device} lost with {req.source}; replica of step {c} "
                                               f"from {source}", detected_s=0.0, down_s=0.0, replayed=s - c,
                                        recovery="replica", samples_lost=0))
        self.events.emit("replica_installed", device=e.device, source=source, round=r, step=c, device_step=s)
        e.pending = None
        e.session = session
        if e.port is None:
            self._move(e, E.PULLED, S.DETACHED)
            return
        self._move(e, E.PULLED, S.ACTIVE)
        self._reply(e, action="continue", round=r, resume_step=c, how="replica", state_bytes=state_bytes,
                    transfer_ms=transfer_ms)

    def _on_tick(self) -> None:
        """Deadlines of handovers: a fetch or a confirmation that never comes (a peer that
        answers heartbeats but not us) must not hold a device forever."""
        now = self.clock()
        for e in list(self.entries.values()):
            if e.state is S.PULLING and e.pull_token and now - e.pull_at > self.handover_deadline_s:
                self.events.emit("pull_deadline", device=e.device, waited_s=round(now - e.pull_at, 3))
                e.pull_token = 0  # a late outcome is stale
                self._pull_failed(e, source=e.pending.source if e.pending else "", detail=(
                    f"no outcome within {self.handover_deadline_s:g} s"))
            elif e.state is S.HANDING_OVER and now - e.handover_at > self.handover_deadline_s:
                e.handover = None
                self._move(e, E.HANDOVER_FAILED, S.DETACHED)
                self.events.emit("handover_unconfirmed", device=e.device, detail="no confirmation in time")
        for d, o in list(self.offers.items()):
            e = self.entries.get(d)
            waited_on = e is not None and self._waits_on(e, o)
            if (o.token and not waited_on) or (not o.token and now - o.at > self.handover_deadline_s):
                self._decline(d)  # its device went elsewhere, or never came

    # -- devices: steps, updates, loss ---------------------------------------------------------

    def _on_device_message(self, ev: DeviceMessage) -> None:
        e = self.entries.get(ev.device)
        msg = ev.msg
        if isinstance(msg, (m.MigrationReport, m.FaultReport)):
            self.central.send(msg)
            return
        if e is None or e.port is not ev.port:
            return  # from a link that was replaced: stale
        try:
            if isinstance(msg, m.Activations):
                self._on_step(e, msg)
            elif isinstance(msg, m.Leaving):
                self._on_leaving(e, msg)
            elif isinstance(msg, m.DeviceDone):
                self._on_finish(e, msg)
            else:
                raise RemoteProtocolError(f"{self.role} (serving {e.device}, {e.state.name}): "
                                          f"{msg.TYPE} is not allowed")
        except (TransitionError, RemoteProtocolError) as exc:
            self._drop_link(e, RemoteProtocolError(str(exc)))

    def _on_step(self, e: Entry, msg: m.Activations) -> None:
        session = e.session
        if e.state is not S.ACTIVE or session is None or session.round != msg.round or self.mode == "classic":
            if e.state is S.ACTIVE and session is not None and session.round == msg.round:
                raise RemoteProtocolError(f"{self.role}: Activations from {e.device} in mode classic")
            self._move(e, E.STEP, e.state)  # a stale step: the table says whether it may be ignored
            self.events.emit("stale_step", device=e.device, round=msg.round, step=msg.step, state=e.state.value)
            return
        port = e.port
        assert port is not None

        def reply(grad: torch.Tensor, loss: float, _r: int = msg.round, _s: int = msg.step) -> None:
            port.post(m.Gradients(round=_r, step=_s, loss=loss, grad={"g": grad}))
        x, y = msg.batch["x"], msg.batch["y"]
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise RemoteProtocolError(f"{self.role}: step {msg.step} from {e.device}: labels outside "
                                      f"0..{self.num_classes - 1}")
        job = StepJob(e.device, session, msg.round, msg.step, x, y, reply, cut_first=self.cut_first)
        if self.trainer is None:
            self._stepped(e, job.run())
        else:
            self.training.add(e.device)
            self.trainer.submit(job)

    def _stepped(self, e: Entry, done: StepDone) -> None:
        """After a step, trained here or on the trainer."""
        if done.error is not None:
            raise done.error
        self._move(e, E.STEP, S.ACTIVE)
        session, job = done.job.session, done.job
        if not done.trained:
            self.events.emit("step_replayed", device=e.device, round=job.round, step=job.step)
        elif self.checkpoint_steps and session.step % self.checkpoint_steps == 0:
            self._replicate(session)

    def _replicate(self, session: EdgeSession) -> None:
        """A copy of ``session`` as it is now, to the buddy. The copy is taken here, between
        two steps (a memory copy); checksum and send happen on the replicator's thread."""
        meta, tensors = session._parts(with_reply=False)
        copy = {k: v.detach().clone() for k, v in tensors.items()}
        self.fetcher.replicate(session.device, session.round, session.step, meta, copy,
                               edge_key=self.attach_keys.get(session.device, ""))

    def _drop_link(self, e: Entry, exc: RemoteProtocolError) -> None:
        """A device broke the protocol: its link goes (the device may attach again)."""
        self.events.emit("protocol_error", peer=f"device {e.device}", detail=str(exc)[:300], error=type(exc).__name__)
        if e.port is not None:
            e.port.close(notice=m.ErrorNotice(kind=type(exc).__name__, detail=str(exc)[:300]), drain=True)

    def _on_finish(self, e: Entry, msg: m.DeviceDone) -> None:
        if e.state is S.DELIVERING or (e.state is S.IDLE and self.delivered.get(e.device, 0) >= msg.round):
            self._move(e, E.FINISH, e.state)
            if e.state is S.IDLE:
                e.port.post(m.DoneAck(round=msg.round))  # type: ignore[union-attr]
            return
        session = e.session
        if e.state is not S.ACTIVE or session is None or session.round != msg.round:
            self._move(e, E.FINISH, e.state)
            self.events.emit("stale_update", device=e.device, round=msg.round, state=e.state.value)
            return
        dev_keys, edge_keys = self.models.keys(e.device)
        keys = dev_keys + (edge_keys if self.mode == "classic" else [])
        if set(msg.weights) != set(keys):
            raise RemoteProtocolError(f"{self.role}: DeviceDone from {e.device} has the wrong weights")
        if self.mode != "classic" and session.step != msg.steps:
            raise RemoteProtocolError(f"{self.role}: {e.device} finished after {msg.steps} steps, "
                                      f"its session here has {session.step}")
        weights = {**msg.weights, **session.weights()}
        e.update = m.DeviceUpdate(round=msg.round, device=e.device, edge=self.name, samples=msg.samples,
                                  steps=msg.steps, train_seconds=msg.train_seconds, weights=weights)
        self._move(e, E.FINISH, S.DELIVERING)
        self.central.deliver(e.update)
        self.events.emit("device_done", device=e.device, round=msg.round, samples=msg.samples, steps=msg.steps,
                         train_seconds=msg.train_seconds, edge_steps=session.step)

    def _on_device_lost(self, ev: DeviceLost) -> None:
        self.parked = [att for att in self.parked if att.port is not ev.port]
        e = self.entries.get(ev.device)
        if e is None or e.port is not ev.port:
            return
        e.port = None
        silent = ev.silent_s > 0
        self.events.emit("detached", device=e.device, state=e.state.value, detail=str(ev.error)[:200],
                         silent_s=round(ev.silent_s, 3))
        if silent:
            step = e.session.step if e.session is not None else 0
            rnd = e.session.round if e.session is not None else 0
            self.central.send(m.FaultReport(kind="peer_silent", process=self.name, peer=e.device, round=rnd, step=step,
                                            detail=str(ev.error)[:200], detected_s=round(ev.silent_s, 3), down_s=0.0,
                                            replayed=0, recovery="session held", samples_lost=0))
        if e.state is S.ACTIVE:
            self._move(e, E.LINK_LOST, S.DETACHED)
            if self.mode == "fedfly" and e.session is not None:
                # Most likely the device is moving: hash its session now, while it
                # reconnects, so that a pull only has to send it.
                e.session.prepare_snapshot()
        elif e.state is S.IDLE:
            self._move(e, E.LINK_LOST, S.GONE)
        elif e.state in (S.DELIVERING, S.PULLING):
            self._move(e, E.LINK_LOST, e.state)

    # -- peer edges --------------------------------------------------------------------------

    def _on_peer_message(self, ev: PeerMessage) -> None:
        msg = ev.msg
        handler = self._peer_handlers.get(type(msg))
        if handler is None:
            raise RemoteProtocolError(f"{self.role} (peer link {ev.port.name}): {msg.TYPE} is not allowed")
        handler(ev.port, msg)

    def _on_offer_answered(self, port: Port, msg: m.SessionReleased | m.PullRefused) -> None:
        """The source's answer to an offered session we confirmed: for the record."""
        self.events.emit("handover_confirmed" if isinstance(msg, m.SessionReleased) else "handover_unconfirmed",
                         device=msg.device, source=port.name, offered=True)

    def _refuse(self, port: Port, device: str, reason: str, *, moved_to: str = "", delivered: bool = False,
                offered: bool = False) -> None:
        port.post(m.PullRefused(device=device, reason=reason, moved_to=moved_to, delivered=delivered, offered=offered))

    def _proven(self, msg: m.SessionPull | m.SessionDrop | m.ReplicaPull, key: str | None, holder: str) -> bool:
        """Did the device really attach to the edge asking for its session? (Refused
        otherwise, saying no more than "refused": nothing of the session is told.)"""
        ok = proof_holds(key, msg.proofs, holder=holder, device=msg.device, target=msg.target)
        if not ok:
            self.events.emit("request_unproven", type=msg.TYPE, device=msg.device, by=msg.target)
        return ok

    def _on_pull(self, port: Port, msg: m.SessionPull) -> None:
        d, r, s = msg.device, msg.round, msg.step
        if not self._proven(msg, self.attach_keys.get(d), self.name):
            self._refuse(port, d, "refused")
            return
        e = self.entries.get(d)
        state = e.state if e is not None else S.GONE
        if e is None or e.session is None or state in (S.IDLE, S.GONE, S.PULLING):
            fwd = self.forward.get(d)
            if self.delivered.get(d, 0) >= r:
                self._refuse(port, d, "refused", delivered=True)
            elif fwd is not None and fwd.round == r and fwd.target != msg.target:
                self._refuse(port, d, "refused", moved_to=fwd.target)
            else:
                self._refuse(port, d, "refused")
            if e is not None:
                check_transition(self.role, d, state, E.PULL, state)
            self.events.emit("handover_refused", device=d, round=r, step=s, to=msg.target, state=state.value)
            return
        session = e.session
        if state is S.HANDING_OVER and e.offered and e.handover is not None and e.handover[2] == msg.target \
                and session.round == r and session.position_matches(s):
            # offered to that edge when the device left, and on its way there already: the
            # puller waits for that copy rather than have a second one sent
            self._move(e, E.PULL, S.HANDING_OVER)
            self._refuse(port, d, "refused", offered=True)
            self.events.emit("pull_answered_by_offer", device=d, round=r, step=s, to=msg.target)
            return
        if session.round != r or not (session.position_matches(s) or (state is S.DELIVERING and session.step == s)):
            self._move(e, E.PULL, state)
            self._refuse(port, d, "refused")
            self.events.emit("handover_refused", device=d, round=r, step=s, to=msg.target, state=state.value,
                             have_round=session.round, have_step=session.step)
            return
        if e.port is not None:
            # The device is attaching elsewhere: the link we have is stale.
            e.port.close(drain=False)
            e.port = None
        # the kept reply goes along only when the device lost it (it names the step before)
        meta, tensors, checksum = session.snapshot(with_reply=session.step == s + 1)
        port.post(m.SessionSnapshot(device=d, round=r, step=session.step, meta=meta, checksum=checksum, state=tensors))
        e.handover = (port, checksum, msg.target)
        e.offered = False
        e.handover_at = self.clock()
        if self.checkpoint_steps:
            # kept as a replica once handed over: if the edge it went to dies before its own
            # first copy reaches its buddy, the device can come back here and go on from it
            e.handed = Replica(self.name, r, session.step, meta, checksum, tensors, self.attach_keys.get(d, ""))
        self._move(e, E.PULL, S.HANDING_OVER)
        self.events.emit("handing_over", device=d, round=r, step=session.step, to=msg.target)

    # -- offers: a device that leaves names where it goes --------------------------------------

    def _on_leaving(self, e: Entry, msg: m.Leaving) -> None:
        """The device stops here at ``msg.step`` for a planned move to ``msg.to``: in mode
        fedfly its session goes to ``msg.to`` now, while the device connects there (the
        destination waits for it instead of pulling). Not offered (no kept link to that edge
        yet, another position, another mode): held as for a lost link, and pulled."""
        if e.state is not S.ACTIVE:
            return  # a late one (the link's end follows): nothing to offer
        port, e.port = e.port, None
        assert port is not None
        session = e.session
        link = None
        if self.mode == "fedfly" and session is not None and msg.to in self.peers and session.round == msg.round \
                and session.position_matches(msg.step):
            link = self.fetcher.offer_link(msg.to)
        self.events.emit("left", device=e.device, round=msg.round, step=msg.step, to=msg.to, offered=link is not None)
        if link is None or session is None:
            port.close(drain=False)
            self._move(e, E.LEAVE, S.DETACHED)
            if self.mode == "fedfly" and session is not None:
                session.prepare_snapshot()
            return
        d, r = e.device, msg.round
        link.post(m.OfferNotice(device=d, round=r, step=msg.step, target=self.name))
        meta, tensors, digest = session.start_snapshot(with_reply=session.step == msg.step + 1)
        # the bytes go now; the checksum, computed meanwhile on the hashing threads, after them
        sent = link.post(m.SessionOffer(device=d, round=r, step=msg.step, target=self.name, meta=meta, state=tensors))
        checksum = digest()
        port.close(drain=False)
        if not (sent and link.post(m.OfferSealed(device=d, round=r, step=msg.step, target=self.name,
                                                 checksum=checksum))):
            self._move(e, E.LEAVE, S.DETACHED)
            return
        e.handover = (link, checksum, msg.to)
        e.offered = True
        e.handover_at = self.clock()
        if self.checkpoint_steps:
            e.handed = Replica(self.name, r, session.step, meta, checksum, tensors, self.attach_keys.get(d, ""))
        self._move(e, E.LEAVE, S.HANDING_OVER)
        self.events.emit("handing_over", device=d, round=r, step=session.step, to=msg.to, offered=True)

    def _on_offer_notice(self, port: Port, msg: m.OfferNotice) -> None:
        d = msg.device
        if self.offers.get(d) is not None:
            self._decline(d)  # a newer offer replaces it
        if d not in self.known_devices or self.mode != "fedfly" or (
                self.current is not None and msg.round < self.current.round):
            port.post(m.OfferDeclined(device=d, round=msg.round, step=msg.step))
            return
        o = self.offers[d] = Offer(port, msg.target, msg.round, msg.step, at=self.clock())
        e = self.entries.get(d)
        if e is not None and e.state is S.PULLING and e.offer_token and e.offer_token == e.pull_token and \
                e.pending is not None and o.matches(e.pending.source, e.pending.round, e.pending.step):
            o.token = e.pull_token  # its pull was told to wait for this

    def _on_offer(self, port: Port, msg: m.SessionOffer) -> None:
        o = self.offers.get(msg.device)
        if o is None or o.port is not port or (o.round, o.step) != (msg.round, msg.step) or o.body is not None:
            port.post(m.OfferDeclined(device=msg.device, round=msg.round, step=msg.step))
            return
        o.body = msg

    def _on_offer_sealed(self, port: Port, msg: m.OfferSealed) -> None:
        o = self.offers.get(msg.device)
        if o is None or o.port is not port or (o.round, o.step) != (msg.round, msg.step) or o.body is None \
                or o.checksum:
            port.post(m.OfferDeclined(device=msg.device, round=msg.round, step=msg.step))
            return
        o.checksum = msg.checksum
        if self.current is not None and self.current.round >= o.round:
            # verified and rebuilt now, off this thread, whether or not its device is here
            # yet (not before its round started here: the round's cuts are not known)
            o.built = self._prepare(msg.device, o)
        e = self.entries.get(msg.device)
        if e is not None and self._waits_on(e, o):
            self._take_offer(e, o)

    def _on_offer_declined(self, port: Port, msg: m.OfferDeclined) -> None:
        e = self.entries.get(msg.device)
        if e is None or e.state is not S.HANDING_OVER or e.handover is None or e.handover[0] is not port:
            return  # an answer to an offer that no longer counts
        e.handover = None
        e.handed = None
        self._move(e, E.HANDOVER_FAILED, S.DETACHED)
        self.events.emit("offer_declined", device=msg.device, round=msg.round, step=msg.step, by=port.name)
        if e.session is not None:
            e.session.prepare_snapshot()

    def _on_installed(self, port: Port, msg: m.SessionInstalled) -> None:
        e = self.entries.get(msg.device)
        if e is None or e.state is not S.HANDING_OVER or e.handover is None or e.handover[0] is not port \
                or e.handover[1] != msg.checksum:
            port.post(m.PullRefused(device=msg.device, reason="not released", moved_to="", delivered=False))
            if e is not None and e.state is S.HANDING_OVER:
                self._move(e, E.INSTALLED, S.HANDING_OVER)
            return
        target = e.handover[2]
        round_ = e.session.round if e.session is not None else msg.round
        if e.update is not None:
            e.update = None  # the update goes on from the target (the central takes it once)
        e.handover = None
        if e.handed is not None:
            self._keep_replica(msg.device, e.handed)
            e.handed = None
        self.forward[msg.device] = Forward(round_, target)
        self._move(e, E.INSTALLED, S.GONE)
        port.post(m.SessionReleased(device=msg.device))
        self.events.emit("handed_over", device=msg.device, round=msg.round, step=msg.step, to=target)

    def _on_drop(self, port: Port, msg: m.SessionDrop) -> None:
        """Another edge took the device over without its state (modes restart and classic,
        or fedfly at step 0). A session here that no device link serves goes; a linked
        device is left alone (it came back here after that drop was sent), as is a session
        of a newer round than the drop's. The peer is always answered."""
        if not self._proven(msg, self.attach_keys.get(msg.device), self.name):
            self._refuse(port, msg.device, "refused")
            return
        try:
            e = self.entries.get(msg.device)
            if e is None or (e.session is not None and e.session.round > msg.round):
                pass  # nothing here, or a drop from an older round: nothing to do
            elif e.port is None and e.state in (S.DETACHED, S.HANDING_OVER, S.DELIVERING, S.IDLE):
                self._move(e, E.DROP, S.GONE)
                self.entries.pop(msg.device, None)
            elif e.state in allowed(e.state, E.DROP):
                self._move(e, E.DROP, e.state)
            fwd = self.forward.get(msg.device)
            if fwd is None or fwd.round <= msg.round:
                self.forward[msg.device] = Forward(msg.round, msg.target)
            self.events.emit("session_dropped", device=msg.device, round=msg.round, to=msg.target)
        finally:
            port.post(m.SessionReleased(device=msg.device))

    def _on_replica(self, port: Port, msg: m.SessionReplica) -> None:
        source = msg.target
        if self.current is not None and msg.round < self.current.round:
            return  # of a round that is over
        self._keep_replica(msg.device, Replica(source, msg.round, msg.step, msg.meta, msg.checksum, msg.state,
                                               msg.edge_key))

    # A device's own checkpoints lag the session by up to a step (its edge trains a step
    # before the device does), and a copy takes time to arrive: the newest few are kept.
    KEEP_REPLICAS = 3

    def _keep_replica(self, device: str, rep: Replica) -> None:
        reps = [x for x in self.replicas.get(device, []) if (x.round, x.step) != (rep.round, rep.step)]
        reps.append(rep)
        reps.sort(key=lambda x: (x.round, x.step))
        self.replicas[device] = reps[-self.KEEP_REPLICAS:]

    def _replica_at(self, device: str, round: int, steps: list[int]) -> Replica | None:
        """The newest copy of ``device``'s session in ``round`` at one of ``steps``."""
        fits = [x for x in self.replicas.get(device, []) if x.round == round and x.step in steps]
        return fits[-1] if fits else None

    def _on_replica_pull(self, port: Port, msg: m.ReplicaPull) -> None:
        rep = self._replica_at(msg.device, msg.round, msg.steps)
        if rep is None or not self._proven(msg, rep.edge_key, rep.source):
            self._refuse(port, msg.device, "refused")  # what we hold is not told
            self.events.emit("replica_refused", device=msg.device, round=msg.round, to=msg.target,
                             have_steps=[x.step for x in self.replicas.get(msg.device, [])])
            return
        port.post(m.SessionSnapshot(device=msg.device, round=rep.round, step=rep.step, meta=rep.meta,
                                    checksum=rep.checksum, state=rep.tensors))
        self.events.emit("replica_given", device=msg.device, round=rep.round, step=rep.step, to=msg.target)

    def _on_peer_lost(self, ev: PeerLost) -> None:
        for d, o in list(self.offers.items()):
            if o.port is ev.port:
                del self.offers[d]
                self._offer_lost(d, o, "link lost")
        for e in list(self.entries.values()):
            if e.state is S.PULLING and e.offer_token and e.offer_token == e.pull_token and e.pending is not None \
                    and e.device not in self.offers and ev.port.name == f"edge {e.pending.source}":
                # the offer it was told to wait for may have been on that link: ask again
                e.offer_token = 0
                self._pull_again(e, e.pending.source)
        for e in list(self.entries.values()):
            if e.state is S.HANDING_OVER and e.handover is not None and e.handover[0] is ev.port:
                e.handover = None
                self._move(e, E.HANDOVER_FAILED, S.DETACHED)
                self.events.emit("handover_unconfirmed", device=e.device)

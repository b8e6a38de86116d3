"""The edge's core: one thread that owns every device's entry and session on this edge.

Concurrency model. Link threads (devices, peer edges, the central) and handover workers
only turn what happens into events on one queue (``submit``); ``run`` takes them one at
a time and is the only code that reads or changes the session table, which therefore has
no lock. Steps are trained beside it, on the edge's one training thread
(``edge.trainer``): while a device's step trains there, the core holds every event that
belongs to that device's session or to the whole edge (as its message declares,
``common.messages.Scope``), and handles them in their order when the step is done
(``_waits``), so nothing can snapshot, move or drop a session while it trains; events of
other devices (an attach, an install, a pull) go on at once, so a handover never waits
for another device's step. Without a trainer (the tests' seam) the core trains each step
itself, between two events. Nothing here blocks on the network: replies go out through
ports, whose writer threads send them.

How a session follows a moving device is not decided here: the handover policy
(``edge.handover``, one file per policy with both sides of a move) is called at fixed
points (the device leaves, attaches naming another edge, a peer's message, an outcome, a
deadline), and asks of the core only its session store (``move``, ``reply``, ``fresh``,
``entries`` ...).

Every change of an entry's state goes through ``move``: the handler names what happened
(the event), the table in ``edge.lifecycle`` names the one next state, and the state's
own data comes and goes with it; a message that the table does not allow costs that one
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
from common.bounds import batch_problem, weights_bound_problem
from common.config import default
from common.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from common.events import EventLog
from common.plan import RoundPlan
from common.strategies import strategy_class
from common.strategies.base import returns_of, round_share
from common.security import proof_holds
from common.models import num_classes, part_keys, state_spec, weights_problem
from edge import reports
from edge.handover import POLICIES, Handover, Recovery, Replica
from edge.migration import buddy_of
from edge.lifecycle import (LINKED, STATE_DATA, Delivering, Event, HandingOver, Pulling, State, TransitionError,
                            next_state)
from edge.ports import (CentralDown, CentralMessage, CentralPort, CentralUp, DeviceAttach, DeviceLost, DeviceMessage,
                        Fetcher, PeerLost, PeerMessage, Port, PullOutcome, Stop, Tick)
from edge.session import EdgeSession, SparePart
from edge.trainer import StepDone, StepJob, Trainer

log = logging.getLogger("edge")

E, S = Event, State
# With no event, the core wakes this often to check the handovers' deadlines (``tick``):
# well inside any deadline (seconds), and a wake-up costs nothing.
TICK_S = 0.5


@dataclass
class RoundInfo:
    plan: RoundPlan
    weights: dict[str, torch.Tensor]
    algo: dict[str, torch.Tensor] = field(default_factory=dict)  # the strategy's tensors (RoundStart.algo)
    adopt: dict[str, int] = field(default_factory=dict)  # device -> the round its returns in algo are of

    @property
    def round(self) -> int:
        return self.plan.round


@dataclass
class Entry:
    """One device on this edge: its state in the lifecycle and that state's own data
    (``edge.lifecycle.STATE_DATA``), its session, its link."""
    device: str
    state: State = State.GONE
    data: Delivering | Pulling | HandingOver | None = None  # the state's own (set and dropped by ``move``)
    session: EdgeSession | None = None
    port: Port | None = None              # the device's current link, if linked
    last_round: int = 0                   # the device's word: last round whose update it knows taken

    @property
    def pulling(self) -> Pulling | None:
        return self.data if isinstance(self.data, Pulling) else None

    @property
    def handing(self) -> HandingOver | None:
        return self.data if isinstance(self.data, HandingOver) else None

    @property
    def delivering(self) -> Delivering | None:
        return self.data if isinstance(self.data, Delivering) else None


@dataclass
class Forward:
    round: int
    target: str


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
                 checkpoint_steps: int = 0, replicas_kept: int = default("faults.replicas_kept"),
                 edges: list[str] | None = None, handover: str = "offer",
                 trainer: Trainer | None = None, cut_first: bool = True,
                 inbox: queue.SimpleQueue | None = None) -> None:
        """``inbox``: the queue of events the core handles (``submit``), shared with the
        parts built before it that report to it (the central's link, the fetcher, the
        trainer); a new one if None. ``handover``: the policy a moving device's session
        follows in mode fedfly (``edge.handover.POLICIES``); modes restart and classic
        move no state."""
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
        self.replicas_kept = replicas_kept
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
        self.cut_first = cut_first  # training.cut_gradient_first: the cut's gradient before the weights'
        # what devices send, bounded (``common.bounds``, ``edge.reports``)
        self.report_gate = reports.ReportGate()
        self.refused: dict[str, Port] = {}  # device -> the link closed for what it sent (the rest of it is ignored)
        # how a moving device's session follows it (both sides), and replica recovery
        self.handover: Handover = POLICIES[handover if mode == "fedfly" else "restart"](self)
        self.recovery = Recovery(self)
        # what another edge may send us, by message type
        self._peer_handlers: dict[type, Callable[[Port, m.Message], None]] = {
            **self.recovery.peer_handlers(), **self.handover.peer_handlers()}
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
        if isinstance(ev, DeviceMessage) and self._refused_on_arrival(ev):
            return
        if self._waits(ev):
            self._held.append(ev)
            return
        try:
            if isinstance(ev, StepDone):
                self._on_step_done(ev)
            elif isinstance(ev, DeviceMessage):
                if not self.handover.device_message(ev):
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
                self.handover.outcome(ev)
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
            # handovers, never of a session that trains (a slow edge's step may outlast a tick)
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

    def move(self, e: Entry, event: Event, data: Delivering | Pulling | HandingOver | None = None) -> State:
        """The one place an entry changes state: to the one the table names for ``event``.
        ``data``: the new state's own (``STATE_DATA``); what belonged to the state left
        goes with it. Staying in a state keeps its data unless new data is given."""
        was = e.state
        to = next_state(self.role, e.device, was, event)
        if to is not was:
            self.events.emit("session_state", device=e.device, state=to.value, was=was.value, on=event.value)
            if was is S.HANDING_OVER and to is not S.GONE and e.session is not None:
                e.session.unshare()  # what went may still be on its way: train on copies
        if to is not was or data is not None:
            e.data = data
        kind = STATE_DATA.get(to)
        if not (isinstance(e.data, kind) if kind is not None else e.data is None):  # pragma: no cover - a wiring bug
            raise LocalProtocolError(f"{self.role}: {to.name} for {e.device} with {type(e.data).__name__}")
        e.state = to
        if to in (S.GONE, S.IDLE):
            e.session = None
        if to in LINKED and e.port is None:
            return self.move(e, E.LINK_LOST)  # state-triggered: linked states need a link
        if to is S.GONE and e.port is None:
            self.entries.pop(e.device, None)
        return to

    def detach(self, e: Entry) -> None:
        """The ACTIVE entry's device left (its link closes): its session is held here."""
        if e.port is not None:
            e.port.close(drain=False)
            e.port = None
        self.move(e, E.LEAVE)

    def handing_over(self, e: Entry, event: Event, port: Port, checksum: str, target: str, meta: dict,
                     tensors: dict[str, torch.Tensor], *, offered: bool) -> None:
        """``e``'s snapshot (``checksum``) went to ``target`` on ``port``: HANDING_OVER until
        that edge confirms it holds an identical copy."""
        assert e.session is not None
        # kept as a replica once handed over (with replication on): if the edge it went to dies
        # before its own first copy reaches its buddy, the device can come back here and go on from it
        kept = Replica(self.name, e.session.round, e.session.step, meta, checksum, tensors,
                       self.attach_keys.get(e.device, "")) if self.checkpoint_steps else None
        self.move(e, event, HandingOver(port, checksum, target, self.clock(), offered, kept))
        self.events.emit("handing_over", device=e.device, round=e.session.round, step=e.session.step, to=target,
                         **({"offered": True} if offered else {}))

    def point(self, device: str, round: int, target: str, *, newer_only: bool = False) -> None:
        """Remember that ``device``'s session of ``round`` went on to ``target`` (a later
        pull is told "moved to ..."); ``newer_only``: not over a pointer of a newer round."""
        fwd = self.forward.get(device)
        if not newer_only or fwd is None or fwd.round <= round:
            self.forward[device] = Forward(round, target)

    def new_token(self) -> int:
        """A token for a new fetch: an outcome counts only under its entry's current one."""
        self._token += 1
        return self._token

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
        for k, t in msg.algo.items():  # the strategy's tensors, each for one parameter of the model
            want = self.spec.get(k.split("/", 2)[-1])
            if k.count("/") < 2 or want is None or (tuple(t.shape), t.dtype) != want:
                raise RemoteProtocolError(f"{self.role}: RoundStart of round {plan.round}: strategy tensor {k!r} "
                                          "does not fit the model")
        if any(not 1 <= a < plan.round for a in msg.adopt.values()):
            raise RemoteProtocolError(f"{self.role}: RoundStart of round {plan.round}: adopt names a round "
                                      "that is not before it")
        if self.current is not None and plan.round <= self.current.round:
            return  # sent again after we rejoined: we have it
        self.current = RoundInfo(plan, msg.weights, msg.algo, msg.adopt)
        self.models.splits.update(plan.cuts)  # cuts chosen at start (split_layer = "auto")
        r = plan.round
        self.central.round_started(r)
        self.recovery.round_start(r)
        self.forward = {d: f for d, f in self.forward.items() if f.round >= r}
        self.handover.round_start(r)
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
        pulling = e.pulling
        if pulling is not None and pulling.request.round >= r:
            self._resolve_pending(e)  # it was waiting for this very round
            return
        old_round = e.session.round if e.session is not None else (pulling.request.round if pulling else 0)
        if e.port is None:
            self.move(e, E.ROUND_START)
            return
        if pulling is not None:
            # The device waits for an answer to its attach: its round is over.
            self.reply(e, action="wait", round=old_round, how="round over")
        if self.takes_part(e.device, r):
            self._start_session(e)
        else:
            self.move(e, E.ROUND_START)
            if old_round and pulling is None:
                e.port.post(m.StandBy(round=old_round, reason=f"round {old_round} is over; "
                                      f"{e.device} is not in round {r}"))

    def takes_part(self, device: str, r: int) -> bool:
        info = self.current
        return (info is not None and info.round == r and device in info.plan.participants
                and self.delivered.get(device, 0) < r)

    def _on_update_acked(self, msg: m.UpdateAck) -> None:
        self.central.acked(msg.device, msg.round)
        self.delivered[msg.device] = max(self.delivered.get(msg.device, 0), msg.round)
        e = self.entries.get(msg.device)
        delivering = e.delivering if e is not None else None
        if e is None or delivering is None or delivering.update.round != msg.round:
            return
        if e.port is not None:
            e.port.post(m.DoneAck(round=msg.round))
        self.move(e, E.UPDATE_ACKED)  # IDLE (GONE if not linked)

    # -- devices: attach ---------------------------------------------------------------------

    def reply(self, e: Entry, *, ok: bool = True, reason: str = "", action: str = "wait", round: int = 0,
               resume_step: int = 0, how: str = "", state_bytes: int = 0, transfer_ms: float = 0.0) -> None:
        assert e.port is not None
        waits = action == "continue" and e.session is not None and e.session.round == round \
            and e.session.awaits_state
        e.port.post(m.AttachReply(ok=ok, reason=reason, run_name=self.run_name or "", mode=self.mode, action=action,
                                  round=round, resume_step=resume_step, how=how, state_bytes=state_bytes,
                                  transfer_ms=transfer_ms, client_state=waits))

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
            e.port.close(notice=m.Replaced(), drain=False)
        e.port = ev.port
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
            self.move(e, E.ATTACH)
            self.reply(e, action="wait", how="delivering")
            return
        info = self.current
        self.reply(e, action="wait", how="join")
        if info is not None and self.takes_part(e.device, info.round) and e.last_round < info.round:
            old = e.session
            if old is not None and old.round == info.round and old.step > 0:
                # a device process started again with nothing: its round again from the start
                self.central.send(m.FaultReport(kind="restarted", process=e.device, peer=self.name, round=info.round,
                                                step=old.step, detail="the device process started again without "
                                                "a checkpoint: its round again from the round's weights",
                                                replayed=old.step, recovery="restart"))
            self._start_session(e)  # a fetch under way no longer counts
        else:
            self.move(e, E.NO_SESSION)

    def _attach_resume(self, e: Entry, req: m.AttachRequest) -> None:
        r, s = req.round, req.step
        delivering, pulling = e.delivering, e.pulling
        if delivering is not None:
            self.move(e, E.ATTACH)
            if (delivering.update.round, delivering.update.steps) == (r, s):
                # It lost our DoneAck: it sends its update again and gets the ack once the
                # central confirms.
                self.reply(e, action="continue", round=r, resume_step=s, how="delivering")
            else:
                # Its round's update is on its way from here; whatever the device holds of
                # that round is not what counts.
                self.reply(e, action="wait", round=r, how="delivering")
            return
        if pulling is not None:
            self.move(e, E.ATTACH)  # the fetch goes on; its outcome answers this link
            pulling.request = req
            return
        ours = e.session
        if ours is not None and ours.round == r and ours.position_matches(s) and (
                req.source == self.name or e.state is S.HANDING_OVER):
            # Its session is here: a link that came back (or a device that returned before
            # our handover finished; the late confirmation will be refused).
            if e.state is S.HANDING_OVER:
                self.events.emit("handover_cancelled", device=e.device, round=r, step=s)
            self.move(e, E.RESUME)
            self.reply(e, action="continue", round=r, resume_step=s, how="here")
            return
        self.begin_resume(e, req, attached=True)

    def begin_resume(self, e: Entry, req: m.AttachRequest, *, attached: bool = False) -> None:
        """The session is not here (or not where the device is): fetch it, rebuild it from
        the round's weights, or tell the device its round is over. ``attached``: decided as
        the device attaches (else again, after a fetch's outcome)."""
        r, s = req.round, req.step
        info = self.current
        fwd = self.forward.get(e.device)
        if self.delivered.get(e.device, 0) >= r:
            self.move(e, E.NO_SESSION)
            if e.port is not None:
                self.reply(e, action="done", round=r, how="delivered")
            return
        if info is None or info.round < r:
            # We have not been told of round r yet (our link to the central lags): wait for it.
            self.move(e, E.FETCH, Pulling(req))
            self.events.emit("awaiting_round", device=e.device, round=r)
            return
        if info.round > r or not self.takes_part(e.device, r):
            self.move(e, E.NO_SESSION)
            if e.port is not None:
                self.reply(e, action="wait", round=r, how="round over")
            if e.port is not None and self.takes_part(e.device, info.round):
                self._start_session(e)
            return
        source = req.source
        if attached and source == self.name and fwd is not None and fwd.round == r:
            source = fwd.target  # we handed it on; the device missed the other edge's reply
        if source != self.name and self.handover.attached_elsewhere(e, req, source):
            return  # the policy answers the device
        # Modes restart and classic keep no state to fetch (restart: the round from its
        # weights; classic: the device trains alone); fedfly at step 0: the round's weights
        # are the whole session. Here with no session at all: the round again, exactly.
        resume = 0 if self.mode == "restart" else s
        how = "fresh"
        if source == self.name and self.mode == "fedfly" and s > 0:
            if self.handover.session_lost_here(e, req):
                return
            resume, how = 0, "restart"  # the device says its session is here, and it is not
        self.fresh(e, info, resume)
        if e.port is not None:
            self.reply(e, action="continue", round=r, resume_step=resume, how=how)

    def _resolve_pending(self, e: Entry) -> None:
        """A PULLING entry that waited for the round's weights: decide again, now."""
        pulling = e.pulling
        assert pulling is not None
        if e.port is None:
            self.move(e, E.ROUND_START)
            return
        self.begin_resume(e, pulling.request)

    def fresh(self, e: Entry, info: RoundInfo, step: int) -> None:
        """``e``'s session of the round from its weights, at ``step``: ACTIVE (DETACHED if
        the device is not linked)."""
        e.session = self._new_session(e.device, info)
        e.session.step = step
        self.move(e, E.FRESH)

    def _new_session(self, device: str, info: RoundInfo) -> EdgeSession:
        """``device``'s session of the round from its weights. With an algorithm that keeps
        a state on the device (SCAFFOLD's ``c_i``), it waits for the device's
        (``ClientState``): every reply that lets the device go on says so
        (``AttachReply.client_state``), and a ``DeviceRound`` always asks for it."""
        edge_keys = self.models.keys(device)[1]
        edge_state = None if self.mode == "classic" else {k: info.weights[k] for k in edge_keys}
        client = strategy_class(info.plan.algo.name).CLIENT
        return EdgeSession(device=device, round=info.round, mode=self.mode, model=self.models.name,
                           split_layer=self.models.cut(device), lr=info.plan.lr, momentum=info.plan.momentum,
                           part_state=edge_state, seed=self.seed, algo=info.plan.algo,
                           algo_tensors=round_share(info.algo, edge_keys),
                           awaits_state=client is not None and client.keeps_state and self.mode != "classic")

    def _start_session(self, e: Entry) -> None:
        """A fresh session of the current round, and the round's work sent to the device."""
        info = self.current
        assert info is not None and e.port is not None
        self.fresh(e, info, 0)
        dev_keys, edge_keys = self.models.keys(e.device)
        keys = dev_keys + (edge_keys if self.mode == "classic" else [])
        e.port.post(m.DeviceRound(plan=info.plan.to_wire(), weights={k: info.weights[k] for k in keys},
                                  algo={**round_share(info.algo, keys), **returns_of(info.algo, e.device)},
                                  adopt=info.adopt.get(e.device, 0)))

    def refill(self) -> None:
        """The spare part was taken: another one, later (``SparePart.refill_soon``)."""
        if self.spare is not None:
            self.spare.refill_soon()

    def _on_tick(self) -> None:
        self.handover.tick(self.clock())

    # -- devices: steps, updates, loss ---------------------------------------------------------

    def _on_device_message(self, ev: DeviceMessage) -> None:
        e = self.entries.get(ev.device)
        msg = ev.msg
        if isinstance(msg, (m.MigrationReport, m.FaultReport)):
            self._on_report(ev, e, msg)
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
            elif isinstance(msg, m.ClientState):
                self._on_client_state(e, msg)
            else:
                raise RemoteProtocolError(f"{self.role} (serving {e.device}, {e.state.name}): "
                                          f"{msg.TYPE} is not allowed")
        except (TransitionError, RemoteProtocolError) as exc:
            self._drop_link(e, RemoteProtocolError(str(exc)))

    def _refused_on_arrival(self, ev: DeviceMessage) -> bool:
        """Checked as it arrives, before it is held for a step on the trainer: a batch out
        of the round's bounds (``common.bounds``), or a second batch on a link whose first
        still waits, costs the link (``_refuse_input``); nothing more from that link counts."""
        if self.refused.get(ev.device) is ev.port:
            return True
        msg, e, info = ev.msg, self.entries.get(ev.device), self.current
        if not isinstance(msg, m.Activations) or e is None or e.port is not ev.port or info is None \
                or self.mode == "classic":
            return False  # not a batch, or one the table refuses or ignores
        problem = batch_problem(msg.batch["x"], msg.batch["y"], model=self.models.name,
                                cut=self.models.cut(ev.device), batch_size=info.plan.batch_size)
        if not problem and any(isinstance(h, DeviceMessage) and h.port is ev.port and isinstance(h.msg, m.Activations)
                               for h in self._held):
            problem = "a second batch before the answer to the first"
        if problem:
            self._refuse_input(ev, RemoteProtocolError(f"{self.role}: step {msg.step} of round {msg.round} from "
                                                       f"{ev.device}: {problem}"), round=msg.round, step=msg.step)
        return bool(problem)

    def _on_report(self, ev: DeviceMessage, e: Entry | None, msg: m.FaultReport | m.MigrationReport) -> None:
        """A device's report goes on to the central if it speaks only for its sender, stamped
        with the identity that delivered it, within its link's budget (``edge.reports``)."""
        if ev.device not in self.known_devices:
            return
        try:
            msg = reports.screen(msg, device=ev.device, edges=set(self.edges),
                                 by=reports.delivered_by(ev.port, ev.device))
        except reports.ReportRefused as exc:
            self._refuse_input(ev, exc, round=msg.round, step=msg.step)
            return
        if self.report_gate.admit(ev.device, ev.port, e.port if e is not None else None, self.clock()) is not None:
            self.central.send(msg)
        elif (dropped := self.report_gate.dropped(ev.device)) == 1 or dropped % 1000 == 0:
            self.events.emit("reports_dropped", device=ev.device, dropped=dropped, burst=self.report_gate.burst,
                             rate=self.report_gate.rate)

    def _refuse_input(self, ev: DeviceMessage, exc: RemoteProtocolError, *, round: int, step: int) -> None:
        """A device sent what it may not: its link is closed with a typed error (it may
        attach again), and the central records it as that device's fault."""
        self.refused[ev.device] = ev.port
        detail = str(exc)[:300]
        self.events.emit("protocol_error", peer=f"device {ev.device}", detail=detail, error=type(exc).__name__)
        ev.port.close(notice=m.ErrorNotice(kind=type(exc).__name__, detail=detail), drain=True)
        self._report_refusal(ev.device, detail, round=round, step=step)

    def _report_refusal(self, device: str, detail: str, *, round: int, step: int) -> None:
        self.central.send(m.FaultReport(kind="protocol_error", process=self.name, peer=device,
                                        round=min(max(round, 0), reports.MAX_ROUND), step=min(max(step, 0), reports.MAX_STEP),
                                        detail=detail[:200], recovery="link closed"))

    def _on_client_state(self, e: Entry, msg: m.ClientState) -> None:
        """The device's kept state for the session that waits for it (``awaits_state``),
        checked against the edge part; for any other (a copy sent again, a session of
        another round) it is not needed: ignored."""
        session = e.session
        if session is None or session.round != msg.round or not session.awaits_state:
            return
        keys = [n for n, _ in session.named_parameters()]
        spec = {f"{tag}/{k}": self.spec[k] for k in keys for tag in {n.partition("/")[0] for n in msg.state}}
        if msg.state and (problem := weights_bound_problem(msg.state, spec)):
            raise RemoteProtocolError(f"{self.role}: ClientState of {e.device} for round {msg.round}: {problem}")
        session.take_state(msg.state)

    def _on_step(self, e: Entry, msg: m.Activations) -> None:
        session = e.session
        if e.state is not S.ACTIVE or session is None or session.round != msg.round or self.mode == "classic":
            if e.state is S.ACTIVE and session is not None and session.round == msg.round:
                raise RemoteProtocolError(f"{self.role}: Activations from {e.device} in mode classic")
            self.move(e, E.STEP)  # a stale step: the table says whether it may be ignored
            self.events.emit("stale_step", device=e.device, round=msg.round, step=msg.step, state=e.state.value)
            return
        if session.awaits_state:
            raise RemoteProtocolError(f"{self.role}: step {msg.step} of {e.device} before its ClientState")
        port = e.port
        assert port is not None

        def reply(grad: torch.Tensor, loss: float, _r: int = msg.round, _s: int = msg.step) -> None:
            port.post(m.Gradients(round=_r, step=_s, loss=loss, grad={"g": grad}))
        x, y = msg.batch["x"], msg.batch["y"]  # in bounds (``_refused_on_arrival``)
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
        self.move(e, E.STEP)
        session, job = done.job.session, done.job
        if not done.trained:
            self.events.emit("step_replayed", device=e.device, round=job.round, step=job.step)
        elif self.checkpoint_steps and session.step % self.checkpoint_steps == 0:
            self.recovery.replicate(session)

    def _drop_link(self, e: Entry, exc: RemoteProtocolError) -> None:
        """A device broke the protocol: its link goes (the device may attach again)."""
        self.events.emit("protocol_error", peer=f"device {e.device}", detail=str(exc)[:300], error=type(exc).__name__)
        if e.port is not None:
            e.port.close(notice=m.ErrorNotice(kind=type(exc).__name__, detail=str(exc)[:300]), drain=True)

    def _on_finish(self, e: Entry, msg: m.DeviceDone) -> None:
        if e.state is S.DELIVERING or (e.state is S.IDLE and self.delivered.get(e.device, 0) >= msg.round):
            self.move(e, E.FINISH)
            if e.state is S.IDLE:
                e.port.post(m.DoneAck(round=msg.round))  # type: ignore[union-attr]
            return
        session = e.session
        if e.state is not S.ACTIVE or session is None or session.round != msg.round:
            self.move(e, E.FINISH_STALE)
            self.events.emit("stale_update", device=e.device, round=msg.round, state=e.state.value)
            return
        dev_keys, edge_keys = self.models.keys(e.device)
        keys = dev_keys + (edge_keys if self.mode == "classic" else [])
        if problem := weights_bound_problem(msg.weights, {k: self.spec[k] for k in keys}):
            raise RemoteProtocolError(f"{self.role}: DeviceDone from {e.device} has the wrong weights: {problem}")
        if self.mode != "classic" and session.step != msg.steps:
            raise RemoteProtocolError(f"{self.role}: {e.device} finished after {msg.steps} steps, "
                                      f"its session here has {session.step}")
        weights = {**msg.weights, **session.weights()}
        update = m.DeviceUpdate(round=msg.round, device=e.device, edge=self.name, samples=msg.samples,
                                steps=msg.steps, train_seconds=msg.train_seconds, weights=weights)
        self.move(e, E.FINISH, Delivering(update))
        self.central.deliver(update)
        self.events.emit("device_done", device=e.device, round=msg.round, samples=msg.samples, steps=msg.steps,
                         train_seconds=msg.train_seconds, edge_steps=session.step)

    def _on_device_lost(self, ev: DeviceLost) -> None:
        self.parked = [att for att in self.parked if att.port is not ev.port]
        e = self.entries.get(ev.device)
        if e is None or e.port is not ev.port:
            return
        e.port = None
        if isinstance(ev.error, FrameTooLarge):  # its link's decoder refused it (``common.bounds``): the device's fault
            self._report_refusal(e.device, str(ev.error)[:200], round=e.session.round if e.session else 0,
                                 step=e.session.step if e.session else 0)
        silent = ev.silent_s > 0
        self.events.emit("detached", device=e.device, state=e.state.value, detail=str(ev.error)[:200],
                         silent_s=round(ev.silent_s, 3))
        if silent:
            step = e.session.step if e.session is not None else 0
            rnd = e.session.round if e.session is not None else 0
            self.central.send(m.FaultReport(kind="peer_silent", process=self.name, peer=e.device, round=rnd, step=step,
                                            detail=str(ev.error)[:200], detected_s=round(ev.silent_s, 3),
                                            recovery="session held"))
        was = e.state
        if was in (S.ACTIVE, S.IDLE, S.DELIVERING, S.PULLING):
            self.move(e, E.LINK_LOST)
        if was is S.ACTIVE:
            self.handover.link_lost(e)

    # -- peer edges --------------------------------------------------------------------------

    def _on_peer_message(self, ev: PeerMessage) -> None:
        msg = ev.msg
        handler = self._peer_handlers.get(type(msg))
        if handler is None:
            raise RemoteProtocolError(f"{self.role} (peer link {ev.port.name}): {msg.TYPE} is not allowed")
        handler(ev.port, msg)

    def refuse(self, port: Port, device: str, reason: str, *, moved_to: str = "", delivered: bool = False,
                offered: bool = False) -> None:
        port.post(m.PullRefused(device=device, reason=reason, moved_to=moved_to, delivered=delivered, offered=offered))

    def proven(self, msg: m.SessionPull | m.SessionDrop | m.ReplicaPull, key: str | None, holder: str) -> bool:
        """Did the device really attach to the edge asking for its session? (Refused
        otherwise, saying no more than "refused": nothing of the session is told.)"""
        ok = proof_holds(key, msg.proofs, holder=holder, device=msg.device, target=msg.target)
        if not ok:
            self.events.emit("request_unproven", type=msg.TYPE, device=msg.device, by=msg.target)
        return ok

    def _on_leaving(self, e: Entry, msg: m.Leaving) -> None:
        """The device stops here at ``msg.step`` for a planned move to ``msg.to``: the
        policy's (an offer sends the session ahead; otherwise held as for a lost link)."""
        if e.state is not S.ACTIVE:
            return  # a late one (the link's end follows): nothing to move
        self.handover.leaving(e, msg)

    def _on_peer_lost(self, ev: PeerLost) -> None:
        self.handover.peer_lost(ev.port)

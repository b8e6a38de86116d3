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

The core's own handlers live beside it, as functions over the core, one module per
question: what a device's attach becomes (``edge.attach``), what a linked device sends
and its link's loss (``edge.devices``), what the central sends: a round's start, an
update's ack (``edge.rounds``). The records it keeps are ``edge.records``.

Every change of an entry's state goes through ``move``: the handler names what happened
(the event), the table in ``edge.lifecycle`` names the one next state, and the state's
own data comes and goes with it; a message that the table does not allow costs that one
link (a typed error, the link closed), never the edge.
"""

from __future__ import annotations

import logging
import queue
import time
from typing import Callable

import torch

from common import messages as m
from common.bounds import batch_problem
from common.config import default
from common.errors import LocalProtocolError, RemoteProtocolError
from common.events import EventLog
from common.security import proof_holds
from common.models import num_classes, state_spec
from edge import attach, devices, reports, rounds
from edge.handover import POLICIES, Handover, Recovery, Replica
from edge.migration import buddy_of
from edge.lifecycle import (LINKED, STATE_DATA, Delivering, Event, HandingOver, Pulling, State, TransitionError,
                            next_state)
from edge.ports import (CentralDown, CentralMessage, CentralPort, CentralUp, DeviceAttach, DeviceLost, DeviceMessage,
                        Fetcher, PeerLost, PeerMessage, Port, PullOutcome, Stop, Tick, scope_of)
from edge.records import Entry, Forward, Models, RoundInfo
from edge.session import SparePart
from edge.trainer import StepDone, Trainer

log = logging.getLogger("edge")

E, S = Event, State
# With no event, the core wakes this often to check the handovers' deadlines (``tick``):
# well inside any deadline (seconds), and a wake-up costs nothing.
TICK_S = 0.5


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
                    devices.on_message(self, ev)
            elif isinstance(ev, DeviceAttach):
                attach.on_attach(self, ev)
            elif isinstance(ev, DeviceLost):
                devices.on_lost(self, ev)
            elif isinstance(ev, PeerMessage):
                self._on_peer_message(ev)
            elif isinstance(ev, PeerLost):
                self._on_peer_lost(ev)
            elif isinstance(ev, PullOutcome):
                self.handover.outcome(ev)
            elif isinstance(ev, CentralMessage):
                rounds.on_central(self, ev.msg)
            elif isinstance(ev, CentralUp):
                self._on_central_up(ev)
            elif isinstance(ev, CentralDown):
                self.events.emit("central_down", detail=ev.detail)
            elif isinstance(ev, Stop):
                self.stop(ev)
            elif isinstance(ev, Tick):
                self._on_tick()
            else:  # pragma: no cover - a wiring bug
                raise LocalProtocolError(f"{self.role}: unknown event {type(ev).__name__}")
        except Exception as exc:  # noqa: BLE001 - one bad event must not stop the edge
            log.exception("%s: handling %s failed", self.role, type(ev).__name__)
            self.events.emit("core_error", on=type(ev).__name__, error=type(exc).__name__, detail=str(exc)[:300])
        self._report_status()

    def _on_tick(self) -> None:
        self.handover.tick(self.clock())

    def _waits(self, ev: object) -> bool:
        """Must ``ev`` wait for a step on the trainer? Yes if it belongs to that step's
        device's session or to the whole edge (the central, a round's start; not a stop or
        a tick), or if such an event already waits (the order of events is kept). What
        belongs to nothing that orders with a step (``Scope.FREE``) never waits."""
        if not self.training or isinstance(ev, (StepDone, Stop, Tick)):
            # a stop only closes links, and a step may hang; a tick's deadlines are of
            # handovers, never of a session that trains (a slow edge's step may outlast a tick)
            return False
        scope, device = scope_of(ev)
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
                    self.stepped(e, ev)
                except (TransitionError, RemoteProtocolError) as exc:
                    devices.drop_link(self, e, RemoteProtocolError(str(exc)))
        finally:  # whatever the step's end raised, what waited for it is handled, in order
            for later in held:
                if self.stopped is not None:
                    break  # as ``run`` would: nothing after a stop is handled
                self.handle(later)  # what must still wait is held again

    def _refused_on_arrival(self, ev: DeviceMessage) -> bool:
        """Checked as it arrives, before it is held for a step on the trainer: a batch out
        of the round's bounds (``common.bounds``), or a second batch on a link whose first
        still waits, costs the link (``edge.devices.refuse_input``); nothing more from that
        link counts."""
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
            exc = RemoteProtocolError(f"{self.role}: step {msg.step} of round {msg.round} from {ev.device}: {problem}")
            devices.refuse_input(self, ev, exc, round=msg.round, step=msg.step)
        return bool(problem)

    def stepped(self, e: Entry, done: StepDone) -> None:
        """After a step, trained here or on the trainer."""
        if done.error is not None:
            raise done.error
        self.move(e, E.STEP)
        session, job = done.job.session, done.job
        if not done.trained:
            self.events.emit("step_replayed", device=e.device, round=job.round, step=job.step)
        elif self.checkpoint_steps and session.step % self.checkpoint_steps == 0:
            self.recovery.replicate(session)

    # -- table -------------------------------------------------------------------------------

    def entry(self, device: str) -> Entry:
        """``device``'s entry (a new one, GONE, if it has none)."""
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
            attach.on_attach(self, att)

    def stop(self, stop: Stop) -> None:
        """The run ends here: every device link is told (``closing``: the server waits for them)."""
        if self.stopped is not None:
            return
        self.stopped = stop
        self.events.emit("shutdown", reason=stop.reason)
        for e in self.entries.values():
            if e.port is not None:
                e.port.close(notice=m.Shutdown(reason=stop.reason))
                self.closing.append(e.port)

    # -- what the core's parts ask of it (edge.attach, edge.devices, edge.rounds, edge.handover) --

    def reply(self, e: Entry, *, ok: bool = True, reason: str = "", action: str = "wait", round: int = 0,
               resume_step: int = 0, how: str = "", state_bytes: int = 0, transfer_ms: float = 0.0) -> None:
        assert e.port is not None
        waits = action == "continue" and e.session is not None and e.session.round == round \
            and e.session.awaits_state
        e.port.post(m.AttachReply(ok=ok, reason=reason, run_name=self.run_name or "", mode=self.mode, action=action,
                                  round=round, resume_step=resume_step, how=how, state_bytes=state_bytes,
                                  transfer_ms=transfer_ms, client_state=waits))

    def begin_resume(self, e: Entry, req: m.AttachRequest, *, attached: bool = False) -> None:
        """Decide ``e``'s attach again (after a fetch's outcome): ``edge.attach.begin_resume``."""
        attach.begin_resume(self, e, req, attached=attached)

    def fresh(self, e: Entry, info: RoundInfo, step: int) -> None:
        """``e``'s session of the round from its weights, at ``step``: ACTIVE (DETACHED if
        the device is not linked)."""
        e.session = rounds.new_session(self, e.device, info)
        e.session.step = step
        self.move(e, E.FRESH)

    def takes_part(self, device: str, r: int) -> bool:
        info = self.current
        return (info is not None and info.round == r and device in info.plan.participants
                and self.delivered.get(device, 0) < r)

    def refill(self) -> None:
        """The spare part was taken: another one, later (``SparePart.refill_soon``)."""
        if self.spare is not None:
            self.spare.refill_soon()

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

    def _on_peer_lost(self, ev: PeerLost) -> None:
        self.handover.peer_lost(ev.port)

"""Every message of the wire protocol: one frozen dataclass each, validated when built.

Pairs are named by direction. A field annotated ``Tensors`` travels as raw tensor bytes;
every other field travels in the msgpack header. ``to_wire``/``from_wire`` are the one
place where messages become wire values and back (the codec frames them).

Construction checks every field's type (and the few value rules below) and raises
``LocalProtocolError``; the decoder turns that into ``RemoteProtocolError`` for messages
that came from a peer.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import sys
import typing
from typing import TYPE_CHECKING, Any, ClassVar

from common.errors import LocalProtocolError
from common.plan import RoundPlan

if TYPE_CHECKING:
    import torch

    Tensors = dict[str, torch.Tensor]
else:
    class _Tensor:
        """Stands for ``torch.Tensor`` in the ``Tensors`` hint: this module does not import
        torch, so that processes which only send control messages (the mobility
        controller, the launcher) start without it."""

    Tensors = dict[str, _Tensor]
JSON = Any  # msgpack-able plain data: None, bool, int, float, str, list, dict[str, ...]

_TENSOR = typing.get_args(Tensors)[1]
_MAX_JSON_DEPTH = 16  # plain data nests a few levels; deeper is a peer trying to exhaust the stack
MESSAGE_TYPES: dict[str, type["Message"]] = {}


class Scope(enum.Enum):
    """What a message belongs to, for the edge's rule "a device's events wait while its
    step trains" (``edge.core``): every message type declares one (``SCOPE``)."""
    SESSION = "session"  # one device's session: the device its ``device`` field names, or
    #                      (a message without one, on a device's own link) that link's device
    EDGE = "edge"        # the whole edge: it waits for any step in training, and all after it
    FREE = "free"        # orders with no step (changes no session): handled at once


class Message:
    """Base of all messages. ``TYPE`` is the name on the wire; ``SCOPE`` what it belongs
    to (declared by every message type; None: undeclared)."""

    TYPE: ClassVar[str] = ""
    SCOPE: ClassVar[Scope | None] = None


def message(cls: type) -> type:
    """Class decorator: a frozen, keyword-only dataclass registered under its class name."""
    cls = dataclasses.dataclass(frozen=True, kw_only=True)(cls)
    cls.TYPE = cls.__name__
    hints = typing.get_type_hints(cls)
    cls._hints = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    MESSAGE_TYPES[cls.TYPE] = cls
    return cls


def _check_json(where: str, value: object, depth: int = 0) -> None:
    if depth > _MAX_JSON_DEPTH:
        raise LocalProtocolError(f"{where}: nested deeper than {_MAX_JSON_DEPTH}")
    if type(value) is int and not -(1 << 63) <= value < (1 << 64):
        raise LocalProtocolError(f"{where}: {value} does not fit in 64 bits")
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        return
    if isinstance(value, list):
        for v in value:
            _check_json(where, v, depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise LocalProtocolError(f"{where}: map key {k!r} is not a string")
            _check_json(where, v, depth + 1)
        return
    raise LocalProtocolError(f"{where}: {type(value).__name__} is not plain data")


def _check(where: str, value: object, hint: object) -> object:
    """Check ``value`` against ``hint``; return it normalised (int -> float, tuple -> list)."""
    if hint is Any:
        _check_json(where, value)
        return value
    if hint is bool:
        if type(value) is not bool:
            raise LocalProtocolError(f"{where}: expected bool, got {type(value).__name__}")
        return value
    if hint is int:
        if type(value) is not int:
            raise LocalProtocolError(f"{where}: expected int, got {type(value).__name__}")
        if not -(1 << 63) <= value < (1 << 63):
            raise LocalProtocolError(f"{where}: {value} does not fit in 64 bits")
        return value
    if hint is float:
        if type(value) is int:
            return float(value)
        if type(value) is not float:
            raise LocalProtocolError(f"{where}: expected float, got {type(value).__name__}")
        return value
    if hint is str:
        if type(value) is not str:
            raise LocalProtocolError(f"{where}: expected str, got {type(value).__name__}")
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise LocalProtocolError(f"{where}: expected a list, got {type(value).__name__}")
        return [_check(f"{where}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict and args[1] is _TENSOR:
        if not isinstance(value, dict):
            raise LocalProtocolError(f"{where}: expected a map of tensors")
        # no tensor can exist in a process that has not imported torch
        tensor_type = getattr(sys.modules.get("torch"), "Tensor", None)
        for k, v in value.items():
            if not isinstance(k, str) or tensor_type is None or not isinstance(v, tensor_type):
                raise LocalProtocolError(f"{where}: entry {k!r} is not a named tensor")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise LocalProtocolError(f"{where}: expected a map, got {type(value).__name__}")
        return {_check(f"{where} key", k, args[0]): _check(f"{where}[{k!r}]", v, args[1]) for k, v in value.items()}
    raise LocalProtocolError(f"{where}: unsupported field type {hint}")  # pragma: no cover


def is_tensors(hint: object) -> bool:
    """True if a field of this hint (``Tensors``) travels as raw tensor bytes."""
    return typing.get_origin(hint) is dict and typing.get_args(hint)[1] is _TENSOR


def _validate(self: Message) -> None:
    for name, hint in self._hints.items():
        value = _check(f"{self.TYPE}.{name}", getattr(self, name), hint)
        object.__setattr__(self, name, value)
        if isinstance(value, float) and not math.isfinite(value) and name not in self._nonfinite:
            raise LocalProtocolError(f"{self.TYPE}.{name}: {value} is not finite")
        if name in ("round", "step", "samples", "state_bytes", "batch_size", "local_epochs") and isinstance(value, int) and value < 0:
            raise LocalProtocolError(f"{self.TYPE}.{name}: {value} is negative")
    self.check()


Message.__post_init__ = _validate  # type: ignore[attr-defined]
Message._nonfinite = frozenset()  # type: ignore[attr-defined]
Message.check = lambda self: None  # type: ignore[attr-defined]


def to_wire(msg: Message) -> tuple[dict[str, object], list[tuple[str, str, torch.Tensor]]]:
    """Split a message into header fields and ``(field, key, tensor)`` triples."""
    fields: dict[str, object] = {}
    tensors: list[tuple[str, str, torch.Tensor]] = []
    for name, hint in msg._hints.items():
        value = getattr(msg, name)
        if is_tensors(hint):
            tensors.extend((name, k, t) for k, t in value.items())
        else:
            fields[name] = value
    return fields, tensors


def from_wire(type_name: str, fields: dict, tensors: list[tuple[str, str, torch.Tensor]]) -> Message:
    """Build the message named ``type_name``; raises ``LocalProtocolError`` if it is not valid."""
    cls = MESSAGE_TYPES.get(type_name)
    if cls is None:
        raise LocalProtocolError(f"unknown message type {type_name!r}")
    if not all(type(k) is str for k in fields):
        raise LocalProtocolError(f"{type_name}: a field name is not a string")
    kwargs: dict[str, object] = dict(fields)
    tensor_fields = {n for n, h in cls._hints.items() if is_tensors(h)}
    if set(kwargs) & tensor_fields or set(kwargs) | tensor_fields != set(cls._hints):
        raise LocalProtocolError(f"{type_name}: fields {sorted(fields)} do not match {sorted(cls._hints)}")
    for name in tensor_fields:
        kwargs[name] = {}
    for field, key, t in tensors:
        if field not in tensor_fields or key in kwargs[field]:
            raise LocalProtocolError(f"{type_name}: unexpected or repeated tensor {field}/{key}")
        kwargs[field][key] = t
    return cls(**kwargs)


# --------------------------------------------------------------------------------------
# Any peer
# --------------------------------------------------------------------------------------

@message
class ErrorNotice(Message):
    """Sent, best effort, just before closing a connection because of ``kind``."""
    SCOPE = Scope.FREE
    kind: str
    detail: str


@message
class Heartbeat(Message):
    """Any peer, on an otherwise idle link: "still here". Consumed by the transport."""
    SCOPE = Scope.FREE


@message
class Shutdown(Message):
    """central -> edge -> device: the run is over (or aborted), exit cleanly."""
    SCOPE = Scope.EDGE
    reason: str


@message
class Replaced(Message):
    """edge -> device, on the older of two links of one device: a newer connection of
    the device took this one's place, and this one closes. Not the run's end: a device
    that has left this link ignores it; a process still using it is a second process with
    the device's name, which stops with an error and leaves the device's checkpoint be."""
    SCOPE = Scope.SESSION


# --------------------------------------------------------------------------------------
# edge <-> central
# --------------------------------------------------------------------------------------

@message
class EdgeHello(Message):
    """edge -> central: first message; names the edge (again, after a lost link)."""
    SCOPE = Scope.EDGE
    edge: str


@message
class Welcome(Message):
    """central -> edge, edge -> device: the run's name (for the run folder) and mode."""
    SCOPE = Scope.EDGE
    run_name: str
    mode: str


@message
class EdgeStatus(Message):
    """edge -> central: which devices are attached to it now."""
    SCOPE = Scope.EDGE
    edge: str
    attached: list[str]


def _check_plan(where: str, plan: object) -> None:
    RoundPlan.from_wire(plan)  # raises LocalProtocolError naming the bad field


@message
class RoundStart(Message):
    """central -> edge: round ``plan['round']`` begins from these global weights (the
    full model). ``algo``: the strategy's tensors for the round ("*/tag/key" every
    device's: SCAFFOLD's ``c``; "DEVICE/tag/key": what goes back to that participant for
    its update of round ``adopt[DEVICE]``, the last the central aggregated: SCAFFOLD's
    ``delta``, the whole model; empty for most, ``common.strategies``). Sent again to an
    edge that rejoins during the round."""
    SCOPE = Scope.EDGE
    plan: JSON
    weights: Tensors
    algo: Tensors = dataclasses.field(default_factory=dict)
    adopt: dict[str, int] = dataclasses.field(default_factory=dict)

    def check(self) -> None:
        _check_plan("RoundStart", self.plan)

    @property
    def round_plan(self) -> RoundPlan:
        return RoundPlan.from_wire(self.plan)


@message
class DeviceUpdate(Message):
    """edge -> central: one device's full weights at the end of a round. Resent after a
    lost link until ``UpdateAck``; the central takes each (device, round) once."""
    SCOPE = Scope.SESSION
    round: int
    device: str
    edge: str
    samples: int
    steps: int
    train_seconds: float
    weights: Tensors


@message
class UpdateAck(Message):
    """central -> edge: the update of ``device`` for ``round`` is safe (or not needed)."""
    SCOPE = Scope.SESSION
    round: int
    device: str


@message
class MigrationReport(Message):
    """device -> its new edge -> central: one finished move, for the results."""
    SCOPE = Scope.SESSION
    device: str
    source: str
    target: str
    round: int
    step: int
    mode: str
    pause_ms: float
    state_bytes: int
    transfer_ms: float
    how: str = ""  # the ``AttachReply.how`` that ended the move: what served it ("pulled", "relayed", ...)
    # stamped by the edge that forwards it: who delivered it (``edge.reports``)
    delivered_by: str = ""


FAULT_KINDS = ("link_lost", "peer_silent", "edge_lost", "device_lost", "device_dropped", "central_lost",
               "handover_failed", "restarted", "protocol_error")


@message
class FaultReport(Message):
    """Any process -> (its edge ->) central: one fault and what it cost, for the results.
    ``protocol_error``: an edge closed a device's link for what it sent (``peer``: the device).
    ``detected_s``: from the peer's last sign of life to the fault being noticed;
    ``down_s``: from the fault to the work going on again (the device's pause);
    ``replayed``: steps done again; ``recovery``: how it went on; ``samples_lost``: samples
    of training that did not reach the round. The defaults (a fault noticed at once, that
    cost nothing) are for the sender's convenience: on the wire every field is present."""
    SCOPE = Scope.SESSION
    kind: str
    process: str
    peer: str
    round: int
    step: int
    detail: str = ""
    detected_s: float = 0.0
    down_s: float = 0.0
    replayed: int = 0
    recovery: str = ""
    samples_lost: int = 0
    # stamped by the edge that forwards it (``edge.reports``): the identity of the link it
    # came on, whatever the sender wrote here; ``edge NAME`` for the edge's own reports
    delivered_by: str = ""

    def check(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise LocalProtocolError(f"FaultReport.kind: {self.kind!r} not in {FAULT_KINDS}")


# --------------------------------------------------------------------------------------
# device <-> edge
# --------------------------------------------------------------------------------------

ATTACH_KINDS = ("join", "resume")
ATTACH_WHY = ("start", "move", "reconnect")
ATTACH_ACTIONS = ("continue", "wait", "done")


@message
class AttachRequest(Message):
    """device -> edge: attach. ``join``: the device holds no state of a round (start-up,
    a restarted process, or between rounds), ``last_round`` is the last round whose
    update it knows was taken (0: none or unknown). ``resume``: the device is in
    ``round`` at ``step`` (``step`` = its round's step count once its update is only
    waiting to be taken), and edge ``source`` is the last one that held its session.
    ``why`` is for the record: a planned move or a reconnect after a lost link.
    ``checkpoints``: the steps of ``round`` the device can roll back to (0 always; more
    with ``faults.checkpoint_steps``), for an edge that recovers its session from a replica."""
    SCOPE = Scope.SESSION
    device: str
    kind: str
    round: int
    step: int
    source: str
    last_round: int
    why: str
    checkpoints: list[int] = dataclasses.field(default_factory=list)
    run: str = ""  # the run the device's state belongs to ("": unknown); another run's is not resumed
    # this edge's key for the device's proofs of attachment (``common.security.edge_key``),
    # and for a resume the proofs for the other edges that this attach is real
    edge_key: str = ""
    proofs: dict[str, str] = dataclasses.field(default_factory=dict)

    def check(self) -> None:
        if self.kind not in ATTACH_KINDS:
            raise LocalProtocolError(f"AttachRequest.kind: {self.kind!r} not in {ATTACH_KINDS}")
        if self.why not in ATTACH_WHY:
            raise LocalProtocolError(f"AttachRequest.why: {self.why!r} not in {ATTACH_WHY}")


@message
class AttachReply(Message):
    """edge -> device: attached (``ok``) or refused with ``reason``. ``action``:
    ``continue`` round ``round`` at ``resume_step`` (lower than the device's step: roll
    back; 0: the round again from its weights); ``wait`` for a round (none for this
    device now); ``done`` (its update of ``round`` was taken). ``how`` says where the
    session came from, with the bytes and milliseconds a move took. ``client_state``: the
    session was built here from the round's weights and waits for the device's kept
    state (``ClientState``) before its next step (SCAFFOLD's ``c_i``)."""
    SCOPE = Scope.SESSION
    ok: bool
    reason: str
    run_name: str
    mode: str
    action: str
    round: int
    resume_step: int
    how: str
    state_bytes: int
    transfer_ms: float
    client_state: bool = False

    def check(self) -> None:
        if self.action not in ATTACH_ACTIONS:
            raise LocalProtocolError(f"AttachReply.action: {self.action!r} not in {ATTACH_ACTIONS}")


@message
class DeviceRound(Message):
    """edge -> device: train round ``plan['round']`` from these weights (device part, or
    the whole model in mode classic). ``algo``: this device's share of the round's
    strategy tensors, for its part ("tag/key": SCAFFOLD's ``c/key``), and what the central
    returns for its update of round ``adopt`` (the last it aggregated, 0: none), for the
    whole model (SCAFFOLD's ``delta/key``); the device folds that in once
    (``common.strategies.base.KeptState``). Empty for most strategies. A device whose
    algorithm keeps a state sends its edge part (``ClientState``) before its first step."""
    SCOPE = Scope.SESSION
    plan: JSON
    weights: Tensors
    algo: Tensors = dataclasses.field(default_factory=dict)
    adopt: int = 0

    def check(self) -> None:
        _check_plan("DeviceRound", self.plan)
        if self.adopt < 0:
            raise LocalProtocolError("DeviceRound.adopt: a round is >= 0")

    @property
    def round_plan(self) -> RoundPlan:
        return RoundPlan.from_wire(self.plan)


@message
class ClientState(Message):
    """device -> edge: the device's kept state for the edge's part of round ``round``
    ("tag/key" for the parameters of that part: SCAFFOLD's ``ci/key``; empty: zero),
    sent after a ``DeviceRound`` and after an ``AttachReply`` with ``client_state``, before
    the next step. The edge sets its session's optimizer up with it; a session waiting
    for it trains no step."""
    SCOPE = Scope.SESSION
    round: int
    state: Tensors


@message
class StandBy(Message):
    """edge -> device: round ``round`` is over for you (the central moved on without
    your update); wait for a round."""
    SCOPE = Scope.SESSION
    round: int
    reason: str


@message
class Activations(Message):
    """device -> edge: step ``step``'s smashed data ``x`` and labels ``y``. A step sent
    again (after a lost link) is answered again, never trained twice."""
    SCOPE = Scope.SESSION
    round: int
    step: int
    batch: Tensors

    def check(self) -> None:
        if set(self.batch) != {"x", "y"}:
            raise LocalProtocolError("Activations.batch must hold exactly x and y")
        import torch  # loaded already: the fields were checked to be tensors

        x, y = self.batch["x"], self.batch["y"]
        if y.dtype != torch.int64 or y.dim() != 1 or x.dim() < 2 or x.shape[0] != y.shape[0] or not x.is_floating_point():
            raise LocalProtocolError("Activations.batch: x must be float [n, ...] and y int64 [n]")


@message
class Gradients(Message):
    """edge -> device: the gradient at the cut for step ``step``, and the batch loss."""
    SCOPE = Scope.SESSION
    round: int
    step: int
    loss: float
    grad: Tensors

    _nonfinite = frozenset({"loss"})  # a diverging run is data, not a protocol error


@message
class DeviceDone(Message):
    """device -> edge: the device's part of its model after the round. Sent again after
    a lost link until ``DoneAck``."""
    SCOPE = Scope.SESSION
    round: int
    samples: int
    steps: int
    train_seconds: float
    weights: Tensors


@message
class Leaving(Message):
    """device -> its edge, the last message on the link before a planned move (the link
    closes after it): the device stops at ``round``/``step`` and goes to edge ``to``. In
    mode fedfly the edge offers the session to ``to`` at once (``OfferNotice``), so that
    its bytes travel while the device connects there."""
    SCOPE = Scope.SESSION
    round: int
    step: int
    to: str


@message
class DoneAck(Message):
    """edge -> device: the central has the update of ``round``."""
    SCOPE = Scope.SESSION
    round: int


# --------------------------------------------------------------------------------------
# edge <-> edge (migration)
# --------------------------------------------------------------------------------------

@message
class SessionPull(Message):
    """destination -> source: hand over ``device``'s session, which must be at
    ``round``/``step`` (or one step further, with the reply to ``step`` kept).
    ``proofs``: the device's, that it attached to ``target`` in ``round``."""
    SCOPE = Scope.SESSION
    device: str
    round: int
    step: int
    target: str
    proofs: dict[str, str] = dataclasses.field(default_factory=dict)


@message
class SessionDrop(Message):
    """destination -> source (modes restart and classic): forget ``device``'s session of
    ``round``. ``proofs``: as ``SessionPull``'s."""
    SCOPE = Scope.SESSION
    device: str
    round: int
    target: str
    proofs: dict[str, str] = dataclasses.field(default_factory=dict)


@message
class SessionSnapshot(Message):
    """source -> destination: the whole session; ``checksum`` is SHA-256 over meta and tensors."""
    SCOPE = Scope.SESSION
    device: str
    round: int
    step: int
    meta: JSON
    checksum: str
    state: Tensors


@message
class SessionReplica(Message):
    """edge -> its buddy edge, one way: a copy of ``device``'s session at ``step``, kept
    for the day the edge dies (``faults.checkpoint_steps``). ``target``: the sender;
    ``edge_key``: its key for the device's proofs (a replica pull must prove an attach)."""
    SCOPE = Scope.SESSION
    device: str
    round: int
    step: int
    target: str
    meta: JSON
    checksum: str
    state: Tensors
    edge_key: str = ""


@message
class ReplicaPull(Message):
    """an edge that took over a device of a dead edge -> that edge's buddy: its replica
    of ``device``'s session in ``round``, at one of ``steps`` (where the device can roll
    back to). Answered with ``SessionSnapshot`` (a copy: the buddy keeps it) or ``PullRefused``."""
    SCOPE = Scope.SESSION
    device: str
    round: int
    steps: list[int]
    target: str
    proofs: dict[str, str] = dataclasses.field(default_factory=dict)


@message
class PeerHello(Message):
    """edge -> edge, first on a link an edge opens to another ahead of need (at a round's
    start, to offer sessions on later): who opens it. A link on which nothing came first
    would be closed by the other edge after twice ``dead_after_s`` (heartbeats say nothing
    of who is there). ``target``: the sender."""
    SCOPE = Scope.FREE
    target: str


@message
class OfferNotice(Message):
    """source -> destination, one way: ``device`` left us at ``round``/``step`` naming you;
    its session follows as ``SessionOffer`` on this link. A device that attaches to you
    naming us at that position waits for it instead of pulling. ``target``: the sender."""
    SCOPE = Scope.SESSION
    device: str
    round: int
    step: int
    target: str


@message
class SessionOffer(Message):
    """source -> destination: the session an ``OfferNotice`` announced (as a
    ``SessionSnapshot``, its checksum still being computed as it goes: ``OfferSealed``
    follows). Answered, on the same link, with ``SessionInstalled`` once the device
    attached and the copy is verified against that checksum, or with ``OfferDeclined``."""
    SCOPE = Scope.SESSION
    device: str
    round: int
    step: int
    target: str
    meta: JSON
    state: Tensors


@message
class OfferSealed(Message):
    """source -> destination, right after ``SessionOffer``: its checksum (SHA-256 over meta
    and tensors, as ``SessionSnapshot.checksum``), computed while the offer was sent."""
    SCOPE = Scope.SESSION
    device: str
    round: int
    step: int
    target: str
    checksum: str


@message
class OfferDeclined(Message):
    """destination -> source: the offered session of ``device`` will not be used (the
    device did not come, came at another position, or the copy failed its checks);
    the source keeps it for a pull."""
    SCOPE = Scope.SESSION
    device: str
    round: int
    step: int


@message
class SessionInstalled(Message):
    """destination -> source: installed, with the checksum it verified. The source drops it."""
    SCOPE = Scope.SESSION
    device: str
    round: int
    step: int
    checksum: str


@message
class SessionReleased(Message):
    """source -> destination: the session is gone from the source; the destination owns it."""
    SCOPE = Scope.SESSION
    device: str


@message
class PullRefused(Message):
    """source -> destination: no session to hand over. ``reason`` is free text for the
    record, never read by the protocol. ``moved_to``: it went on to that edge (ask there);
    ``delivered``: its update of ``round`` was taken already; ``offered``: it is on its way
    to the asker already, offered when the device left (wait for that copy)."""
    SCOPE = Scope.SESSION
    device: str
    reason: str
    moved_to: str
    delivered: bool
    offered: bool = False


# --------------------------------------------------------------------------------------
# edge <-> edge (relay: the session stays where it is; ``edge.handover.relay``)
# --------------------------------------------------------------------------------------

@message
class RelayOpen(Message):
    """the edge a device attached to -> the edge that holds its session: serve ``device``'s
    session at ``round``/``step`` through me (its steps and its round's end come relayed on
    this link). ``proofs``: as ``SessionPull``'s. Answered with ``RelayAnswer``."""
    SCOPE = Scope.SESSION
    device: str
    round: int
    step: int
    target: str
    proofs: dict[str, str] = dataclasses.field(default_factory=dict)


@message
class RelayAnswer(Message):
    """holder -> relaying edge: ``opened``: the session is served through you from
    ``step`` on. Not opened: as ``PullRefused`` (``moved_to``: it went on to that edge;
    ``delivered``: its update of ``round`` was taken already)."""
    SCOPE = Scope.SESSION
    device: str
    round: int
    step: int
    opened: bool
    moved_to: str
    delivered: bool


@message
class RelayStep(Message):
    """relaying edge -> holder: the device's ``Activations``, as they came."""
    SCOPE = Scope.SESSION
    device: str
    round: int
    step: int
    batch: Tensors


@message
class RelayGradients(Message):
    """holder -> relaying edge: the ``Gradients`` for the device."""
    SCOPE = Scope.SESSION
    device: str
    round: int
    step: int
    loss: float
    grad: Tensors

    _nonfinite = frozenset({"loss"})


@message
class RelayDone(Message):
    """relaying edge -> holder: the device's ``DeviceDone``, as it came."""
    SCOPE = Scope.SESSION
    device: str
    round: int
    samples: int
    steps: int
    train_seconds: float
    weights: Tensors


@message
class RelayDoneAck(Message):
    """holder -> relaying edge: the device's ``DoneAck``; the relay of ``round`` ends."""
    SCOPE = Scope.SESSION
    device: str
    round: int


# --------------------------------------------------------------------------------------
# mobility controller <-> device
# --------------------------------------------------------------------------------------

@message
class MoveCommand(Message):
    """controller -> device: move to edge ``to`` at the next step boundary."""
    SCOPE = Scope.FREE
    device: str
    to: str


@message
class DropCommand(Message):
    """controller -> device: lose the link to your edge now, at whatever byte (a radio
    loss: the device goes silent), for ``seconds``; then reconnect to ``to`` ('' = as
    ``faults.reconnect`` says)."""
    SCOPE = Scope.FREE
    device: str
    seconds: float
    to: str

    def check(self) -> None:
        if not 0 <= self.seconds <= 86400:
            raise LocalProtocolError(f"DropCommand.seconds: {self.seconds} is not in [0, 86400]")


@message
class MoveReply(Message):
    """device -> controller: accepted, or refused with the reason; ``edge`` is where it is."""
    SCOPE = Scope.FREE
    accepted: bool
    reason: str
    edge: str


@message
class StatusRequest(Message):
    """controller -> device: where are you?"""
    SCOPE = Scope.FREE


# "connecting": before the device's first attach; "reconnecting": after a link it had was lost
LINK_STATES = ("connecting", "attached", "reconnecting", "cut", "idle")


@message
class StatusReply(Message):
    """device -> controller: current edge, round, step (of ``steps`` in the round; equal
    once the round's work is done), a pending move target or '', and the state of its
    link to the edge."""
    SCOPE = Scope.FREE
    device: str
    edge: str
    round: int
    step: int
    steps: int
    pending: str
    link: str

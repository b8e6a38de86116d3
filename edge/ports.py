"""What the edge's core sees of the world: the events it handles and the ports it sends
through (Flower's ``ClientProxy`` idea). The server wires real links to them; tests
stand fakes in their place and drive the core with events, with no socket at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from common import messages as m
from edge.session import EdgeSession


class Port(Protocol):
    """A peer's end of a link: the device's, or another edge's. ``post`` only queues."""

    name: str

    def post(self, msg: m.Message) -> bool: ...

    def close(self, notice: m.Message | None = None, *, drain: bool = True) -> None: ...


class CentralPort(Protocol):
    def send(self, msg: m.Message) -> None:
        """Best effort now; status and reports are sent again after a lost link."""

    def deliver(self, update: m.DeviceUpdate) -> None:
        """Kept and sent again after a lost link until ``acked``."""

    def acked(self, device: str, round: int) -> None: ...

    def round_started(self, round: int) -> None:
        """Updates of earlier rounds need not be kept any more."""


class Fetcher(Protocol):
    """Fetches sessions from other edges, off the core's thread; every outcome comes back
    as a ``PullOutcome`` event."""

    def pull(self, *, device: str, source: str, round: int, step: int, token: int,
             proofs: dict[str, str]) -> None: ...

    def drop(self, *, device: str, source: str, round: int, proofs: dict[str, str]) -> None: ...

    def pull_replica(self, *, device: str, source: str, round: int, steps: list[int], token: int,
                     proofs: dict[str, str]) -> None:
        """A copy of the session at one of ``steps``, from ``source``'s replicas."""

    def replicate(self, device: str, round: int, step: int, meta: dict, tensors: dict, *,
                  edge_key: str = "") -> None:
        """Send a copy of a session (already detached from the live one) to the buddy."""

    def offer_link(self, peer: str) -> Port | None:
        """The kept link to ``peer``, open now, to offer a session on; None if there is none
        (one is opened for next time)."""

    def prepare_offer(self, *, device: str, source: str, offer: m.SessionOffer, checksum: str) -> object:
        """Start verifying and rebuilding an offered session now, off the core's thread
        (before its device attaches: the session came while the device still computed);
        returns the handle ``take_offer`` takes."""

    def take_offer(self, *, device: str, source: str, token: int, offer: m.SessionOffer, checksum: str, port: Port,
                   since: float, prepared: object) -> None:
        """The device came for the offer ``prepared``: its outcome comes back as a
        ``PullOutcome`` (``offered``) once verified and rebuilt, at once if it is already.
        A copy that fails its checks is declined on ``port``; one that passes carries the
        ``SessionInstalled`` for ``port`` (``PullOutcome.confirm``), which the core sends
        once it has installed it."""


# -- events ---------------------------------------------------------------------------------

@dataclass
class DeviceAttach:
    port: Port
    req: m.AttachRequest
    at: float = 0.0


@dataclass
class DeviceMessage:
    port: Port
    device: str
    msg: m.Message


@dataclass
class DeviceLost:
    port: Port
    device: str
    error: Exception
    silent_s: float = 0.0   # how long the device had said nothing when it was declared gone


@dataclass
class PeerMessage:
    port: Port
    msg: m.Message


@dataclass
class PeerLost:
    port: Port


@dataclass
class PullOutcome:
    device: str
    token: int
    source: str
    session: EdgeSession | None = None
    refused: m.PullRefused | None = None
    error: str = ""
    state_bytes: int = 0
    transfer_ms: float = 0.0
    replica: bool = False   # a copy from a dead edge's buddy (at a checkpoint step), not the session
    offered: bool = False   # the session its source offered when the device left (not pulled)
    # an offered session's (port, confirmation, refusal): the core sends the confirmation
    # on the port once it installed the session, the refusal if it does not install it
    confirm: "tuple[Port, m.Message, m.Message] | None" = None


@dataclass
class CentralMessage:
    msg: m.Message


@dataclass
class CentralUp:
    run_name: str
    mode: str


@dataclass
class CentralDown:
    detail: str


@dataclass
class Stop:
    reason: str
    status: int = 0


@dataclass
class Tick:
    pass


def scope_of(ev: object) -> tuple[m.Scope, str | None]:
    """What an event belongs to, as its message declares (``Message.SCOPE``), and for
    a session the device (what waits for a step: ``EdgeCore._waits``). A type with no
    declaration counts as the whole edge's."""
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


@dataclass
class Outbox:
    """A port that keeps what was posted (tests, and a device's port before it is linked)."""
    name: str
    sent: list[m.Message] = field(default_factory=list)
    closed: bool = False
    notice: m.Message | None = None

    def post(self, msg: m.Message) -> bool:
        if self.closed:
            return False
        self.sent.append(msg)
        return True

    def close(self, notice: m.Message | None = None, *, drain: bool = True) -> None:
        if not self.closed:
            self.notice = notice
            self.closed = True

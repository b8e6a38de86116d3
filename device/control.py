"""The device's control port: the mobility controller's way in.

Every connection is authenticated with the testbed key and has a deadline. A
``MoveCommand`` is checked here and, if valid, left as a pending move that the training
loop takes at its next step boundary (or at step 0 of the next round when the device is
between rounds; or, while the device is reconnecting, as the place to reconnect to). A
``DropCommand`` cuts the device's link at once (``EdgeLink.cut``): an emulated radio loss.
``StatusRequest`` answers where the device is and how its link is.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

from common import messages as m
from common import transport
from common.door import REFUSED, admit, refuse
from common.errors import ConnectionClosed, ProtocolError, RemoteProtocolError, TransportError
from common.limits import refusal_reporter
from common.security import Credentials

# A controller connection must say something this often (it sends one request and waits).
CONTROL_IDLE_S = 30.0


@dataclass
class Position:
    """Where the device is; shared by the training loop, its link and the control thread."""
    edge: str
    round: int = 0
    step: int = 0
    steps: int = 0
    pending: str | None = None
    link: str = "connecting"     # one of messages.LINK_STATES; "attached" once an edge took it
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take_pending(self) -> str | None:
        with self.lock:
            to, self.pending = self.pending, None
            return to

    def peek_pending(self) -> str | None:
        with self.lock:
            return self.pending


def check_move(pos: Position, *, device: str, edges: list[str], cmd: m.MoveCommand) -> str:
    """The reason to refuse ``cmd``, or '' to accept it (caller holds ``pos.lock``)."""
    if cmd.device != device:
        return f"this is device {device}, not {cmd.device}"
    if cmd.to not in edges:
        return f"unknown edge {cmd.to!r} (edges: {', '.join(sorted(edges))})"
    if pos.pending is not None:
        return f"a move to {pos.pending} is already pending"
    if cmd.to == pos.edge and pos.link not in ("connecting", "reconnecting"):  # on it only once attached
        return f"{device} is already on {cmd.to}"
    return ""


def check_drop(*, device: str, edges: list[str], cmd: m.DropCommand) -> str:
    if cmd.device != device:
        return f"this is device {device}, not {cmd.device}"
    if cmd.to and cmd.to not in edges:
        return f"unknown edge {cmd.to!r} (edges: {', '.join(sorted(edges))})"
    return ""


class ControlServer:
    def __init__(self, *, host: str, port: int, creds: Credentials, device: str, edges: list[str], pos: Position,
                 events, cut: Callable[[float, str], None], handshake_timeout: float | None = None,
                 on_move: Callable[[str], None] | None = None) -> None:
        self.device = device
        self.edges = edges
        self.pos = pos
        self.events = events
        self.cut = cut
        self.on_move = on_move  # an accepted move, before the training loop takes it (preconnect)
        self.listener = transport.Listener(host, port, creds=creds, handler=self._serve, name=f"{device}-control",
                                           handshake_timeout=handshake_timeout,
                                           on_reject=refusal_reporter(events=events))

    def start(self) -> "ControlServer":
        self.listener.start()
        return self

    def close(self) -> None:
        self.listener.close()

    def _serve(self, conn: transport.Connection) -> None:
        conn.idle_timeout = CONTROL_IDLE_S
        conn.send_timeout = CONTROL_IDLE_S
        # only the mobility controller moves devices (its certificate says so: no first message needed)
        if not admit(conn, self.events, "controller", why=f"{conn.identity} is not the controller",
                     told=f"{REFUSED}: only the controller"):
            return
        try:
            while True:
                msg = conn.recv()
                if isinstance(msg, m.MoveCommand):
                    with self.pos.lock:
                        reason = check_move(self.pos, device=self.device, edges=self.edges, cmd=msg)
                        if not reason:
                            self.pos.pending = msg.to
                        edge = self.pos.edge
                    self.events.emit("move_command", to=msg.to, accepted=not reason, reason=reason)
                    if not reason and self.on_move is not None:
                        self.on_move(msg.to)
                    conn.send(m.MoveReply(accepted=not reason, reason=reason, edge=edge))
                elif isinstance(msg, m.DropCommand):
                    reason = check_drop(device=self.device, edges=self.edges, cmd=msg)
                    self.events.emit("drop_command", seconds=msg.seconds, to=msg.to, accepted=not reason,
                                     reason=reason)
                    if not reason:
                        self.cut(msg.seconds, msg.to)
                    with self.pos.lock:
                        edge = self.pos.edge
                    conn.send(m.MoveReply(accepted=not reason, reason=reason, edge=edge))
                elif isinstance(msg, m.StatusRequest):
                    with self.pos.lock:
                        reply = m.StatusReply(device=self.device, edge=self.pos.edge, round=self.pos.round,
                                              step=self.pos.step, steps=self.pos.steps,
                                              pending=self.pos.pending or "", link=self.pos.link)
                    conn.send(reply)
                else:
                    refuse(conn, self.events, RemoteProtocolError(f"control port takes MoveCommand, DropCommand "
                                                                  f"or StatusRequest, not {msg.TYPE}"))
                    return
        except ConnectionClosed:
            return
        except (ProtocolError, TransportError) as exc:
            refuse(conn, self.events, exc)

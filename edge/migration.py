"""Moving a device's session between edges: both ends of the edge-to-edge exchange.

Destination B (``pull_session``)               Source A (``serve_pull``)
    SessionPull(device, round, step) ------->  freeze + snapshot (under the session lock)
                               <-------------  SessionSnapshot(meta, tensors, checksum)
    verify checksum, rebuild session
    SessionInstalled(checksum) ------------->  checksum matches: drop the session
                               <-------------  SessionReleased

A keeps the session until B has proved it holds an identical copy, so a failure at any
point leaves it on A (B discards its copy unless A has released). Modes restart and
classic do not move state: ``drop_remote``/``serve_drop`` make A forget the session so
the device's update can only come from B.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from common import messages as m
from common import transport
from common.errors import ConnectionClosed, MigrationError, ProtocolError, TransportError
from edge.session import EdgeSession, SparePart

# How long either side waits for the other's next message in a handover.
HANDOVER_TIMEOUT_S = 60.0


@dataclass
class PullResult:
    session: EdgeSession
    state_bytes: int
    transfer_ms: float


class PeerLinks:
    """Authenticated connections to the other edges, opened on first use and kept, so a
    migration does not pay a TCP connect and a handshake on the device's critical path.
    One handover at a time per peer (a lock per peer)."""

    def __init__(self, *, key: bytes, endpoints: dict[str, tuple[str, int]]) -> None:
        self._key = key
        self._endpoints = endpoints
        self._conns: dict[str, transport.Connection] = {}
        self._locks = {name: threading.Lock() for name in endpoints}

    def _open(self, peer: str) -> transport.Connection:
        host, port = self._endpoints[peer]
        try:
            conn = transport.connect(host, port, key=self._key, peer=f"edge {peer}", timeout=HANDOVER_TIMEOUT_S)
        except (TransportError, ProtocolError) as exc:
            raise MigrationError(f"cannot reach edge {peer}: {exc}") from exc
        self._conns[peer] = conn
        return conn

    @contextmanager
    def exchange(self, peer: str, first: m.Message) -> Iterator[transport.Connection]:
        """Send ``first`` to ``peer`` and yield the connection for the rest of the exchange.
        A kept connection that turns out dead (the peer restarted) is replaced once; any
        failure inside the exchange closes the connection."""
        if peer not in self._locks:
            raise MigrationError(f"{peer!r} is not an edge of this testbed")
        with self._locks[peer]:
            conn = self._conns.get(peer)
            try:
                if conn is None or conn.closed:
                    raise TransportError("no open link")
                conn.send(first)
            except TransportError:
                if conn is not None:
                    conn.close()
                conn = self._open(peer)
                try:
                    conn.send(first)
                except TransportError as exc:
                    conn.close()
                    raise MigrationError(f"cannot reach edge {peer}: {exc}") from exc
            try:
                yield conn
            except BaseException:
                conn.close()
                self._conns.pop(peer, None)
                raise

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()


def pull_session(links: PeerLinks, *, source: str, target: str, device: str, round: int, step: int,
                 model: str, split_layer: int, install: Callable[[EdgeSession], None],
                 spare: SparePart | None = None) -> PullResult:
    """Destination side. ``install(session)`` is called once the snapshot is verified and
    before A is told; if A then fails to release, the caller gets ``MigrationError`` and
    must uninstall. Raises ``MigrationError`` with the reason on any failure."""
    t0 = time.perf_counter()
    try:
        with links.exchange(source, m.SessionPull(device=device, round=round, step=step, target=target)) as conn:
            before = conn.bytes_received
            reply = conn.recv(timeout=HANDOVER_TIMEOUT_S)
            if isinstance(reply, m.PullRefused):
                raise MigrationError(f"{source} refused to hand over {device}: {reply.reason}")
            if not isinstance(reply, m.SessionSnapshot) or reply.device != device:
                raise MigrationError(f"{source} answered a pull with {reply.TYPE}")
            state_bytes = conn.bytes_received - before
            session = EdgeSession.from_snapshot(reply.meta, reply.state, reply.checksum,
                                                expect_model=model, expect_split=split_layer, spare=spare)
            if (session.device, session.round, session.step) != (device, round, step):
                raise MigrationError(f"snapshot is {session.device} round {session.round} step {session.step}, "
                                     f"expected {device} round {round} step {step}")
            install(session)
            conn.send(m.SessionInstalled(device=device, round=round, step=step, checksum=reply.checksum))
            done = conn.recv(timeout=HANDOVER_TIMEOUT_S)
            if not isinstance(done, m.SessionReleased) or done.device != device:
                raise MigrationError(f"{source} did not release {device} (answered {done.TYPE})")
    except (TransportError, ProtocolError, TimeoutError) as exc:
        raise MigrationError(f"handover of {device} from {source} failed: {exc}") from exc
    return PullResult(session, state_bytes, (time.perf_counter() - t0) * 1000)


def serve_pull(conn: transport.Connection, req: m.SessionPull, *, lookup: Callable[[str], EdgeSession | None],
               drop: Callable[[EdgeSession], None], unfreeze: Callable[[EdgeSession], None]) -> bool:
    """Source side of one pull. Returns True if the session was handed over and dropped."""
    session = lookup(req.device)
    if session is None:
        conn.send(m.PullRefused(device=req.device, reason=f"no session of {req.device} here"))
        return False
    if (session.round, session.step) != (req.round, req.step):
        conn.send(m.PullRefused(device=req.device, reason=f"session is at round {session.round} step "
                                f"{session.step}, not round {req.round} step {req.step}"))
        return False
    meta, tensors, checksum = session.snapshot()
    try:
        conn.send(m.SessionSnapshot(device=req.device, round=session.round, step=session.step,
                                    meta=meta, checksum=checksum, state=tensors))
        ack = conn.recv(timeout=HANDOVER_TIMEOUT_S)
    except (TransportError, ProtocolError, TimeoutError, ConnectionClosed):
        unfreeze(session)  # the target never confirmed: the session stays here, usable
        raise
    if not isinstance(ack, m.SessionInstalled) or ack.checksum != checksum:
        unfreeze(session)
        conn.send(m.ErrorNotice(kind="migration", detail="installed checksum does not match the snapshot"))
        return False
    drop(session)
    conn.send(m.SessionReleased(device=req.device))
    return True


def drop_remote(links: PeerLinks, *, source: str, target: str, device: str, round: int) -> float:
    """Destination side for modes restart/classic: make ``source`` forget the session.
    Returns the exchange's time in ms. Raises ``MigrationError``."""
    t0 = time.perf_counter()
    try:
        with links.exchange(source, m.SessionDrop(device=device, round=round, target=target)) as conn:
            done = conn.recv(timeout=HANDOVER_TIMEOUT_S)
            if not isinstance(done, m.SessionReleased):
                raise MigrationError(f"{source} did not drop {device}'s session (answered {done.TYPE})")
    except (TransportError, ProtocolError, TimeoutError) as exc:
        raise MigrationError(f"dropping {device}'s session on {source} failed: {exc}") from exc
    return (time.perf_counter() - t0) * 1000


def serve_drop(conn: transport.Connection, req: m.SessionDrop, *, drop_device: Callable[[str], None]) -> None:
    """Source side for modes restart/classic: forget the session, confirm."""
    drop_device(req.device)
    conn.send(m.SessionReleased(device=req.device))

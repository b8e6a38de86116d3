"""Framed, secured connections: moves bytes between a ``ByteStream`` and the codec.

``OSError`` is translated once, in ``common.stream``: a peer that goes away raises
``ConnectionClosed``; one that says nothing within its deadline raises ``PeerSilent`` (a
``ConnectionClosed``); garbage raises ``RemoteProtocolError`` from the codec. Every
connection is secured (``common.security``: TLS, or the shared key with a MAC on every
record) before its first frame is read, under one deadline for the whole handshake.

Liveness. A ``Connection`` may carry two deadlines: ``idle_timeout`` (the peer must send
something, a heartbeat at least, this often) and ``send_timeout`` (the peer must take
our bytes: a send that makes no progress for this long fails). ``Heartbeat`` messages are
consumed here and never reach callers; sending them is ``common.link``'s job.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Callable

from common import codec, limits, resolver
from common import messages as m
from common.errors import (ConnectionClosed, LocalProtocolError, PeerSilent, ProtocolError,
                           TransportError)
from common.security import Credentials, Identity
from common.stream import ByteStream, SocketStream

log = logging.getLogger(__name__)

# recv_into chunk: large enough that a 5 MB snapshot takes a handful of system calls.
RECV_CHUNK = 1 << 20
# Payload left to read at or above which the stream writes straight into the frame.
DIRECT_MIN = 64 << 10
# How long a peer may take for the whole handshake (not per read) before we hang up: a
# handshake is a few kilobytes and milliseconds of work, so this is a slow link's margin,
# while a stranger that stalls holds a handshake slot no longer.
HANDSHAKE_TIMEOUT_S = 10.0


class Connection:
    """One authenticated, framed connection. ``send`` is safe from several threads;
    ``recv`` is meant for one reader thread."""

    def __init__(self, stream: ByteStream | socket.socket, *, peer: str = "?", identity: Identity | None = None,
                 max_payload: int = codec.DEFAULT_MAX_PAYLOAD_BYTES, idle_timeout: float | None = None,
                 send_timeout: float | None = None) -> None:
        if isinstance(stream, socket.socket):
            stream = SocketStream(stream)
        self.stream = stream
        self.peer = peer
        # Who the peer proved to be (its certificate); None in the shared-key mode, where
        # any holder of the key is trusted as anyone (``security.allowed``).
        self.identity = identity
        self.idle_timeout = idle_timeout
        self.send_timeout = send_timeout
        self._decoder = codec.FrameDecoder(max_payload=max_payload)
        self._send_lock = threading.Lock()
        self._chunk = bytearray(RECV_CHUNK)
        self._closed = False
        self.bytes_sent = 0
        self.bytes_received = 0
        self.last_received = time.monotonic()  # any byte, heartbeats included
        self.last_sent = self.last_received

    def limit_payload(self, max_payload: int) -> None:
        """Refuse, from the next frame on, a payload over ``max_payload`` bytes with
        ``FrameTooLarge`` (``codec.FrameDecoder.limit_payload``)."""
        self._decoder.limit_payload(max_payload)

    @property
    def sock(self) -> socket.socket:
        """The socket underneath (tests write raw bytes to it)."""
        return self.stream.sock  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"<Connection to {self.peer}>"

    def send(self, msg: m.Message, *, block: bool = True) -> int:
        """Send one message whole; returns its size on the wire. With ``block=False``
        returns 0 at once when another thread is sending (for heartbeats: a busy
        connection is not idle). Raises ``ConnectionClosed`` (``PeerSilent`` when the
        peer took nothing for ``send_timeout``), ``LocalProtocolError`` after ``close``."""
        buffers = codec.encode(msg)
        if not self._send_lock.acquire(blocking=block):
            return 0
        try:
            if self._closed:
                raise LocalProtocolError(f"send {msg.TYPE} on a closed connection to {self.peer}")
            try:
                sent = self.stream.send_all(buffers, self.send_timeout)
            except PeerSilent as exc:
                raise PeerSilent(f"{self.peer} took none of our bytes for {self.send_timeout} s") from exc
            self.bytes_sent += sent
            self.last_sent = time.monotonic()
            return sent
        finally:
            self._send_lock.release()

    def recv(self, timeout: float | None = None) -> m.Message:
        """The next message (heartbeats are consumed here). ``timeout`` (seconds) raises
        ``TimeoutError`` and leaves the connection usable; the peer going away raises
        ``ConnectionClosed``, and its silence beyond ``idle_timeout`` ``PeerSilent``;
        garbage raises ``RemoteProtocolError``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            msg = self._decoder.next_message()
            if msg is not codec.NEED_DATA:
                if isinstance(msg, m.Heartbeat):
                    continue
                return msg  # type: ignore[return-value]
            if self._closed:
                raise ConnectionClosed(f"connection to {self.peer} was closed here")
            now = time.monotonic()
            wait = None if deadline is None else deadline - now
            if wait is not None and wait <= 0:
                raise TimeoutError(f"no message from {self.peer} within {timeout} s")
            if self.idle_timeout is not None:
                # bytes of a record still arriving (a secured stream's) count as life too
                heard = max(self.last_received, getattr(self.stream, "last_input", 0.0))
                quiet_left = heard + self.idle_timeout - now
                if quiet_left <= 0:
                    raise PeerSilent(f"{self.peer} sent nothing for {self.idle_timeout} s")
                wait = quiet_left if wait is None else min(wait, quiet_left)
            # Large payloads are received straight into the frame's buffer (no extra copy);
            # everything else goes through the chunk and the decoder.
            direct = self._decoder.payload_buffer()
            if direct is not None and len(direct) < DIRECT_MIN:
                direct = None
            try:
                n = self.stream.receive_into(memoryview(self._chunk) if direct is None else direct, wait)
            except TimeoutError:
                continue
            except ConnectionClosed:
                if self._closed:
                    raise ConnectionClosed(f"connection to {self.peer} was closed here") from None
                raise
            if n == 0:
                clean = self._decoder.at_frame_boundary
                self._decoder.receive_data(b"")
                if clean:
                    raise ConnectionClosed(f"{self.peer} closed the connection")
                self._decoder.next_message()  # raises: the stream ended inside a frame
            self.bytes_received += n
            self.last_received = time.monotonic()
            if direct is None:
                self._decoder.receive_data(memoryview(self._chunk)[:n])
            else:
                self._decoder.payload_written(n)

    def close(self, notice: m.Message | None = None) -> None:
        """Close; optionally send ``notice`` first (best effort, at most a second). Idempotent."""
        if notice is not None and not self._closed:
            saved, self.send_timeout = self.send_timeout, 1.0
            try:
                if self._send_lock.acquire(timeout=1.0):
                    self._send_lock.release()
                    self.send(notice)
            except Exception:  # the peer may be gone already: closing is all that is left
                pass
            finally:
                self.send_timeout = saved
        self._closed = True
        self.stream.close()

    def abort(self) -> None:
        """Close at once with a reset (what a crashed peer's kernel sends), for tests and
        for cutting a link on purpose."""
        self._closed = True
        getattr(self.stream, "abort", self.stream.close)()

    @property
    def closed(self) -> bool:
        return self._closed


def _tune(sock: socket.socket) -> None:
    # Small control messages must not wait for Nagle's algorithm: every step is a round trip.
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def connect(host: str, port: int, *, creds: Credentials, expect: Identity | None = None, peer: str, timeout: float = 10.0,
            retry_for: float = 0.0, idle_timeout: float | None = None,
            send_timeout: float | None = None, first: m.Message | None = None) -> Connection:
    """Open a TCP connection to ``host:port`` and secure it (``creds``; the peer must
    prove it is ``expect``), within ``timeout`` for the connect and ``timeout`` for the
    handshake. Retries refused connections for up to ``retry_for`` seconds (peers start in
    any order). The name is looked up through ``resolver.RESOLVER`` (cached, so that no
    lookup sits on a move's path). Raises ``ConnectionClosed`` if nobody answers (``PeerSilent`` if a
    listener never completes the handshake: a stopped host), ``AuthenticationError`` if
    the peer is not who we expect or refuses us. ``first``: a message sent with our last
    handshake flight (``Credentials.client``), a round trip sooner than after the
    connection is up (a device's attach, on a move's path)."""
    deadline = time.monotonic() + retry_for
    while True:
        try:
            sock = resolver.RESOLVER.connect(host, port, timeout)
            break
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise ConnectionClosed(f"cannot connect to {peer} at {host}:{port}: {exc}") from exc
            time.sleep(0.1)
    try:
        _tune(sock)
        buffers = codec.encode(first) if first is not None else None
        stream, identity = creds.client(SocketStream(sock), expect=expect, peer=peer, timeout=timeout, first=buffers)
    except BaseException:
        sock.close()
        raise
    conn = Connection(stream, peer=peer, identity=identity, idle_timeout=idle_timeout, send_timeout=send_timeout)
    if buffers is not None:
        conn.bytes_sent += sum(memoryview(b).nbytes for b in buffers)
    return conn


def accept_handshake(sock: socket.socket, *, creds: Credentials, peer: str, timeout: float | None = None) -> Connection:
    """Secure an accepted socket (server side), the whole handshake within ``timeout``.
    Raises ``AuthenticationError``, ``ConnectionClosed`` or ``PeerSilent``; the caller
    closes the socket then."""
    _tune(sock)
    stream, identity = creds.server(SocketStream(sock), peer=peer,
                                    timeout=HANDSHAKE_TIMEOUT_S if timeout is None else timeout)
    return Connection(stream, peer=peer, identity=identity)


class Listener:
    """Accepts connections on ``host:port``; each authenticated one is handed to
    ``handler(conn)`` on its own thread, which owns it from then on (the listener closes
    it when the handler returns). Unauthenticated peers are dropped and reported to
    ``on_reject(peer, error)`` (on the accept thread for a refusal at once: it must be
    quick; ``limits.RateLimitedReporter`` is); the listener goes on.

    Limits (``common.limits``): at most ``max_handshakes`` connections handshaking at once,
    ``max_handshakes_per_source`` from one address; a connection over either, or one no
    thread can be started for, is closed at once and refused (``limits.OverLimit``). The
    handshake has one deadline for the whole exchange. ``accept`` failing (out of
    descriptors, buffers, memory) backs off, exponentially up to a second, and is logged
    rate-limited; nothing of that stops the listener. ``refused`` and ``accept_errors``
    count them."""

    def __init__(self, host: str, port: int, *, creds: Credentials, handler: Callable[[Connection], None],
                 on_reject: Callable[[str, Exception], None] | None = None, name: str = "listener",
                 handshake_timeout: float | None = None,
                 max_handshakes: int = limits.MAX_HANDSHAKES,
                 max_handshakes_per_source: int = limits.MAX_HANDSHAKES_PER_SOURCE) -> None:
        self._creds = creds
        self._handler = handler
        self._on_reject = on_reject or limits.RateLimitedReporter(
            lambda what, f: log.warning("%s: %s %s", name, what, f))
        self._name = name
        self._handshake_timeout = handshake_timeout
        self.slots = limits.HandshakeSlots(total=max_handshakes, per_source=max_handshakes_per_source)
        self.refused = 0        # refused at once by a limit
        self.accept_errors = 0  # accept() failures (each followed by a back-off)
        self._backoff = limits.Backoff()
        self._accept_log = limits.RateLimitedReporter(
            lambda what, f: log.warning("%s: accept failed: %s", name, f.get("detail") if what == "accept_error"
                                        else f"{f['suppressed']} more times in {f['interval_s']:g} s"),
            what="accept_error", summary="accept_error_suppressed")
        try:
            self.sock = socket.create_server((host, port), reuse_port=False, backlog=128)
        except OSError as exc:
            raise TransportError(f"{name}: cannot listen on {host}:{port}: {exc}") from exc
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name=f"{name}-accept", daemon=True)

    def start(self) -> "Listener":
        self._thread.start()
        return self

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, addr = self.sock.accept()
            except OSError as exc:
                if self._stop.is_set():
                    return
                # Out of descriptors (or buffers, memory), the connection stays queued and
                # accept fails again at once: wait, longer each time, for one to be freed.
                self.accept_errors += 1
                self._accept_log(self._name, exc)
                self._stop.wait(self._backoff.next())
                continue
            self._backoff.reset()
            try:
                self._admit(sock, addr)
            except Exception as exc:  # noqa: BLE001 - a bug here must not end the accept loop
                self._close_quietly(sock)
                self._accept_log(self._name, exc)

    def _admit(self, sock: socket.socket, addr) -> None:
        """A thread for ``sock``'s handshake, if a slot and a thread are free; else
        closed at once and refused."""
        source, peer = (addr[0], f"{addr[0]}:{addr[1]}") if isinstance(addr, tuple) else ("local", "local")
        why = self.slots.acquire(source)
        if not why:
            try:
                threading.Thread(target=self._serve, args=(sock, peer, source), name=f"{self._name}-conn",
                                 daemon=True).start()
                return
            except RuntimeError as exc:  # "can't start new thread": refuse this one, go on
                self.slots.release(source)
                why = f"no thread to serve it ({exc})"
        self.refused += 1
        self._close_quietly(sock)
        self._reject(peer, limits.OverLimit(why))

    def _reject(self, peer: str, exc: Exception) -> None:
        try:
            self._on_reject(peer, exc)
        except Exception:  # noqa: BLE001 - reporting a refusal must not stop the listener
            log.debug("%s: on_reject failed", self._name, exc_info=True)

    def _serve(self, sock: socket.socket, peer: str, source: str | None = None) -> None:
        try:
            conn = accept_handshake(sock, creds=self._creds, peer=peer, timeout=self._handshake_timeout)
        except (ProtocolError, ConnectionClosed, OSError) as exc:
            self._close_quietly(sock)
            self._reject(peer, exc)
            return
        except BaseException:
            self._close_quietly(sock)
            raise
        finally:
            if source is not None:
                self.slots.release(source)
        try:
            self._handler(conn)
        finally:
            conn.close()

    @staticmethod
    def _close_quietly(sock: socket.socket) -> None:
        try:
            sock.close()
        except OSError:
            pass

    def close(self) -> None:
        """Stop accepting and free the port. Connections already handed out go on."""
        self._stop.set()
        try:
            # close() alone does not wake a thread blocked in accept(); shutdown() does.
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        flush = getattr(self._on_reject, "flush", None)
        if flush is not None:
            try:
                flush()
            except Exception:  # noqa: BLE001 - best effort at close
                pass


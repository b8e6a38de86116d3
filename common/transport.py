"""Thin socket layer over the codec: moves bytes between a TCP socket and a ``FrameDecoder``.

``OSError`` is translated here, once: a peer that goes away raises ``ConnectionClosed``,
any other socket failure ``TransportError``; garbage from the peer raises
``RemoteProtocolError`` from the codec. Every connection is authenticated (``auth``)
before its first frame is read.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Callable

from common import auth, codec
from common import messages as m
from common.errors import AuthenticationError, ConnectionClosed, LocalProtocolError, ProtocolError, TransportError

log = logging.getLogger(__name__)

# recv_into chunk: large enough that a 5 MB snapshot takes a handful of system calls.
RECV_CHUNK = 1 << 20
# Payload left to read at or above which recv_into writes straight into the frame.
DIRECT_MIN = 64 << 10
# How long a peer may take to complete the handshake before we hang up on it.
HANDSHAKE_TIMEOUT_S = 10.0


class Connection:
    """One authenticated, framed TCP connection. ``send`` is safe from several threads;
    ``recv`` is meant for one reader thread."""

    def __init__(self, sock: socket.socket, *, peer: str = "?", max_payload: int = codec.DEFAULT_MAX_PAYLOAD_BYTES) -> None:
        self.sock = sock
        self.peer = peer
        self._decoder = codec.FrameDecoder(max_payload=max_payload)
        self._send_lock = threading.Lock()
        self._chunk = bytearray(RECV_CHUNK)
        self._closed = False
        self.bytes_sent = 0
        self.bytes_received = 0

    def __repr__(self) -> str:
        return f"<Connection to {self.peer}>"

    def send(self, msg: m.Message) -> int:
        """Send one message whole; returns its size in bytes on the wire."""
        buffers = codec.encode(msg)
        with self._send_lock:
            if self._closed:
                raise LocalProtocolError(f"send {msg.TYPE} on a closed connection to {self.peer}")
            sent = _sendmsg_all(self.sock, buffers, self.peer)
            self.bytes_sent += sent
        return sent

    def recv(self, timeout: float | None = None) -> m.Message:
        """The next message. ``timeout`` (seconds) raises ``TimeoutError``; the peer going
        away raises ``ConnectionClosed``; garbage raises ``RemoteProtocolError``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            msg = self._decoder.next_message()
            if msg is not codec.NEED_DATA:
                return msg  # type: ignore[return-value]
            if self._closed:
                raise ConnectionClosed(f"connection to {self.peer} was closed here")
            left = None
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no message from {self.peer} within {timeout} s")
            # Large payloads are received straight into the frame's buffer (no extra copy);
            # everything else goes through the chunk and the decoder.
            direct = self._decoder.payload_buffer()
            if direct is not None and len(direct) < DIRECT_MIN:
                direct = None
            try:
                self.sock.settimeout(left)
                n = self.sock.recv_into(self._chunk if direct is None else direct)
            except socket.timeout:
                continue
            except OSError as exc:
                raise ConnectionClosed(f"connection to {self.peer} failed: {exc}") from exc
            if n == 0:
                clean = self._decoder.at_frame_boundary
                self._decoder.receive_data(b"")
                if clean:
                    raise ConnectionClosed(f"{self.peer} closed the connection")
                self._decoder.next_message()  # raises: the stream ended inside a frame
            self.bytes_received += n
            if direct is None:
                self._decoder.receive_data(memoryview(self._chunk)[:n])
            else:
                self._decoder.payload_written(n)

    def close(self, notice: m.Message | None = None) -> None:
        """Close; optionally send ``notice`` first (best effort). Idempotent."""
        if notice is not None and not self._closed:
            try:
                self.sock.settimeout(1.0)
                self.send(notice)
            except Exception:  # the peer may be gone already: closing is all that is left
                pass
        with self._send_lock:
            if self._closed:
                return
            self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    @property
    def closed(self) -> bool:
        return self._closed


def _sendmsg_all(sock: socket.socket, buffers: list, peer: str) -> int:
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    total = sum(v.nbytes for v in views)
    try:
        while views:
            # Linux caps one sendmsg at IOV_MAX (1024) buffers.
            n = sock.sendmsg(views[:1024])
            while n:
                if n >= views[0].nbytes:
                    n -= views[0].nbytes
                    views.pop(0)
                else:
                    views[0] = views[0][n:]
                    n = 0
    except OSError as exc:
        raise ConnectionClosed(f"sending to {peer} failed: {exc}") from exc
    return total


def _recv_exact(sock: socket.socket, n: int, peer: str) -> bytes:
    data = bytearray()
    while len(data) < n:
        try:
            chunk = sock.recv(n - len(data))
        except OSError as exc:
            raise ConnectionClosed(f"{peer}: {exc} during the handshake") from exc
        if not chunk:
            raise ConnectionClosed(f"{peer} closed the connection during the handshake")
        data += chunk
    return bytes(data)


def _tune(sock: socket.socket) -> None:
    # Small control messages must not wait for Nagle's algorithm: every step is a round trip.
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def connect(host: str, port: int, *, key: bytes, peer: str, timeout: float = 10.0,
            retry_for: float = 0.0) -> Connection:
    """Open a TCP connection to ``host:port`` and authenticate. Retries refused connections
    for up to ``retry_for`` seconds (peers start in any order). Raises ``ConnectionClosed``
    if nobody answers, ``AuthenticationError`` if the peer lacks the key."""
    deadline = time.monotonic() + retry_for
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
            break
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise ConnectionClosed(f"cannot connect to {peer} at {host}:{port}: {exc}") from exc
            time.sleep(0.1)
    try:
        _tune(sock)
        sock.settimeout(timeout)
        hello, client_nonce = auth.client_hello()
        sock.sendall(hello)
        challenge = _recv_exact(sock, auth.SERVER_CHALLENGE_BYTES, peer)
        sock.sendall(auth.client_response(key, client_nonce, challenge))
        if _recv_exact(sock, 1, peer) != auth.ACCEPT:
            raise AuthenticationError(f"{peer} did not accept our key")
    except AuthenticationError:
        sock.close()
        raise
    except ConnectionClosed as exc:
        sock.close()
        raise AuthenticationError(f"{peer} hung up during the handshake (it refused our key?)") from exc
    except OSError as exc:
        sock.close()
        raise ConnectionClosed(f"handshake with {peer} failed: {exc}") from exc
    sock.settimeout(None)
    return Connection(sock, peer=peer)


def accept_handshake(sock: socket.socket, *, key: bytes, peer: str) -> Connection:
    """Authenticate an accepted socket (server side). Raises ``AuthenticationError``."""
    _tune(sock)
    sock.settimeout(HANDSHAKE_TIMEOUT_S)
    try:
        hello = _recv_exact(sock, auth.CLIENT_HELLO_BYTES, peer)
        reply, client_nonce, server_nonce = auth.server_challenge(key, hello)
        sock.sendall(reply)
        auth.server_verify(key, client_nonce, server_nonce, _recv_exact(sock, auth.MAC_BYTES, peer))
        sock.sendall(auth.ACCEPT)
    except OSError as exc:
        raise ConnectionClosed(f"handshake with {peer} failed: {exc}") from exc
    sock.settimeout(None)
    return Connection(sock, peer=peer)


class Listener:
    """Accepts connections on ``host:port``; each authenticated one is handed to
    ``handler(conn)`` on its own thread. Unauthenticated peers are dropped and logged via
    ``on_reject(peer, error)``; the listener goes on."""

    def __init__(self, host: str, port: int, *, key: bytes, handler: Callable[[Connection], None],
                 on_reject: Callable[[str, Exception], None] | None = None, name: str = "listener") -> None:
        self._key = key
        self._handler = handler
        self._on_reject = on_reject or (lambda peer, exc: log.warning("rejected %s: %s", peer, exc))
        self._name = name
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
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.05)
                continue
            threading.Thread(target=self._serve, args=(sock, f"{addr[0]}:{addr[1]}"),
                             name=f"{self._name}-conn", daemon=True).start()

    def _serve(self, sock: socket.socket, peer: str) -> None:
        try:
            conn = accept_handshake(sock, key=self._key, peer=peer)
        except (AuthenticationError, ConnectionClosed, ProtocolError) as exc:
            sock.close()
            self._on_reject(peer, exc)
            return
        try:
            self._handler(conn)
        finally:
            conn.close()

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

"""Byte streams: the one thing the transport needs from a socket, as a small interface.

A ``ByteStream`` moves bytes and nothing else; framing, authentication and heartbeats sit
above it (``common.transport``). Two implementations share one behaviour, checked by the
same tests (trio's ``testing/_check_streams`` idea):

- ``SocketStream``: a TCP (or Unix) socket in non-blocking mode, each direction waiting
  with its own ``poll`` and its own deadline. A socket's built-in timeout is one value
  for both directions, so a reader thread setting its deadline would change a writer
  thread's; here they never meet.
- ``MemoryStream``: an in-memory pair with bounded buffers (so a writer can be blocked by
  a reader that does not read, as on a real socket), for tests with no sockets at all.

Errors, translated once here: the peer going away raises ``ConnectionClosed``; a send
that makes no progress for its stall timeout raises ``PeerSilent`` (the peer stopped
reading: a dead host or a full window); ``receive_into`` past its timeout raises
``TimeoutError`` and leaves the stream usable. End of stream is ``0`` bytes read.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from typing import Protocol, Sequence

from common.errors import ConnectionClosed, LocalProtocolError, PeerSilent

# Linux caps one sendmsg at IOV_MAX (1024) buffers.
IOV_MAX = 1024


class ByteStream(Protocol):
    def send_all(self, buffers: Sequence[bytes | bytearray | memoryview], stall_timeout: float | None = None) -> int:
        """Send every byte of ``buffers`` in order; returns the count. Raises
        ``PeerSilent`` when no byte could be sent for ``stall_timeout`` seconds,
        ``ConnectionClosed`` when the peer is gone, ``LocalProtocolError`` after ``close``."""

    def receive_into(self, buf: memoryview, timeout: float | None = None) -> int:
        """Receive at most ``len(buf)`` bytes into ``buf``; ``0`` means end of stream.
        Raises ``TimeoutError`` after ``timeout`` seconds without data (the stream stays
        usable) and ``ConnectionClosed`` when the connection failed or was closed here."""

    def close(self) -> None:
        """Close both directions; idempotent. A blocked ``receive_into`` returns or raises."""


def _views(buffers: Sequence[bytes | bytearray | memoryview]) -> list[memoryview]:
    return [memoryview(b).cast("B") for b in buffers if len(b)]


class SocketStream:
    """A ``ByteStream`` over a connected socket (set to non-blocking here)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)
        self._closed = False
        self._fd = sock.fileno()

    def fileno(self) -> int:
        return self._fd

    def _wait(self, events: int, timeout: float | None) -> bool:
        """True when the socket is ready for ``events`` (or in error) within ``timeout``."""
        if self._closed:
            raise ConnectionClosed("the stream was closed here")
        p = select.poll()
        p.register(self._fd, events)
        ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
        try:
            return bool(p.poll(ms))
        except InterruptedError:  # pragma: no cover - PEP 475 retries poll itself
            return False

    def send_all(self, buffers, stall_timeout: float | None = None) -> int:
        views = _views(buffers)
        total = sum(v.nbytes for v in views)
        while views:
            if self._closed:
                raise LocalProtocolError("send on a stream that was closed here")
            try:
                n = self.sock.sendmsg(views[:IOV_MAX])
            except (BlockingIOError, InterruptedError):
                if not self._wait(select.POLLOUT, stall_timeout):
                    raise PeerSilent(f"the peer took no data for {stall_timeout} s") from None
                continue
            except OSError as exc:
                if self._closed:
                    raise LocalProtocolError("send on a stream that was closed here") from None
                raise ConnectionClosed(f"sending failed: {exc}") from exc
            while n:
                if n >= views[0].nbytes:
                    n -= views[0].nbytes
                    views.pop(0)
                else:
                    views[0] = views[0][n:]
                    n = 0
        return total

    def receive_into(self, buf: memoryview, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return self.sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                raise ConnectionClosed(f"receiving failed: {exc}") from exc
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"no data within {timeout} s")
            # Wake at least once a second so that a close() from another thread is seen
            # even where closing a socket does not wake a poll on it.
            step = 1.0 if left is None else min(left, 1.0)
            if self._closed:
                raise ConnectionClosed("the stream was closed here")
            self._wait(select.POLLIN, step)

    def shutdown(self) -> None:
        """Send our end of stream (FIN); reading goes on."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            # shutdown wakes a thread blocked in poll on this socket; close alone may not.
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def abort(self) -> None:
        """Close with a reset (RST) instead of an orderly end of stream."""
        if not self._closed:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            except OSError:
                pass
            self._closed = True
            self.sock.close()


class _Pipe:
    """One direction of a ``MemoryStream`` pair: a bounded byte buffer."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.buf = bytearray()
        self.eof = False          # the writer closed
        self.reader_gone = False  # the reader closed
        self.cond = threading.Condition()


class MemoryStream:
    """One end of an in-memory stream pair (``memory_stream_pair``)."""

    def __init__(self, incoming: _Pipe, outgoing: _Pipe) -> None:
        self._in, self._out = incoming, outgoing
        self._closed = False

    def send_all(self, buffers, stall_timeout: float | None = None) -> int:
        views = _views(buffers)
        total = sum(v.nbytes for v in views)
        pipe = self._out
        for v in views:
            while v.nbytes:
                with pipe.cond:
                    ok = pipe.cond.wait_for(lambda: self._closed or pipe.reader_gone
                                            or len(pipe.buf) < pipe.capacity, stall_timeout)
                    if self._closed:
                        raise LocalProtocolError("send on a stream that was closed here")
                    if pipe.reader_gone:
                        raise ConnectionClosed("the peer closed the stream")
                    if not ok:
                        raise PeerSilent(f"the peer took no data for {stall_timeout} s")
                    take = min(v.nbytes, pipe.capacity - len(pipe.buf))
                    pipe.buf += v[:take]
                    v = v[take:]
                    pipe.cond.notify_all()
        return total

    def receive_into(self, buf: memoryview, timeout: float | None = None) -> int:
        pipe = self._in
        with pipe.cond:
            ok = pipe.cond.wait_for(lambda: self._closed or pipe.buf or pipe.eof, timeout)
            if self._closed:
                raise ConnectionClosed("the stream was closed here")
            if not ok:
                raise TimeoutError(f"no data within {timeout} s")
            if not pipe.buf:
                return 0
            n = min(len(buf), len(pipe.buf))
            buf[:n] = pipe.buf[:n]
            del pipe.buf[:n]
            pipe.cond.notify_all()
            return n

    def shutdown(self) -> None:
        with self._out.cond:
            self._out.eof = True
            self._out.cond.notify_all()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for pipe, attr in ((self._out, "eof"), (self._in, "reader_gone")):
            with pipe.cond:
                setattr(pipe, attr, True)
                pipe.cond.notify_all()

    abort = close


def memory_stream_pair(capacity: int = 256 << 10) -> tuple[MemoryStream, MemoryStream]:
    """Two connected in-memory streams; each direction buffers at most ``capacity`` bytes."""
    a_to_b, b_to_a = _Pipe(capacity), _Pipe(capacity)
    return MemoryStream(b_to_a, a_to_b), MemoryStream(a_to_b, b_to_a)

"""A link: one connection kept alive between two roles, with a heartbeat and a deadline.

    reader thread   conn.recv() -> on_message(link, msg)     (heartbeats consumed below)
    writer thread   post(msg) queue -> conn.send(msg)         (a Heartbeat when idle)

The peer must send something at least every ``dead_after_s`` (its writer's heartbeats
see to that while it lives); a peer that does not, or that stops taking our bytes for as
long, is lost. ``on_lost(link, error)`` is called exactly once when the link ends, for
any reason, a ``close`` here included (``error`` is then ``LinkClosedHere``), so the
owner learns of every end in one place; ``link.lost_reason`` says why.

No caller blocks on the network through a link unless it asks to: ``post`` only queues;
``send`` sends on the calling thread, after whatever was posted before it, for a caller
that waits for the answer anyway (a device's step: its activations go out without waking
the writer thread, which on a loaded machine costs the receiver its head start).
Callbacks run on the link's threads (``on_lost`` also on ``send``'s) and must only hand
work on (put it on a queue).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

from common import messages as m
from common.errors import ConnectionClosed, LocalProtocolError, ProtocolError, RemoteProtocolError, TestbedError, \
    TransportError
from common.transport import Connection

log = logging.getLogger(__name__)

_CLOSE = object()
# After our end of stream, how long the reader waits for the peer's before closing anyway.
CLOSE_LINGER_S = 2.0


class LinkClosedHere(ConnectionClosed):
    """The link was closed by its owner on this side."""


class Link:
    """See the module docstring. ``name`` is for logs (e.g. "device device1")."""

    def __init__(self, conn: Connection, *, name: str, on_message: Callable[["Link", m.Message], None],
                 on_lost: Callable[["Link", Exception], None], heartbeat_s: float, dead_after_s: float) -> None:
        self.conn = conn
        self.name = name
        conn.peer = name
        conn.idle_timeout = dead_after_s
        conn.send_timeout = dead_after_s
        self._on_message = on_message
        self._on_lost = on_lost
        self._heartbeat_s = heartbeat_s
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        # Messages posted and not yet through the writer (counted under ``_lock``), and
        # the turn to send a message (the writer's, or ``send``'s): a ``send`` goes on
        # the caller's thread only when nothing posted before it is still unsent.
        self._unsent = 0
        self._turn = threading.Lock()
        self._lost = False
        self.lost_reason: Exception | None = None
        self.silent = False          # a radio loss on purpose: nothing in, nothing out
        self._closing = False
        self.created = time.monotonic()
        self._writer = threading.Thread(target=self._write_loop, name=f"{name}-writer", daemon=True)
        self._reader: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<Link {self.name}{' lost' if self._lost else ''}>"

    @property
    def lost(self) -> bool:
        return self._lost

    # -- life ------------------------------------------------------------------------------

    def start(self) -> "Link":
        """Start the writer and a reader thread."""
        self.start_writer()
        self._reader = threading.Thread(target=self._read_loop, name=f"{self.name}-reader", daemon=True)
        self._reader.start()
        return self

    def start_writer(self) -> "Link":
        """Start the writer (once): what is posted from now on goes out, and a ``close``
        drains it, before anyone reads."""
        with self._lock:
            if not self._writer.is_alive() and self._writer.ident is None:
                self._writer.start()
        return self

    def serve(self) -> None:
        """Start the writer (if not yet) and read in the calling thread until the link ends."""
        self.start_writer()
        self._read_loop()

    def post(self, msg: m.Message) -> bool:
        """Queue ``msg`` for sending; False (and nothing sent) once the link is lost."""
        if self._lost:
            return False
        self._queue(msg)
        return True

    def send(self, msg: m.Message) -> bool:
        """Send ``msg`` on the calling thread, after every message posted before it (if one
        is still queued, ``msg`` is queued behind it instead); returns once it is sent,
        blocking while the peer takes no bytes for at most the link's ``dead_after_s``.
        False (nothing sent) once the link is lost, as ``post``; a send that fails ends the
        link (``on_lost``, here on the calling thread) and returns True, as a message the
        writer fails to send does."""
        if self._lost:
            return False
        with self._turn:
            with self._lock:
                queued = self._unsent > 0
                if queued:
                    self._unsent += 1
                    self._q.put(msg)
            if queued or self._lost or self.silent:
                return True
            try:
                self.conn.send(msg)
                return True
            except (TransportError, LocalProtocolError) as exc:
                failed = exc
        self._end(failed)
        return True

    def _queue(self, item: object) -> None:
        with self._lock:
            self._unsent += 1
        self._q.put(item)

    def close(self, notice: m.Message | None = None, *, drain: bool = True) -> None:
        """End the link from this side. ``drain``: send what is queued (and ``notice``)
        first, within the send deadline; else close at once."""
        if self._lost:
            return
        if not drain:
            self._end(LinkClosedHere(f"{self.name}: closed here"))
            return
        if notice is not None:
            self._queue(notice)
        self._queue(_CLOSE)
        if not self._writer.is_alive():  # never started: nobody would drain
            self._end(LinkClosedHere(f"{self.name}: closed here"))

    def wait_closed(self, timeout: float) -> bool:
        """Wait (at most ``timeout``) until the link has ended; True if it has."""
        if self._writer.is_alive():
            self._writer.join(timeout)
        return self._lost

    def go_silent(self) -> None:
        """Stop every byte both ways without telling the peer (an emulated radio loss): it
        sees only silence. ``close`` ends the link later."""
        self.silent = True

    # -- threads ---------------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            try:
                item = self._q.get(timeout=self._heartbeat_s)
            except queue.Empty:
                item = None
            if self._lost:
                return
            if item is _CLOSE:
                self._finish_close()
                return
            try:
                if item is None:
                    if not self.silent:
                        self.conn.send(m.Heartbeat(), block=False)  # a busy connection is not idle
                else:
                    try:
                        with self._turn:
                            if not self.silent:
                                self.conn.send(item)
                    finally:
                        with self._lock:
                            self._unsent -= 1
            except (TransportError, LocalProtocolError) as exc:
                self._end(exc)
                return

    def _finish_close(self) -> None:
        # An orderly end: our end of stream first, so what we sent (a Shutdown, say) is
        # read before the peer sees the connection go; closing with unread bytes here
        # would send a reset, which can discard them at the peer.
        self._closing = True
        shutdown = getattr(self.conn.stream, "shutdown", None)
        if shutdown is not None:
            shutdown()
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(timeout=CLOSE_LINGER_S)
        self._end(LinkClosedHere(f"{self.name}: closed here"))

    def _read_loop(self) -> None:
        self._reader = self._reader or threading.current_thread()
        try:
            while not self._lost:
                msg = self.conn.recv()
                if self.silent or self._closing:
                    continue
                self._on_message(self, msg)
        except (TransportError, ProtocolError) as exc:
            if self._closing:
                self._end(LinkClosedHere(f"{self.name}: closed here"))
                return
            if isinstance(exc, RemoteProtocolError):
                self.conn.close(notice=m.ErrorNotice(kind=type(exc).__name__, detail=str(exc)[:200]))
            self._end(exc)
        except TestbedError as exc:  # a handler's deliberate error: this link is done
            self._end(exc)
        except Exception as exc:  # noqa: BLE001 - a handler's bug: this link ends, and says so
            log.exception("%s: handling a message failed", self.name)
            self._end(exc)

    def _end(self, exc: Exception) -> None:
        with self._lock:
            if self._lost:
                return
            self._lost = True
            self.lost_reason = exc
        self.conn.close()
        self._q.put(_CLOSE)  # wake the writer so it exits
        try:
            self._on_lost(self, exc)
        except Exception:  # pragma: no cover - an owner's bug must not kill a link thread silently
            log.exception("%s: on_lost failed", self.name)

    def abort(self) -> None:
        """Close the socket with a reset at once (a crash's view from the peer)."""
        self.conn.abort()
        self._end(LinkClosedHere(f"{self.name}: aborted here"))

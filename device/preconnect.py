"""A connection to an edge opened (and secured) ahead of a move: make-before-break
(``mobility.preconnect``). The device opens it on its own thread while it still trains
where it is; the move then takes it (``result``) and pays only for the handover of its
session, or finds it stale or for another edge and discards it."""

from __future__ import annotations

import threading
import time
from typing import Callable

from common import transport


class Preconnect:
    """A connection being opened (and secured) on its own thread, ahead of a move."""

    def __init__(self, edge: str, connect: Callable[[], transport.Connection], *, max_age_s: float) -> None:
        self.edge = edge
        self._connect = connect
        self._max_age_s = max_age_s
        self._started = time.monotonic()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._conn: transport.Connection | None = None
        self._error: Exception | None = None
        self._discarded = False
        self.connect_ms = 0.0
        self.taken_at = 0.0  # (perf_counter) when ``result`` handed the connection over

    def start(self) -> None:
        threading.Thread(target=self._run, name=f"preconnect-{self.edge}", daemon=True).start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            conn = self._connect()
        except Exception as exc:  # noqa: BLE001 - the move finds out, and reconnects as usual
            conn, error = None, exc
        else:
            error = None
        self.connect_ms = round((time.perf_counter() - t0) * 1000, 3)
        with self._lock:
            self._conn, self._error = conn, error
            discarded = self._discarded
        self._done.set()
        if discarded and conn is not None:
            conn.close()

    def stale(self) -> bool:
        return time.monotonic() - self._started > self._max_age_s

    def result(self, timeout: float) -> transport.Connection:
        """The secured connection, waiting for it if need be. Raises what connecting raised
        (``TransportError``, ``ProtocolError``) or ``TimeoutError``."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"connecting to edge {self.edge} took over {timeout} s")
        with self._lock:
            conn, error, self._conn = self._conn, self._error, None  # the caller owns it now
        if error is not None:
            raise error
        if conn is None:
            raise TimeoutError(f"the connection to edge {self.edge} was discarded")
        self.taken_at = time.perf_counter()
        return conn

    def discard(self) -> None:
        """Not used after all: closed (now, or when its connect ends)."""
        with self._lock:
            self._discarded = True
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


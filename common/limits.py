"""Limits a stranger cannot exhaust: handshake slots, accept back-off, quiet refusals.

A listener used to give every accepted connection a thread and a descriptor until the
peer finished (or timed out of) the handshake, and to write a log line per refusal: enough
slow strangers took an edge past its open-file limit, and idle ones filled its log with
"refused" lines (BENCHMARKS.md, section 9). The pieces here bound that, with no sockets in
them (``common.transport.Listener`` applies them):

- ``HandshakeSlots``: how many unauthenticated connections may be handshaking at once, in
  total and per source address; one over is refused at once, before it costs a thread.
- ``Backoff``: exponential and capped, for ``accept`` failing for lack of descriptors,
  buffers or memory (the pending connection stays queued, so retrying at once would spin),
  and for ``retry``, the one retry loop (a device to its edge, an edge to the central, the
  central's results on a file system short of descriptors, a name lookup at start).
- ``RateLimitedReporter``: the first few refusals of an interval in full, then one line
  with the count of those left out; what the peer sent is never echoed beyond a short,
  escaped prefix (``printable_prefix``).
"""

from __future__ import annotations

import errno
import logging
import math
import threading
import time
from typing import Any, Callable, TypeVar

from common.errors import TransportError
from common.text import printable

# An edge's legitimate peers (its devices, the other edges, the central, the controller)
# handshake at once only when a whole testbed (re)starts, a few dozen at most; 64 is well
# above that, and 64 descriptors and threads are little next to a 1,024 open-file limit.
MAX_HANDSHAKES = 64
# One host may run several roles (a loopback testbed runs all of them on 127.0.0.1), but a
# handshake lasts milliseconds; 8 at once per address leaves 7/8 of the slots to others.
MAX_HANDSHAKES_PER_SOURCE = 8

# accept() errors that mean "out of a resource", not "this one connection failed".
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# First wait after such an error, doubled on each one in a row, at most the cap: short
# enough that a freed descriptor is used soon, long enough not to spin on a full table.
BACKOFF_FIRST_S = 0.01
BACKOFF_MAX_S = 1.0
# A lost link is tried again after this, doubled on each failure in a row, at most the
# cap: a peer that restarts on the same host is back within a few tries, and one that is
# gone costs about a try a second.
RECONNECT_FIRST_S = 0.05
RECONNECT_MAX_S = 1.0

# Refusals reported in full per interval; the rest are counted and said in one line.
REPORT_BURST = 5
REPORT_INTERVAL_S = 10.0
# How much of anything a peer sent (or an error quoting it) is ever written back out.
ECHO_CHARS = 64


class OverLimit(TransportError):
    """A connection refused before its handshake: no slot or no thread for it."""


def printable_prefix(data: Any, limit: int = ECHO_CHARS) -> str:
    """At most ``limit`` characters of ``data`` (bytes or text) with anything not
    printable ASCII escaped (``\\x00``, ``\\n``, ``\\u2028``...), and ``...`` when cut
    (``common.text.printable``, the one function that makes peer text printable)."""
    return printable(data, limit)


class HandshakeSlots:
    """Counts unauthenticated connections, in total and per source address. Thread-safe."""

    def __init__(self, *, total: int = MAX_HANDSHAKES, per_source: int = MAX_HANDSHAKES_PER_SOURCE) -> None:
        if total < 1 or per_source < 1:
            raise ValueError("handshake limits must be at least 1")
        self.total = total
        self.per_source = per_source
        self._lock = threading.Lock()
        self._by_source: dict[str, int] = {}
        self._held = 0

    def acquire(self, source: str) -> str:
        """Take a slot for a connection from ``source``: '' if taken, else why not."""
        with self._lock:
            if self._held >= self.total:
                return f"too many unauthenticated connections ({self.total})"
            n = self._by_source.get(source, 0)
            if n >= self.per_source:
                return f"too many unauthenticated connections from {source} ({self.per_source})"
            self._by_source[source] = n + 1
            self._held += 1
            return ""

    def release(self, source: str) -> None:
        with self._lock:
            n = self._by_source.get(source, 0)
            if n <= 0:
                return
            if n == 1:
                del self._by_source[source]
            else:
                self._by_source[source] = n - 1
            self._held -= 1

    @property
    def held(self) -> int:
        return self._held

    def held_by(self, source: str) -> int:
        with self._lock:
            return self._by_source.get(source, 0)


class Backoff:
    """Exponential back-off: ``next()`` is the wait before the next try, ``reset()`` after
    a success."""

    def __init__(self, first: float = BACKOFF_FIRST_S, cap: float = BACKOFF_MAX_S) -> None:
        self.first = first
        self.cap = cap
        self._wait = 0.0

    def next(self) -> float:
        self._wait = self.first if self._wait <= 0 else min(self.cap, self._wait * 2)
        return self._wait

    def reset(self) -> None:
        self._wait = 0.0


T = TypeVar("T")


def retry(attempt: Callable[[], T | None], *, deadline: float = math.inf, tries: int | None = None,
          stopped: Callable[[], bool] = lambda: False, backoff: Backoff | None = None,
          clock: Callable[[], float] = time.monotonic) -> T | None:
    """The one retry loop: ``attempt()`` until it returns something (not None), waiting
    ``backoff`` (``RECONNECT_FIRST_S`` doubled up to ``RECONNECT_MAX_S``) after each try
    that failed. None once a try has failed at or after ``deadline`` (``clock``), or
    ``tries`` tries have failed (no wait after the last), or when ``stopped()`` before a
    try. What ``attempt`` raises reaches the caller: an error that trying again cannot
    heal (a refusal, a wrong key, a full disk)."""
    backoff = backoff or Backoff(RECONNECT_FIRST_S, RECONNECT_MAX_S)
    failed = 0
    while not stopped():
        got = attempt()
        if got is not None:
            return got
        failed += 1
        if clock() >= deadline or (tries is not None and failed >= tries):
            return None
        time.sleep(backoff.next())
    return None


class RateLimitedReporter:
    """Calls ``report(what, fields)`` for the first ``burst`` events of each ``interval``
    seconds; the rest are counted, and one ``report(summary, {"suppressed": n, ...})``
    says how many when the interval ends (from a timer, or the next event if no timer
    could start). ``report`` is called outside the lock; an exception from it is
    swallowed (a full disk must not stop whoever reports). ``__call__(peer, exc)`` makes
    it an ``on_reject`` callback of ``transport.Listener``."""

    def __init__(self, report: Callable[[str, dict[str, Any]], None], *, what: str = "refused",
                 summary: str = "refused_suppressed", burst: int = REPORT_BURST,
                 interval: float = REPORT_INTERVAL_S) -> None:
        self._report = report
        self.what = what
        self.summary = summary
        self.burst = burst
        self.interval = interval
        self._lock = threading.Lock()
        self._window_start = float("-inf")
        self._in_window = 0
        self._suppressed = 0
        self._timer: threading.Timer | None = None
        self.total = 0        # every event seen
        self.reported = 0     # of them, reported in full

    def __call__(self, peer: str, exc: BaseException | str) -> None:
        detail = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        self.event(peer=printable_prefix(peer), detail=printable_prefix(detail))

    def event(self, **fields: Any) -> None:
        now = time.monotonic()
        flush = 0
        with self._lock:
            self.total += 1
            if now - self._window_start >= self.interval:
                flush, self._suppressed = self._suppressed, 0
                self._window_start, self._in_window = now, 0
            if self._in_window < self.burst:
                self._in_window += 1
                self.reported += 1
                full = True
            else:
                self._suppressed += 1
                full = False
                self._arm_timer(self._window_start + self.interval - now)
        if flush:
            self._emit(self.summary, {"suppressed": flush, "interval_s": self.interval})
        if full:
            self._emit(self.what, fields)

    def flush(self) -> None:
        """Say now how many were left out since the last summary (at close)."""
        with self._lock:
            n, self._suppressed = self._suppressed, 0
        if n:
            self._emit(self.summary, {"suppressed": n, "interval_s": self.interval})

    def _arm_timer(self, delay: float) -> None:
        if self._timer is not None and self._timer.is_alive():
            return
        timer = threading.Timer(max(0.0, delay), self._on_timer)
        timer.daemon = True
        try:
            timer.start()
        except RuntimeError:  # no thread to spare: the next event says the count instead
            self._timer = None
            return
        self._timer = timer

    def _on_timer(self) -> None:
        with self._lock:
            n, self._suppressed = self._suppressed, 0
            self._timer = None
        if n:
            self._emit(self.summary, {"suppressed": n, "interval_s": self.interval})

    def _emit(self, what: str, fields: dict[str, Any]) -> None:
        try:
            self._report(what, fields)
        except Exception:  # noqa: BLE001 - a report that cannot be written is dropped
            pass


def refusal_reporter(*, events: Any, logger: logging.Logger | None = None, who: str = "") -> RateLimitedReporter:
    """The one ``on_reject`` of a role's listener: refusals go to the event log (and to
    ``logger`` as warnings), rate-limited. Event ``refused`` (peer, detail), then
    ``refused_suppressed`` (suppressed, interval_s) under a flood."""
    prefix = f"{who}: " if who else ""

    def report(what: str, fields: dict[str, Any]) -> None:
        if logger is not None:
            if what == "refused":
                logger.warning("%srefused %s: %s", prefix, fields.get("peer"), fields.get("detail"))
            else:
                logger.warning("%s%d more refused in the last %g s (not logged one by one)", prefix,
                               fields.get("suppressed", 0), fields.get("interval_s", 0))
        events.emit(what, **fields)

    return RateLimitedReporter(report)

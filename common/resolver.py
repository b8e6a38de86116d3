"""Host names to addresses, kept off the critical path of a move.

A device that moves must reach its next edge now, and the edge must reach the device's
last edge to pull its session. A name lookup there is one more network round trip, and
on a resolver that loses a query it is much more: glibc waits ``timeout:5`` seconds
before it asks again, so one lost UDP packet costs 5 s and two cost 10, more than a
device is given to come back (``faults.device_grace_s``). Resolvers that lose queries
are common where this testbed runs: a Wi-Fi access point's DNS forwarder, and podman's
aardvark-dns, which drops queries while it reloads as containers join its network
(containers/aardvark-dns#389; `socket.getaddrinfo` honours no socket timeout either).

So every process resolves the hosts it will dial when it starts (``warm``, in the
background, retrying), and a connect uses what it has resolved (``connect``). An address
older than ``ttl_s`` is still used while a fresh lookup runs beside it; an address that
cannot be connected to is forgotten, and the next connect resolves the name again (a
host that came back elsewhere: a container started again, a Pi on a new DHCP lease).
Numeric addresses resolve without a query and are cached the same way.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from common.limits import Backoff, retry

log = logging.getLogger(__name__)

Address = tuple  # one getaddrinfo row: (family, type, proto, canonname, sockaddr)

# How long a lookup is trusted before it is refreshed (in the background; it is used
# meanwhile).
TTL_S = 60.0
# How long ``warm`` keeps trying a name that does not resolve yet (a peer's container
# that has not joined the network), and its pause between tries (doubling up to 2 s).
WARM_FOR_S = 120.0
WARM_FIRST_PAUSE_S = 0.1
WARM_MAX_PAUSE_S = 2.0


@dataclass
class _Entry:
    rows: list[Address]
    at: float
    refreshing: bool = False


class Resolver:
    """A cache of (host, port) -> getaddrinfo rows for TCP, safe from any thread."""

    def __init__(self, *, ttl_s: float = TTL_S,
                 lookup: Callable[[str, int], list[Address]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._lookup = lookup or _getaddrinfo
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, int], _Entry] = {}
        self.lookups = 0  # how many times a name was really resolved (for tests and benchmarks)

    def addresses(self, host: str, port: int) -> list[Address]:
        """The rows for ``host:port``: cached, or resolved now. Raises ``OSError`` (a
        ``socket.gaierror``) when the name does not resolve."""
        key = (host, port)
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None:
                if self._clock() - entry.at >= self.ttl_s and not entry.refreshing:
                    entry.refreshing = True
                    threading.Thread(target=self._refresh, args=(key,), name=f"resolve {host}",
                                     daemon=True).start()
                return list(entry.rows)
        return self._resolve(key)

    def _resolve(self, key: tuple[str, int]) -> list[Address]:
        rows = self._lookup(*key)
        if not rows:
            raise socket.gaierror(f"{key[0]!r} resolved to no address")
        with self._lock:
            self.lookups += 1
            self._cache[key] = _Entry(list(rows), self._clock())
        return list(rows)

    def _refresh(self, key: tuple[str, int]) -> None:
        try:
            self._resolve(key)
        except OSError as exc:  # keep the old rows: they may well still be right
            log.info("resolving %s again failed (%s); keeping its last address", key[0], exc)
            with self._lock:
                entry = self._cache.get(key)
                if entry is not None:
                    entry.refreshing = False

    def forget(self, host: str, port: int) -> None:
        with self._lock:
            self._cache.pop((host, port), None)

    def cached(self, host: str, port: int) -> bool:
        with self._lock:
            return (host, port) in self._cache

    def warm(self, endpoints: Iterable[tuple[str, int]], *, within_s: float = WARM_FOR_S) -> threading.Thread | None:
        """Resolve ``endpoints`` in the background, each until it resolves or ``within_s``
        passes; returns the thread (None: nothing to do)."""
        todo = [(h, int(p)) for h, p in dict.fromkeys(endpoints) if h]
        if not todo:
            return None
        t = threading.Thread(target=self._warm, args=(todo, within_s), name="resolve-warm", daemon=True)
        t.start()
        return t

    def _warm(self, todo: list[tuple[str, int]], within_s: float) -> None:
        left = list(todo)

        def attempt() -> bool | None:
            nonlocal left
            left = [key for key in left if not self.cached(*key) and not self._resolved(key)]
            return True if not left else None

        retry(attempt, deadline=self._clock() + within_s, clock=self._clock,
              backoff=Backoff(WARM_FIRST_PAUSE_S, WARM_MAX_PAUSE_S))
        if left:
            log.info("could not resolve %s yet; they are resolved when first dialled",
                     ", ".join(h for h, _ in left))

    def _resolved(self, key: tuple[str, int]) -> bool:
        try:
            self._resolve(key)
            return True
        except OSError:
            return False

    def connect(self, host: str, port: int, timeout: float | None) -> socket.socket:
        """A TCP connection to ``host:port`` (each of its addresses in turn, ``timeout``
        for each). When none answers, the name is forgotten and the last ``OSError``
        raised: the next connect resolves it again."""
        last: OSError | None = None
        for family, type_, proto, _name, sockaddr in self.addresses(host, port):
            sock = socket.socket(family, type_, proto)
            try:
                sock.settimeout(timeout)
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                sock.close()
                last = exc
        self.forget(host, port)
        raise last if last is not None else OSError(f"no address for {host}:{port}")


def _getaddrinfo(host: str, port: int) -> list[Address]:
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


# The process's resolver: ``transport.connect`` dials through it.
RESOLVER = Resolver()


def warm(endpoints: Iterable[tuple[str, int]]) -> threading.Thread | None:
    """Resolve in the background the endpoints this process will dial (see the module)."""
    return RESOLVER.warm(endpoints)

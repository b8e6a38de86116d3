"""The links from this edge to the other edges: authenticated, opened on first use and
kept, so a handover does not pay a TCP connect and a handshake. Every one is a ``Link``
(heartbeats both ways, a deadline for silence). On a kept link, exchanges about different
devices run at the same time (answers matched by device: ``PeerExchange``); what a
policy's peer sends unasked (``edge.handover.UNASKED``) goes to the core.

Used by the destination's fetches (``edge.migration.Fetcher``), the replicas sent to this
edge's buddy (``edge.migration.Replicator``) and the policies' one-way messages.
"""

from __future__ import annotations

import logging
import queue
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from common import messages as m
from common import transport
from common.errors import ConnectionClosed, MigrationError, ProtocolError, TransportError
from common.link import Link
from common.security import Credentials, Identity
from edge.handover import UNASKED

log = logging.getLogger("edge")

_LOST = object()


class PeerExchange:
    """One request/response exchange about one device on a kept link to a peer."""

    def __init__(self, link: Link, inbox: queue.SimpleQueue, limit_s: float) -> None:
        self.link = link
        self._inbox = inbox
        self._limit_s = limit_s

    def send(self, msg: m.Message) -> None:
        if not self.link.post(msg):
            raise ConnectionClosed(f"link to {self.link.name} is lost")

    def recv(self) -> m.Message:
        """The peer's next message about this device. The link's own deadline ends a
        silent peer's wait; ``limit_s`` bounds a live peer that never answers."""
        try:
            msg = self._inbox.get(timeout=self._limit_s)
        except queue.Empty:
            raise TimeoutError(f"{self.link.name} did not answer within {self._limit_s} s") from None
        if msg is _LOST:
            raise ConnectionClosed(f"link to {self.link.name} lost: {self.link.lost_reason}")
        return msg


class _Peer:
    """A kept link to one peer edge and who waits for answers on it (by device)."""

    def __init__(self, link: Link, to_core: Callable[[Link, m.Message | None], None] | None = None) -> None:
        self.link = link
        self.waiters: dict[str, queue.SimpleQueue] = {}
        self.lock = threading.Lock()
        self.to_core = to_core

    def route(self, msg: m.Message) -> None:
        if isinstance(msg, UNASKED):
            # what a policy's peer sends unasked (the answer to an offer, a relay's): no
            # exchange waits for it; the core sent the request on the kept link itself
            if self.to_core is not None:
                self.to_core(self.link, msg)
            return
        with self.lock:
            q = self.waiters.get(getattr(msg, "device", ""))
        if q is not None:
            q.put(msg)  # else: an answer nobody waits for any more (its exchange gave up)

    def lost(self) -> None:
        with self.lock:
            waiting = list(self.waiters.values())
        for q in waiting:
            q.put(_LOST)
        if self.to_core is not None:
            self.to_core(self.link, None)


class PeerLinks:
    """Authenticated links to the other edges, opened on first use and kept. Exchanges
    about different devices share a link and run at the same time (answers are matched
    by device); two about the same device take turns."""

    def __init__(self, *, name: str, creds: Credentials, endpoints: dict[str, tuple[str, int]], heartbeat_s: float,
                 dead_after_s: float, answer_limit_s: float,
                 to_core: Callable[[Link, m.Message | None], None] | None = None) -> None:
        """``to_core(link, msg)``: answers to offers made on a kept link, and ``msg=None``
        when a kept link is lost (the core holds offers by link)."""
        self._name = name
        self._to_core = to_core
        self._connecting: set[str] = set()
        self._creds = creds
        self._endpoints = endpoints
        self._hb, self._dead = heartbeat_s, dead_after_s
        self._limit = answer_limit_s
        self._peers: dict[str, _Peer] = {}
        self._connect_locks = {peer: threading.Lock() for peer in endpoints}
        self._device_locks: dict[tuple[str, str], threading.Lock] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _peer(self, peer: str) -> _Peer:
        """The kept link to ``peer``, or a new one. Only the connect is serialised."""
        with self._connect_locks[peer]:
            if self._closed:
                raise MigrationError("the edge is shutting down")
            kept = self._peers.get(peer)
            if kept is not None and not kept.link.lost:
                return kept
            host, port = self._endpoints[peer]
            try:
                # said first (with the handshake's last flight): which edge this is, so
                # that the peer keeps a link that carries nothing else for a while
                conn = transport.connect(host, port, creds=self._creds, expect=Identity("edge", peer),
                                         peer=f"edge {peer}", timeout=self._dead, first=m.PeerHello(target=self._name))
            except (TransportError, ProtocolError) as exc:
                raise MigrationError(f"cannot reach edge {peer}: {exc}") from exc
            holder: list[_Peer] = []
            link = Link(conn, name=f"edge {peer}", on_message=lambda _l, msg: holder[0].route(msg),
                        on_lost=lambda _l, exc: holder[0].lost(), heartbeat_s=self._hb, dead_after_s=self._dead)
            kept = _Peer(link, self._to_core)
            holder.append(kept)
            link.start()
            self._peers[peer] = kept
            return kept

    def link(self, peer: str) -> Link:
        """The kept link to ``peer`` (opened if need be), for one-way messages."""
        if peer not in self._connect_locks:
            raise MigrationError(f"{peer!r} is not an edge of this testbed")
        return self._peer(peer).link

    def kept(self, peer: str) -> Link | None:
        """The kept link to ``peer`` if it is open now, without waiting; else None, and a
        connect starts in the background so that a later call finds one."""
        if peer not in self._connect_locks:
            return None
        kept = self._peers.get(peer)
        if kept is not None and not kept.link.lost:
            return kept.link
        with self._lock:
            if peer in self._connecting or self._closed:
                return None
            self._connecting.add(peer)

        def connect() -> None:
            try:
                self._peer(peer)
            except MigrationError as exc:
                log.info("%s: no kept link to %s yet: %s", self._name, peer, exc)
            finally:
                with self._lock:
                    self._connecting.discard(peer)
        threading.Thread(target=connect, name=f"connect-{peer}", daemon=True).start()
        return None

    @contextmanager
    def exchange(self, peer: str, device: str) -> Iterator[PeerExchange]:
        """An exchange about ``device`` with ``peer`` on the kept link (a new one if it is
        lost). A failure inside closes the link (an answer that comes after its exchange
        gave up must not be read as the answer to the next one)."""
        if peer not in self._connect_locks:
            raise MigrationError(f"{peer!r} is not an edge of this testbed")
        with self._lock:
            turn = self._device_locks.setdefault((peer, device), threading.Lock())
        with turn:
            kept = self._peer(peer)
            inbox: queue.SimpleQueue = queue.SimpleQueue()
            with kept.lock:
                kept.waiters[device] = inbox
            if kept.link.lost:
                inbox.put(_LOST)
            try:
                yield PeerExchange(kept.link, inbox, self._limit)
            except BaseException:
                kept.link.close(drain=False)
                raise
            finally:
                with kept.lock:
                    kept.waiters.pop(device, None)

    def close(self) -> None:
        self._closed = True
        for kept in list(self._peers.values()):
            kept.link.close(drain=False)

"""The central's view of its edges: one kept link per edge, which may be lost and taken
back. Every link thread only puts what happens on the central's queue; the round loop
(one thread) is the only reader, and it talks to the edges through ``EdgeRegistry``
(``broadcast``, ``send``), which never blocks on the network.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

from common import messages as m
from common import transport
from common.door import Door
from common.errors import PeerSilent
from common.link import Link


@dataclass
class EdgeJoined:
    edge: str
    rejoin: bool


@dataclass
class EdgeMessage:
    edge: str
    msg: m.Message


@dataclass
class EdgeLost:
    edge: str
    detail: str
    silent_s: float


class EdgeRegistry:
    def __init__(self, *, edges: set[str], run_name: str, mode: str, events, heartbeat_s: float,
                 dead_after_s: float) -> None:
        self.known = edges
        self.run_name = run_name
        self.mode = mode
        self.events = events
        self.hb, self.dead = heartbeat_s, dead_after_s
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._links: dict[str, Link] = {}
        self._seen: set[str] = set()
        self.greeting: m.Message | None = None  # sent to every edge that joins (the round in progress)
        self._door = Door(where="central", events=events, first_within_s=2 * dead_after_s, known={"edge": edges},
                          claims=lambda first: ("edge", first.edge) if isinstance(first, m.EdgeHello) else None,
                          open=self._open)

    @property
    def live(self) -> set[str]:
        with self._lock:
            return set(self._links)

    def send(self, edge: str, msg: m.Message) -> bool:
        with self._lock:
            link = self._links.get(edge)
        return link is not None and link.post(msg)

    def broadcast(self, msg: m.Message) -> None:
        with self._lock:
            links = list(self._links.values())
        for link in links:
            link.post(msg)

    def close_all(self, notice: m.Message | None = None) -> list[Link]:
        with self._lock:
            links = list(self._links.values())
            self._links.clear()
        for link in links:
            link.close(notice=notice)
        return links

    def serve(self, conn: transport.Connection) -> None:
        """A listener thread: an edge says hello (``common.door``), then this thread reads its link."""
        self._door(conn)

    def _open(self, conn: transport.Connection, _hello: m.Message, _role: str, edge: str) -> Link:
        """The link of an edge that said hello: welcomed (with the round in progress), in
        place of any older link of that edge."""
        link = Link(conn, name=f"edge {edge}", heartbeat_s=self.hb, dead_after_s=self.dead,
                    on_message=lambda _l, msg: self.queue.put(EdgeMessage(edge, msg)), on_lost=self._lost_cb(edge))
        with self._lock:
            old = self._links.get(edge)
            self._links[edge] = link
            rejoin = edge in self._seen
            self._seen.add(edge)
            link.post(m.Welcome(run_name=self.run_name, mode=self.mode))
            if self.greeting is not None:
                link.post(self.greeting)
        if old is not None:
            old.close(notice=m.ErrorNotice(kind="replaced", detail="a newer connection of this edge took over"),
                      drain=False)
        self.queue.put(EdgeJoined(edge, rejoin))
        return link

    def _lost_cb(self, edge: str):
        def on_lost(link: Link, exc: Exception) -> None:
            with self._lock:
                if self._links.get(edge) is not link:
                    return  # a replaced link: the edge is still here
                del self._links[edge]
            silent = time.monotonic() - link.conn.last_received if isinstance(exc, PeerSilent) else 0.0
            self.queue.put(EdgeLost(edge, str(exc), silent))
        return on_lost

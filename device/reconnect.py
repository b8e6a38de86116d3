"""Where a device's link goes next, and when: the edges to try, in order, and the back-off
between tries.

``faults.reconnect`` names the policy: ``same`` (the edge it was on, while a dropped
connection may come back, then any), ``nearest`` (the first edge to complete a handshake)
or ``controller`` (wait for the controller's word, then as ``same``). An edge named by a
radio loss (a drop's ``to``) or by a pending move command comes first whatever the
policy; an edge that just failed the device goes last.

A ``Route`` is one search for an edge (the first attach, or the way back after a loss):
the link asks it which edges to try and tries them; the route waits out a radio loss,
backs off between passes (``common.limits.retry``) and says when to give up. It knows no
link: what one try at one edge does is the caller's.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping, TypeVar

from common import transport
from common.config import Endpoint
from common.limits import retry
from common.security import Credentials, Identity

T = TypeVar("T")


@dataclass(frozen=True)
class Lost:
    """A link that ended, or a try at one that failed: why (``error``: what connecting or
    attaching raised, a refusal too), how long the edge had been silent, whether a cut
    did it."""
    detail: str
    silent_s: float = 0.0
    cut: bool = False
    error: Exception | None = None


@dataclass(frozen=True)
class Cut:
    """A radio loss (``EdgeLink.cut``), built whole when it comes: silence from ``at`` until
    ``until`` (monotonic), then back to ``to`` ("": as the policy says); ``by`` whom (the
    controller, or the config's trace). ``gen`` counts cuts: a reattach clears only the
    ``to`` of the cut it served. The link swaps in a new one; nobody changes one in place."""
    gen: int = 0
    at: float = 0.0
    until: float = 0.0
    to: str = ""
    by: str = "controller"


class Route:
    """One search for an edge to attach to. Each pass tries the edges ``order(now, failed)``
    names (``failed``: when each edge last failed the device), in turn, until one gives an
    answer; no pass starts before ``not_before()`` (a radio loss still under way: a cut
    that comes meanwhile makes the wait longer); between passes, the back-off of
    ``common.limits.retry``; none after ``deadline``."""

    def __init__(self, order: Callable[[float, dict[str, float]], list[str]], *, deadline: float,
                 not_before: Callable[[], float] = lambda: 0.0) -> None:
        self._order = order
        self.deadline = deadline
        self._not_before = not_before
        self.failed: dict[str, float] = {}
        self.tried: list[str] = []  # the edges of the last pass

    def edges(self) -> list[str]:
        """The edges to try now, in order (empty: wait)."""
        self.tried = self._order(time.monotonic(), self.failed)
        return self.tried

    def search(self, attempt: Callable[[str], T | None], *, each_pass: Callable[[], None] = lambda: None) -> T | None:
        """``attempt(edge)`` for each edge of each pass (``each_pass()`` first) until one gives
        an answer (not None); None once a pass that ends after the deadline found none. What
        ``attempt`` raises reaches the caller (a refusal never heals by trying again)."""
        def one_pass() -> T | None:
            while (wait := self._not_before() - time.monotonic()) > 0:
                time.sleep(wait)
            each_pass()
            for edge in self.edges():
                got = attempt(edge)
                if got is not None:
                    return got
                self.failed[edge] = time.monotonic()
            return None

        return retry(one_pass, deadline=self.deadline)


def first_route(*, edges: list[str], home: str, started: float, startup_s: float) -> Route:
    """The first attach (``EdgeLink.join``): to ``home``, the config's edge, until half of
    ``run.startup_timeout`` (``startup_s``) has gone since ``started``, then to the other
    edges of sorted ``edges`` too, until ``startup_s`` has gone."""
    i = edges.index(home)
    others = edges[i + 1:] + edges[:i]
    return Route(lambda now, failed: [home] + (others if now - started >= startup_s / 2 else []),
                 deadline=started + startup_s)


def back_route(*, edges: list[str], on: str, lost_at: float, silent: bool, told: Callable[[], str], policy: str,
               dead_s: float, grace_s: float, give_up_s: float, not_before: Callable[[], float],
               nearest: Callable[[list[str]], list[str]]) -> Route:
    """Back after the link to ``on`` was lost at ``lost_at``: at each pass the
    ``candidates`` of that moment (``told()``: where a cut or the controller says now),
    until ``faults.give_up_s`` (``give_up_s``) after the loss."""
    return Route(lambda now, failed: candidates(edges=edges, on=on, told=told(), policy=policy, lost_at=lost_at,
                                                now=now, silent=silent, failed=failed, dead_s=dead_s,
                                                grace_s=grace_s, nearest=nearest),
                 deadline=lost_at + give_up_s, not_before=not_before)


def candidates(*, edges: list[str], on: str, told: str, policy: str, lost_at: float, now: float, silent: bool,
               failed: dict[str, float], dead_s: float, grace_s: float,
               nearest: Callable[[list[str]], list[str]]) -> list[str]:
    """The edges (of sorted ``edges``) to try, in order, for a device whose link to ``on``
    was lost at ``lost_at`` (``silent``: the edge had said nothing for ``dead_s``), told to
    go to ``told`` ("": by no one); ``failed``: when each edge last failed it. Empty: wait
    (for the controller's word)."""
    i = edges.index(on)
    others = edges[i + 1:] + edges[:i]
    if told:
        order = [told] + [e for e in [on] + others if e != told]
    else:
        if policy == "controller":
            # wait for the controller to say where, but not so long that the central
            # gives up on us: then as "same"
            if now - lost_at < grace_s / 2:
                return []
            policy = "same"
        if policy == "nearest":
            order = nearest(edges)
        elif silent:
            # the edge said nothing for dead_after_s: most likely it is gone (or we
            # moved out of its reach); any other edge first, it last
            order = others + [on]
        elif now - lost_at < dead_s:
            order = [on]  # a dropped connection: the same edge, while it may come back
        else:
            order = [on] + others
    recent = {e for e, t in failed.items() if now - t < dead_s}
    return [e for e in order if e not in recent] + [e for e in order if e in recent]


def nearest(endpoints: Mapping[str, Endpoint], edges: list[str], *, creds: Credentials,
            timeout: float) -> list[str]:
    """Every edge of ``edges`` that completes a handshake within ``timeout``, the first to
    complete one first (the nearest in the network)."""
    results: "queue.SimpleQueue[tuple[str, float]]" = queue.SimpleQueue()

    def probe(edge: str) -> None:
        ep = endpoints[edge]
        t0 = time.monotonic()
        try:
            conn = transport.connect(ep.host, ep.port, creds=creds, expect=Identity("edge", edge),
                                     peer=f"edge {edge}", timeout=timeout)
            conn.close()
            results.put((edge, time.monotonic() - t0))
        except Exception:  # noqa: BLE001 - any failure: not reachable now
            results.put((edge, float("inf")))
    for e in edges:
        threading.Thread(target=probe, args=(e,), daemon=True).start()
    got: dict[str, float] = {}
    deadline = time.monotonic() + timeout + 1.0
    while len(got) < len(edges):
        try:
            edge, took = results.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        got[edge] = took
    return [e for e, t in sorted(got.items(), key=lambda x: (x[1], x[0])) if t != float("inf")]

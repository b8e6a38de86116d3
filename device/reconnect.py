"""Where a device's lost link goes back to: the edges to try, in order.

``faults.reconnect`` names the policy: ``same`` (the edge it was on, while a dropped
connection may come back, then any), ``nearest`` (the first edge to complete a handshake)
or ``controller`` (wait for the controller's word, then as ``same``). An edge named by a
radio loss (a drop's ``to``) or by a pending move command comes first whatever the
policy; an edge that just failed the device goes last.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Mapping

from common import transport
from common.config import Endpoint
from common.security import Credentials, Identity


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

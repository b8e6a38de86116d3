"""How a session follows a moving device: one policy per file, both sides of a move in
each (``base`` says where the core calls them). A run picks one with
``[mobility] handover`` in mode fedfly; modes restart and classic move no state.
Adding a policy: one file, one line here. What its peer messages ask of the edge's
links (which may open a link, which come back unasked) is read from the policies."""

from __future__ import annotations

from edge.handover.base import Handover
from edge.handover.offer import OfferPolicy
from edge.handover.pull import Pull
from edge.handover.relay import Relay
from edge.handover.replica import Recovery, Replica
from edge.handover.restart import Restart

POLICIES: dict[str, type[Handover]] = {
    "restart": Restart,
    "pull": Pull,
    "offer": OfferPolicy,
    "relay": Relay,
}


def _union(kind: str) -> tuple[type, ...]:
    return tuple(dict.fromkeys(t for p in (*POLICIES.values(), Recovery) for t in getattr(p, kind)))


# What a peer edge's connection may open with (``edge.server``), whatever the policy: a
# policy's messages sent to an edge that runs another one are refused by its core.
PEER_FIRST = _union("OPENS")
# What comes back on a kept link this edge opened without a fetch waiting for it: the
# core's (``edge.peers``).
UNASKED = _union("UNASKED")

__all__ = ["PEER_FIRST", "POLICIES", "UNASKED", "Handover", "Recovery", "Replica"]

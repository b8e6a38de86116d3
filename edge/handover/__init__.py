"""How a session follows a moving device: one policy per file, both sides of a move in
each (``base`` says where the core calls them). A run picks one with
``[mobility] handover`` in mode fedfly; modes restart and classic move no state.
Adding a policy: one file, one line here."""

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

__all__ = ["POLICIES", "Handover", "Recovery", "Replica"]

"""The life of one device's session on an edge, as one table (in the spirit of h11's
``_state.py``): every state, the data it carries, every event, and the one state each
event leads to.

A device's entry on an edge is in exactly one state:

    IDLE          the device is linked here and has no session here (between rounds,
                  not in this round, its update taken, or its session served from
                  another edge)
    ACTIVE        linked here, with its session of the current round: steps train here
    DETACHED      its session is here, the device is not linked (it left, its link broke,
                  or it went silent); held until it comes back, is pulled, or the round ends
    DELIVERING    the round's work is done and its update is on its way to the central;
                  kept until the central confirms (the device may or may not be linked)
    PULLING       its session is being fetched from another edge (or rebuilt, or its
                  round is not known here yet); the device waits for the answer
    HANDING_OVER  its session's snapshot went to another edge (pulled, or offered when the
                  device left); waiting for that edge to confirm it holds an identical copy
    GONE          no entry (the start and the end: handed over, delivered, discarded)

Three states carry data of their own (``STATE_DATA``): a DELIVERING entry its update, a
PULLING one its attach, fetch token and deadline (``Pulling``), one HANDING_OVER where
its snapshot went (``HandingOver``). An entry's data is set as it enters the state and
goes as it leaves it, so nothing is cleared by hand.

``TRANSITIONS[state][event]`` is the one next state. Where the outcome of what happens
depends on its data, the handler (``edge.attach``, ``edge.devices``, ``edge.rounds``,
``edge.handover``) names the outcome as the event: a device attaching is ``NO_SESSION``,
``FRESH``, ``RESUME``, ``FETCH`` or ``ATTACH`` as the edge decides; a refused pull is
``PULL_REFUSED``, a pull served ``PULL``. An event the table lacks for the state raises ``TransitionError`` naming the
role, the state and the event (the link that caused it is closed; the edge goes on).

One transition is state-triggered (as in h11's ``STATE_TRIGGERED_TRANSITIONS``): IDLE and
ACTIVE are linked states, and an entry that enters one without a link takes ``LINK_LOST``
at once (IDLE -> GONE, ACTIVE -> DETACHED). Copies of other edges' sessions, kept for
recovery, are not entries (``EdgeCore.replicas``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.errors import LocalProtocolError

if TYPE_CHECKING:
    from common import messages as m
    from edge.handover.replica import Replica
    from edge.ports import Port


class State(enum.Enum):
    GONE = "gone"
    IDLE = "idle"
    ACTIVE = "active"
    DETACHED = "detached"
    DELIVERING = "delivering"
    PULLING = "pulling"
    HANDING_OVER = "handing_over"

    def __repr__(self) -> str:
        return self.name


class Event(enum.Enum):
    # a device attaches (or a fetch's outcome sends its attach back to be decided again):
    NO_SESSION = "no_session"    # no work for it here now (not its round, round over, update taken, relayed)
    FRESH = "fresh"              # its round starts here from the round's weights (a join, a new round, a restart)
    RESUME = "resume"            # its session is here: it goes on
    FETCH = "fetch"              # its session is on another edge (or its round not known here yet): fetched
    ATTACH = "attach"            # a new link while a fetch (it answers) or a delivery (its ack does) goes on
    # the device's own link:
    STEP = "step"                # a step's activations (trained, answered again, or stale: ignored)
    FINISH = "finish"            # its round's update (or one sent again)
    FINISH_STALE = "finish_stale"  # an update of a round its session here is not of: ignored
    LINK_LOST = "link_lost"      # the link closed, broke or went silent
    LEAVE = "leave"              # it leaves for a planned move; its session is held here
    LEAVE_OFFERED = "leave_offered"  # ...and its session is offered to the edge it goes to
    # another edge:
    PULL = "pull"                # asks for the session: its snapshot goes
    PULL_REFUSED = "pull_refused"  # asks for it, refused (not here, not at that position, offered already)
    DROP = "drop"                # took the device over without its state: no link serves it here, it goes
    DROP_LINKED = "drop_linked"  # ...but a link of the device is here (it came back): nothing changes
    # the outcome of a handover:
    PULLED = "pulled"            # the session this edge fetched is installed (fetched, offered or a replica)
    INSTALLED = "installed"      # the edge we handed the session to confirms its copy
    INSTALLED_STALE = "installed_stale"  # a confirmation of another handover: refused
    HANDOVER_FAILED = "handover_failed"  # the handover ended unconfirmed (declined, link lost, deadline)
    # the central:
    ROUND_START = "round_start"  # a newer round starts that the device has no session of here
    UPDATE_ACKED = "update_acked"  # the central has the device's update

    def __repr__(self) -> str:
        return self.name


@dataclass
class Delivering:
    """DELIVERING: the update that went to the central (the central link resends it)."""
    update: "m.DeviceUpdate"


@dataclass
class Pulling:
    """PULLING: the attach to answer, and which fetch counts (``token``; 0: none runs yet,
    the round is not known here) since when (its deadline)."""
    request: "m.AttachRequest"
    token: int = 0
    since: float = 0.0
    hops: int = 0          # "moved to ..." refusals followed
    offer_token: int = 0   # the source said the session is offered to us (this fetch's token)
    no_offer: int = 0      # this fetch (its token) replaces an offer that failed


@dataclass
class HandingOver:
    """HANDING_OVER: where the snapshot went (``port``, ``target``), what it was
    (``checksum``), since when, whether offered (when the device left) or pulled, and the
    copy kept as a replica once the target confirms (with replication on)."""
    port: "Port"
    checksum: str
    target: str
    since: float
    offered: bool
    kept: "Replica | None" = None


STATE_DATA: dict[State, type] = {State.DELIVERING: Delivering, State.PULLING: Pulling,
                                 State.HANDING_OVER: HandingOver}
# States a device is linked in: entering one without a link is followed by LINK_LOST.
LINKED = frozenset({State.IDLE, State.ACTIVE})

S, E = State, Event
# What the edge decides when a device attaches to an entry that holds no finished round.
_DECIDE = {E.NO_SESSION: S.IDLE, E.FRESH: S.ACTIVE, E.FETCH: S.PULLING}

TRANSITIONS: dict[State, dict[Event, State]] = {
    S.GONE: {
        **_DECIDE,
    },
    S.IDLE: {
        **_DECIDE,
        E.STEP: S.IDLE,              # a step of a round that ended: ignored
        E.FINISH: S.IDLE,            # an update sent again: acknowledged again
        E.FINISH_STALE: S.IDLE,
        E.LINK_LOST: S.GONE,
        E.PULL_REFUSED: S.IDLE,      # "delivered", "moved to ...", or nothing here
        E.DROP_LINKED: S.IDLE,
        E.ROUND_START: S.IDLE,
    },
    S.ACTIVE: {
        **_DECIDE,                   # a new link: a restarted device, a stale link of a device from elsewhere
        E.RESUME: S.ACTIVE,          # a new link after a drop: the same session goes on
        E.STEP: S.ACTIVE,
        E.FINISH: S.DELIVERING,
        E.FINISH_STALE: S.ACTIVE,
        E.LINK_LOST: S.DETACHED,
        E.LEAVE: S.DETACHED,
        E.LEAVE_OFFERED: S.HANDING_OVER,
        E.PULL: S.HANDING_OVER,      # the device went elsewhere (our link is stale)
        E.PULL_REFUSED: S.ACTIVE,
        E.DROP_LINKED: S.ACTIVE,
        E.ROUND_START: S.IDLE,       # its round was left behind and it is not in the new one
    },
    S.DETACHED: {
        **_DECIDE,                   # a restarted device; a stale copy here: the one it names is fetched
        E.RESUME: S.ACTIVE,
        E.PULL: S.HANDING_OVER,
        E.PULL_REFUSED: S.DETACHED,  # not at that position
        E.DROP: S.GONE,
        E.ROUND_START: S.GONE,
    },
    S.DELIVERING: {
        E.FRESH: S.ACTIVE,           # the next round, before the central's ack came
        E.ATTACH: S.DELIVERING,      # answered once the central confirms
        E.STEP: S.DELIVERING,        # a late duplicate: ignored
        E.FINISH: S.DELIVERING,      # sent again: acknowledged once confirmed
        E.LINK_LOST: S.DELIVERING,
        E.PULL: S.HANDING_OVER,      # the device moved on before the ack: the session goes too
        E.PULL_REFUSED: S.DELIVERING,
        E.DROP: S.GONE,
        E.DROP_LINKED: S.DELIVERING,
        E.ROUND_START: S.IDLE,
        E.UPDATE_ACKED: S.IDLE,
    },
    S.PULLING: {
        **_DECIDE,                   # the device gave up its state, or a fetch's outcome decides again
        E.ATTACH: S.PULLING,         # a new link while fetching: the fetch goes on and answers it
        E.STEP: S.PULLING,           # too early: ignored (the device waits for our reply)
        E.LINK_LOST: S.PULLING,      # the fetch goes on; the session will wait here
        E.PULL_REFUSED: S.PULLING,   # not here yet
        E.DROP_LINKED: S.PULLING,
        E.PULLED: S.ACTIVE,
        E.ROUND_START: S.IDLE,
    },
    S.HANDING_OVER: {
        **_DECIDE,                   # the device restarted; or names the edge we hand to: fetched from there
        E.RESUME: S.ACTIVE,          # came back before the handover ended: kept
        E.PULL: S.HANDING_OVER,      # asked again (the target retried, or another edge): sent again
        E.PULL_REFUSED: S.HANDING_OVER,  # offered to that edge already
        E.INSTALLED: S.GONE,
        E.INSTALLED_STALE: S.HANDING_OVER,
        E.HANDOVER_FAILED: S.DETACHED,
        E.DROP: S.GONE,
        E.ROUND_START: S.GONE,
    },
}

# Events that arrive on the device's own link: allowed only from the device's current
# link (a message from a replaced link is dropped before it reaches the table).
DEVICE_EVENTS = frozenset({E.STEP, E.FINISH, E.FINISH_STALE})


class TransitionError(LocalProtocolError):
    """An event that the table does not allow in the entry's state."""

    def __init__(self, role: str, device: str, state: State, event: Event) -> None:
        self.role, self.device, self.state, self.event = role, device, state, event
        super().__init__(f"{role}: can't handle {event.name} for {device} in state {state.name}")


def next_state(role: str, device: str, state: State, event: Event) -> State:
    """The state ``event`` leads to from ``state``; ``TransitionError`` if none."""
    to = TRANSITIONS[state].get(event)
    if to is None:
        raise TransitionError(role, device, state, event)
    return to

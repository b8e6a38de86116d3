"""The life of one device's session on an edge, as one table (in the spirit of h11's
``_state.py``): every state, every event, and which states an event may lead to.

A device's entry on an edge is in exactly one state:

    IDLE          the device is linked here and has no session here (between rounds,
                  not in this round, or its update was taken)
    ACTIVE        linked here, with its session of the current round: steps train here
    DETACHED      its session is here, the device is not linked (it left, its link broke,
                  or it went silent); held until it comes back, is pulled, or the round ends
    DELIVERING    the round's work is done and its update is on its way to the central;
                  kept until the central confirms (the device may or may not be linked)
    PULLING       linked here, waiting while its session is fetched from another edge
                  (or rebuilt from the round's weights)
    HANDING_OVER  its session's snapshot went to another edge (pulled, or offered when the
                  device left); waiting for that edge to confirm it holds an identical copy
    GONE          no entry (the start and the end: handed over, delivered, discarded)

Events are what can happen to an entry: a device attaching (``JOIN``: it holds no round
state; ``RESUME_HERE``: its session should be here; ``RESUME_FROM``: it names another
edge), a ``STEP`` or ``FINISH`` from the device, its ``LINK_LOST``, a peer's ``PULL`` or
``DROP``, its ``LEAVE`` for a planned move (the session is offered to the edge it names),
the outcome of a handover (``PULLED``, ``INSTALLED``, ``HANDOVER_FAILED``), the
central's ``ROUND_START`` and ``UPDATE_ACKED``. (Copies of other edges' sessions, kept
for recovery, are not entries: ``EdgeCore.replicas``.)

``TRANSITIONS[state][event]`` is the set of states the event may lead to; the handler in
``edge.core`` picks one from the event's data (a JOIN during a round the device takes part
in starts a session; between rounds it does not), and ``check_transition`` refuses
anything not in the table with one error naming the role, the state and the event.
"""

from __future__ import annotations

import enum

from common.errors import LocalProtocolError


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
    JOIN = "join"                    # device attaches holding no round state
    RESUME_HERE = "resume_here"      # device attaches, says its session is on this edge
    RESUME_FROM = "resume_from"      # device attaches, says its session is on another edge
    STEP = "step"                    # device sends a step's activations
    FINISH = "finish"                # device sends its round's update
    LINK_LOST = "link_lost"          # the device's link closed, broke or went silent
    LEAVE = "leave"                  # the device leaves for a planned move, naming the edge it goes to
    PULL = "pull"                    # another edge asks for the session
    DROP = "drop"                    # another edge took the device over without its state
    PULLED = "pulled"                # the session this edge was fetching is here (or rebuilt)
    INSTALLED = "installed"          # the edge we handed the session to confirms its copy
    HANDOVER_FAILED = "handover_failed"  # ...or its link broke before it confirmed
    ROUND_START = "round_start"      # the central starts a newer round
    UPDATE_ACKED = "update_acked"    # the central has the device's update

    def __repr__(self) -> str:
        return self.name


S, E = State, Event
# Where a device's attach can take an entry that holds no finished round: no work now
# (IDLE), a session here (ACTIVE: its own, or one from the round's weights), or one being
# fetched from the edge it names (PULLING).
_ATTACH = {S.IDLE, S.ACTIVE, S.PULLING}

TRANSITIONS: dict[State, dict[Event, frozenset[State]]] = {k: {e: frozenset(v) for e, v in d.items()} for k, d in {
    S.GONE: {
        E.JOIN: {S.IDLE, S.ACTIVE},
        E.RESUME_HERE: _ATTACH,      # names us, but we no longer hold it: fetch or rebuild
        E.RESUME_FROM: _ATTACH,
        E.PULL: {S.GONE},            # refused: nothing here (or "it moved on to ...")
        E.DROP: {S.GONE},
        E.ROUND_START: {S.GONE},
        E.UPDATE_ACKED: {S.GONE},    # an ack for an update we resent: nothing to do
    },
    S.IDLE: {
        E.JOIN: {S.IDLE, S.ACTIVE},  # a new link of the same device replaces the old one
        E.RESUME_HERE: _ATTACH,
        E.RESUME_FROM: _ATTACH,
        E.STEP: {S.IDLE},            # a step of a round that ended: ignored
        E.FINISH: {S.IDLE},          # an update sent again: acknowledged again
        E.LINK_LOST: {S.GONE},
        E.PULL: {S.IDLE},            # refused ("delivered" or nothing here)
        E.DROP: {S.IDLE, S.GONE},    # linked here: a late drop changes nothing / no link: gone
        E.ROUND_START: {S.IDLE, S.ACTIVE, S.GONE},  # ... / no link: gone
        E.UPDATE_ACKED: {S.IDLE},
    },
    S.ACTIVE: {
        E.JOIN: {S.ACTIVE, S.IDLE},  # a restarted device: the round again (or not its round)
        E.RESUME_HERE: _ATTACH,      # a new link after a drop: the same session goes on (ACTIVE)
        E.RESUME_FROM: _ATTACH,      # a stale link here; the device came from elsewhere
        E.STEP: {S.ACTIVE},          # trained, or answered again from the kept reply
        E.FINISH: {S.DELIVERING, S.ACTIVE},  # delivered / an update of an older round: ignored
        E.LINK_LOST: {S.DETACHED},
        E.LEAVE: {S.HANDING_OVER, S.DETACHED},  # its session offered to where it goes / not offered
        E.PULL: {S.HANDING_OVER, S.ACTIVE},  # the device went elsewhere (our link is stale) / refused
        E.DROP: {S.ACTIVE},          # linked here: a late drop changes nothing
        E.ROUND_START: {S.ACTIVE, S.IDLE},   # its round was left behind: the new one (or none)
        E.UPDATE_ACKED: {S.ACTIVE},
    },
    S.DETACHED: {
        E.JOIN: {S.ACTIVE, S.IDLE},  # the device restarted: its round again from the weights
        E.RESUME_HERE: _ATTACH,
        E.RESUME_FROM: _ATTACH,      # our copy is stale: fetch the one it names
        E.PULL: {S.HANDING_OVER, S.DETACHED},  # handed over / refused (not at that position)
        E.DROP: {S.GONE},
        E.ROUND_START: {S.GONE},
        E.UPDATE_ACKED: {S.DETACHED},
    },
    S.DELIVERING: {
        E.JOIN: {S.DELIVERING},      # acknowledged once the central confirms
        E.RESUME_HERE: {S.DELIVERING},
        E.RESUME_FROM: {S.DELIVERING},
        E.STEP: {S.DELIVERING},      # a late duplicate: ignored
        E.FINISH: {S.DELIVERING},    # sent again: acknowledged once confirmed
        E.LINK_LOST: {S.DELIVERING},
        E.PULL: {S.HANDING_OVER, S.DELIVERING},  # the device moved on before the ack: the session goes too
        E.DROP: {S.GONE, S.DELIVERING},
        E.ROUND_START: {S.IDLE, S.ACTIVE, S.GONE},
        E.UPDATE_ACKED: {S.IDLE, S.GONE},
    },
    S.PULLING: {
        E.JOIN: {S.IDLE, S.ACTIVE},  # the device gave up its state: start afresh
        E.RESUME_HERE: {S.PULLING},  # a new link while fetching: the fetch goes on and answers it
        E.RESUME_FROM: {S.PULLING},
        E.STEP: {S.PULLING},         # too early: ignored (the device waits for our reply)
        E.LINK_LOST: {S.PULLING},    # the fetch goes on; the session will wait here
        E.PULL: {S.PULLING},         # refused: not here yet
        E.DROP: {S.PULLING},
        # here / device gone meanwhile / round over (no link: gone) / fetched again
        E.PULLED: {S.ACTIVE, S.DETACHED, S.IDLE, S.GONE, S.PULLING},
        E.ROUND_START: {S.IDLE, S.ACTIVE, S.GONE, S.PULLING},
        E.UPDATE_ACKED: {S.PULLING},
    },
    S.HANDING_OVER: {
        E.JOIN: {S.ACTIVE, S.IDLE},  # the device restarted and came back here
        E.RESUME_HERE: _ATTACH,      # came back before the handover ended: keep it (ACTIVE)
        E.RESUME_FROM: _ATTACH,      # names the edge we were handing to: fetch from there
        E.PULL: {S.HANDING_OVER},    # asked again (the target retried, or another edge): sent again
        E.INSTALLED: {S.GONE, S.HANDING_OVER},  # confirmed: released / a stale confirmation
        E.HANDOVER_FAILED: {S.DETACHED},
        E.DROP: {S.GONE},
        E.ROUND_START: {S.GONE},
        E.UPDATE_ACKED: {S.HANDING_OVER},
    },
}.items()}

# Events that arrive on the device's own link: allowed only from the device's current
# link (a message from a replaced link is dropped before it reaches the table).
DEVICE_EVENTS = frozenset({E.STEP, E.FINISH})


class TransitionError(LocalProtocolError):
    """An event that the table does not allow in the entry's state."""

    def __init__(self, role: str, device: str, state: State, event: Event, to: State | None = None) -> None:
        self.role, self.device, self.state, self.event, self.to = role, device, state, event, to
        what = f"can't handle {event.name} for {device} in state {state.name}"
        if to is not None:
            what = f"{event.name} for {device} may not lead from {state.name} to {to.name}"
        super().__init__(f"{role}: {what}")


def allowed(state: State, event: Event) -> frozenset[State]:
    """The states ``event`` may lead to from ``state`` (empty: not allowed)."""
    return TRANSITIONS[state].get(event, frozenset())


def check_transition(role: str, device: str, state: State, event: Event, to: State) -> State:
    """Return ``to`` if the table allows ``state --event--> to``; raise ``TransitionError``."""
    targets = allowed(state, event)
    if not targets:
        raise TransitionError(role, device, state, event)
    if to not in targets:
        raise TransitionError(role, device, state, event, to)
    return to

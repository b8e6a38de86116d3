"""The edge session's lifecycle table against the real core: every unit scenario of
``tests/test_edge_core.py`` is driven again with the table's check recorded, and what
the core did must be what the table says (and the table must hold nothing the core
never does)."""

from __future__ import annotations

import inspect

import pytest

import edge.core
from edge.lifecycle import TRANSITIONS, Event, State, TransitionError, allowed, check_transition
from tests import test_edge_core

S, E = State, Event


@pytest.fixture(scope="module")
def made() -> dict[tuple[State, Event, State], int]:
    """(state, event, next state) -> how often the core made that move, over every
    scenario of the core's unit tests that takes no fixture."""
    seen: dict[tuple[State, Event, State], int] = {}
    real = edge.core.check_transition

    def recording(role, device, state, event, to):
        out = real(role, device, state, event, to)  # raises for what the table refuses
        seen[(state, event, to)] = seen.get((state, event, to), 0) + 1
        return out

    edge.core.check_transition = recording
    try:
        for name, fn in vars(test_edge_core).items():
            if name.startswith("test_") and callable(fn) and not inspect.signature(fn).parameters:
                fn()
    finally:
        edge.core.check_transition = real
    return seen


def test_every_move_the_core_makes_is_in_the_table(made):
    assert made
    for (state, event, to) in made:
        assert to in allowed(state, event), (state, event, to)


def test_every_state_and_event_of_the_table_is_one_the_core_uses(made):
    # a state nothing enters, or an event nothing raises, is dead weight in the table
    assert {to for (_, _, to) in made} | {S.GONE} == set(State)
    assert {ev for (_, ev, _) in made} == set(Event)
    assert set(TRANSITIONS) == set(State)


def test_check_transition_names_role_state_and_event():
    assert check_transition("edge edge1", "device1", S.ACTIVE, E.LINK_LOST, S.DETACHED) is S.DETACHED
    with pytest.raises(TransitionError) as info:
        check_transition("edge edge1", "device1", S.DETACHED, E.STEP, S.DETACHED)
    text = str(info.value)
    assert "edge edge1" in text and "DETACHED" in text and "STEP" in text and "device1" in text
    with pytest.raises(TransitionError) as info:
        check_transition("edge edge2", "device3", S.ACTIVE, E.FINISH, S.IDLE)
    assert "may not lead from ACTIVE to IDLE" in str(info.value)

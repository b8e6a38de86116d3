"""The edge session's lifecycle table against the real core: every unit scenario of
``tests/test_edge_core.py`` (and of ``tests/test_lifecycle_cells.py``, for the cells those
do not reach) is driven again with the table's look-ups recorded, and what
the core did must be what the table says: each (state, event) names one next state,
every move the core makes is a cell of the table, and every cell is one the core uses."""

from __future__ import annotations

import inspect

import pytest

import edge.core
from edge.lifecycle import STATE_DATA, TRANSITIONS, Event, State, TransitionError, next_state
from tests import test_edge_core, test_lifecycle_cells

S, E = State, Event


@pytest.fixture(scope="module")
def made() -> dict[tuple[State, Event], int]:
    """(state, event) -> how often the core made that move, over every scenario of the
    core's unit tests that takes no fixture."""
    seen: dict[tuple[State, Event], int] = {}
    real = edge.core.next_state

    def recording(role, device, state, event):
        out = real(role, device, state, event)  # raises for what the table refuses
        seen[(state, event)] = seen.get((state, event), 0) + 1
        return out

    edge.core.next_state = recording
    try:
        for module in (test_edge_core, test_lifecycle_cells):
            for name, fn in vars(module).items():
                if name.startswith("test_") and callable(fn) and not inspect.signature(fn).parameters \
                        and fn.__module__ == module.__name__:
                    fn()
    finally:
        edge.core.next_state = real
    return seen


def test_every_cell_names_one_state():
    assert set(TRANSITIONS) == set(State)
    for state, row in TRANSITIONS.items():
        for event, to in row.items():
            assert isinstance(to, State), (state, event, to)


def test_every_cell_of_the_table_is_one_the_core_uses(made):
    # a cell nothing makes is dead weight in the table (and a state nothing enters, or an
    # event nothing raises, with it)
    cells = {(state, event) for state, row in TRANSITIONS.items() for event in row}
    assert made and set(made) <= cells
    unused = sorted(f"{s.name} x {e.name}" for s, e in cells - set(made))
    assert not unused, unused
    assert {TRANSITIONS[s][e] for s, e in made} | {S.GONE} == set(State)
    assert {e for _, e in made} == set(Event)


def test_the_states_with_data_are_states_of_the_table():
    assert set(STATE_DATA) <= set(State) - {S.GONE, S.IDLE, S.ACTIVE, S.DETACHED}


def test_next_state_names_role_state_and_event():
    assert next_state("edge edge1", "device1", S.ACTIVE, E.LINK_LOST) is S.DETACHED
    with pytest.raises(TransitionError) as info:
        next_state("edge edge1", "device1", S.DETACHED, E.STEP)
    text = str(info.value)
    assert "edge edge1" in text and "DETACHED" in text and "STEP" in text and "device1" in text

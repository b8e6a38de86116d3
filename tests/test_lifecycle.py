"""The edge session's lifecycle table: complete, consistent, and strict."""

from __future__ import annotations

import pytest

from edge.lifecycle import DEVICE_EVENTS, TRANSITIONS, Event, State, TransitionError, allowed, check_transition

S, E = State, Event


def test_every_state_has_a_row_and_every_target_is_a_state():
    assert set(TRANSITIONS) == set(State)
    for state, row in TRANSITIONS.items():
        for event, targets in row.items():
            assert isinstance(event, Event) and targets, (state, event)
            assert all(isinstance(t, State) for t in targets)


def test_every_state_is_reachable_from_gone_and_can_end():
    seen, todo = {S.GONE}, [S.GONE]
    while todo:
        s = todo.pop()
        for targets in TRANSITIONS[s].values():
            for t in targets - seen:
                seen.add(t)
                todo.append(t)
    assert seen == set(State)
    # and from every state some path leads back to GONE (nothing is held forever)
    for start in State:
        reach, todo = {start}, [start]
        while todo:
            s = todo.pop()
            for targets in TRANSITIONS[s].values():
                for t in targets - reach:
                    reach.add(t)
                    todo.append(t)
        assert S.GONE in reach, start


def test_a_round_start_never_keeps_a_session_nobody_serves():
    # DETACHED, HANDING_OVER and REPLICA sessions belong to a round; a newer round ends them
    for s in (S.DETACHED, S.HANDING_OVER, S.REPLICA):
        assert allowed(s, E.ROUND_START) == {S.GONE}


def test_only_a_linked_device_can_step_or_finish():
    for s in (S.GONE, S.DETACHED, S.HANDING_OVER, S.REPLICA):
        for ev in DEVICE_EVENTS:
            assert not allowed(s, ev), (s, ev)
    assert allowed(S.ACTIVE, E.STEP) == {S.ACTIVE}
    assert allowed(S.ACTIVE, E.FINISH) == {S.DELIVERING, S.ACTIVE}  # ACTIVE: an older round's update


def test_handover_outcomes_only_where_a_handover_is():
    for s in State:
        if s is not S.HANDING_OVER:
            assert not allowed(s, E.INSTALLED) and not allowed(s, E.HANDOVER_FAILED), s
        if s is not S.PULLING:
            assert not allowed(s, E.PULLED), s


def test_a_replica_is_never_handed_over_or_trained():
    assert allowed(S.REPLICA, E.PULL) == {S.REPLICA}
    assert not allowed(S.REPLICA, E.STEP)


def test_check_transition_names_role_state_and_event():
    assert check_transition("edge edge1", "device1", S.ACTIVE, E.LINK_LOST, S.DETACHED) is S.DETACHED
    with pytest.raises(TransitionError) as info:
        check_transition("edge edge1", "device1", S.DETACHED, E.STEP, S.DETACHED)
    text = str(info.value)
    assert "edge edge1" in text and "DETACHED" in text and "STEP" in text and "device1" in text
    with pytest.raises(TransitionError) as info:
        check_transition("edge edge2", "device3", S.ACTIVE, E.FINISH, S.IDLE)
    assert "may not lead from ACTIVE to IDLE" in str(info.value)

"""The session table's cells that the core's own scenarios (``tests/test_edge_core.py``)
do not reach, each driven through the core's seam and its outcome checked (the replay in
``tests/test_lifecycle.py`` runs these too, so that every cell of the table is one the
core makes)."""

from __future__ import annotations

from common import messages as m
from edge.core import EdgeCore
from edge.lifecycle import State
from edge.ports import DeviceLost, DeviceMessage, Outbox, PeerMessage
from tests.seams import (DEV_KEYS, WEIGHTS, active, attach, batch, detached_session, make_core, of, proofs,
                         start_round, state)

S = State


def _pull(core: EdgeCore, step: int, by: str = "edge2") -> Outbox:
    peer = Outbox(f"edge {by}")
    core.handle(PeerMessage(peer, m.SessionPull(device="device1", round=1, step=step, target=by,
                                                proofs=proofs("device1", by))))
    return peer


def _drop(core: EdgeCore, by: str = "edge2") -> Outbox:
    peer = Outbox(f"edge {by}")
    core.handle(PeerMessage(peer, m.SessionDrop(device="device1", round=1, target=by, proofs=proofs("device1", by))))
    return peer


def _delivering(core: EdgeCore) -> Outbox:
    p = active(core, 2)
    core.handle(DeviceMessage(p, "device1", m.DeviceDone(round=1, samples=8, steps=2, train_seconds=0.1,
                                                         weights={k: WEIGHTS[k] for k in DEV_KEYS})))
    assert state(core) is S.DELIVERING
    return p


def test_an_active_entry_fetches_refuses_hands_over_or_goes_idle():
    core = make_core()
    active(core, 2)
    assert of(_pull(core, step=5), m.PullRefused) and state(core) is S.ACTIVE       # PULL_REFUSED
    q = attach(core, kind="resume", round=1, step=3, source="edge2")                  # FETCH: it names another edge
    assert state(core) is S.PULLING and core.fetcher.pulls[-1]["source"] == "edge2"
    del q
    core = make_core()
    p = active(core, 2)
    assert of(_pull(core, step=2), m.SessionSnapshot) and p.closed and state(core) is S.HANDING_OVER  # PULL
    core = make_core()
    active(core, 2)
    attach(core, last_round=1)                                                        # NO_SESSION: its update taken
    assert state(core) is S.IDLE and core.entries["device1"].session is None


def test_a_delivering_entry_ignores_a_late_step_and_a_linked_drop_and_serves_a_pull():
    core = make_core()
    p = _delivering(core)
    core.handle(DeviceMessage(p, "device1", batch(1)))                                # STEP: ignored
    assert of(_drop(core), m.SessionReleased) and state(core) is S.DELIVERING         # DROP_LINKED
    assert of(_pull(core, step=5), m.PullRefused) and state(core) is S.DELIVERING     # PULL_REFUSED
    core.handle(DeviceLost(p, "device1", ConnectionError("left"), 0.0))               # LINK_LOST
    assert state(core) is S.DELIVERING
    assert of(_pull(core, step=2), m.SessionSnapshot) and state(core) is S.HANDING_OVER  # PULL
    core = make_core()
    p = _delivering(core)
    core.handle(DeviceLost(p, "device1", ConnectionError("left"), 0.0))
    assert of(_drop(core), m.SessionReleased) and state(core) is S.GONE               # DROP: unlinked


def test_a_delivering_entry_at_a_new_round_starts_it_or_stands_by():
    core = make_core()
    p = _delivering(core)
    start_round(core, 2)                                                              # FRESH: in the new round
    assert state(core) is S.ACTIVE and of(p, m.DeviceRound)[-1].round_plan.round == 2
    core = make_core()
    p = _delivering(core)
    start_round(core, 2, participants=("device2",))                                   # ROUND_START: not in it
    assert state(core) is S.IDLE and of(p, m.StandBy)


def test_a_detached_session_ends_with_its_round_or_when_its_device_has_no_round_here():
    core = make_core()
    detached_session(core)
    start_round(core, 2)                                                              # ROUND_START
    assert state(core) is S.GONE
    core = make_core()
    detached_session(core)
    attach(core, last_round=1)                                                        # NO_SESSION
    assert state(core) is S.IDLE


def test_a_device_at_step_0_from_another_edge_starts_fresh_here():
    core = make_core(name="edge2")
    start_round(core)
    p = attach(core, kind="resume", round=1, step=0, source="edge1")                  # GONE x FRESH
    assert of(p, m.AttachReply)[0].how == "fresh" and state(core) is S.ACTIVE and core.fetcher.drops


def _handing_over(core: EdgeCore) -> None:
    detached_session(core)
    assert of(_pull(core, step=2), m.SessionSnapshot) and state(core) is S.HANDING_OVER


def test_a_session_handed_over_goes_with_a_drop_or_its_round_and_yields_to_its_device():
    core = make_core()
    _handing_over(core)
    assert of(_drop(core, by="edge3"), m.SessionReleased) and state(core) is S.GONE    # DROP
    core = make_core()
    _handing_over(core)
    start_round(core, 2)                                                              # ROUND_START
    assert state(core) is S.GONE
    core = make_core()
    _handing_over(core)
    attach(core, kind="resume", round=1, step=3, source="edge2")                      # FETCH: it went on there
    assert state(core) is S.PULLING and core.fetcher.pulls[-1]["source"] == "edge2"
    core = make_core()
    _handing_over(core)
    p = attach(core)                                                                  # FRESH: a restarted device
    assert state(core) is S.ACTIVE and of(p, m.DeviceRound)
    core = make_core()
    _handing_over(core)
    attach(core, last_round=1)                                                        # NO_SESSION
    assert state(core) is S.IDLE


def test_an_idle_entry_refuses_a_pull_ignores_an_old_update_and_fetches_for_its_device():
    core = make_core()
    p = attach(core)
    assert state(core) is S.IDLE
    core.handle(DeviceMessage(p, "device1", m.DeviceDone(round=1, samples=8, steps=2, train_seconds=0.1,
                                                         weights={k: WEIGHTS[k] for k in DEV_KEYS})))
    assert state(core) is S.IDLE and not p.closed and core.central.delivered == []    # FINISH_STALE
    assert of(_pull(core, step=2), m.PullRefused) and state(core) is S.IDLE          # PULL_REFUSED
    start_round(core, 1, participants=("device2",))                                   # ROUND_START: not in it
    assert state(core) is S.IDLE
    core = make_core(name="edge2")
    start_round(core)
    attach(core, last_round=1)
    assert state(core) is S.IDLE
    attach(core, kind="resume", round=1, step=2, source="edge1")                      # FETCH
    assert state(core) is S.PULLING and core.fetcher.pulls[-1]["source"] == "edge1"


def test_a_pulling_entry_ignores_steps_pulls_and_drops_until_its_round_ends():
    core = make_core(name="edge2")
    start_round(core)
    p = attach(core, kind="resume", round=1, step=3, source="edge1")
    assert state(core) is S.PULLING
    core.handle(DeviceMessage(p, "device1", batch(3)))                                # STEP: too early
    assert state(core) is S.PULLING and not of(p, m.Gradients)
    assert of(_pull(core, step=3, by="edge3"), m.PullRefused) and state(core) is S.PULLING  # PULL_REFUSED
    assert of(_drop(core, by="edge3"), m.SessionReleased) and state(core) is S.PULLING      # DROP_LINKED
    start_round(core, 2, participants=("device2",))                                   # ROUND_START
    assert state(core) is S.IDLE and of(p, m.AttachReply)[-1].how == "round over"

"""The edge's core driven by events through its seam: fake device and peer ports, a fake
central, a fake fetcher (``tests.seams``). No socket, no thread: ``core.handle(event)``
and look at what it sent and which state each device is in."""

from __future__ import annotations

import pytest
import torch

from common import messages as m
from common.events import EventLog
from common.models import build_model
from common.plan import RoundPlan
from common.security import attach_proofs, edge_key
from edge.checksum import snapshot_checksum
from edge.core import EdgeCore
from edge.lifecycle import State
from edge.ports import (CentralMessage, CentralUp, DeviceAttach, DeviceLost, DeviceMessage, Outbox, PeerLost,
                        PeerMessage, PullOutcome, Stop, Tick)
from edge.session import EdgeSession
from tests.seams import (DEV_KEYS, EDGE_KEYS, EDGES, SECRET, WEIGHTS, HeldTrainer, active, attach, batch,
                         detached_session, make_core, of, proofs, start_round, state)

S = State


def test_attaches_wait_for_the_central_then_the_round_starts_their_sessions():
    core = make_core(welcomed=False)
    p = attach(core)
    assert p.sent == [] and core.parked  # not welcomed yet: parked
    core.handle(CentralUp(run_name="run", mode="fedfly"))
    assert of(p, m.AttachReply)[0].ok and state(core) is S.IDLE
    assert core.central.sent[-1] == m.EdgeStatus(edge="edge1", attached=["device1"])
    start_round(core)
    (work,) = of(p, m.DeviceRound)
    assert work.round_plan.round == 1 and set(work.weights) == set(DEV_KEYS)
    assert state(core) is S.ACTIVE


def test_unknown_device_is_refused_and_its_link_closed():
    core = make_core()
    p = attach(core, "device9")
    assert not of(p, m.AttachReply)[0].ok and p.closed and "device9" not in core.entries


def test_a_step_sent_again_is_answered_again_not_trained_twice():
    core = make_core()
    p = active(core)
    core.handle(DeviceMessage(p, "device1", batch(0)))  # the gradient was lost: sent again
    g1, g2 = of(p, m.Gradients)
    assert (g1.step, g2.step) == (0, 0) and g1.grad["g"] is g2.grad["g"] and g1.loss == g2.loss
    assert core.entries["device1"].session.step == 1
    core.handle(DeviceMessage(p, "device1", batch(1)))
    assert core.entries["device1"].session.step == 2


def test_an_out_of_order_step_costs_the_link_not_the_edge():
    core = make_core()
    p = attach(core)
    start_round(core)
    core.handle(DeviceMessage(p, "device1", batch(3)))
    assert p.closed and isinstance(p.notice, m.ErrorNotice) and "step 3" in p.notice.detail
    assert state(core) is S.ACTIVE and core.entries["device1"].session.step == 0


def test_a_dropped_link_keeps_the_session_and_a_reattach_resumes_it():
    core = make_core()
    p = active(core)
    core.handle(DeviceLost(p, "device1", ConnectionError("reset"), 0.0))
    assert state(core) is S.DETACHED and core.central.sent[-1].attached == []
    q = attach(core, kind="resume", round=1, step=1, source="edge1", why="reconnect")
    (reply,) = of(q, m.AttachReply)
    assert (reply.action, reply.round, reply.resume_step, reply.how) == ("continue", 1, 1, "here")
    assert state(core) is S.ACTIVE
    core.handle(DeviceMessage(p, "device1", batch(1)))  # from the old link: stale, ignored
    assert not of(p, m.Gradients)[1:] and core.entries["device1"].session.step == 1


def test_a_silent_device_is_reported_with_how_long_it_was_silent():
    core = make_core()
    p = attach(core)
    start_round(core)
    core.handle(DeviceLost(p, "device1", TimeoutError("sent nothing"), 5.01))
    (fault,) = core.central.faults()
    assert fault.kind == "peer_silent" and fault.peer == "device1" and fault.detected_s == 5.01


def test_a_new_link_of_the_same_device_replaces_the_old_one():
    core = make_core()
    p = attach(core)
    q = attach(core)
    assert p.closed and isinstance(p.notice, m.Replaced) and core.entries["device1"].port is q


def test_resume_from_another_edge_pulls_and_answers_when_the_session_is_here():
    core = make_core(name="edge2")
    start_round(core)
    p = attach(core, kind="resume", round=1, step=3, source="edge1", why="move")
    assert state(core) is S.PULLING and p.sent == []
    (pull,) = core.fetcher.pulls
    assert (pull["device"], pull["source"], pull["round"], pull["step"]) == ("device1", "edge1", 1, 3)
    src = EdgeSession(device="device1", round=1, mode="fedfly", model="vgg5", split_layer=3, lr=0.01, momentum=0.9,
                      part_state={k: WEIGHTS[k] for k in EDGE_KEYS}, step=3)
    core.handle(PullOutcome(device="device1", token=pull["token"] + 1, source="edge1", session=src))  # stale token
    assert state(core) is S.PULLING
    core.handle(PullOutcome(device="device1", token=pull["token"], source="edge1", session=src, state_bytes=99,
                            transfer_ms=1.5))
    (reply,) = of(p, m.AttachReply)
    assert (reply.action, reply.resume_step, reply.how, reply.state_bytes) == ("continue", 3, "pulled", 99)
    assert state(core) is S.ACTIVE and core.entries["device1"].session is src


def test_a_failed_pull_restarts_the_round_here_and_is_recorded():
    core = make_core(name="edge2")
    start_round(core)
    p = attach(core, kind="resume", round=1, step=3, source="edge1", why="reconnect")
    (pull,) = core.fetcher.pulls
    core.handle(PullOutcome(device="device1", token=pull["token"], source="edge1", error="edge1 is gone"))
    (reply,) = of(p, m.AttachReply)
    assert (reply.action, reply.resume_step, reply.how) == ("continue", 0, "restart")
    assert state(core) is S.ACTIVE and core.entries["device1"].session.step == 0
    (fault,) = core.central.faults()
    assert fault.kind == "handover_failed" and fault.replayed == 3


def test_a_refusal_naming_where_the_session_went_is_followed():
    core = make_core(name="edge2")
    start_round(core)
    attach(core, kind="resume", round=1, step=3, source="edge1")
    token = core.fetcher.pulls[0]["token"]
    refused = m.PullRefused(device="device1", reason="refused", moved_to="edge3", delivered=False)
    core.handle(PullOutcome(device="device1", token=token, source="edge1", refused=refused))
    assert core.fetcher.pulls[-1]["source"] == "edge3" and state(core) is S.PULLING


@pytest.mark.parametrize("mode", ["restart", "classic"])
def test_modes_without_state_to_move_start_afresh_and_tell_the_old_edge(mode):
    core = make_core(mode, name="edge2")
    start_round(core)
    p = attach(core, kind="resume", round=1, step=3, source="edge1", why="move")
    (reply,) = of(p, m.AttachReply)
    assert reply.resume_step == (0 if mode == "restart" else 3) and state(core) is S.ACTIVE
    assert core.fetcher.pulls == [] and core.fetcher.drops[0]["source"] == "edge1"


@pytest.mark.parametrize("given", ["none", "for another edge", "made with another secret", "for another device"])
def test_a_pull_without_the_devices_proof_of_an_attach_is_refused_and_tells_nothing(given):
    core = make_core()
    detached_session(core)
    peer = Outbox("edge edge2")
    bad = {"none": {},
           "for another edge": proofs("device1", "edge3"),
           "made with another secret": attach_proofs(bytes(32), device="device1", target="edge2", edges=EDGES),
           "for another device": proofs("device2", "edge2")}[given]
    for msg in (m.SessionPull(device="device1", round=1, step=2, target="edge2", proofs=bad),
                m.SessionDrop(device="device1", round=1, target="edge2", proofs=bad)):
        core.handle(PeerMessage(peer, msg))
    assert peer.sent == [m.PullRefused(device="device1", reason="refused", moved_to="", delivered=False)] * 2
    assert state(core) is S.DETACHED and core.entries["device1"].session.step == 2  # untouched
    # the device's own proof opens it
    core.handle(PeerMessage(peer, m.SessionPull(device="device1", round=1, step=2, target="edge2",
                                                proofs=proofs("device1", "edge2"))))
    assert of(peer, m.SessionSnapshot)


def test_the_source_hands_over_once_confirmed_and_then_points_to_the_target():
    core = make_core()
    detached_session(core)
    peer = Outbox("edge edge2")
    core.handle(PeerMessage(peer, m.SessionPull(device="device1", round=1, step=2, target="edge2",
        proofs=proofs("device1", "edge2"))))
    (snap,) = of(peer, m.SessionSnapshot)
    assert snap.step == 2 and state(core) is S.HANDING_OVER
    core.handle(PeerMessage(peer, m.SessionInstalled(device="device1", round=1, step=2, checksum="bad")))
    assert of(peer, m.PullRefused) and state(core) is S.HANDING_OVER  # a wrong checksum releases nothing
    core.handle(PeerMessage(peer, m.SessionInstalled(device="device1", round=1, step=2, checksum=snap.checksum)))
    assert of(peer, m.SessionReleased) and state(core) is S.GONE
    other = Outbox("edge edge3")
    core.handle(PeerMessage(other, m.SessionPull(device="device1", round=1, step=2, target="edge3",
        proofs=proofs("device1", "edge3"))))
    (refusal,) = of(other, m.PullRefused)
    assert refusal.moved_to == "edge2" and refusal.reason == "refused"


def test_a_pull_at_the_wrong_position_is_refused_and_changes_nothing():
    core = make_core()
    detached_session(core)
    peer = Outbox("edge edge2")
    core.handle(PeerMessage(peer, m.SessionPull(device="device1", round=1, step=5, target="edge2",
        proofs=proofs("device1", "edge2"))))
    assert of(peer, m.PullRefused) and state(core) is S.DETACHED
    # one step behind is fine when the reply to it is kept (its gradient was lost)
    core.handle(PeerMessage(peer, m.SessionPull(device="device1", round=1, step=1, target="edge2",
        proofs=proofs("device1", "edge2"))))
    assert of(peer, m.SessionSnapshot)


def test_a_handover_whose_target_vanishes_leaves_the_session_here():
    core = make_core()
    detached_session(core)
    peer = Outbox("edge edge2")
    core.handle(PeerMessage(peer, m.SessionPull(device="device1", round=1, step=2, target="edge2",
        proofs=proofs("device1", "edge2"))))
    core.handle(PeerLost(peer))
    assert state(core) is S.DETACHED
    q = attach(core, kind="resume", round=1, step=2, source="edge1", why="reconnect")
    assert of(q, m.AttachReply)[0].how == "here" and state(core) is S.ACTIVE


def test_a_device_back_before_the_confirmation_keeps_its_session_here():
    core = make_core()
    detached_session(core)
    peer = Outbox("edge edge2")
    core.handle(PeerMessage(peer, m.SessionPull(device="device1", round=1, step=2, target="edge2",
        proofs=proofs("device1", "edge2"))))
    snap = of(peer, m.SessionSnapshot)[0]
    q = attach(core, kind="resume", round=1, step=2, source="edge1", why="reconnect")
    assert of(q, m.AttachReply)[0].how == "here" and state(core) is S.ACTIVE
    core.handle(PeerMessage(peer, m.SessionInstalled(device="device1", round=1, step=2, checksum=snap.checksum)))
    assert of(peer, m.PullRefused) and state(core) is S.ACTIVE  # too late: not released


@pytest.mark.parametrize("how", ["pulled", "offered"])
def test_a_session_trained_again_here_leaves_the_snapshot_on_its_way_intact(how):
    # the snapshot's bytes may still be on the link's writer thread when the device comes
    # back and trains: the session must not change them under the sender (a torn copy)
    core = make_core()
    peer = Outbox("edge edge2")
    if how == "pulled":
        detached_session(core)
        core.handle(PeerMessage(peer, m.SessionPull(device="device1", round=1, step=2, target="edge2",
                                                    proofs=proofs("device1", "edge2"))))
        snap = of(peer, m.SessionSnapshot)[0]
        meta, state, checksum = snap.meta, snap.state, snap.checksum
    else:
        _leaving_session(core, peer)
        offer, seal = of(peer, m.SessionOffer)[0], of(peer, m.OfferSealed)[0]
        meta, state, checksum = offer.meta, offer.state, seal.checksum
    before = {k: v.clone() for k, v in state.items()}
    q = attach(core, kind="resume", round=1, step=2, source="edge1", why="reconnect")
    assert of(q, m.AttachReply)[0].how == "here"
    core.handle(DeviceMessage(q, "device1", batch(2)))
    assert core.entries["device1"].session.step == 3
    assert all(torch.equal(state[k], before[k]) for k in state)
    assert snapshot_checksum(meta, state) == checksum


def test_a_replica_installed_here_is_trained_on_copies_and_stays_as_it_came():
    # edge2 keeps edge1's copies of device1's session; edge1 dies; device1 comes with its
    # checkpoints and goes on from the copy: training it must not change the copy kept
    # (it may be asked for again, and its checksum must still hold)
    src = make_core(name="edge1")
    p = attach(src)
    start_round(src)
    for step in (0, 1):
        src.handle(DeviceMessage(p, "device1", batch(step)))
    meta, tensors = src.entries["device1"].session._parts(with_reply=False)
    state = {k: v.clone() for k, v in tensors.items()}
    checksum = snapshot_checksum(meta, state)
    core = make_core(name="edge2", checkpoint_steps=1, edges=["edge1", "edge2"])
    start_round(core)
    core.handle(PeerMessage(Outbox("edge edge1"), m.SessionReplica(
        device="device1", round=1, step=2, target="edge1", meta=meta, checksum=checksum, state=state,
        edge_key=edge_key(SECRET, "edge1"))))
    q = Outbox("device device1")
    core.handle(DeviceAttach(q, m.AttachRequest(device="device1", kind="resume", round=1, step=2, source="edge1",
                                                last_round=0, why="reconnect", edge_key=edge_key(SECRET, "edge2"),
                                                proofs=proofs("device1", "edge2"), checkpoints=[0, 2])))
    (pull,) = core.fetcher.pulls
    core.handle(PullOutcome(device="device1", token=pull["token"], source="edge1", error="edge1 is gone"))
    (reply,) = of(q, m.AttachReply)
    assert (reply.action, reply.resume_step) == ("continue", 2)
    core.handle(DeviceMessage(q, "device1", batch(2)))
    assert core.entries["device1"].session.step == 3
    (kept,) = core.replicas["device1"]
    assert snapshot_checksum(kept.meta, kept.tensors) == checksum


def test_the_update_is_delivered_and_acknowledged_once_the_central_has_it():
    core = make_core()
    p = attach(core)
    start_round(core)
    for s in range(2):
        core.handle(DeviceMessage(p, "device1", batch(s)))
    done = m.DeviceDone(round=1, samples=8, steps=2, train_seconds=0.1,
                        weights={k: WEIGHTS[k] for k in DEV_KEYS})
    core.handle(DeviceMessage(p, "device1", done))
    (update,) = core.central.delivered
    assert set(update.weights) == set(DEV_KEYS) | set(EDGE_KEYS) and state(core) is S.DELIVERING
    core.handle(DeviceMessage(p, "device1", done))  # sent again (its ack was lost): no second update
    assert len(core.central.delivered) == 1 and not of(p, m.DoneAck)
    core.handle(CentralMessage(m.UpdateAck(round=1, device="device1")))
    assert of(p, m.DoneAck) == [m.DoneAck(round=1)] and state(core) is S.IDLE
    core.handle(DeviceMessage(p, "device1", done))  # and again, after the ack
    assert len(of(p, m.DoneAck)) == 2 and len(core.central.delivered) == 1


def test_an_update_with_the_wrong_steps_or_weights_costs_the_link():
    core = make_core()
    p = attach(core)
    start_round(core)
    core.handle(DeviceMessage(p, "device1", m.DeviceDone(round=1, samples=8, steps=5, train_seconds=0.1,
                                                         weights={k: WEIGHTS[k] for k in DEV_KEYS})))
    assert p.closed and core.central.delivered == []


def test_a_newer_round_stands_a_left_behind_device_by_or_restarts_it():
    core = make_core()
    p = attach(core)
    q = attach(core, "device2")
    start_round(core)
    core.handle(DeviceMessage(p, "device1", batch(0)))
    start_round(core, 2, participants=("device2",))
    assert of(p, m.StandBy)[0].round == 1 and state(core) is S.IDLE
    assert [w.round_plan.round for w in of(q, m.DeviceRound)] == [1, 2] and state(core, "device2") is S.ACTIVE


def test_a_device_that_waited_for_a_round_we_had_not_seen_is_answered_when_it_comes():
    core = make_core(name="edge2")
    p = attach(core, kind="resume", round=1, step=0, source="edge1", why="move")
    assert state(core) is S.PULLING and p.sent == []
    start_round(core)
    (reply,) = of(p, m.AttachReply)
    assert reply.action == "continue" and reply.round == 1 and state(core) is S.ACTIVE


def test_a_restarted_device_does_its_round_again_from_the_weights():
    core = make_core()
    p = active(core)
    core.handle(DeviceLost(p, "device1", ConnectionError("killed"), 0.0))
    q = attach(core)  # join: a new process with nothing
    assert of(q, m.DeviceRound) and core.entries["device1"].session.step == 0


def test_everything_is_checked_against_the_table(monkeypatch):
    """A transition the table does not allow raises, naming the role, state and event."""
    core = make_core()
    p = attach(core)
    start_round(core)
    e = core.entries["device1"]
    from edge.lifecycle import Event, TransitionError
    with pytest.raises(TransitionError, match="edge edge1.*INSTALLED.*ACTIVE"):
        core.move(e, Event.INSTALLED)
    del p


# -- the review's cases: events in states where they used to break the core ----------------

def test_a_handler_that_fails_is_logged_and_the_edge_goes_on(monkeypatch):
    core = make_core()
    p = attach(core)
    start_round(core)
    seen = []
    monkeypatch.setattr(core.events, "emit", lambda event, **f: seen.append((event, f)))

    def boom(ev):
        raise ValueError("a bug")
    monkeypatch.setattr(core, "_on_peer_lost", boom)
    core.handle(PeerLost(Outbox("edge edge2")))
    (err,) = [f for ev, f in seen if ev == "core_error"]
    assert err["on"] == "PeerLost" and err["error"] == "ValueError"
    monkeypatch.undo()
    core.handle(DeviceMessage(p, "device1", batch(0)))  # still serving
    assert of(p, m.Gradients)


def test_labels_outside_the_model_cost_the_link_not_the_edge():
    core = make_core()
    p = attach(core)
    start_round(core)
    bad = batch(0)
    bad.batch["y"][0] = 10
    core.handle(DeviceMessage(p, "device1", bad))
    assert p.closed and "labels outside 0..9" in p.notice.detail
    assert state(core) is S.ACTIVE and core.entries["device1"].session.step == 0


def test_a_device_gone_while_its_session_was_fetched_leaves_no_linkless_entry():
    core = make_core(name="edge2")
    start_round(core)
    p = attach(core, kind="resume", round=1, step=3, source="edge1")
    core.handle(DeviceLost(p, "device1", ConnectionError("gone"), 0.0))
    token = core.fetcher.pulls[0]["token"]
    delivered = m.PullRefused(device="device1", reason="refused", moved_to="", delivered=True)
    core.handle(PullOutcome(device="device1", token=token, source="edge1", refused=delivered))
    assert "device1" not in core.entries
    start_round(core, 2)  # and the next round has nothing to trip on
    assert "device1" not in core.entries


def test_a_drop_is_answered_in_every_state_and_only_removes_an_unlinked_session():
    core = make_core()
    peer = Outbox("edge edge2")
    for st in (None, "idle", "active", "detached"):
        core2 = make_core()
        if st is not None:
            p = attach(core2)
            if st != "idle":
                start_round(core2)
            if st == "detached":
                core2.handle(DeviceLost(p, "device1", ConnectionError("left"), 0.0))
        out = Outbox("edge edge2")
        core2.handle(PeerMessage(out, m.SessionDrop(device="device1", round=1, target="edge2",
        proofs=proofs("device1", "edge2"))))
        # answered in every state; a device that never attached here gave no key: refused
        assert of(out, m.SessionReleased if st is not None else m.PullRefused), st
        assert state(core2) is {None: S.GONE, "idle": S.IDLE, "active": S.ACTIVE, "detached": S.GONE}[st]
    # a drop of an older round leaves a newer session alone
    p = attach(core)
    start_round(core, 2)
    core.handle(DeviceLost(p, "device1", ConnectionError("left"), 0.0))
    core.handle(PeerMessage(peer, m.SessionDrop(device="device1", round=1, target="edge2",
        proofs=proofs("device1", "edge2"))))
    assert state(core) is S.DETACHED and of(peer, m.SessionReleased)


def test_an_update_of_an_older_round_is_ignored_not_fatal():
    core = make_core()
    p = attach(core)
    start_round(core, 2)
    core.handle(DeviceMessage(p, "device1", m.DeviceDone(round=1, samples=8, steps=2, train_seconds=0.1,
                                                         weights={k: WEIGHTS[k] for k in DEV_KEYS})))
    assert not p.closed and state(core) is S.ACTIVE and core.central.delivered == []


def test_a_device_waiting_on_a_fetch_when_its_round_ends_is_answered_then_given_the_next():
    core = make_core(name="edge2")
    start_round(core)
    p = attach(core, kind="resume", round=1, step=3, source="edge1")
    start_round(core, 2)
    (reply,) = of(p, m.AttachReply)
    assert reply.action == "wait" and reply.how == "round over"
    assert of(p, m.DeviceRound)[0].round_plan.round == 2 and state(core) is S.ACTIVE
    assert p.sent.index(reply) < p.sent.index(of(p, m.DeviceRound)[0])


def test_a_copy_fetched_for_an_older_attach_is_not_installed():
    core = make_core(name="edge2")
    start_round(core)
    p = attach(core, kind="resume", round=1, step=3, source="edge1")
    token = core.fetcher.pulls[0]["token"]
    q = attach(core, kind="resume", round=1, step=5, source="edge3")  # it went on elsewhere meanwhile
    old = EdgeSession(device="device1", round=1, mode="fedfly", model="vgg5", split_layer=3, lr=0.01,
                      momentum=0.9, part_state={k: WEIGHTS[k] for k in EDGE_KEYS}, step=3)
    core.handle(PullOutcome(device="device1", token=token, source="edge1", session=old))
    assert state(core) is S.PULLING and core.fetcher.pulls[-1]["source"] == "edge3"
    assert not of(q, m.AttachReply) and not of(p, m.AttachReply)


def test_a_pointer_back_to_this_edge_uses_the_copy_held_here():
    core = make_core()
    detached_session(core)  # its session (step 2) is here
    e = core.entries["device1"]
    held = e.session
    q = attach(core, kind="resume", round=1, step=2, source="edge2", why="reconnect")
    assert state(core) is S.PULLING
    token = core.fetcher.pulls[-1]["token"]
    back = m.PullRefused(device="device1", reason="refused", moved_to="edge1", delivered=False)
    core.handle(PullOutcome(device="device1", token=token, source="edge2", refused=back))
    (reply,) = of(q, m.AttachReply)
    assert (reply.action, reply.resume_step) == ("continue", 2) and e.session is held and state(core) is S.ACTIVE


def test_a_delivering_entry_answers_continue_only_at_the_round_end():
    core = make_core()
    p = attach(core)
    start_round(core)
    for s in range(2):
        core.handle(DeviceMessage(p, "device1", batch(s)))
    core.handle(DeviceMessage(p, "device1", m.DeviceDone(round=1, samples=8, steps=2, train_seconds=0.1,
                                                         weights={k: WEIGHTS[k] for k in DEV_KEYS})))
    q = attach(core, kind="resume", round=1, step=2, source="edge1")
    assert of(q, m.AttachReply)[0].action == "continue"
    r = attach(core, kind="resume", round=1, step=1, source="edge1")
    assert of(r, m.AttachReply)[0].action == "wait" and state(core) is S.DELIVERING


def test_a_parked_attach_whose_link_died_is_forgotten():
    core = make_core(welcomed=False)
    p = attach(core)
    core.handle(DeviceLost(p, "device1", ConnectionError("gone"), 0.0))
    core.handle(CentralUp(run_name="run", mode="fedfly"))
    assert "device1" not in core.entries and p.sent == []


def test_a_fetch_that_never_ends_fails_at_its_deadline_and_a_handover_too():
    now = [100.0]
    core = make_core(name="edge2", clock=lambda: now[0], handover_deadline_s=10)
    start_round(core)
    p = attach(core, kind="resume", round=1, step=3, source="edge1")
    from edge.ports import Tick
    now[0] += 5
    core.handle(Tick())
    assert state(core) is S.PULLING
    now[0] += 6
    core.handle(Tick())
    (reply,) = of(p, m.AttachReply)
    assert (reply.action, reply.how) == ("continue", "restart") and state(core) is S.ACTIVE
    # the source side: a snapshot sent, no confirmation ever
    for s in range(2):
        core.handle(DeviceMessage(p, "device1", batch(s)))
    core.handle(DeviceLost(p, "device1", ConnectionError("left"), 0.0))
    peer = Outbox("edge edge1")
    core.handle(PeerMessage(peer, m.SessionPull(device="device1", round=1, step=2, target="edge1",
        proofs=proofs("device1", "edge1"))))
    assert state(core) is S.HANDING_OVER
    now[0] += 11
    core.handle(Tick())
    assert state(core) is S.DETACHED


# -- offers: a device that leaves for a planned move names where it goes --------------------

def _leaving_session(core: EdgeCore, link: Outbox | None) -> Outbox:
    """device1 trained steps 0 and 1 on ``core`` (edge1) and leaves for edge2 at step 2;
    ``link`` is the kept link to edge2 (None: there is none yet)."""
    if link is not None:
        core.fetcher.links["edge2"] = link
    p = active(core, 2)
    core.handle(DeviceMessage(p, "device1", m.Leaving(round=1, step=2, to="edge2")))
    return p


def test_a_leaving_device_has_its_session_offered_where_it_goes_and_released_on_confirmation():
    core = make_core()
    link = Outbox("edge edge2")
    p = _leaving_session(core, link)
    assert p.closed and core.entries["device1"].port is None
    notice, offer, seal = link.sent
    assert notice == m.OfferNotice(device="device1", round=1, step=2, target="edge1")
    assert isinstance(offer, m.SessionOffer) and (offer.device, offer.round, offer.step) == ("device1", 1, 2)
    assert (seal.device, seal.step, len(seal.checksum)) == ("device1", 2, 64)
    assert state(core) is S.HANDING_OVER
    # the destination pulls meanwhile (its attach came before the notice): told to wait, not sent twice
    puller = Outbox("edge edge2")
    core.handle(PeerMessage(puller, m.SessionPull(device="device1", round=1, step=2, target="edge2",
                                                  proofs=proofs("device1", "edge2"))))
    assert puller.sent == [m.PullRefused(device="device1", reason="refused", moved_to="", delivered=False, offered=True)]
    core.handle(PeerMessage(link, m.SessionInstalled(device="device1", round=1, step=2, checksum="bad")))
    assert state(core) is S.HANDING_OVER  # a wrong checksum releases nothing
    core.handle(PeerMessage(link, m.SessionInstalled(device="device1", round=1, step=2, checksum=seal.checksum)))
    assert link.sent[-1] == m.SessionReleased(device="device1") and state(core) is S.GONE
    assert core.forward["device1"].target == "edge2"


def test_an_offer_declined_or_lost_leaves_the_session_for_a_pull():
    for end in ("declined", "link lost"):
        core = make_core()
        link = Outbox("edge edge2")
        _leaving_session(core, link)
        if end == "declined":
            core.handle(PeerMessage(link, m.OfferDeclined(device="device1", round=1, step=2)))
        else:
            core.handle(PeerLost(link))
        assert state(core) is S.DETACHED
        peer = Outbox("edge edge3")
        core.handle(PeerMessage(peer, m.SessionPull(device="device1", round=1, step=2, target="edge3",
                                                    proofs=proofs("device1", "edge3"))))
        assert of(peer, m.SessionSnapshot) and state(core) is S.HANDING_OVER


def test_no_offer_without_a_kept_link_or_at_another_position_and_a_pull_from_elsewhere_is_served():
    core = make_core()
    _leaving_session(core, None)  # no kept link to edge2 yet: held, as for a lost link
    assert state(core) is S.DETACHED
    core = make_core()
    link = Outbox("edge edge2")
    core.fetcher.links["edge2"] = link
    p = active(core)
    core.handle(DeviceMessage(p, "device1", m.Leaving(round=1, step=5, to="edge2")))  # not where it is
    assert link.sent == [] and state(core) is S.DETACHED
    # offered to edge2, but the device went to edge3: edge3's pull gets the session
    core = make_core()
    link = Outbox("edge edge2")
    _leaving_session(core, link)
    other = Outbox("edge edge3")
    core.handle(PeerMessage(other, m.SessionPull(device="device1", round=1, step=2, target="edge3",
                                                 proofs=proofs("device1", "edge3"))))
    (snap,) = of(other, m.SessionSnapshot)
    core.handle(PeerMessage(link, m.SessionInstalled(device="device1", round=1, step=2,
                                                     checksum=link.sent[2].checksum)))
    assert state(core) is S.HANDING_OVER  # edge2's late confirmation is not the handover that counts
    core.handle(PeerMessage(other, m.SessionInstalled(device="device1", round=1, step=2, checksum=snap.checksum)))
    assert state(core) is S.GONE


def _offer_from(src: EdgeCore) -> tuple[m.OfferNotice, m.SessionOffer, m.OfferSealed]:
    link = Outbox("edge edge2")
    _leaving_session(src, link)
    notice, offer, seal = link.sent
    return notice, offer, seal


def test_the_destination_takes_an_offer_that_came_before_the_device_and_declines_a_stale_one():
    notice, offer, seal = _offer_from(make_core())
    dst = make_core(name="edge2")
    start_round(dst)
    port = Outbox("edge edge1")
    dst.handle(PeerMessage(port, notice))
    dst.handle(PeerMessage(port, offer))
    dst.handle(PeerMessage(port, seal))
    attach(dst, kind="resume", round=1, step=2, source="edge1", why="move")
    assert dst.fetcher.pulls == [] and state(dst) is S.PULLING
    (took,) = dst.fetcher.offers
    assert took["offer"] is offer and took["port"] is port and took["source"] == "edge1"
    assert "device1" not in dst.handover.offers
    # the same offer again, and a device that comes at another step: declined, pulled
    dst2 = make_core(name="edge2")
    start_round(dst2)
    dst2.handle(PeerMessage(port, notice))
    dst2.handle(PeerMessage(port, offer))
    dst2.handle(PeerMessage(port, seal))
    attach(dst2, kind="resume", round=1, step=1, source="edge1", why="move")
    assert port.sent[-1] == m.OfferDeclined(device="device1", round=1, step=2)
    assert dst2.fetcher.offers == [] and dst2.fetcher.pulls[0]["step"] == 1


def test_the_destination_told_to_wait_takes_the_offer_when_it_comes_or_pulls_if_its_link_ends():
    notice, offer, seal = _offer_from(make_core())
    for end in ("arrives", "link lost"):
        dst = make_core(name="edge2")
        start_round(dst)
        attach(dst, kind="resume", round=1, step=2, source="edge1", why="move")
        (pull,) = dst.fetcher.pulls
        offered = m.PullRefused(device="device1", reason="refused", moved_to="", delivered=False, offered=True)
        dst.handle(PullOutcome(device="device1", token=pull["token"], source="edge1", refused=offered))
        assert state(dst) is S.PULLING and dst.central.faults() == []
        port = Outbox("edge edge1")
        dst.handle(PeerMessage(port, notice))
        if end == "arrives":
            dst.handle(PeerMessage(port, offer))
            assert dst.fetcher.offers == []  # not before its checksum
            dst.handle(PeerMessage(port, seal))
            (took,) = dst.fetcher.offers
            assert took["checksum"] == seal.checksum
            assert took["token"] == pull["token"] and len(dst.fetcher.pulls) == 1
        else:
            dst.handle(PeerLost(port))
            assert dst.fetcher.offers == [] and len(dst.fetcher.pulls) == 2 and state(dst) is S.PULLING


def test_an_offered_copy_that_fails_its_checks_is_pulled_instead():
    dst = make_core(name="edge2")
    start_round(dst)
    notice, offer, seal = _offer_from(make_core())
    port = Outbox("edge edge1")
    dst.handle(PeerMessage(port, notice))
    dst.handle(PeerMessage(port, offer))
    dst.handle(PeerMessage(port, seal))
    attach(dst, kind="resume", round=1, step=2, source="edge1", why="move")
    (took,) = dst.fetcher.offers
    dst.handle(PullOutcome(device="device1", token=took["token"], source="edge1", offered=True,
                           error="checksum mismatch"))
    (pull,) = dst.fetcher.pulls
    assert pull["source"] == "edge1" and pull["step"] == 2 and state(dst) is S.PULLING
    # the source had not heard of the failure yet: "offered" again is asked again, not waited on
    offered = m.PullRefused(device="device1", reason="refused", moved_to="", delivered=False, offered=True)
    dst.handle(PullOutcome(device="device1", token=pull["token"], source="edge1", refused=offered))
    assert len(dst.fetcher.pulls) == 2 and state(dst) is S.PULLING


def _logged(port: Outbox, name: str, log: list) -> Outbox:
    """``port``, also noting in ``log`` what is posted on it, in order across ports."""
    post = port.post
    port.post = lambda msg: (log.append((name, type(msg).__name__)), post(msg))[1]
    return port


def test_an_offer_is_rebuilt_from_its_seal_on_and_its_source_hears_of_the_install_after_the_device():
    notice, offer, seal = _offer_from(make_core())
    dst = make_core(name="edge2")
    start_round(dst)
    log: list = []
    port = _logged(Outbox("edge edge1"), "source", log)
    for msg in (notice, offer, seal):
        dst.handle(PeerMessage(port, msg))
    (prep,) = dst.fetcher.prepared  # at its seal, before its device came
    assert prep["offer"] is offer and prep["checksum"] == seal.checksum and dst.fetcher.offers == []
    dev = _logged(attach(dst, kind="resume", round=1, step=2, source="edge1", why="move"), "device", log)
    (took,) = dst.fetcher.offers
    assert took["prepared"] is prep
    session = EdgeSession.from_snapshot(offer.meta, offer.state, seal.checksum, expect_model="vgg5", expect_split=3)
    done = m.SessionInstalled(device="device1", round=1, step=2, checksum=seal.checksum)
    no = m.OfferDeclined(device="device1", round=1, step=2)
    dst.handle(PullOutcome(device="device1", token=took["token"], source="edge1", offered=True, session=session,
                           confirm=(port, done, no)))
    assert state(dst) is S.ACTIVE and dst.entries["device1"].session is session
    (reply,) = of(dev, m.AttachReply)
    assert reply.action == "continue" and reply.resume_step == 2
    assert port.sent[-1] == done and log == [("device", "AttachReply"), ("source", "SessionInstalled")]


def test_an_offer_sealed_before_the_round_started_here_is_built_when_its_device_comes():
    """Before its round's start the destination does not know the round's cuts, which the
    rebuild checks: the offer waits, and is built when its device comes."""
    notice, offer, seal = _offer_from(make_core())
    dst = make_core(name="edge2")
    port = Outbox("edge edge1")
    for msg in (notice, offer, seal):
        dst.handle(PeerMessage(port, msg))
    assert dst.fetcher.prepared == [] and "device1" in dst.handover.offers
    start_round(dst)
    attach(dst, kind="resume", round=1, step=2, source="edge1", why="move")
    (prep,) = dst.fetcher.prepared
    (took,) = dst.fetcher.offers
    assert took["prepared"] is prep and prep["offer"] is offer


def test_an_offered_session_not_installed_is_declined_not_confirmed():
    notice, offer, seal = _offer_from(make_core())
    dst = make_core(name="edge2")
    start_round(dst)
    port = Outbox("edge edge1")
    for msg in (notice, offer, seal):
        dst.handle(PeerMessage(port, msg))
    attach(dst, kind="resume", round=1, step=2, source="edge1", why="move")
    (took,) = dst.fetcher.offers
    session = EdgeSession.from_snapshot(offer.meta, offer.state, seal.checksum, expect_model="vgg5", expect_split=3)
    done = m.SessionInstalled(device="device1", round=1, step=2, checksum=seal.checksum)
    no = m.OfferDeclined(device="device1", round=1, step=2)
    # the outcome of an older fetch (another token): stale, so the source keeps the session
    dst.handle(PullOutcome(device="device1", token=took["token"] + 100, source="edge1", offered=True,
                           session=session, confirm=(port, done, no)))
    assert done not in port.sent and port.sent[-1] == no
    assert state(dst) is S.PULLING


def test_the_fetcher_builds_an_offer_ahead_and_hands_it_over_when_it_is_taken():
    import time

    from edge.migration import Fetcher
    notice, offer, seal = _offer_from(make_core())
    got: list = []
    fetcher = Fetcher(name="edge2", peers=None, submit=got.append, model="vgg5", cut_of=lambda d: 3, spare=None,
                      events=EventLog(process="edge2", role="edge"))
    since = time.monotonic()
    good = fetcher.prepare_offer(device="device1", source="edge1", offer=offer, checksum=seal.checksum)
    good.result(timeout=60)  # verified and rebuilt before anybody takes it
    time.sleep(0.3)          # the device comes later
    assert got == []
    port = Outbox("edge edge1")
    fetcher.take_offer(device="device1", source="edge1", token=7, offer=offer, checksum=seal.checksum, port=port,
                       since=since, prepared=good)
    taken = time.monotonic()
    (out,) = got  # at once, on the caller's thread
    assert 0 < out.transfer_ms < (taken - since) * 1000 - 250  # until it was rebuilt, not until it was taken
    assert out.token == 7 and out.offered and out.session is not None and out.session.step == 2
    assert out.confirm == (port, m.SessionInstalled(device="device1", round=1, step=2, checksum=seal.checksum),
                           m.OfferDeclined(device="device1", round=1, step=2))
    assert port.sent == []  # the core confirms, once it has installed it
    bad = fetcher.prepare_offer(device="device1", source="edge1", offer=offer, checksum="0" * 64)
    fetcher.take_offer(device="device1", source="edge1", token=8, offer=offer, checksum="0" * 64, port=port,
                       since=time.monotonic(), prepared=bad)
    deadline = time.monotonic() + 60
    while len(got) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got[1].token == 8 and got[1].session is None and "checksum" in got[1].error and got[1].confirm is None
    assert port.sent == [m.OfferDeclined(device="device1", round=1, step=2)]


def test_a_move_announced_while_its_step_trains_is_offered_after_that_step():
    """The device announces its move (Leaving for the next step) as soon as it has the
    step's gradient, which the edge sends before its optimizer step ends: the Leaving waits
    for that step, and the session offered is the one after it, without the kept reply."""
    trainer = HeldTrainer()
    core = make_core(trainer=trainer)
    link = Outbox("edge edge2")
    core.fetcher.links["edge2"] = link
    p = active(core)
    trainer.finish(core)
    core.handle(DeviceMessage(p, "device1", batch(1)))
    core.handle(DeviceMessage(p, "device1", m.Leaving(round=1, step=2, to="edge2")))
    assert link.sent == [] and not p.closed and state(core) is S.ACTIVE  # held behind step 1
    trainer.finish(core)
    assert p.closed and state(core) is S.HANDING_OVER
    assert [g.step for g in of(p, m.Gradients)] == [0, 1]
    notice, offer, seal = link.sent
    assert (notice.step, offer.step, offer.meta["step"]) == (2, 2, 2) and offer.meta["last_reply"] is None
    assert "reply/grad" not in offer.state
    reference = EdgeSession.from_snapshot(offer.meta, offer.state, seal.checksum, expect_model="vgg5",
                                          expect_split=3)
    assert reference.step == 2


def test_an_offer_nobody_comes_for_is_declined_at_the_deadline():
    now = [100.0]
    dst = make_core(name="edge2", clock=lambda: now[0], handover_deadline_s=10)
    start_round(dst)
    notice, offer, seal = _offer_from(make_core())
    port = Outbox("edge edge1")
    dst.handle(PeerMessage(port, notice))
    dst.handle(PeerMessage(port, offer))
    dst.handle(PeerMessage(port, seal))
    from edge.ports import Tick
    now[0] += 5
    dst.handle(Tick())
    assert "device1" in dst.handover.offers and port.sent == []
    now[0] += 6
    dst.handle(Tick())
    assert "device1" not in dst.handover.offers and port.sent == [m.OfferDeclined(device="device1", round=1, step=2)]


# -- steps on the training thread: what waits for a step, and what does not ------------------

def test_while_a_step_trains_another_device_is_served_and_the_training_ones_events_wait_in_order():
    trainer = HeldTrainer()
    core = make_core(trainer=trainer)
    p1, p2 = attach(core, "device1"), attach(core, "device2")
    start_round(core)
    core.handle(DeviceMessage(p1, "device1", batch(0)))
    assert len(trainer.jobs) == 1 and not of(p1, m.Gradients) and core.training == {"device1"}
    # device2 (not training) steps at once: its job queues behind device1's
    core.handle(DeviceMessage(p2, "device2", batch(0)))
    assert len(trainer.jobs) == 2
    # device1's next step and its leaving wait for its step, and so does whatever follows
    # an event of no device in particular (here the loss of a peer's link), device2's too
    core.handle(DeviceMessage(p1, "device1", batch(1)))
    core.handle(DeviceMessage(p1, "device1", m.Leaving(round=1, step=2, to="edge2")))
    core.handle(PeerLost(Outbox("edge edge3")))
    p3 = Outbox("device device2 again")
    core.handle(DeviceAttach(p3, m.AttachRequest(device="device2", kind="resume", round=1, step=1, source="edge1",
                                                 last_round=0, why="reconnect", edge_key=edge_key(SECRET, "edge1"),
                                                 proofs=proofs("device2", "edge1"))))
    assert core.entries["device2"].port is p2 and len(trainer.jobs) == 2
    trainer.finish(core)  # device1's step 0: its gradient went, its held events run in order
    assert [g.step for g in of(p1, m.Gradients)] == [0]
    assert core.entries["device1"].session.step == 1
    # its step 1 is on the trainer again, so its Leaving waits once more, and all after it
    assert len(trainer.jobs) == 2 and core.entries["device2"].port is p2
    trainer.finish(core)  # device2's step 0
    assert [g.step for g in of(p2, m.Gradients)] == [0] and core.entries["device2"].port is p2
    trainer.finish(core)  # device1's step 1: then it leaves, and device2's new link is taken
    assert [g.step for g in of(p1, m.Gradients)] == [0, 1] and p1.closed
    assert state(core, "device1") is S.DETACHED and core.entries["device1"].session.step == 2
    assert core.entries["device2"].port is p3 and not core.training and not core._held


def test_a_pull_of_another_session_is_served_while_a_step_trains():
    trainer = HeldTrainer()
    core = make_core(trainer=trainer)
    p1, p2 = attach(core, "device1"), attach(core, "device2")
    start_round(core)
    for step in (0, 1):
        core.handle(DeviceMessage(p2, "device2", batch(step)))
        trainer.finish(core)
    core.handle(DeviceLost(p2, "device2", ConnectionError("left"), 0.0))
    core.handle(DeviceMessage(p1, "device1", batch(0)))
    peer = Outbox("edge edge2")
    core.handle(PeerMessage(peer, m.PeerHello(target="edge2")))  # a new link's first message
    core.handle(PeerMessage(peer, m.SessionPull(device="device2", round=1, step=2, target="edge2",
                                                proofs=proofs("device2", "edge2"))))
    (snap,) = of(peer, m.SessionSnapshot)  # not held: device2 is not the one training, nor behind a hello
    assert not core._held_all
    assert snap.device == "device2" and state(core, "device2") is S.HANDING_OVER
    assert len(trainer.jobs) == 1 and not of(p1, m.Gradients)
    trainer.finish(core)
    assert of(p1, m.Gradients) and core.entries["device1"].session.step == 1


def test_a_step_the_trainer_cannot_train_costs_that_link_as_it_would_inline():
    trainer = HeldTrainer()
    core = make_core(trainer=trainer)
    p = attach(core)
    start_round(core)
    bad = batch(3)  # in bounds (those are checked as it arrives), but not the step the session is at
    core.handle(DeviceMessage(p, "device1", bad))
    core.handle(DeviceMessage(p, "device1", batch(0)))  # held behind the bad one
    trainer.finish(core)
    assert p.closed and isinstance(p.notice, m.ErrorNotice) and "step 3 arrived" in p.notice.detail
    assert core.entries["device1"].session.step == 0 and len(trainer.jobs) == 1  # the held one goes on
    trainer.finish(core)
    inline = make_core()  # the same messages to a core that trains them itself
    q = attach(inline)
    start_round(inline)
    inline.handle(DeviceMessage(q, "device1", bad))
    inline.handle(DeviceMessage(q, "device1", batch(0)))
    assert q.closed and q.notice == p.notice
    assert core.entries["device1"].session.step == inline.entries["device1"].session.step == 1


def test_a_stop_does_not_wait_for_a_step_and_nothing_held_is_handled_after_it():
    trainer = HeldTrainer()
    core = make_core(trainer=trainer)
    p1 = active(core)
    again = Outbox("device device1 again")
    core.handle(DeviceAttach(again, m.AttachRequest(device="device1", kind="resume", round=1, step=1, source="edge1",
                                                    last_round=0, why="reconnect", edge_key=edge_key(SECRET, "edge1"),
                                                    proofs=proofs("device1", "edge1"))))  # held: device1 trains
    core.handle(Stop(reason="the central is gone"))
    assert core.stopped is not None and p1.closed and isinstance(p1.notice, m.Shutdown)
    # the step that was under way ends: what waited for it is not handled after the stop
    trainer.finish(core)
    assert not core._held and again.sent == [] and core.entries["device1"].port is p1


def test_a_tick_during_a_step_fails_an_overdue_fetch_and_holds_nobody_up():
    now = [100.0]
    trainer = HeldTrainer()
    core = make_core(name="edge2", clock=lambda: now[0], handover_deadline_s=10, trainer=trainer)
    p1 = attach(core, "device1")
    start_round(core)
    p2 = attach(core, "device2", kind="resume", round=1, step=3, source="edge1")
    assert state(core, "device2") is S.PULLING
    core.handle(DeviceMessage(p1, "device1", batch(0)))  # a long step, on the trainer
    now[0] += 11
    core.handle(Tick())
    (reply,) = of(p2, m.AttachReply)
    assert (reply.action, reply.how) == ("continue", "restart") and not core._held_all
    core.handle(DeviceMessage(p2, "device2", batch(0)))  # not held behind the tick
    assert len(trainer.jobs) == 2


def test_an_error_at_a_steps_end_still_hands_on_what_waited_for_it(monkeypatch):
    trainer = HeldTrainer()
    core = make_core(trainer=trainer)
    p1, p2 = attach(core, "device1"), attach(core, "device2")
    start_round(core)
    core.handle(DeviceMessage(p1, "device1", batch(0)))
    core.handle(PeerLost(Outbox("edge edge3")))                 # held, and all after it
    core.handle(DeviceMessage(p2, "device2", batch(0)))
    monkeypatch.setattr(core, "stepped", lambda e, done: 1 / 0)  # a bug at the step's end
    trainer.finish(core)
    assert not core._held and not core._held_all and len(trainer.jobs) == 1  # device2's step went on


def test_the_training_thread_trains_in_order_and_reports_each_step():
    from common.models import split_model
    from edge.trainer import StepJob, Trainer
    done = []
    trainer = Trainer(done.append).start()
    state = split_model(build_model("vgg5", seed=1), 3)[1].state_dict()
    session = EdgeSession(device="device1", round=1, mode="fedfly", model="vgg5", split_layer=3, lr=0.01,
                          momentum=0.9, part_state=state)
    grads = []
    for step in range(3):
        b = batch(step).batch
        trainer.submit(StepJob("device1", session, 1, step, b["x"], b["y"], lambda g, loss: grads.append(g)))
    bad = torch.randn(4, 3, 2, 2)
    trainer.submit(StepJob("device1", session, 1, 3, bad, torch.zeros(4, dtype=torch.long), lambda g, loss: None))
    trainer.stop()
    assert [d.trained for d in done] == [True, True, True, False] and len(grads) == 3
    assert done[-1].error is not None and "cannot take this batch" in str(done[-1].error)
    assert session.step == 3


def test_every_message_type_declares_what_it_belongs_to():
    """The hold-while-a-step-trains rule reads ``SCOPE``: a type without one (a new
    message someone forgot to declare) fails here, not as a stall in a run."""
    undeclared = sorted(t for t, cls in m.MESSAGE_TYPES.items() if not isinstance(cls.SCOPE, m.Scope))
    assert undeclared == []
    # a session's message from a peer or the central names its device (a device's own
    # link names it for the messages that come on it)
    core = make_core()
    for cls in [*core._peer_handlers, m.RoundStart, m.UpdateAck, m.Shutdown]:
        if cls.SCOPE is m.Scope.SESSION:
            assert "device" in cls._hints, cls.TYPE


def test_what_a_message_declares_decides_whether_it_waits_for_a_step():
    trainer = HeldTrainer()
    core = make_core(trainer=trainer)
    p1, p2 = attach(core, "device1"), attach(core, "device2")
    start_round(core)
    core.handle(DeviceMessage(p1, "device1", batch(0)))
    # the central's ack of another device's update belongs to that device: not held
    core.handle(CentralMessage(m.UpdateAck(round=1, device="device2")))
    assert core.central.acks == [("device2", 1)] and not core._held
    # a round's start belongs to the whole edge: held, and all after it (device2's step too)
    plan = RoundPlan(round=2, lr=0.01, momentum=0.9, batch_size=4, local_epochs=1, participants=("device1",))
    core.handle(CentralMessage(m.RoundStart(plan=plan.to_wire(), weights=WEIGHTS)))
    core.handle(DeviceMessage(p2, "device2", batch(0)))
    assert core._held_all and len(core._held) == 2 and len(trainer.jobs) == 1
    trainer.finish(core)
    assert not core._held and core.current.round == 2


# -- relay: the session stays where the round began; the new edge forwards ------------------

def _relay_pair():
    """edge1 holds device1's session after steps 0 and 1; the device left it and attached
    to edge2 (policy relay) naming edge1 at step 2. Returns (holder, relaying edge, the
    device's port on edge2, edge2's kept link to edge1, edge1's end of it)."""
    holder = make_core(handover="relay")
    p = attach(holder)
    start_round(holder)
    for s in range(2):
        holder.handle(DeviceMessage(p, "device1", batch(s)))
    holder.handle(DeviceLost(p, "device1", ConnectionError("moving"), 0.0))
    relay = make_core(name="edge2", handover="relay")
    start_round(relay)
    b_link, a_end = Outbox("edge edge1"), Outbox("edge edge2")
    relay.fetcher.links["edge1"] = b_link
    dev = attach(relay, kind="resume", round=1, step=2, source="edge1", why="move")
    return holder, relay, dev, b_link, a_end


def _carry(src: Outbox, dst: EdgeCore, port: Outbox) -> None:
    """What ``src`` holds goes to ``dst`` as messages on its link ``port``."""
    sent, src.sent = list(src.sent), []
    for msg in sent:
        dst.handle(PeerMessage(port, msg))


def test_relay_forwards_steps_to_the_session_and_ends_bit_identical_to_no_move():
    holder, relay, dev, b_link, a_end = _relay_pair()
    (opening,) = b_link.sent
    assert isinstance(opening, m.RelayOpen) and (opening.round, opening.step) == (1, 2)
    assert relay.fetcher.pulls == [] and state(relay) is S.PULLING and of(dev, m.AttachReply) == []
    _carry(b_link, holder, a_end)
    assert state(holder) is S.ACTIVE  # served through edge2's link now
    _carry(a_end, relay, b_link)
    (reply,) = of(dev, m.AttachReply)
    assert (reply.action, reply.resume_step, reply.how) == ("continue", 2, "relayed") and state(relay) is S.IDLE
    for s in (2, 3):
        relay.handle(DeviceMessage(dev, "device1", batch(s)))
        _carry(b_link, holder, a_end)
        _carry(a_end, relay, b_link)
    done = m.DeviceDone(round=1, samples=16, steps=4, train_seconds=0.1, weights={k: WEIGHTS[k] for k in DEV_KEYS})
    relay.handle(DeviceMessage(dev, "device1", done))
    _carry(b_link, holder, a_end)
    (update,) = holder.central.delivered
    holder.handle(CentralMessage(m.UpdateAck(round=1, device="device1")))
    _carry(a_end, relay, b_link)
    assert of(dev, m.DoneAck) == [m.DoneAck(round=1)] and not relay.handover.relays
    # the same four steps on one edge, no move
    still = make_core()
    q = attach(still)
    start_round(still)
    for s in range(4):
        still.handle(DeviceMessage(q, "device1", batch(s)))
    still.handle(DeviceMessage(q, "device1", done))
    (alone,) = still.central.delivered
    assert [g.step for g in of(dev, m.Gradients)] == [2, 3]
    for got, want in zip(of(dev, m.Gradients), of(q, m.Gradients)[2:]):
        assert torch.equal(got.grad["g"], want.grad["g"]) and got.loss == want.loss
    assert all(torch.equal(update.weights[k], alone.weights[k]) for k in alone.weights)
    holder.drain()  # the relay's end, as a lost device link: the entry goes
    assert state(holder) is S.GONE


def test_a_refused_relay_falls_back_to_a_pull_and_a_pull_of_a_relayed_session_is_sent_to_its_holder():
    holder, relay, dev, b_link, a_end = _relay_pair()
    refusing = make_core(handover="relay")  # an edge without the session
    start_round(refusing)
    _carry(b_link, refusing, a_end)
    _carry(a_end, relay, b_link)
    (pull,) = relay.fetcher.pulls
    assert pull["source"] == "edge1" and state(relay) is S.PULLING and of(dev, m.AttachReply) == []
    # a relay that opened: a pull of that session from the relaying edge names the holder
    holder, relay, dev, b_link, a_end = _relay_pair()
    _carry(b_link, holder, a_end)
    _carry(a_end, relay, b_link)
    relay.handle(DeviceLost(dev, "device1", ConnectionError("moving on"), 0.0))
    peer = Outbox("edge edge3")
    relay.handle(PeerMessage(peer, m.SessionPull(device="device1", round=1, step=2, target="edge3",
                                                 proofs=proofs("device1", "edge3"))))
    (refused,) = peer.sent
    assert refused.moved_to == "edge1"


def test_no_kept_link_to_the_holder_pulls_and_a_lost_relay_link_ends_the_devices_link():
    relay = make_core(name="edge2", handover="relay")
    start_round(relay)
    dev = attach(relay, kind="resume", round=1, step=2, source="edge1", why="move")
    (pull,) = relay.fetcher.pulls  # no link kept to edge1 now: pulled, as policy pull would
    assert pull["source"] == "edge1"
    holder, relay, dev, b_link, a_end = _relay_pair()
    _carry(b_link, holder, a_end)
    _carry(a_end, relay, b_link)
    relay.handle(PeerLost(b_link))  # the holder is gone mid-relay
    assert dev.closed and not relay.handover.relays
    holder.handle(PeerLost(a_end))  # and the holder, for its part, holds the session again
    holder.drain()
    assert state(holder) is S.DETACHED

"""What the device's link gives back to the training loop (``device.outcomes``): each
outcome from the situation on the edge's side that brings it about. The edge's answers
come from a real ``EdgeCore`` driven through its seam; where the link itself is under
test, they reach it over real loopback connections from a small stand-in edge that speaks
the wire protocol (both from ``tests.seams``)."""

from __future__ import annotations

import pytest

from common import messages as m
from device.link import AttachRefused
from device.outcomes import Delivered, NoEdge, Rollback, RoundOver, RunOver, TrainFrom, read_attach
from edge.ports import CentralMessage, DeviceLost, PullOutcome, Stop
from tests.seams import DEV_KEYS, WEIGHTS, accept, active, attach, batch, make_core, make_link, of, start_round
from tests.seams import edges  # noqa: F401 - a fixture
from tests.testbed import free_ports


# -- an edge's answer to an attach, read ---------------------------------------------------------

def _reply(port) -> m.AttachReply:
    (reply,) = of(port, m.AttachReply)
    return reply


def test_a_link_back_on_the_edge_that_holds_its_session_trains_from_where_it_is():
    core = make_core()
    p = active(core)
    core.handle(DeviceLost(p, "device1", ConnectionError("reset"), 0.0))
    q = attach(core, kind="resume", round=1, step=1, source="edge1", why="reconnect")
    assert read_attach(_reply(q), round=1, step=1, in_round=True) == TrainFrom(1)


def test_a_session_lost_with_its_edge_rolls_the_round_back_to_its_weights():
    core = make_core(name="edge2")
    start_round(core)
    p = attach(core, kind="resume", round=1, step=3, source="edge1", why="reconnect")
    (pull,) = core.fetcher.pulls
    core.handle(PullOutcome(device="device1", token=pull["token"], source="edge1", error="edge1 is gone"))
    assert read_attach(_reply(p), round=1, step=3, in_round=True) == Rollback(1, 0, "restart")


def test_a_round_that_ended_while_the_session_was_fetched_is_over():
    core = make_core(name="edge2")
    start_round(core)
    p = attach(core, kind="resume", round=1, step=3, source="edge1")
    start_round(core, 2)
    got = read_attach(_reply(p), round=1, step=3, in_round=True)
    assert got == RoundOver(1, reason="round over") and str(got) == "round 1 is over for this device: round over"


def test_an_update_the_central_has_already_ends_the_round_as_delivered():
    core = make_core(name="edge2")
    start_round(core)
    core.handle(CentralMessage(m.UpdateAck(round=1, device="device1")))
    p = attach(core, kind="resume", round=1, step=3, source="edge1", why="reconnect")
    assert read_attach(_reply(p), round=1, step=3, in_round=True) == \
        RoundOver(1, delivered=True, reason="its update was taken")


def test_between_rounds_every_answer_means_wait_here():
    core = make_core()
    p = attach(core)
    assert read_attach(_reply(p), round=0, step=0, in_round=False) == TrainFrom(0)


# -- the link, against an edge over loopback ----------------------------------------------------

def test_what_the_edge_sends_while_a_step_waits_ends_the_round_or_the_run(tmp_path, edges):
    # what the edge's core sends: a newer round that leaves the device out, the next
    # round's work, the central's end of the run
    core = make_core()
    p = active(core)
    start_round(core, 2, participants=("device2",))
    (stand_by,) = of(p, m.StandBy)
    later = make_core()
    q = attach(later)
    start_round(later, 2)
    (work,) = of(q, m.DeviceRound)
    later.handle(Stop(reason="the run is over"))
    shutdown = q.notice
    assert isinstance(shutdown, m.Shutdown)
    x, y = batch(1).batch["x"], batch(1).batch["y"]
    got = {}
    for sent in (stand_by, work, shutdown):
        edge = edges(accept, on=lambda msg, sent=sent: [sent] if isinstance(msg, m.Activations) else [])
        lk, _ = make_link(tmp_path, free_ports(1) + [edge.port] + free_ports(1))
        lk.at(1, 1, 4)
        assert isinstance(lk.join(), m.AttachReply)
        got[type(sent)] = lk.step(1, 1, x, y)
        lk.close()
    assert got[m.StandBy] == RoundOver(1, reason=stand_by.reason)
    over = got[m.DeviceRound]
    assert isinstance(over, RoundOver) and (over.round, over.delivered) == (1, False)
    assert over.reason == "a newer round started"
    assert over.next is not None and over.next.round_plan.round == 2 and set(over.next.weights) == set(DEV_KEYS)
    assert got[m.Shutdown] == RunOver("the run is over")


def test_a_gradient_is_what_a_step_gives_and_the_update_taken_is_delivered(tmp_path, edges):
    x, y = batch(1).batch["x"], batch(1).batch["y"]

    def on(msg):
        if isinstance(msg, m.Activations):
            return [m.Gradients(round=msg.round, step=msg.step, grad={"g": msg.batch["x"]}, loss=0.5)]
        return [m.DoneAck(round=msg.round)] if isinstance(msg, m.DeviceDone) else []
    edge = edges(accept, on=on)
    lk, _ = make_link(tmp_path, free_ports(1) + [edge.port] + free_ports(1))
    lk.at(1, 1, 2)
    lk.join()
    got = lk.step(1, 1, x, y)
    assert isinstance(got, m.Gradients) and got.step == 1
    lk.at(1, 2, 2)
    done = m.DeviceDone(round=1, samples=8, steps=2, train_seconds=0.1, weights={k: WEIGHTS[k] for k in DEV_KEYS})
    assert lk.finish(done) == Delivered(1) and lk.last_round == 1
    lk.close()


@pytest.mark.parametrize("preconnect", [False, True])
def test_one_move_path_gives_back_the_destination_s_answer_preconnected_or_not(tmp_path, edges, preconnect):
    here = edges(accept)
    there = edges(lambda req: accept(req, resume_step=0, how="restart"))
    lk, events = make_link(tmp_path, [free_ports(1)[0], here.port, there.port], preconnect=preconnect)
    lk.at(1, 3, 10)
    lk.join()
    if preconnect:
        lk.preconnect("edge3")
    assert lk.move("edge3", 1, 3) == Rollback(1, 0, "restart")
    (moved,) = events.named("moved")
    assert lk.edge == "edge3" and moved["to"] == "edge3" and moved.get("preconnected", False) is preconnect
    assert [x.why for x in there.got if isinstance(x, m.AttachRequest)] == ["move"]
    lk.close()


@pytest.mark.parametrize("preconnect", [False, True])
def test_a_move_that_fails_finds_a_place_and_goes_on_from_where_the_device_is(tmp_path, edges, preconnect):
    here = edges(accept)
    nobody = free_ports(1)[0]  # refused at once
    lk, events = make_link(tmp_path, [free_ports(1)[0], here.port, nobody], preconnect=preconnect)
    lk.at(1, 3, 10)
    lk.join()
    if preconnect:
        lk.preconnect("edge3")
    assert lk.move("edge3", 1, 3) == TrainFrom(3)
    assert lk.edge == "edge2" and events.named("move_failed") and events.named("reattached")
    assert [x.why for x in here.got if isinstance(x, m.AttachRequest)] == ["start", "reconnect"]
    lk.close()


def test_no_edge_is_an_outcome_at_the_first_attach_and_after_a_loss(tmp_path):
    lk, _ = make_link(tmp_path, free_ports(3), startup_s=0.3, give_up_s=0.3)
    got = lk.join()
    assert isinstance(got, NoEdge) and "cannot attach to edge2" in got.detail
    lk.at(1, 3, 10)
    x, y = batch(3).batch["x"], batch(3).batch["y"]
    got = lk.step(1, 3, x, y)  # no link: it reconnects, and no edge takes it
    assert isinstance(got, NoEdge) and "no edge took device1" in got.detail


def test_a_refusal_at_the_first_attach_is_an_error_not_an_outcome(tmp_path, edges):
    def refuse(req):
        return m.AttachReply(ok=False, reason="unknown device", run_name="", mode="fedfly", action="wait",
                             round=0, resume_step=0, how="", state_bytes=0, transfer_ms=0.0)
    edge = edges(refuse)
    lk, _ = make_link(tmp_path, free_ports(1) + [edge.port] + free_ports(1))
    with pytest.raises(AttachRefused, match="unknown device"):
        lk.join()
    lk.close()

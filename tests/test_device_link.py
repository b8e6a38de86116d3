"""The device side without the rest of the testbed: where a lost link reconnects
(``faults.reconnect``), and the move sources the training loop asks at each boundary."""

from __future__ import annotations

import socket
import time

from common import transport
from common import security
from common.config import Drop, Move
from common.events import EventLog
from device import reconnect
from device.control import Position
from device.link import EdgeLink
from device.moves import CommandedMoves, MoveSources, ScheduledDrops, ScheduledMoves
from tests.seams import KEY, device_config, device_link


def config(policy="same", ports=(2, 3, 4), dead=1.0, grace=5.0):
    return device_config(ports, faults={"reconnect": policy, "heartbeat_s": 0.1, "dead_after_s": dead,
                                        "device_grace_s": grace})


def link(cfg) -> EdgeLink:
    return device_link(cfg, EventLog(process="device1", role="device"))


def back_order(lk: EdgeLink, lost_at: float, silent: bool, failed: dict[str, float]) -> list[str]:
    """The edges the link's way back after a loss at ``lost_at`` tries now, in order."""
    route = lk.roam.route_back(lost_at, silent)
    route.failed.update(failed)
    return route.edges()


def test_same_tries_the_lost_edge_first_then_every_other_in_turn():
    lk = link(config("same", dead=1.0))
    now = time.monotonic()
    assert back_order(lk, now, False, {}) == ["edge2"]
    assert back_order(lk, now - 1.5, False, {}) == ["edge2", "edge3", "edge1"]  # after the deadline: any edge


def test_an_edge_that_went_silent_is_tried_last_and_so_is_one_that_just_failed():
    lk = link(config("same", dead=1.0))
    now = time.monotonic()
    assert back_order(lk, now, True, {}) == ["edge3", "edge1", "edge2"]
    assert back_order(lk, now, True, {"edge3": now}) == ["edge1", "edge2", "edge3"]
    assert back_order(lk, now, True, {"edge3": now - 2.0}) == ["edge3", "edge1", "edge2"]  # long ago: forgiven


def test_the_controller_decides_where_and_same_is_the_fallback():
    lk = link(config("controller", grace=5.0))
    now = time.monotonic()
    assert back_order(lk, now, False, {}) == []  # wait for the controller's word
    lk.pos.pending = "edge3"                 # a move command while reconnecting
    assert back_order(lk, now, False, {})[0] == "edge3"
    lk.pos.pending = None
    # no word within half the grace (the central's patience): back where it was
    assert back_order(lk, now - 3.0, False, {})[0] == "edge2"


def test_a_drop_naming_an_edge_overrides_the_policy():
    lk = link(config("same"))
    lk.cut(0.0, "edge1")
    assert back_order(lk, time.monotonic(), False, {})[0] == "edge1"


def test_the_order_is_a_function_of_where_and_when_the_link_was_lost_alone():
    at = dict(edges=["edge1", "edge2", "edge3"], on="edge2", told="", policy="same", lost_at=0.0, silent=False,
              failed={}, dead_s=1.0, grace_s=5.0, nearest=lambda edges: ["edge3", "edge1"])
    assert reconnect.candidates(now=0.5, **at) == ["edge2"]
    assert reconnect.candidates(now=1.5, **at) == ["edge2", "edge3", "edge1"]
    assert reconnect.candidates(now=0.5, **{**at, "policy": "nearest"}) == ["edge3", "edge1"]
    assert reconnect.candidates(now=0.5, **{**at, "told": "edge1"}) == ["edge1", "edge2", "edge3"]
    assert reconnect.candidates(now=2.0, **{**at, "policy": "controller"}) == []          # within grace / 2
    assert reconnect.candidates(now=3.0, **{**at, "policy": "controller"})[0] == "edge2"  # then as "same"


def test_nearest_is_the_first_edge_to_complete_a_handshake_and_skips_a_silent_one():
    good = transport.Listener("127.0.0.1", 0, creds=security.SharedKey(KEY), handler=lambda conn: None, name="good").start()
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel does) but never answers
    try:
        from tests.testbed import free_ports
        nobody = free_ports(1)[0]  # refused at once
        cfg = config("nearest", ports=(silent.getsockname()[1], good.port, nobody), dead=0.5)
        t0 = time.monotonic()
        order = reconnect.nearest(cfg.edges, sorted(cfg.edges), creds=security.SharedKey(KEY), timeout=0.5)
        assert order == ["edge2"] and time.monotonic() - t0 < 10
    finally:
        good.close()
        silent.close()


def test_scheduled_moves_fire_once_at_their_step():
    src = ScheduledMoves([Move("device1", "edge2", 1, 0.5), Move("device1", "edge1", 2, 0.25),
                          Move("device1", "edge3", 2, 0.75)])
    assert src.due(1, 1, 4) is None
    assert src.due(1, 2, 4) == "edge2" and src.due(1, 3, 4) is None
    assert src.due(2, 3, 4) == "edge1" and src.due(2, 3, 4) == "edge3" and src.due(2, 3, 4) is None


def test_sources_are_asked_in_order_and_commands_are_taken_once():
    pos = Position(edge="edge1")
    both = MoveSources(ScheduledMoves([Move("device1", "edge2", 1, 0.5)]), CommandedMoves(pos))
    pos.pending = "edge3"
    assert both.due(1, 2, 4) == "edge2" and both.due(1, 2, 4) == "edge3" and both.due(1, 2, 4) is None


def test_what_is_seen_a_step_ahead_is_what_falls_due_at_the_next_boundary():
    moves = ScheduledMoves([Move("device1", "edge2", 1, 0.5), Move("device1", "edge3", 1, 0.5)])
    drops = ScheduledDrops([Drop("device1", 1, 0.75, 1.0)])
    assert moves.upcoming(1, 0, 4) is None and drops.ahead(1, 1, 4) is None
    assert moves.upcoming(1, 1, 4) == "edge2" and moves.upcoming(1, 1, 4) == "edge2"  # seen, not taken
    assert moves.due(1, 2, 4) == "edge2" and moves.upcoming(1, 1, 4) == "edge3"
    seen = drops.ahead(1, 2, 4)
    assert seen is not None and drops.due(1, 3, 4) is seen and drops.ahead(1, 2, 4) is None


class _Links:
    """What ``DeviceClient._announce`` tells its link."""

    def __init__(self):
        self.said = []

    def announce(self, to, round, step):
        self.said.append((to, round, step))


def _announcer(*, offer=True, mode="fedfly", drops=()):
    from types import SimpleNamespace

    return SimpleNamespace(mode=mode, cfg=SimpleNamespace(mobility=SimpleNamespace(offer=offer)), link=_Links(),
                           drops=ScheduledDrops(drops),
                           moves=MoveSources(ScheduledMoves([Move("device1", "edge2", 1, 0.5)])))


def test_a_scheduled_move_is_announced_a_step_ahead_unless_a_drop_falls_there_too():
    from device.client import DeviceClient

    dev = _announcer()
    DeviceClient._announce(dev, 1, 0, 4)          # the move is before step 2: not yet
    DeviceClient._announce(dev, 1, 1, 4)
    assert dev.link.said == [("edge2", 1, 2)]
    for quiet in (_announcer(offer=False), _announcer(mode="restart"),
                  _announcer(drops=[Drop("device1", 1, 0.5, 2.0)])):
        DeviceClient._announce(quiet, 1, 1, 4)
        assert quiet.link.said == []
    last = _announcer()
    last.moves = MoveSources(ScheduledMoves([Move("device1", "edge2", 1, 1.0)]))
    DeviceClient._announce(last, 1, 3, 4)         # after the round's last step no move follows
    assert last.link.said == []


def test_an_announce_goes_on_a_live_link_only_and_never_to_the_edge_it_is_on():
    from types import SimpleNamespace

    lk = link(config())
    sent = []
    lk._link = SimpleNamespace(silent=False, post=lambda msg: sent.append(msg) or True)
    lk.announce("edge2", 1, 2)                    # it is on edge2 already
    lk._link.silent = True                         # a radio loss under way would swallow it
    lk.announce("edge3", 1, 2)
    assert sent == [] and lk.roam._announced is None
    lk._link.silent = False
    lk.announce("edge3", 1, 2)
    assert [(x.to, x.round, x.step) for x in sent] == [("edge3", 1, 2)]
    assert lk.roam._announced == (lk._link, "edge3", 1, 2)

"""What a device tells the controller about its link (``StatusReply.link``): before its
first attach it is connecting, not reconnecting (it had no link to lose)."""

from __future__ import annotations

from common import messages as m
from device.control import check_move
from tests.test_device_link import config, link


def test_before_its_first_attach_a_device_is_connecting():
    lk = link(config())
    assert lk.pos.link == "connecting" and lk.pos.link in m.LINK_STATES


def test_a_move_to_its_own_edge_is_taken_until_it_is_on_that_edge():
    lk = link(config())
    edges = sorted(lk.cfg.edges)
    for state, taken in (("connecting", True), ("reconnecting", True), ("attached", False)):
        lk.pos.link = state
        why = check_move(lk.pos, device="device1", edges=edges, cmd=m.MoveCommand(device="device1", to="edge2"))
        assert (why == "") is taken, (state, why)
        assert taken or why == "device1 is already on edge2"

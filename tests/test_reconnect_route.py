"""Where a device's link goes next and when (``device.reconnect.Route``), without a socket:
the edges of each pass in order, what failed remembered, the wait for a radio loss to end,
the deadline; and the radio loss itself as one value the link swaps whole."""

from __future__ import annotations

import dataclasses
import time

import pytest

from device.reconnect import Cut, Route, first_route
from tests.test_device_link import back_order, config, link


def test_a_route_tries_each_edge_of_a_pass_in_turn_and_remembers_what_failed():
    seen: list[str] = []
    route = Route(lambda now, failed: [e for e in ["edge2", "edge3", "edge1"] if e not in failed],
                  deadline=float("inf"))
    got = route.search(lambda edge: seen.append(edge) or ("took" if edge == "edge1" else None))
    assert got == "took" and seen == ["edge2", "edge3", "edge1"] and set(route.failed) == {"edge2", "edge3"}


def test_a_route_past_its_deadline_gives_up_after_one_pass_and_says_what_it_tried():
    passes: list[int] = []
    route = Route(lambda now, failed: ["edge2", "edge1"], deadline=time.monotonic() - 1.0)
    assert route.search(lambda edge: None, each_pass=lambda: passes.append(1)) is None
    assert passes == [1] and route.tried == ["edge2", "edge1"]


def test_no_pass_starts_before_the_radio_is_back():
    back = time.monotonic() + 0.05
    started: list[float] = []
    route = Route(lambda now, failed: ["edge2"], deadline=float("inf"), not_before=lambda: back)
    assert route.search(lambda edge: "took", each_pass=lambda: started.append(time.monotonic())) == "took"
    assert started[0] >= back


def test_the_first_attach_goes_home_and_to_the_others_after_half_the_startup_time():
    edges = ["edge1", "edge2", "edge3"]
    now = time.monotonic()
    assert first_route(edges=edges, home="edge2", started=now, startup_s=10.0).edges() == ["edge2"]
    assert first_route(edges=edges, home="edge2", started=now - 6.0, startup_s=10.0).edges() == \
        ["edge2", "edge3", "edge1"]


def test_a_cut_is_one_value_and_a_reattach_spends_only_the_edge_of_the_cut_it_served():
    lk = link(config("same"))
    lk.cut(0.0, "edge1", why="trace")
    served = lk.radio
    assert (served.gen, served.to, served.by) == (1, "edge1", "trace") and served.until >= served.at
    with pytest.raises(dataclasses.FrozenInstanceError):
        served.to = ""  # type: ignore[misc]
    lk.cut(0.0, "edge3")
    lk.cut_served(served.gen)              # an older cut: the newer one still names its edge
    assert lk.radio.to == "edge3" and back_order(lk, time.monotonic(), False, {})[0] == "edge3"
    lk.cut_served(lk.radio.gen)
    assert lk.radio.to == "" and lk.radio.by == "controller" and back_order(lk, time.monotonic(), False, {}) == ["edge2"]
    assert Cut().gen == 0 and Cut().until == 0.0  # before any cut: nothing to wait for

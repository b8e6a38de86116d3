"""``Shutdown`` means one thing, the run's end; ``Replaced`` the other thing it used to
mean: an edge took a newer connection of the device in this one's place. A device whose
link in use is replaced (another process runs with its name) stops with ``NoEdge``, an
error that keeps its checkpoint, not with ``RunOver``, the clean end that forgets it."""

from __future__ import annotations

from common import messages as m
from device.outcomes import NoEdge, RunOver
from tests.seams import accept, attach, batch, make_core, make_link
from tests.seams import edges  # noqa: F401 - a fixture
from tests.testbed import free_ports


def test_the_edge_tells_the_older_link_it_was_replaced_not_that_the_run_is_over():
    core = make_core()
    old = attach(core)
    attach(core)
    assert old.closed and isinstance(old.notice, m.Replaced)


def test_a_device_replaced_on_the_link_it_uses_stops_with_an_error(tmp_path, edges):
    x, y = batch(1).batch["x"], batch(1).batch["y"]
    edge = edges(accept, on=lambda msg: [m.Replaced()] if isinstance(msg, m.Activations) else [])
    lk, _ = make_link(tmp_path, free_ports(1) + [edge.port] + free_ports(1))
    lk.at(1, 1, 4)
    assert isinstance(lk.join(), m.AttachReply)
    got = lk.step(1, 1, x, y)
    lk.close()
    assert isinstance(got, NoEdge) and not isinstance(got, RunOver)
    assert "another process runs as device1" in got.detail


def test_a_device_replaced_while_it_attaches_stops_too(tmp_path, edges):
    edge = edges(lambda req: m.Replaced())
    lk, _ = make_link(tmp_path, free_ports(1) + [edge.port] + free_ports(1))
    got = lk.join()
    lk.close()
    assert isinstance(got, NoEdge) and "another process runs as device1" in got.detail

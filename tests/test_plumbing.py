"""The plumbing every role shares, written once (issue 24 item 4): the reconnect loop
(``common.limits.retry``), the door of a listener (``common.door``), the atomic write
with a file mode (``common.atomic``), a fault report with defaults."""

from __future__ import annotations

import json
import os
import stat
import threading
import time

import pytest

from common import codec, limits
from common import messages as m
from common.atomic import write_bytes_atomic
from common.door import Door
from common.errors import AuthenticationError
from common.events import EventLog
from common.security import Identity
from common.stream import memory_stream_pair
from common.transport import Connection

pytestmark = pytest.mark.timeout(60)


# -- the reconnect loop ----------------------------------------------------------------------

def test_reconnect_waits_are_the_ones_every_copy_had():
    b = limits.Backoff(limits.RECONNECT_FIRST_S, limits.RECONNECT_MAX_S)
    assert [b.next() for _ in range(7)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_retry_tries_until_something_comes_waiting_the_backoff_between():
    waits, tries = [], iter([None, None, "up"])

    class Counting(limits.Backoff):
        def next(self) -> float:
            waits.append(super().next())
            return 0.0

    got = limits.retry(lambda: next(tries), deadline=time.monotonic() + 60, backoff=Counting(0.05, 1.0))
    assert got == "up" and waits == [0.05, 0.1]


def test_retry_gives_up_after_a_try_at_the_deadline_and_never_tries_once_stopped():
    calls = []
    assert limits.retry(lambda: calls.append(1), deadline=time.monotonic()) is None and calls == [1]
    assert limits.retry(lambda: calls.append(2), deadline=time.monotonic() + 60, stopped=lambda: True) is None
    assert calls == [1]


def test_retry_lets_an_error_that_cannot_heal_through():
    def refused():
        raise AuthenticationError("wrong key")
    with pytest.raises(AuthenticationError):
        limits.retry(refused, deadline=time.monotonic() + 60)


# -- the door --------------------------------------------------------------------------------

def _door_run(tmp_path, first: m.Message, identity: Identity | None):
    """Knock at a central-like door with ``first`` as ``identity``: what the door opened
    (role, name), the peer's answer, and the event log's lines."""
    events = EventLog(process="central", role="central")
    events.open(str(tmp_path))
    a, b = memory_stream_pair(capacity=1 << 20)
    inside = Connection(a, peer="new", identity=identity)
    outside = Connection(b, peer="central")
    opened = []

    def open_(conn, msg, role, name):
        opened.append((role, name))
        conn.close()
        return None

    door = Door(where="central", events=events, first_within_s=5.0, known={"edge": {"edge1", "edge2"}},
                claims=lambda msg: ("edge", msg.edge) if isinstance(msg, m.EdgeHello) else None, open=open_)
    t = threading.Thread(target=door, args=(inside,))
    t.start()
    outside.send(first)
    try:
        answer = outside.recv(timeout=5.0)
    except Exception as exc:  # noqa: BLE001 - the connection closed without a word
        answer = exc
    t.join(10)
    events.close()
    lines = [json.loads(x) for x in open(events.path)] if events.path and os.path.exists(events.path) else []
    return opened, answer, lines


def test_the_door_opens_to_who_the_first_message_says_when_its_certificate_agrees(tmp_path):
    opened, _, lines = _door_run(tmp_path, m.EdgeHello(edge="edge1"), Identity("edge", "edge1"))
    assert opened == [("edge", "edge1")] and lines == []


@pytest.mark.parametrize("first,identity,kind,told", [
    (m.StatusRequest(), Identity("edge", "edge1"), "RemoteProtocolError", "StatusRequest is not allowed first"),
    (m.EdgeHello(edge="edge2"), Identity("edge", "edge1"), "AuthenticationError", "refused"),
    (m.EdgeHello(edge="edge9"), None, "AuthenticationError", "refused"),
])
def test_the_door_refuses_the_same_way_everywhere(tmp_path, first, identity, kind, told):
    opened, answer, lines = _door_run(tmp_path, first, identity)
    assert opened == []
    assert isinstance(answer, m.ErrorNotice) and answer.kind == kind and told in answer.detail
    assert [(x["event"], x["error"]) for x in lines] == [("protocol_error", kind)]


# -- atomic writes, fault reports ------------------------------------------------------------------

def test_an_atomic_write_keeps_a_secret_secret_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "key")
    write_bytes_atomic(path, b"s" * 32, mode=0o600)
    write_bytes_atomic(path, b"t" * 32, mode=0o600)
    assert open(path, "rb").read() == b"t" * 32 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(tmp_path) == ["key"]


def test_a_fault_report_says_only_what_it_knows_and_travels_with_every_field():
    rep = m.FaultReport(kind="link_lost", process="device1", peer="edge1", round=2, step=3)
    assert (rep.detail, rep.detected_s, rep.down_s, rep.replayed, rep.recovery, rep.samples_lost) == ("", 0.0, 0.0, 0, "", 0)
    fields, _ = m.to_wire(rep)
    assert set(fields) == set(m.FaultReport._hints)
    assert list(codec.decode_all(codec.encode_bytes(rep))) == [rep]

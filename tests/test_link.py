"""Streams, connections and links: the checks are written once and run on a real socket
pair and on the in-memory pair (trio's ``_check_streams`` idea), then the heartbeat and
deadline behaviour of ``Link`` on top."""

from __future__ import annotations

import queue
import socket
import threading
import time

import pytest
import torch

from common import messages as m
from common import security
from common.errors import ConnectionClosed, LocalProtocolError, PeerSilent
from common.link import Link, LinkClosedHere
from common.stream import SocketStream, memory_stream_pair
from common.transport import Connection

pytestmark = pytest.mark.timeout(60)
WAIT = 10.0


@pytest.fixture(params=["socket", "memory"])
def pair(request):
    if request.param == "socket":
        a, b = socket.socketpair()
        # small buffers, so that a peer that does not read blocks a writer soon
        for s in (a, b):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        x, y = SocketStream(a), SocketStream(b)
    else:
        x, y = memory_stream_pair(capacity=64 << 10)
    yield x, y
    x.close()
    y.close()


def _read_all(stream, n):
    buf = bytearray(n)
    got = 0
    while got < n:
        k = stream.receive_into(memoryview(buf)[got:], WAIT)
        assert k > 0
        got += k
    return bytes(buf)


def test_bytes_go_both_ways_in_order(pair):
    a, b = pair
    data = bytes(range(256)) * 1000
    t = threading.Thread(target=a.send_all, args=([data[:1000], memoryview(data)[1000:]], WAIT))
    t.start()
    assert _read_all(b, len(data)) == data
    t.join()
    assert b.send_all([b"back"], WAIT) == 4 and _read_all(a, 4) == b"back"


def test_end_of_stream_reads_zero(pair):
    a, b = pair
    a.send_all([b"last"], WAIT)
    a.shutdown()
    assert _read_all(b, 4) == b"last"
    assert b.receive_into(memoryview(bytearray(10)), WAIT) == 0


def test_a_receive_timeout_leaves_the_stream_usable(pair):
    a, b = pair
    with pytest.raises(TimeoutError):
        b.receive_into(memoryview(bytearray(10)), 0.1)
    a.send_all([b"x"], WAIT)
    assert _read_all(b, 1) == b"x"


def test_a_peer_that_takes_nothing_makes_the_sender_fail_after_its_stall_timeout(pair):
    a, b = pair
    t0 = time.monotonic()
    with pytest.raises(PeerSilent):
        a.send_all([bytes(8 << 20)], 0.3)
    assert time.monotonic() - t0 < WAIT


def test_close_here_wakes_a_blocked_reader_and_forbids_sending(pair):
    a, b = pair
    errors = queue.SimpleQueue()

    def reader():
        try:
            b.receive_into(memoryview(bytearray(10)), None)
        except ConnectionClosed as exc:
            errors.put(exc)
    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.1)
    b.close()
    t.join(WAIT)
    assert not t.is_alive() and isinstance(errors.get(timeout=1), ConnectionClosed)
    with pytest.raises(LocalProtocolError):
        b.send_all([b"x"], 1.0)


def test_sending_to_a_closed_peer_raises_connection_closed(pair):
    a, b = pair
    b.close()
    with pytest.raises(ConnectionClosed):
        for _ in range(100):
            a.send_all([bytes(10000)], 1.0)
            time.sleep(0.01)


# -- connections: heartbeats are consumed, silence is a deadline --------------------------------

def conns(pair, **kw):
    a, b = pair
    return Connection(a, peer="a", **kw), Connection(b, peer="b", **kw)


def test_heartbeats_never_reach_the_caller(pair):
    ca, cb = conns(pair)
    for _ in range(3):
        ca.send(m.Heartbeat())
    ca.send(m.Shutdown(reason="after three heartbeats"))
    assert cb.recv(timeout=WAIT) == m.Shutdown(reason="after three heartbeats")


def test_a_silent_peer_raises_peer_silent_after_the_idle_deadline(pair):
    ca, cb = conns(pair, idle_timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(PeerSilent):
        cb.recv()
    assert 0.25 < time.monotonic() - t0 < WAIT
    ca.close()


def test_heartbeats_keep_a_quiet_connection_alive(pair):
    ca, cb = conns(pair, idle_timeout=0.3)
    stop = threading.Event()

    def beat():
        while not stop.wait(0.05):
            ca.send(m.Heartbeat())
    t = threading.Thread(target=beat, daemon=True)
    t.start()
    with pytest.raises(TimeoutError):  # a plain timeout, not the peer's silence
        cb.recv(timeout=0.9)  # three times the idle limit
    stop.set()
    t.join()


# -- links -------------------------------------------------------------------------------------

class Ends:
    def __init__(self, pair, *, hb=0.05, dead=0.3):
        a, b = pair
        self.got = {"a": queue.SimpleQueue(), "b": queue.SimpleQueue()}
        self.lost = {"a": queue.SimpleQueue(), "b": queue.SimpleQueue()}
        self.links = {}
        for name, stream in (("a", a), ("b", b)):
            self.links[name] = Link(Connection(stream), name=name, heartbeat_s=hb, dead_after_s=dead,
                                    on_message=lambda l, msg, n=name: self.got[n].put(msg),
                                    on_lost=lambda l, exc, n=name: self.lost[n].put(exc)).start()


def test_a_link_carries_messages_and_stays_up_while_idle(pair):
    ends = Ends(pair)
    ends.links["a"].post(m.StatusRequest())
    assert ends.got["b"].get(timeout=WAIT) == m.StatusRequest()
    time.sleep(0.9)  # three times the deadline with nothing but heartbeats
    assert ends.lost["a"].empty() and ends.lost["b"].empty()
    ends.links["b"].post(m.Shutdown(reason="x"))
    assert ends.got["a"].get(timeout=WAIT) == m.Shutdown(reason="x")
    ends.links["a"].close(drain=False)
    ends.links["b"].close(drain=False)


def test_a_peer_gone_silent_is_lost_once_within_the_deadline(pair):
    ends = Ends(pair)
    t0 = time.monotonic()
    ends.links["a"].go_silent()  # nothing in, nothing out: a radio loss
    exc = ends.lost["b"].get(timeout=WAIT)
    assert isinstance(exc, PeerSilent) and time.monotonic() - t0 < WAIT
    assert ends.links["b"].lost and ends.lost["b"].empty()
    ends.links["a"].close(drain=False)
    # a's end is lost too: by b closing its side, or by our close, whichever came first
    assert isinstance(ends.lost["a"].get(timeout=WAIT), ConnectionClosed)
    time.sleep(0.2)
    assert ends.lost["a"].empty() and ends.lost["b"].empty()  # once each


def test_close_delivers_what_was_queued_first(pair):
    ends = Ends(pair)
    for i in range(5):
        ends.links["a"].post(m.SessionReleased(device=f"d{i}"))
    ends.links["a"].close(notice=m.Shutdown(reason="bye"))
    got = [ends.got["b"].get(timeout=WAIT) for _ in range(6)]
    assert got[-1] == m.Shutdown(reason="bye") and [g.device for g in got[:5]] == [f"d{i}" for i in range(5)]
    assert isinstance(ends.lost["a"].get(timeout=WAIT), LinkClosedHere)
    assert isinstance(ends.lost["b"].get(timeout=WAIT), ConnectionClosed)
    assert not ends.links["a"].post(m.StatusRequest())  # nothing is sent on a lost link


def _batch(step: int, kib: int = 256) -> m.Activations:
    return m.Activations(round=1, step=step, batch={"x": torch.full((kib, 256), float(step)),
                                                     "y": torch.zeros(kib, dtype=torch.int64)})


def test_send_goes_out_on_the_calling_thread_behind_what_was_posted(pair):
    """``send`` writes on the caller's thread when nothing posted is still unsent, and
    queues behind it when something is: one thread's posts and sends arrive in the order
    they were made, while the writer is still busy with earlier ones (small buffers, 256
    KiB messages)."""
    ends = Ends(pair, dead=5.0)
    a = ends.links["a"]
    senders: list[str] = []
    real = a.conn.send

    def spy(msg, **kw):
        if not isinstance(msg, m.Heartbeat):
            senders.append(threading.current_thread().name)
        return real(msg, **kw)
    a.conn.send = spy
    assert a.send(m.StatusRequest())
    assert ends.got["b"].get(timeout=WAIT) == m.StatusRequest()
    assert senders == [threading.current_thread().name]
    for i in range(30):
        assert (a.send if i % 3 else a.post)(_batch(i))
    got = [ends.got["b"].get(timeout=WAIT) for _ in range(30)]
    assert [g.step for g in got] == list(range(30))
    assert all(bool((g.batch["x"] == g.step).all()) for g in got)
    assert "a-writer" in senders  # the posts, and the sends queued behind them
    assert ends.lost["a"].empty() and ends.lost["b"].empty()
    ends.links["a"].close(drain=False)
    ends.links["b"].close(drain=False)


def test_send_on_a_lost_link_sends_nothing_and_a_failed_send_ends_the_link_once(pair):
    x, _y = pair
    lost: queue.SimpleQueue = queue.SimpleQueue()
    link = Link(Connection(x), name="a", heartbeat_s=0.05, dead_after_s=5.0, on_message=lambda l, msg: None,
                on_lost=lambda l, exc: lost.put(exc))  # not started: no thread but the caller's
    link.conn.close()
    assert link.send(_batch(0)) is True  # taken, as post takes it; its failure ends the link
    assert isinstance(lost.get(timeout=WAIT), LocalProtocolError) and link.lost
    assert link.send(_batch(1)) is False and link.post(_batch(1)) is False
    assert lost.empty()


def test_pulls_of_two_devices_share_a_peer_link_and_their_answers_are_matched_by_device():
    """A peer that answers the second pull first: each exchange gets its own answer, and
    neither waits for the other (no lock held across an exchange)."""
    import threading as _t

    from common import messages as m
    from common import transport
    from edge.peers import PeerLinks

    key = bytes(range(32))
    connections = []
    firsts = []  # checked below: an assert in this handler thread would only end the thread

    def peer(conn):
        connections.append(conn)
        firsts.append(conn.recv(timeout=5))  # who opened it, first
        first = conn.recv(timeout=5)
        second = conn.recv(timeout=5)
        for pull in (second, first):  # the other way round
            conn.send(m.PullRefused(device=pull.device, reason=f"answer for {pull.device}", moved_to="",
                                    delivered=False))
        try:
            conn.recv(timeout=5)
        except Exception:
            pass

    lst = transport.Listener("127.0.0.1", 0, creds=security.SharedKey(key), handler=peer, name="peer").start()
    links = PeerLinks(name="edge1", creds=security.SharedKey(key), endpoints={"edge2": ("127.0.0.1", lst.port)}, heartbeat_s=0.2,
                      dead_after_s=2.0, answer_limit_s=5.0)
    got = {}
    entered = _t.Barrier(2)

    def pull(device):
        with links.exchange("edge2", device) as ex:
            ex.send(m.SessionPull(device=device, round=1, step=1, target="edge1"))
            entered.wait(timeout=5)  # both are inside their exchange at once
            got[device] = ex.recv().reason
    try:
        threads = [_t.Thread(target=pull, args=(d,)) for d in ("device1", "device2")]
        for th in threads:
            th.start()
        for th in threads:
            th.join(10)
        assert firsts == [m.PeerHello(target="edge1")]
        assert got == {"device1": "answer for device1", "device2": "answer for device2"}
        assert len(connections) == 1  # one kept link
    finally:
        links.close()
        lst.close()


@pytest.mark.process
def test_a_link_an_edge_opens_ahead_of_need_is_kept_by_the_other_edge_while_idle(tmp_path):
    """An edge opens links to the others at a round's start, to offer sessions on later
    (``PeerLinks.kept``). A real edge process keeps such a link while nothing but
    heartbeats cross it, well past twice ``dead_after_s`` (its wait for a connection's
    first message), and reports no protocol error for it."""
    from common.config import load_config
    from common.security import Identity
    from edge.peers import PeerLinks
    from tests.testbed import Testbed, write_config

    dead = 0.5
    cfg_path = write_config(tmp_path, edges=2, devices=1,
                            extra={"faults": {"heartbeat_s": 0.1, "dead_after_s": dead}})
    cfg = load_config(str(cfg_path))
    bed = Testbed(cfg_path, log_dir=tmp_path / "logs")
    links = PeerLinks(name="edge1", creds=cfg.credentials(Identity("edge", "edge1")),
                      endpoints={"edge2": (cfg.edges["edge2"].host, cfg.edges["edge2"].port)},
                      heartbeat_s=0.1, dead_after_s=dead, answer_limit_s=5.0)
    try:
        bed.start("central")
        bed.start("edge", "edge2")
        deadline = time.monotonic() + 60
        while (link := links.kept("edge2")) is None:  # connects in the background, until edge2 listens
            assert time.monotonic() < deadline, bed.log("edge2")[-2000:]
            time.sleep(0.1)
        time.sleep(4 * dead)
        assert not link.lost, link.lost_reason
        assert links.kept("edge2") is link
        assert "protocol_error" not in bed.log("edge2") and "not allowed first" not in bed.log("edge2")
    finally:
        links.close()
        bed.stop()

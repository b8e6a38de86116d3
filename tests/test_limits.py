"""Limits a stranger cannot exhaust (issue 10, "Limits"), on real loopback sockets.

- ``transport.Listener``: unauthenticated connections capped in total and per source
  address (the rest closed at once, without a thread), the slots freed when a handshake
  ends, ``accept`` out of descriptors backing off instead of spinning or dying;
- ``limits.RateLimitedReporter`` and ``printable_prefix``: a flood of refusals is a few
  lines and a count, and never more than a short escaped prefix of what a peer sent;
- ``events.EventLog``: a write or open that fails is counted and dropped, never raised.

Every address is on loopback: 127.0.0.0/8 is all local on Linux, so 127.0.0.2, .3 ...
are as many source addresses. Every blocking call has a timeout.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import resource
import socket
import threading
import time

import pytest

from common import auth, events, limits, security, transport
from common import messages as m
from common.errors import ConnectionClosed
from common.stream import SocketStream
from tests.test_transport import is_closed_by_peer

pytestmark = pytest.mark.timeout(120)

KEY = bytes(range(32))
WAIT = 10.0
HANDSHAKE_S = 30.0  # long: a slow stranger holds its slot for the whole test


def wait_for(cond, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class Server:
    """A ``Listener`` on 127.0.0.1 whose handler echoes one message back; refusals are queued."""

    def __init__(self, **kw) -> None:
        self.rejects: queue.Queue = queue.Queue()
        self.served = 0

        def handler(conn: transport.Connection) -> None:
            self.served += 1
            conn.send(conn.recv(timeout=WAIT))

        self.listener = transport.Listener("127.0.0.1", 0, creds=security.SharedKey(KEY), handler=handler, name="limits",
                                           on_reject=lambda peer, exc: self.rejects.put((peer, exc)), **kw).start()
        self.port = self.listener.port
        self.socks: list[socket.socket] = []

    def open(self, source: str = "127.0.0.1", hello: bytes = b"F") -> socket.socket:
        """A stranger: connects from ``source`` and sends ``hello`` (part of a hello)."""
        s = socket.create_connection(("127.0.0.1", self.port), timeout=WAIT, source_address=(source, 0))
        self.socks.append(s)
        if hello:
            s.sendall(hello)
        return s

    def echo(self, source: str = "127.0.0.1") -> None:
        """An authenticated peer from ``source`` is served."""
        s = self.open(source, hello=b"")
        stream, _ = security.SharedKey(KEY).client(SocketStream(s), expect=None, peer="limits", timeout=WAIT)
        conn = transport.Connection(stream, peer="limits")
        conn.send(m.EdgeHello(edge="e1"))
        assert conn.recv(timeout=WAIT) == m.EdgeHello(edge="e1")
        conn.close()

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.listener.close()


@pytest.fixture
def server(request):
    srv = Server(**getattr(request, "param", {}), handshake_timeout=HANDSHAKE_S)
    yield srv
    srv.close()


def conn_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "limits-conn")


def test_the_65th_handshaking_connection_is_refused_at_once(server):
    sources = [f"127.0.0.{i}" for i in range(2, 10)]       # 8 addresses x 8 = the 64 slots
    for src in sources:
        for _ in range(limits.MAX_HANDSHAKES_PER_SOURCE):
            server.open(src)
    assert wait_for(lambda: server.listener.slots.held == limits.MAX_HANDSHAKES), server.listener.slots.held
    assert server.rejects.empty() and server.listener.refused == 0
    t0 = time.monotonic()
    over = server.open("127.0.0.10")
    assert is_closed_by_peer(over, WAIT)
    assert time.monotonic() - t0 < 2.0  # at once, not at the 30 s handshake deadline
    peer, exc = server.rejects.get(timeout=WAIT)
    assert isinstance(exc, limits.OverLimit) and "too many unauthenticated" in str(exc), exc
    assert peer.startswith("127.0.0.10:") and server.listener.refused == 1
    # a peer with the key is refused too while the slots are full ...
    with pytest.raises((ConnectionError, OSError, ConnectionClosed)):
        server.echo("127.0.0.11")
    # ... and served once a stranger gives its slot up
    server.socks[0].close()
    assert wait_for(lambda: server.listener.slots.held < limits.MAX_HANDSHAKES)
    server.echo("127.0.0.11")
    assert server.served == 1


def test_one_source_gets_8_slots_and_another_source_is_still_served(server):
    for _ in range(limits.MAX_HANDSHAKES_PER_SOURCE):
        server.open("127.0.0.1")
    assert wait_for(lambda: server.listener.slots.held_by("127.0.0.1") == limits.MAX_HANDSHAKES_PER_SOURCE)
    ninth = server.open("127.0.0.1")
    assert is_closed_by_peer(ninth, 2.0)
    _, exc = server.rejects.get(timeout=WAIT)
    assert "from 127.0.0.1" in str(exc)
    server.echo("127.0.0.2")  # another address: served, handshake and all
    assert server.served == 1
    assert server.listener.slots.held == limits.MAX_HANDSHAKES_PER_SOURCE  # the echo's slot was given back


def test_a_flood_over_the_caps_costs_no_thread_per_connection(server):
    before = conn_threads()
    for i in range(300):
        server.open(f"127.0.1.{i % 50 + 1}")
    assert wait_for(lambda: server.listener.refused + server.listener.slots.held == 300), \
        (server.listener.refused, server.listener.slots.held)
    assert server.listener.slots.held == limits.MAX_HANDSHAKES and server.listener.refused == 300 - 64
    assert conn_threads() - before <= limits.MAX_HANDSHAKES


@pytest.mark.parametrize("server", [{"max_handshakes": 3, "max_handshakes_per_source": 2}], indirect=True)
def test_caps_are_keyword_parameters(server):
    a = [server.open("127.0.0.1") for _ in range(2)]
    assert wait_for(lambda: server.listener.slots.held == 2)
    assert is_closed_by_peer(server.open("127.0.0.1"), 2.0)   # 3rd from one address
    server.open("127.0.0.2")
    assert wait_for(lambda: server.listener.slots.held == 3)
    assert is_closed_by_peer(server.open("127.0.0.3"), 2.0)   # 4th in all
    assert server.listener.refused == 2
    for s in a:
        s.close()


def test_slots_are_given_back_when_handshakes_end():
    srv = Server(handshake_timeout=0.5)
    try:
        for _ in range(8):
            srv.open("127.0.0.1")                        # silent: cut at the deadline
        for _ in range(8):
            srv.open("127.0.0.2", hello=b"GET / HTTP/1.1\r\n" + bytes(40))  # garbage: refused at once
        assert wait_for(lambda: srv.listener.slots.held == 0 and srv.rejects.qsize() == 16, 5.0), \
            (srv.listener.slots.held, srv.rejects.qsize())
        assert srv.listener.refused == 0  # refused by their handshakes, not by the caps
        srv.echo("127.0.0.1")
        assert srv.listener.slots.held == 0
    finally:
        srv.close()


def test_the_whole_handshake_has_one_deadline():
    """A stranger sending a byte every 0.1 s never waits out a per-read timeout: it is cut
    at the deadline of the whole handshake."""
    srv = Server(handshake_timeout=0.5)
    try:
        s = srv.open("127.0.0.1", hello=b"F")
        t0 = time.monotonic()
        cut = None
        for b in auth.HELLO_MAGIC[1:] + bytes(30):
            time.sleep(0.1)
            try:
                s.send(bytes([b]))
            except OSError:
                cut = time.monotonic() - t0
                break
        assert cut is not None, "a byte every 0.1 s kept the handshake open for 3.5 s"
        assert cut < 1.5
        _, exc = srv.rejects.get(timeout=WAIT)
        assert isinstance(exc, ConnectionClosed)
    finally:
        srv.close()


def _fill_descriptors(spare: int) -> tuple[list[socket.socket], tuple[int, int]]:
    """Lower this process's open-file limit to what is open now plus ``spare`` and use
    them all; returns (the sockets holding them, the old limit)."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + spare + 16, old[1]))
    held = []
    try:
        while True:
            held.append(socket.socket())
    except OSError:
        pass
    return held, old


def test_accept_out_of_descriptors_backs_off_and_goes_on():
    srv = Server(handshake_timeout=5.0)
    client = socket.socket()
    client.settimeout(WAIT)
    held, old = _fill_descriptors(0)
    try:
        client.connect(("127.0.0.1", srv.port))  # no new descriptor here; the accept needs one
        assert wait_for(lambda: srv.listener.accept_errors >= 1, 5.0)
        time.sleep(0.8)
        errors = srv.listener.accept_errors
        # 10, 20, 40 ... ms, at most 1 s apart: a handful, not a spin of thousands
        assert 3 <= errors <= 12, errors
        assert srv.listener._thread.is_alive()
    finally:
        for s in held:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, old)
    try:
        # accepted as soon as a descriptor is free (within the 1 s cap)
        stream, _ = security.SharedKey(KEY).client(SocketStream(client), expect=None, peer="limits", timeout=WAIT)
        conn = transport.Connection(stream, peer="limits")
        conn.send(m.StatusRequest())
        assert isinstance(conn.recv(timeout=WAIT), m.StatusRequest)
        conn.close()
    finally:
        srv.close()


# --------------------------------------------------------------------------------------
# quiet refusals
# --------------------------------------------------------------------------------------

def test_reporter_lets_a_burst_through_then_says_the_count_once():
    lines: list[tuple[str, dict]] = []
    rep = limits.RateLimitedReporter(lambda what, f: lines.append((what, f)), burst=5, interval=0.3)
    for i in range(1000):
        rep(f"10.0.0.1:{i}", ConnectionClosed("closed during the handshake"))
    assert [w for w, _ in lines] == ["refused"] * 5
    assert wait_for(lambda: len(lines) == 6, 3.0), lines
    assert lines[5] == ("refused_suppressed", {"suppressed": 995, "interval_s": 0.3})
    assert rep.total == 1000 and rep.reported == 5
    rep("10.0.0.1:1", "again")  # a new interval: in full again
    assert lines[-1][0] == "refused" and lines[-1][1]["detail"] == "again"


def test_reporter_never_raises_and_flushes_at_close():
    def broken(what, f):
        raise OSError(28, "No space left on device")

    rep = limits.RateLimitedReporter(broken, burst=1, interval=60)
    for _ in range(10):
        rep("p", "x")
    got = []
    rep._report = lambda what, f: got.append((what, f))
    rep.flush()
    assert got == [("refused_suppressed", {"suppressed": 9, "interval_s": 60})]


def test_printable_prefix_escapes_and_cuts():
    assert limits.printable_prefix(b"GET / HTTP/1.1\r\n") == "GET / HTTP/1.1\\r\\n"
    assert limits.printable_prefix("a\x00\u2028\x1b[31m\\") == "a\\x00\\u2028\\x1b[31m\\"
    long = limits.printable_prefix(bytes(range(256)) * 10)
    assert len(long) <= limits.ECHO_CHARS + 3 and long.endswith("...")
    assert all(" " <= c <= "~" for c in long)
    assert limits.printable_prefix("x" * 64) == "x" * 64


def test_refusal_reporter_writes_a_few_lines_under_a_flood(tmp_path):
    ev = events.EventLog(process="edge1", role="edge")
    ev.open(str(tmp_path))
    rep = limits.refusal_reporter(events=ev)
    for i in range(5000):
        rep(f"127.0.0.2:{i}", ConnectionClosed("peer said " + "\x00\xff" * 500))
    rep.flush()
    ev.close()
    lines = [json.loads(x) for x in open(ev.path)]
    assert [x["event"] for x in lines] == ["refused"] * 5 + ["refused_suppressed"]
    assert lines[-1]["suppressed"] == 4995
    assert all(len(x["detail"]) <= limits.ECHO_CHARS + 3 for x in lines[:5])
    assert os.path.getsize(ev.path) < 4096


# --------------------------------------------------------------------------------------
# the event log never kills its process
# --------------------------------------------------------------------------------------

def test_event_log_out_of_descriptors_keeps_lines_and_writes_them_later(tmp_path, monkeypatch):
    monkeypatch.setattr(events, "REOPEN_S", 0.2)
    ev = events.EventLog(process="edge1", role="edge")
    ev.emit("shutdown", reason="before")
    held, old = _fill_descriptors(0)
    try:
        ev.open(str(tmp_path))         # cannot open: no raise
        ev.emit("shutdown", reason="during")  # psutil cannot read /proc either: no raise
        assert ev.path is None
    finally:
        for s in held:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, old)
    time.sleep(events.REOPEN_S + 0.1)
    ev.emit("shutdown", reason="after")
    ev.close()
    got = [json.loads(x) for x in open(ev.path)]
    assert [x["reason"] for x in got] == ["before", "during", "after"]
    assert got[1]["rss_mb"] is None and got[2]["rss_mb"] is not None
    assert ev.dropped == 0


def test_event_log_write_failure_is_counted_and_said_later(tmp_path):
    ev = events.EventLog(process="edge1", role="edge")
    ev.open(str(tmp_path))
    path = ev.path
    ev._file.close()
    ev._file = open("/dev/full", "w", encoding="utf-8")  # every write: ENOSPC
    for i in range(3):
        ev.emit("shutdown", reason=f"lost {i}")
    assert ev.dropped == 3
    ev._file = open(path, "a", encoding="utf-8")
    ev.emit("shutdown", reason="kept")
    ev.close()
    got = [json.loads(x) for x in open(path)]
    assert [x["event"] for x in got] == ["events_dropped", "shutdown"] and got[1]["reason"] == "kept"
    assert got[0]["count"] == 3


def test_event_log_holds_at_most_max_pending_lines_before_open(monkeypatch):
    monkeypatch.setattr(events, "MAX_PENDING", 10)
    ev = events.EventLog(process="edge1", role="edge")
    for _ in range(25):
        ev.emit("shutdown", reason="early")
    assert len(ev._pending) == 10 and ev.dropped == 15


# --------------------------------------------------------------------------------------
# the experiment: ~1,100 slow strangers against an edge limited to 1,024 files
# --------------------------------------------------------------------------------------

FLOOD = 1100                 # slow connections held open (reopened when the edge closes them)
FLOOD_SOURCE = "127.0.0.2"   # a stranger on another host: the testbed's own peers are on 127.0.0.1
DRIP_S = 2.0                 # each open connection sends one more byte this often
NOFILE = 1024                # the usual default open-file limit


class Flood:
    """``FLOOD`` unauthenticated connections from ``FLOOD_SOURCE`` (opened without waiting
    for each), each sending a byte now and then; every pass, those the edge closed are
    opened again. Runs on a
    thread of this process until ``stop``; ``stop`` closes every socket."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.socks: list[socket.socket] = []
        self.opened = 0
        self.closed_by_edge = 0
        self.connect_failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flood", daemon=True)

    def _open(self) -> socket.socket | None:
        """A connection started without waiting for it (as fast as an attacker would)."""
        s = socket.socket()
        try:
            s.setblocking(False)
            s.bind((FLOOD_SOURCE, 0))
            if s.connect_ex(("127.0.0.1", self.port)) not in (0, errno.EINPROGRESS):
                raise OSError("connect failed")
        except OSError:
            s.close()
            self.connect_failures += 1
            return None
        self.opened += 1
        return s

    def start(self) -> "Flood":
        t0 = time.monotonic()
        for _ in range(FLOOD):
            s = self._open()
            if s is not None:
                self.socks.append(s)
        for s in self.socks:  # the first byte of a hello, to those connected by now
            try:
                s.send(b"F")
            except OSError:
                pass
        self.start_s = time.monotonic() - t0
        self._thread.start()
        return self

    @staticmethod
    def _drip(s: socket.socket) -> bool:
        """One more byte; False if the edge has closed ``s`` (or never took it)."""
        try:
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                return False
            if s.recv(4096) == b"":
                return False
        except BlockingIOError:
            pass
        except OSError:
            return False
        try:
            s.send(b"\x00")
        except BlockingIOError:
            pass
        except OSError:
            return False
        return True

    def _run(self) -> None:
        while not self._stop.wait(DRIP_S):
            alive = []
            for s in self.socks:
                if self._drip(s):
                    alive.append(s)
                else:
                    s.close()
                    self.closed_by_edge += 1
            while len(alive) < FLOOD and not self._stop.is_set():
                s = self._open()
                if s is None:
                    break
                alive.append(s)
            self.socks = alive

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        for s in self.socks:
            s.close()
        self.socks = []


def _start_limited(bed, name: str):
    """``bed.start("edge", name)`` under ``prlimit --nofile=NOFILE:NOFILE`` (prlimit sets
    the limit and execs: the PID is the edge's)."""
    import subprocess
    import sys

    from tests.testbed import ROOT, _env
    cmd = ["prlimit", f"--nofile={NOFILE}:{NOFILE}", sys.executable, "-m", "edge", "--config", str(bed.config),
           "--name", name]
    with open(bed.log_dir / f"{name}.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    bed.procs[name] = proc
    return proc


def _nofile_limit(pid: int) -> int:
    for line in open(f"/proc/{pid}/limits"):
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-file limit in /proc")


@pytest.mark.process
@pytest.mark.timeout(180)
def test_1100_slow_strangers_do_not_stop_an_edge_limited_to_1024_files(tmp_path):
    import shutil

    import psutil

    from tests.testbed import Testbed, write_config
    if shutil.which("prlimit") is None:
        pytest.skip("needs prlimit (util-linux)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FLOOD + 2 * limits.MAX_HANDSHAKES + 256
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"this process may open at most {hard} files; the flood needs {want}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else want, hard))
    try:
        socket.socket().bind((FLOOD_SOURCE, 0))
    except OSError as exc:
        pytest.skip(f"cannot use {FLOOD_SOURCE} as a source address: {exc}")

    cfg = write_config(tmp_path, edges=1, devices=2, rounds=2, samples_per_device=100, batch_size=50,
                       extra={"run": {"name": "flood"}})
    from common.config import load_config
    port = load_config(str(cfg)).edges["edge1"].port
    bed = Testbed(cfg, log_dir=tmp_path / "logs")
    flood = None
    peak_fds = 0
    t0 = time.monotonic()
    try:
        bed.start("central")
        edge = _start_limited(bed, "edge1")
        deadline = time.monotonic() + 60
        while True:  # the edge listens (after importing torch)
            assert edge.poll() is None, bed.log("edge1")[-3000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "edge1 never listened"
                time.sleep(0.2)
        assert _nofile_limit(edge.pid) == NOFILE
        flood = Flood(port).start()
        assert flood.opened >= FLOOD * 0.9, (flood.opened, flood.connect_failures)
        for d in ("device1", "device2"):  # they attach under the flood
            bed.start("device", d)
        central = bed.procs["central"]
        while central.poll() is None:
            assert edge.poll() is None, f"edge1 died under the flood (peak {peak_fds} descriptors):\n" \
                                        f"{bed.log('edge1')[-3000:]}"
            try:
                peak_fds = max(peak_fds, psutil.Process(edge.pid).num_fds())
            except psutil.NoSuchProcess:
                pass
            assert time.monotonic() - t0 < 150, "the run did not finish"
            time.sleep(0.2)
        flood_s = time.monotonic() - t0
        flood.stop()
        assert central.returncode == 0, bed.log("central")[-3000:]
        assert bed.wait("edge1", 30) == 0, bed.log("edge1")[-3000:]
    finally:
        if flood is not None:
            flood.stop()
        bed.stop()

    run = tmp_path / "runs" / "flood"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert all(r["devices"] == ["device1", "device2"] and not r["dropped"] for r in summary["rounds"])
    log = (run / "events-edge1.jsonl").read_text()
    lines = [json.loads(x) for x in log.splitlines()]
    refused = [x for x in lines if x["event"] == "refused"]
    said = sum(x["suppressed"] for x in lines if x["event"] == "refused_suppressed")
    # one line per refusal would be thousands; rate-limited it is 5 per 10 s and a count
    print(f"\nflood: {flood_s:.1f} s, {flood.opened} connections opened from {FLOOD_SOURCE} (first {FLOOD} in "
          f"{flood.start_s:.1f} s), {flood.closed_by_edge} seen closed here, {len(refused)} refusals logged "
          f"+ {said} counted, edge event log {len(log)} bytes, edge peak descriptors {peak_fds}")
    assert len(refused) <= limits.REPORT_BURST * (flood_s / limits.REPORT_INTERVAL_S + 2), len(refused)
    # the refusals are all counted (at least the first wave's: all but those in a slot or the
    # listen backlog; some of the later connects are still in SYN retries when the run ends)
    assert len(refused) + said >= FLOOD - limits.MAX_HANDSHAKES - 128, (len(refused), said, flood.opened)
    assert len(log) < 64 << 10, len(log)
    assert len(bed.log("edge1")) < 64 << 10
    assert peak_fds < NOFILE - 100, peak_fds

"""common/resolver.py: names are looked up before they are dialled, and a dial does not
wait for the name server (a lost DNS query costs glibc 5 s: more than a move may take)."""

from __future__ import annotations

import socket
import threading

import pytest

from common import resolver, transport
from common.resolver import Resolver
from common.errors import TransportError
from common.security import SharedKey
from common.transport import Listener

LOOPBACK = "127.0.0.1"


class FakeNames:
    """A name server for tests: answers ``name`` with loopback ``port``; ``fail`` lookups
    fail first; ``gate`` (if set) holds every lookup until it is set."""

    def __init__(self, *, fail: int = 0, gate: threading.Event | None = None) -> None:
        self.asked: list[str] = []
        self.fail = fail
        self.gate = gate
        self.port_for: dict[str, int] = {}

    def __call__(self, host: str, port: int):
        self.asked.append(host)
        if self.gate is not None:
            assert self.gate.wait(10), "the test never let the lookup go on"
        if self.fail > 0:
            self.fail -= 1
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (LOOPBACK, self.port_for.get(host, port)))]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def server():
    """A plain TCP listener on loopback that accepts and holds connections."""
    s = socket.create_server((LOOPBACK, 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        s.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(s.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield s.getsockname()[1]
    stop.set()
    t.join(5)
    s.close()
    for c in held:
        c.close()


def test_a_name_is_looked_up_once_and_then_served_from_the_cache(server):
    names = FakeNames()
    r = Resolver(lookup=names)
    for _ in range(3):
        r.connect("edge2", server, timeout=5).close()
    assert names.asked == ["edge2"] and r.lookups == 1


def test_warm_resolves_before_the_first_dial_so_the_dial_asks_nobody(server):
    names = FakeNames(fail=2)  # the name server loses the first two queries
    r = Resolver(lookup=names)
    t = r.warm([("edge1", server), ("edge2", server), ("edge1", server)])
    t.join(10)
    assert not t.is_alive()
    assert sorted(set(names.asked)) == ["edge1", "edge2"] and len(names.asked) == 4  # 2 lost, 2 answered
    # a slow name server from now on: a dial must not wait for it
    names.gate = threading.Event()
    r.connect("edge2", server, timeout=5).close()
    assert len(names.asked) == 4
    names.gate.set()


def test_warm_gives_up_on_a_name_that_never_resolves_and_the_dial_then_says_why():
    names = FakeNames(fail=10**6)
    r = Resolver(lookup=names)
    t = r.warm([("nowhere", 1)], within_s=0.3)
    t.join(10)
    assert not t.is_alive() and len(names.asked) >= 2
    with pytest.raises(socket.gaierror):
        r.connect("nowhere", 1, timeout=1)


def test_an_old_answer_is_used_while_a_fresh_one_is_fetched(server):
    names = FakeNames()
    clock = Clock()
    r = Resolver(lookup=names, clock=clock, ttl_s=60)
    r.connect("edge1", server, timeout=5).close()
    clock.t += 61
    names.gate = threading.Event()  # the refresh hangs: the dial must not
    r.connect("edge1", server, timeout=5).close()
    names.gate.set()
    for _ in range(100):
        if r.lookups == 2:
            break
        threading.Event().wait(0.05)
    assert names.asked == ["edge1", "edge1"] and r.lookups == 2


def test_an_address_that_refuses_is_forgotten_and_the_name_looked_up_again(server):
    dead = socket.create_server((LOOPBACK, 0))
    dead_port = dead.getsockname()[1]
    dead.close()  # nobody listens there now
    names = FakeNames()
    names.port_for["edge1"] = dead_port  # the host moved: the old answer leads nowhere
    r = Resolver(lookup=names)
    with pytest.raises(ConnectionRefusedError):
        r.connect("edge1", 9, timeout=5)
    assert not r.cached("edge1", 9)
    names.port_for["edge1"] = server  # the name server knows the new place
    r.connect("edge1", 9, timeout=5).close()
    assert names.asked == ["edge1", "edge1"]


def test_transport_connect_dials_through_the_process_resolver():
    key = SharedKey(b"k" * 32)

    def hold(conn):
        try:
            conn.recv(timeout=5)
        except TransportError:
            pass  # the client closed: the end of this test

    listener = Listener(LOOPBACK, 0, creds=key, handler=hold).start()
    port = listener.port
    try:
        resolver.RESOLVER.forget("localhost", port)
        conn = transport.connect("localhost", port, creds=key, peer="test", timeout=5)
        conn.close()
        assert resolver.RESOLVER.cached("localhost", port)
    finally:
        resolver.RESOLVER.forget("localhost", port)
        listener.close()

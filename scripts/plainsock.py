"""The plain-socket yardstick: how long loopback TCP takes to move N bytes, with nothing
of the testbed in the way (no framing, no handshake, no checksum).

``measure(nbytes, repeats)`` starts a sink in another process (``python -m
scripts.plainsock PORT``), then, ``repeats`` times each:

* transfer: on one open connection, ``sendall`` N bytes; the sink ``recv_into``s all of
  them into a preallocated buffer and answers one byte; the time is send start to answer;
* connect + transfer: the same on a fresh connection each time (what a migration must do:
  the destination edge opens a connection to the source).

Both sides set TCP_NODELAY, as the testbed's transport does.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from scripts import benchlib

HEADER = 8  # the sink learns each transfer's size from an 8-byte prefix


def _sink(port: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((benchlib.LOOPBACK, port))
    srv.listen(8)
    print("ready", flush=True)
    buf = bytearray(1 << 20)
    while True:
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while True:
                head = _recv_exact(conn, HEADER)
                if head is None:
                    break
                n = int.from_bytes(head, "big")
                if n == 0:
                    return  # told to stop
                if len(buf) < n:
                    buf = bytearray(n)
                view, got = memoryview(buf), 0
                while got < n:
                    k = conn.recv_into(view[got:n])
                    if k == 0:
                        return
                    got += k
                conn.sendall(b"\x01")


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _connect(port: int) -> socket.socket:
    s = socket.create_connection((benchlib.LOOPBACK, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _transfer(s: socket.socket, payload: memoryview) -> None:
    s.sendall(len(payload).to_bytes(HEADER, "big"))
    s.sendall(payload)
    if s.recv(1) != b"\x01":
        raise RuntimeError("plain-socket sink did not answer")


def measure(nbytes: int, repeats: int) -> dict[str, dict[str, float]]:
    """Milliseconds to move ``nbytes`` over loopback: ``transfer`` and ``connect_transfer``
    (each ``benchlib.summarize``d over ``repeats``)."""
    port = benchlib.free_ports(1)[0]
    proc = subprocess.Popen([sys.executable, "-m", "scripts.plainsock", str(port)], cwd=benchlib.ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        if proc.stdout is None or proc.stdout.readline().strip() != "ready":
            raise RuntimeError("plain-socket sink did not start")
        payload = memoryview(bytearray(nbytes))
        transfer, fresh = [], []
        with _connect(port) as s:
            _transfer(s, payload)  # warm-up: the sink's buffer, the socket's windows
            for _ in range(repeats):
                t0 = time.perf_counter()
                _transfer(s, payload)
                transfer.append((time.perf_counter() - t0) * 1000)
        for _ in range(repeats):
            t0 = time.perf_counter()
            with _connect(port) as s:
                _transfer(s, payload)
            fresh.append((time.perf_counter() - t0) * 1000)
        with _connect(port) as s:
            s.sendall((0).to_bytes(HEADER, "big"))
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return {"transfer": benchlib.summarize(transfer), "connect_transfer": benchlib.summarize(fresh)}


if __name__ == "__main__":
    _sink(int(sys.argv[1]))

"""The plain-socket yardstick of the migration benchmark: how long loopback TCP takes to
move N bytes, with nothing of the testbed in the way (no framing, no handshake, no
checksum).

    python -m scripts.bench_plainsock [--bytes N] [--repeats N]

``measure(nbytes, repeats)`` starts a sink in another process (``python -m
scripts.bench_plainsock --sink PORT``), then, ``repeats`` times each:

* transfer: on one open connection, ``sendall`` N bytes; the sink ``recv_into``s all of
  them into a preallocated buffer and answers one byte; the time is send start to answer;
* connect + transfer: the same on a fresh connection each time (what a migration must do:
  the destination edge opens a connection to the source).

Both sides set TCP_NODELAY, as the testbed's transport does.
"""

from __future__ import annotations

import argparse
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
    cmd = [sys.executable, "-m", "scripts.bench_plainsock", "--sink", str(port)]
    proc = subprocess.Popen(cmd, cwd=benchlib.ROOT, stdout=subprocess.PIPE, text=True)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts.bench_plainsock", description=__doc__.splitlines()[0])
    p.add_argument("--bytes", type=int, default=4_508_886, help="bytes per transfer (default: a VGG-5 session)")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--sink", type=int, default=None, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.sink is not None:
        _sink(args.sink)
        return 0
    figures = measure(args.bytes, args.repeats)
    rows = [[name, s["count"], s["median"], s["p95"], s["min"], s["max"]] for name, s in figures.items()]
    print(f"plain socket on loopback, {args.bytes:,} bytes per transfer")
    print(benchlib.table(["ms", "n", "median", "p95", "min", "max"], rows, floatfmt=".3f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

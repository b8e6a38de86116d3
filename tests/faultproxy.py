"""A TCP proxy that breaks a connection at an exact byte: the fault-injection harness.

    python -m tests.faultproxy --listen PORT --to HOST:PORT [--rule RULE]... [--lifetime S]

It forwards every connection made to 127.0.0.1:PORT to HOST:PORT, byte for byte, and
follows the testbed's framing as it goes in the shared-key mode (the handshake's fixed
lengths, then each record's length, data and tag, and inside the records each frame's
prefix and msgpack header), so a rule can name a message:

    RULE = DIR:TYPE:N:AT:ACTION[:HOLD]
      DIR     up (client -> server) or down (server -> client)
      TYPE    a message type (Activations, Gradients, DeviceDone, AttachReply, ...) or *
      N       the N-th such frame in that direction over the proxy's life (1 = the first)
      AT      where in that frame to break: a byte count from its first byte, or a
              percentage of its length ("50%"); bytes before it are delivered
      ACTION  reset (both sides get a reset), close (both get an end of stream), or
              blackhole (nothing more goes either way; the sockets stay open: a silent
              peer), for HOLD seconds (default: until the proxy ends), then reset
    Each rule fires once. Connections made after it pass untouched.

``--delay-ms D`` holds every byte D ms in each direction before passing it on (a radio's
latency: the round trip grows by 2 D; the order and the bytes are kept); ``--rate-mbit R``
passes at most R Mbit/s each way (a link's bandwidth).

A cut inside a record delivers none of that record (its tag never arrives). ``--flip
DIR:BYTE`` alters one byte instead (an active attacker without the key), ``--capture``
keeps what passed (a passive listener), ``--opaque`` forwards TLS without parsing.

Every cut is printed as a JSON line on stdout ({"event": "cut", ...}). The proxy ends by
itself after ``--lifetime`` seconds (default 600); tests stop it by its PID anyway.
"""

from __future__ import annotations

import argparse
import json
import queue
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

import msgpack

PREFIX = struct.Struct("!2sBxIQ")
# the shared-key mode's records (common.security.MacStream): length, data, tag
RECORD_HEAD = struct.Struct("!I")
TAG_BYTES = 16
CLIENT_HANDSHAKE = 40 + 32   # hello (magic + nonce), then the client's MAC
SERVER_HANDSHAKE = 64 + 1    # nonce + MAC, then the accept byte
_print_lock = threading.Lock()
T0 = time.monotonic()


def say(**fields) -> None:
    with _print_lock:
        print(json.dumps({"t": round(time.monotonic() - T0, 4), **fields}), flush=True)


@dataclass
class Rule:
    direction: str
    type: str
    n: int
    at: str
    action: str
    hold: float | None
    seen: int = 0
    fired: bool = False

    @classmethod
    def parse(cls, text: str) -> "Rule":
        parts = text.split(":")
        if len(parts) not in (5, 6) or parts[0] not in ("up", "down") or parts[4] not in ("reset", "close", "blackhole"):
            raise SystemExit(f"bad rule {text!r}: want DIR:TYPE:N:AT:ACTION[:HOLD]")
        return cls(parts[0], parts[1], int(parts[2]), parts[3], parts[4], float(parts[5]) if len(parts) == 6 else None)

    def cut_at(self, frame_len: int) -> int:
        if self.at.endswith("%"):
            return min(frame_len - 1, max(0, frame_len * int(self.at[:-1]) // 100))
        return min(frame_len - 1, int(self.at))


class Pair:
    """One proxied connection: client socket, server socket, and what befell them."""

    def __init__(self, cid: int, client: socket.socket, server: socket.socket) -> None:
        self.cid, self.client, self.server = cid, client, server
        self.silent = False
        self.done = False
        self.lock = threading.Lock()

    def reset(self) -> None:
        with self.lock:
            if self.done:
                return
            self.done = True
        for s in (self.client, self.server):
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        with self.lock:
            if self.done:
                return
            self.done = True
        for s in (self.client, self.server):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


@dataclass
class Flip:
    direction: str
    at: int
    fired: bool = False

    @classmethod
    def parse(cls, text: str) -> "Flip":
        parts = text.split(":")
        if len(parts) != 2 or parts[0] not in ("up", "down") or not parts[1].isdigit():
            raise SystemExit(f"bad flip {text!r}: want DIR:BYTE")
        return cls(parts[0], int(parts[1]))


class Delayed:
    """A socket's ``sendall`` that passes data on ``delay_s`` after it was handed over, in
    order, from its own thread, at most ``rate`` bytes/s (0: no limit); ``end`` passes on
    the end the same way."""

    def __init__(self, sock: socket.socket, delay_s: float, on_end: Callable[[], None], rate: float = 0.0) -> None:
        self.sock, self.delay_s, self.on_end, self.rate = sock, delay_s, on_end, rate
        self.free_at = 0.0  # when the link has passed what it was given
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, daemon=True).start()

    def sendall(self, data: bytes | bytearray) -> None:
        self.q.put((time.monotonic() + self.delay_s, bytes(data)))

    def end(self) -> None:
        self.q.put((time.monotonic() + self.delay_s, None))

    def _run(self) -> None:
        while True:
            due, data = self.q.get()
            if self.rate > 0:
                # the bytes leave the far end once the link has carried them
                start = max(due - self.delay_s, self.free_at)
                self.free_at = start + (len(data) if data else 0) / self.rate
                due = self.free_at + self.delay_s
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if data is None:
                self.on_end()
                return
            try:
                self.sock.sendall(data)
            except OSError:
                self.on_end()
                return


class Proxy:
    def __init__(self, listen: int, target: tuple[str, int], rules: list[Rule], *, flips: list[Flip] = (),
                 capture=None, opaque: bool = False, delay_s: float = 0.0, rate: float = 0.0) -> None:
        self.delay_s, self.rate = delay_s, rate
        self.target = target
        self.rules = rules
        self.flips = list(flips)
        self.capture = capture
        self.opaque = opaque
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", listen))
        self.count = 0

    def serve(self) -> None:
        while True:
            client, _ = self.sock.accept()
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError as exc:
                say(event="upstream_refused", detail=str(exc))
                client.close()
                continue
            server.settimeout(None)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.count += 1
            pair = Pair(self.count, client, server)
            say(event="connected", conn=pair.cid)
            threading.Thread(target=self.pump, args=(pair, "up"), daemon=True).start()
            threading.Thread(target=self.pump, args=(pair, "down"), daemon=True).start()

    def match(self, direction: str, type_: str, frame_len: int) -> tuple[Rule, int] | None:
        with self.lock:
            for rule in self.rules:
                if rule.fired or rule.direction != direction or rule.type not in ("*", type_):
                    continue
                rule.seen += 1
                if rule.seen == rule.n:
                    rule.fired = True
                    return rule, rule.cut_at(frame_len)
        return None

    def act(self, pair: Pair, rule: Rule, direction: str, type_: str, at: int) -> None:
        say(event="cut", conn=pair.cid, dir=direction, type=type_, n=rule.n, at=at, action=rule.action)
        if rule.action == "reset":
            pair.reset()
        elif rule.action == "close":
            pair.close()
        else:
            pair.silent = True
            if rule.hold is not None:
                def later() -> None:
                    time.sleep(rule.hold)
                    say(event="hold_over", conn=pair.cid)
                    pair.reset()
                threading.Thread(target=later, daemon=True).start()

    def pump(self, pair: Pair, direction: str) -> None:
        src, dst = (pair.client, pair.server) if direction == "up" else (pair.server, pair.client)
        if self.delay_s > 0 or self.rate > 0:
            dst = Delayed(dst, self.delay_s, pair.close, self.rate)
        handshake = CLIENT_HANDSHAKE if direction == "up" else SERVER_HANDSHAKE
        frames = FrameTracker(self, direction)
        rec_head = bytearray()    # the record's length prefix being read
        rec_left = 0              # data bytes of the current record not yet forwarded
        tag_left = 0              # tag bytes of the current record not yet forwarded
        offset = 0                # bytes of this direction seen so far (for flips)
        try:
            while True:
                data = bytearray(src.recv(1 << 16))
                if not data:
                    break
                if self.capture is not None:
                    with self.lock:
                        self.capture.write(bytes(data))
                        self.capture.flush()
                self.flip(pair, direction, data, offset)
                offset += len(data)
                if pair.silent:
                    continue
                out = bytearray()
                i = 0
                while i < len(data):
                    if handshake or self.opaque:
                        take = len(data) - i if self.opaque else min(handshake, len(data) - i)
                        out += data[i:i + take]
                        handshake -= 0 if self.opaque else take
                        i += take
                        continue
                    if rec_left == 0 and tag_left == 0:  # the record's length prefix
                        take = min(RECORD_HEAD.size - len(rec_head), len(data) - i)
                        rec_head += data[i:i + take]
                        out += data[i:i + take]
                        i += take
                        if len(rec_head) == RECORD_HEAD.size:
                            rec_left, tag_left = RECORD_HEAD.unpack(rec_head)[0], TAG_BYTES
                            rec_head = bytearray()
                        continue
                    if rec_left:
                        take = min(rec_left, len(data) - i)
                        found = frames.feed(data[i:i + take])
                        if found is not None:
                            rule, j, type_, at = found
                            out += data[i:i + j]
                            dst.sendall(out)
                            self.act(pair, rule, direction, type_, at)
                            return
                        out += data[i:i + take]
                        i += take
                        rec_left -= take
                        continue
                    take = min(tag_left, len(data) - i)
                    out += data[i:i + take]
                    i += take
                    tag_left -= take
                if out and not pair.silent:
                    dst.sendall(out)
        except OSError:
            pass
        finally:
            if isinstance(dst, Delayed):
                dst.end()  # what is still held goes first
            elif not pair.silent:
                pair.close()

    def flip(self, pair: Pair, direction: str, data: bytearray, offset: int) -> None:
        """Apply the ``--flip`` rules that fall in ``data`` (bytes ``offset`` on of this direction)."""
        for f in self.flips:
            if f.fired or f.direction != direction or not offset <= f.at < offset + len(data):
                continue
            with self.lock:
                if f.fired:
                    continue
                f.fired = True
            data[f.at - offset] ^= 0x01
            say(event="flip", conn=pair.cid, dir=direction, at=f.at)


class FrameTracker:
    """Follows the frames inside one direction's record data and says where a rule cuts."""

    def __init__(self, proxy: Proxy, direction: str) -> None:
        self.proxy, self.direction = proxy, direction
        self.head = bytearray()      # prefix + header of the frame being read
        self.need = PREFIX.size
        self.payload_left = 0        # payload bytes of the current frame not yet seen
        self.frame_pos = 0           # bytes of the current frame seen so far
        self.cut: tuple[Rule, int, str] | None = None

    def feed(self, data: bytes | bytearray) -> tuple[Rule, int, str, int] | None:
        """Take ``data``; returns (rule, index in ``data`` to cut before, type, offset in the frame) or None."""
        i = 0
        while i < len(data):
            if not self.payload_left:
                take = min(self.need - len(self.head), len(data) - i)
                self.head += data[i:i + take]
                i += take
                if len(self.head) < self.need:
                    continue
                if self.need == PREFIX.size:
                    self.need = PREFIX.size + PREFIX.unpack_from(self.head)[2]
                    if len(self.head) < self.need:
                        continue
                plen = PREFIX.unpack_from(self.head)[3]
                try:
                    type_ = msgpack.unpackb(bytes(self.head[PREFIX.size:]), raw=False).get("t", "?")
                except Exception:  # noqa: BLE001 - not our framing: just forward
                    type_ = "?"
                found = self.proxy.match(self.direction, type_, len(self.head) + plen)
                self.cut = None
                head_len = len(self.head)
                self.head, self.need = bytearray(), PREFIX.size
                if found is not None:
                    rule, at = found
                    if at < head_len:
                        return rule, max(0, i - (head_len - at)), type_, at
                    self.cut = (rule, at, type_)
                self.frame_pos, self.payload_left = head_len, plen
                continue
            take = min(self.payload_left, len(data) - i)
            if self.cut is not None and self.frame_pos + take > self.cut[1]:
                rule, at, type_ = self.cut
                return rule, i + at - self.frame_pos, type_, at
            i += take
            self.frame_pos += take
            self.payload_left -= take
            if self.payload_left == 0:
                self.cut = None
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", type=int, required=True)
    p.add_argument("--to", required=True, help="HOST:PORT")
    p.add_argument("--rule", action="append", default=[])
    p.add_argument("--flip", action="append", default=[], metavar="DIR:BYTE",
                   help="flip the lowest bit of byte BYTE (from 0) of direction DIR, once")
    p.add_argument("--capture", metavar="FILE", help="write every byte that passes, both ways, to FILE")
    p.add_argument("--opaque", action="store_true", help="TLS: do not follow records or frames (rules never fire)")
    p.add_argument("--delay-ms", type=float, default=0.0, help="hold every byte this long, each way")
    p.add_argument("--rate-mbit", type=float, default=0.0, help="pass at most this many Mbit/s each way")
    p.add_argument("--lifetime", type=float, default=600.0)
    args = p.parse_args(argv)
    host, port = args.to.rsplit(":", 1)
    capture = open(args.capture, "wb") if args.capture else None
    proxy = Proxy(args.listen, (host, int(port)), [Rule.parse(r) for r in args.rule],
                  flips=[Flip.parse(f) for f in args.flip], capture=capture, opaque=args.opaque,
                  delay_s=args.delay_ms / 1000, rate=args.rate_mbit * 1e6 / 8)
    threading.Thread(target=proxy.serve, daemon=True).start()
    say(event="listening", port=args.listen)
    time.sleep(args.lifetime)
    say(event="lifetime_over")
    return 0


if __name__ == "__main__":
    sys.exit(main())

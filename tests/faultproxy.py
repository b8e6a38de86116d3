"""A TCP proxy that breaks a connection at an exact byte: the fault-injection harness.

    python -m tests.faultproxy --listen PORT --to HOST:PORT [--rule RULE]... [--lifetime S]

It forwards every connection made to 127.0.0.1:PORT to HOST:PORT, byte for byte, and
follows the testbed's framing as it goes (the handshake's fixed lengths, then each
frame's prefix and msgpack header), so a rule can name a message:

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

Every cut is printed as a JSON line on stdout ({"event": "cut", ...}). The proxy ends by
itself after ``--lifetime`` seconds (default 600); tests stop it by its PID anyway.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass

import msgpack

PREFIX = struct.Struct("!2sBxIQ")
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


class Proxy:
    def __init__(self, listen: int, target: tuple[str, int], rules: list[Rule]) -> None:
        self.target = target
        self.rules = rules
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
        handshake = CLIENT_HANDSHAKE if direction == "up" else SERVER_HANDSHAKE
        head = bytearray()        # prefix + header of the frame being read
        need = PREFIX.size
        in_payload = False
        payload_left = 0          # payload bytes of the current frame not yet forwarded
        frame_pos = 0             # bytes of the current frame forwarded so far
        cut: tuple[Rule, int, str] | None = None
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if pair.silent:
                    continue
                out = bytearray()
                i = 0
                while i < len(data):
                    if handshake:
                        take = min(handshake, len(data) - i)
                        out += data[i:i + take]
                        handshake -= take
                        i += take
                        continue
                    if not in_payload:
                        take = min(need - len(head), len(data) - i)
                        head += data[i:i + take]
                        i += take
                        if len(head) < need:
                            continue
                        if need == PREFIX.size:
                            need = PREFIX.size + PREFIX.unpack_from(head)[2]
                            if len(head) < need:
                                continue
                        plen = PREFIX.unpack_from(head)[3]
                        try:
                            type_ = msgpack.unpackb(bytes(head[PREFIX.size:]), raw=False).get("t", "?")
                        except Exception:  # noqa: BLE001 - not our framing: just forward
                            type_ = "?"
                        found = self.match(direction, type_, len(head) + plen)
                        cut = None
                        if found is not None:
                            rule, at = found
                            if at < len(head):
                                out += head[:at]
                                dst.sendall(out)
                                self.act(pair, rule, direction, type_, at)
                                return
                            cut = (rule, at, type_)
                        out += head
                        frame_pos, payload_left = len(head), plen
                        head, need = bytearray(), PREFIX.size
                        in_payload = payload_left > 0
                        continue
                    take = min(payload_left, len(data) - i)
                    if cut is not None and frame_pos + take > cut[1]:
                        out += data[i:i + cut[1] - frame_pos]
                        dst.sendall(out)
                        self.act(pair, cut[0], direction, cut[2], cut[1])
                        return
                    out += data[i:i + take]
                    i += take
                    frame_pos += take
                    payload_left -= take
                    if payload_left == 0:
                        in_payload, cut = False, None
                if out and not pair.silent:
                    dst.sendall(out)
        except OSError:
            pass
        finally:
            if not pair.silent:
                pair.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", type=int, required=True)
    p.add_argument("--to", required=True, help="HOST:PORT")
    p.add_argument("--rule", action="append", default=[])
    p.add_argument("--lifetime", type=float, default=600.0)
    args = p.parse_args(argv)
    host, port = args.to.rsplit(":", 1)
    proxy = Proxy(args.listen, (host, int(port)), [Rule.parse(r) for r in args.rule])
    threading.Thread(target=proxy.serve, daemon=True).start()
    say(event="listening", port=args.listen)
    time.sleep(args.lifetime)
    say(event="lifetime_over")
    return 0


if __name__ == "__main__":
    sys.exit(main())

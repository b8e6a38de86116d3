"""A device written from docs/PROTOCOL.md alone drives a real testbed.

Everything on the wire below (frames, the shared-key handshake, MAC'd records, Poly1305,
attach proofs, message fields) is written here from the document, with socket, struct,
hmac, hashlib, msgpack and numpy only: none of ``device/``, ``common.transport``,
``common.codec``, ``common.messages`` or ``common.security``. Torch and
``common.models`` compute the device's part of the model (model code, not protocol).

The device attaches to edge1, trains some steps, says it is leaving, moves to edge2 at a
step boundary, reports the move, trains on; its link to edge2 breaks with a step in
flight and it resumes there, sending that step again; then it sends its update (which
edge2 takes only if every step was trained exactly once). The central's summary must then
hold the round with this device's samples and its move.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import socket
import struct
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

from tests.testbed import Testbed, write_config

pytestmark = [pytest.mark.process, pytest.mark.timeout(180)]

DEVICE = "device1"
SAMPLES = 40
BATCH = 10
MOVE_AT = 2  # the device leaves edge1 before step 2


# --------------------------------------------------------------------------------------
# PROTOCOL.md, "Frames"
# --------------------------------------------------------------------------------------

PREFIX = struct.Struct("!2sBxIQ")
ALIGN = 16
WIRE_DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "int64": np.int64,
               "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}


def encode_frame(type_: str, fields: dict, tensors: dict[str, dict[str, np.ndarray]] | None = None) -> bytes:
    descr, body = [], bytearray()
    for field, named in (tensors or {}).items():
        for key, arr in named.items():
            arr = np.asarray(arr)  # (not ascontiguousarray: it makes a 0-d tensor 1-d)
            body += bytes(-len(body) % ALIGN)
            descr.append([field, key, arr.dtype.name, list(arr.shape)])
            body += arr.tobytes()
    header = msgpack.packb({"t": type_, "f": fields, "x": descr}, use_bin_type=True)
    return PREFIX.pack(b"FF", 1, len(header), len(body)) + header + bytes(body)


def decode_frames(buf: bytearray) -> list[tuple[str, dict, dict[str, dict[str, np.ndarray]]]]:
    """Every whole frame at the start of ``buf`` (consumed from it)."""
    out = []
    while len(buf) >= PREFIX.size:
        magic, version, hlen, plen = PREFIX.unpack_from(buf)
        assert (magic, version) == (b"FF", 1), "not a testbed frame"
        if len(buf) < PREFIX.size + hlen + plen:
            break
        header = msgpack.unpackb(bytes(buf[PREFIX.size:PREFIX.size + hlen]), raw=False)
        payload = bytes(buf[PREFIX.size + hlen:PREFIX.size + hlen + plen])
        del buf[:PREFIX.size + hlen + plen]
        tensors: dict[str, dict[str, np.ndarray]] = {}
        offset = 0
        for field, key, dtype, shape in header["x"]:
            offset += -offset % ALIGN
            dt = np.dtype(WIRE_DTYPES[dtype])
            n = dt.itemsize * math.prod(shape)
            tensors.setdefault(field, {})[key] = np.frombuffer(payload, dt, math.prod(shape), offset).reshape(shape)
            offset += n
        assert offset == plen, "payload length does not match its tensors"
        out.append((header["t"], header["f"], tensors))
    return out


# --------------------------------------------------------------------------------------
# PROTOCOL.md, "Security: shared-key mode" (handshake, then MAC'd records)
# --------------------------------------------------------------------------------------

def poly1305(key: bytes, msg: bytes) -> bytes:
    """RFC 8439, section 2.5."""
    r = int.from_bytes(key[:16], "little") & 0x0ffffffc0ffffffc0ffffffc0fffffff
    s = int.from_bytes(key[16:], "little")
    p, acc = (1 << 130) - 5, 0
    for i in range(0, len(msg), 16):
        acc = (acc + int.from_bytes(msg[i:i + 16] + b"\x01", "little")) * r % p
    return ((acc + s) & ((1 << 128) - 1)).to_bytes(16, "little")


def record_tag(direction_key: bytes, seq: int, body: bytes) -> bytes:
    one_time = hmac.digest(direction_key, struct.pack("!Q", seq), "sha256")
    return poly1305(one_time, struct.pack("!I", len(body)) + body)


class KeyModeLink:
    """One connection to an edge: the handshake, then frames in MAC'd records."""

    def __init__(self, host: str, port: int, key: bytes, first: bytes) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        nonce_c = secrets.token_bytes(32)
        self.sock.sendall(b"FFAUTH1\x00" + nonce_c)
        challenge = self._exact(64)
        nonce_s, proof = challenge[:32], challenge[32:]
        assert hmac.compare_digest(proof, hmac.digest(key, b"server" + nonce_c + nonce_s, "sha256")), \
            "the edge does not hold the key"
        self.sock.sendall(hmac.digest(key, b"client" + nonce_s + nonce_c, "sha256"))
        assert self._exact(1) == b"\x01", "the edge rejected our key"
        self.send_key = hmac.digest(key, b"fedfly record c2s" + nonce_c + nonce_s, "sha256")
        self.recv_key = hmac.digest(key, b"fedfly record s2c" + nonce_c + nonce_s, "sha256")
        self.send_seq = self.recv_seq = 0
        self.raw = bytearray()     # bytes received, not yet verified records
        self.frames = bytearray()  # verified bytes, not yet whole frames
        self.pending: list[tuple[str, dict, dict]] = []
        self.last_sent = time.monotonic()
        self.send(first)

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("the edge closed the connection")
            buf += chunk
        return buf

    def send(self, frame: bytes) -> None:
        for i in range(0, len(frame), 256 << 10):
            body = frame[i:i + (256 << 10)]
            self.sock.sendall(struct.pack("!I", len(body)) + body + record_tag(self.send_key, self.send_seq, body))
            self.send_seq += 1
        self.last_sent = time.monotonic()

    def recv(self, deadline_s: float = 60.0) -> tuple[str, dict, dict]:
        """The next message other than a Heartbeat; sends our heartbeats while it waits."""
        deadline = time.monotonic() + deadline_s
        while True:
            while len(self.raw) >= 4:  # every whole record read so far, verified in order
                (length,) = struct.unpack_from("!I", self.raw)
                assert 0 < length <= 256 << 10, "record length"
                if len(self.raw) < 4 + length + 16:
                    break
                body, tag = bytes(self.raw[4:4 + length]), bytes(self.raw[4 + length:20 + length])
                del self.raw[:20 + length]
                assert hmac.compare_digest(tag, record_tag(self.recv_key, self.recv_seq, body)), "record MAC"
                self.recv_seq += 1
                self.frames += body
            self.pending += [msg for msg in decode_frames(self.frames) if msg[0] != "Heartbeat"]
            if self.pending:
                return self.pending.pop(0)
            if time.monotonic() - self.last_sent >= 1.0:  # faults.heartbeat_s
                self.send(encode_frame("Heartbeat", {}))
            assert time.monotonic() < deadline, "no message from the edge in time"
            self.sock.settimeout(0.5)
            try:
                chunk = self.sock.recv(1 << 20)
            except socket.timeout:
                continue
            if not chunk:
                raise ConnectionError("the edge closed the connection")
            self.raw += chunk

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------------------
# PROTOCOL.md, "Proofs of attachment"
# --------------------------------------------------------------------------------------

def edge_key(secret: bytes, edge: str) -> str:
    return hmac.new(secret, b"fedfly edge key|" + edge.encode(), hashlib.sha256).hexdigest()


def proofs(secret: bytes, target: str, edges: list[str]) -> dict[str, str]:
    msg = f"fedfly attach|{DEVICE}|{target}".encode()
    return {e: hmac.new(bytes.fromhex(edge_key(secret, e)), msg, hashlib.sha256).hexdigest() for e in edges}


def attach_request(secret: bytes, edges: list[str], target: str, **fields) -> bytes:
    req = {"device": DEVICE, "kind": "join", "round": 0, "step": 0, "source": target, "last_round": 0,
           "why": "start", "checkpoints": [], "run": "", "edge_key": edge_key(secret, target),
           "proofs": proofs(secret, target, edges)}
    req.update(fields)
    return encode_frame("AttachRequest", req)


# --------------------------------------------------------------------------------------
# the test
# --------------------------------------------------------------------------------------

def test_a_device_written_from_the_document_attaches_trains_moves_and_finishes(tmp_path: Path) -> None:
    from common.config import load_config
    from common.models import device_part

    cfg_path = write_config(tmp_path, edges=2, devices=1, rounds=1, samples_per_device=SAMPLES, batch_size=BATCH,
                            split_layer=2)
    cfg = load_config(str(cfg_path))
    key = bytes.fromhex((tmp_path / "test.key").read_text().strip())
    edges = sorted(cfg.edges)
    secret = secrets.token_bytes(32)
    # The device's model, optimizer and data are ready before it attaches: this test
    # sends no heartbeats while it computes, and torch's first optimizer alone can take
    # longer than an edge waits for a silent link (faults.dead_after_s).
    torch.manual_seed(0)
    model = device_part(cfg.model_key, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    images = torch.rand(SAMPLES, 3, 32, 32)
    labels = torch.randint(0, 10, (SAMPLES,))
    model(images[:BATCH]).sum().backward()
    opt.zero_grad()
    bed = Testbed(cfg_path, log_dir=tmp_path / "logs")
    link = None
    try:
        bed.start("central")
        for e in edges:
            bed.start("edge", e)

        def connect(edge: str, request: bytes) -> KeyModeLink:
            ep = cfg.edges[edge]
            t_end = time.monotonic() + 60
            while True:
                try:
                    return KeyModeLink(ep.host, ep.port, key, request)
                except (ConnectionError, OSError):
                    assert time.monotonic() < t_end, f"edge {edge} never came up:\n{bed.log(edge)[-2000:]}"
                    time.sleep(0.2)

        # attach: join, answered "wait", then the round's work
        link = connect("edge1", attach_request(secret, edges, "edge1"))
        t, f, _ = link.recv()
        assert t == "AttachReply" and f["ok"] and f["action"] == "wait", (t, f)
        run_name = f["run_name"]
        t, f, w = link.recv()
        assert t == "DeviceRound", t
        plan, r = f["plan"], f["plan"]["round"]
        assert r == 1 and DEVICE in plan["participants"] and plan["batch_size"] == BATCH

        assert set(w["weights"]) == set(model.state_dict()), "the device part's weights"
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in w["weights"].items()})
        opt.param_groups[0].update(lr=plan["lr"], momentum=plan["momentum"])
        steps = SAMPLES // BATCH
        t0 = time.monotonic()

        def step(s: int, *, drop: bool = False) -> None:
            nonlocal link
            x = images[s * BATCH:(s + 1) * BATCH]
            opt.zero_grad()
            out = model(x)
            frame = encode_frame("Activations", {"round": r, "step": s},
                                 {"batch": {"x": out.detach().numpy(), "y": labels[s * BATCH:(s + 1) * BATCH].numpy()}})
            link.send(frame)
            if drop:
                # the link breaks before the gradient comes: attach again where we are, and
                # send the step again (the edge answers it once, trained once)
                link.close()
                link = connect("edge2", attach_request(secret, edges, "edge2", kind="resume", round=r, step=s,
                                                       source="edge2", why="reconnect", checkpoints=[0], run=run_name))
                t, f, _ = link.recv()
                assert t == "AttachReply" and f["ok"], (t, f)
                assert (f["action"], f["round"], f["resume_step"], f["how"]) == ("continue", r, s, "here"), f
                link.send(frame)
            t, f, g = link.recv()
            assert t == "Gradients" and (f["round"], f["step"]) == (r, s), (t, f)
            grad = g["grad"]["g"]
            assert grad.shape == tuple(out.shape) and grad.dtype == np.float32 and math.isfinite(f["loss"])
            out.backward(torch.from_numpy(grad.copy()))
            opt.step()

        for s in range(MOVE_AT):
            step(s)

        # the move, at a step boundary: Leaving, close, attach to edge2 naming edge1
        t_leave = time.perf_counter()
        link.send(encode_frame("Leaving", {"round": r, "step": MOVE_AT, "to": "edge2"}))
        link.close()
        link = connect("edge2", attach_request(secret, edges, "edge2", kind="resume", round=r, step=MOVE_AT,
                                               source="edge1", why="move", checkpoints=[0], run=run_name))
        t, f, _ = link.recv()
        assert t == "AttachReply" and f["ok"], (t, f)
        assert (f["action"], f["round"], f["resume_step"]) == ("continue", r, MOVE_AT), f
        assert f["state_bytes"] > 0, "the session came from edge1"
        pause_ms = (time.perf_counter() - t_leave) * 1000
        link.send(encode_frame("MigrationReport", {
            "device": DEVICE, "source": "edge1", "target": "edge2", "round": r, "step": MOVE_AT, "mode": "fedfly",
            "pause_ms": pause_ms, "state_bytes": f["state_bytes"], "transfer_ms": f["transfer_ms"],
            "how": f["how"], "delivered_by": ""}))  # every field is present (section 5), this one empty

        for s in range(MOVE_AT, steps):
            step(s, drop=s == steps - 1)

        # the round's end
        weights = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        link.send(encode_frame("DeviceDone", {"round": r, "samples": SAMPLES, "steps": steps,
                                              "train_seconds": time.monotonic() - t0}, {"weights": weights}))
        t, f, _ = link.recv()
        assert (t, f) == ("DoneAck", {"round": r}), (t, f)
        t, f, _ = link.recv()  # one round: the run is over
        assert t == "Shutdown", (t, f)

        assert bed.wait("central", 60) == 0, bed.log("central")[-3000:]
        summary = json.loads((Path(cfg.run.out) / run_name / "summary.json").read_text())
        assert [x["round"] for x in summary["rounds"]] == [1]
        assert summary["rounds"][0]["samples"] == SAMPLES
        moves = [(x["device"], x["from"], x["to"], x["round"], x["step"]) for x in summary["migrations"]]
        assert moves == [(DEVICE, "edge1", "edge2", r, MOVE_AT)]
        assert summary["migrations"][0]["state_bytes"] > 0
    finally:
        if link is not None:
            link.close()
        bed.stop()

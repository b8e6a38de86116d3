"""The migration snapshot's checksum is a documented byte form (docs/PROTOCOL.md, section
9.1), with nothing of Python's in it: here it is built by hand from those rules, byte by
byte, and must equal what the edges compute."""

from __future__ import annotations

import hashlib
import struct

import torch

from common import digest
from edge.checksum import snapshot_checksum


def _str(s: str) -> bytes:  # fixstr: at most 31 bytes
    b = s.encode()
    assert len(b) < 32
    return bytes([0xa0 | len(b)]) + b


def test_the_checksum_is_the_documented_bytes():
    meta = {"round": 3, "lr": 0.1, "last_reply": None, "big": 300}
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, -0.5, 0.0]], dtype=torch.float32)
    n = torch.tensor([7], dtype=torch.int64)
    # msgpack(meta), shortest form, floats as float64, in order
    head = (b"\x84" + _str("round") + b"\x03" + _str("lr") + b"\xcb" + struct.pack(">d", 0.1)
            + _str("last_reply") + b"\xc0" + _str("big") + b"\xcd" + struct.pack(">H", 300))
    # per tensor: [name, wire dtype, shape, Poly1305 tag (bin 8) of its little-endian C-order bytes]
    key = hashlib.sha256(b"fedfly tensor digest 1").digest()
    assert key == digest.KEY
    entries = b""
    for name, dtype, shape, raw in [("model/w", "float32", [2, 3], struct.pack("<6f", 1, 2, 3, 4, -0.5, 0)),
                                    ("opt/0/n", "int64", [1], struct.pack("<q", 7))]:
        tag = digest.of(raw)
        assert len(tag) == 16
        entries += (b"\x94" + _str(name) + _str(dtype) + bytes([0x90 | len(shape)]) + bytes(shape)
                    + b"\xc4\x10" + tag)
    want = hashlib.sha256(head + entries).hexdigest()
    assert snapshot_checksum(meta, {"model/w": x, "opt/0/n": n}) == want


def test_an_empty_tensor_and_a_0_d_one_have_their_entries_too():
    meta = {}
    got = snapshot_checksum(meta, {"e": torch.empty(0), "s": torch.tensor(1.5, dtype=torch.float64)})
    want = hashlib.sha256(b"\x80"
                          + b"\x94" + _str("e") + _str("float32") + b"\x91\x00" + b"\xc4\x10" + digest.of(b"")
                          + b"\x94" + _str("s") + _str("float64") + b"\x90" + b"\xc4\x10"
                          + digest.of(struct.pack("<d", 1.5))).hexdigest()
    assert got == want

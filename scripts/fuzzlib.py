"""Fuzzing the wire: generators of hostile input and the targets they are fed to.

Shared by the suite (``tests/test_fuzz.py``, a fixed budget with fixed seeds) and the
longer runs of ``scripts/fuzz.py``. Everything is seeded from one ``random.Random``, so
a failure is reproduced by its seed and index alone.

Two kinds of target, one invariant each:

- the frame decoder, fed mutated frames (bit flips, inserted and deleted bytes,
  truncations, rewritten length fields, spliced frames, random msgpack headers, random
  tensor descriptors) in random chunkings, also through the direct-receive path of
  ``Connection.recv``: it yields messages or raises ``RemoteProtocolError``, nothing else,
  and stays broken after an error;
- every handler of a peer's message (the edge's core, the central's event handler and
  update check, the device's control-port checks and its reading of an attach reply),
  driven in-process through its existing seam with *well-formed* messages holding
  hostile values: it refuses with a typed error or a reply, never with another
  exception, and its state stays consistent.

A target returns normally or raises ``FuzzFailure`` naming what broke.
"""

from __future__ import annotations

import dataclasses
import math
import random
import struct
import typing
from typing import Any, Callable

import msgpack
import torch

from common import codec
from common import messages as m
from common.errors import LocalProtocolError, RemoteProtocolError


class FuzzFailure(AssertionError):
    """A target broke its invariant. ``data``: the input's bytes, when it has them."""

    def __init__(self, what: str, data: bytes | None = None) -> None:
        super().__init__(what)
        self.data = data


# -- values a hostile peer would pick ---------------------------------------------------------

NAMES = ["device1", "device2", "device9", "edge1", "edge2", "edge9", "central", "", "x" * 300, "\u00e9\u4e2d",
         "\x00", "device1 ", "DEVICE1", "../edge1", "\U0001f600" * 3]
INTS = [0, 1, 2, 3, 4, 5, 7, 10, 100, -1, -2, -(2 ** 31), 2 ** 31 - 1, 2 ** 31, 2 ** 53 + 1, 2 ** 63 - 1,
        -(2 ** 63), 10 ** 12]
FLOATS = [0.0, -0.0, 0.5, 1.0, -1.0, 0.01, 1e-300, 5e-324, 1e300, -1e300, 86400.0, 86400.5, float("nan"),
          float("inf"), float("-inf")]
# Fields whose value must be one of a few words: mostly a valid word, sometimes not.
WORDS = {"kind": list(m.FAULT_KINDS) + list(m.ATTACH_KINDS) + ["protocol", "RemoteProtocolError"],
         "why": list(m.ATTACH_WHY), "action": list(m.ATTACH_ACTIONS), "mode": ["fedfly", "restart", "classic"],
         "link": list(m.LINK_STATES), "how": ["pulled", "here", "fresh", "restart", "replica", "delivering"],
         "recovery": ["restart", "replica", "session held", "checkpoint"]}
DTYPES = list(codec.DTYPES.values())
TENSOR_KEYS = ["x", "y", "g", "w", "rng", "", "model/0.weight", "opt/0/momentum_buffer", "reply/grad"]


def hostile_int(rng: random.Random) -> int:
    return rng.choice(INTS) if rng.random() < 0.5 else rng.randint(-3, 40)


def hostile_float(rng: random.Random) -> float:
    return rng.choice(FLOATS) if rng.random() < 0.6 else rng.uniform(-10.0, 10.0)


# ...and where one class's field takes other words than the same name elsewhere
CLASS_WORDS = {("FaultReport", "kind"): list(m.FAULT_KINDS), ("AttachRequest", "kind"): list(m.ATTACH_KINDS)}


def hostile_str(rng: random.Random, field: str = "", cls: str = "") -> str:
    words = CLASS_WORDS.get((cls, field)) or WORDS.get(field)
    if words and rng.random() < 0.85:
        return rng.choice(words)
    if rng.random() < 0.8:
        return rng.choice(NAMES)
    return "".join(chr(rng.choice([rng.randint(32, 126), rng.randint(0x80, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]))
                   for _ in range(rng.randint(0, 12)))


def hostile_json(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth < 4 and r < 0.15:
        return [hostile_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if depth < 4 and r < 0.3:
        return {hostile_str(rng): hostile_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    return rng.choice([None, True, False, hostile_int(rng), hostile_float(rng), hostile_str(rng)])


def hostile_plan(rng: random.Random) -> dict:
    """A round plan: valid but for a value or two, most of the time."""
    plan = {"round": rng.choice([1, 1, 2, 3, 4, 10 ** 12, 2 ** 63 - 1, 0, -1]),
            "lr": rng.choice([0.01, 0.1, 0.0, 1e300, 5e-324, 3.0, -0.1, float("nan")]),
            "momentum": rng.choice([0.9, 0.0, 0.5, 1e300]),
            "batch_size": rng.choice([4, 1, 2, 100, 2 ** 31 - 1, 0]),
            "local_epochs": rng.choice([1, 1, 2, 2 ** 31 - 1, 0]),
            "participants": rng.sample(["device1", "device2", "device9", "edge1", "x" * 50],
                                       rng.randint(0, 3)),
            "algo": rng.choice([{"name": "fedavg", "params": {}}, {"name": "fedprox", "params": {"mu": 0.01}},
                                {"name": "fedprox", "params": {"mu": rng.choice([1e300, -1.0, float("nan")])}},
                                {"name": "scaffold", "params": {}}, {"name": "fedsgd", "params": {}},
                                {"name": "fedavg", "params": {"mu": 0.1}}, {"name": "fedavg"}]),
            "cuts": rng.choice([{}, {}, {"device1": 3}, {"device1": 10 ** 6}, {"device9": -1}])}
    if rng.random() < 0.05:
        plan[rng.choice(list(plan))] = hostile_json(rng)
    if rng.random() < 0.03:
        plan.pop(rng.choice(list(plan)))
    return plan


def hostile_tensor(rng: random.Random, *, shape: tuple[int, ...] | None = None,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    dtype = dtype or rng.choice(DTYPES)
    if shape is None:
        shape = tuple(rng.choice([0, 1, 2, 3, 4, 5]) for _ in range(rng.randint(0, 4)))
    n = math.prod(shape)
    if dtype.is_floating_point:
        t = torch.randn(n, generator=torch.Generator().manual_seed(rng.randrange(2 ** 32)), dtype=torch.float64)
        for _ in range(min(n, rng.choice([0, 0, 1, 3]))):
            t[rng.randrange(n)] = hostile_float(rng)
        t = t.to(dtype)  # 1e300 becomes inf in float32: hostile still
    elif dtype is torch.bool:
        t = torch.tensor([rng.random() < 0.5 for _ in range(n)], dtype=torch.bool)
    else:
        info = torch.iinfo(dtype)
        t = torch.tensor([rng.choice([info.min, info.max, 0, -1 if info.min else 1, rng.randint(0, 11)])
                          for _ in range(n)], dtype=dtype)
    return t.reshape(shape)


def hostile_tensors(rng: random.Random, field: str) -> dict[str, torch.Tensor]:
    if field == "batch" and rng.random() < 0.8:
        # activations that pass the message's own shape check, with hostile sizes and labels
        n = rng.choice([0, 1, 2, 4, 4, 5])
        x_shape = rng.choice([(n, 64, 8, 8), (n, 64, 8, 8), (n, 3, 32, 32), (n, 1), (n, 64, 4, 4), (n, 2, 2, 2, 2)])
        x = hostile_tensor(rng, shape=x_shape, dtype=rng.choice([torch.float32, torch.float32, torch.float64,
                                                                   torch.float16, torch.bfloat16]))
        y = torch.tensor([rng.choice([0, 1, 9, 10, -1, 2 ** 63 - 1, -(2 ** 63)]) for _ in range(n)], dtype=torch.int64)
        return {"x": x, "y": y}
    return {rng.choice(TENSOR_KEYS): hostile_tensor(rng) for _ in range(rng.randint(0, 3))}


def _value(rng: random.Random, field: str, hint: object, cls: str = "") -> Any:
    if hint is bool:
        return rng.random() < 0.5
    if hint is int:
        return hostile_int(rng)
    if hint is float:
        return hostile_float(rng)
    if hint is str:
        return hostile_str(rng, field, cls)
    if field == "plan":
        return hostile_plan(rng)
    if hint is Any:
        return hostile_json(rng)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return [_value(rng, field, args[0]) for _ in range(rng.choice([0, 1, 2, 3, 8]))]
    if m.is_tensors(hint):
        return hostile_tensors(rng, field)
    if origin is dict:
        return {_value(rng, field, args[0]): _value(rng, field, args[1]) for _ in range(rng.choice([0, 1, 2, 3]))}
    raise TypeError(f"no generator for {field}: {hint}")  # pragma: no cover - a new field type


def hostile_message(rng: random.Random, type_name: str | None = None, *, tries: int = 50) -> m.Message:
    """A well-formed message (it passes its own checks, as anything decoded does) of
    ``type_name`` (random if None), with values a hostile peer might pick."""
    cls = m.MESSAGE_TYPES[type_name or rng.choice(sorted(m.MESSAGE_TYPES))]
    for _ in range(tries):
        kwargs = {name: _value(rng, name, hint, cls.TYPE) for name, hint in cls._hints.items()}
        try:
            return cls(**kwargs)
        except LocalProtocolError:
            continue
    # the rules of some types are strict: fall back to fields that pass them
    return _plain(cls, rng)


def _plain(cls: type, rng: random.Random) -> m.Message:
    kwargs: dict[str, Any] = {}
    for name, hint in cls._hints.items():
        if hint is str:
            words = CLASS_WORDS.get((cls.TYPE, name)) or WORDS.get(name)
            kwargs[name] = words[0] if words else rng.choice(NAMES)
        elif hint is int:
            kwargs[name] = rng.randint(0, 5)
        elif hint is float:
            kwargs[name] = 1.0
        elif hint is bool:
            kwargs[name] = False
        elif name == "plan":
            kwargs[name] = {"round": 1, "lr": 0.01, "momentum": 0.0, "batch_size": 4, "local_epochs": 1,
                            "participants": ["device1"], "algo": {"name": "fedavg", "params": {}}, "cuts": {}}
        elif name == "batch":
            kwargs[name] = {"x": torch.zeros(1, 2), "y": torch.zeros(1, dtype=torch.int64)}
        else:
            kwargs[name] = _value(rng, name, hint)
    return cls(**kwargs)


# -- frames and their mutations ------------------------------------------------------------------

def seed_frames(rng: random.Random, per_type: int = 4) -> list[bytes]:
    """Valid frames of every message type (a few hostile-valued instances of each)."""
    out = []
    for name in sorted(m.MESSAGE_TYPES):
        for _ in range(per_type):
            try:
                out.append(codec.encode_bytes(hostile_message(rng, name)))
            except LocalProtocolError:
                pass  # e.g. an int of 2**64 in JSON: not ours to send
    return out


def _split(frame: bytes) -> tuple[bytes, bytes, bytes]:
    hl = codec.PREFIX.unpack_from(frame)[2]
    return frame[:16], frame[16:16 + hl], frame[16 + hl:]


def _prefix(header: bytes, payload_len: int, rng: random.Random) -> bytes:
    hl = len(header)
    if rng.random() < 0.1:
        hl = max(0, min(2 ** 32 - 1, hl + rng.choice([-2, -1, 1, 2, 1000])))
    return codec.PREFIX.pack(codec.MAGIC, codec.VERSION, hl, payload_len)


def _random_node(rng: random.Random) -> Any:
    r = rng.random()
    if r < 0.08:
        return msgpack.ExtType(rng.randint(0, 127), rng.randbytes(rng.randint(0, 4)))
    if r < 0.1:
        return msgpack.Timestamp(rng.randint(0, 2 ** 34 - 1), rng.randint(0, 999_999_999))  # ext -1
    if r < 0.2:
        return rng.randbytes(rng.randint(0, 8))
    if r < 0.25:
        return 2 ** 64 - 1
    if r < 0.3:
        deep: Any = 1
        for _ in range(rng.choice([17, 40, 200])):
            deep = [deep] if rng.random() < 0.5 else {"a": deep}
        return deep
    return hostile_json(rng)


def _mutate_tree(value: Any, rng: random.Random) -> Any:
    """The header as data, with one node replaced, dropped or added."""
    if isinstance(value, dict) and value and rng.random() < 0.75:
        k = rng.choice(list(value))
        value = dict(value)
        r = rng.random()
        if r < 0.1:
            del value[k]
        elif r < 0.2:
            value[rng.choice([hostile_str(rng), "zzz", b"f"])] = _random_node(rng)
        else:
            value[k] = _mutate_tree(value[k], rng)
        return value
    if isinstance(value, list) and value and rng.random() < 0.75:
        i = rng.randrange(len(value))
        value = list(value)
        r = rng.random()
        if r < 0.1:
            del value[i]
        elif r < 0.2:
            value.insert(i, _random_node(rng))
        else:
            value[i] = _mutate_tree(value[i], rng)
        return value
    return _random_node(rng)


def random_descriptor(rng: random.Random) -> list:
    field = rng.choice(["weights", "batch", "grad", "state", "x", hostile_str(rng)])
    key = rng.choice(["x", "y", "g", "w", "", hostile_str(rng)])
    dtype = rng.choice(sorted(codec.DTYPES) + ["complex64", "object", "", 5, None])
    dims = [rng.choice([0, 1, 2, 3, 7, 2 ** 20, 2 ** 39, 2 ** 40 - 1, 2 ** 40, 2 ** 63 - 1, 2 ** 64 - 1, -1,
                        True, 1.0]) for _ in range(rng.randint(0, 9))]
    shape: Any = dims if rng.random() < 0.9 else _random_node(rng)
    return [field, key, dtype, shape]


def mutate(frame: bytes, corpus: list[bytes], rng: random.Random) -> bytes:
    """One mutation of a valid frame (sometimes several stacked)."""
    data = bytearray(frame)
    for _ in range(1 if rng.random() < 0.7 else rng.randint(2, 4)):
        if not data:
            data = bytearray(rng.choice(corpus))
        hl = codec.PREFIX.unpack_from(data)[2] if len(data) >= 16 else 0
        head_end = max(1, min(len(data), 16 + hl))
        # most mutations hit the prefix and header, where the parsing is
        pos = rng.randrange(head_end) if rng.random() < 0.8 else rng.randrange(len(data))
        op = rng.randrange(11)
        if op == 0:
            data[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            data[pos] = rng.choice([0x00, 0x01, 0x7F, 0x80, 0xC0, 0xC1, 0xD9, 0xDC, 0xDD, 0xDF, 0xFF, rng.randrange(256)])
        elif op == 2:
            data[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 3:
            del data[pos:pos + rng.randint(1, 8)]
        elif op == 4:
            data = data[:rng.randrange(len(data) + 1)]
        elif op == 5 and len(data) >= 16:  # rewrite the header length
            v = rng.choice([0, 1, hl - 1, hl + 1, hl * 2, codec.MAX_HEADER_BYTES, codec.MAX_HEADER_BYTES + 1,
                            2 ** 32 - 1])
            struct.pack_into("!I", data, 4, max(0, min(2 ** 32 - 1, v)))
        elif op == 6 and len(data) >= 16:  # rewrite the payload length
            pl = struct.unpack_from("!Q", data, 8)[0]
            v = rng.choice([0, 1, pl - 1, pl + 1, pl + 16, pl * 2, 400 << 20, codec.DEFAULT_MAX_PAYLOAD_BYTES,
                            codec.DEFAULT_MAX_PAYLOAD_BYTES + 1, 2 ** 64 - 1])
            struct.pack_into("!Q", data, 8, max(0, min(2 ** 64 - 1, v)))
        elif op == 7:  # splice: this frame's prefix and header, another's payload (or the other way)
            other = rng.choice(corpus)
            p1, h1, b1 = _split(bytes(data)) if len(data) >= 16 else (b"", b"", bytes(data))
            p2, h2, b2 = _split(other)
            data = bytearray(p1 + h1 + b2 if rng.random() < 0.5 else p2 + h2 + b1)
        elif op == 8:  # two frames back to back, or a frame cut into the next
            other = rng.choice(corpus)
            data = bytearray(bytes(data) + other if rng.random() < 0.5 else bytes(data[:pos]) + other)
        elif op in (9, 10) and len(data) >= 16 + hl and hl:  # edit the header as data
            try:
                header = msgpack.unpackb(bytes(data[16:16 + hl]), raw=False, strict_map_key=False)
            except Exception:  # noqa: BLE001 - an earlier mutation broke it: mutate bytes instead
                data[pos] ^= 0x20
                continue
            if op == 10 and isinstance(header, dict) and rng.random() < 0.7:
                header = dict(header)
                header["x"] = [random_descriptor(rng) for _ in range(rng.randint(0, 3))]
            else:
                header = _mutate_tree(header, rng)
            try:
                hb = msgpack.packb(header, use_bin_type=True)
            except (ValueError, TypeError, OverflowError):
                continue
            payload = bytes(data[16 + hl:])
            pl = struct.unpack_from("!Q", data, 8)[0]
            data = bytearray(_prefix(hb, pl, rng) + hb + payload)
    return bytes(data)


def random_header_frame(rng: random.Random) -> bytes:
    """A valid prefix and a msgpack header built from random parts: a known type or not,
    fields of the right names with random values, random tensor descriptors."""
    name = rng.choice(sorted(m.MESSAGE_TYPES)) if rng.random() < 0.85 else hostile_str(rng)
    cls = m.MESSAGE_TYPES.get(name)
    fields: Any = {}
    if cls is not None:
        for f, hint in cls._hints.items():
            if m.is_tensors(hint):
                continue
            fields[f] = _value(rng, f, hint, name) if rng.random() < 0.8 else _random_node(rng)
    if rng.random() < 0.1:
        fields = _random_node(rng)
    descr = [random_descriptor(rng) for _ in range(rng.randint(0, 3))]
    if cls is not None and rng.random() < 0.5:
        tf = [f for f, h in cls._hints.items() if m.is_tensors(h)]
        for d in descr:
            if tf:
                d[0] = rng.choice(tf)
    header = {"t": name, "f": fields, "x": descr}
    if rng.random() < 0.05:
        header = _mutate_tree(header, rng)
    try:
        hb = msgpack.packb(header, use_bin_type=True)
    except (ValueError, TypeError, OverflowError):
        hb = msgpack.packb({"t": name, "f": {}, "x": []})
    payload = rng.randbytes(rng.choice([0, 0, 4, 16, 33, 64, 200]))
    pl = len(payload) if rng.random() < 0.8 else rng.choice([0, 16, 64, 2 ** 40, 400 << 20])
    return _prefix(hb, pl, rng) + hb + payload


def hostile_input(rng: random.Random, corpus: list[bytes]) -> bytes:
    """One input for the decoder."""
    r = rng.random()
    if r < 0.6:
        return mutate(rng.choice(corpus), corpus, rng)
    if r < 0.9:
        return random_header_frame(rng)
    if r < 0.95:
        return codec.MAGIC + bytes([codec.VERSION]) + rng.randbytes(rng.randint(0, 64))
    return rng.randbytes(rng.randint(0, 64))


# -- the decoder target ------------------------------------------------------------------------

def _drain(dec: codec.FrameDecoder, out: list[m.Message]) -> None:
    while True:
        msg = dec.next_message()
        if msg is codec.NEED_DATA:
            return
        out.append(msg)  # type: ignore[arg-type]


def decode_target(data: bytes, rng: random.Random) -> int:
    """Feed ``data`` to a fresh decoder in a chunking drawn from ``rng``; returns how many
    messages came out. Raises ``FuzzFailure`` if anything but ``RemoteProtocolError``
    escapes, or the decoder takes input again after an error."""
    eager = rng.choice([codec.EAGER_PAYLOAD_BYTES, codec.EAGER_PAYLOAD_BYTES, 1, 7, 64])
    dec = codec.FrameDecoder(max_payload=rng.choice([codec.DEFAULT_MAX_PAYLOAD_BYTES, 4096]), eager_payload=eager)
    got: list[m.Message] = []
    # whole (2 in 8), one byte at a time (1 in 8, short inputs: it is the costly one),
    # straight into the payload buffer (2 in 8), random cuts (3 in 8)
    how = rng.randrange(8)
    try:
        try:
            if how < 2 or len(data) < 2:
                dec.receive_data(data)
                _drain(dec, got)
            elif how == 2 and len(data) <= 300:
                for i in range(len(data)):
                    dec.receive_data(data[i:i + 1])
                    _drain(dec, got)
            elif how in (3, 4):
                _feed_direct(dec, data, rng, got)
            else:
                cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 6))))
                start = 0
                for cut in cuts + [len(data)]:
                    dec.receive_data(data[start:cut])
                    start = cut
                    _drain(dec, got)
            if rng.random() < 0.7:
                dec.receive_data(b"")
                _drain(dec, got)
                if not dec.at_frame_boundary:
                    raise FuzzFailure("end of stream inside a frame went unreported", data)
        except RemoteProtocolError:
            try:
                dec.next_message()
            except RemoteProtocolError:
                pass
            else:
                raise FuzzFailure("decoder usable again after a protocol error", data)
    except FuzzFailure:
        raise
    except Exception as exc:  # noqa: BLE001 - the point: anything else is a bug
        raise FuzzFailure(f"decoder raised {type(exc).__name__}: {exc}", data) from exc
    for msg in got:
        if type(msg) not in m.MESSAGE_TYPES.values():
            raise FuzzFailure(f"decoder produced {type(msg).__name__}", data)
    return len(got)


def _feed_direct(dec: codec.FrameDecoder, data: bytes, rng: random.Random, got: list[m.Message]) -> None:
    """What ``Connection.recv`` does: receive into ``payload_buffer()`` when there is
    one, else through ``receive_data``; the previous view is still alive on purpose."""
    pos, view = 0, None
    most = rng.choice([7, 64, 512, 4096])
    while pos < len(data):
        room = dec.payload_buffer()
        n = rng.randint(1, most)
        if room is None:
            dec.receive_data(data[pos:pos + n])
            pos += n
        else:
            view = room  # noqa: F841 - kept alive across the next payload_buffer()
            n = min(n, len(room), len(data) - pos)
            room[:n] = data[pos:pos + n]
            dec.payload_written(n)
            pos += n
        _drain(dec, got)


def atheris_decode(data: bytes) -> None:
    """A target for coverage-guided fuzzers: ``data`` whole and in 7-byte chunks."""
    rng = random.Random(len(data))
    decode_target(data, rng)
    dec = codec.FrameDecoder()
    try:
        for i in range(0, len(data), 7):
            dec.receive_data(data[i:i + 7])
            _drain(dec, [])
    except RemoteProtocolError:
        pass


def field_names(msg: m.Message) -> list[str]:
    return [f.name for f in dataclasses.fields(msg)]


Target = Callable[[random.Random], None]

"""The sans-IO frame codec and the message classes, with no sockets.

Every message type round-trips whole, one byte at a time and in random chunkings; garbage
of any kind raises ``RemoteProtocolError`` (never another exception) and breaks the decoder
for good; what we may not send raises ``LocalProtocolError``.
"""

from __future__ import annotations

import dataclasses
import math
import struct

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import codec
from common import messages as m
from common.errors import LocalProtocolError, RemoteProtocolError

FAST = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------------------
# valid messages of every type
# --------------------------------------------------------------------------------------

SPECIAL = [float("nan"), -0.0, 0.0, float("inf"), float("-inf"), 1e-45, 3.5, -1e30]


def every_dtype() -> dict[str, torch.Tensor]:
    """One tensor of every whitelisted dtype, plus 0-d, empty and non-contiguous ones."""
    g = torch.Generator().manual_seed(7)
    nan_payload = torch.tensor([0x7FC01234, 0x7F800001, -0x00400000], dtype=torch.int32).view(torch.float32)
    out = {
        "f32": torch.tensor(SPECIAL, dtype=torch.float32),
        "f32_nan_payloads": nan_payload,
        "f64": torch.tensor(SPECIAL, dtype=torch.float64).reshape(2, 4),
        "f16": torch.tensor(SPECIAL, dtype=torch.float16),
        "bf16": torch.cat([torch.tensor(SPECIAL), torch.randn(5, generator=g)]).to(torch.bfloat16),
        "i64": torch.tensor([-(2 ** 63), 2 ** 63 - 1, 0, -1, 12345], dtype=torch.int64),
        "i32": torch.tensor([[-(2 ** 31), 2 ** 31 - 1], [0, 7]], dtype=torch.int32),
        "i16": torch.tensor([-(2 ** 15), 2 ** 15 - 1, 3], dtype=torch.int16),
        "i8": torch.tensor([-128, 127, 0], dtype=torch.int8),
        "u8": torch.tensor([0, 255, 1, 128, 77], dtype=torch.uint8),
        "bool": torch.tensor([[True, False, True], [False, False, True]]),
        "scalar_f32": torch.tensor(2.75),
        "scalar_i64": torch.tensor(-5),
        "scalar_bool": torch.tensor(True),
        "empty_f32": torch.empty(0),
        "empty_2d": torch.empty(3, 0, dtype=torch.float16),
        "empty_bool": torch.empty(0, 2, 5, dtype=torch.bool),
        "transposed": torch.arange(24, dtype=torch.float32).reshape(4, 6).t(),
        "strided": torch.arange(40, dtype=torch.int64)[1::3],
        "expanded": torch.tensor([1.5, -2.5], dtype=torch.float64).expand(3, 2),
        "sliced_3d": torch.randn(4, 5, 6, generator=g)[:, 1:4, ::2],
        "odd_u8": torch.tensor([1, 2, 3], dtype=torch.uint8),  # 3 bytes: next tensor must be padded
        "big": torch.randn(300, generator=g),
        "eight_dims": torch.ones([1, 2, 1, 2, 1, 2, 1, 2]),
    }
    assert {t.dtype for t in out.values()} == set(codec.DTYPES.values())
    return out


def _x(n: int = 4) -> torch.Tensor:
    # non-contiguous activations
    return torch.arange(n * 3 * 5, dtype=torch.float32).reshape(n, 5, 3).transpose(1, 2)


PLAN = {"round": 4, "lr": 0.1, "momentum": 0.0, "batch_size": 32, "local_epochs": 2,
        "participants": ["device1", "device2"], "algo": {"name": "fedavg", "params": {}}, "cuts": {}}

FACTORIES = {
    "ErrorNotice": lambda: m.ErrorNotice(kind="protocol", detail="bad frame \u00e9\u4e2d"),
    "Heartbeat": lambda: m.Heartbeat(),
    "Shutdown": lambda: m.Shutdown(reason=""),
    "Replaced": lambda: m.Replaced(),
    "EdgeHello": lambda: m.EdgeHello(edge="edge1"),
    "Welcome": lambda: m.Welcome(run_name="20250101-fedfly", mode="fedfly"),
    "EdgeStatus": lambda: m.EdgeStatus(edge="edge2", attached=["device1", "device3"]),
    "RoundStart": lambda: m.RoundStart(plan={**PLAN, "round": 1}, weights=every_dtype()),
    "DeviceUpdate": lambda: m.DeviceUpdate(round=3, device="device1", edge="edge1", samples=1000, steps=10,
                                           train_seconds=12.5, weights=every_dtype()),
    "UpdateAck": lambda: m.UpdateAck(round=3, device="device1"),
    "MigrationReport": lambda: m.MigrationReport(device="device1", source="edge1", target="edge2", round=2,
                                                 step=5, mode="fedfly", pause_ms=12.25, state_bytes=5_000_000,
                                                 transfer_ms=3.5),
    "FaultReport": lambda: m.FaultReport(kind="peer_silent", process="edge1", peer="device2", round=2, step=3,
                                         detail="sent nothing for 5 s", detected_s=5.01, down_s=0.0, replayed=0,
                                         recovery="session held", samples_lost=0),
    "AttachRequest": lambda: m.AttachRequest(device="device1", kind="resume", round=2, step=5, source="edge1",
                                             last_round=1, why="reconnect"),
    "AttachReply": lambda: m.AttachReply(ok=True, reason="", run_name="r", mode="restart", action="continue",
                                         round=2, resume_step=0, how="restart", state_bytes=0, transfer_ms=0.0),
    "DeviceRound": lambda: m.DeviceRound(plan=PLAN,
                                         weights={"l0.conv.weight": torch.randn(2, 3, 3, 3, generator=torch.Generator().manual_seed(1)),
                                                  "n": torch.tensor(3)}),
    "ClientState": lambda: m.ClientState(round=2, state={"ci/l0.conv.weight": torch.ones(2, 3, 3, 3)}),
    "StandBy": lambda: m.StandBy(round=3, reason="round 3 is over"),
    "Activations": lambda: m.Activations(round=1, step=0, batch={"x": _x(), "y": torch.tensor([1, 0, 9, 3])}),
    "Gradients": lambda: m.Gradients(round=1, step=0, loss=float("nan"), grad={"g": _x()}),
    "DeviceDone": lambda: m.DeviceDone(round=1, samples=250, steps=3, train_seconds=0.0, weights={}),
    "DoneAck": lambda: m.DoneAck(round=1),
    "SessionPull": lambda: m.SessionPull(device="device1", round=2, step=7, target="edge2"),
    "SessionDrop": lambda: m.SessionDrop(device="device1", round=2, target="edge2"),
    "SessionSnapshot": lambda: m.SessionSnapshot(
        device="device1", round=2, step=7, checksum="ab" * 32, state=every_dtype(),
        meta={"device": "device1", "step": 7, "lr": 0.01, "loss_sum": float("nan"), "flag": True, "none": None,
              "optimizer": {"param_groups": [{"params": [0, 1, 2], "nesterov": False, "fused": None}]},
              "big": 2 ** 64 - 1, "neg": -(2 ** 63), "text": "\u00e9"}),
    "SessionReplica": lambda: m.SessionReplica(device="device1", round=2, step=10, target="edge1", checksum="ab" * 32,
                                               meta={"step": 10}, state={"rng": torch.zeros(5, dtype=torch.uint8)}),
    "ReplicaPull": lambda: m.ReplicaPull(device="device1", round=2, steps=[0, 10, 20], target="edge2"),
    "SessionInstalled": lambda: m.SessionInstalled(device="device1", round=2, step=7, checksum="cd" * 32),
    "SessionReleased": lambda: m.SessionReleased(device="device1"),
    "Leaving": lambda: m.Leaving(round=2, step=7, to="edge2"),
    "OfferNotice": lambda: m.OfferNotice(device="device1", round=2, step=7, target="edge1"),
    "PeerHello": lambda: m.PeerHello(target="edge1"),
    "SessionOffer": lambda: m.SessionOffer(device="device1", round=2, step=7, target="edge1", meta={"step": 7},
                                           state={"w": torch.ones(3, 2)}),
    "OfferSealed": lambda: m.OfferSealed(device="device1", round=2, step=7, target="edge1", checksum="ab" * 32),
    "OfferDeclined": lambda: m.OfferDeclined(device="device1", round=2, step=7),
    "PullRefused": lambda: m.PullRefused(device="device1", reason="refused", moved_to="edge3", delivered=False),
    "RelayOpen": lambda: m.RelayOpen(device="device1", round=2, step=7, target="edge2", proofs={"edge1": "ab" * 32}),
    "RelayAnswer": lambda: m.RelayAnswer(device="device1", round=2, step=7, opened=False, moved_to="edge3",
                                         delivered=False),
    "RelayStep": lambda: m.RelayStep(device="device1", round=2, step=7, batch={"x": torch.ones(4, 3),
                                                                             "y": torch.zeros(4, dtype=torch.long)}),
    "RelayGradients": lambda: m.RelayGradients(device="device1", round=2, step=7, loss=0.5,
                                               grad={"g": torch.ones(4, 3)}),
    "RelayDone": lambda: m.RelayDone(device="device1", round=2, samples=40, steps=10, train_seconds=1.5,
                                     weights={"w": torch.ones(2)}),
    "RelayDoneAck": lambda: m.RelayDoneAck(device="device1", round=2),
    "MoveCommand": lambda: m.MoveCommand(device="device1", to="edge2"),
    "DropCommand": lambda: m.DropCommand(device="device1", seconds=2.5, to=""),
    "MoveReply": lambda: m.MoveReply(accepted=False, reason="already there", edge="edge2"),
    "StatusRequest": lambda: m.StatusRequest(),
    "StatusReply": lambda: m.StatusReply(device="device1", edge="edge1", round=3, step=4, steps=10, pending="",
                                         link="attached"),
}


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def all_messages() -> list[m.Message]:
    return [FACTORIES[name]() for name in sorted(FACTORIES)]


def test_factories_cover_every_message_type():
    assert set(FACTORIES) == set(m.MESSAGE_TYPES)
    for name, factory in FACTORIES.items():
        assert factory().TYPE == name


def raw_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def assert_same_value(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert raw_bytes(a) == raw_bytes(b), where  # bit for bit, NaN payloads and -0.0 too
        if not (a.is_floating_point() and bool(torch.isnan(a).any())):
            assert torch.equal(a, b), where
    elif isinstance(a, float):
        assert type(b) is float, where
        assert struct.pack("<d", a) == struct.pack("<d", b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            assert_same_value(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_value(x, y, f"{where}[{i}]")
    else:
        assert type(a) is type(b) and a == b, where


def assert_same_message(a: m.Message, b: m.Message) -> None:
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        assert_same_value(getattr(a, f.name), getattr(b, f.name), f"{a.TYPE}.{f.name}")


def drain(dec: codec.FrameDecoder) -> list[m.Message]:
    out = []
    while True:
        msg = dec.next_message()
        if msg is codec.NEED_DATA:
            return out
        out.append(msg)


def feed_in_chunks(data: bytes, cuts: list[int]) -> list[m.Message]:
    dec = codec.FrameDecoder()
    got = []
    start = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        if cut > start:
            dec.receive_data(data[start:cut])
            got += drain(dec)
            start = cut
    dec.receive_data(b"")
    got += drain(dec)
    assert dec.at_frame_boundary
    return got


ALL = all_messages()
ALL_BYTES = [codec.encode_bytes(msg) for msg in ALL]
STREAM = b"".join(ALL_BYTES)


# --------------------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("msg", ALL, ids=[x.TYPE for x in ALL])
def test_round_trip_whole(msg):
    data = codec.encode_bytes(msg)
    dec = codec.FrameDecoder()
    assert dec.at_frame_boundary
    dec.receive_data(data)
    assert not dec.at_frame_boundary  # a whole frame is waiting to be taken
    got = dec.next_message()
    assert dec.at_frame_boundary
    assert_same_message(msg, got)
    assert dec.next_message() is codec.NEED_DATA
    dec.receive_data(b"")
    assert dec.next_message() is codec.NEED_DATA  # clean end of stream


@pytest.mark.parametrize("msg", ALL, ids=[x.TYPE for x in ALL])
def test_round_trip_one_byte_at_a_time(msg):
    data = codec.encode_bytes(msg)
    dec = codec.FrameDecoder()
    for i in range(len(data) - 1):
        dec.receive_data(data[i:i + 1])
        assert dec.next_message() is codec.NEED_DATA
        assert not dec.at_frame_boundary
    dec.receive_data(data[-1:])
    assert_same_message(msg, dec.next_message())
    assert dec.at_frame_boundary


def test_encode_buffers_join_to_encode_bytes_and_respect_alignment():
    msg = FACTORIES["RoundStart"]()
    buffers = codec.encode(msg)
    assert b"".join(bytes(b) for b in buffers) == codec.encode_bytes(msg)
    magic, version, header_len, payload_len = codec.PREFIX.unpack_from(bytes(buffers[0]))
    assert (magic, version) == (codec.MAGIC, codec.VERSION) and len(buffers[0]) == codec.PREFIX.size == 16
    data = codec.encode_bytes(msg)
    header = msgpack.unpackb(data[16:16 + header_len])
    payload = data[16 + header_len:]
    assert len(payload) == payload_len
    assert header["t"] == "RoundStart" and "weights" not in header["f"]
    offset = 0
    for (field, key, dtype, shape), t in zip(header["x"], msg.weights.values()):
        assert field == "weights" and dtype == codec.DTYPE_NAMES[t.dtype] and shape == list(t.shape)
        start = (offset + codec.TENSOR_ALIGN - 1) // codec.TENSOR_ALIGN * codec.TENSOR_ALIGN
        assert payload[offset:start] == bytes(start - offset)  # zero padding
        assert payload[start:start + len(raw_bytes(t))] == raw_bytes(t)
        offset = start + len(raw_bytes(t))
    assert offset == payload_len


def test_contiguous_tensors_are_not_copied_when_encoding():
    t = torch.arange(1000, dtype=torch.float32)
    buffers = codec.encode(m.DeviceDone(round=1, samples=1, steps=1, train_seconds=0.0, weights={"w": t}))
    mv = [b for b in buffers if isinstance(b, memoryview)][0]
    t[0] = 42.0  # the buffer is the tensor's own memory
    assert struct.unpack_from("<f", mv, 0)[0] == 42.0


def test_decoded_tensors_are_aligned_views_of_one_buffer():
    msg = FACTORIES["SessionSnapshot"]()
    (got,) = codec.decode_all(codec.encode_bytes(msg))
    ptrs = [t.data_ptr() for t in got.state.values() if t.numel()]
    base = min(ptrs)
    assert all((p - base) % codec.TENSOR_ALIGN == 0 for p in ptrs)
    got.state["big"].add_(1.0)  # writable


def test_several_frames_back_to_back_in_one_buffer():
    dec = codec.FrameDecoder()
    dec.receive_data(STREAM + STREAM)
    got = drain(dec)
    assert len(got) == 2 * len(ALL)
    for a, b in zip(ALL + ALL, got):
        assert_same_message(a, b)
    assert dec.at_frame_boundary


def test_frames_fed_while_one_is_waiting_keep_their_order():
    dec = codec.FrameDecoder()
    for data in ALL_BYTES:  # nobody takes anything until all bytes are in
        dec.receive_data(data)
    got = drain(dec)
    for a, b in zip(ALL, got, strict=True):
        assert_same_message(a, b)


def test_stream_one_byte_at_a_time():
    dec = codec.FrameDecoder()
    got = []
    for i in range(len(STREAM)):
        dec.receive_data(STREAM[i:i + 1])
        got += drain(dec)
    for a, b in zip(ALL, got, strict=True):
        assert_same_message(a, b)


def test_decode_all():
    for a, b in zip(ALL, codec.decode_all(STREAM), strict=True):
        assert_same_message(a, b)
    with pytest.raises(RemoteProtocolError):
        list(codec.decode_all(STREAM[:-1]))


@FAST
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=60))
def test_random_chunkings(cuts):
    got = feed_in_chunks(STREAM, cuts)
    for a, b in zip(ALL, got, strict=True):
        assert_same_message(a, b)


@FAST
@given(st.data())
def test_random_chunkings_of_each_message(data):
    i = data.draw(st.integers(0, len(ALL) - 1))
    frame = ALL_BYTES[i]
    cuts = data.draw(st.lists(st.integers(0, len(frame)), max_size=20))
    (got,) = feed_in_chunks(frame, cuts)
    assert_same_message(ALL[i], got)


@FAST
@given(shape=st.lists(st.integers(0, 4), max_size=codec.MAX_DIMS),
       dtype=st.sampled_from(sorted(codec.DTYPES)), seed=st.integers(0, 2 ** 31))
def test_random_tensors_round_trip_bit_for_bit(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    nbytes = math.prod(shape) * torch.empty(0, dtype=codec.DTYPES[dtype]).element_size()
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    if dtype == "bool":
        raw = raw % 2
    t = raw.view(codec.DTYPES[dtype]).reshape(shape) if nbytes else torch.empty(shape, dtype=codec.DTYPES[dtype])
    msg = m.DeviceDone(round=1, samples=1, steps=1, train_seconds=1.0, weights={"t": t, "u": t.clone()})
    (got,) = codec.decode_all(codec.encode_bytes(msg))
    assert_same_message(msg, got)


# --------------------------------------------------------------------------------------
# end of stream, boundaries, broken state
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("cut", [1, 15, 16, 17, 40, -17, -1])
def test_end_of_stream_inside_a_frame(cut):
    frame = ALL_BYTES[[x.TYPE for x in ALL].index("RoundStart")]
    dec = codec.FrameDecoder()
    dec.receive_data(frame[:cut])
    assert dec.next_message() is codec.NEED_DATA
    assert not dec.at_frame_boundary
    dec.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        dec.next_message()
    with pytest.raises(RemoteProtocolError):  # and it stays broken
        dec.next_message()


def test_end_of_stream_after_a_whole_frame_and_part_of_the_next():
    dec = codec.FrameDecoder()
    dec.receive_data(ALL_BYTES[0] + ALL_BYTES[1][:10])
    dec.receive_data(b"")
    assert_same_message(ALL[0], dec.next_message())
    with pytest.raises(RemoteProtocolError):
        dec.next_message()


def test_end_of_stream_at_a_boundary_is_clean():
    dec = codec.FrameDecoder()
    dec.receive_data(b"")
    assert dec.next_message() is codec.NEED_DATA and dec.at_frame_boundary
    dec = codec.FrameDecoder()
    dec.receive_data(ALL_BYTES[3])
    dec.receive_data(b"")
    assert_same_message(ALL[3], dec.next_message())
    assert dec.next_message() is codec.NEED_DATA


def test_data_after_end_of_stream_is_our_mistake():
    dec = codec.FrameDecoder()
    dec.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        dec.receive_data(ALL_BYTES[0])


def test_at_frame_boundary_through_a_frame():
    frame = ALL_BYTES[0]
    dec = codec.FrameDecoder()
    states = []
    for i in range(len(frame)):
        dec.receive_data(frame[i:i + 1])
        states.append(dec.at_frame_boundary)
    assert not any(states)
    dec.next_message()
    assert dec.at_frame_boundary


def test_decoder_stays_broken_after_an_error():
    dec = codec.FrameDecoder()
    dec.receive_data(b"XX" + bytes(14))
    with pytest.raises(RemoteProtocolError) as first:
        dec.next_message()
    dec.receive_data(ALL_BYTES[0])  # a good frame afterwards changes nothing
    for _ in range(3):
        with pytest.raises(RemoteProtocolError) as again:
            dec.next_message()
        assert str(again.value) == str(first.value)


def test_error_in_a_later_frame_surfaces_after_the_good_ones():
    dec = codec.FrameDecoder()
    dec.receive_data(ALL_BYTES[0] + ALL_BYTES[1] + b"garbage-garbage-garbage" + ALL_BYTES[2])
    assert_same_message(ALL[0], dec.next_message())
    assert_same_message(ALL[1], dec.next_message())
    with pytest.raises(RemoteProtocolError):
        dec.next_message()
    with pytest.raises(RemoteProtocolError):
        dec.next_message()


# --------------------------------------------------------------------------------------
# hand-made frames: every limit and rule
# --------------------------------------------------------------------------------------

def frame(header: object, payload: bytes = b"", *, header_bytes: bytes | None = None, payload_len: int | None = None,
          header_len: int | None = None, magic: bytes = codec.MAGIC, version: int = codec.VERSION) -> bytes:
    hb = msgpack.packb(header, use_bin_type=True) if header_bytes is None else header_bytes
    return codec.PREFIX.pack(magic, version, len(hb) if header_len is None else header_len,
                             len(payload) if payload_len is None else payload_len) + hb + payload


def wire_parts(msg: m.Message) -> tuple[dict, bytes]:
    """(header as a dict, payload) of a valid message, to be edited into invalid ones."""
    data = codec.encode_bytes(msg)
    _, _, hl, _ = codec.PREFIX.unpack_from(data)
    return msgpack.unpackb(data[16:16 + hl]), data[16 + hl:]


def decode_one(data: bytes, *, max_payload: int = codec.DEFAULT_MAX_PAYLOAD_BYTES):
    dec = codec.FrameDecoder(max_payload=max_payload)
    dec.receive_data(data)
    return dec.next_message()


def assert_refused(data: bytes, **kw) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        decode_one(data, **kw)
    return info.value


def test_frame_helper_builds_valid_frames():
    header, payload = wire_parts(FACTORIES["Activations"]())
    assert_same_message(FACTORIES["Activations"](), decode_one(frame(header, payload)))


def test_bad_magic_and_version():
    good = ALL_BYTES[0]
    assert_refused(b"GET / HTTP/1.1\r\n\r\n")
    assert_refused(b"FG" + good[2:])
    assert_refused(good[:2] + bytes([codec.VERSION + 1]) + good[3:])
    assert_refused(good[:2] + bytes([0]) + good[3:])


def test_header_over_the_limit_is_refused_from_the_prefix_alone():
    prefix = codec.PREFIX.pack(codec.MAGIC, codec.VERSION, codec.MAX_HEADER_BYTES + 1, 0)
    assert len(prefix) == 16
    assert_refused(prefix)  # no header bytes needed: refused before buffering them
    assert_refused(codec.PREFIX.pack(codec.MAGIC, codec.VERSION, 2 ** 32 - 1, 0))


def test_header_at_the_limit_is_read():
    dec = codec.FrameDecoder()
    dec.receive_data(codec.PREFIX.pack(codec.MAGIC, codec.VERSION, codec.MAX_HEADER_BYTES, 0))
    assert dec.next_message() is codec.NEED_DATA


def test_payload_over_the_limit_is_refused_from_the_prefix_alone():
    header, payload = wire_parts(FACTORIES["DeviceRound"]())
    assert len(payload) > 100
    data = frame(header, payload)
    assert_refused(data, max_payload=len(payload) - 1)
    assert_refused(data[:16], max_payload=len(payload) - 1)
    assert_same_message(FACTORIES["DeviceRound"](), decode_one(data, max_payload=len(payload)))
    assert_refused(codec.PREFIX.pack(codec.MAGIC, codec.VERSION, 10, codec.DEFAULT_MAX_PAYLOAD_BYTES + 1))
    assert_refused(codec.PREFIX.pack(codec.MAGIC, codec.VERSION, 10, 2 ** 64 - 1))


def _with_descriptor(descr: list, payload: bytes = b"", payload_len: int | None = None) -> bytes:
    header = {"t": "DeviceDone", "f": {"round": 1, "samples": 1, "steps": 1, "train_seconds": 0.0}, "x": descr}
    return frame(header, payload, payload_len=payload_len)


def test_descriptor_helper_accepts_a_valid_tensor():
    msg = decode_one(_with_descriptor([["weights", "w", "float32", [2]]], struct.pack("<2f", 1.0, 2.0)))
    assert msg.weights["w"].tolist() == [1.0, 2.0]


@pytest.mark.parametrize("descr,payload", [
    ([["weights", "w", "float32", [1] * (codec.MAX_DIMS + 1)]], bytes(4)),              # too many dims
    ([["weights", "w", "float32", [-1]]], b""),                                           # negative
    ([["weights", "w", "float32", [2, -2]]], bytes(16)),
    ([["weights", "w", "float32", [1 << 40]]], bytes(16)),                                # huge
    ([["weights", "w", "float32", [1 << 39, 1 << 39]]], bytes(16)),                       # huge product
    ([["weights", "w", "float32", [2 ** 64 - 1]]], bytes(16)),
    ([["weights", "w", "float32", [True]]], bytes(4)),                                    # bool is not a size
    ([["weights", "w", "float32", [1.0]]], bytes(4)),
    ([["weights", "w", "float32", "2"]], bytes(8)),
    ([["weights", "w", "float32", None]], bytes(8)),
    ([["weights", "w", "complex64", [1]]], bytes(8)),                                     # unknown dtype
    ([["weights", "w", "float128", [1]]], bytes(16)),
    ([["weights", "w", "object", [1]]], bytes(8)),
    ([["weights", "w", 5, [1]]], bytes(8)),
    ([["weights", "w", ["float32"], [1]]], bytes(4)),
    ([["weights", "w", "Float32", [1]]], bytes(4)),
    ([["weights", "w", "float32"]], bytes(4)),                                            # malformed entries
    ([["weights", "w", "float32", [1], 0]], bytes(4)),
    ([[1, "w", "float32", [1]]], bytes(4)),
    ([["weights", b"w", "float32", [1]]], bytes(4)),
    (["weights"], bytes(4)),
    ({"weights": 1}, bytes(4)),
    ([["weights", "w", "float32", [2]]], bytes(4)),                                       # payload too short
    ([["weights", "w", "float32", [1]]], bytes(8)),                                       # payload too long
    ([["weights", "w", "float32", [1]], ["weights", "v", "float32", [1]]], bytes(8)),     # alignment ignored
    ([["weights", "w", "float32", [1]], ["weights", "w", "float32", [1]]], bytes(20)),    # repeated tensor
    ([["samples", "w", "float32", [1]]], bytes(4)),                                       # not a tensor field
    ([["nosuch", "w", "float32", [1]]], bytes(4)),
    ([["weights", "b", "bool", [3]]], b"\x00\x01\x02"),                                   # bool byte 2
    ([["weights", "b", "bool", [2]]], b"\x01\xff"),
    ([["weights", "w", "float32", [1]]] * (codec.MAX_TENSORS + 1), bytes(16 * (codec.MAX_TENSORS + 1))),
])
def test_bad_tensor_descriptors(descr, payload):
    assert_refused(_with_descriptor(descr, payload))


@pytest.mark.parametrize("shape", [
    [0, 1 << 39, 1 << 39],                      # strides overflow int64 (torch: RuntimeError)
    [1 << 39, 1 << 39, 0, 1 << 39, 1 << 39],    # storage size overflows
    [0] + [1 << 39] * 7,
    [0, 1 << 20, 1 << 20],                      # span 2**40: at the limit
    [(1 << 40) - 1, 0, 2],
])
def test_zero_element_tensors_with_huge_sizes_are_a_protocol_error(shape):
    # no element, no payload byte: the byte counts all pass, the sizes do not
    err = assert_refused(_with_descriptor([["weights", "w", "float64", shape]], b""))
    assert len(str(err)) < 200  # names the shape without echoing all of it


@pytest.mark.parametrize("shape", [[0, 1 << 19, 1 << 19], [3, 0, 1000, 1000], [0] * 8])
def test_zero_element_tensors_with_large_sizes_are_fine(shape):
    msg = decode_one(_with_descriptor([["weights", "w", "float32", shape]], b""))
    assert list(msg.weights["w"].shape) == shape and msg.weights["w"].numel() == 0


def test_descriptor_payload_length_mismatch_by_padding():
    # two tensors where the second needs padding: length without padding is refused
    descr = [["weights", "a", "uint8", [3]], ["weights", "b", "float32", [1]]]
    assert_refused(_with_descriptor(descr, bytes(3 + 4)))
    assert decode_one(_with_descriptor(descr, bytes(16 + 4))).weights["b"].shape == (1,)


def test_prefix_payload_length_disagrees_with_the_bytes():
    # the prefix claims more payload than the descriptors: refused as soon as the header is in
    descr = [["weights", "w", "float32", [1]]]
    assert_refused(_with_descriptor(descr, bytes(4), payload_len=8) + bytes(4))


# --------------------------------------------------------------------------------------
# payload memory follows the bytes that arrive, not the header's claim
# --------------------------------------------------------------------------------------

def _big_frame_head(nbytes: int) -> bytes:
    """Prefix and header of a DeviceDone whose one uint8 tensor has ``nbytes`` bytes."""
    header = {"t": "DeviceDone", "f": {"round": 1, "samples": 1, "steps": 1, "train_seconds": 0.0},
              "x": [["weights", "w", "uint8", [nbytes]]]}
    hb = msgpack.packb(header, use_bin_type=True)
    return codec.PREFIX.pack(codec.MAGIC, codec.VERSION, len(hb), nbytes) + hb


def test_a_header_declaring_400_mib_allocates_little_until_the_bytes_arrive():
    import tracemalloc
    big = 400 << 20
    head = _big_frame_head(big)
    assert len(head) < 120  # a "100-byte header"
    dec = codec.FrameDecoder()
    tracemalloc.start()
    try:
        dec.receive_data(head)
        assert dec.next_message() is codec.NEED_DATA
        _, peak = tracemalloc.get_traced_memory()
        assert peak <= codec.EAGER_PAYLOAD_BYTES + (1 << 20)  # not 400 MiB
        room = dec.payload_buffer()
        assert room is not None and len(room) == codec.EAGER_PAYLOAD_BYTES
        del room
        chunk = bytes(range(256)) * 4096  # 1 MiB
        got = 0
        for _ in range(40):  # 40 MiB of the 400 arrive: the buffer stays within twice that
            dec.receive_data(chunk)
            got += len(chunk)
            assert dec.next_message() is codec.NEED_DATA
        current, peak = tracemalloc.get_traced_memory()
        assert current <= 2 * got + (1 << 20) and peak <= 3 * got + (1 << 20)
    finally:
        tracemalloc.stop()


def test_an_eager_payload_is_one_buffer_received_into_directly():
    head = _big_frame_head(5_000_000)  # a migration snapshot's size: allocated whole
    dec = codec.FrameDecoder()
    dec.receive_data(head)
    room = dec.payload_buffer()
    assert room is not None and len(room) == 5_000_000
    room[:] = b"\x07" * 5_000_000
    dec.payload_written(5_000_000)
    msg = dec.next_message()
    w = msg.weights["w"]
    assert w.shape == (5_000_000,) and int(w[0]) == int(w[-1]) == 7
    assert w.untyped_storage().data_ptr() == torch.frombuffer(room, dtype=torch.uint8).data_ptr()  # no copy


@pytest.mark.parametrize("eager", [1, 100, 4096, 1 << 30])
def test_growing_payloads_decode_bit_for_bit_in_any_chunking(eager):
    g = torch.Generator().manual_seed(3)
    msgs = [FACTORIES["RoundStart"](), m.DeviceDone(round=1, samples=9, steps=2, train_seconds=0.5,
                                                    weights={"a": torch.randn(3000, generator=g),
                                                             "b": torch.randint(0, 255, (777,), dtype=torch.uint8,
                                                                                generator=g)})]
    data = b"".join(codec.encode_bytes(x) for x in msgs)
    rng = __import__("random").Random(eager)
    for cuts in ([], list(range(len(data))), sorted(rng.sample(range(len(data)), 40))):
        dec = codec.FrameDecoder(eager_payload=eager)
        got, start = [], 0
        for cut in cuts + [len(data)]:
            if cut > start:
                dec.receive_data(data[start:cut])
                got += drain(dec)
                start = cut
        assert len(got) == 2
        for a, b in zip(msgs, got):
            assert_same_message(a, b)


@pytest.mark.parametrize("eager", [1, 1000, 1 << 30])
def test_direct_receive_while_the_buffer_grows_keeps_old_views_valid(eager):
    """What ``Connection.recv`` does: receive into ``payload_buffer()``, still holding the
    previous view when it asks for the next one (a bytearray with a live view cannot be
    resized: the decoder must never try)."""
    msg = m.DeviceDone(round=1, samples=9, steps=2, train_seconds=0.5,
                       weights={"a": torch.arange(50_000, dtype=torch.float32)})
    data = codec.encode_bytes(msg)
    dec = codec.FrameDecoder(eager_payload=eager)
    pos, views = 0, []
    while pos < len(data):
        room = dec.payload_buffer()
        if room is None:
            dec.receive_data(data[pos:pos + 7])
            pos += 7
            continue
        views.append(room)  # kept alive on purpose
        n = min(len(room), 3001, len(data) - pos)
        room[:n] = data[pos:pos + n]
        dec.payload_written(n)
        pos += n
    (got,) = drain(dec)
    assert_same_message(msg, got)
    if eager < 1000:
        assert len({id(v.obj) for v in views}) > 3  # it grew, buffer after buffer


def test_payload_written_past_the_room_is_our_mistake():
    dec = codec.FrameDecoder(eager_payload=16)
    dec.receive_data(_big_frame_head(1000))
    room = dec.payload_buffer()
    assert len(room) == 16
    with pytest.raises(LocalProtocolError):
        dec.payload_written(17)
    dec.payload_written(16)
    assert len(dec.payload_buffer()) == 16  # doubled to 32, 16 of them free


def test_a_big_frame_over_the_eager_size_decodes_right():
    n = codec.EAGER_PAYLOAD_BYTES * 2 + 12345
    t = torch.arange(n // 4, dtype=torch.int32)
    msg = m.DeviceDone(round=1, samples=9, steps=2, train_seconds=0.5, weights={"w": t})
    data = codec.encode_bytes(msg)
    dec = codec.FrameDecoder()
    for i in range(0, len(data), 1 << 20):
        dec.receive_data(data[i:i + (1 << 20)])
    (got,) = drain(dec)
    assert torch.equal(got.weights["w"], t)


def _header_of(name: str) -> tuple[dict, bytes]:
    return wire_parts(FACTORIES[name]())


def _edited(name: str, edit) -> bytes:
    header, payload = _header_of(name)
    edit(header)
    return frame(header, payload)


@pytest.mark.parametrize("name,field,value", [
    ("SessionPull", "round", "2"),            # round as str
    ("SessionPull", "round", True),           # bool where int
    ("SessionPull", "round", 2.0),            # float where int
    ("SessionPull", "round", None),
    ("SessionPull", "round", -1),             # negative counter
    ("SessionPull", "step", -5),
    ("SessionPull", "device", 1),             # int where str
    ("SessionPull", "device", b"device1"),    # bytes where str
    ("SessionPull", "device", ["device1"]),
    ("AttachReply", "ok", 1),                 # int where bool
    ("AttachReply", "ok", "yes"),
    ("AttachReply", "transfer_ms", "1.0"),    # str where float
    ("AttachReply", "transfer_ms", True),     # bool where float
    ("AttachReply", "transfer_ms", float("nan")),
    ("AttachReply", "transfer_ms", float("inf")),
    ("AttachReply", "state_bytes", -1),
    ("RoundStart", "round", 0),               # rounds start at 1
    ("RoundStart", "lr", float("-inf")),
    ("RoundStart", "batch_size", -100),
    ("RoundStart", "local_epochs", -1),
    ("EdgeStatus", "attached", "device1"),    # str where list
    ("EdgeStatus", "attached", [1, 2]),       # list of the wrong type
    ("EdgeStatus", "attached", {"a": 1}),
    ("AttachRequest", "kind", "teleport"),    # value rule
    ("MigrationReport", "pause_ms", float("nan")),
    ("Gradients", "loss", "nan"),
    ("SessionSnapshot", "meta", {"k": b"bytes"}),      # not plain data
    ("SessionSnapshot", "meta", {"a": nested(20)}),    # too deep
    ("SessionSnapshot", "meta", msgpack.ExtType(5, b"x")),
    ("SessionSnapshot", "checksum", 5),
])
def test_wrong_field_types_and_values(name, field, value):
    def edit(h):
        h["f"][field] = value
    assert_refused(_edited(name, edit))


@pytest.mark.parametrize("name,field", [("SessionPull", "round"), ("StatusReply", "pending"), ("Gradients", "loss")])
def test_missing_field(name, field):
    def edit(h):
        del h["f"][field]
    assert_refused(_edited(name, edit))


@pytest.mark.parametrize("name", ["SessionPull", "StatusRequest", "Gradients"])
def test_extra_field(name):
    def edit(h):
        h["f"]["extra"] = 1
    assert_refused(_edited(name, edit))


def test_tensor_field_in_the_header_is_refused():
    def edit(h):
        h["f"]["weights"] = {}
    assert_refused(_edited("DeviceDone", edit))


def test_missing_tensor_field_is_an_empty_map():
    # a Tensors field with no tensors is simply empty
    header, payload = _header_of("DeviceDone")
    assert header["x"] == [] and payload == b""
    assert decode_one(frame(header)).weights == {}


def test_activations_shape_rules_apply_to_received_messages():
    base = {"round": 1, "step": 0}

    def act(descr, payload):
        return frame({"t": "Activations", "f": dict(base), "x": descr}, payload)

    ok = act([["batch", "x", "float32", [2, 1]], ["batch", "y", "int64", [2]]], bytes(16) + bytes(16))
    assert decode_one(ok).batch["y"].tolist() == [0, 0]
    for descr, payload in [
        ([["batch", "x", "float32", [2, 1]]], bytes(8)),                                           # no y
        ([["batch", "x", "float32", [2, 1]], ["batch", "y", "int32", [2]]], bytes(16) + bytes(8)),   # y int32
        ([["batch", "x", "float32", [2]], ["batch", "y", "int64", [2]]], bytes(16) + bytes(16)),     # x 1-d
        ([["batch", "x", "float32", [3, 1]], ["batch", "y", "int64", [2]]], bytes(16) + bytes(16)),  # n differs
        ([["batch", "x", "int64", [2, 1]], ["batch", "y", "int64", [2]]], bytes(16) + bytes(16)),    # x not float
        ([["batch", "x", "float32", [2, 1]], ["batch", "y", "int64", [2]], ["batch", "z", "int64", [0]]],
         bytes(16) + bytes(16)),                                                                    # extra z
    ]:
        assert_refused(act(descr, payload))


def test_gradients_loss_may_be_non_finite_on_the_wire():
    for loss in (float("nan"), float("inf"), float("-inf")):
        def edit(h, loss=loss):
            h["f"]["loss"] = loss
        got = decode_one(_edited("Gradients", edit))
        assert struct.pack("<d", got.loss) == struct.pack("<d", loss)


def test_int_on_the_wire_becomes_float():
    def edit(h):
        h["f"]["transfer_ms"] = 7
    got = decode_one(_edited("AttachReply", edit))
    assert got.transfer_ms == 7.0 and type(got.transfer_ms) is float


@pytest.mark.parametrize("header", [
    {"t": "NoSuchMessage", "f": {}, "x": []},
    {"t": "Message", "f": {}, "x": []},
    {"t": "", "f": {}, "x": []},
    {"t": "__class__", "f": {}, "x": []},
    {"t": 5, "f": {}, "x": []},
    {"t": "StatusRequest", "f": [], "x": []},
    {"t": "StatusRequest", "f": {}},
    {"t": "StatusRequest", "f": {}, "x": [], "y": 1},
    {"t": "StatusRequest", "f": {}, "x": {}},
    {"t": "StatusRequest", "f": {}, "x": None},
    {"t": "StatusRequest", "f": {b"k": 1}, "x": []},
    {b"t": "StatusRequest", "f": {}, "x": []},
    ["StatusRequest", {}, []],
    "StatusRequest",
    None,
])
def test_bad_headers(header):
    assert_refused(frame(header))


def test_valid_empty_message_by_hand():
    assert isinstance(decode_one(frame({"t": "StatusRequest", "f": {}, "x": []})), m.StatusRequest)


@pytest.mark.parametrize("hb", [b"", b"\xc1", b"\x81", b"\x83\xa1t", b"\x80\x80", b"\xdf\xff\xff\xff\xff",
                                b"\x81\x01\x02", b"\x81\xc0\x02"])
def test_header_that_is_not_msgpack_or_has_bad_keys(hb):
    assert_refused(frame(None, header_bytes=hb))


# --------------------------------------------------------------------------------------
# adversarial input: only RemoteProtocolError, never anything else
# --------------------------------------------------------------------------------------

def feed_adversarial(data: bytes, cuts: list[int], *, eof: bool = True, max_payload: int = 1 << 20) -> None:
    """Feed and drain; only NEED_DATA, messages or RemoteProtocolError are allowed out."""
    dec = codec.FrameDecoder(max_payload=max_payload)
    start = 0
    try:
        for cut in sorted(set(cuts)) + [len(data)]:
            if cut > start:
                dec.receive_data(data[start:cut])
                start = cut
                drain(dec)
        if eof:
            dec.receive_data(b"")
            drain(dec)
            assert dec.at_frame_boundary
    except RemoteProtocolError:
        with pytest.raises(RemoteProtocolError):
            dec.next_message()  # and it stays broken


cut_lists = st.lists(st.integers(0, 4096), max_size=8)


@settings(max_examples=200, deadline=None, database=None)
@given(st.binary(max_size=512), cut_lists)
def test_arbitrary_bytes(data, cuts):
    feed_adversarial(data, cuts)


@settings(max_examples=200, deadline=None, database=None)
@given(st.binary(max_size=512), cut_lists, st.booleans())
def test_arbitrary_bytes_after_a_valid_prefix_magic(data, cuts, eof):
    feed_adversarial(codec.MAGIC + bytes([codec.VERSION]) + data, cuts, eof=eof)


@settings(max_examples=150, deadline=None, database=None)
@given(st.integers(0, len(ALL) - 1), st.lists(st.tuples(st.integers(0, 10 ** 9), st.integers(0, 7)), min_size=1,
                                               max_size=4), cut_lists)
def test_valid_frames_with_flipped_bits(i, flips, cuts):
    data = bytearray(ALL_BYTES[i] + ALL_BYTES[(i + 1) % len(ALL)])
    for pos, bit in flips:
        data[pos % len(data)] ^= 1 << bit
    feed_adversarial(bytes(data), cuts)


@settings(max_examples=150, deadline=None, database=None)
@given(st.integers(0, len(ALL) - 1), st.integers(0, 10 ** 9), cut_lists)
def test_truncated_valid_frames(i, cut_at, cuts):
    data = ALL_BYTES[i]
    feed_adversarial(data[:cut_at % len(data)], cuts)


def test_every_truncation_of_every_message_is_refused_at_end_of_stream():
    for data in ALL_BYTES:
        for cut in range(1, len(data), max(1, len(data) // 97)):
            dec = codec.FrameDecoder()
            dec.receive_data(data[:cut])
            dec.receive_data(b"")
            with pytest.raises(RemoteProtocolError):
                dec.next_message()


def test_every_single_byte_change_of_the_prefix_and_header_is_handled():
    # deterministic sweep: set each byte of the prefix and header of a message to a few values
    data = ALL_BYTES[[x.TYPE for x in ALL].index("Activations")]
    _, _, hl, _ = codec.PREFIX.unpack_from(data)
    for pos in range(16 + hl):
        for value in (0x00, 0x01, 0x7F, 0x80, 0xC1, 0xFF, data[pos] ^ 0x20):
            mutated = data[:pos] + bytes([value]) + data[pos + 1:]
            feed_adversarial(mutated, [])


wire_int = st.integers(-(2 ** 63), 2 ** 64 - 1)  # what msgpack can carry
json_leaf = st.one_of(st.none(), st.booleans(), wire_int, st.floats(), st.text(max_size=8), st.binary(max_size=8))
json_value = st.recursive(json_leaf, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                            st.dictionaries(st.text(max_size=6), kids, max_size=4)),
                          max_leaves=10)
field_names = st.sampled_from(sorted({f for c in m.MESSAGE_TYPES.values() for f in c._hints}) + ["zzz"])
descriptor = st.tuples(
    st.one_of(field_names, wire_int),
    st.one_of(st.sampled_from(["x", "y", "g", "w"]), st.text(max_size=3)),
    st.one_of(st.sampled_from(sorted(codec.DTYPES)), st.text(max_size=8), wire_int),
    st.one_of(st.lists(st.one_of(st.integers(-2, 6), wire_int), max_size=10), wire_int, st.none()),
).map(list)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(t=st.one_of(st.sampled_from(sorted(m.MESSAGE_TYPES)), st.text(max_size=10), wire_int),
       f=st.one_of(st.dictionaries(field_names, json_value, max_size=8), json_value),
       x=st.one_of(st.lists(descriptor, max_size=4), json_value),
       payload=st.binary(max_size=300), payload_len=st.one_of(st.none(), st.integers(0, 400)),
       cuts=cut_lists)
def test_valid_prefix_with_random_headers(t, f, x, payload, payload_len, cuts):
    header = {"t": t, "f": f, "x": x}
    feed_adversarial(frame(header, payload, payload_len=payload_len), cuts)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(ALL) - 1), st.data())
def test_valid_messages_with_one_random_field(i, data):
    header, payload = wire_parts(ALL[i])
    if header["f"]:
        field = data.draw(st.sampled_from(sorted(header["f"])))
        header["f"][field] = data.draw(json_value)
    feed_adversarial(frame(header, payload), [])


# --------------------------------------------------------------------------------------
# sending: what we may not put on the wire
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128, torch.uint16, torch.uint32, torch.uint64,
                                   torch.float8_e4m3fn])
def test_dtype_not_whitelisted_on_encode(dtype):
    msg = m.DeviceDone(round=1, samples=1, steps=1, train_seconds=0.0, weights={"w": torch.zeros(2, dtype=dtype)})
    with pytest.raises(LocalProtocolError):
        codec.encode(msg)


def test_too_many_tensors_on_encode():
    weights = {str(i): torch.zeros(0) for i in range(codec.MAX_TENSORS + 1)}
    with pytest.raises(LocalProtocolError):
        codec.encode(m.DeviceDone(round=1, samples=1, steps=1, train_seconds=0.0, weights=weights))
    weights.pop("0")
    assert len(list(codec.decode_all(codec.encode_bytes(
        m.DeviceDone(round=1, samples=1, steps=1, train_seconds=0.0, weights=weights))))) == 1


def test_header_too_big_on_encode():
    big = "x" * (codec.MAX_HEADER_BYTES + 1)
    with pytest.raises(LocalProtocolError):
        codec.encode(m.ErrorNotice(kind="k", detail=big))


@pytest.mark.parametrize("make", [
    lambda: m.SessionPull(device="d", round=2 ** 64, step=0, target="t"),
    lambda: m.SessionSnapshot(device="d", round=1, step=0, meta={"n": -(2 ** 63) - 1}, checksum="", state={}),
], ids=["int-field", "int-in-meta"])
def test_int_out_of_wire_range_is_a_local_protocol_error(make):
    with pytest.raises(LocalProtocolError):
        codec.encode(make())


def test_too_many_dims_on_encode():
    msg = m.DeviceDone(round=1, samples=1, steps=1, train_seconds=0.0,
                       weights={"w": torch.zeros([1] * (codec.MAX_DIMS + 1))})
    with pytest.raises(LocalProtocolError):
        codec.encode(msg)


# --------------------------------------------------------------------------------------
# messages: validated when built
# --------------------------------------------------------------------------------------

def test_messages_are_frozen_and_keyword_only():
    msg = m.SessionPull(device="d", round=1, step=0, target="t")
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.round = 2
    with pytest.raises(TypeError):
        m.SessionPull("d", 1, 0, "t")
    with pytest.raises(TypeError):
        m.SessionPull(device="d", round=1, step=0)


@pytest.mark.parametrize("make", [
    lambda: m.SessionPull(device="d", round="1", step=0, target="t"),
    lambda: m.SessionPull(device="d", round=True, step=0, target="t"),
    lambda: m.SessionPull(device="d", round=1.0, step=0, target="t"),
    lambda: m.SessionPull(device="d", round=-1, step=0, target="t"),
    lambda: m.SessionPull(device=None, round=1, step=0, target="t"),
    lambda: m.AttachReply(ok=1, reason="", run_name="", mode="", action="continue", round=1, how="", resume_step=0, state_bytes=0, transfer_ms=0.0),
    lambda: m.AttachReply(ok=True, reason="", run_name="", mode="", action="continue", round=1, how="", resume_step=0, state_bytes=-1, transfer_ms=0.0),
    lambda: m.AttachReply(ok=True, reason="", run_name="", mode="", action="continue", round=1, how="", resume_step=0, state_bytes=0, transfer_ms="0"),
    lambda: m.AttachReply(ok=True, reason="", run_name="", mode="", action="continue", round=1, how="", resume_step=0, state_bytes=0, transfer_ms=False),
    lambda: m.AttachReply(ok=True, reason="", run_name="", mode="", action="go", round=1, how="", resume_step=0,
                          state_bytes=0, transfer_ms=0.0),
    lambda: m.EdgeStatus(edge="e", attached="device1"),
    lambda: m.EdgeStatus(edge="e", attached=["a", 1]),
    lambda: m.RoundStart(plan={**PLAN, "round": 0}, weights={}),
    lambda: m.RoundStart(plan={**PLAN, "batch_size": -1}, weights={}),
    lambda: m.RoundStart(plan={**PLAN, "lr": "0.1"}, weights={}),
    lambda: m.RoundStart(plan={**PLAN, "participants": "device1"}, weights={}),
    lambda: m.RoundStart(plan={**PLAN, "extra": 1}, weights={}),
    lambda: m.RoundStart(plan={k: v for k, v in PLAN.items() if k != "lr"}, weights={}),
    lambda: m.DeviceRound(plan=[PLAN], weights={}),
    lambda: m.RoundStart(plan=PLAN, weights={"w": [1.0]}),
    lambda: m.RoundStart(plan=PLAN, weights={1: torch.zeros(1)}),
    lambda: m.RoundStart(plan=PLAN, weights=[torch.zeros(1)]),
    lambda: m.AttachRequest(device="d", kind="hop", round=1, step=0, source="", last_round=0, why="move"),
    lambda: m.AttachRequest(device="d", kind="join", round=1, step=0, source="", last_round=0, why="bored"),
    lambda: m.FaultReport(kind="meteor", process="p", peer="q", round=1, step=0, detail="", detected_s=0.0,
                          down_s=0.0, replayed=0, recovery="", samples_lost=0),
    lambda: m.DropCommand(device="d", seconds=-1.0, to=""),
    lambda: m.SessionSnapshot(device="d", round=1, step=0, meta={1: 2}, checksum="", state={}),
    lambda: m.SessionSnapshot(device="d", round=1, step=0, meta={"a": object()}, checksum="", state={}),
    lambda: m.SessionSnapshot(device="d", round=1, step=0, meta={"a": b"x"}, checksum="", state={}),
    lambda: m.SessionSnapshot(device="d", round=1, step=0, meta={"a": {1, 2}}, checksum="", state={}),
    lambda: m.SessionSnapshot(device="d", round=1, step=0, meta=nested(20), checksum="", state={}),
])
def test_construction_validates(make):
    with pytest.raises(LocalProtocolError):
        make()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_are_refused_except_the_loss(value):
    with pytest.raises(LocalProtocolError):
        m.RoundStart(plan={**PLAN, "lr": value}, weights={})
    with pytest.raises(LocalProtocolError):
        m.DeviceDone(round=1, samples=1, steps=1, train_seconds=value, weights={})
    with pytest.raises(LocalProtocolError):
        m.MigrationReport(device="d", source="a", target="b", round=1, step=0, mode="fedfly", pause_ms=value,
                          state_bytes=0, transfer_ms=0.0)
    g = m.Gradients(round=1, step=0, loss=value, grad={})
    assert struct.pack("<d", g.loss) == struct.pack("<d", value)


def test_int_to_float_and_tuple_to_list_normalisation():
    msg = m.RoundStart(plan={**PLAN, "lr": 1, "momentum": 0}, weights={})
    plan = msg.round_plan
    assert plan.lr == 1.0 and type(plan.lr) is float and type(plan.momentum) is float
    g = m.Gradients(round=1, step=0, loss=3, grad={})
    assert type(g.loss) is float
    st_ = m.EdgeStatus(edge="e", attached=("a", "b"))
    assert st_.attached == ["a", "b"] and type(st_.attached) is list


def test_zero_counters_are_fine():
    # accepted when built and again when decoded (the decoder validates on its side too)
    for msg in (m.SessionPull(device="", round=0, step=0, target=""),
                m.DeviceDone(round=0, samples=0, steps=0, train_seconds=0.0, weights={})):
        assert msg.round == 0
        assert_same_message(msg, next(codec.decode_all(codec.encode_bytes(msg))))


@pytest.mark.parametrize("batch", [
    {"x": _x()},
    {"x": _x(), "y": torch.tensor([1, 0, 9, 3]), "z": torch.zeros(1)},
    {"x": _x(), "y": torch.tensor([1, 0, 9, 3], dtype=torch.int32)},
    {"x": _x(), "y": torch.tensor([[1, 0, 9, 3]])},
    {"x": torch.zeros(4), "y": torch.tensor([1, 0, 9, 3])},
    {"x": _x(3), "y": torch.tensor([1, 0, 9, 3])},
    {"x": torch.zeros(4, 2, dtype=torch.int64), "y": torch.tensor([1, 0, 9, 3])},
    {"x": torch.zeros(4, 2, dtype=torch.bool), "y": torch.tensor([1, 0, 9, 3])},
    {},
])
def test_activations_shape_checks(batch):
    with pytest.raises(LocalProtocolError):
        m.Activations(round=1, step=0, batch=batch)


def test_activations_accept_any_float_dtype_and_empty_batches():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        msg = m.Activations(round=1, step=0, batch={"x": torch.zeros(2, 3, dtype=dtype),
                                                    "y": torch.zeros(2, dtype=torch.int64)})
        assert msg.batch["x"].dtype == dtype  # kept, not cast to float32
        assert_same_message(msg, next(codec.decode_all(codec.encode_bytes(msg))))
    msg = m.Activations(round=1, step=0, batch={"x": torch.zeros(0, 3), "y": torch.zeros(0, dtype=torch.int64)})
    assert_same_message(msg, next(codec.decode_all(codec.encode_bytes(msg))))


@pytest.mark.parametrize("kind", ["SessionSnapshot", "SessionOffer", "SessionReplica"])
def test_snapshot_tensors_digested_as_they_arrive(kind):
    from common import digest
    tensors = {"a": torch.arange(7, dtype=torch.float32), "e": torch.empty(0), "b": torch.arange(33, dtype=torch.int8),
               "c": torch.ones(3, 5, dtype=torch.float64)}
    msg = {"SessionSnapshot": lambda: m.SessionSnapshot(device="d", round=1, step=0, meta={}, checksum="", state=tensors),
           "SessionOffer": lambda: m.SessionOffer(device="d", round=1, step=0, target="e1", meta={}, state=tensors),
           "SessionReplica": lambda: m.SessionReplica(device="d", round=1, step=0, target="e1", meta={}, checksum="",
                                                      state=tensors, edge_key="")}[kind]()
    frame = codec.encode_bytes(msg)
    want = {("state", k): digest.of(t.numpy().tobytes()) for k, t in tensors.items()}
    assert want[("state", "e")] == digest.EMPTY and len(set(want.values())) == 4
    for chunk in (1, 5, len(frame)):
        dec = codec.FrameDecoder()
        for i in range(0, len(frame), chunk):
            dec.receive_data(frame[i:i + chunk])
        assert codec.arrival_digests(dec.next_message()) == want
    # into the decoder's own buffer (the transport's path), and only for snapshot types
    dec = codec.FrameDecoder()
    dec.receive_data(frame[:40])
    rest = memoryview(frame)[40:]
    while rest:
        room = dec.payload_buffer()
        if room is None:
            dec.receive_data(rest[:1])
            rest = rest[1:]
            continue
        n = min(len(room), len(rest), 17)
        room[:n] = rest[:n]
        del room
        dec.payload_written(n)
        rest = rest[n:]
    assert codec.arrival_digests(dec.next_message()) == want
    act = codec.encode_bytes(m.Activations(round=1, step=0,
                                           batch={"x": tensors["c"].float(), "y": torch.zeros(3, dtype=torch.int64)}))
    assert codec.arrival_digests(next(codec.decode_all(act))) is None

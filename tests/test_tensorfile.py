"""Weights files (safetensors layout): exact round trips, no pickle, every bad file refused."""

from __future__ import annotations

import io
import json
import pickle
import struct

import pytest
import torch

from common import tensorfile
from common.tensorfile import MAX_HEADER, TensorFileError, read_tensors, write_tensors


def _raw_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def assert_same_tensor(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert _raw_bytes(a) == _raw_bytes(b)  # bit for bit, NaN payloads and -0.0 included


def all_dtypes() -> dict[str, torch.Tensor]:
    special = [float("nan"), -0.0, float("inf"), float("-inf"), 1e-40, 3.5, -2.25]
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.tensor(special, dtype=torch.float32),
        "f64": torch.cat([torch.tensor(special, dtype=torch.float64), torch.randn(5, dtype=torch.float64, generator=g)]),
        "f16": torch.tensor(special, dtype=torch.float16).reshape(7, 1),
        "bf16": torch.randn(2, 3, generator=g).to(torch.bfloat16),
        "i64": torch.tensor([-(2 ** 63), 2 ** 63 - 1, 0, -1], dtype=torch.int64),
        "i32": torch.tensor([-(2 ** 31), 2 ** 31 - 1, 7], dtype=torch.int32),
        "i16": torch.tensor([-(2 ** 15), 2 ** 15 - 1], dtype=torch.int16),
        "i8": torch.tensor([-128, 127, 0], dtype=torch.int8),
        "u8": torch.tensor([0, 255, 17], dtype=torch.uint8),
        "bool": torch.tensor([[True, False, True]]),
        "scalar": torch.tensor(2.75),
        "empty": torch.empty(0, 4),
        "empty_int": torch.empty(3, 0, dtype=torch.int64),
        "noncontig": torch.arange(24, dtype=torch.float32).reshape(4, 6).t(),
        "strided": torch.arange(30, dtype=torch.int16)[::4],
        "expanded": torch.tensor([1.5, 2.5]).expand(3, 2),
        "big": torch.randn(64, 33, generator=g),
    }


def test_round_trip_of_every_dtype(tmp_path):
    path = str(tmp_path / "w.safetensors")
    tensors = all_dtypes()
    write_tensors(path, tensors, {"sha256": "abc", "round": 3})
    got, meta = read_tensors(path)
    assert list(got) == list(tensors)  # file order
    for k in tensors:
        assert_same_tensor(got[k], tensors[k])
    assert meta == {"sha256": "abc", "round": "3"}  # metadata values are strings
    # read tensors are independent, writable tensors
    got["big"].add_(1.0)


def test_empty_file_of_no_tensors(tmp_path):
    path = str(tmp_path / "e.safetensors")
    write_tensors(path, {})
    assert read_tensors(path) == ({}, {})


def test_layout_is_safetensors_not_pickle(tmp_path, monkeypatch):
    path = str(tmp_path / "w.safetensors")
    tensors = all_dtypes()
    write_tensors(path, tensors, {"k": "v"})
    data = open(path, "rb").read()
    (n,) = struct.unpack_from("<Q", data)
    assert data[8:9] == b"{"                      # JSON right after the 8-byte LE length
    assert not data.startswith(b"\x80")            # not a pickle stream (protocol 2+ opcode)
    assert n % 8 == 0 and 8 + n <= len(data)      # header padded to 8 bytes
    header = json.loads(data[8:8 + n])
    assert header["__metadata__"] == {"k": "v"}
    body = data[8 + n:]
    end = 0
    for name, t in tensors.items():
        info = header[name]
        begin, stop = info["data_offsets"]
        assert begin == end                        # contiguous, in order
        assert info["shape"] == list(t.shape)
        assert body[begin:stop] == _raw_bytes(t)
        end = stop
    assert end == len(body)
    assert {h["dtype"] for k, h in header.items() if k != "__metadata__"} >= {
        "F32", "F64", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"}

    # reading never unpickles anything
    def no_pickle(*a, **k):
        raise AssertionError("pickle used")
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "Unpickler", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    got, _ = read_tensors(path)
    assert_same_tensor(got["f32"], tensors["f32"])


def test_write_is_atomic_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "w.safetensors"
    write_tensors(str(path), {"a": torch.ones(3)})
    write_tensors(str(path), {"b": torch.zeros(2)})
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
    assert list(read_tensors(str(path))[0]) == ["b"]


# -- bad files ---------------------------------------------------------------------------

def _file(tmp_path, header: object, body: bytes = b"", *, raw_header: bytes | None = None,
          length: int | None = None) -> str:
    head = raw_header if raw_header is not None else json.dumps(header).encode()
    n = len(head) if length is None else length
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", n) + head + body)
    return str(path)


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BAD = {
    "header length past the end": dict(header={}, length=1000),
    "header length over the limit": dict(header={}, length=MAX_HEADER + 1),
    "header length 2**64-1": dict(header={}, length=2 ** 64 - 1),
    "header not JSON": dict(header=None, raw_header=b"{not json}"),
    "header not UTF-8": dict(header=None, raw_header=b"{\"\xff\xfe\": 1}"),
    "header a list": dict(header=[1, 2]),
    "header a number": dict(header=5),
    "entry not a map": dict(header={"a": [1, 2]}),
    "entry a string": dict(header={"a": "F32"}),
    "entry without dtype": dict(header={"a": {"shape": [2], "data_offsets": [0, 8]}}, body=bytes(8)),
    "entry without shape": dict(header={"a": {"dtype": "F32", "data_offsets": [0, 8]}}, body=bytes(8)),
    "entry without offsets": dict(header={"a": {"dtype": "F32", "shape": [2]}}, body=bytes(8)),
    "unknown dtype": dict(header={"a": _entry(dtype="C64")}, body=bytes(8)),
    "dtype not a string": dict(header={"a": _entry(dtype=["F32"])}, body=bytes(8)),
    "shape not a list": dict(header={"a": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}, body=bytes(8)),
    "shape of words": dict(header={"a": _entry(shape=("two",))}, body=bytes(8)),
    "offsets past the body": dict(header={"a": _entry(offsets=(0, 8))}, body=bytes(4)),
    "negative begin": dict(header={"a": _entry(offsets=(-4, 4))}, body=bytes(8)),
    "offsets too short for the shape": dict(header={"a": _entry(shape=(3,), offsets=(0, 8))}, body=bytes(12)),
    "offsets too long for the shape": dict(header={"a": _entry(shape=(1,), offsets=(0, 8))}, body=bytes(8)),
    "offsets of three numbers": dict(header={"a": _entry(offsets=(0, 4, 8))}, body=bytes(8)),
    "offsets of one number": dict(header={"a": {"dtype": "F32", "shape": [2], "data_offsets": [8]}}, body=bytes(8)),
    "offsets of words": dict(header={"a": _entry(offsets=("0", "x"))}, body=bytes(8)),
    "shape too big": dict(header={"a": _entry(shape=(2 ** 40, 2 ** 40))}, body=bytes(8)),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_raise_tensorfileerror(tmp_path, case):
    path = _file(tmp_path, **BAD[case])
    with pytest.raises(TensorFileError):
        read_tensors(path)


@pytest.mark.parametrize("size", range(0, 8))
def test_shorter_than_the_length_field(tmp_path, size):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x10" * size)
    with pytest.raises(TensorFileError):
        read_tensors(str(path))


def _good_file(tmp_path) -> bytes:
    # small, so that the exhaustive loops below stay fast; the last tensor is non-empty
    tensors = {k: v for k, v in all_dtypes().items() if v.numel() and k != "big"}
    path = str(tmp_path / "good.safetensors")
    write_tensors(path, tensors, {"sha256": "0" * 64})
    return open(path, "rb").read()


class _InMemory:
    """Serve read_tensors' ``open`` from memory, so the exhaustive loops below parse
    thousands of variants without thousands of disk writes."""

    def __init__(self, monkeypatch) -> None:
        self.data = b""
        monkeypatch.setattr(tensorfile, "open", lambda path, mode="r": io.BytesIO(self.data), raising=False)

    def read(self, data: bytes):
        self.data = data
        return read_tensors("<memory>")


def test_in_memory_reader_reads_the_real_file(tmp_path, monkeypatch):
    data = _good_file(tmp_path)
    from_disk, meta = read_tensors(str(tmp_path / "good.safetensors"))
    from_memory, meta2 = _InMemory(monkeypatch).read(data)
    assert meta == meta2 and list(from_disk) == list(from_memory)
    for k in from_disk:
        assert_same_tensor(from_disk[k], from_memory[k])


def test_every_truncation_is_refused(tmp_path, monkeypatch):
    data = _good_file(tmp_path)
    (n,) = struct.unpack_from("<Q", data)
    mem = _InMemory(monkeypatch)
    # every cut in the length field and header, every 5th in the body, and the last bytes
    cuts = sorted(set(range(0, 8 + n)) | set(range(8 + n, len(data), 5)) | set(range(len(data) - 9, len(data))))
    for cut in cuts:
        with pytest.raises(TensorFileError):
            mem.read(data[:cut])


def test_single_byte_corruption_of_the_header_never_escapes_as_another_error(tmp_path, monkeypatch):
    """Every header byte replaced by each of a few characters that change JSON's meaning:
    the file is either still read or refused with TensorFileError, never anything else."""
    data = _good_file(tmp_path)
    (n,) = struct.unpack_from("<Q", data)
    mem = _InMemory(monkeypatch)
    replacements = b'-9"}]:{\x00'
    refused = 0
    for pos in range(0, 8 + n):
        for r in replacements:
            if data[pos] == r:
                continue
            try:
                mem.read(data[:pos] + bytes([r]) + data[pos + 1:])
            except TensorFileError:
                refused += 1
    assert refused > n  # most corruptions are caught


def test_corrupted_length_field(tmp_path):
    data = _good_file(tmp_path)
    (n,) = struct.unpack_from("<Q", data)
    path = tmp_path / "len.safetensors"
    for bad in (0, 1, n - 1, n + 1, len(data), 2 ** 32, 2 ** 63):
        path.write_bytes(struct.pack("<Q", bad) + data[8:])
        with pytest.raises(TensorFileError):
            read_tensors(str(path))


# -- product bugs (see the report): header values that escape as other exceptions --------

@pytest.mark.parametrize("entry,body", [
    (_entry(shape=(0, -1), offsets=(0, 0)), b""),
    (_entry(shape=(-1,), offsets=(4, 0)), bytes(4)),
], ids=["zero-and-negative-dim", "negative-dim-reversed-offsets"])
def test_negative_dimensions_are_refused(tmp_path, entry, body):
    with pytest.raises(TensorFileError):
        read_tensors(_file(tmp_path, {"a": entry}, body))


@pytest.mark.parametrize("raw", [
    b'{"a":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,4]}}',
    b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,Infinity]}}',
], ids=["shape", "offsets"])
def test_infinite_numbers_are_refused(tmp_path, raw):
    with pytest.raises(TensorFileError):
        read_tensors(_file(tmp_path, None, bytes(4), raw_header=raw))


def test_deeply_nested_header_is_refused(tmp_path):
    with pytest.raises(TensorFileError):
        read_tensors(_file(tmp_path, None, raw_header=b"[" * 100_000))

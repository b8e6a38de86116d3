"""Weights files in the safetensors layout: no pickle, readable by the safetensors library.

    8 bytes   little-endian header length N
    N bytes   JSON: {"name": {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ..., "__metadata__": {...}}
    rest      raw little-endian tensor bytes

``read_tensors`` checks every offset and dtype before it builds a tensor.
"""

from __future__ import annotations

import json
import struct

import torch

from common.atomic import write_atomic

_CODES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
          torch.uint8: "U8", torch.bool: "BOOL"}
_DTYPES = {v: k for k, v in _CODES.items()}
# About the safetensors library's own cap on a header (JSON, an entry per tensor): what a damaged file can make us read.
MAX_HEADER = 100 << 20


class TensorFileError(ValueError):
    """The file is not a well-formed weights file."""


def write_tensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write atomically (``common.atomic``: temporary file, fsync, rename, fsync of the
    folder); raises ``OSError`` with the file at ``path`` as it was."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs, offset = [], 0
    for name, t in tensors.items():
        flat = t.detach().contiguous().reshape(-1)
        raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        header[name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    def fill(f) -> None:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)
    write_atomic(path, fill)


def read_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors in file order, metadata). Raises ``TensorFileError``."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise TensorFileError(f"{path}: too short")
    (n,) = struct.unpack_from("<Q", data)
    if n > MAX_HEADER or 8 + n > len(data):
        raise TensorFileError(f"{path}: bad header length {n}")
    try:
        header = json.loads(data[8:8 + n])
    except (ValueError, RecursionError) as exc:
        raise TensorFileError(f"{path}: header is not JSON") from exc
    if not isinstance(header, dict):
        raise TensorFileError(f"{path}: header is not a map")
    meta = header.pop("__metadata__", {}) or {}
    body = memoryview(data)[8 + n:]
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape, offsets = list(info["shape"]), list(info["data_offsets"])
        except (KeyError, TypeError) as exc:
            raise TensorFileError(f"{path}: bad entry for {name}") from exc
        if len(offsets) != 2 or not all(type(v) is int and v >= 0 for v in shape + offsets):
            raise TensorFileError(f"{path}: shape and offsets of {name} must be non-negative integers")
        begin, end = offsets
        count = 1
        for d in shape:
            count *= d
        if not begin <= end <= len(body) or end - begin != count * torch.empty(0, dtype=dtype).element_size():
            raise TensorFileError(f"{path}: offsets of {name} do not match its shape and dtype")
        raw = bytes(body[begin:end])
        out[name] = torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape) if raw else torch.empty(shape, dtype=dtype)
    return out, meta

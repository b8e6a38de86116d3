"""Sans-IO frame codec: bytes in, typed messages out, and back. No sockets here.

A frame is a fixed 16-byte prefix, a msgpack header, and a payload of raw tensor bytes::

    prefix   magic b"FF", version (u8), reserved (u8), header length (u32), payload length (u64)
    header   msgpack map {"t": message type, "f": {field: value}, "x": [[field, key, dtype, shape], ...]}
    payload  each tensor's bytes in "x" order, each starting at a multiple of TENSOR_ALIGN

The decoder takes bytes in any chunking (``receive_data``) and hands out whole messages
(``next_message``); it never unpickles and never trusts a length before checking it.
Anything malformed raises ``RemoteProtocolError`` and leaves the decoder unusable, so the
caller closes that connection. Tensors in decoded messages are views of the frame's own
buffer (no copy); encoding yields the tensors' own memory (no copy) for a gather write.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import msgpack

if TYPE_CHECKING:
    import torch

from common import digest
from common import messages as m
from common.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError

MAGIC = b"FF"
VERSION = 1
PREFIX = struct.Struct("!2sBxIQ")

# A header holds a message's fields and one short descriptor per tensor: a VGG-5 session
# snapshot, the largest, is under 8 KiB. 1 MiB leaves room for much larger models while
# capping what an authenticated but broken peer can make us buffer before we validate.
MAX_HEADER_BYTES = 1 << 20
# VGG-5 frames are at most ~13 MB (activations at split 0 with batch 100); 512 MiB admits
# far larger models and batches but not a length field that would exhaust a Pi's RAM.
DEFAULT_MAX_PAYLOAD_BYTES = 512 << 20
# Payloads up to this size get their whole buffer as soon as the header is in, so a socket
# can receive straight into it (a 4.5 MB migration snapshot, 13 MB of activations: no
# extra copy). A larger one grows with the bytes that actually arrive (doubling, never
# beyond what came in times two), so a 100-byte header declaring 512 MiB costs a
# stranger's connection nothing until it sends those bytes.
EAGER_PAYLOAD_BYTES = 16 << 20
# Tensors start at 16-byte offsets so views of the payload stay aligned for SIMD kernels.
TENSOR_ALIGN = 16
# A session snapshot, the longest tensor list, holds a part's parameters, buffers and
# optimizer state (hundreds for ResNet-18): room to spare, and a cap on what we parse.
MAX_TENSORS = 4096
# Convolution weights and activations have 4 dimensions; 8 leaves room.
MAX_DIMS = 8
# A shape's sizes multiplied together, zeros counted as ones, must stay below this: a
# tensor with no elements but sizes like [0, 2**39, 2**39] passes every byte count while
# its strides overflow int64 (torch raises RuntimeError). No payload under the 512 MiB
# limit comes near 2**40 elements.
MAX_SHAPE_SPAN = 1 << 40
# An error about a peer's message names what was wrong, not all that was sent (a field
# may hold up to a megabyte of header).
MAX_ERROR_TEXT = 300

# Only plain numeric dtypes cross the wire; anything else is refused when decoding. Named
# here by their wire names and sizes; the torch dtypes (``DTYPES``, ``DTYPE_NAMES``) are
# looked up on first use, so a process that only sends control messages (the mobility
# controller) never imports torch.
ITEM_SIZES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "int64": 8,
              "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1}


@functools.cache
def _torch_dtypes() -> tuple[dict[str, "torch.dtype"], dict["torch.dtype", str]]:
    import torch

    dtypes = {name: getattr(torch, name) for name in ITEM_SIZES}
    assert all(dt.itemsize == ITEM_SIZES[n] for n, dt in dtypes.items())
    return dtypes, {v: k for k, v in dtypes.items()}


def __getattr__(name: str) -> object:
    """``DTYPES`` (wire name -> torch dtype) and ``DTYPE_NAMES`` (its inverse), built
    when first asked for."""
    if name == "DTYPES":
        return _torch_dtypes()[0]
    if name == "DTYPE_NAMES":
        return _torch_dtypes()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# Frames of these message types have each tensor's digest (``common.digest``) computed
# as its bytes arrive (``arrival_digests``): the migration snapshots, pulled or offered,
# which the destination verifies before it installs them (``edge.session``). Digesting
# each piece while it is still in the cache, between two receives, takes the
# verification pass off the critical path after the last byte. Other frames
# (activations, gradients: every step) pay nothing.
DIGEST_ON_ARRIVAL = frozenset({"SessionSnapshot", "SessionOffer", "SessionReplica"})


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


def _aligned(n: int) -> int:
    return (n + TENSOR_ALIGN - 1) // TENSOR_ALIGN * TENSOR_ALIGN


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's raw bytes, without a copy when it is already contiguous."""
    import torch  # loaded already: t is a tensor

    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def encode(msg: m.Message) -> list[bytes | memoryview]:
    """Turn a message into the buffers of one frame, ready for a gather write.

    Raises ``LocalProtocolError`` if the message cannot be framed (a tensor of a dtype
    that may not cross the wire, or a frame over the limits).
    """
    fields, tensors = m.to_wire(msg)
    descr: list[list] = []
    chunks: list[bytes | memoryview] = []
    offset = 0
    dtype_names = _torch_dtypes()[1] if tensors else {}
    for field, key, t in tensors:
        name = dtype_names.get(t.dtype)
        if name is None:
            raise LocalProtocolError(f"{msg.TYPE}: tensor {field}/{key} has dtype {t.dtype}, not allowed on the wire")
        if t.dim() > MAX_DIMS:
            raise LocalProtocolError(f"{msg.TYPE}: tensor {field}/{key} has {t.dim()} dims, more than {MAX_DIMS}")
        data = _tensor_bytes(t)
        pad = _aligned(offset) - offset
        if pad:
            chunks.append(bytes(pad))
            offset += pad
        descr.append([field, key, name, list(t.shape)])
        chunks.append(data)
        offset += data.nbytes
    try:
        header = msgpack.packb({"t": msg.TYPE, "f": fields, "x": descr}, use_bin_type=True)
    except (OverflowError, ValueError, TypeError) as exc:
        raise LocalProtocolError(f"{msg.TYPE}: cannot be framed: {exc}") from None
    if len(header) > MAX_HEADER_BYTES:
        raise LocalProtocolError(f"{msg.TYPE}: header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
    if len(descr) > MAX_TENSORS:
        raise LocalProtocolError(f"{msg.TYPE}: {len(descr)} tensors exceed {MAX_TENSORS}")
    return [PREFIX.pack(MAGIC, VERSION, len(header), offset), header, *chunks]


def encode_bytes(msg: m.Message) -> bytes:
    """``encode`` joined into one ``bytes`` (tests, files, small messages)."""
    return b"".join(bytes(c) if isinstance(c, memoryview) else c for c in encode(msg))


@dataclass(frozen=True)
class _Descriptor:
    field: str
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def _parse_descriptors(raw: object, payload_len: int) -> list[_Descriptor]:
    if not isinstance(raw, list) or len(raw) > MAX_TENSORS:
        raise RemoteProtocolError("tensor list is not a list of at most %d entries" % MAX_TENSORS)
    out: list[_Descriptor] = []
    offset = 0
    for entry in raw:
        if not (isinstance(entry, list) and len(entry) == 4):
            raise RemoteProtocolError("tensor descriptor is not [field, key, dtype, shape]")
        field, key, dtype_name, shape = entry
        if not isinstance(field, str) or not isinstance(key, str):
            raise RemoteProtocolError("tensor field and key must be strings")
        dtype = _torch_dtypes()[0].get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            raise RemoteProtocolError(f"tensor dtype {_short(dtype_name)} is not allowed")
        if not (isinstance(shape, list) and len(shape) <= MAX_DIMS
                and all(type(d) is int and 0 <= d < MAX_SHAPE_SPAN for d in shape)):
            raise RemoteProtocolError(f"tensor shape {_short(shape)} is not a list of at most {MAX_DIMS} sizes")
        count, span = 1, 1
        for d in shape:
            count *= d
            span *= max(d, 1)
        if span >= MAX_SHAPE_SPAN:
            raise RemoteProtocolError(f"tensor shape {_short(shape)} is too large")
        nbytes = count * ITEM_SIZES[dtype_name]
        offset = _aligned(offset)
        if offset + nbytes > payload_len:
            raise RemoteProtocolError("tensors overrun the payload length")
        out.append(_Descriptor(field, key, dtype, tuple(shape), offset, nbytes))
        offset += nbytes
    if offset != payload_len:
        raise RemoteProtocolError(f"payload length {payload_len} does not match its tensors ({offset} bytes)")
    return out


class FrameDecoder:
    """Incremental decoder for one direction of one connection.

    Feed bytes with ``receive_data`` (``b""`` means end of stream), then call
    ``next_message`` until it returns ``NEED_DATA``. Payload bytes are copied once, straight
    into the frame's own buffer. A payload of at most ``eager_payload`` bytes gets that
    buffer whole when its header is in; a larger one's buffer grows with the bytes that
    arrive, so memory follows what the peer sent, not what its header claims. After a
    ``RemoteProtocolError`` the decoder stays broken: every later call raises again.
    """

    def __init__(self, *, max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES,
                 eager_payload: int = EAGER_PAYLOAD_BYTES) -> None:
        self._max_payload = max_payload
        self._eager_payload = max(1, eager_payload)
        self._buf = bytearray()            # prefix and header of the frame being read
        self._header_len = -1              # known once the prefix is in
        self._payload_len = 0
        self._header: dict | None = None
        self._descr: list[_Descriptor] = []
        self._payload: bytearray | None = None
        self._filled = 0
        self._ready: tuple[dict, bytearray, list[_Descriptor], list[bytes] | None] | None = None
        # The digest of each tensor as its bytes arrive (DIGEST_ON_ARRIVAL frames only):
        # the payload is digested up to ``_dig_pos``, the tensor ``len(_digests)`` is
        # under way in ``_dig_cur``.
        self._digests: list[bytes] | None = None
        self._dig_pos = 0
        self._dig_cur = None
        self._pending = bytearray()        # bytes after a whole frame nobody has taken yet
        self._eof = False
        self._error: RemoteProtocolError | None = None

    @property
    def at_frame_boundary(self) -> bool:
        """True when no partial frame is buffered (a clean place for the stream to end)."""
        return not self._buf and self._payload is None and self._ready is None and not self._pending

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes from the peer; ``b""`` marks the end of the stream."""
        if self._eof and data:
            raise LocalProtocolError("receive_data after end of stream")
        if not data:
            self._eof = True
            return
        if self._error is not None:
            return
        if self._ready is not None or self._pending:
            self._pending += data        # keep byte order behind the frame not yet taken
            return
        try:
            self._feed(memoryview(data).cast("B"))
        except RemoteProtocolError as exc:
            self._error = exc            # raised by next_message, where callers look

    def _feed(self, mv: memoryview) -> None:
        while mv:
            if self._payload is None:
                if self._header_len < 0:
                    mv = self._fill_buf(mv, PREFIX.size)
                    if len(self._buf) < PREFIX.size:
                        return
                    self._read_prefix()
                end = PREFIX.size + self._header_len
                mv = self._fill_buf(mv, end)
                if len(self._buf) < end:
                    return
                self._header = _unpack_header(bytes(self._buf[PREFIX.size:end]))
                self._descr = _parse_descriptors(self._header["x"], self._payload_len)
                self._digests = [] if self._header["t"] in DIGEST_ON_ARRIVAL else None
                self._dig_pos, self._dig_cur = 0, None
                self._buf = bytearray()
                self._payload = bytearray(min(self._payload_len, self._eager_payload))
                self._filled = 0
            if self._filled == self._payload_len:
                self._complete()          # a frame with no payload
                self._pending += mv
                return
            room = self._room()
            take = min(len(mv), len(room))
            room[:take] = mv[:take]
            del room                      # no view of the buffer outlives this step
            self._filled += take
            if self._digests is not None:
                self._digest_upto(self._filled)
            mv = mv[take:]
            if self._filled == self._payload_len:
                self._complete()
                self._pending += mv
                return

    def _room(self) -> memoryview:
        """A view of the free part of the payload buffer (never empty while payload is
        due). A full buffer short of the payload length is replaced by one twice its size
        (at most the payload length), with the bytes so far copied over: the old buffer is
        never resized, so a view of it that a caller still holds stays valid."""
        assert self._payload is not None
        if self._filled == len(self._payload):
            grown = bytearray(min(self._payload_len, 2 * len(self._payload)))
            grown[:self._filled] = self._payload
            self._payload = grown
        return memoryview(self._payload)[self._filled:]

    def _digest_upto(self, end: int) -> None:
        """Extend the tensors' digests over the payload's bytes up to ``end`` (padding
        between tensors is skipped; a tensor with no bytes has ``digest.EMPTY``)."""
        assert self._payload is not None and self._digests is not None
        view = memoryview(self._payload)
        descr, digests = self._descr, self._digests
        while len(digests) < len(descr):
            d = descr[len(digests)]
            lo, hi = max(self._dig_pos, d.offset), min(end, d.offset + d.nbytes)
            if lo < hi:
                if self._dig_cur is None:
                    self._dig_cur = digest.new()
                self._dig_cur.update(view[lo:hi])
                self._dig_pos = hi
            if hi < d.offset + d.nbytes:
                break
            digests.append(digest.EMPTY if self._dig_cur is None else self._dig_cur.finalize())
            self._dig_cur = None
        del view

    def _complete(self) -> None:
        assert self._header is not None and self._payload is not None
        if self._digests is not None:
            self._digest_upto(self._payload_len)  # tensors with no bytes at the end
        self._ready = (self._header, self._payload, self._descr, self._digests)
        self._header, self._payload, self._descr, self._header_len = None, None, [], -1
        self._digests = None

    def payload_buffer(self) -> memoryview | None:
        """Free room in the current frame's payload buffer, for a reader that receives
        straight into it (``socket.recv_into``) and then calls ``payload_written``; saves a
        copy of every large frame. The room may be shorter than the payload still due (a
        large payload's buffer grows as its bytes arrive); each call gives the room left
        now. None when no payload is being filled. Drop the view before the next call."""
        if self._error is not None or self._payload is None or self._ready is not None or self._pending:
            return None
        return self._room()

    def payload_written(self, n: int) -> None:
        """``n`` bytes were written at the start of the last ``payload_buffer()``."""
        if self._payload is None or not 0 < n <= len(self._payload) - self._filled:
            raise LocalProtocolError("payload_written without a matching payload_buffer")
        self._filled += n
        if self._digests is not None:
            self._digest_upto(self._filled)
        if self._filled == self._payload_len:
            self._complete()

    def _fill_buf(self, mv: memoryview, upto: int) -> memoryview:
        take = max(0, upto - len(self._buf))
        self._buf += mv[:take]
        return mv[take:]

    def _read_prefix(self) -> None:
        magic, version, header_len, payload_len = PREFIX.unpack_from(self._buf)
        if magic != MAGIC or version != VERSION:
            raise RemoteProtocolError("bad frame prefix (not a testbed peer, or another version)")
        if header_len > MAX_HEADER_BYTES:
            raise RemoteProtocolError(f"header of {header_len} bytes exceeds {MAX_HEADER_BYTES}")
        if payload_len > self._max_payload:
            raise FrameTooLarge(f"payload of {payload_len} bytes exceeds {self._max_payload}")
        self._header_len, self._payload_len = header_len, payload_len

    def limit_payload(self, max_payload: int) -> None:
        """From the next frame on, refuse a payload over ``max_payload`` bytes (a link whose
        peer's role bounds what it may send: ``common.bounds.device_payload_limit``)."""
        self._max_payload = max_payload

    def next_message(self) -> m.Message | _NeedData:
        """The next whole message, or ``NEED_DATA``. Raises ``RemoteProtocolError`` on garbage
        and on a stream that ended inside a frame."""
        if self._error is not None:
            raise self._error
        if self._ready is None:
            if self._eof and not self.at_frame_boundary:
                self._error = RemoteProtocolError("stream ended inside a frame")
                raise self._error
            return NEED_DATA
        header, payload, descr, digests = self._ready
        self._ready = None
        if self._pending:
            pending, self._pending = self._pending, bytearray()
            try:
                self._feed(memoryview(pending))
            except RemoteProtocolError as exc:
                self._error = exc
        try:
            tensors = [(d.field, d.key, _view(payload, d)) for d in descr]
            msg = m.from_wire(header["t"], header["f"], tensors)
        except (LocalProtocolError, RemoteProtocolError) as exc:
            self._error = RemoteProtocolError(str(exc)[:MAX_ERROR_TEXT])
            raise self._error from None
        if digests is not None:
            # not a field: what this process computed over the bytes it received
            object.__setattr__(msg, _DIGESTS_ATTR, {(d.field, d.key): c for d, c in zip(descr, digests)})
        return msg


_DIGESTS_ATTR = "_arrival_digests"


def arrival_digests(msg: m.Message) -> dict[tuple[str, str], bytes] | None:
    """For a message decoded here whose type is in ``DIGEST_ON_ARRIVAL``: the digest
    (``common.digest``) of each tensor's bytes as they arrived, by (field, key). None for
    any other message (built in this process, or of another type). The tensors are views
    of the bytes digested: a digest stays true as long as nobody writes to its tensor."""
    return getattr(msg, _DIGESTS_ATTR, None)


def _unpack_header(raw: bytes) -> dict:
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise RemoteProtocolError(f"header is not valid msgpack: {type(exc).__name__}") from None
    if not (isinstance(header, dict) and set(header) == {"t", "f", "x"}
            and isinstance(header["t"], str) and isinstance(header["f"], dict)):
        raise RemoteProtocolError("header is not a map of t, f and x")
    return header


def _view(payload: bytearray, d: _Descriptor) -> torch.Tensor:
    import torch  # loaded already: _parse_descriptors looked its dtype up

    try:
        if d.nbytes == 0:
            return torch.empty(d.shape, dtype=d.dtype)
        flat = torch.frombuffer(payload, dtype=torch.uint8, count=d.nbytes, offset=d.offset)
        if d.dtype is torch.bool and int(flat.max()) > 1:
            raise RemoteProtocolError("bool tensor holds bytes other than 0 and 1")
        return flat.view(d.dtype).view(d.shape)
    except (RuntimeError, ValueError, OverflowError) as exc:
        # _parse_descriptors admits only shapes torch can build; this is the last guard
        raise RemoteProtocolError(f"tensor {_short(d.field)}/{_short(d.key)}: {type(exc).__name__}") from None


def _short(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error names what the peer sent
    without echoing all of it."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def decode_all(data: bytes) -> Iterator[m.Message]:
    """Every message in ``data``, which must end at a frame boundary (files, tests)."""
    dec = FrameDecoder()
    dec.receive_data(data)
    dec.receive_data(b"")
    while True:
        msg = dec.next_message()
        if msg is NEED_DATA:
            return
        yield msg

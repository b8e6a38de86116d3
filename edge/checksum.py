"""A session snapshot's checksum (docs/PROTOCOL.md, section 9.1): what the source sends
beside the snapshot and the destination checks before it installs anything, so a
damaged, torn or incomplete copy never installs (``edge.session``). The digests run on
two hashing threads, so that the caller goes on meanwhile.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import msgpack
import torch

from common import codec, digest

# The snapshot checksum sits on the migration's critical path (the target verifies before
# it installs, with the device waiting), so its per-byte cost is what matters: each
# tensor's digest is Poly1305 under a fixed key (``common.digest``: faster than CRC-32 or
# SHA-256, BENCHMARKS.md, section 2e). Its job is to catch a damaged, torn or incomplete
# copy (and bugs); forgery is the transport's to stop (every byte between edges carries a
# MAC or TLS).
# The digests run on these threads, so that the caller goes on (the source posts the
# bytes meanwhile); Poly1305 holds the GIL, so two threads do not digest in parallel.
_HASH_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="checksum")


# Tensors under this many bytes are digested together in one task: handing the pool a
# task costs more than digesting 18 of VGG-5's 20 tensors (biases, batch-norm vectors,
# the RNG state) takes (BENCHMARKS.md, section 2e).
SMALL_TENSOR_BYTES = 256 << 10


def _tensor_digest(t: torch.Tensor) -> bytes:
    flat = t.detach().contiguous().reshape(-1)
    return digest.of(memoryview(flat.view(torch.uint8).numpy())) if flat.numel() else digest.EMPTY


def _tensor_entry(name: str, t: torch.Tensor, d: bytes) -> bytes:
    """One tensor's part of the checksum: msgpack ``[name, wire dtype name, shape, digest]``
    (docs/PROTOCOL.md, section 9.1), bytes any language's msgpack makes alike."""
    return msgpack.packb([name, codec.DTYPE_NAMES[t.dtype], list(t.shape), d], use_bin_type=True)


def _digests_of(ts: list[torch.Tensor]) -> list[bytes]:
    return [_tensor_digest(t) for t in ts]


def start_checksum(meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                   digests: dict[str, bytes] | None = None) -> Callable[[], str]:
    """Start ``snapshot_checksum`` on the hashing threads; call the result to get it.
    ``digests``: the tensors' digests already known (computed as the bytes arrived,
    ``codec.arrival_digests``), by tensor name; only the others are computed."""
    known = digests or {}
    todo = [k for k in tensors if k not in known]
    big = [k for k in todo if tensors[k].nbytes >= SMALL_TENSOR_BYTES]
    small = [k for k in todo if tensors[k].nbytes < SMALL_TENSOR_BYTES]
    jobs = [([k], _HASH_POOL.submit(_digests_of, [tensors[k]])) for k in big]
    if small:
        jobs.append((small, _HASH_POOL.submit(_digests_of, [tensors[k] for k in small])))
    head = msgpack.packb(meta, use_bin_type=True)

    def result() -> str:
        got = dict(known)
        for names, f in jobs:
            got.update(zip(names, f.result()))
        h = hashlib.sha256(head)
        for k, t in tensors.items():
            h.update(_tensor_entry(k, t, got[k]))
        return h.hexdigest()
    return result


def snapshot_checksum(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """Hex SHA-256 over the metadata (msgpack, in order) and, for every tensor in order,
    msgpack ``[name, dtype, shape, digest of its bytes]`` (``common.digest``): a byte
    form with nothing of Python's in it, so that an edge in another language makes the
    same (docs/PROTOCOL.md, section 9.1)."""
    return start_checksum(meta, tensors)()

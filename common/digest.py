"""The digest of a tensor's bytes in a migration snapshot: Poly1305 under a fixed key.

A snapshot's checksum (``edge.checksum.snapshot_checksum``) is a SHA-256 over its
metadata and one entry per tensor that holds the tensor's digest. The digest's job is to
catch a damaged, torn or incomplete copy (and bugs), not a forger: every byte between
two edges is already authenticated by the transport (a MAC under the session's key, or
TLS). So what matters is speed, as the digest sits on the migration's critical path at
both ends: Poly1305 (``cryptography``, OpenSSL's code) runs several times faster than
zlib's CRC-32 (BENCHMARKS.md, section 2e), and it uses no instruction a Raspberry Pi
lacks.

Under a fixed, public key Poly1305 is a polynomial evaluated at one point modulo
2^130 - 5: a given change to a message goes unnoticed for at most one in about 2^106 / L
keys (L the message's 16-byte blocks), so it catches any change that is not chosen
knowing the key, as a checksum must. (As a MAC, a key may serve once only; nothing here
uses it as one.)
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.poly1305 import Poly1305

KEY = hashlib.sha256(b"fedfly tensor digest 1").digest()
SIZE = 16  # bytes: a Poly1305 tag


def new() -> Poly1305:
    """A running digest: ``update`` it with the bytes in order, then ``finalize``."""
    return Poly1305(KEY)


def of(data) -> bytes:
    """The digest of ``data`` (any contiguous bytes-like object)."""
    return Poly1305.generate_tag(KEY, data)


EMPTY = of(b"")

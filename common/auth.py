"""Mutual challenge-response over the testbed's shared key (HMAC-SHA256), sans-IO.

Before any frame is decoded, both ends prove they hold the key without sending it:

    client -> server   HELLO_MAGIC + client nonce (32 bytes)
    server -> client   server nonce (32) + HMAC(key, "server" | client nonce | server nonce)
    client -> server   HMAC(key, "client" | server nonce | client nonce)
    server -> client   ACCEPT (1 byte), or REJECT (1 byte) and the connection closes

Fresh nonces on both sides make a recorded exchange useless to replay; the two labels
keep one side's proof from being reflected as the other's. Every message has a fixed
length, so nothing from an unauthenticated peer is ever parsed beyond a byte compare.
The handshake authenticates peers; it does not encrypt what follows (use a VPN or an
isolated network for hostile links).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

from common.errors import AuthenticationError, ConfigError

HELLO_MAGIC = b"FFAUTH1\x00"
# HMAC-SHA256 tags, and nonces as long: no replay or forgery within reach.
NONCE_BYTES = 32
MAC_BYTES = 32
ACCEPT = b"\x01"
# Said before closing on a wrong proof, so that the client can tell "your key is wrong"
# (it never will be right: stop) from a connection that merely broke (try again).
REJECT = b"\x00"
CLIENT_HELLO_BYTES = len(HELLO_MAGIC) + NONCE_BYTES
SERVER_CHALLENGE_BYTES = NONCE_BYTES + MAC_BYTES
# A key shorter than this is guessable offline from one recorded handshake.
MIN_KEY_BYTES = 16


def _mac(key: bytes, label: bytes, a: bytes, b: bytes) -> bytes:
    return hmac.new(key, label + a + b, hashlib.sha256).digest()


def client_hello() -> tuple[bytes, bytes]:
    """Returns (bytes to send, client nonce to keep)."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return HELLO_MAGIC + nonce, nonce


def server_challenge(key: bytes, hello: bytes) -> tuple[bytes, bytes, bytes]:
    """Answer a client hello. Returns (bytes to send, client nonce, server nonce)."""
    if len(hello) != CLIENT_HELLO_BYTES or not hmac.compare_digest(hello[: len(HELLO_MAGIC)], HELLO_MAGIC):
        raise AuthenticationError("peer did not open with the testbed's hello (not a testbed peer?)")
    client_nonce = hello[len(HELLO_MAGIC):]
    server_nonce = secrets.token_bytes(NONCE_BYTES)
    return server_nonce + _mac(key, b"server", client_nonce, server_nonce), client_nonce, server_nonce


def client_response(key: bytes, client_nonce: bytes, challenge: bytes) -> bytes:
    """Check the server's proof and return ours. Raises ``AuthenticationError``."""
    if len(challenge) != SERVER_CHALLENGE_BYTES:
        raise AuthenticationError("server's challenge has the wrong length")
    server_nonce, proof = challenge[:NONCE_BYTES], challenge[NONCE_BYTES:]
    if not hmac.compare_digest(proof, _mac(key, b"server", client_nonce, server_nonce)):
        raise AuthenticationError("server could not prove it holds the testbed key (different key?)")
    return _mac(key, b"client", server_nonce, client_nonce)


def server_verify(key: bytes, client_nonce: bytes, server_nonce: bytes, response: bytes) -> None:
    """Check the client's proof. Raises ``AuthenticationError``."""
    if len(response) != MAC_BYTES or not hmac.compare_digest(response, _mac(key, b"client", server_nonce, client_nonce)):
        raise AuthenticationError("peer could not prove it holds the testbed key (different key?)")


def load_key(*, key_file: str | None, key_env: str | None) -> bytes:
    """The shared key from the environment variable ``key_env`` (if set and present) or
    else from ``key_file``. A file holds the key as hex (as ``secrets.token_hex(32)``
    writes it) or as raw bytes (one trailing line ending is not part of the key). Raises ``ConfigError`` naming the setting."""
    if key_env:
        value = os.environ.get(key_env)
        if value is not None:
            return _parse_key(value.strip().encode(), "security.key_env", f"environment variable {key_env}")
        if not key_file:
            raise ConfigError("security.key_env", f"environment variable {key_env} is not set",
                              f"export {key_env}=$(python -c 'import secrets; print(secrets.token_hex(32))')")
    if not key_file:
        raise ConfigError("security.key_file", "no shared key configured",
                          "set security.key_file to a file made by: python -c 'import secrets; print(secrets.token_hex(32))' > testbed.key")
    try:
        with open(key_file, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError("security.key_file", f"cannot read {key_file}: {exc.strerror}",
                          "point it at the key file shared by every host of the testbed") from None
    return _parse_key(raw, "security.key_file", key_file)


def _parse_key(raw: bytes, key: str, where: str) -> bytes:
    try:
        value = bytes.fromhex(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        # Anything else is a raw key, byte for byte but for the one line ending an
        # editor adds (a binary key keeps its leading and inner whitespace).
        value = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1] if raw.endswith(b"\n") else raw
    if len(value) < MIN_KEY_BYTES:
        raise ConfigError(key, f"the key in {where} is shorter than {MIN_KEY_BYTES} bytes",
                          "make one with: python -c 'import secrets; print(secrets.token_hex(32))'")
    return value

"""The sans-IO challenge-response handshake and loading the shared key."""

from __future__ import annotations

import os

import pytest

from common import auth
from common.errors import AuthenticationError, ConfigError

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))


def _flip(data: bytes, index: int, bit: int = 0) -> bytes:
    b = bytearray(data)
    b[index] ^= 1 << bit
    return bytes(b)


def handshake(client_key: bytes, server_key: bytes) -> None:
    hello, cn = auth.client_hello()
    challenge, cn_seen, sn = auth.server_challenge(server_key, hello)
    assert cn_seen == cn
    response = auth.client_response(client_key, cn, challenge)
    auth.server_verify(server_key, cn, sn, response)


def test_happy_path_and_message_sizes():
    hello, cn = auth.client_hello()
    assert len(hello) == auth.CLIENT_HELLO_BYTES == len(auth.HELLO_MAGIC) + auth.NONCE_BYTES
    assert hello.startswith(auth.HELLO_MAGIC) and hello.endswith(cn) and len(cn) == auth.NONCE_BYTES
    challenge, cn_seen, sn = auth.server_challenge(KEY, hello)
    assert cn_seen == cn and len(sn) == auth.NONCE_BYTES
    assert len(challenge) == auth.SERVER_CHALLENGE_BYTES and challenge.startswith(sn)
    response = auth.client_response(KEY, cn, challenge)
    assert len(response) == auth.MAC_BYTES
    assert auth.server_verify(KEY, cn, sn, response) is None
    assert KEY not in hello + challenge + response  # the key itself never travels


def test_nonces_are_fresh():
    assert len({auth.client_hello()[1] for _ in range(20)}) == 20
    hello, _ = auth.client_hello()
    assert len({auth.server_challenge(KEY, hello)[2] for _ in range(20)}) == 20


def test_client_refuses_a_server_with_another_key():
    hello, cn = auth.client_hello()
    challenge, _, _ = auth.server_challenge(OTHER, hello)
    with pytest.raises(AuthenticationError):
        auth.client_response(KEY, cn, challenge)


def test_server_refuses_a_client_with_another_key():
    # a client that does not check the server's proof and answers with its own key
    hello, cn = auth.client_hello()
    challenge, _, sn = auth.server_challenge(KEY, hello)
    wrong = auth._mac(OTHER, b"client", sn, cn)
    with pytest.raises(AuthenticationError):
        auth.server_verify(KEY, cn, sn, wrong)
    with pytest.raises(AuthenticationError):
        handshake(OTHER, KEY)
    with pytest.raises(AuthenticationError):
        handshake(KEY, OTHER)


@pytest.mark.parametrize("index", [0, auth.NONCE_BYTES - 1, auth.NONCE_BYTES, auth.SERVER_CHALLENGE_BYTES - 1])
def test_tampered_server_challenge_is_refused(index):
    hello, cn = auth.client_hello()
    challenge, _, _ = auth.server_challenge(KEY, hello)
    with pytest.raises(AuthenticationError):
        auth.client_response(KEY, cn, _flip(challenge, index, bit=index % 8))


@pytest.mark.parametrize("index", [0, 13, auth.MAC_BYTES - 1])
def test_tampered_client_response_is_refused(index):
    hello, cn = auth.client_hello()
    challenge, _, sn = auth.server_challenge(KEY, hello)
    response = auth.client_response(KEY, cn, challenge)
    with pytest.raises(AuthenticationError):
        auth.server_verify(KEY, cn, sn, _flip(response, index, bit=7))


def test_tampered_client_nonce_in_transit_is_refused():
    # a man in the middle changes the client's nonce: the server's proof no longer fits
    hello, cn = auth.client_hello()
    challenge, _, _ = auth.server_challenge(KEY, _flip(hello, len(hello) - 1))
    with pytest.raises(AuthenticationError):
        auth.client_response(KEY, cn, challenge)


def test_reflection_of_the_servers_proof_fails():
    hello, cn = auth.client_hello()
    challenge, _, sn = auth.server_challenge(KEY, hello)
    server_proof = challenge[auth.NONCE_BYTES:]
    with pytest.raises(AuthenticationError):
        auth.server_verify(KEY, cn, sn, server_proof)


def test_reflection_through_a_second_session_fails():
    # An attacker without the key opens session 1 with nonce cn, gets server nonce sn, then
    # opens session 2 with sn as its own nonce, hoping the server's proof there,
    # MAC("server" | sn | sn2), passes as the client's proof of session 1, MAC("client" | sn | cn).
    hello1, cn = auth.client_hello()
    _, _, sn = auth.server_challenge(KEY, hello1)
    challenge2, _, _ = auth.server_challenge(KEY, auth.HELLO_MAGIC + sn)
    with pytest.raises(AuthenticationError):
        auth.server_verify(KEY, cn, sn, challenge2[auth.NONCE_BYTES:])
    # even a server that reused the client's nonce as its own could not be tricked: labels differ
    same = auth._mac(KEY, b"server", sn, cn)
    with pytest.raises(AuthenticationError):
        auth.server_verify(KEY, cn, sn, same)


def test_replayed_client_response_fails_against_a_fresh_challenge():
    hello, cn = auth.client_hello()
    challenge, _, sn = auth.server_challenge(KEY, hello)
    recorded = auth.client_response(KEY, cn, challenge)
    _, _, sn2 = auth.server_challenge(KEY, hello)  # the same hello replayed: new server nonce
    assert sn2 != sn
    with pytest.raises(AuthenticationError):
        auth.server_verify(KEY, cn, sn2, recorded)


@pytest.mark.parametrize("hello", [
    b"",
    auth.HELLO_MAGIC,
    auth.HELLO_MAGIC + bytes(auth.NONCE_BYTES - 1),
    auth.HELLO_MAGIC + bytes(auth.NONCE_BYTES + 1),
    b"FFAUTH2\x00" + bytes(auth.NONCE_BYTES),
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n\0\0\0\0\0\0",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(29),  # a TLS ClientHello start
], ids=["empty", "magic-only", "short", "long", "other-version", "http", "tls"])
def test_server_refuses_a_non_testbed_hello(hello):
    with pytest.raises(AuthenticationError):
        auth.server_challenge(KEY, hello)


@pytest.mark.parametrize("length", [0, auth.SERVER_CHALLENGE_BYTES - 1, auth.SERVER_CHALLENGE_BYTES + 1])
def test_wrong_length_challenge(length):
    _, cn = auth.client_hello()
    with pytest.raises(AuthenticationError):
        auth.client_response(KEY, cn, bytes(length))


@pytest.mark.parametrize("length", [0, auth.MAC_BYTES - 1, auth.MAC_BYTES + 1])
def test_wrong_length_response(length):
    hello, cn = auth.client_hello()
    challenge, _, sn = auth.server_challenge(KEY, hello)
    good = auth.client_response(KEY, cn, challenge)
    bad = (good * 2)[:length]
    with pytest.raises(AuthenticationError):
        auth.server_verify(KEY, cn, sn, bad)


def test_authentication_error_is_a_remote_protocol_error():
    from common.errors import RemoteProtocolError
    assert issubclass(AuthenticationError, RemoteProtocolError)


# -- load_key ----------------------------------------------------------------------------

ENV = "FEDFLY_TEST_KEY_VAR"


@pytest.fixture(autouse=True)
def _no_key_env(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


def test_key_from_hex_file(tmp_path):
    key = os.urandom(32)
    path = tmp_path / "k.key"
    path.write_text(key.hex() + "\n")
    assert auth.load_key(key_file=str(path), key_env=None) == key


def test_key_from_uppercase_hex_file_with_spaces(tmp_path):
    key = os.urandom(24)
    path = tmp_path / "k.key"
    path.write_text("  " + key.hex().upper() + "\r\n")
    assert auth.load_key(key_file=str(path), key_env=None) == key


def test_key_from_raw_file(tmp_path):
    key = b"\x01" + bytes(range(200, 230)) + b"\x02"  # not hex, no whitespace at the ends
    path = tmp_path / "k.bin"
    path.write_bytes(key)
    assert auth.load_key(key_file=str(path), key_env=None) == key


def test_raw_text_key_that_is_not_hex(tmp_path):
    path = tmp_path / "k.txt"
    path.write_text("correct horse battery staple\n")
    assert auth.load_key(key_file=str(path), key_env=None) == b"correct horse battery staple"


def test_demo_key_loads():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    key = auth.load_key(key_file=os.path.join(here, "configs", "demo-INSECURE.key"), key_env=None)
    assert len(key) >= auth.MIN_KEY_BYTES


def test_environment_variable_wins_over_the_file(tmp_path, monkeypatch):
    file_key, env_key = os.urandom(32), os.urandom(32)
    path = tmp_path / "k.key"
    path.write_text(file_key.hex())
    monkeypatch.setenv(ENV, env_key.hex() + "\n")
    assert auth.load_key(key_file=str(path), key_env=ENV) == env_key
    monkeypatch.delenv(ENV)  # named but not set: the file
    assert auth.load_key(key_file=str(path), key_env=ENV) == file_key


def test_environment_variable_without_file(monkeypatch):
    env_key = os.urandom(16)
    monkeypatch.setenv(ENV, env_key.hex())
    assert auth.load_key(key_file=None, key_env=ENV) == env_key


def test_environment_variable_named_but_unset_and_no_file():
    with pytest.raises(ConfigError) as info:
        auth.load_key(key_file=None, key_env=ENV)
    assert info.value.key == "security.key_env"
    assert ENV in str(info.value)


def test_no_key_configured():
    with pytest.raises(ConfigError) as info:
        auth.load_key(key_file=None, key_env=None)
    assert info.value.key == "security.key_file"
    assert "security.key_file" in str(info.value)


def test_missing_key_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        auth.load_key(key_file=str(tmp_path / "nope.key"), key_env=None)
    assert info.value.key == "security.key_file"


@pytest.mark.parametrize("content", [b"", b"00" * 15, b"short raw key!", b"\n\n  \n"])
def test_too_short_key_in_file(tmp_path, content):
    path = tmp_path / "k.key"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        auth.load_key(key_file=str(path), key_env=None)
    assert info.value.key == "security.key_file"
    assert "security.key_file" in str(info.value) and str(auth.MIN_KEY_BYTES) in str(info.value)


def test_too_short_key_in_environment(tmp_path, monkeypatch):
    path = tmp_path / "k.key"
    path.write_text(os.urandom(32).hex())
    monkeypatch.setenv(ENV, "ab" * 15)  # 15 bytes: too short, and the good file is not a fallback
    with pytest.raises(ConfigError) as info:
        auth.load_key(key_file=str(path), key_env=ENV)
    assert info.value.key == "security.key_env"


def test_sixteen_bytes_is_enough(tmp_path):
    path = tmp_path / "k.key"
    path.write_text("ab" * 16)
    assert auth.load_key(key_file=str(path), key_env=None) == b"\xab" * 16

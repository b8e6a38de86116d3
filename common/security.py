"""Who is on the other end, and bytes nobody else can read or change.

Every connection is secured before its first frame, in one of two modes
(``security.mode``):

- ``tls``: TLS 1.3, mutual, from the testbed's own CA (``scripts.certs`` makes it and
  one key and certificate per process). A certificate names a role and a name
  (``Identity``: organizational unit = role, common name = name), so a device can attach
  only as itself, an edge can serve and pull only as itself, only the central can start
  rounds and only the controller can send moves (``allowed``). Bytes are encrypted and
  authenticated by TLS.
- ``key``: the shared-key handshake of ``common.auth`` (any holder of the key is
  trusted, under any name), then every frame travels in a record with a MAC under keys
  derived from the handshake's nonces (``MacStream``): a relay without the key cannot
  change, drop, reorder or replay a byte unnoticed. Bytes are not encrypted.

Both wrap a ``ByteStream`` and are one (``TLSStream``, ``MacStream``), so the transport
above is the same in either mode and tests run them over in-memory streams. TLS uses
``ssl.MemoryBIO`` (trio's ``SSLStream`` idea): the socket I/O stays ours, with its
per-direction deadlines, and the reader and writer threads never touch OpenSSL at the
same time (one lock, held only for in-memory work).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.poly1305 import Poly1305

from common import auth
from common.errors import AuthenticationError, ConfigError, ConnectionClosed, PeerSilent, RemoteProtocolError
from common.stream import ByteStream

ROLES = ("central", "edge", "device", "controller")


@dataclass(frozen=True)
class Identity:
    """A process of the testbed as its certificate names it."""

    role: str
    name: str

    def __str__(self) -> str:
        return self.role if self.role in ("central", "controller") else f"{self.role} {self.name}"

    @property
    def stem(self) -> str:
        """File name stem of its key and certificate (``edge-edge1.crt``, ``central.crt``)."""
        return self.role if self.role in ("central", "controller") else f"{self.role}-{self.name}"


CENTRAL = Identity("central", "central")
CONTROLLER = Identity("controller", "controller")


def allowed(identity: Identity | None, role: str, name: str | None = None) -> bool:
    """May a peer proven as ``identity`` act as ``role`` (named ``name``)? ``None`` is a
    peer of the shared-key mode: any holder of the key is trusted as anyone."""
    if identity is None:
        return True
    return identity.role == role and (name is None or identity.name == name)


class Credentials(Protocol):
    mode: str

    def client(self, stream: ByteStream, *, expect: Identity | None, peer: str,
               timeout: float, first: list | None = None) -> tuple[ByteStream, Identity | None]:
        """Secure ``stream`` as the connecting side, all within ``timeout``; the server
        must prove it is ``expect``. Returns the secured stream and the server's identity.
        ``first``: the buffers of a first frame, sent secured with our last handshake
        flight, once the server has proven who it is but before its verdict on us is in
        (which would cost a round trip more on a move's path); a server that refuses us
        reads none of it. Raises ``AuthenticationError`` (final),
        ``ConnectionClosed``/``PeerSilent`` (retry)."""

    def server(self, stream: ByteStream, *, peer: str, timeout: float) -> tuple[ByteStream, Identity | None]:
        """Secure an accepted ``stream``, all within ``timeout``; returns it and the
        client's proven identity (``None`` in the shared-key mode)."""


# ---------------------------------------------------------------------------------------
# the shared-key mode: HMAC handshake, then a Poly1305 MAC on every record
# ---------------------------------------------------------------------------------------

# A record: u32 length, that many bytes, a 16-byte Poly1305 tag over (length, bytes) under
# a key for that record's sequence number.
RECORD_HEAD = struct.Struct("!I")
RECORD_SEQ = struct.Struct("!Q")
TAG_BYTES = 16
# Sends are cut into records of at most this many bytes, so that a receiver buffers and
# verifies little before it hands bytes on (nothing is handed on before its tag checks).
# Each record costs a tag, a one-time key and a pass through the loops below in Python at
# both ends: 64 KiB records cost a 4.5 MB session 70 of them, 256 KiB records 18 (what
# that saves: BENCHMARKS.md, section 2d). A record takes 2 s to arrive at 1 Mbit/s; the
# peer is not taken for silent meanwhile: bytes of a record still arriving count as life
# (``last_input``), for at most RECORD_GRACE_S per record (a record that slow, 70 kbit/s,
# is a link not worth keeping, or somebody on the path who trickles bytes that will
# never verify, to keep a dead link looking alive).
MAX_RECORD = 256 << 10
RECORD_GRACE_S = 30.0
# The receiver reads up to this many bytes at once and verifies the records in them one
# by one: a 4.5 MB snapshot takes about ten reads, not two per record (a 4-byte header,
# then the rest), and each read a wait on the socket.
RECEIVE_AHEAD = 512 << 10


def _record_key(key: bytes, label: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return hmac.new(key, b"fedfly record " + label + client_nonce + server_nonce, hashlib.sha256).digest()


class MacStream:
    """A ``ByteStream`` whose every record carries a MAC under a key per direction and
    per record (so, bound to the record's sequence number): altered, dropped, reordered or
    replayed bytes raise ``RemoteProtocolError`` before any of them is handed on."""

    def __init__(self, inner: ByteStream, *, send_key: bytes, receive_key: bytes) -> None:
        self.inner = inner
        self._send_key, self._receive_key = send_key, receive_key
        self._send_seq = 0
        self._receive_seq = 0
        self._send_lock = threading.Lock()
        # Bytes read ahead: ``_start`` to ``_stop`` not yet verified (whole records and the
        # start of the next); ``_offset`` to ``_end`` the verified record being handed on.
        self._buf = bytearray(RECEIVE_AHEAD + RECORD_HEAD.size + MAX_RECORD + TAG_BYTES)
        self._start = self._stop = 0
        self._offset = self._end = 0
        self.last_input = time.monotonic()  # the last bytes read, whole records or not (bounded)
        self._partial_since: float | None = None  # when the record not yet whole began to arrive

    def __getattr__(self, name: str):  # sock, fileno, shutdown, abort: the inner stream's
        return getattr(self.inner, name)

    @staticmethod
    def _mac(key: bytes, seq: int, length: int) -> Poly1305:
        """The record's authenticator, fed its length here and its bytes by the caller.

        Poly1305, under a one-time key per record: HMAC-SHA256 of the direction's key and
        the sequence number (a PRF of a number never used twice under that key, as
        Poly1305 needs). Poly1305 runs at several GB/s with or without AES or SHA
        instructions (a Raspberry Pi has neither), where HMAC-SHA256 over the bytes
        themselves cost several times more at each end, even with SHA instructions
        (BENCHMARKS.md, section 4)."""
        one_time = hmac.digest(key, RECORD_SEQ.pack(seq), "sha256")
        h = Poly1305(one_time)
        h.update(RECORD_HEAD.pack(length))
        return h

    def send_all(self, buffers, stall_timeout: float | None = None) -> int:
        views = [memoryview(b).cast("B") for b in buffers if len(b)]
        total = sum(v.nbytes for v in views)
        with self._send_lock:
            while views:
                # gather up to MAX_RECORD bytes of views into one record
                take, size = [], 0
                while views and size < MAX_RECORD:
                    v = views[0]
                    n = min(v.nbytes, MAX_RECORD - size)
                    take.append(v[:n])
                    size += n
                    if n == v.nbytes:
                        views.pop(0)
                    else:
                        views[0] = v[n:]
                h = self._mac(self._send_key, self._send_seq, size)
                for v in take:
                    h.update(v)
                self._send_seq += 1
                self.inner.send_all([RECORD_HEAD.pack(size), *take, h.finalize()], stall_timeout)
        return total

    def receive_into(self, buf: memoryview, timeout: float | None = None) -> int:
        if self._offset == self._end:
            self._next_record(timeout)
            if self._end == 0:
                return 0
        # Every whole record already read goes into ``buf`` in this one call, each verified
        # first: a large frame then takes one call per read, not one per record.
        n = 0
        while True:
            k = min(len(buf) - n, self._end - self._offset)
            buf[n:n + k] = memoryview(self._buf)[self._offset:self._offset + k]
            self._offset += k
            n += k
            if n == len(buf) or not self._record_buffered():
                return n
            self._next_record(0)

    def _record_buffered(self) -> bool:
        """A whole record (of a valid length) is read and waits to be verified."""
        avail = self._stop - self._start
        if avail < RECORD_HEAD.size:
            return False
        (length,) = RECORD_HEAD.unpack_from(self._buf, self._start)
        return 0 < length <= MAX_RECORD and avail >= RECORD_HEAD.size + length + TAG_BYTES

    def _next_record(self, timeout: float | None) -> None:
        """Verify the next record (reading more as needed); what arrives of it is kept
        across a ``TimeoutError``: the caller's deadline, not the record's, decides."""
        deadline = None if timeout is None else time.monotonic() + timeout
        view = memoryview(self._buf)
        head, tag = RECORD_HEAD.size, TAG_BYTES
        while True:
            start, avail = self._start, self._stop - self._start
            need = head
            if avail >= head:
                (length,) = RECORD_HEAD.unpack_from(self._buf, start)
                if not 0 < length <= MAX_RECORD:
                    raise RemoteProtocolError(f"a record of {length} bytes (at most {MAX_RECORD}): "
                                              "not a testbed peer, or altered on the way")
                need = head + length + tag
                if avail >= need:
                    body = start + head
                    h = self._mac(self._receive_key, self._receive_seq, length)
                    h.update(view[body:body + length])
                    try:
                        h.verify(bytes(view[body + length:start + need]))  # constant time
                    except InvalidSignature:
                        raise RemoteProtocolError("a record failed its MAC: the bytes were altered on the way") \
                            from None
                    self._receive_seq += 1
                    self._offset, self._end = body, body + length
                    self._start = start + need
                    self._partial_since = None
                    return
            if avail == 0:
                self._start = self._stop = 0
            elif len(self._buf) - start < head + MAX_RECORD + tag:
                # no room for a whole record after the part kept: move it to the front
                # (every record before it has been handed on)
                view[:avail] = view[start:self._stop]
                self._start, self._stop = 0, avail
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"no record within {timeout} s")
            n = self.inner.receive_into(view[self._stop:], left)
            if n == 0:
                if self._stop == self._start:
                    self._offset = self._end = 0
                    return
                raise RemoteProtocolError("the stream ended inside an authenticated record")
            self._stop += n
            now = time.monotonic()
            if self._partial_since is None:
                self._partial_since = now
            self.last_input = min(now, self._partial_since + RECORD_GRACE_S)

    def close(self) -> None:
        self.inner.close()


class SharedKey:
    """The ``key`` mode's credentials: the testbed's one shared key."""

    mode = "key"

    def __init__(self, key: bytes) -> None:
        if len(key) < auth.MIN_KEY_BYTES:
            raise ValueError(f"a shared key needs at least {auth.MIN_KEY_BYTES} bytes")
        self.key = key

    def client(self, stream, *, expect, peer, timeout, first=None):
        deadline = time.monotonic() + timeout
        hello, client_nonce = auth.client_hello()
        stream.send_all([hello], timeout)
        challenge = receive_exact(stream, auth.SERVER_CHALLENGE_BYTES, peer, deadline)  # proves the server
        server_nonce = challenge[:auth.NONCE_BYTES]
        stream.send_all([auth.client_response(self.key, client_nonce, challenge)], timeout)
        secured = self._wrap(stream, client_nonce, server_nonce, client=True)
        if first:
            secured.send_all(first, timeout)
        if receive_exact(stream, 1, peer, deadline) != auth.ACCEPT:
            raise AuthenticationError(f"{peer} did not accept our key (a different key?)")
        return secured, None

    def server(self, stream, *, peer, timeout):
        deadline = time.monotonic() + timeout
        hello = receive_exact(stream, auth.CLIENT_HELLO_BYTES, peer, deadline)
        reply, client_nonce, server_nonce = auth.server_challenge(self.key, hello)
        stream.send_all([reply], timeout)
        try:
            auth.server_verify(self.key, client_nonce, server_nonce,
                               receive_exact(stream, auth.MAC_BYTES, peer, deadline))
        except AuthenticationError:
            try:
                stream.send_all([auth.REJECT], 1.0)
            except (ConnectionClosed, PeerSilent):
                pass
            raise
        stream.send_all([auth.ACCEPT], timeout)
        return self._wrap(stream, client_nonce, server_nonce, client=False), None

    def _wrap(self, stream, client_nonce: bytes, server_nonce: bytes, *, client: bool) -> MacStream:
        c2s = _record_key(self.key, b"c2s", client_nonce, server_nonce)
        s2c = _record_key(self.key, b"s2c", client_nonce, server_nonce)
        return MacStream(stream, send_key=c2s if client else s2c, receive_key=s2c if client else c2s)


def receive_exact(stream: ByteStream, n: int, peer: str, deadline: float) -> bytes:
    """Exactly ``n`` bytes before ``deadline`` (a handshake's: for all of it, not per read)."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise PeerSilent(f"{peer} did not complete the handshake in time")
        try:
            k = stream.receive_into(view[got:], left)
        except TimeoutError:
            raise PeerSilent(f"{peer} did not complete the handshake in time") from None
        if k == 0:
            raise ConnectionClosed(f"{peer} closed the connection during the handshake")
        got += k
    return bytes(buf)


# ---------------------------------------------------------------------------------------
# the TLS mode
# ---------------------------------------------------------------------------------------

# Outgoing bytes are encrypted in pieces of this size, so a 5 MB snapshot is on the wire
# while the rest is still being encrypted, and no 5 MB ciphertext copy is ever held. Each
# piece costs a send and a pass through the loop below (the GIL taken again three times):
# a step's activations went out faster in 1 MiB pieces than in 256 KiB ones, in a training
# run's edge and device, the encryption itself costing the same either way (BENCHMARKS.md,
# section 3).
TLS_CHUNK = 1 << 20
_ACCEPTED = b"\x01"


class TLSStream:
    """A ``ByteStream`` carrying TLS over another ``ByteStream``."""

    def __init__(self, inner: ByteStream, ctx: ssl.SSLContext, *, server_side: bool,
                 session: ssl.SSLSession | None = None) -> None:
        self.inner = inner
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._incoming, self._outgoing, server_side=server_side, session=session)
        self._lock = threading.Lock()       # the SSL object and its two BIOs
        self._send_lock = threading.Lock()  # one writer on the inner stream at a time
        self._chunk = bytearray(1 << 20)
        self._eof = False

    def __getattr__(self, name: str):  # sock, fileno, shutdown, abort: the inner stream's
        return getattr(self.inner, name)

    def _flush(self, stall_timeout: float | None) -> None:
        with self._lock:
            data = self._outgoing.read()
        if data:
            self.inner.send_all([data], stall_timeout)

    def _feed(self, timeout: float | None) -> None:
        n = self.inner.receive_into(memoryview(self._chunk), timeout)
        with self._lock:
            if n == 0:
                self._incoming.write_eof()
            else:
                self._incoming.write(memoryview(self._chunk)[:n])

    def handshake(self, deadline: float, peer: str, *, then: Callable[[], None] | None = None) -> None:
        """The whole handshake before ``deadline``. ``then`` is called once it is done,
        before our last flight goes out (with the lock held, so what it writes goes out
        in the same send); an error it raises ends the handshake there."""
        while True:
            with self._lock:
                try:
                    self._obj.do_handshake()
                    done = True
                    if then is not None:
                        then()
                except ssl.SSLWantReadError:
                    done = False
                except ssl.SSLEOFError:
                    # the peer closed before the handshake ended, with no alert (an edge that
                    # is not up yet behind a relay, a dropped link): try again, as a reset
                    raise ConnectionClosed(f"{peer} closed the connection during the TLS handshake") from None
                except ssl.SSLError as exc:
                    failed = exc
                    done = None
            left = deadline - time.monotonic()
            with self._send_lock:
                try:
                    self._flush(max(left, 0.001))
                except (ConnectionClosed, PeerSilent):
                    if done is None:  # our alert could not go out: the failure is what matters
                        pass
                    else:
                        raise
            if done is None:
                raise AuthenticationError(f"TLS with {peer} failed: {_reason(failed)}")
            if done:
                return
            if left <= 0:
                raise PeerSilent(f"{peer} did not complete the handshake in time")
            try:
                self._feed(left)
            except TimeoutError:
                raise PeerSilent(f"{peer} did not complete the handshake in time") from None

    def peer_identity(self) -> Identity:
        cert = self._obj.getpeercert() or {}
        fields = {k: v for rdn in cert.get("subject", ()) for k, v in rdn}
        role, name = fields.get("organizationalUnitName", ""), fields.get("commonName", "")
        if role not in ROLES or not name:
            raise AuthenticationError(f"the peer's certificate names no testbed role ({role!r}, {name!r})")
        return Identity(role, name)

    def send_all(self, buffers, stall_timeout: float | None = None) -> int:
        total = 0
        with self._send_lock:
            for b in buffers:
                v = memoryview(b).cast("B")
                total += v.nbytes
                for i in range(0, v.nbytes, TLS_CHUNK):
                    with self._lock:
                        try:
                            self._obj.write(v[i:i + TLS_CHUNK])
                        except ssl.SSLError as exc:
                            raise ConnectionClosed(f"TLS: {_reason(exc)}") from exc
                        data = self._outgoing.read()
                    self.inner.send_all([data], stall_timeout)
        return total

    def receive_into(self, buf: memoryview, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                try:
                    n = self._obj.read(len(buf), buf)
                    pending = self._outgoing.pending
                except ssl.SSLWantReadError:
                    n, pending = -1, self._outgoing.pending
                except ssl.SSLZeroReturnError:
                    return 0
                except ssl.SSLEOFError:
                    return 0 if self._eof else self._ended()
                except ssl.SSLError as exc:
                    raise RemoteProtocolError(f"TLS record rejected ({_reason(exc)}): the bytes were altered "
                                              "on the way") from exc
            if pending and self._send_lock.acquire(blocking=False):
                try:  # what reading produced (a key update's answer) goes out now
                    self._flush(1.0)
                finally:
                    self._send_lock.release()
            if n > 0:
                return self._read_more(buf, n)
            if n == 0:
                return 0
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"no data within {timeout} s")
            self._feed(left)

    def _read_more(self, buf: memoryview, n: int) -> int:
        """After ``n`` bytes were read into ``buf``: every further byte that TLS can hand
        on without waiting (a 4.5 MB frame is 275 TLS records; one call per record would
        cost a pass through the transport's loop each). The end of the stream stops here
        (the next call sees it again); a record that fails raises at once."""
        with self._lock:
            while n < len(buf):
                try:
                    k = self._obj.read(len(buf) - n, buf[n:])
                except (ssl.SSLWantReadError, ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    break
                except ssl.SSLError as exc:
                    raise RemoteProtocolError(f"TLS record rejected ({_reason(exc)}): the bytes were altered "
                                              "on the way") from exc
                if k <= 0:
                    break
                n += k
        return n

    def _ended(self) -> int:
        # The TCP stream ended without TLS's close_notify: treated as an end of stream
        # (a peer that crashed), the frame layer above tells a clean end from a cut one.
        self._eof = True
        return 0

    def close(self) -> None:
        if self._send_lock.acquire(timeout=0.2):
            try:
                with self._lock:
                    try:
                        self._obj.unwrap()
                    except ssl.SSLError:
                        pass
                try:
                    self._flush(0.2)
                except Exception:  # the peer may be gone: closing is all that is left
                    pass
            finally:
                self._send_lock.release()
        self.inner.close()


def _reason(exc: ssl.SSLError) -> str:
    return getattr(exc, "reason", None) or getattr(exc, "verify_message", None) or str(exc)


class TLS:
    """The ``tls`` mode's credentials: this process's certificate and key, and the CA."""

    mode = "tls"

    def __init__(self, *, ca: str, cert: str, key: str) -> None:
        self.files = {"ca": ca, "cert": cert, "key": key}
        self._server = self._context(ssl.PROTOCOL_TLS_SERVER)
        self._client = self._context(ssl.PROTOCOL_TLS_CLIENT)
        # The last session with each peer (by the identity we expect of it), to resume:
        # a device that comes back to an edge it knows skips the certificates' checks and
        # signatures (a good share of the handshake, on a move's path: BENCHMARKS.md,
        # section 2e). The key
        # exchange is done anew (forward secrecy); the peer's identity is the one its
        # certificate proved in the full handshake, which the session keeps.
        self._sessions: dict[str, ssl.SSLSession] = {}
        self._sessions_lock = threading.Lock()

    def _context(self, protocol: int) -> ssl.SSLContext:
        ctx = ssl.SSLContext(protocol)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False  # names are testbed roles, checked by ``expect``, not host names
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=self.files["ca"])
        ctx.load_cert_chain(self.files["cert"], self.files["key"])
        if protocol == ssl.PROTOCOL_TLS_SERVER:
            ctx.num_tickets = 1  # one ticket per connection, for the client to resume with
        return ctx

    def client(self, stream, *, expect, peer, timeout, first=None):
        deadline = time.monotonic() + timeout
        known = str(expect) if expect is not None else ""
        with self._sessions_lock:
            session = self._sessions.get(known) if known else None
        tls = TLSStream(stream, self._client, server_side=False, session=session)
        proven: list[Identity] = []

        def then() -> None:  # the server is proven: check it is whom we expect, then speak
            identity = tls.peer_identity()
            if expect is not None and identity != expect:
                raise AuthenticationError(f"{peer} presented the certificate of {identity}, not of {expect}")
            proven.append(identity)
            for b in first or ():
                if len(b):
                    tls._obj.write(memoryview(b).cast("B"))

        tls.handshake(deadline, peer, then=then)
        identity = proven[0]
        if _receive_tls_exact(tls, 1, peer, deadline) != _ACCEPTED:
            raise AuthenticationError(f"{peer} did not accept our certificate")
        if known:  # read after the server's ticket: resumable now
            kept = tls._obj.session
            if kept is not None and kept.has_ticket:
                with self._sessions_lock:
                    self._sessions[known] = kept
        return tls, identity

    def server(self, stream, *, peer, timeout):
        deadline = time.monotonic() + timeout
        tls = TLSStream(stream, self._server, server_side=True)
        tls.handshake(deadline, peer)
        identity = tls.peer_identity()
        tls.send_all([_ACCEPTED], max(deadline - time.monotonic(), 0.001))
        return tls, identity


def _receive_tls_exact(stream: TLSStream, n: int, peer: str, deadline: float) -> bytes:
    try:
        return receive_exact(stream, n, peer, deadline)
    except RemoteProtocolError as exc:  # the server's alert: it refused our certificate
        raise AuthenticationError(f"{peer} refused our certificate ({exc})") from None
    except ConnectionClosed as exc:
        if isinstance(exc, PeerSilent):
            raise
        raise AuthenticationError(f"{peer} closed the connection after the TLS handshake "
                                  "(it refused our certificate?)") from None


# ---------------------------------------------------------------------------------------
# proofs of attachment: who may take a device's session
# ---------------------------------------------------------------------------------------
#
# A device holds a secret of its own (``device.state.attach_secret``) and gives each edge
# it attaches to a key derived from it for that edge alone (``edge_key``). With every
# attach it adds, for every edge, a proof made with that edge's key that it attaches to
# *this* edge (``attach_proofs``).
# The edge it attaches to forwards them in its pull (or drop, or replica pull); the
# holder checks the one made with the key it was given (``proof_holds``): so an edge takes
# a session only for an attach the device really made to it, and no edge can make a
# proof for another (it knows only its own key). A buddy edge holding a replica checks
# against the key of the edge the replica came from, which travels with the replica.

def edge_key(secret: bytes, edge: str) -> str:
    """The key of ``edge`` for one device (hex), derived from the device's secret."""
    return hmac.new(secret, b"fedfly edge key|" + edge.encode(), hashlib.sha256).hexdigest()


def _proof(key_hex: str, device: str, target: str) -> str:
    try:
        key = bytes.fromhex(key_hex)
    except ValueError:
        key = b""
    msg = f"fedfly attach|{device}|{target}".encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def attach_proofs(secret: bytes, *, device: str, target: str, edges) -> dict[str, str]:
    """For each edge: proof that ``device`` attached to ``target``. The target's own is
    for its buddy, which keeps replicas of the target's sessions checked with its key (a
    device started again from its disk goes back to its edge, which takes the replica)."""
    return {e: _proof(edge_key(secret, e), device, target) for e in edges}


def proof_holds(key_hex: str | None, proofs: dict[str, str], *, holder: str, device: str, target: str) -> bool:
    """Does ``proofs`` hold a proof, made with ``holder``'s key ``key_hex``, that
    ``device`` attached to ``target``?"""
    given = proofs.get(holder, "")
    if not key_hex or not isinstance(given, str):
        return False
    return hmac.compare_digest(given.encode(), _proof(key_hex, device, target).encode())


# ---------------------------------------------------------------------------------------
# from the config
# ---------------------------------------------------------------------------------------

def tls_files(certs_dir: str, identity: Identity) -> dict[str, str]:
    return {"ca": os.path.join(certs_dir, "ca.crt"),
            "cert": os.path.join(certs_dir, f"{identity.stem}.crt"),
            "key": os.path.join(certs_dir, f"{identity.stem}.key")}


def load_tls(certs_dir: str, identity: Identity) -> TLS:
    """This process's TLS credentials from ``certs_dir``; a missing file is a
    ``ConfigError`` that says how to make them."""
    files = tls_files(certs_dir, identity)
    for what, path in files.items():
        if not os.path.isfile(path):
            raise ConfigError("security.certs", f"{path} ({what} for {identity}) does not exist",
                              "make the testbed's certificates with: python -m scripts.certs --config <testbed.toml>"
                              " and copy each host's files as it says")
    try:
        return TLS(**files)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError("security.certs", f"cannot load {identity}'s certificate from {certs_dir}: {exc}",
                          "make them again with: python -m scripts.certs --config <testbed.toml> --force") from None

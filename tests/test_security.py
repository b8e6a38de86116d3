"""Issue 10's attacks, as tests: TLS and the shared key's MACs, identities, certificates.

In-process tests run the two security modes over in-memory streams (``common.stream``)
with a tamperer in between; the process tests run a small testbed with a relay of our own
(``tests.faultproxy``) between device1 and its edge that captures what passes and flips
one byte after the handshake, and try to act as somebody else with a real certificate.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from common import messages as m
from common import codec, pki, security, transport
from common.config import load_config
from common.errors import AuthenticationError, ConfigError, ConnectionClosed, PeerSilent, RemoteProtocolError
from common.models import build_model
from common.security import CENTRAL, CONTROLLER, Identity
from common.stream import memory_stream_pair
from tests.test_exactness import reference_sha
from tests.test_faults import _config, _run
from tests.testbed import write_config

pytestmark = pytest.mark.timeout(300)
KEY = bytes(range(32))
WAIT = 10.0


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """A testbed file in the tls mode with its certificates made by ``scripts.certs``."""
    tmp = tmp_path_factory.mktemp("pki")
    cfg = write_config(tmp, edges=2, devices=2, extra={"security": {"mode": "tls", "certs": "certs"}})
    from scripts import certs as certs_cmd
    assert certs_cmd.main(["--config", str(cfg)]) == 0
    return cfg


def creds(cfg: Path, who: Identity) -> security.TLS:
    return load_config(str(cfg)).credentials(who)


class Tamper:
    """A ``ByteStream`` in the middle: flips the lowest bit of byte ``flip_at`` it sends,
    or drops the ``drop_send``-th send whole (a record never arrives)."""

    def __init__(self, inner, *, flip_at: int = -1, drop_send: int = -1) -> None:
        self.inner, self.flip_at, self.drop_send = inner, flip_at, drop_send
        self.sent = 0
        self.sends = 0

    def send_all(self, buffers, stall_timeout=None):
        data = bytearray(b"".join(bytes(b) for b in buffers))
        self.sends += 1
        if self.sends == self.drop_send:
            return len(data)
        if self.sent <= self.flip_at < self.sent + len(data):
            data[self.flip_at - self.sent] ^= 1
        self.sent += len(data)
        return self.inner.send_all([data], stall_timeout)

    def receive_into(self, buf, timeout=None):
        return self.inner.receive_into(buf, timeout)

    def close(self):
        self.inner.close()


def secure_pair(client_creds, server_creds, *, expect=None, client_wrap=lambda s: s, first=None):
    """Both ends of an in-memory connection after the handshake: (client conn, server conn).
    ``first``: a message the client sends with its handshake (``Credentials.client``)."""
    a, b = memory_stream_pair()
    out: dict = {}

    def serve():
        try:
            out["server"] = server_creds.server(b, peer="client", timeout=WAIT)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc
            b.close()

    t = threading.Thread(target=serve)
    t.start()
    try:
        stream, ident = client_creds.client(client_wrap(a), expect=expect, peer="server", timeout=WAIT,
                                            first=None if first is None else codec.encode(first))
    except BaseException:
        a.close()  # as ``transport.connect`` does: the server hears of it at once
        raise
    finally:
        t.join(WAIT)
    if "error" in out:
        raise out["error"]
    sstream, sident = out["server"]
    return (transport.Connection(stream, peer="server", identity=ident),
            transport.Connection(sstream, peer="client", identity=sident))


def big_message(floats: int = 300_000) -> m.Message:
    return m.SessionReplica(device="device1", round=1, step=2, target="edge2", meta={}, checksum="x",
                            state={"w": torch.arange(floats, dtype=torch.float32)})


@pytest.mark.parametrize("mode", ["tls", "key"])
def test_both_modes_carry_frames_and_name_the_peer(certs, mode):
    if mode == "tls":
        c, s = secure_pair(creds(certs, Identity("device", "device1")), creds(certs, Identity("edge", "edge1")),
                           expect=Identity("edge", "edge1"))
        assert c.identity == Identity("edge", "edge1") and s.identity == Identity("device", "device1")
    else:
        c, s = secure_pair(security.SharedKey(KEY), security.SharedKey(KEY))
        assert c.identity is None and s.identity is None  # any holder of the key, under any name
    msg = big_message()
    threading.Thread(target=c.send, args=(msg,)).start()
    got = s.recv(timeout=WAIT)
    assert torch.equal(got.state["w"], msg.state["w"])
    s.send(m.StatusRequest())
    assert isinstance(c.recv(timeout=WAIT), m.StatusRequest)
    c.close()
    with pytest.raises(ConnectionClosed):
        s.recv(timeout=WAIT)


@pytest.mark.parametrize("mode", ["tls", "key"])
@pytest.mark.parametrize("where", ["header", "payload"])
def test_one_flipped_byte_after_the_handshake_is_caught_before_it_is_used(certs, mode, where):
    # the handshake is 72 bytes up in the key mode, about 1 KB in TLS; then a 1.2 MB frame
    at = {"header": 2000, "payload": 900_000}[where]
    wrap = (lambda s: Tamper(s, flip_at=at))
    if mode == "tls":
        c, s = secure_pair(creds(certs, Identity("device", "device1")), creds(certs, Identity("edge", "edge1")),
                           client_wrap=wrap)
    else:
        c, s = secure_pair(security.SharedKey(KEY), security.SharedKey(KEY), client_wrap=wrap)
    threading.Thread(target=lambda: _quiet(c.send, big_message()), daemon=True).start()
    with pytest.raises(RemoteProtocolError, match="altered"):
        s.recv(timeout=WAIT)
    c.abort()
    s.abort()


def test_a_dropped_record_is_caught_in_the_key_mode():
    # the sender's 4th send is its first frame's record (3 handshake sends before): it
    # vanishes, the next record arrives with the wrong sequence number
    c, s = secure_pair(security.SharedKey(KEY), security.SharedKey(KEY), client_wrap=lambda x: Tamper(x, drop_send=3))
    c.send(m.StatusRequest())
    c.send(m.Shutdown(reason="second"))
    with pytest.raises(RemoteProtocolError, match="altered"):
        s.recv(timeout=WAIT)


@pytest.mark.parametrize("mode", ["tls", "key"])
def test_a_receive_hands_on_only_records_that_verified(certs, mode):
    # many records already read in one receive: those before a damaged one come out whole,
    # the damaged one raises, and none of its bytes is handed on
    at = 300_000  # in the second 256 KiB record of the key mode, the 18th TLS record
    wrap = (lambda st: Tamper(st, flip_at=at))
    if mode == "tls":
        c, s = secure_pair(creds(certs, Identity("device", "device1")), creds(certs, Identity("edge", "edge1")),
                           client_wrap=wrap)
    else:
        c, s = secure_pair(security.SharedKey(KEY), security.SharedKey(KEY), client_wrap=wrap)
    sent = bytes(range(256)) * 2048  # 512 KiB
    threading.Thread(target=lambda: _quiet(c.stream.send_all, [sent], WAIT), daemon=True).start()
    time.sleep(0.2)  # let what fits arrive, to be read ahead
    buf = bytearray(len(sent))
    got = 0
    with pytest.raises(RemoteProtocolError, match="altered"):
        while True:
            got += s.stream.receive_into(memoryview(buf)[got:], WAIT)
    assert 0 < got < at and buf[:got] == sent[:got]
    c.abort()
    s.abort()


class Trickle:
    """A slow radio: what is sent goes in pieces of ``piece`` bytes, ``every`` seconds apart
    (once ``slow`` is set: the handshake goes at full speed)."""

    def __init__(self, inner, *, piece: int = 16 << 10, every: float = 0.05) -> None:
        self.inner, self.piece, self.every = inner, piece, every
        self.slow = False

    def send_all(self, buffers, stall_timeout=None):
        data = b"".join(bytes(b) for b in buffers)
        step = self.piece if self.slow else len(data) or 1
        for i in range(0, len(data), step):
            if self.slow:
                time.sleep(self.every)
            self.inner.send_all([data[i:i + step]], stall_timeout)
        return len(data)

    def receive_into(self, buf, timeout=None):
        return self.inner.receive_into(buf, timeout)

    def close(self):
        self.inner.close()


def test_a_record_still_arriving_on_a_slow_link_is_life_not_silence():
    # a 256 KiB record takes 0.8 s here, the receiver's idle limit is 0.3 s: the bytes of
    # the record on their way keep the link alive, and the frame arrives whole (one full
    # record and a short one: the point needs no more)
    slow: list[Trickle] = []
    c, s = secure_pair(security.SharedKey(KEY), security.SharedKey(KEY),
                       client_wrap=lambda st: slow.append(Trickle(st)) or slow[0])
    slow[0].slow = True
    s.idle_timeout = 0.3
    msg = big_message(70_000)
    assert security.MAX_RECORD < 70_000 * 4 < 2 * security.MAX_RECORD
    threading.Thread(target=lambda: _quiet(c.send, msg), daemon=True).start()
    got = s.recv(timeout=WAIT)
    assert torch.equal(got.state["w"], msg.state["w"])
    # and a peer that stops halfway through a record is silent after the limit
    slow[0].every = 5.0
    threading.Thread(target=lambda: _quiet(c.send, msg), daemon=True).start()
    t0 = time.monotonic()
    with pytest.raises(PeerSilent):
        s.recv(timeout=WAIT)
    assert time.monotonic() - t0 < 2.0
    c.abort()
    s.abort()


def test_bytes_trickled_into_a_record_keep_a_link_alive_only_for_a_while(monkeypatch):
    # somebody on the path who sends a byte now and then of a record that will never
    # verify must not keep a dead link looking alive: a record gets RECORD_GRACE_S
    monkeypatch.setattr(security, "RECORD_GRACE_S", 0.3)
    slow: list[Trickle] = []
    c, s = secure_pair(security.SharedKey(KEY), security.SharedKey(KEY),
                       client_wrap=lambda st: slow.append(Trickle(st)) or slow[0])
    slow[0].slow, slow[0].piece = True, 4 << 10  # 3.2 s per 256 KiB record
    s.idle_timeout = 0.3
    threading.Thread(target=lambda: _quiet(c.send, big_message()), daemon=True).start()
    t0 = time.monotonic()
    with pytest.raises(PeerSilent):
        s.recv(timeout=WAIT)
    assert time.monotonic() - t0 < 2.5  # the grace and the idle limit, long before the record's end
    c.abort()
    s.abort()


def test_the_server_must_be_who_the_client_expects(certs):
    with pytest.raises(AuthenticationError, match="edge edge1"):
        secure_pair(creds(certs, Identity("device", "device1")), creds(certs, Identity("edge", "edge1")),
                    expect=Identity("edge", "edge2"))


def test_a_client_resumes_its_last_session_with_a_peer_and_both_still_know_who_the_other_is(certs):
    dev = creds(certs, Identity("device", "device1"))
    edge2 = creds(certs, Identity("edge", "edge2"))
    for n in range(3):
        c, s = secure_pair(dev, edge2, expect=Identity("edge", "edge2"))
        assert c.stream._obj.session_reused == (n > 0) and s.stream._obj.session_reused == (n > 0)
        assert c.identity == Identity("edge", "edge2") and s.identity == Identity("device", "device1")
        c.send(m.OfferDeclined(device="device1", round=1, step=n))
        assert s.recv(timeout=WAIT) == m.OfferDeclined(device="device1", round=1, step=n)
        c.close()
        s.close()
    # offered to another edge (a stranger at that address), it is not taken: that edge's
    # own certificate is checked, and refused
    with pytest.raises(AuthenticationError, match="edge edge1"):
        secure_pair(dev, creds(certs, Identity("edge", "edge1")), expect=Identity("edge", "edge2"))
    # the same edge restarted (its ticket keys are new): a full handshake, as the first time
    c, s = secure_pair(dev, creds(certs, Identity("edge", "edge2")), expect=Identity("edge", "edge2"))
    assert not c.stream._obj.session_reused and c.identity == Identity("edge", "edge2")
    assert s.identity == Identity("device", "device1")


class Counting:
    """A ``ByteStream`` that counts the client's sends and bytes sent."""

    def __init__(self, inner) -> None:
        self.inner, self.sends, self.sent = inner, 0, 0

    def send_all(self, buffers, stall_timeout=None):
        self.sends += 1
        self.sent += sum(memoryview(b).nbytes for b in buffers)
        return self.inner.send_all(buffers, stall_timeout)

    def receive_into(self, buf, timeout=None):
        return self.inner.receive_into(buf, timeout)

    def close(self):
        self.inner.close()


@pytest.mark.parametrize("mode", ["tls", "key"])
def test_a_first_frame_goes_with_the_handshake_and_only_to_the_server_expected(certs, mode, tmp_path):
    """A device's attach rides with its last handshake flight (a round trip sooner on a
    move's path): the server reads it first, then the connection goes on as any other;
    with TLS it is in the same send as the client's Finished. A server that does not prove
    it is the one expected gets none of it."""
    dev, edge1 = ((creds(certs, Identity("device", "device1")), creds(certs, Identity("edge", "edge1")))
                  if mode == "tls" else (security.SharedKey(KEY), security.SharedKey(KEY)))
    expect = Identity("edge", "edge1") if mode == "tls" else None
    first = m.SessionReplica(device="device1", round=1, step=2, target="edge2", meta={}, checksum="x",
                             state={"w": torch.arange(1000, dtype=torch.float32)})
    sends = []
    for with_first in (False, True):
        counted: list[Counting] = []
        c, s = secure_pair(dev, edge1, expect=expect, first=first if with_first else None,
                           client_wrap=lambda a: counted.append(Counting(a)) or counted[-1])
        sends.append(counted[0].sends)
        if with_first:
            got = s.recv(timeout=WAIT)
            assert got.TYPE == first.TYPE and torch.equal(got.state["w"], first.state["w"])
        s.send(m.StatusRequest())
        assert isinstance(c.recv(timeout=WAIT), m.StatusRequest)
        c.send(m.OfferDeclined(device="device1", round=1, step=2))
        assert s.recv(timeout=WAIT) == m.OfferDeclined(device="device1", round=1, step=2)
        c.close()
        s.close()
    if mode == "tls":
        assert sends[1] == sends[0]  # the frame went in the Finished flight's send, not one of its own
    # servers not proven to be the one expected: the frame (1.2 MB) never leaves
    if mode == "tls":
        other = write_config(tmp_path / "other", edges=1, devices=1,
                             extra={"security": {"mode": "tls", "certs": "certs"}})
        pki.ensure(load_config(str(other)))
        wrong = [(creds(certs, Identity("edge", "edge2")), "edge edge2"),   # another edge of ours
                 (creds(other, Identity("edge", "edge1")), None)]           # a stranger's CA
    else:
        wrong = [(security.SharedKey(bytes(32)), "key")]                  # another key
    for server, says in wrong:
        counted = []
        with pytest.raises(AuthenticationError, match=says):
            secure_pair(dev, server, expect=expect, first=big_message(),
                        client_wrap=lambda a: counted.append(Counting(a)) or counted[-1])
        assert counted[0].sent < 10_000


def test_a_refused_client_learns_it_at_connect_though_its_first_frame_went_ahead(certs, tmp_path):
    """Over real sockets: a TLS server that refuses the client's certificate closes a
    connection that holds the client's unread first frame (a reset, not an orderly end).
    The client still hears the refusal as one (``AuthenticationError``: final, not tried
    again), and the server's handler never sees the connection. (In the key mode the
    client checks the server's proof of the key before it sends anything: a wrong key is
    found on the client's side, as before.)"""
    handled = []
    other = write_config(tmp_path / "other", edges=1, devices=1, extra={"security": {"mode": "tls", "certs": "certs"}})
    pki.ensure(load_config(str(other)))
    server, client = creds(certs, Identity("edge", "edge1")), creds(other, Identity("device", "device1"))
    expect = None
    rejected = []
    lst = transport.Listener("127.0.0.1", 0, creds=server, handler=handled.append,
                             on_reject=lambda peer, exc: rejected.append(exc), name="edge1").start()
    try:
        for _ in range(5):
            with pytest.raises(AuthenticationError):
                transport.connect("127.0.0.1", lst.port, creds=client, expect=expect, peer="edge edge1",
                                  timeout=WAIT, first=big_message())
        deadline = time.monotonic() + WAIT
        while len(rejected) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(rejected) == 5 and not handled
    finally:
        lst.close()


@pytest.mark.parametrize("after", [0, 1])
def test_a_peer_that_closes_during_the_tls_handshake_is_tried_again_not_refused(certs, after):
    """A relay whose upstream is not up yet closes the connection, with nothing said or
    after reading the hello: a connection to try again, not a refusal."""
    from common.errors import ConnectionClosed
    a, b = memory_stream_pair()

    def hang_up():
        if after:
            b.receive_into(memoryview(bytearray(4096)), WAIT)
        b.close()

    t = threading.Thread(target=hang_up)
    t.start()
    try:
        with pytest.raises(ConnectionClosed) as info:
            creds(certs, Identity("device", "device1")).client(a, expect=None, peer="edge edge1", timeout=WAIT)
        assert not isinstance(info.value, AuthenticationError)
    finally:
        t.join(WAIT)


def test_a_certificate_of_another_ca_is_refused_both_ways(certs, tmp_path):
    other = write_config(tmp_path / "other", edges=1, devices=1, extra={"security": {"mode": "tls", "certs": "certs"}})
    pki.ensure(load_config(str(other)))
    stranger = creds(other, Identity("device", "device1"))
    with pytest.raises(AuthenticationError):  # our edge refuses the stranger
        secure_pair(stranger, creds(certs, Identity("edge", "edge1")))
    with pytest.raises(AuthenticationError):  # and our device refuses a stranger's edge
        secure_pair(creds(certs, Identity("device", "device1")), creds(other, Identity("edge", "edge1")))


def test_the_certs_command_makes_what_is_missing_and_keeps_the_rest(tmp_path, capsys):
    cfg = write_config(tmp_path, edges=1, devices=2, extra={"security": {"mode": "tls", "certs": "pki"}})
    from scripts import certs as certs_cmd
    assert certs_cmd.main(["--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "made 5" in out and "device device2" in out and "ca.key stays here" in out
    d = tmp_path / "pki"
    assert (d / "ca.key").stat().st_mode & 0o077 == 0 and (d / "edge-edge1.key").stat().st_mode & 0o077 == 0
    before = (d / "device-device1.crt").read_bytes()
    (d / "device-device2.key").unlink()
    assert certs_cmd.main(["--config", str(cfg)]) == 0
    assert "made 1, kept 4" in capsys.readouterr().out
    assert (d / "device-device1.crt").read_bytes() == before
    # a missing file is a config error that says how to make them
    (d / "central.crt").unlink()
    with pytest.raises(ConfigError, match="scripts.certs"):
        load_config(str(cfg)).credentials(CENTRAL)


# -- real processes --------------------------------------------------------------------------

def _device_weight_bytes(cfg: Path) -> bytes:
    """64 bytes of the initial model's first layer, as they cross the wire to devices."""
    c = load_config(str(cfg))
    w = build_model(c.model.name, seed=c.run.seed).state_dict()
    first = next(iter(w.values()))
    return first.contiguous().view(-1)[:16].numpy().tobytes()


def _events(tmp: Path, process: str) -> list[dict]:
    out = []
    for f in (tmp / "runs").glob(f"*/events-{process}*.jsonl"):
        out += [json.loads(line) for line in f.read_text().splitlines()]
    return out


def _attempt(cfg: Path, who: Identity, port: int, expect: Identity, first: m.Message) -> m.Message | str:
    """Connect as ``who`` and send ``first``: the peer's answer, or how it refused us."""
    try:
        conn = transport.connect("127.0.0.1", port, creds=creds(cfg, who), expect=expect, peer=str(expect),
                                 timeout=WAIT, retry_for=60)  # the roles may still be starting
    except AuthenticationError as exc:
        return f"handshake: {exc}"
    try:
        conn.send(first)
        return conn.recv(timeout=WAIT)
    except (ConnectionClosed, RemoteProtocolError) as exc:
        return f"closed: {exc}"
    finally:
        conn.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    """The final model of the same run with no relay, trained in this process: each
    device's whole model, FedAvg in name order, which a testbed run without faults ends
    with in either mode (tests/test_exactness.py)."""
    return reference_sha(_config(tmp_path_factory.mktemp("reference"), "ref"), rounds=2)


@pytest.mark.process
@pytest.mark.parametrize("mode", ["tls", "key"])
def test_a_run_over_a_hostile_relay(tmp_path, reference, mode):
    """device1 talks to edge1 through a relay that records everything and flips one byte
    of the device's traffic after the handshake. With TLS the recording holds none of the
    model's bytes (in the key mode it does: the check can fail); in both modes the flip is
    caught, the connection closed, and the run ends with the model of the TLS run without
    a relay. In the TLS run, strangers with real certificates try to act as others."""
    extra = {"mode": "tls", "certs": "certs"} if mode == "tls" else {}
    cfg = _config(tmp_path, "hostile")
    if extra:
        text = cfg.read_text().replace("[security]\n", "[security]\nmode = \"tls\"\ncerts = \"certs\"\n")
        cfg.write_text(text)
        pki.ensure(load_config(str(cfg)))
    capture = tmp_path / "capture.bin"
    refusals: dict[str, object] = {}

    def impostors(bed) -> None:
        if mode != "tls":
            return
        c = load_config(str(cfg))
        e1 = c.edges["edge1"].port
        attach = m.AttachRequest(device="device1", kind="join", round=0, step=0, source="", why=m.ATTACH_WHY[0],
                                 checkpoints=[0], last_round=0)
        tries = {
            "device2 as device1": (Identity("device", "device2"), e1, Identity("edge", "edge1"), attach),
            "device2 pulls": (Identity("device", "device2"), e1, Identity("edge", "edge1"),
                              m.SessionPull(device="device1", round=1, step=1, target="edge2")),
            "edge2 as edge1": (Identity("edge", "edge2"), e1, Identity("edge", "edge1"),
                               m.SessionPull(device="device1", round=1, step=1, target="edge1")),
            "edge2 joins as edge1": (Identity("edge", "edge2"), c.central.port, CENTRAL, m.EdgeHello(edge="edge1")),
            "device moves device": (Identity("device", "device2"), c.devices["device1"].control_port,
                                    Identity("device", "device1"), m.MoveCommand(device="device1", to="edge2")),
            "controller status": (CONTROLLER, c.devices["device1"].control_port, Identity("device", "device1"),
                                  m.StatusRequest()),
        }
        # all at once, while the roles are up (one after another, the last ones could
        # come after the run had ended)
        with ThreadPoolExecutor(len(tries)) as pool:
            futures = {who: pool.submit(_attempt, cfg, *args) for who, args in tries.items()}
        refusals.update({who: f.result() for who, f in futures.items()})

    summary, proxies, _ = _run(cfg, tmp_path, proxies={"device1": {"edge1": []}}, during=impostors,
                               proxy_args=["--capture", str(capture), "--flip", "up:3000"]
                               + (["--opaque"] if mode == "tls" else []),
                               # a slower device2 keeps the run up while the strangers try (it
                               # sleeps between steps: the model does not change)
                               device_args={"device2": ["devices.device2.slowdown=4"]} if mode == "tls" else None)
    assert summary["status"] == "finished"
    flips = [e for e in proxies["device1-edge1"].events() if e["event"] == "flip"]
    assert len(flips) == 1, proxies["device1-edge1"].events()
    events = _events(tmp_path / "hostile", "edge1")
    caught = [e for e in events if "altered" in str(e.get("detail", ""))]
    assert len(caught) == 1 and caught[0]["event"] == "detached", [e["event"] for e in events]
    data = capture.read_bytes()
    assert len(data) > 1_000_000
    needle = _device_weight_bytes(cfg)
    if mode == "tls":
        assert needle not in data
        assert b"Activations" not in data and b"AttachRequest" not in data
        assert len(refusals) == 6, refusals  # every stranger tried
        for who, answer in refusals.items():
            if who == "controller status":
                assert isinstance(answer, m.StatusReply), answer
            else:  # refused: a notice, a closed connection (the refusal may race our send), never an answer
                assert isinstance(answer, (str, m.ErrorNotice)), (who, answer)
    else:
        assert needle in data and b"Activations" in data
    # the same model as the run without a relay (the flip cost a reconnect, nothing else)
    assert summary["final_model_sha256"] == reference


def _quiet(fn, *args):
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - the receiver's verdict is what the test checks
        pass

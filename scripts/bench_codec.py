"""Codec throughput: encode plus decode of a VGG-5 session snapshot, in GB/s.

    python -m scripts.bench_codec [--quick | --full] [--out DIR]

The message is a real ``SessionSnapshot``: an ``EdgeSession`` of VGG-5 at split layer 3
trains a few steps (so its momentum buffers exist), is snapshotted, and the snapshot is
framed. Timed, each over many iterations (median reported):

* encode: ``codec.encode`` (the buffers of one frame, ready for a gather write);
* decode: a fresh ``FrameDecoder`` fed the frame in ``transport.RECV_CHUNK`` pieces, as
  the socket layer feeds it, then ``next_message``;
* encode + decode: both, the buffers of ``encode`` fed straight to the decoder;
* memcpy of the frame's bytes, as the yardstick of this machine's memory bandwidth.

and, over a socketpair (the kernel, no network), one frame sent by a ``Connection`` on
one thread and received and decoded by another's ``recv``, in each security mode:

* wire plain: no security layer (the yardstick);
* wire key: the shared-key mode's records, a Poly1305 tag on every 256 KiB at most;
* wire tls: TLS 1.3 (AES-GCM where the CPU has AES instructions).

GB/s is frame bytes (1e9) per second. See the migration benchmark for a whole handover.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

from scripts import benchlib

ITERATIONS = {"tiny": 5, "quick": 200, "full": 2000}
SPLIT_LAYER = 3
BATCH = 100
TRAIN_STEPS = 3


def describe(scale: str) -> dict[str, Any]:
    return {"message": f"SessionSnapshot of VGG-5 split {SPLIT_LAYER} after {TRAIN_STEPS} steps of batch {BATCH}",
            "iterations": ITERATIONS[scale], "feed chunk": "transport.RECV_CHUNK (1 MiB)", "threads": 1}


def snapshot_message():
    """A real ``SessionSnapshot`` of a VGG-5 edge session (split 3) with momentum state."""
    import torch

    from common import messages as m
    from common.models import build_model, split_model
    from edge.session import EdgeSession

    _, edge = split_model(build_model("vgg5", seed=0), SPLIT_LAYER)
    session = EdgeSession(device="device1", round=1, mode="fedfly", model="vgg5", split_layer=SPLIT_LAYER,
                          lr=0.01, momentum=0.9, part_state=edge.state_dict())
    g = torch.Generator().manual_seed(0)
    for step in range(TRAIN_STEPS):
        x = torch.randn(BATCH, 64, 8, 8, generator=g)
        y = torch.randint(0, 10, (BATCH,), generator=g)
        session.train_step(step, x, y, lambda grad, loss: None)
    meta, tensors, checksum = session.snapshot()
    return m.SessionSnapshot(device="device1", round=1, step=session.step, meta=meta, checksum=checksum,
                             state=tensors)


def _median_ms(fn: Callable[[], Any], iterations: int) -> tuple[float, float]:
    fn()  # warm-up: first-touch page faults are not the codec's
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), benchlib.percentile(times, 95)


def _secured_pairs(out: Path) -> dict[str, Callable[[], tuple[Any, Any]]]:
    """Per mode, a maker of (sender, receiver) ``Connection`` pairs over a socketpair."""
    import socket
    import threading

    from common import pki, security, transport
    from common.config import load_config
    from common.stream import SocketStream

    cfg_path = benchlib.write_config(out, "codec-tls", edges=1, devices=1, rounds=1, mode="fedfly",
                                     samples_per_device=100, batch_size=50, split_layer=SPLIT_LAYER, test_samples=100)
    cfg = load_config(str(cfg_path), ['security.mode="tls"', 'security.certs="certs"'])
    pki.ensure(cfg)
    key = security.SharedKey(bytes(range(32)))
    tls_client = cfg.credentials(security.Identity("edge", "edge1"))
    tls_server = cfg.credentials(security.CENTRAL)

    def make(client_creds, server_creds):
        def pair():
            a, b = socket.socketpair()
            if client_creds is None:
                return transport.Connection(SocketStream(a)), transport.Connection(SocketStream(b))
            got = {}
            t = threading.Thread(target=lambda: got.update(s=server_creds.server(SocketStream(b), peer="b",
                                                                                  timeout=10)))
            t.start()
            sa, _ = client_creds.client(SocketStream(a), expect=None, peer="a", timeout=10)
            t.join()
            return transport.Connection(sa), transport.Connection(got["s"][0])
        return pair

    return {"wire_plain": make(None, None), "wire_key": make(key, key), "wire_tls": make(tls_client, tls_server)}


def run(out: Path, scale: str) -> dict[str, Any]:
    import threading

    from common import codec
    from common.training import set_threads
    from common.transport import RECV_CHUNK

    set_threads(1)
    msg = snapshot_message()
    frame = codec.encode_bytes(msg)
    nbytes = len(frame)
    n = ITERATIONS[scale]

    def feed(decoder: codec.FrameDecoder, buffers) -> None:
        for buf in buffers:
            view = memoryview(buf).cast("B")
            for i in range(0, view.nbytes, RECV_CHUNK):
                decoder.receive_data(view[i:i + RECV_CHUNK])

    def decode_only():
        dec = codec.FrameDecoder()
        feed(dec, [frame])
        got = dec.next_message()
        assert got is not codec.NEED_DATA

    def encode_only():
        codec.encode(msg)

    def round_trip():
        dec = codec.FrameDecoder()
        feed(dec, codec.encode(msg))
        got = dec.next_message()
        assert got is not codec.NEED_DATA

    def memcpy():
        bytearray(frame)

    back = next(codec.decode_all(frame))
    assert back.checksum == msg.checksum and set(back.state) == set(msg.state)
    figures: dict[str, Any] = {"frame_bytes": nbytes, "tensors": len(msg.state)}
    for name, fn in (("encode", encode_only), ("decode", decode_only), ("encode_decode", round_trip),
                     ("memcpy", memcpy)):
        med, p95 = _median_ms(fn, n)
        figures[name] = {"median_ms": med, "p95_ms": p95, "gb_per_s": nbytes / (med / 1000) / 1e9}
    for name, make in _secured_pairs(out).items():
        sender, receiver = make()

        def over_the_wire():
            t = threading.Thread(target=sender.send, args=(msg,))
            t.start()
            got = receiver.recv(timeout=30)
            t.join()
            assert got.checksum == msg.checksum

        med, p95 = _median_ms(over_the_wire, max(5, n // 4))
        figures[name] = {"median_ms": med, "p95_ms": p95, "gb_per_s": nbytes / (med / 1000) / 1e9}
        sender.close()
        receiver.close()
    return {"benchmark": "codec", "scale": scale, "config": describe(scale), "figures": figures}


def report(result: dict[str, Any]) -> str:
    f = result["figures"]
    rows = [[name, f[name]["median_ms"], f[name]["p95_ms"], f[name]["gb_per_s"]]
            for name in ("encode", "decode", "encode_decode", "memcpy", "wire_plain", "wire_key", "wire_tls")
            if name in f]
    return (f"codec: SessionSnapshot frame of {f['frame_bytes']:,} bytes, {f['tensors']} tensors\n"
            + benchlib.table(["operation", "median ms", "p95 ms", "GB/s"], rows, floatfmt=".3f")
            + f"\ncodec encode+decode: {f['encode_decode']['gb_per_s']:.2f} GB/s (goal >= 2 GB/s)"
            + (f"\none frame over a socketpair: key mode {f['wire_key']['median_ms'] / f['wire_plain']['median_ms']:.2f}x, "
               f"tls {f['wire_tls']['median_ms'] / f['wire_plain']['median_ms']:.2f}x the time without security"
               if "wire_tls" in f else ""))


if __name__ == "__main__":
    sys.exit(benchlib.standalone("codec", describe, run, report))

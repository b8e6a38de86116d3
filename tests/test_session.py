"""An edge session moved by snapshot goes on exactly as if it had never moved."""

from __future__ import annotations

import pytest
import torch

from common import codec
from common import messages as m
from common.errors import MigrationError
from common.models import build_model, split_model
from common.plan import Algo
from edge.checksum import snapshot_checksum
from edge.session import EdgeSession

CUT_SHAPE = {0: (32, 32, 32), 1: (32, 16, 16), 2: (64, 16, 16), 3: (64, 8, 8), 4: (64, 8, 8), 5: (128,)}


def make_session(split: int = 3, *, mode: str = "fedfly", seed_state: int | None = 9, **kw) -> EdgeSession:
    state = None
    if seed_state is not None:
        state = split_model(build_model("vgg5", seed=seed_state), split)[1].state_dict()
    args = dict(device="device1", round=2, mode=mode, model="vgg5", split_layer=split, lr=0.05, momentum=0.9,
                part_state=state, seed=4)
    args.update(kw)
    return EdgeSession(**args)


def batches(split: int, count: int, n: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 + split)
    return [(torch.randn(n, *CUT_SHAPE[split], generator=g), torch.randint(0, 10, (n,), generator=g))
            for _ in range(count)]


def train(session: EdgeSession, data, first_step: int) -> list[tuple[torch.Tensor, float]]:
    replies = []
    for i, (x, y) in enumerate(data):
        session.train_step(first_step + i, x, y, lambda g, loss: replies.append((g.detach().clone(), loss)))
    return replies


def momentum(session: EdgeSession) -> dict[int, torch.Tensor]:
    params = list(session.part.parameters())
    out = {}
    for i, p in enumerate(params):
        st = session.optimizer.state.get(p, {})
        if "momentum_buffer" in st:
            out[i] = st["momentum_buffer"]
    return out


def assert_same_session(a: EdgeSession, b: EdgeSession) -> None:
    wa, wb = a.weights(), b.weights()
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # weights and BN buffers bit for bit
    ma, mb = momentum(a), momentum(b)
    assert ma.keys() == mb.keys() and len(ma) == len(list(a.part.parameters()))
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    assert (a.step, a.samples, a.round, a.device) == (b.step, b.samples, b.round, b.device)
    assert a.loss_sum == b.loss_sum
    assert torch.equal(a.rng.get_state(), b.rng.get_state())


def _wire(meta, tensors, checksum):
    """Through the codec, as a migration sends it."""
    msg = m.SessionSnapshot(device=meta["device"], round=meta["round"], step=meta["step"], meta=meta,
                            checksum=checksum, state=tensors)
    (got,) = codec.decode_all(codec.encode_bytes(msg))
    return got.meta, got.state, got.checksum


@pytest.mark.parametrize("split,k,more,through_wire", [
    (3, 3, 3, False), (3, 2, 3, True), (0, 2, 2, True), (5, 2, 2, False), (3, 0, 2, True),
])
def test_migrated_session_continues_bit_identically(split, k, more, through_wire):
    data = batches(split, k + more)
    moved = make_session(split)
    train(moved, data[:k], 0)
    meta, tensors, checksum = moved.snapshot()
    if through_wire:
        meta, tensors, checksum = _wire(meta, tensors, checksum)
    resumed = EdgeSession.from_snapshot(meta, tensors, checksum, expect_model="vgg5", expect_split=split)
    assert resumed.step == k
    after_move = train(resumed, data[k:], k)

    straight = make_session(split)
    replies = train(straight, data, 0)
    assert_same_session(resumed, straight)
    # the device saw the same gradients at the cut and the same losses after the move
    for (g1, l1), (g2, l2) in zip(after_move, replies[k:]):
        assert torch.equal(g1, g2) and l1 == l2


def test_snapshot_holds_bn_running_stats_momentum_and_counters():
    s = make_session(3)
    data = batches(3, 3)
    train(s, data, 0)
    meta, tensors, checksum = s.snapshot(with_reply=True)
    assert meta["step"] == 3 and meta["samples"] == 18 and meta["device"] == "device1" and meta["round"] == 2
    assert meta["model"] == "vgg5" and meta["split_layer"] == 3 and meta["mode"] == "fedfly"
    assert meta["lr"] == 0.05 and meta["momentum"] == 0.9 and meta["loss_sum"] > 0
    w = s.weights()
    for name in ("l4.bn.running_mean", "l4.bn.running_var", "l4.bn.num_batches_tracked"):
        assert torch.equal(tensors[f"model/{name}"], w[name])
    assert tensors["model/l4.bn.num_batches_tracked"].item() == 3
    assert not torch.equal(tensors["model/l4.bn.running_mean"], torch.zeros(64))  # really trained
    params = list(s.part.parameters())
    for i, p in enumerate(params):
        buf = tensors[f"opt/{i}/momentum_buffer"]
        assert torch.equal(buf, s.optimizer.state[p]["momentum_buffer"])
        assert buf.shape == p.shape and buf.abs().sum() > 0
    assert "rng" in tensors and tensors["rng"].dtype == torch.uint8
    assert set(tensors) == {f"model/{k}" for k in w} | {f"opt/{i}/momentum_buffer" for i in range(len(params))} | \
        {"rng", "reply/grad"}
    assert meta["last_reply"]["step"] == 2 and torch.equal(tensors["reply/grad"], s.last_reply.grad)
    assert meta["optimizer"]["param_groups"][0]["momentum"] == 0.9
    assert checksum == snapshot_checksum(meta, tensors)


def test_rng_state_moves_with_the_session():
    s = make_session()
    torch.randn(5, generator=s.rng)  # advance it, as a model with dropout would
    state = s.rng.get_state()
    resumed = EdgeSession.from_snapshot(*s.snapshot(), expect_model="vgg5", expect_split=3)
    assert torch.equal(resumed.rng.get_state(), state)
    assert torch.equal(torch.randn(3, generator=resumed.rng), torch.randn(3, generator=s.rng))


def test_classic_mode_session_migrates_without_a_model():
    s = make_session(mode="classic", seed_state=None, step=4, samples=40, loss_sum=1.5)
    assert s.weights() == {}
    meta, tensors, checksum = s.snapshot()
    assert set(tensors) == {"rng"}
    resumed = EdgeSession.from_snapshot(*_wire(meta, tensors, checksum), expect_model="vgg5", expect_split=3)
    assert (resumed.mode, resumed.step, resumed.samples, resumed.loss_sum) == ("classic", 4, 40, 1.5)
    assert resumed.part is None


def test_checksum_covers_names_dtypes_and_shapes():
    meta = {"a": 1}
    t = torch.arange(6, dtype=torch.float32)
    base = snapshot_checksum(meta, {"x": t})
    assert snapshot_checksum(meta, {"x": t.clone()}) == base
    assert snapshot_checksum(meta, {"y": t}) != base
    assert snapshot_checksum(meta, {"x": t.reshape(2, 3)}) != base
    assert snapshot_checksum(meta, {"x": t.view(torch.int32)}) != base
    assert snapshot_checksum({"a": 2}, {"x": t}) != base
    assert snapshot_checksum(meta, {"x": t, "z": torch.empty(0)}) != base


# -- a damaged or foreign snapshot is refused ----------------------------------------------

@pytest.fixture(scope="module")
def snap():
    s = make_session(3)
    train(s, batches(3, 2), 0)
    return s.snapshot()


def _copy(snap):
    meta, tensors, checksum = snap
    import copy
    return copy.deepcopy(meta), {k: v.clone() for k, v in tensors.items()}, checksum


def _rebuild(meta, tensors, checksum, *, model="vgg5", split=3):
    return EdgeSession.from_snapshot(meta, tensors, checksum, expect_model=model, expect_split=split)


def test_untouched_snapshot_rebuilds(snap):
    assert _rebuild(*_copy(snap)).step == 2


@pytest.mark.parametrize("name", ["model/l4.conv.weight", "model/l4.bn.running_var", "model/l6.fc.bias",
                                  "opt/0/momentum_buffer", "opt/7/momentum_buffer", "rng"])
def test_tampered_tensor_is_refused(snap, name):
    meta, tensors, checksum = _copy(snap)
    t = tensors[name].view(-1).view(torch.uint8)
    t[len(t) // 2] ^= 1  # one bit
    with pytest.raises(MigrationError, match="checksum"):
        _rebuild(meta, tensors, checksum)


@pytest.mark.parametrize("field,value", [("step", 3), ("samples", 13), ("loss_sum", 0.0), ("device", "device2"),
                                         ("round", 3), ("lr", 0.5), ("split_layer", 2)])
def test_tampered_meta_is_refused(snap, field, value):
    meta, tensors, checksum = _copy(snap)
    meta[field] = value
    with pytest.raises(MigrationError, match="checksum"):
        _rebuild(meta, tensors, checksum, split=meta["split_layer"])


def test_missing_extra_or_renamed_tensor_and_bad_checksum_are_refused(snap):
    meta, tensors, checksum = _copy(snap)
    del tensors["opt/3/momentum_buffer"]
    with pytest.raises(MigrationError, match="checksum"):
        _rebuild(meta, tensors, checksum)
    meta, tensors, checksum = _copy(snap)
    tensors["extra"] = torch.zeros(1)
    with pytest.raises(MigrationError, match="checksum"):
        _rebuild(meta, tensors, checksum)
    meta, tensors, checksum = _copy(snap)
    tensors["model/l6.fc.biaz"] = tensors.pop("model/l6.fc.bias")
    with pytest.raises(MigrationError, match="checksum"):
        _rebuild(meta, tensors, checksum)
    meta, tensors, checksum = _copy(snap)
    with pytest.raises(MigrationError, match="checksum"):
        _rebuild(meta, tensors, checksum[:-1] + ("0" if checksum[-1] != "0" else "1"))
    with pytest.raises(MigrationError, match="checksum"):
        _rebuild(meta, tensors, "")


def test_wrong_model_or_split_is_refused(snap):
    with pytest.raises(MigrationError):
        _rebuild(*_copy(snap), split=2)
    with pytest.raises(MigrationError):
        _rebuild(*_copy(snap), split=4)
    with pytest.raises(MigrationError):
        _rebuild(*_copy(snap), model="vgg11")


def _reseal(meta, tensors):
    return meta, tensors, snapshot_checksum(meta, tensors)


def test_consistent_but_foreign_snapshot_is_refused(snap):
    # a snapshot whose checksum is right but whose content does not describe the session
    meta, tensors, _ = _copy(snap)
    meta["split_layer"] = 4  # claims split 4 but holds split 3's tensors (l4 is not in split 4's edge part)
    with pytest.raises(MigrationError):
        _rebuild(*_reseal(meta, tensors), split=4)
    meta, tensors, _ = _copy(snap)
    del meta["loss_sum"]
    with pytest.raises(MigrationError):
        _rebuild(*_reseal(meta, tensors))
    meta, tensors, _ = _copy(snap)
    tensors["model/l4.conv.weight"] = torch.zeros(3)  # wrong shape
    with pytest.raises(MigrationError):
        _rebuild(*_reseal(meta, tensors))
    meta, tensors, _ = _copy(snap)
    del tensors["rng"]
    with pytest.raises(MigrationError):
        _rebuild(*_reseal(meta, tensors))
    meta, tensors, _ = _copy(snap)
    tensors["rng"] = torch.zeros(3, dtype=torch.uint8)
    with pytest.raises(MigrationError):
        _rebuild(*_reseal(meta, tensors))


# -- training rules --------------------------------------------------------------------------

def test_train_step_with_the_wrong_step_number_is_refused_and_changes_nothing():
    s = make_session()
    data = batches(3, 2)
    train(s, data[:1], 0)
    before = {k: v.clone() for k, v in s.weights().items()}
    calls = []
    for wrong in (2, 5, -1):
        with pytest.raises(MigrationError):
            s.train_step(wrong, *data[1], lambda g, loss: calls.append(1))
    assert calls == [] and s.step == 1 and s.samples == 6
    for k, v in s.weights().items():
        assert torch.equal(v, before[k]), k
    s.train_step(1, *data[1], lambda g, loss: calls.append(1))
    assert calls == [1] and s.step == 2


def test_a_step_sent_again_is_answered_from_the_kept_reply_not_trained_twice():
    """Exactly once: the device lost the gradient of step 1 and sends step 1 again."""
    s, ref = make_session(), make_session()
    data = batches(3, 3)
    first = train(s, data[:2], 0)
    train(ref, data[:2], 0)
    snap = {k: v.clone() for k, v in s.weights().items()}
    again = []
    assert s.train_step(1, *data[1], lambda g, loss: again.append((g.clone(), loss))) is False
    assert torch.equal(again[0][0], first[1][0]) and again[0][1] == first[1][1]
    assert s.step == 2 and s.samples == 12
    for k, v in s.weights().items():
        assert torch.equal(v, snap[k]), k
    with pytest.raises(MigrationError):  # only the last reply is kept
        s.train_step(0, *data[0], lambda g, loss: None)
    train(s, data[2:], 2)
    train(ref, data[2:], 2)
    assert_same_session(s, ref)


def test_the_kept_reply_moves_with_the_session():
    """A step whose gradient was lost just before a move is answered by the new edge."""
    s = make_session()
    data = batches(3, 2)
    first = train(s, data, 0)
    plain = s.snapshot()  # a move at a step boundary: the device has that gradient already
    assert "reply/grad" not in plain[1] and plain[0]["last_reply"] is None
    meta, tensors, checksum = s.snapshot(with_reply=True)
    moved = EdgeSession.from_snapshot(*_wire(meta, tensors, checksum), expect_model="vgg5", expect_split=3)
    assert moved.position_matches(1) and moved.position_matches(2) and not moved.position_matches(0)
    got = []
    assert moved.train_step(1, *data[1], lambda g, loss: got.append((g, loss))) is False
    assert torch.equal(got[0][0], first[1][0]) and got[0][1] == first[1][1]


def test_reply_gets_the_gradient_at_the_cut_before_the_step():
    s = make_session(3)
    x, y = batches(3, 1)[0]
    seen = {}

    def reply(grad, loss):
        seen["grad"], seen["loss"] = grad.clone(), loss
        seen["w"] = s.part.state_dict()["l6.fc.bias"].clone()  # not yet stepped

    before = s.part.state_dict()["l6.fc.bias"].clone()
    s.train_step(0, x, y, reply)
    assert seen["grad"].shape == x.shape and seen["grad"].dtype == x.dtype
    assert torch.equal(seen["w"], before)
    assert not torch.equal(s.part.state_dict()["l6.fc.bias"], before)
    assert s.loss_sum == seen["loss"]
    # the gradient is exactly what the edge part's autograd gives
    ref = split_model(build_model("vgg5", seed=9), 3)[1]
    ref.train()
    xr = x.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(ref(xr), y).backward()
    assert torch.equal(xr.grad, seen["grad"])


@pytest.mark.parametrize("split,prox", [(1, 0.0), (3, 0.0), (3, 0.1)])
def test_the_gradient_at_the_cut_first_is_one_pass_bit_for_bit_at_full_size(split, prox):
    """A step's batch of 100 at CIFAR-10's size (the kernels of a real run, not a tiny
    one's): the two-pass backward (``cut_first``) against one pass, over three steps,
    with FedProx's proximal term too."""
    data = batches(split, 3, n=100)
    out = {}
    for first in (True, False):
        s = make_session(split, algo=Algo("fedprox", {"mu": prox}))
        replies = []
        for i, (x, y) in enumerate(data):
            s.train_step(i, x, y, lambda g, loss: replies.append((g.clone(), loss)), cut_first=first)
        out[first] = (replies, s)
    (two, s2), (one, s1) = out[True], out[False]
    assert all(torch.equal(a, b) and la == lb for (a, la), (b, lb) in zip(two, one, strict=True))
    assert_same_session(s2, s1)


def test_part_state_is_used_and_required_in_split_modes():
    a = make_session(seed_state=9)
    b = make_session(seed_state=10)
    ref = split_model(build_model("vgg5", seed=9), 3)[1].state_dict()
    assert a.weights().keys() == ref.keys()
    for k in ref:
        assert torch.equal(a.weights()[k], ref[k]), k
    assert not torch.equal(a.weights()["l5.fc.weight"], b.weights()["l5.fc.weight"])
    for mode in ("fedfly", "restart"):
        with pytest.raises(ValueError):
            make_session(mode=mode, seed_state=None)


def test_snapshot_missing_a_batch_norm_counter_is_refused(snap):
    meta, tensors, _ = _copy(snap)
    del tensors["model/l4.bn.num_batches_tracked"]
    with pytest.raises(MigrationError):
        _rebuild(*_reseal(meta, tensors))


# -- verify while receiving: the destination's CRCs are summed as the bytes arrive --------------

def _received(snap, chunk: int, flip: int | None = None):
    """The snapshot as a destination gets it: framed, optionally one payload byte flipped
    on the way, fed to a decoder in ``chunk``-byte pieces."""
    from common import codec
    from common import messages as m
    meta, tensors, checksum = snap
    frame = bytearray(codec.encode_bytes(m.SessionSnapshot(device="d", round=1, step=2, meta=meta,
                                                           checksum=checksum, state=tensors)))
    if flip is not None:
        frame[len(frame) - flip] ^= 0x40
    dec = codec.FrameDecoder()
    for i in range(0, len(frame), chunk):
        dec.receive_data(bytes(frame[i:i + chunk]))
    msg = dec.next_message()
    digests = {k: c for (f, k), c in codec.arrival_digests(msg).items() if f == "state"}
    return msg, digests


@pytest.mark.parametrize("chunk", [1000, 1 << 20])
def test_digests_on_arrival_verify_and_rebuild(snap, chunk):
    msg, digests = _received(snap, chunk)
    assert set(digests) == set(msg.state)
    session = EdgeSession.from_snapshot(msg.meta, msg.state, msg.checksum, expect_model="vgg5", expect_split=3,
                                        digests=digests)
    assert session.step == 2


@pytest.mark.parametrize("flip", [1, 300_000, 2_000_000])
def test_digests_on_arrival_catch_a_damaged_snapshot(snap, flip):
    msg, digests = _received(snap, 1 << 16, flip=flip)
    with pytest.raises(MigrationError, match="checksum"):
        EdgeSession.from_snapshot(msg.meta, msg.state, msg.checksum, expect_model="vgg5", expect_split=3, digests=digests)


def test_the_spare_part_is_rebuilt_later_and_once():
    """After a take, the next spare is built ``delay`` seconds later (off the handover's
    path: the build holds the GIL), by one thread however often it is asked."""
    import threading
    import time

    from edge.session import SparePart

    spare = SparePart("vgg5", 4)
    assert spare._spare is not None
    part = spare.take()
    assert spare._spare is None and list(part.state_dict())
    before = set(threading.enumerate())
    spare.refill_soon(delay=0.3)
    spare.refill_soon(delay=0.3)
    builders = [t for t in threading.enumerate() if t.name == "spare-part" and t not in before]
    assert len(builders) == 1
    time.sleep(0.1)
    assert spare._spare is None  # not yet: still waiting out its delay
    builders[0].join(10)
    assert spare._spare is not None
    assert spare.take() is not part


@pytest.mark.parametrize("value", [True, False])
def test_cut_gradient_first_goes_from_the_config_to_every_step(value):
    """``training.cut_gradient_first`` as written reaches the edge's core, which hands it
    to each step's job (so ``bench_split --one-pass`` measures what it says)."""
    import os

    from common.config import load_config
    from common.events import EventLog
    from common.security import Identity
    from edge.server import EdgeServer

    local = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "local.toml")
    cfg = load_config(local, env={}, overrides=[f"training.cut_gradient_first={str(value).lower()}",
                                                 'security.mode="key"'])  # its committed demo key: no certificates
    assert cfg.training.cut_gradient_first is value
    server = EdgeServer(cfg, "edge1", creds=cfg.credentials(Identity("edge", "edge1")),
                        events=EventLog(process="edge1", role="edge"))
    assert server.core.cut_first is value

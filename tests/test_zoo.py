"""Every registered model splits exactly, at every cut tested, for any input and class count.

For each model: (1) the split model's forward, loss, every gradient and the batch-norm
statistics are bit for bit the whole model's; (2) a round in which the edge session moves
(snapshot, through the codec, rebuilt on the "other edge") ends with the same full model
and the same momentum as the round without the move. Tiny inputs (8x8) keep it fast.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from common import codec
from common import messages as m
from common.models import build_model, split_model, state_sha256
from common.nets import NETS, ModelSpec, net
from common.training import LOSS, make_optimizer
from edge.session import EdgeSession

TINY = {"channels": 3, "height": 8, "width": 8, "classes": 5}
# (model, cut) pairs: the first and the last cut, and one inside
CASES = [("vgg5", 0), ("vgg5", 3), ("vgg5", 5), ("resnet18", 0), ("resnet18", 4), ("resnet18", 8),
         ("mobilenetv2", 0), ("mobilenetv2", 9), ("mobilenetv2", 18)]


def _key(name: str) -> str:
    return ModelSpec(name, **TINY).key


def _batch(seed: int, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, TINY["classes"], (n,), generator=g)


def test_every_registered_model_is_tested():
    assert {name for name, _ in CASES} == set(NETS)


@pytest.mark.parametrize("name,cut", CASES)
def test_split_equals_whole(name, cut):
    x, y = _batch(1)
    whole = build_model(_key(name), seed=7)
    loss_whole = LOSS(whole(x), y)
    loss_whole.backward()

    twin = build_model(_key(name), seed=7)
    dev, edge = split_model(twin, cut)
    act = dev(x)
    at_edge = act.detach().clone().requires_grad_(True)
    loss_split = LOSS(edge(at_edge), y)
    loss_split.backward()
    act.backward(at_edge.grad)

    assert loss_whole.item() == loss_split.item()
    for (k, p), (k2, q) in zip(whole.named_parameters(), twin.named_parameters()):
        assert k == k2 and torch.equal(p.grad, q.grad), k
    assert state_sha256(whole.state_dict()) == state_sha256(twin.state_dict())  # BN statistics too


def _assert_cut_first_changes_no_bit(key: str, cut: int, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``training.cut_gradient_first``: the edge's backward in two passes (the gradient at
    the cut alone, then the weights') gives, step after step on ``batches``, the gradient
    and the loss, and in the end the weights, batch-norm statistics and momenta of one
    pass, bit for bit."""
    dev, edge = split_model(build_model(key, seed=3), cut)
    state = edge.state_dict()
    data = [(dev(x).detach(), y) for x, y in batches]
    runs = {}
    for first in (True, False):
        session = EdgeSession(device="d1", round=1, mode="fedfly", model=key, split_layer=cut, lr=0.05,
                              momentum=0.9, part_state={k: v.clone() for k, v in state.items()}, seed=1)
        replies: list = []
        for step, (act, y) in enumerate(data):
            session.train_step(step, act, y, lambda g, loss: replies.append((g.clone(), loss)), cut_first=first)
        runs[first] = (replies, session)
    (two, s2), (one, s1) = runs[True], runs[False]
    for (g2, loss2), (g1, loss1) in zip(two, one, strict=True):
        assert torch.equal(g2, g1) and loss2 == loss1
    assert state_sha256(s2.weights()) == state_sha256(s1.weights())
    assert all(torch.equal(a, b) for a, b in zip(_momenta(s2.optimizer), _momenta(s1.optimizer), strict=True))


@pytest.mark.parametrize("name,cut", CASES)
def test_the_gradient_at_the_cut_first_changes_no_bit(name, cut):
    _assert_cut_first_changes_no_bit(_key(name), cut, [_batch(200 + i) for i in range(3)])


@pytest.mark.parametrize("name,cut", [("resnet18", 4), ("mobilenetv2", 9)])
def test_the_gradient_at_the_cut_first_changes_no_bit_at_cifar_size(name, cut):
    """At 32x32 and a batch of 32: convolution kernels are chosen by size (a 1x1
    convolution's changes above a batch of 16)."""
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(2)]
    _assert_cut_first_changes_no_bit(ModelSpec(name, channels=3, height=32, width=32, classes=10).key, cut, batches)


def _full_state(dev, session: EdgeSession) -> dict[str, torch.Tensor]:
    return {**dev.state_dict(), **session.weights()}


def _momenta(opt: torch.optim.SGD) -> list[torch.Tensor]:
    return [opt.state[p]["momentum_buffer"] for g in opt.param_groups for p in g["params"]]


def _round(name: str, cut: int, *, move_at: int | None, steps: int = 3):
    """One device's round of ``steps`` split steps; the edge session moves before step
    ``move_at`` (through the codec, as a migration sends it)."""
    key = _key(name)
    start = build_model(key, seed=3).state_dict()
    whole = build_model(key, seed=0)
    whole.load_state_dict(start)
    dev, edge = split_model(whole, cut)
    dev_opt = make_optimizer(dev.parameters(), lr=0.05, momentum=0.9)
    session = EdgeSession(device="d1", round=1, mode="fedfly", model=key, split_layer=cut, lr=0.05, momentum=0.9,
                          part_state={k: v.clone() for k, v in edge.state_dict().items()}, seed=1)
    for step in range(steps):
        if step == move_at:
            meta, tensors, checksum = session.snapshot()
            msg = m.SessionSnapshot(device="d1", round=1, step=step, meta=meta, checksum=checksum, state=tensors)
            (got,) = codec.decode_all(codec.encode_bytes(msg))
            session = EdgeSession.from_snapshot(got.meta, got.state, got.checksum, expect_model=key, expect_split=cut)
        x, y = _batch(100 + step)
        dev_opt.zero_grad(set_to_none=True)
        act = dev(x)
        grads = []
        session.train_step(step, act.detach(), y, lambda g, loss: grads.append(g))
        act.backward(grads[0])
        dev_opt.step()
    return _full_state(dev, session), _momenta(dev_opt) + _momenta(session.optimizer)


@pytest.mark.parametrize("name,cut", [("vgg5", 3), ("resnet18", 4), ("mobilenetv2", 9)])
def test_a_round_with_a_move_ends_bit_identical(name, cut):
    moved, moved_m = _round(name, cut, move_at=2)
    straight, straight_m = _round(name, cut, move_at=None)
    assert state_sha256(moved) == state_sha256(straight)
    assert any("running_mean" in k for k in moved)
    assert len(moved_m) == len(straight_m) and all(torch.equal(a, b) for a, b in zip(moved_m, straight_m))


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("shape", [(1, 28, 28, 100), (3, 16, 16, 7)])
def test_any_input_size_and_class_count(name, shape):
    c, h, w, k = shape
    model = build_model(ModelSpec(name, c, h, w, k).key, seed=0)
    assert model(torch.randn(2, c, h, w)).shape == (2, k)
    assert len(model.layers) == len(net(name).layers)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_the_models_are_the_published_architectures():
    # ResNet-18 CIFAR: torchvision's ResNet-18 with a 3x3 stem instead of 7x7 (64*3*(49-9) fewer weights)
    ref = torchvision.models.resnet18(num_classes=10)
    assert _count(build_model("resnet18", seed=0)) == _count(ref) - 64 * 3 * 40 == 11_173_962
    # MobileNetV2 CIFAR: strides differ from torchvision's, the weights do not
    assert _count(build_model("mobilenetv2", seed=0)) == _count(torchvision.models.mobilenet_v2(num_classes=10))


def test_model_keys_round_trip_and_the_paper_input_is_the_bare_name():
    assert ModelSpec("vgg5").key == "vgg5"
    spec = ModelSpec("resnet18", 1, 28, 28, 100)
    assert spec.key == "resnet18/1x28x28/100" and ModelSpec.parse(spec.key) == spec
    with pytest.raises(KeyError, match="known: vgg5"):
        ModelSpec.parse("alexnet")
    with pytest.raises(ValueError):
        ModelSpec.parse("vgg5/3x32/10")


@pytest.mark.process
def test_resnet18_run_with_a_move_equals_training_the_whole_model_in_process(tmp_path):
    """Real processes: ResNet-18 on 8x8 synthetic images, cut at block 4, device1 moves
    half-way through round 1; the final model is the in-process whole-model run's."""
    from tests.test_exactness import reference_sha
    from tests.testbed import run_launch, write_config
    cfg = write_config(tmp_path, edges=2, devices=2, rounds=1, samples_per_device=16, batch_size=4, split_layer=4,
                       moves=[{"device": "device1", "to": "edge2", "round": 1, "at": 0.5}],
                       device_edges={"device2": "edge2"},
                       extra={"model": {"name": "resnet18"}, "data": {"image_size": 8, "test_samples": 50}})
    status, out, summary = run_launch(cfg)
    assert status == 0, out
    (mig,) = summary["migrations"]
    assert (mig["device"], mig["to"], mig["step"]) == ("device1", "edge2", 2)
    assert mig["state_bytes"] > 2 * 4 * 10_000_000  # blocks 5..8 and the head of ResNet-18, and momentum
    assert summary["final_model_sha256"] == reference_sha(cfg, rounds=1)

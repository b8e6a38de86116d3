"""The fused ReLU + 2x2 max-pool (``common.nets.fused``) gives the unfused modules' bits,
forward and backward, and keeps less for the backward pass (issue 25 item 2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import common.models as models
from common.nets.fused import fusable, relu_maxpool2x2

# the zoo's models with the pattern (VGG-5's two conv blocks), at inputs whose pooled
# sizes are even, odd (30: the second pool sees 15x15) and MNIST's
KEYS = ("vgg5", "vgg5/1x28x28/10", "vgg5/3x30x30/10")


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that -0.0 differs from +0.0."""
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def nasty(shape, dtype, seed: int) -> torch.Tensor:
    """Random values with many ties and zeros of both signs: whole windows of negatives,
    of zeros, positives tied with each other (no NaN, no infinity)."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor([-2.0, -1.0, -0.0, 0.0, 0.5, 1.0, 1.0, 3.0], dtype=dtype)
    picked = pool[torch.randint(len(pool), shape, generator=g)]
    normal = torch.randn(shape, generator=g, dtype=dtype)
    return torch.where(torch.rand(shape, generator=g) < 0.5, picked, normal)


def pool_inputs(key: str, batch: int) -> list[torch.Size]:
    """The shape of every fusable block's pre-ReLU output in ``key``'s whole model."""
    spec = models.ModelSpec.parse(key)
    model = models.build_model(key, seed=0)
    layers = list(model.layers.values())
    shapes, x = [], torch.zeros(batch, spec.channels, spec.height, spec.width)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            if i + 1 < len(layers) and fusable(layer, layers[i + 1]):
                shapes.append(layer.pre_relu(x).shape)
            x = layer(x)
    return shapes


def unfused(z: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(torch.relu(z), 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("key", KEYS)
def test_same_bits_as_relu_then_maxpool(key, dtype):
    shapes = pool_inputs(key, batch=3)
    assert len(shapes) == 2  # both conv blocks of VGG-5 are followed by a 2x2 pool
    for seed, shape in enumerate(shapes):
        z = nasty(shape, dtype, seed)
        z[0, 0, :2, :2] = torch.tensor([[-1.0, -0.0], [-2.0, -3.0]])  # max -0.0 not first: pools to +0.0
        z[0, 1, :2, :2] = torch.tensor([[-0.0, -1.0], [0.0, -0.0]])  # -0.0 first: pools to -0.0
        grad = nasty(torch.Size([*shape[:2], shape[2] // 2, shape[3] // 2]), dtype, seed + 100)
        grad[0, 2, 0, 0] = -0.0  # max-pool's backward adds it into +0.0
        ref_in, our_in = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
        ref, ours = unfused(ref_in * 1), relu_maxpool2x2(our_in * 1)  # (* 1: not a leaf, as a block's output)
        assert torch.equal(bits(ours), bits(ref))
        ref.backward(grad)
        ours.backward(grad)
        assert torch.equal(bits(our_in.grad), bits(ref_in.grad))
        assert bits(ours)[0, 0, 0, 0] == 0 and bits(ours)[0, 1, 0, 0] != 0  # the zeros' signs were tried


def test_wide_rows():
    """Rows of more than 254 values: the places' offsets no longer fit a byte."""
    z = nasty((2, 3, 4, 300), torch.float32, 3)
    grad = nasty((2, 3, 2, 150), torch.float32, 4)
    ref_in, our_in = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    ref, ours = unfused(ref_in * 1), relu_maxpool2x2(our_in * 1)
    assert torch.equal(bits(ours), bits(ref))
    ref.backward(grad)
    ours.backward(grad)
    assert torch.equal(bits(our_in.grad), bits(ref_in.grad))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("key", KEYS)
def test_a_model_trains_to_the_same_bits(key, threads, monkeypatch):
    """Device part, edge part and the whole model: same outputs, gradients, running
    statistics and keys with and without the fusion (which is a forward-time choice),
    with one intra-op thread and two (the batch norm's slices are split among threads
    otherwise than the whole)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _same_bits(key, monkeypatch)
    finally:
        torch.set_num_threads(before)


def _same_bits(key: str, monkeypatch) -> None:
    spec = models.ModelSpec.parse(key)
    x = nasty((4, spec.channels, spec.height, spec.width), torch.float32, 7)
    runs = []
    for fuse in (True, False):
        if not fuse:
            monkeypatch.setattr(models, "fusable", lambda a, b: False)
        model = models.build_model(key, seed=3)
        device, edge = models.split_model(model, 3)
        act = device(x)
        logits = edge(act.detach().requires_grad_(True))
        logits.sum().backward()
        (act * 1).backward(torch.ones_like(act) / act.numel())
        runs.append((bits(act), bits(logits), list(model.state_dict()), models.state_sha256(model.state_dict()),
                     models.state_sha256({n: p.grad for n, p in model.named_parameters()})))
    (a1, l1, k1, s1, g1), (a2, l2, k2, s2, g2) = runs
    assert torch.equal(a1, a2) and torch.equal(l1, l2)
    assert k1 == k2 and s1 == s2 and g1 == g2


def node_names(t: torch.Tensor) -> list[str]:
    todo, seen = [t.grad_fn], []
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.append(node)
            todo.extend(n for n, _ in node.next_functions)
    return [type(n).__name__ if not hasattr(n, "name") else n.name() for n in seen]


def test_the_edges_two_passes_and_eval_mode(monkeypatch):
    """An edge part with a fused block, back-propagated as the edge does with
    ``cut_gradient_first`` (the gradient at the cut with retain_graph, then the weights'),
    and a model in eval mode with gradients (the plain batch norm, ReLU and pool fused):
    the unfused bits."""
    x = nasty((4, 32, 16, 16), torch.float32, 11)
    y = torch.arange(4) % 10
    runs = []
    for fuse in (True, False):
        if not fuse:
            monkeypatch.setattr(models, "fusable", lambda a, b: False)
        edge = models.edge_part("vgg5", 1, seed=5)  # layers 2 (conv block), 3 (pool), ...
        inp = x.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(edge(inp), y)
        assert ("_ConvBnReluMaxPool2x2Backward" in node_names(loss)) == fuse
        (at_cut,) = torch.autograd.grad(loss, (inp,), retain_graph=True)
        loss.backward(inputs=list(edge.parameters()))
        whole = models.build_model("vgg5", seed=5).eval()
        image = nasty((4, 3, 32, 32), torch.float32, 12).requires_grad_(True)
        out = whole(image)
        assert node_names(out).count("_ReluMaxPool2x2Backward") == (2 if fuse else 0)
        out.sum().backward()
        runs.append((bits(at_cut), models.state_sha256({n: p.grad for n, p in edge.named_parameters()}),
                     models.state_sha256(edge.state_dict()), bits(image.grad),
                     models.state_sha256({n: p.grad for n, p in whole.named_parameters()})))
    (c1, g1, s1, i1, w1), (c2, g2, s2, i2, w2) = runs
    assert torch.equal(c1, c2) and g1 == g2 and s1 == s2
    assert torch.equal(i1, i2) and w1 == w2


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for ``fn()``'s backward pass: its
    saved tensors, and the tensors the fused step keeps on its node (``inputs``)."""
    kept: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = fn()
    todo, seen = [out.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for t in getattr(node, "inputs", None) or ():
            keep(t)
        todo.extend(n for n, _ in node.next_functions)
    return sum(kept.values())


def test_the_device_part_keeps_less(monkeypatch):
    """VGG-5's device part (cut 3) keeps neither ReLU's outputs nor max-pool's int64
    indices: of those, only a byte per pooled value."""
    x = torch.randn(8, 3, 32, 32)
    part = models.device_part("vgg5", 3, seed=0)
    fused = saved_bytes(lambda: part(x))
    monkeypatch.setattr(models, "fusable", lambda a, b: False)
    plain = saved_bytes(lambda: part(x))
    relu_out = 4 * 8 * (32 * 32 * 32 + 64 * 16 * 16)
    pooled = 8 * (32 * 16 * 16 + 64 * 8 * 8)
    out = 4 * 8 * 64 * 8 * 8  # the part's output, kept by the fused step (the caller holds it anyway)
    stats = 2 * 4 * (32 + 64)  # the batch norms' per-channel mean and 1/std, a few hundred bytes
    assert plain - fused >= relu_out + 8 * pooled - pooled - out - stats


def test_fusable_only_for_relu_blocks_and_a_plain_2x2_pool():
    block = models.layer_builders("vgg5")[0]()
    assert fusable(block, nn.MaxPool2d(2))
    assert fusable(block, nn.MaxPool2d((2, 2), stride=2))
    assert not fusable(block, nn.MaxPool2d(3, 2, 1))
    assert not fusable(block, nn.MaxPool2d(2, ceil_mode=True))
    assert not fusable(block, nn.MaxPool2d(2, padding=1))
    assert not fusable(block, nn.AvgPool2d(2))
    assert not fusable(nn.Conv2d(3, 3, 3), nn.MaxPool2d(2))
    assert not fusable(models.layer_builders("resnet18")[0](), nn.MaxPool2d(2))  # no pre_relu

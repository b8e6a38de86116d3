"""The fused convolution block (``common.nets.fused``: convolution, batch norm, ReLU and
pool as one step) gives the unfused modules' bits for a convolution other than VGG-5's,
with its input's gradient; a pass with ``retain_graph`` leaves the batch norm's input
whole for the next; a second pass without it is refused (issue 25 item 2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import common.models as models
from common.nets import vgg5
from common.nets.fused import block_relu_maxpool2x2


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def block(seed: int) -> nn.Module:
    """A VGG-5 block whose convolution has no bias and a stride of 1x2 (an odd width out)."""
    torch.manual_seed(seed)
    b = vgg5.ConvBlock(3, 8)
    b.conv = nn.Conv2d(3, 8, 3, stride=(1, 2), padding=(1, 2), bias=False)
    return b


def run(fused: bool, passes: int) -> list:
    b = block(4)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(5, 3, 12, 21, generator=g).requires_grad_(True)
    out = block_relu_maxpool2x2(b, x) if fused else nn.functional.max_pool2d(b(x), 2)
    grad = torch.randn(out.shape, generator=g)
    got = [bits(out)]
    for k in range(passes):
        x.grad = None
        b.zero_grad(set_to_none=True)
        out.backward(grad, retain_graph=k + 1 < passes)
        got += [bits(x.grad)] + [bits(p.grad) for p in b.parameters()]
    return got + [bits(b.bn.running_mean), bits(b.bn.running_var)]


@pytest.mark.parametrize("passes", [1, 2])
def test_same_bits_as_the_modules(passes):
    """One pass, and two (the first with retain_graph: it must not overwrite the batch
    norm's input that the second reads)."""
    fused, plain = run(True, passes), run(False, passes)
    assert len(fused) == len(plain)
    assert all(torch.equal(a, b) for a, b in zip(fused, plain))


def test_a_second_pass_without_retain_graph_is_refused():
    b = block(5)
    out = block_relu_maxpool2x2(b, torch.randn(2, 3, 8, 8))
    assert type(out.grad_fn).__name__ == "_ConvBnReluMaxPool2x2Backward"
    out.sum().backward()
    with pytest.raises(RuntimeError):
        out.sum().backward()


def test_only_the_gradients_a_pass_asks_for():
    """``torch.autograd.grad`` for the input alone, then for the weights alone: the
    modules' bits each time."""
    got = []
    for fused in (True, False):
        b = block(6)
        x = torch.randn(3, 3, 10, 10, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
        out = (block_relu_maxpool2x2(b, x) if fused else nn.functional.max_pool2d(b(x), 2)).square().sum()
        (dx,) = torch.autograd.grad(out, (x,), retain_graph=True)
        dws = torch.autograd.grad(out, list(b.parameters()))
        got.append([bits(dx)] + [bits(d) for d in dws])
    assert all(torch.equal(a, b) for a, b in zip(*got))


def test_the_device_part_uses_it():
    part = models.device_part("vgg5", 3, seed=0)
    out = part(torch.randn(2, 3, 32, 32))
    names, todo = [], [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None:
            names.append(type(node).__name__)
            todo.extend(n for n, _ in node.next_functions)
    assert names.count("_ConvBnReluMaxPool2x2Backward") == 2
    assert "ConvolutionBackward0" not in names

"""A device's step and the model's shapes leave sympy unimported (issue 25): torch imports
it, and hundreds of modules with it, on ``out.backward(grad)`` and on
``Module.to_empty`` from the meta device. ``common.footprint.backward`` and
``common.models.empty_part`` take other roads to the same bits; checked here in a fresh
interpreter, and bit for bit against torch's own calls."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from common.footprint import backward
from common.models import device_part, empty_part, part_keys, split_model, build_model, state_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEVICE_WORK = r"""
import json, sys, torch
from common.footprint import backward
from common.models import device_part, empty_part, part_keys, state_spec
from common.training import make_optimizer, warm_up
warm_up()
state_spec("vgg5"); part_keys("vgg5", 3); empty_part("vgg5", 4)
part = device_part("vgg5", 3, seed=1)
opt = make_optimizer(part.parameters(), lr=0.01, momentum=0.9)
out = part(torch.randn(4, 3, 32, 32))
backward(out, torch.ones_like(out))
opt.step()
print(json.dumps([m for m in ("sympy", "torch._dynamo", "torch.fx.experimental.symbolic_shapes") if m in sys.modules]))
"""


def test_device_step_and_shapes_leave_sympy_unimported():
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", DEVICE_WORK], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    assert json.loads(out.stdout) == []


def _grads(step) -> list[torch.Tensor]:
    part = device_part("vgg5", 3, seed=3)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    out = part(x)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(6))
    step(out, grad)
    return [p.grad for p in part.parameters()]


def test_backward_is_torchs_bit_for_bit():
    mine = _grads(backward)
    torchs = _grads(lambda out, grad: out.backward(grad))
    assert len(mine) == len(torchs) and all(torch.equal(a, b) for a, b in zip(mine, torchs))
    assert any(bool(g.abs().sum()) for g in mine)


def test_shapes_without_memory_match_a_built_model():
    full = build_model("vgg5", seed=0)
    dev, edge = split_model(full, 3)
    assert state_spec("vgg5") == {k: (tuple(v.shape), v.dtype) for k, v in full.state_dict().items()}
    assert part_keys("vgg5", 3) == (list(dev.state_dict()), list(edge.state_dict()))
    empty = empty_part("vgg5", 4)
    assert {k: (v.shape, v.dtype, v.device.type) for k, v in empty.state_dict().items()} == \
        {k: (v.shape, v.dtype, "cpu") for k, v in edge.state_dict().items()}
    empty.load_state_dict(edge.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(empty.state_dict().values(), edge.state_dict().values()))

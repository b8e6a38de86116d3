"""What one step may carry, by the round: the bounds of a batch of activations (device ->
edge) and of the gradient that answers it (edge -> device).

A certificate proves who a device is, not that its batch is sane: a batch of thousands of
rows under the payload cap once grew an edge by gigabytes and held up the other devices on
it, and NaN activations made a session NaN for the rest of its round (issue 26). So a
frame larger than an honest device sends is refused from its prefix
(``device_payload_limit``), and a batch is refused, before it is held or trained, unless

- its rows are 1..``batch_size`` (the round's; a shard's last batch may be smaller),
- each row has the shape and dtype of the model's activations at the device's cut
  (``cut_row``: one row of the model's input run through the device part),
- its values are finite and its labels are classes of the model;

and a gradient is refused by the device unless it has the shape and dtype of the
activations it answers and finite values. The checks read the tensors and copy nothing:
the finiteness check is one min/max reduction (NaN propagates through both, an infinity
is one of them), not ``isfinite(x).all()``, which writes a mask as large as the batch
first (both timed in BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import math

import torch

from common.models import layer_builders, num_classes, state_spec, weights_problem
from common.nets import ModelSpec


def cut_row(model: str, cut: int) -> tuple[tuple[int, ...], torch.dtype]:
    """(shape of one row, dtype) of ``model``'s activations after layer ``cut``, for the
    input its key names."""
    return _rows(model)[cut]


@functools.lru_cache(maxsize=16)
def _rows(model: str) -> tuple[tuple[tuple[int, ...], torch.dtype], ...]:
    """Each layer's output row for one row of input, computed once per model: one zero
    row run through the layers on the CPU, each built, run and dropped in turn (the
    largest layer's weights held at a time; the global RNG as it was). Not on the meta
    device, where BatchNorm imports ``torch._dynamo`` (common.footprint): hundreds of
    modules at every edge's start."""
    spec = ModelSpec.parse(model)
    rows = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        x = torch.zeros(1, spec.channels, spec.height, spec.width)
        for make in layer_builders(model):
            x = make().eval()(x)
            rows.append((tuple(x.shape[1:]), x.dtype))
    return tuple(rows)


# Room for a frame's tensors beside the largest honest one (the labels, a rounding).
PAYLOAD_SLACK = 64 << 10


def device_payload_limit(model: str, cuts: list[int] | range, batch_size: int) -> int:
    """The most tensor bytes an honest device sends in one frame, for its link's decoder
    (``transport.Connection.limit_payload``): a batch of ``batch_size`` rows at the largest
    of ``cuts``, or its part after a round (at most the whole model, in mode classic). A
    frame over it is refused from its prefix, before a byte of it is held: a batch of
    thousands of rows never reaches the memory of the edge."""
    weights = sum(math.prod(shape) * dtype.itemsize for shape, dtype in state_spec(model).values())
    rows = max(math.prod(row) * dtype.itemsize for row, dtype in (cut_row(model, c) for c in cuts))
    return max(weights, batch_size * (rows + 8)) + PAYLOAD_SLACK


def finite(t: torch.Tensor) -> bool:
    """Every value of the floating-point tensor ``t`` is finite (True when it is empty)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(lo.item()) and math.isfinite(hi.item())


def batch_problem(x: torch.Tensor, y: torch.Tensor, *, model: str, cut: int, batch_size: int) -> str:
    """Why a batch (``Activations``: ``x`` float [n, ...], ``y`` int64 [n], as the message
    checked) may not be trained at ``model``'s cut ``cut`` in a round of ``batch_size``;
    '' if it may."""
    rows = x.shape[0]
    if not 1 <= rows <= batch_size:
        return f"{rows} rows, the round's batches have 1..{batch_size}"
    row, dtype = cut_row(model, cut)
    if tuple(x.shape[1:]) != row or x.dtype != dtype:
        return f"activations are {x.dtype} {list(x.shape)[:8]}, the cut's are {dtype} [n, {', '.join(map(str, row))}]"
    lo, hi = torch.aminmax(y)
    classes = num_classes(model)
    if lo.item() < 0 or hi.item() >= classes:
        return f"labels outside 0..{classes - 1}"
    if not finite(x):
        return "activations hold values that are not finite"
    return ""


def weights_bound_problem(weights: dict[str, torch.Tensor], spec: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> str:
    """Why a device's part after its round (``DeviceDone.weights``) may not go on to the
    central, or a whole update may not be summed there (``central.judge``): names, shapes
    and dtypes that are not ``spec``'s (``common.models.state_spec``, or the device's part
    of it), or values that are not finite; '' if it may."""
    if problem := weights_problem(weights, spec):
        return problem
    for k, t in weights.items():
        if t.is_floating_point() and not finite(t):
            return f"{k} holds values that are not finite"
    return ""


def gradient_problem(grad: torch.Tensor | None, out: torch.Tensor) -> str:
    """Why ``grad`` (an edge's answer) may not be back-propagated through activations
    ``out``; '' if it may."""
    if grad is None:
        return "no gradient"
    if grad.shape != out.shape or grad.dtype != out.dtype:
        return f"gradient is {grad.dtype} {list(grad.shape)[:8]}, the activations are {out.dtype} {list(out.shape)}"
    if not finite(grad):
        return "gradient holds values that are not finite"
    return ""

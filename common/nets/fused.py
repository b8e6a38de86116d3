"""ReLU then a 2x2 max-pool, as one autograd step that keeps less for the backward pass.

Unfused, autograd keeps for ``maxpool2x2(relu(z))`` the ReLU's output (z's size) and the
pool's int64 indices (a quarter of z's elements, twice the bytes of a float32 each):
VGG-5's first block at batch 100 keeps 13.1 + 6.5 MB that the device holds while the edge
trains. Fused, it keeps the pooled output (which the next convolution keeps anyway) and
one byte per pooled value: where in its 2x2 window the maximum lay. The backward pass is
the unfused one's copying, done at once: each window's gradient goes to its maximum's
place if the pooled value is positive, +0.0 everywhere else. No arithmetic but the
``0.0 + g`` that max-pool's backward does (it adds into zeros: a -0.0 gradient becomes
+0.0), so the bits are the unfused ones (``tests/test_fused.py`` proves it, ties, zeros
of both signs and odd sizes included).

The forward values are the unfused ones too: a window with a positive maximum gives that
maximum at its first place (the pool's strict ``>`` keeps the first of equal values, on
``z`` as on ``relu(z)``); a window without one gives ``relu`` of its first element
(``relu(-0.0)`` is -0.0, of a negative +0.0), which is what the pool returns from a window
of zeros.

``fusable`` says where it applies: a layer with ``pre_relu`` (its output before a final
ReLU) followed by a plain ``MaxPool2d(2)``; the modules, parameters and state_dict keys
stay as they are (``common.models.Part`` chooses it at forward time).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def fusable(layer: nn.Module, pool: nn.Module) -> bool:
    """Whether ``pool(layer(x))`` is ``relu_maxpool2x2(layer.pre_relu(x))``."""
    return callable(getattr(layer, "pre_relu", None)) and type(pool) is nn.MaxPool2d \
        and _pair(pool.kernel_size) == (2, 2) and _pair(pool.stride) == (2, 2) and _pair(pool.padding) == (0, 0) \
        and _pair(pool.dilation) == (1, 1) and not pool.ceil_mode and not pool.return_indices


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def relu_maxpool2x2(z: torch.Tensor) -> torch.Tensor:
    """``max_pool2d(relu(z), 2)``, the same bits forward and backward, keeping less;
    ``z`` is used up (its ReLU is done in place)."""
    return _ReluMaxPool2x2.apply(z)[0]


class _ReluMaxPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor):  # type: ignore[override]
        # z (a block's output before its ReLU) is a temporary no backward pass needs: its
        # ReLU is done in place, so the pool sees, and chooses from, what it sees unfused
        y = z.relu_()
        ctx.mark_dirty(y)
        ctx.set_materialize_grads(False)
        out, at = F.max_pool2d_with_indices(y, 2)
        ctx.save_for_backward(out, _place(at, y.shape[-1]))
        ctx.z_shape = y.shape
        return out, y

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _unused) -> torch.Tensor:  # type: ignore[override]
        out, place = ctx.saved_tensors
        # relu's backward (out <= 0: +0.0) on the pooled values, then max-pool's (0.0 + g
        # into zeros at the pool's places): where out > 0, out is the ReLU's output there
        g = torch.ops.aten.threshold_backward(grad, out, 0)
        at = _at(place, ctx.z_shape[-1])
        return torch.ops.aten.max_pool2d_with_indices_backward(g, g.new_empty(()).expand(ctx.z_shape), [2, 2], [2, 2],
                                                               [0, 0], [1, 1], False, at)


def _corner_at(ho: int, wo: int, w: int, device) -> torch.Tensor:
    """[ho, wo]: the flat index (h * w + w) of every 2x2 window's first place."""
    return torch.arange(ho, device=device).mul_(2 * w).view(-1, 1) + torch.arange(wo, device=device).mul_(2)


def _place(at: torch.Tensor, w: int) -> torch.Tensor:
    """uint8 0..3 (row by row in the window) from the pool's flat indices ``at`` (used up)."""
    off = at.sub_(_corner_at(at.shape[-2], at.shape[-1], w, at.device))  # 0, 1, w or w + 1
    lower = (off >= w).to(torch.int64)
    return off.sub_(lower, alpha=w - 2).to(torch.uint8)


def _at(place: torch.Tensor, w: int) -> torch.Tensor:
    """The pool's flat indices back from ``_place``."""
    at = place.to(torch.int64)
    lower = (place >= 2).to(torch.int64)
    return at.add_(lower, alpha=w - 2).add_(_corner_at(place.shape[-2], place.shape[-1], w, place.device))

"""ReLU then a 2x2 max-pool, as one autograd step that keeps less for the backward pass.

Unfused, autograd keeps for ``maxpool2x2(relu(z))`` the ReLU's output (z's size) and the
pool's int64 indices (a quarter of z's elements, at twice a float32's bytes each): for
VGG-5's first block what the device holds while the edge trains. Fused, it keeps the
pooled output (which the next convolution keeps anyway) and one byte per pooled value:
where in its 2x2 window the maximum lay (its offset from the window's first element; four
bytes for an image row of more than 254). The backward pass is the unfused one's copying:
each window's gradient goes to its maximum's place if the pooled value is positive,
+0.0 everywhere else, by the same two kernels (relu's ``threshold_backward``, on the
pooled values, and max-pool's backward, which adds into zeros: a -0.0 gradient becomes
+0.0), so the bits are the unfused ones (``tests/test_fused.py`` proves it, ties, zeros
of both signs and odd sizes included). The forward values are the unfused ones too: the
ReLU is done first, in place, on the block's pre-ReLU output (a temporary no backward
pass reads), then the same pool.

A block that is a convolution then a batch norm in training (VGG-5's) goes further: the
convolution runs in the same step, and the batch norm a slice of channels at a time (its
statistics are per channel: a channel's sums are the same computation in a slice as in
the whole, bit for bit), so that neither its output nor the gradient at its output ever
exists whole. Its input (the convolution's output) is kept as it is, not copied: the last
backward pass over the graph writes the gradient at that input over it, slice by slice,
and hands that to the convolution's backward, which runs as the unfused one's two kernels
(the weights', then the input's), one after the other so that their buffers (torch's
reordered copies of their operands) never coexist. A device's peak is then the second
convolution's backward pass, while the first block's batch norm input is held.

``fusable`` says where it applies: a layer with ``pre_relu`` (its output before a final
ReLU) followed by a plain ``MaxPool2d(2)``; the modules, parameters and state_dict keys
stay as they are (``common.models.Part`` chooses it at forward time, when training).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F


def fusable(layer: nn.Module, pool: nn.Module) -> bool:
    """Whether ``pool(layer(x))`` is ``relu_maxpool2x2(layer.pre_relu(x))``."""
    return callable(getattr(layer, "pre_relu", None)) and type(pool) is nn.MaxPool2d \
        and _pair(pool.kernel_size) == (2, 2) and _pair(pool.stride) == (2, 2) and _pair(pool.padding) == (0, 0) \
        and _pair(pool.dilation) == (1, 1) and not pool.ceil_mode and not pool.return_indices


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


# the most bytes of a batch norm's input, output or gradient that one slice of channels holds
SLICE_BYTES = 2 << 20


def block_relu_maxpool2x2(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``max_pool2d(layer(x), 2)`` for a ``fusable`` layer: its convolution and batch norm
    too, where ``layer`` is ``bn(conv(x))`` before its ReLU (``layer.pre_norm`` is
    ``layer.conv``) with a plain zero-padded convolution and a plain batch norm in
    training; else ``relu_maxpool2x2(layer.pre_relu(x))``."""
    bn, conv = getattr(layer, "bn", None), getattr(layer, "conv", None)
    if callable(getattr(layer, "pre_norm", None)) and type(bn) is nn.BatchNorm2d and bn.training \
            and bn.track_running_stats and bn.affine and bn.momentum is not None \
            and type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
        bn._check_input_dim(x)
        F._verify_batch_size(x.size())
        bn.num_batches_tracked.add_(1)
        return _ConvBnReluMaxPool2x2.apply(x, conv.weight, conv.bias, bn.weight, bn.bias, conv, bn)
    return relu_maxpool2x2(layer.pre_relu(x))


def relu_maxpool2x2(z: torch.Tensor) -> torch.Tensor:
    """``max_pool2d(relu(z), 2)``, the same bits forward and backward, keeping less;
    ``z`` is used up (its ReLU is done in place)."""
    return _ReluMaxPool2x2.apply(z)[0]


def _pool_threshold_backward(grad: torch.Tensor, out: torch.Tensor, at: torch.Tensor,
                             shape: torch.Size) -> torch.Tensor:
    """The gradient at the pre-ReLU values of ``shape``: relu's backward (out <= 0: +0.0)
    on the pooled values, then max-pool's (0.0 + g into zeros at the pool's places ``at``):
    where out > 0, out is the ReLU's output at that place."""
    g = torch.ops.aten.threshold_backward(grad, out, 0)
    return torch.ops.aten.max_pool2d_with_indices_backward(g, g.new_empty(()).expand(shape), [2, 2], [2, 2], [0, 0],
                                                           [1, 1], False, at)


class _ReluMaxPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor):  # type: ignore[override]
        y = z.relu_()  # (z: a block's output before its ReLU, a temporary no backward pass reads)
        ctx.mark_dirty(y)
        ctx.set_materialize_grads(False)
        out, at = F.max_pool2d_with_indices(y, 2)
        ctx.base = _corner_at(*out.shape[-2:], y.shape[-1], y.device)
        ctx.save_for_backward(out, at.sub_(ctx.base).to(_offset_dtype(y.shape[-1])))
        ctx.z_shape = y.shape
        return out, y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor, _unused) -> torch.Tensor:  # type: ignore[override]
        out, offset = ctx.saved_tensors
        return _pool_threshold_backward(grad, out, offset.to(torch.int64).add_(ctx.base), ctx.z_shape)


def _slices(c: torch.Tensor) -> list[slice]:
    per = max(1, SLICE_BYTES // max(1, c[:, :1].numel() * c.element_size()))
    return [slice(k, min(k + per, c.shape[1])) for k in range(0, c.shape[1], per)]


class _ConvBnReluMaxPool2x2(torch.autograd.Function):
    """The convolution, then batch norm (training, ``bn``'s running statistics updated as
    its forward does), ReLU and the pool a slice of channels at a time. Keeps what the
    unfused modules' backward passes read (the convolution's input, the batch norm's
    input), the per-channel statistics, the pooled output and the places' offsets; no
    copy of the batch norm's input: a slice at a time is copied out to be normalized, and
    the last backward pass writes the gradient at that input over it, slice by slice. The
    convolution's backward is the unfused one's two kernels (weights, then input), one
    after the other, so that their buffers never coexist."""

    @staticmethod
    def forward(ctx, x, conv_weight, conv_bias, weight, bias, conv: nn.Conv2d, bn: nn.BatchNorm2d):  # type: ignore[override]
        c = F.conv2d(x, conv_weight, conv_bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        n, ch, h, w = c.shape
        out = c.new_empty(n, ch, h // 2, w // 2)
        offset = torch.empty(out.shape, dtype=_offset_dtype(w), device=c.device)
        ctx.base = _corner_at(h // 2, w // 2, w, c.device)
        mean, invstd = c.new_empty(ch), c.new_empty(ch)
        for s in _slices(c):
            z, mean[s], invstd[s] = torch.ops.aten.native_batch_norm(
                c[:, s].contiguous(), weight[s], bias[s], bn.running_mean[s], bn.running_var[s], True, bn.momentum,
                bn.eps)
            pooled, at = F.max_pool2d_with_indices(z.relu_(), 2)
            del z
            out[:, s] = pooled
            offset[:, s] = at.sub_(ctx.base)
        ctx.save_for_backward(x, conv_weight, weight, mean, invstd)
        # the batch norm's input, the pooled output (detached: no cycle through this node)
        # and the offsets on ctx, so that the last backward pass can let each go early
        ctx.inputs = [c, out.detach(), offset]
        ctx.conv, ctx.bn, ctx.has_bias = conv, bn, conv_bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, conv_weight, weight, mean, invstd = ctx.saved_tensors
        bn, conv = ctx.bn, ctx.conv
        # the last pass over this graph (retain_graph=False) may overwrite the batch norm's
        # input; another one to come (the edge's gradient at the cut first) keeps it
        keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", lambda: True)()
        if ctx.inputs is None:
            raise RuntimeError("the fused convolution block's backward ran twice without retain_graph")
        c, out, offset = ctx.inputs
        dc = grad.new_empty(c.shape) if keep else c
        if not keep:
            ctx.inputs = None
        dw, db = torch.empty_like(weight), torch.empty_like(weight)
        for s in _slices(c):
            cs = c[:, s].contiguous()
            dz = _pool_threshold_backward(grad[:, s], out[:, s], offset[:, s].to(torch.int64).add_(ctx.base), cs.shape)
            dc[:, s], dw[s], db[s] = torch.ops.aten.native_batch_norm_backward(
                dz, cs, weight[s], bn.running_mean[s], bn.running_var[s], mean[s], invstd[s], True, bn.eps,
                [True, True, True])
            del dz, cs
        del c, grad, out, offset
        bias_sizes = [conv_weight.shape[0]] if ctx.has_bias else None
        args = (conv.stride, conv.padding, conv.dilation, False, [0] * len(conv.stride), conv.groups)
        need = [_needed(ctx, i) for i in range(3)]
        dx = dcw = dcb = None
        if need[1] or need[2]:
            _, dcw, dcb = torch.ops.aten.convolution_backward(dc, x, conv_weight, bias_sizes, *args,
                                                              [False, need[1], need[2] and ctx.has_bias])
        if need[0]:
            dx = torch.ops.aten.convolution_backward(dc, x, conv_weight, bias_sizes, *args, [True, False, False])[0]
        return dx, dcw, dcb, dw, db, None, None


def _needed(ctx, i: int) -> bool:
    """Whether this backward pass wants the gradient at the function's input ``i`` (a
    pass may want only some: the edge's gradient at the cut first). Unknown (a weight's
    in ``torch.autograd.grad``): wanted, computed and maybe dropped, the same bits."""
    if not ctx.needs_input_grad[i]:
        return False
    node = ctx.next_functions[i][0]
    try:
        return node is not None and torch._C._will_engine_execute_node(node)
    except (AttributeError, RuntimeError):
        return True


def _corner_at(ho: int, wo: int, w: int, device) -> torch.Tensor:
    """[ho, wo]: the flat index (h * w + w) of every 2x2 window's first place."""
    return torch.arange(ho, device=device).mul_(2 * w).view(-1, 1) + torch.arange(wo, device=device).mul_(2)


def _offset_dtype(w: int) -> torch.dtype:
    """What holds a place's offset from its window's first (0, 1, w or w + 1)."""
    return torch.uint8 if w + 1 <= 255 else torch.int32

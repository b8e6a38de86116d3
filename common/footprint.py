"""What a training process holds beyond its work: kept small for a Raspberry Pi 3 (1 GB).

``skip_dynamo``: torch's optimizer methods are wrapped so that ``torch.compile`` leaves
them alone; the wrapper imports ``torch._dynamo`` on its first call to say so, and with it
``torch._inductor`` and sympy: hundreds of modules, paid by every process that makes an
optimizer although nothing here compiles. Telling each wrapper up front that its function
is its own "disabled" form skips that import; the same Python function runs, so the
results are the same bits. (``common.training.ProxSGD.step`` skips the other such
wrapper, SGD.step's.)

``backward``: ``out.backward(grad)`` with a gradient given (a device's step: the edge's
gradient at the cut) checks the gradient's shape through
``torch.fx.experimental.symbolic_shapes``, which imports sympy: hundreds of modules again,
on the first step. The device checks that shape itself (``common.bounds``), so it hands
the pair to autograd's engine as ``torch.autograd.backward`` does after its check: the
same engine call, the same bits. Memory figures: BENCHMARKS.md, "Memory".
"""

from __future__ import annotations

import sys


def skip_dynamo() -> int:
    """Let torch.optim's methods run without importing ``torch._dynamo`` (a no-op once it
    is imported, or if this torch wraps them otherwise). Returns how many were set."""
    import torch

    if "torch._dynamo" in sys.modules:
        return 0
    inner_code = torch._disable_dynamo(_probe).__code__
    done = 0
    for cls in (torch.optim.Optimizer,):
        for attr in vars(cls).values():
            fn = getattr(attr, "__wrapped__", None)
            if fn is not None and getattr(attr, "__code__", None) is inner_code:
                # _disable_dynamo's wrapper looks for this attribute before importing
                fn.__dynamo_disable = fn
                done += 1
    return done


def backward(out, grad) -> None:
    """``out.backward(grad)`` for a plain tensor ``out`` and a ``grad`` of its shape and
    dtype, checked by the caller, without importing sympy (falls back to
    ``out.backward(grad)`` if this torch has no such engine call)."""
    import torch

    run = getattr(torch.autograd.graph, "_engine_run_backward", None)
    if run is None or type(out) is not torch.Tensor or type(grad) is not torch.Tensor:
        out.backward(grad)
        return
    run((out,), (grad,), False, False, (), allow_unreachable=True, accumulate_grad=True)


def _probe() -> None:
    """Only wrapped, to learn what torch's wrapper code looks like."""

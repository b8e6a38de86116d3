"""What a training process holds beyond its work: kept small for a Raspberry Pi 3 (1 GB).

``skip_dynamo``: torch's optimizer methods are wrapped so that ``torch.compile`` leaves
them alone; the wrapper imports ``torch._dynamo`` on its first call to say so, and with it
``torch._inductor`` and sympy: hundreds of modules, paid by every process that makes an
optimizer although nothing here compiles. Telling each wrapper up front that its function
is its own "disabled" form skips that import; the same Python function runs, so the
results are the same bits. (``common.training.ProxSGD.step`` skips the other such
wrapper, SGD.step's.) Memory figures: BENCHMARKS.md, "Memory".
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


def _probe() -> None:
    """Only wrapped, to learn what torch's wrapper code looks like."""

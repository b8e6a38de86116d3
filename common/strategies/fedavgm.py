"""FedAvg with server momentum (Hsu et al. 2019), as Flower's FedAvgM; plain SGD on the
clients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from common.strategies.base import POSITIVE, Key, Strategy


@dataclass
class FedAvgM(Strategy):
    """With ``d = current - fedavg(results)``, ``v = server_momentum * v + d`` (``v = d``
    the first time) and ``next = current - server_lr * v``. Applied to floating-point
    tensors (batch-norm statistics included, as Flower does); integer ones
    (``num_batches_tracked``) take FedAvg's value. Arithmetic in float64, cast back to
    each tensor's dtype."""
    server_lr: float = 1.0
    server_momentum: float = 0.9
    name: ClassVar[str] = "fedavgm"
    PARAMS: ClassVar[dict[str, Key]] = {
        "server_lr": (float, 1.0, POSITIVE, "fedavgm: the server's step size (1.0 with no momentum is FedAvg)"),
        "server_momentum": (float, 0.9, lambda v: None if 0 <= v < 1 else "must be in [0, 1)",
                            "fedavgm: the server's momentum"),
    }

    def aggregate(self, results, failures=(), *, current=None, state=None, clients=(), lr=0.0):
        import torch

        from central.fedavg import fedavg
        avg = fedavg(results)
        if current is None:
            raise ValueError("fedavgm needs the round's starting weights (current)")
        state = state or {}
        out = {}
        new_state = {}
        for k, a in avg.items():
            if not a.is_floating_point():
                out[k] = a
                continue
            d = current[k].to(torch.float64) - a.to(torch.float64)
            v = d if k not in state else state[k].to(torch.float64) * self.server_momentum + d
            new_state[k] = v.to(a.dtype)
            out[k] = (current[k].to(torch.float64) - self.server_lr * v).to(a.dtype)
        return out, new_state

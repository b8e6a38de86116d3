"""SCAFFOLD (Karimireddy et al., ICML 2020): control variates correct each client's drift.

Every client ``i`` has a control variate ``c_i`` and the server one, ``c``, per parameter
(zero at first). Each local step adds ``c - c_i`` to the gradient, on the device's part
and on the edge's part alike (``ScaffoldStep``: the difference is computed once per round
and kept in the optimizer's state as ``scaffold_corr``, so it migrates with the session,
is in the buddy's replicas and the device's checkpoints). After the round, option II of
the paper: ``c_i+ = c_i - c + (x - y_i) / (K * lr)``, with ``x`` the round's weights,
``y_i`` the client's, ``K`` its steps; then ``c+ = c + sum(c_i+ - c_i) / N`` over the
``N`` participants and ``x+ = x + server_lr * (fedavg(y) - x)``.

Where ``c_i`` lives between rounds: with the server's state (``ci/DEVICE/key``,
checkpointed with the weights). Each round it goes out with the round: the edges get
every participant's (``RoundStart.algo``), each device its part (``DeviceRound.algo``),
and the update that comes back is all the server needs to compute ``c_i+``. A device or
an edge that starts again, a session rebuilt from the round's weights, a replica: each
finds the same ``c_i``, so runs with moves and faults stay bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from common.strategies.base import POSITIVE, ClientStep, Key, Strategy


def correction(c: Any, c_i: Any, like: Any) -> Any:
    """``c - c_i`` for one parameter (either may be None: zero), in its dtype."""
    import torch
    zero = torch.zeros_like(like)
    return (zero if c is None else c.to(like.dtype)) - (zero if c_i is None else c_i.to(like.dtype))


def next_variate(x: Any, y: Any, corr: Any, steps: int, lr: float) -> Any:
    """Option II: ``c_i+ = (x - y) / (K * lr) - (c - c_i)``."""
    return (x - y) / (steps * lr) - corr


class ScaffoldStep(ClientStep):
    @staticmethod
    def setup(opt, names, params, tensors) -> None:
        if not tensors:
            return  # the first round: every variate is zero
        if names is None:
            raise ValueError("scaffold needs the parameters' names")
        for group in opt.param_groups:
            for p, name in zip(group["params"], names):
                c, c_i = tensors.get(f"c/{name}"), tensors.get(f"ci/{name}")
                if c is not None or c_i is not None:
                    opt.state[p]["scaffold_corr"] = correction(c, c_i, p.detach())

    @staticmethod
    def correct(opt, group) -> None:
        for p in group["params"]:
            corr = opt.state[p].get("scaffold_corr") if p in opt.state else None
            if corr is not None and p.grad is not None:
                p.grad.add_(corr)


@dataclass
class Scaffold(Strategy):
    server_lr: float = 1.0
    name: ClassVar[str] = "scaffold"
    PARAMS: ClassVar[dict[str, Key]] = {
        "server_lr": (float, 1.0, POSITIVE, "scaffold: the server's step towards the average of the updates "
                      "(1.0: the average)"),
    }
    CLIENT: ClassVar[type[ClientStep]] = ScaffoldStep
    param_keys: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def bind(self, param_keys: Sequence[str]) -> None:
        self.param_keys = tuple(param_keys)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "server_lr": self.server_lr}

    def round_tensors(self, state, participants):
        out = {f"*/{k}": v for k, v in state.items() if k.startswith("c/")}
        for d in participants:
            prefix = f"ci/{d}/"
            out.update({f"{d}/ci/{k[len(prefix):]}": v for k, v in state.items() if k.startswith(prefix)})
        return out

    def aggregate(self, results, failures=(), *, current=None, state=None, clients=(), lr=0.0):
        import torch

        from central.fedavg import fedavg
        if current is None or len(clients) != len(results) or lr <= 0 or not self.param_keys:
            raise ValueError("scaffold needs the round's weights, each result's (device, steps), the "
                             "learning rate and the model's parameter keys (bind)")
        avg = fedavg(results)
        state = dict(state or {})
        out = {}
        for k, a in avg.items():
            if not a.is_floating_point():
                out[k] = a
                continue
            x = current[k].to(torch.float64)
            out[k] = (x + self.server_lr * (a.to(torch.float64) - x)).to(a.dtype)
        n = len(results) + len(failures)   # the round's participants
        moved = {k: torch.zeros(current[k].shape, dtype=torch.float64) for k in self.param_keys}
        for (y, _), (device, steps) in zip(results, clients):
            if steps <= 0:
                raise ValueError(f"scaffold: {device} made {steps} steps")
            for k in self.param_keys:
                c_i = state.get(f"ci/{device}/{k}")
                new = next_variate(current[k], y[k], correction(state.get(f"c/{k}"), c_i, current[k]), steps, lr)
                moved[k] += new.to(torch.float64) - (0.0 if c_i is None else c_i.to(torch.float64))
                state[f"ci/{device}/{k}"] = new
        for k in self.param_keys:
            c = state.get(f"c/{k}")
            c64 = torch.zeros(current[k].shape, dtype=torch.float64) if c is None else c.to(torch.float64)
            state[f"c/{k}"] = (c64 + moved[k] / n).to(current[k].dtype)
        return out, state

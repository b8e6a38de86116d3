"""SCAFFOLD (Karimireddy et al., ICML 2020): control variates correct each client's drift.

Every client ``i`` has a control variate ``c_i`` and the server one, ``c``, per parameter
(zero at first). Each local step adds ``c - c_i`` to the gradient, on the device's part
and on the edge's part alike (``ScaffoldStep``: the difference is computed once per round
and kept in the optimizer's state as ``scaffold_corr``, so it migrates with the session,
is in the buddy's replicas and the device's checkpoints). After round ``r``, for each
aggregated update ``y_i`` of ``K`` steps at learning rate ``lr``, from the round's
weights ``x``, the central computes in float64

    delta_i = (x - y_i) / (K * lr) - c          (``client_delta``)
    c+      = c + sum(delta_i) / N              (N: the round's participants)
    x+      = x + server_lr * (fedavg(y) - x)

and the device folds ``c_i+ = c_i + delta_i`` (``ScaffoldStep.fold``, ``delta_i`` in the
parameter's dtype): option II of the paper, ``c_i - c + (x - y_i) / (K * lr)``.

Where ``c_i`` lives: on the device, for the whole model, with the last round folded in
(``base.KeptState``, on its disk beside its checkpoints: ``device.state``). The central
holds only ``c`` (state "c/key") and, per device, the last round whose update it
aggregated (``adopt/DEVICE``, kept by ``central.returns`` with ``delta_i`` in a file of
the run folder). The return path is the device's next round: ``RoundStart`` carries ``c``
and each participant's ``adopt`` and ``delta``, its edge passes them on in ``DeviceRound``,
and the device folds ``delta`` in once (``KeptState.adopt``: ``adopt`` newer than its
round). A refused or late update is never aggregated, so its device keeps its ``c_i``.
The edge gets ``c`` from ``RoundStart`` and the device's ``c_i`` for its part from the
device (``ClientState``), whenever it builds the device's session from the round's
weights; a session that moves (offer, pull, relay, a replica) carries ``c - c_i`` in its
optimizer state, so nothing more travels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from common.strategies.base import POSITIVE, ClientStep, Key, Strategy, correct_grads


def correction(c: Any, c_i: Any, like: Any) -> Any:
    """``c - c_i`` for one parameter (either may be None: zero), in its dtype."""
    import torch
    zero = torch.zeros_like(like)
    return (zero if c is None else c.to(like.dtype)) - (zero if c_i is None else c_i.to(like.dtype))


def client_delta(x: Any, y: Any, c: Any, steps: int, lr: float) -> Any:
    """``(x - y) / (K * lr) - c`` in float64 (``c`` None: zero): a client's change of its
    variate for one parameter."""
    import torch
    d = (x.to(torch.float64) - y.to(torch.float64)) / (steps * lr)
    return d if c is None else d - c.to(torch.float64)


class ScaffoldStep(ClientStep):
    keeps_state: ClassVar[bool] = True
    returns_tag: ClassVar[str] = "delta"

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
        correct_grads(opt, group, "scaffold_corr", lambda p, corr: corr)

    @staticmethod
    def fold(state, returns, like):
        """``c_i + delta`` for every parameter (``returns``: exactly "delta/key" for each
        of ``like``'s, its shape)."""
        import torch
        if set(returns) != {f"delta/{k}" for k in like}:
            raise ValueError("scaffold: the returned deltas are not one per parameter of the model")
        out = {}
        for k, p in like.items():
            d = returns[f"delta/{k}"]
            if tuple(d.shape) != tuple(p.shape) or not d.is_floating_point() or not torch.isfinite(d).all():
                raise ValueError(f"scaffold: the delta of {k} does not fit the parameter or is not finite")
            c_i = state.get(f"ci/{k}")
            out[f"ci/{k}"] = (torch.zeros_like(p) if c_i is None else c_i) + d.to(p.dtype)
        return out


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

    def round_tensors(self, state):
        return {f"*/{k}": v for k, v in state.items() if k.startswith("c/")}

    def conclude(self, results, failures=(), *, current=None, state=None, clients=(), lr=0.0):
        """The round's weights, ``c`` and each aggregated client's ``delta_i`` from one pass
        over the updates: each ``delta_i`` (float64) is added to the sum for ``c`` and kept
        as float32 to go back, and never held in float64 beyond its own client."""
        import torch

        from central.fedavg import fedavg
        if current is None or len(clients) != len(results) or lr <= 0 or not self.param_keys:
            raise ValueError("scaffold needs the round's weights, each result's (device, steps), the "
                             "learning rate and the model's parameter keys (bind)")
        state = dict(state or {})
        moved = {k: torch.zeros(current[k].shape, dtype=torch.float64) for k in self.param_keys}
        returns = {}
        for (y, _), (device, steps) in zip(results, clients):
            if steps <= 0:
                raise ValueError(f"scaffold: {device} made {steps} steps")
            back = {}
            for k in self.param_keys:
                delta = client_delta(current[k], y[k], state.get(f"c/{k}"), steps, lr)
                moved[k] += delta
                back[f"delta/{k}"] = delta.to(torch.float32)
            returns[device] = back
        avg = fedavg(results)
        out = {}
        for k, a in avg.items():
            if not a.is_floating_point():
                out[k] = a
                continue
            x = current[k].to(torch.float64)
            out[k] = (x + self.server_lr * (a.to(torch.float64) - x)).to(a.dtype)
        n = len(results) + len(failures)   # the round's participants
        for k in self.param_keys:
            c = state.get(f"c/{k}")
            c64 = torch.zeros(current[k].shape, dtype=torch.float64) if c is None else c.to(torch.float64)
            state[f"c/{k}"] = (c64 + moved[k] / n).to(current[k].dtype)
        return out, state, returns

    def client_returns(self, results, *, current=None, state=None, clients=(), lr=0.0):
        return self.conclude(results, current=current, state=state, clients=clients, lr=lr)[2]

    def aggregate(self, results, failures=(), *, current=None, state=None, clients=(), lr=0.0):
        out, state, _ = self.conclude(results, failures, current=current, state=state, clients=clients, lr=lr)
        return out, state

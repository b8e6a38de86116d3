"""Training pieces shared by device, edge, central and the in-process reference.

Exactness rests on three things gathered here: the batch order of a (device, round) is
fixed by the seed alone, whatever happens during the round; every optimizer is the same
SGD, created fresh at the start of each round (as in FedFly); and every process runs the
same number of PyTorch intra-op threads.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from common.footprint import skip_dynamo
from common.models import build_model
from common.malloc import MALLOC_KEEP, tune_malloc  # noqa: F401 - part of this API
from common.plan import Algo
from common.strategies import strategy_class
from common.strategies.base import KeptState, Strategy, round_share

LOSS = nn.CrossEntropyLoss()


def set_threads(n: int) -> None:
    """Fix intra-op threads (CPU kernels split work by thread count, which changes the
    last bits of a result) and use one inter-op thread."""
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first parallel op; harmless after
        pass


def warm_up() -> None:
    """Pay torch's one-time costs now, at start-up: the first optimizer step imports and
    sets up machinery (it imports ``torch._dynamo``: BENCHMARKS.md, "What bounds each
    figure") that would otherwise land in the first round, or in
    the pause of the first migration to an edge that had not trained yet."""
    p = torch.nn.Parameter(torch.zeros(2))
    opt = make_optimizer([p], lr=0.1, momentum=0.9)
    LOSS(p.view(1, 2), torch.zeros(1, dtype=torch.long)).backward()
    opt.step()
    opt.load_state_dict(opt.state_dict())


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, the same on every machine and Python run."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def round_batches(n: int, batch_size: int, *, local_epochs: int, seed: int, device: str, round: int) -> list[torch.Tensor]:
    """Index batches of one round: each local epoch a fresh seeded shuffle of 0..n-1.
    The number of batches is the round's step count S."""
    batches: list[torch.Tensor] = []
    for epoch in range(local_epochs):
        g = torch.Generator().manual_seed(stable_seed("shuffle", seed, device, round, epoch))
        perm = torch.randperm(n, generator=g)
        batches.extend(perm.split(batch_size))
    return batches


class AlgoSGD(torch.optim.SGD):
    """SGD with the round's client-side algorithm (``common.strategies``: FedProx's
    proximal term, SCAFFOLD's correction; none for the others): before each step, the
    algorithm named in each param group's ``algo`` (the plan's ``{name, params}``)
    corrects the gradients. The rule is per parameter, so the device part and the edge
    part each apply it to their own parameters and split training stays the whole
    model's, bit for bit. What the algorithm keeps is in the optimizer's state and param
    groups, so it travels with a migrated session and with a device checkpoint.

    ``params``: tensors, or (state-dict key, tensor) pairs for an algorithm that has
    tensors per parameter (``tensors``: this client's share of the round's, "tag/key")."""

    def __init__(self, params, *, lr: float, momentum: float, algo: Algo | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> None:
        skip_dynamo()
        params = list(params)
        names = [n for n, _ in params] if params and isinstance(params[0], tuple) else None
        # foreach=False: the single-tensor path on every platform, so device, edge and the
        # reference take the same kernels.
        super().__init__([p for _, p in params] if names is not None else params, lr=lr, momentum=momentum,
                         foreach=False)
        algo = algo or Algo()
        for group in self.param_groups:
            group["algo"] = algo.to_wire()
        step = strategy_class(algo.name).CLIENT
        if step is not None:
            step.setup(self, names, algo.params, tensors or {})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            step = strategy_class(group["algo"]["name"]).CLIENT
            if step is not None:
                step.correct(self, group)
        # SGD.step's own wrapper only turns gradients off (done above) and marks graph
        # breaks for torch.compile, importing torch._dynamo to do so (common.footprint)
        return _SGD_STEP(self, closure)


_SGD_STEP = getattr(torch.optim.SGD.step, "__wrapped__", torch.optim.SGD.step)


def make_optimizer(params, *, lr: float, momentum: float, algo: Algo | None = None,
                   tensors: dict[str, torch.Tensor] | None = None) -> torch.optim.SGD:
    return AlgoSGD(params, lr=lr, momentum=momentum, algo=algo, tensors=tensors)


def named_parameters(part: nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """``part``'s parameters named by their state-dict keys (``common.models.Part``)."""
    return [(n.removeprefix("layers."), p) for n, p in part.named_parameters()]


def train_reference_round(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batches: list[torch.Tensor],
                          *, lr: float, momentum: float, algo: Algo | None = None,
                          tensors: dict[str, torch.Tensor] | None = None) -> float:
    """Train the whole model in this process on ``batches``; returns the mean batch loss.
    The yardstick split training over TCP must match bit for bit."""
    model.train()
    opt = make_optimizer(named_parameters(model), lr=lr, momentum=momentum, algo=algo, tensors=tensors)
    total = 0.0
    for idx in batches:
        opt.zero_grad(set_to_none=True)
        loss = LOSS(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        total += loss.item()
    return total / max(1, len(batches))


class ReferenceRun:
    """A whole run in this process, the yardstick of a testbed run with any strategy: each
    round, every device's whole model trained from the round's weights with the
    strategy's client step (the round's tensors and the device's kept state, as the
    devices and edges use them), then the server's update over the devices in name
    order, and what it returns to each folded into that device's kept state, as a device
    does at its next round."""

    def __init__(self, strategy: Strategy, model: str, *, lr: float, momentum: float, batch_size: int,
                 local_epochs: int, seed: int) -> None:
        self.strategy, self.model, self.lr, self.momentum = strategy, model, lr, momentum
        self.batch_size, self.local_epochs, self.seed = batch_size, local_epochs, seed
        self.params = {n: p.detach() for n, p in named_parameters(build_model(model, seed=0))}
        strategy.bind(list(self.params))
        self.state: dict = {}
        self.kept: dict[str, KeptState] = {}

    def round(self, r: int, weights: dict[str, torch.Tensor],
              shards: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Round ``r`` from ``weights`` over ``shards`` (device -> data); the next weights."""
        s = self.strategy
        tensors = s.round_tensors(self.state)
        updates, clients = [], []
        for device in sorted(shards):  # the fixed order of summation
            x, y = shards[device]
            kept = self.kept.setdefault(device, KeptState())
            model = build_model(self.model, seed=0)
            model.load_state_dict(weights)
            batches = round_batches(len(x), self.batch_size, local_epochs=self.local_epochs, seed=self.seed,
                                    device=device, round=r)
            train_reference_round(model, x, y, batches, lr=self.lr, momentum=self.momentum, algo=s.algo(),
                                  tensors={**round_share(tensors, list(weights)), **kept.share(list(weights))})
            updates.append(({k: v.clone() for k, v in model.state_dict().items()}, len(x)))
            clients.append((device, len(batches)))
        weights, self.state, returns = s.conclude(updates, current=weights, state=self.state, clients=clients, lr=self.lr)
        client = strategy_class(s.name).CLIENT
        for device, back in returns.items():
            assert client is not None
            self.kept[device].adopt(client, r, back, self.params)
        return weights


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 500) -> tuple[float, float]:
    """(accuracy in [0, 1], mean loss) of ``model`` on ``x``, ``y``."""
    model.eval()
    correct, loss_sum = 0, 0.0
    for i in range(0, len(x), batch_size):
        out = model(x[i:i + batch_size])
        target = y[i:i + batch_size]
        loss_sum += nn.functional.cross_entropy(out, target, reduction="sum").item()
        correct += int((out.argmax(1) == target).sum())
    n = max(1, len(x))
    return correct / n, loss_sum / n

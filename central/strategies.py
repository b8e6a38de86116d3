"""Aggregation strategies behind one small interface, in the spirit of Flower's ``Strategy``.

A strategy does two things each round:

- ``configure(round)``: what the round's plan carries for it (FedProx: its ``prox_mu``,
  which every device and edge applies to its own part of the model);
- ``aggregate(results, failures, current=, state=)``: a pure function from the round's
  results (``(weights, samples)`` per device, in the fixed order of summation), its
  failures (what was lost, for a policy that wants it), the global weights the round
  started from and the strategy's own state (FedAvgM's server momentum) to the next global
  weights and the next state. The central keeps the state and checkpoints it with the
  weights, so a resumed run goes on exactly.

Configured by ``[strategy] name = "fedavg" | "fedprox" | "fedavgm" | "median" |
"trimmed_mean" | "krum" | "clip"`` and its parameters (``mu``; ``server_lr``,
``server_momentum``; ``trim_fraction``; ``krum_byzantine``, ``krum_keep``; ``clip_norm``).
The last four are robust to a hostile device (``central.robust``). A new strategy is one
class and one entry in ``STRATEGIES``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from central import robust
from central.fedavg import Weights, fedavg

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Failure:
    """A device whose update did not make it into the round."""
    device: str
    reason: str
    samples: int


class Strategy(ABC):
    name: ClassVar[str]

    def configure(self, round: int) -> dict[str, float]:
        """Plan fields this strategy sets for ``round`` (``RoundPlan`` keywords); {} by default."""
        return {}

    @abstractmethod
    def aggregate(self, results: Sequence[tuple[Weights, int]], failures: Sequence[Failure] = (), *,
                  current: Weights | None = None, state: State | None = None) -> tuple[Weights, State]:
        """(next global weights, next strategy state). Pure: the arguments are not changed.
        Raises ``ValueError`` on no results or results that do not describe one model."""

    def describe(self) -> dict[str, Any]:
        """The strategy and its parameters, for summary.json."""
        return {"name": self.name}


class FedAvg(Strategy):
    """The paper's strategy: FedAvg weighted by each device's samples."""
    name = "fedavg"

    def aggregate(self, results, failures=(), *, current=None, state=None):
        return fedavg(results), {}


@dataclass
class FedProx(FedAvg):
    """FedProx (Li et al., MLSys 2020): FedAvg on the server; on the devices and edges every
    local step adds ``mu * (w - w_global)`` to the gradient (``common.training.ProxSGD``)."""
    mu: float = 0.01
    name: ClassVar[str] = "fedprox"

    def configure(self, round: int) -> dict[str, float]:
        return {"prox_mu": self.mu}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "mu": self.mu}


@dataclass
class FedAvgM(Strategy):
    """FedAvg with server momentum (Hsu et al. 2019), as Flower's FedAvgM: with
    ``d = current - fedavg(results)``, ``v = server_momentum * v + d`` (``v = d`` the first
    time) and ``next = current - server_lr * v``. Applied to floating-point tensors (batch-norm
    statistics included, as Flower does); integer ones (``num_batches_tracked``) take FedAvg's
    value. Arithmetic in float64, cast back to each tensor's dtype."""
    server_lr: float = 1.0
    server_momentum: float = 0.9
    name: ClassVar[str] = "fedavgm"

    def aggregate(self, results, failures=(), *, current=None, state=None):
        avg = fedavg(results)
        if current is None:
            raise ValueError("fedavgm needs the round's starting weights (current)")
        state = state or {}
        out: Weights = {}
        new_state: State = {}
        for k, a in avg.items():
            if not a.is_floating_point():
                out[k] = a
                continue
            d = current[k].to(torch.float64) - a.to(torch.float64)
            v = d if k not in state else state[k].to(torch.float64) * self.server_momentum + d
            new_state[k] = v.to(a.dtype)
            out[k] = (current[k].to(torch.float64) - self.server_lr * v).to(a.dtype)
        return out, new_state

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "server_lr": self.server_lr, "server_momentum": self.server_momentum}


class Median(Strategy):
    """Coordinate-wise median of the updates (``central.robust.coordinate_median``)."""
    name = "median"

    def aggregate(self, results, failures=(), *, current=None, state=None):
        return robust.coordinate_median(results), {}


@dataclass
class TrimmedMean(Strategy):
    """Coordinate-wise mean without the ``trim_fraction`` smallest and largest values."""
    trim_fraction: float = 0.2
    name: ClassVar[str] = "trimmed_mean"

    def aggregate(self, results, failures=(), *, current=None, state=None):
        return robust.trimmed_mean(results, self.trim_fraction), {}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "trim_fraction": self.trim_fraction}


@dataclass
class MultiKrum(Strategy):
    """FedAvg of the ``krum_keep`` updates (0: all but ``krum_byzantine``) closest to their
    neighbours, assuming at most ``krum_byzantine`` hostile devices."""
    byzantine: int = 1
    keep: int = 0
    name: ClassVar[str] = "krum"

    def aggregate(self, results, failures=(), *, current=None, state=None):
        weights, _ = robust.multi_krum(results, self.byzantine, self.keep)
        return weights, {}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "krum_byzantine": self.byzantine, "krum_keep": self.keep}


@dataclass
class NormClip(Strategy):
    """FedAvg of the updates' moves, each clipped to ``clip_norm`` (0: the round's median)."""
    clip_norm: float = 0.0
    name: ClassVar[str] = "clip"

    def aggregate(self, results, failures=(), *, current=None, state=None):
        if current is None:
            raise ValueError("clip needs the round's starting weights (current)")
        weights, _ = robust.norm_clip(results, current, self.clip_norm)
        return weights, {}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "clip_norm": self.clip_norm}


STRATEGIES: dict[str, type[Strategy]] = {"fedavg": FedAvg, "fedprox": FedProx, "fedavgm": FedAvgM,
                                         "median": Median, "trimmed_mean": TrimmedMean, "krum": MultiKrum,
                                         "clip": NormClip}


def make_strategy(section: dict[str, Any]) -> Strategy:
    """The strategy a checked ``[strategy]`` section names, with its parameters."""
    name = section["name"]
    if name == "fedprox":
        return FedProx(mu=section["mu"])
    if name == "fedavgm":
        return FedAvgM(server_lr=section["server_lr"], server_momentum=section["server_momentum"])
    if name == "trimmed_mean":
        return TrimmedMean(trim_fraction=section["trim_fraction"])
    if name == "krum":
        return MultiKrum(byzantine=section["krum_byzantine"], keep=section["krum_keep"])
    if name == "clip":
        return NormClip(clip_norm=section["clip_norm"])
    return STRATEGIES[name]()

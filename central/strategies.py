"""The central's view of the learning algorithms (``common.strategies``): the strategy a
``[strategy]`` section names, and the registry's classes by name.

Configured by ``[strategy] name = "fedavg" | "fedprox" | "fedavgm" | "median" |
"trimmed_mean" | "krum" | "clip" | "scaffold"`` and that strategy's own keys. The robust
ones (median, trimmed_mean, krum, clip) stand against a hostile device
(``central.robust``). A new strategy is its module in ``common/strategies/`` and one line
in ``common.strategies.REGISTRY``.
"""

from __future__ import annotations

from typing import Any

from common import strategies
from common.strategies.base import Failure, State, Strategy
from common.strategies.fedavg import FedAvg
from common.strategies.fedavgm import FedAvgM
from common.strategies.fedprox import FedProx
from common.strategies.robust import Median, MultiKrum, NormClip, TrimmedMean
from common.strategies.scaffold import Scaffold

STRATEGIES: dict[str, type[Strategy]] = {name: strategies.strategy_class(name) for name in strategies.NAMES}


def make_strategy(section: dict[str, Any]) -> Strategy:
    """The strategy a checked ``[strategy]`` section names, with its parameters."""
    return strategies.make(section)


__all__ = ["STRATEGIES", "Failure", "FedAvg", "FedAvgM", "FedProx", "Median", "MultiKrum", "NormClip", "Scaffold",
           "State", "Strategy", "TrimmedMean", "make_strategy"]

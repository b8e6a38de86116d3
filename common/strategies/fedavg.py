"""FedAvg (McMahan et al. 2017), the paper's strategy: the sample-weighted mean of the
updates; plain SGD on the clients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from common.strategies.base import Strategy


@dataclass
class FedAvg(Strategy):
    name: ClassVar[str] = "fedavg"

    def aggregate(self, results, failures=(), *, current=None, state=None, clients=(), lr=0.0):
        from central.fedavg import fedavg
        return fedavg(results), {}

"""Strategies robust to a hostile device (``central.robust``); plain SGD on the clients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from common.strategies.base import NONNEG, Key, Strategy


@dataclass
class Median(Strategy):
    """Coordinate-wise median of the updates (``central.robust.coordinate_median``)."""
    name: ClassVar[str] = "median"

    def aggregate(self, results, failures=(), *, current=None, state=None, clients=(), lr=0.0):
        from central import robust
        return robust.coordinate_median(results), {}


@dataclass
class TrimmedMean(Strategy):
    """Coordinate-wise mean without the ``trim_fraction`` smallest and largest values."""
    trim_fraction: float = 0.2
    name: ClassVar[str] = "trimmed_mean"
    PARAMS: ClassVar[dict[str, Key]] = {
        "trim_fraction": (float, 0.2, lambda v: None if 0 <= v < 0.5 else "must be in [0, 0.5)",
                          "trimmed_mean: the fraction of smallest and of largest values left out of each coordinate"),
    }

    def aggregate(self, results, failures=(), *, current=None, state=None, clients=(), lr=0.0):
        from central import robust
        return robust.trimmed_mean(results, self.trim_fraction), {}


@dataclass
class MultiKrum(Strategy):
    """FedAvg of the ``krum_keep`` updates (0: all but ``krum_byzantine``) closest to their
    neighbours, assuming at most ``krum_byzantine`` hostile devices."""
    krum_byzantine: int = 1
    krum_keep: int = 0
    name: ClassVar[str] = "krum"
    PARAMS: ClassVar[dict[str, Key]] = {
        "krum_byzantine": (int, 1, NONNEG, "krum: how many hostile devices to tolerate"),
        "krum_keep": (int, 0, NONNEG, "krum: how many updates to average (0: all but the byzantine)"),
    }

    def aggregate(self, results, failures=(), *, current=None, state=None, clients=(), lr=0.0):
        from central import robust
        weights, _ = robust.multi_krum(results, self.krum_byzantine, self.krum_keep)
        return weights, {}


@dataclass
class NormClip(Strategy):
    """FedAvg of the updates' moves, each clipped to ``clip_norm`` (0: the round's median)."""
    clip_norm: float = 0.0
    name: ClassVar[str] = "clip"
    PARAMS: ClassVar[dict[str, Key]] = {
        "clip_norm": (float, 0.0, NONNEG, "clip: the bound on each update's move (0: the round's median)"),
    }

    def aggregate(self, results, failures=(), *, current=None, state=None, clients=(), lr=0.0):
        from central import robust
        if current is None:
            raise ValueError("clip needs the round's starting weights (current)")
        weights, _ = robust.norm_clip(results, current, self.clip_norm)
        return weights, {}

"""The learning algorithms, in one registry that drives the config, construction and the
round plan.

A strategy is one module here with one class (``base.Strategy``): its parameter table
(keys of ``[strategy]``, checked at start by ``common.config``), its server side
(``aggregate`` and its state, checkpointed with the weights) and, for a client-side
algorithm, what it sends the clients each round (``RoundPlan.algo`` and the round's
tensors), the step it applies on every device and edge (``base.ClientStep``) and, for
one that keeps a state on the device between rounds, how that state folds in what the
server returns (``base.KeptState``; the plumbing is the central's, edge's and device's).
Adding one is its module and one line below.

The modules import torch only where they compute, so that the roles that only read the
config (launcher, controller) stay free of it (``tests/test_light_roles.py``).
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from common.strategies.base import Key, Strategy

# name -> "module:Class" under common.strategies
REGISTRY: dict[str, str] = {
    "fedavg": "fedavg:FedAvg",
    "fedprox": "fedprox:FedProx",
    "fedavgm": "fedavgm:FedAvgM",
    "median": "robust:Median",
    "trimmed_mean": "robust:TrimmedMean",
    "krum": "robust:MultiKrum",
    "clip": "robust:NormClip",
    "scaffold": "scaffold:Scaffold",
}
NAMES = tuple(REGISTRY)


@functools.cache
def strategy_class(name: str) -> "type[Strategy]":
    """The class registered under ``name``; raises ``KeyError`` for an unknown one."""
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(f"common.strategies.{module}"), cls)


def params_of(name: str) -> "dict[str, Key]":
    """Strategy ``name``'s own keys of ``[strategy]`` (type, default, rule, description)."""
    return strategy_class(name).PARAMS


def owners(key: str) -> list[str]:
    """The strategies that take ``key`` (in registry order)."""
    return [name for name in NAMES if key in params_of(name)]


def make(section: dict[str, Any]) -> "Strategy":
    """The strategy a checked ``[strategy]`` section names, with its parameters (keys of
    other strategies in ``section`` are not its own and are left alone)."""
    return strategy_class(section["name"]).from_section(section)

"""What the edge's core (``edge.core``) keeps: one entry per device (its state in the
lifecycle table and that state's own data), the current round, where a session went on
to, and the layout of the model the edge serves. Records only: every change of an
entry's state goes through ``EdgeCore.move``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from common.models import part_keys
from common.plan import RoundPlan
from edge.lifecycle import Delivering, HandingOver, Pulling, State
from edge.ports import Port
from edge.session import EdgeSession


@dataclass
class RoundInfo:
    plan: RoundPlan
    weights: dict[str, torch.Tensor]
    algo: dict[str, torch.Tensor] = field(default_factory=dict)  # the strategy's tensors (RoundStart.algo)
    adopt: dict[str, int] = field(default_factory=dict)  # device -> the round its returns in algo are of

    @property
    def round(self) -> int:
        return self.plan.round


@dataclass
class Entry:
    """One device on this edge: its state in the lifecycle and that state's own data
    (``edge.lifecycle.STATE_DATA``), its session, its link."""
    device: str
    state: State = State.GONE
    data: Delivering | Pulling | HandingOver | None = None  # the state's own (set and dropped by ``move``)
    session: EdgeSession | None = None
    port: Port | None = None              # the device's current link, if linked
    last_round: int = 0                   # the device's word: last round whose update it knows taken

    @property
    def pulling(self) -> Pulling | None:
        return self.data if isinstance(self.data, Pulling) else None

    @property
    def handing(self) -> HandingOver | None:
        return self.data if isinstance(self.data, HandingOver) else None

    @property
    def delivering(self) -> Delivering | None:
        return self.data if isinstance(self.data, Delivering) else None


@dataclass
class Forward:
    round: int
    target: str


@dataclass
class Models:
    """The model layout this edge serves: which keys are the device's and the edge's, for
    the model's cut and for each device that cuts elsewhere (``devices.NAME.split_layer``)."""
    name: str
    split: int
    device_keys: list[str]
    edge_keys: list[str]
    splits: dict[str, int] = field(default_factory=dict)

    def cut(self, device: str) -> int:
        return self.splits.get(device, self.split)

    def keys(self, device: str) -> tuple[list[str], list[str]]:
        """(device part's keys, edge part's keys) of ``device``'s cut."""
        cut = self.cut(device)
        return (self.device_keys, self.edge_keys) if cut == self.split else part_keys(self.name, cut)

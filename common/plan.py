"""The round plan: what every role needs to know about one round, in one typed value.

The central makes it (``RoundPlan``) and sends it with the round's weights to every edge
(``RoundStart``); an edge passes it on to each participating device (``DeviceRound``).
On the wire it is a plain map (``to_wire``/``from_wire``), checked field by field when it
arrives, so a bad plan is a protocol error and never a half-applied round. Its ``algo`` is
the strategy's own value (``common.strategies``): the client-side algorithm by name and
the parameters it applies, checked against that strategy's table.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from common.errors import LocalProtocolError


@dataclass(frozen=True)
class Algo:
    """What the round's strategy tells its clients: its ``name`` (a registry name) and the
    parameters its client step applies (FedProx: ``{"mu": 0.01}``; most: ``{}``). On the
    wire a map ``{name, params}``."""
    name: str = "fedavg"
    params: dict[str, Any] = field(default_factory=dict)

    def problem(self) -> str:
        from common import strategies
        if type(self.name) is not str or self.name not in strategies.REGISTRY:
            return f"algo.name {self.name!r} is not a strategy"
        why = strategies.strategy_class(self.name).plan_problem(self.params)
        return f"algo ({self.name}): {why}" if why else ""

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.params)}

    @classmethod
    def from_wire(cls, value: object) -> "Algo":
        if not isinstance(value, dict) or set(value) != {"name", "params"} or not isinstance(value["params"], dict):
            raise LocalProtocolError("RoundPlan: algo must be a map of name and params")
        return cls(value["name"], dict(value["params"]))


@dataclass(frozen=True, kw_only=True)
class RoundPlan:
    """Round ``round``'s hyperparameters and the devices expected to train in it (the
    ones attached somewhere when it started; the others rejoin at a later round)."""

    round: int
    lr: float
    momentum: float
    batch_size: int
    local_epochs: int
    participants: tuple[str, ...]
    algo: Algo = field(default_factory=Algo)   # the strategy's word to its clients (common.strategies)
    cuts: dict[str, int] = field(default_factory=dict)  # device -> cut chosen at start ("auto")

    def __post_init__(self) -> None:
        problems = []
        if type(self.round) is not int or self.round < 1:
            problems.append(f"round {self.round!r} is not an int >= 1")
        for name in ("lr", "momentum"):
            v = getattr(self, name)
            if type(v) is int:
                object.__setattr__(self, name, float(v))
                v = float(v)
            if type(v) is not float or not math.isfinite(v) or v < 0:
                problems.append(f"{name} {v!r} is not a finite float >= 0")
        for name in ("batch_size", "local_epochs"):
            v = getattr(self, name)
            if type(v) is not int or not 1 <= v < (1 << 31):
                problems.append(f"{name} {v!r} is not an int >= 1")
        parts = self.participants
        if not isinstance(parts, (list, tuple)) or not all(type(p) is str and p for p in parts):
            problems.append("participants is not a list of names")
        else:
            object.__setattr__(self, "participants", tuple(sorted(set(parts))))
        if not isinstance(self.cuts, dict) or not all(type(k) is str and type(v) is int and 0 <= v < 1024
                                                      for k, v in self.cuts.items()):
            problems.append("cuts is not a map of device names to layer numbers")
        if isinstance(self.algo, dict):
            try:
                object.__setattr__(self, "algo", Algo.from_wire(self.algo))
            except LocalProtocolError as exc:
                problems.append(str(exc).removeprefix("RoundPlan: "))
        if not isinstance(self.algo, Algo):
            problems.append("algo is not a map of name and params")
        elif why := self.algo.problem():
            problems.append(why)
        if problems:
            raise LocalProtocolError("RoundPlan: " + "; ".join(problems))

    def to_wire(self) -> dict[str, Any]:
        d = asdict(self)
        d["participants"] = list(self.participants)
        d["algo"] = self.algo.to_wire()
        return d

    @classmethod
    def from_wire(cls, value: object) -> "RoundPlan":
        """Raises ``LocalProtocolError`` (turned into ``RemoteProtocolError`` by the decoder)."""
        names = {f.name for f in fields(cls)}
        if not isinstance(value, dict) or set(value) != names:
            raise LocalProtocolError(f"RoundPlan: expected the fields {sorted(names)}")
        return cls(**value)

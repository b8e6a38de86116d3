"""The seam every learning algorithm plugs into, in the spirit of Flower's ``Strategy``.

Server side, ``Strategy``:

- ``PARAMS``: its own keys of ``[strategy]`` (type, default, rule, description), checked
  at start; a key of another strategy is a ``ConfigError`` naming that one;
- ``algo()``: what the round plan carries for it (``RoundPlan.algo``: its name and the
  parameters its clients apply), and ``round_tensors``: the tensors that go with the
  round to the edges (``RoundStart.algo``) and, each client's share, to its device
  (``DeviceRound.algo``); "*/tag/key" is every client's, "DEVICE/tag/key" one device's;
- ``aggregate(results, failures, current=, state=, clients=, plan=)``: a pure function
  from the round's results (``(weights, samples)`` per device, in the fixed order of
  summation; ``clients``: each one's (device, steps)) to the next global weights and the
  next state (FedAvgM's momentum, SCAFFOLD's control variates). The central keeps the
  state and checkpoints it with the weights, so a resumed run goes on exactly.

Client side, ``ClientStep``: set up on a round's optimizer, then applied to the gradients
before every SGD step, by the device on its part and by the edge on its part alike (a
per-parameter rule, so split training stays the whole model's bit for bit). What it
keeps lives in the optimizer's state, so it moves with a migrated session, is in the
buddy's replicas and in the device's checkpoints, with nothing else to carry.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Sequence

from common.plan import Algo

Key = tuple[type, Any, Callable[[Any], str | None] | None, str]  # type, default, rule, description
Weights = dict[str, Any]     # name -> torch.Tensor
State = dict[str, Any]

POSITIVE = (lambda v: None if v > 0 else "must be > 0")
NONNEG = (lambda v: None if v >= 0 else "must be >= 0")


@dataclasses.dataclass(frozen=True)
class Failure:
    """A device whose update did not make it into the round."""
    device: str
    reason: str
    samples: int


class ClientStep:
    """A client-side algorithm: ``setup`` once on the round's optimizer (its parameters
    named by their state-dict keys, the round's ``params`` from the plan and this
    client's ``tensors``: "tag/key"), ``correct`` each group's gradients before each step.
    Both keep everything in the optimizer (its state and param groups)."""

    @staticmethod
    def setup(opt: Any, names: list[str] | None, params: dict[str, Any], tensors: dict[str, Any]) -> None:
        pass

    @staticmethod
    def correct(opt: Any, group: dict[str, Any]) -> None:
        pass


class Strategy:
    """Subclasses are dataclasses whose fields are their ``PARAMS`` keys."""
    name: ClassVar[str]
    PARAMS: ClassVar[dict[str, Key]] = {}
    CLIENT: ClassVar[type[ClientStep] | None] = None   # None: plain SGD on the clients
    CLIENT_PARAMS: ClassVar[tuple[str, ...]] = ()      # the PARAMS its clients need, in the plan

    @classmethod
    def from_section(cls, section: dict[str, Any]) -> "Strategy":
        return cls(**{k: section.get(k, spec[1]) for k, spec in cls.PARAMS.items()})

    @classmethod
    def plan_problem(cls, params: object) -> str:
        """What is wrong with the client parameters a plan carries for this strategy ("":
        nothing); checked when a plan arrives."""
        if not isinstance(params, dict) or set(params) != set(cls.CLIENT_PARAMS):
            return f"params must hold exactly {sorted(cls.CLIENT_PARAMS)}"
        for k, v in params.items():
            typ, _, rule, _ = cls.PARAMS[k]
            if typ is float and type(v) is int:
                v = float(v)
            if type(v) is not typ or (typ is float and not math.isfinite(v)):
                return f"params.{k} {v!r} is not a finite {typ.__name__}"
            if rule is not None and (why := rule(v)):
                return f"params.{k} {v!r} {why}"
        return ""

    def algo(self) -> Algo:
        """This strategy's value in the round plan: its name and its clients' parameters."""
        return Algo(self.name, {k: getattr(self, k) for k in self.CLIENT_PARAMS})

    def bind(self, param_keys: Sequence[str]) -> None:
        """The model's parameter keys (not its buffers), for a strategy with a state per
        parameter; called once by the central before the first round."""

    def round_tensors(self, state: State, participants: Sequence[str]) -> dict[str, Any]:
        """The tensors that go with the round (see the module's docstring); {} by default."""
        return {}

    def aggregate(self, results: Sequence[tuple[Weights, int]], failures: Sequence[Failure] = (), *,
                  current: Weights | None = None, state: State | None = None,
                  clients: Sequence[tuple[str, int]] = (), lr: float = 0.0) -> tuple[Weights, State]:
        """(next global weights, next strategy state). Pure: the arguments are not changed.
        ``clients``: (device, steps) of each result; ``lr``: the round's local learning
        rate. Raises ``ValueError`` on no results or results that do not describe one model."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The strategy and its parameters, for summary.json."""
        return {"name": self.name, **{k: getattr(self, k) for k in self.PARAMS}}


def for_client(tensors: dict[str, Any], device: str, keys: Sequence[str]) -> dict[str, Any]:
    """The share of a round's tensors (``Strategy.round_tensors``) that concerns
    ``device``'s part (its state-dict ``keys``), as "tag/key"."""
    wanted = set(keys)
    out = {}
    for name, t in tensors.items():
        who, _, rest = name.partition("/")
        if who in ("*", device) and rest.partition("/")[2] in wanted:
            out[rest] = t
    return out

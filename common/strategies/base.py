"""The seam every learning algorithm plugs into, in the spirit of Flower's ``Strategy``.

Server side, ``Strategy``:

- ``PARAMS``: its own keys of ``[strategy]`` (type, default, rule, description), checked
  at start; a key of another strategy is a ``ConfigError`` naming that one;
- ``algo()``: what the round plan carries for it (``RoundPlan.algo``: its name and the
  parameters its clients apply), and ``round_tensors``: the tensors every client gets
  with the round, "*/tag/key" (``RoundStart.algo``; each session and ``DeviceRound``
  takes the share of its part, ``round_share``);
- ``aggregate(results, failures, current=, state=, clients=, lr=)``: a pure function
  from the round's results (``(weights, samples)`` per device, in the fixed order of
  summation; ``clients``: each one's (device, steps)) to the next global weights and the
  next state (FedAvgM's momentum, SCAFFOLD's control variate ``c``). The central keeps
  the state and checkpoints it with the weights, so a resumed run goes on exactly;
- ``client_returns(...)``, same arguments: what goes back to each client whose update
  was aggregated ("tag/key", the whole model; SCAFFOLD's ``delta_i``). The central
  keeps each in a file and sends it with the client's next round (``central.returns``:
  ``RoundStart.algo`` "DEVICE/tag/key" and ``adopt``, then ``DeviceRound``);
- ``conclude(...)``: both at a round's end, as the central calls them (once, for a
  strategy whose two share their work).

Client side, ``ClientStep``: set up on a round's optimizer, then applied to the gradients
before every SGD step, by the device on its part and by the edge on its part alike (a
per-parameter rule, so split training stays the whole model's bit for bit). What it
keeps during a round lives in the optimizer's state, so it moves with a migrated
session, is in the buddy's replicas and in the device's checkpoints. What it keeps
between rounds (``keeps_state``: SCAFFOLD's ``c_i``) is the device's (``KeptState``,
on its disk too): it folds in what the server returns exactly once (``KeptState.adopt``)
and sends the edge its part with the round (``ClientState``).
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
    client's ``tensors``: "tag/key", the round's share and its kept state's), ``correct``
    each group's gradients before each step. Both keep everything in the optimizer (its
    state and param groups).

    ``keeps_state``: the client keeps tensors of its own between rounds ("tag/key" over
    the whole model's parameters, ``KeptState``); ``fold`` gives the next from what the
    server returned for an aggregated update of it."""
    keeps_state: ClassVar[bool] = False
    returns_tag: ClassVar[str] = ""   # the tag of what the server returns ("delta": "delta/key")

    @staticmethod
    def setup(opt: Any, names: list[str] | None, params: dict[str, Any], tensors: dict[str, Any]) -> None:
        pass

    @staticmethod
    def correct(opt: Any, group: dict[str, Any]) -> None:
        pass

    @staticmethod
    def fold(state: dict[str, Any], returns: dict[str, Any], like: dict[str, Any]) -> dict[str, Any]:
        """The next kept state: ``state`` with ``returns`` folded in (``like``: the
        model's parameters by key, for their shape and dtype). Raises ``ValueError`` for
        returns that do not fit."""
        raise ValueError("this algorithm keeps no state")


def correct_grads(opt: Any, group: dict[str, Any], kept: str, term: Callable[[Any, Any], Any],
                  alpha: float = 1.0) -> None:
    """The correction loop every ``ClientStep`` shares: for each parameter of ``group``
    with a gradient and a tensor ``kept`` in its optimizer state,
    ``grad += alpha * term(p, that tensor)``."""
    for p in group["params"]:
        st = opt.state.get(p)
        t = st.get(kept) if st else None
        if t is not None and p.grad is not None:
            p.grad.add_(term(p, t), alpha=alpha)


@dataclasses.dataclass
class KeptState:
    """What a device keeps between rounds for its algorithm (``ClientStep.keeps_state``:
    SCAFFOLD's ``c_i`` over the whole model, "ci/key"; empty: zero), and ``round``, the
    last round whose aggregated update of it has been folded in (0: none)."""
    tensors: dict[str, Any] = dataclasses.field(default_factory=dict)
    round: int = 0

    def adopt(self, step: type[ClientStep], adopt: int, returns: dict[str, Any], like: dict[str, Any]) -> bool:
        """Fold in what the server returned for this device's update of round ``adopt``
        (``DeviceRound.adopt``: the last round whose update of it the central
        aggregated), exactly once: True if the state changed; ``adopt == round``: a round
        already folded in (a DeviceRound sent again, a central resumed), nothing. Raises
        ``ValueError`` when ``adopt`` is older than ``round`` (the central's record and the
        device's disagree) or the returns do not fit."""
        if adopt < self.round:
            raise ValueError(f"the server names round {adopt} as the last aggregated update of this device, "
                             f"which folded in round {self.round} already: its state is not the server's")
        if adopt == self.round:
            return False
        self.tensors = step.fold(self.tensors, returns, like)
        self.round = adopt
        return True

    def share(self, keys: Sequence[str]) -> dict[str, Any]:
        """The kept tensors of ``keys`` (a part of the model), as "tag/key"."""
        wanted = set(keys)
        return {name: t for name, t in self.tensors.items() if name.partition("/")[2] in wanted}


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

    def round_tensors(self, state: State) -> dict[str, Any]:
        """The tensors every client gets with the round, "*/tag/key" (see the module's
        docstring); {} by default."""
        return {}

    def client_returns(self, results: Sequence[tuple[Weights, int]], *, current: Weights | None = None,
                       state: State | None = None, clients: Sequence[tuple[str, int]] = (),
                       lr: float = 0.0) -> dict[str, dict[str, Any]]:
        """device -> what goes back to it for its aggregated update ("tag/key", the whole
        model), from the arguments ``aggregate`` gets; pure. {} by default."""
        return {}

    def conclude(self, results: Sequence[tuple[Weights, int]], failures: Sequence[Failure] = (), *,
                 current: Weights | None = None, state: State | None = None,
                 clients: Sequence[tuple[str, int]] = (), lr: float = 0.0) -> tuple[Weights, State, dict[str, dict[str, Any]]]:
        """A round's end: ``aggregate``'s (weights, state) and ``client_returns``, together. A
        strategy whose two share their work (SCAFFOLD's ``delta_i``) overrides it to do it once."""
        returns = self.client_returns(results, current=current, state=state, clients=clients, lr=lr)
        weights, new_state = self.aggregate(results, failures, current=current, state=state, clients=clients, lr=lr)
        return weights, new_state, returns

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


def round_share(tensors: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The share of a round's tensors ("*/tag/key", ``RoundStart.algo``) for a part of
    the model (its state-dict ``keys``), as "tag/key"."""
    wanted = set(keys)
    out = {}
    for name, t in tensors.items():
        who, _, rest = name.partition("/")
        if who == "*" and rest.partition("/")[2] in wanted:
            out[rest] = t
    return out


def returns_of(tensors: dict[str, Any], device: str) -> dict[str, Any]:
    """What the central returns to ``device`` in a round's tensors ("DEVICE/tag/key",
    the whole model), as "tag/key"."""
    prefix = device + "/"
    return {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}

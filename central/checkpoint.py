"""The central's round checkpoint: what a restarted central needs to go on exactly.

After every completed round the central writes, into the run folder,

    checkpoint.<R>.safetensors  the global weights after round R (safetensors layout) and
                                torch's RNG state (key ``__rng__``)
    checkpoint.json             {"round", "weights", "weights_sha256", "summary"}: the round
                                number, the name of its weights file, the weights' hash, and
                                summary.json as it stood then

and before a round starts, ``round_plan.json``: that round's plan (its participants above
all), so a round cut short by a crash is run again with the same plan. Each file is
written whole (``common.atomic``: aside, synced, renamed), the weights first under a name
of their own, then the JSON that names them; the previous round's weights are removed
only after that. A crash, a signal or a full disk at any instant leaves the previous
checkpoint or the new one, never a mix; ``load`` checks the hash before it hands
anything back. Nothing here is pickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from common.atomic import write_json_atomic
from common.errors import ProtocolError, TestbedError
from common.models import state_sha256
from common.plan import RoundPlan
from common.tensorfile import TensorFileError, read_tensors, write_tensors

WEIGHTS = "checkpoint.safetensors"   # the weights' name before it carried the round (still read)
META = "checkpoint.json"
PLAN = "round_plan.json"
RNG_KEY = "__rng__"
STRATEGY_PREFIX = "__strategy__/"  # the aggregation strategy's state (central/strategies.py)


class CheckpointError(TestbedError):
    """A run folder that cannot be resumed (no checkpoint, or a damaged one)."""


@dataclass
class Checkpoint:
    round: int                          # the last completed round
    weights: dict[str, torch.Tensor]    # the global weights after it
    summary: dict[str, Any]             # summary.json as it stood then
    rng: torch.Tensor | None = None
    plan: RoundPlan | None = None       # the plan of the round after it, if that one had started
    strategy_state: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. FedAvgM's server momentum


def _write_json(path: str, data: Any) -> None:
    write_json_atomic(path, data, indent=1)


def weights_name(round: int) -> str:
    return f"checkpoint.{round}.safetensors"


def save(run_dir: str, round: int, weights: dict[str, torch.Tensor], summary: dict[str, Any],
         strategy_state: dict[str, torch.Tensor] | None = None) -> None:
    """Raises ``OSError`` (the previous checkpoint is then whole and still the one read)."""
    sha = state_sha256(weights)
    extra = {STRATEGY_PREFIX + k: v for k, v in (strategy_state or {}).items()}
    name = weights_name(round)
    write_tensors(os.path.join(run_dir, name), {**weights, **extra, RNG_KEY: torch.get_rng_state()},
                  {"round": str(round)})
    _write_json(os.path.join(run_dir, META), {"round": round, "weights": name, "weights_sha256": sha,
                                              "summary": summary})
    for f in os.listdir(run_dir):  # the weights no checkpoint.json names any more
        if f != name and f.startswith("checkpoint.") and f.endswith(".safetensors"):
            try:
                os.unlink(os.path.join(run_dir, f))
            except OSError:
                pass


def save_plan(run_dir: str, plan: RoundPlan) -> None:
    _write_json(os.path.join(run_dir, PLAN), plan.to_wire())


def exists(run_dir: str) -> bool:
    return os.path.exists(os.path.join(run_dir, META))


def load(run_dir: str) -> Checkpoint:
    """The run folder's last checkpoint. Raises ``CheckpointError`` naming what is wrong."""
    meta_path = os.path.join(run_dir, META)
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        round_, sha, summary = int(meta["round"]), str(meta["weights_sha256"]), meta["summary"]
        name = str(meta.get("weights", WEIGHTS))
        if os.sep in name or name.startswith("."):
            raise ValueError(f"weights file {name!r} is not a name in the run folder")
    except FileNotFoundError:
        raise CheckpointError(f"{run_dir} has no {META}: it is not the folder of a run that started "
                              "(start it again without --resume)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{meta_path} is damaged: {exc}") from None
    try:
        tensors, _ = read_tensors(os.path.join(run_dir, name))
    except (OSError, TensorFileError) as exc:
        raise CheckpointError(f"{os.path.join(run_dir, name)} cannot be read: {exc}") from None
    rng = tensors.pop(RNG_KEY, None)
    strategy_state = {k[len(STRATEGY_PREFIX):]: tensors.pop(k) for k in list(tensors) if k.startswith(STRATEGY_PREFIX)}
    if state_sha256(tensors) != sha:
        raise CheckpointError(f"{os.path.join(run_dir, name)} does not match {META} (sha256 differs)")
    plan = None
    try:
        with open(os.path.join(run_dir, PLAN), encoding="utf-8") as f:
            p = json.load(f)
        got = RoundPlan.from_wire(p)
        if got.round == round_ + 1:
            plan = got
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError, ProtocolError) as exc:
        raise CheckpointError(f"{os.path.join(run_dir, PLAN)} is damaged: {exc}") from None
    return Checkpoint(round=round_, weights=tensors, summary=summary, rng=rng, plan=plan,
                      strategy_state=strategy_state)

"""A device's checkpoint on its own disk (``faults.checkpoint_steps``): what a device
process started again needs to go on with its round from the step it saved.

    <run.out>/.device-state/<device>/state.safetensors   the round's start weights
                                                        ("start/...") and strategy tensors
                                                        ("algo/..."), the device part at
                                                        the step ("model/...") and its
                                                        optimizer's buffers ("opt/i/name")
    <run.out>/.device-state/<device>/state.json          run, round, step, steps, edge,
                                                        last_round, the round's plan, the
                                                        optimizer's settings, the tensors' hash

The tensors are written first, the JSON that names their hash second, each to a
temporary name, synced and renamed (``common.atomic``): a crash at any instant leaves the previous checkpoint or the
new one. ``load`` checks the hash and returns None (saying why) for anything that does
not hold together; nothing is unpickled. The files go once the round's update is taken.

Beside them, whatever ``faults.checkpoint_steps`` says, the state the device's algorithm
keeps between rounds (``common.strategies.base.KeptState``: SCAFFOLD's ``c_i``), which
lives nowhere else:

    <run.out>/.device-state/<device>/kept.safetensors    the kept tensors; its metadata:
                                                        the run and the last round folded in

written whole before the round that uses it trains (``save_kept``), so that every update
the device delivers was trained with a state on its disk, and read back by a device
process started again in the same run (``load_kept``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from common.atomic import write_bytes_atomic, write_json_atomic
from common.models import state_sha256
from common.plan import RoundPlan
from common.strategies.base import KeptState
from common.tensorfile import TensorFileError, read_tensors, write_tensors

log = logging.getLogger("device")

TENSORS = "state.safetensors"
META = "state.json"


@dataclass
class Saved:
    run: str
    round: int
    step: int
    steps: int
    edge: str
    last_round: int
    plan: RoundPlan
    start: dict[str, torch.Tensor]
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]       # a state_dict for torch.optim.SGD
    algo: dict[str, torch.Tensor]   # the round's strategy tensors for its part (DeviceRound.algo, no returns)


def folder(out: str, device: str) -> str:
    return os.path.join(out, ".device-state", device)


SECRET = "attach.secret"


def attach_secret(out: str, device: str) -> bytes:
    """The device's own secret for its proofs of attachment (``common.security``), kept
    beside its checkpoints (mode 600) so that a device process started again proves its
    attaches as before. A folder that cannot be written gives a secret for this process
    only (a restarted device then cannot take its session back: its round starts again)."""
    path = os.path.join(folder(out, device), SECRET)
    try:
        with open(path, "rb") as f:
            secret = f.read()
        if len(secret) == 32:
            return secret
    except OSError:
        pass
    secret = os.urandom(32)
    try:
        os.makedirs(folder(out, device), exist_ok=True)
        write_bytes_atomic(path, secret, mode=0o600)
    except OSError as exc:
        log.warning("%s: cannot keep its attach secret in %s: %s", device, path, exc)
    return secret


def save(where: str, *, run: str, round: int, step: int, steps: int, edge: str, last_round: int, plan: RoundPlan,
         start: dict[str, torch.Tensor], model: dict[str, torch.Tensor], optimizer: dict[str, Any],
         algo: dict[str, torch.Tensor] | None = None) -> None:
    os.makedirs(where, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {f"start/{k}": v for k, v in start.items()}
    tensors.update({f"algo/{k}": v for k, v in (algo or {}).items()})
    tensors.update({f"model/{k}": v for k, v in model.items()})
    for idx, st in optimizer["state"].items():
        for name, t in st.items():
            tensors[f"opt/{idx}/{name}"] = t
    write_tensors(os.path.join(where, TENSORS), tensors)
    meta = {"run": run, "round": round, "step": step, "steps": steps, "edge": edge, "last_round": last_round,
            "plan": plan.to_wire(), "param_groups": optimizer["param_groups"], "sha256": state_sha256(tensors)}
    write_json_atomic(os.path.join(where, META), meta, indent=None)


def load(where: str) -> Saved | None:
    path = os.path.join(where, META)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        tensors, _ = read_tensors(os.path.join(where, TENSORS))
        if state_sha256(tensors) != meta["sha256"]:
            raise ValueError("the tensors do not match state.json")
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("opt/"):
                _, idx, name = k.split("/", 2)
                state.setdefault(int(idx), {})[name] = v
        return Saved(run=str(meta["run"]), round=int(meta["round"]), step=int(meta["step"]),
                     steps=int(meta["steps"]), edge=str(meta["edge"]), last_round=int(meta["last_round"]),
                     plan=RoundPlan.from_wire(meta["plan"]),
                     start={k[6:]: v for k, v in tensors.items() if k.startswith("start/")},
                     model={k[6:]: v for k, v in tensors.items() if k.startswith("model/")},
                     optimizer={"state": state, "param_groups": meta["param_groups"]},
                     algo={k[5:]: v for k, v in tensors.items() if k.startswith("algo/")})
    except (OSError, ValueError, KeyError, TypeError, TensorFileError, Exception) as exc:  # noqa: BLE001
        log.warning("device checkpoint in %s cannot be used: %s", where, exc)
        return None


KEPT = "kept.safetensors"


def save_kept(where: str, *, run: str, kept: KeptState) -> None:
    """Raises ``OSError`` (the previous file is then whole)."""
    os.makedirs(where, exist_ok=True)
    write_tensors(os.path.join(where, KEPT), kept.tensors, {"run": run, "round": str(kept.round)})


def load_kept(where: str, run: str) -> KeptState:
    """The state kept for run ``run``; an empty one if there is none (or only another
    run's, or one that cannot be read: said in the log)."""
    path = os.path.join(where, KEPT)
    if not os.path.exists(path):
        return KeptState()
    try:
        tensors, meta = read_tensors(path)
        if meta.get("run") != run:
            return KeptState()
        return KeptState(tensors, int(meta["round"]))
    except (OSError, ValueError, KeyError, TensorFileError) as exc:
        log.warning("kept state in %s cannot be used: %s", path, exc)
        return KeptState()


def clear(where: str) -> None:
    for name in (META, TENSORS):
        try:
            os.remove(os.path.join(where, name))
        except FileNotFoundError:
            pass


class Writer:
    """Writes a device's checkpoints on a thread of its own, so the training loop never
    waits for the disk (fsync on a Pi's SD card takes tens of milliseconds). Only the
    newest waiting checkpoint is written; ``clear`` cancels what waits and removes the
    files, after a write in progress has ended (so nothing old comes back)."""

    def __init__(self, where: str) -> None:
        self.where = where
        self._lock = threading.Lock()
        self._pending: dict[str, Any] | None = None
        self._wake = threading.Event()
        self.written = 0
        threading.Thread(target=self._run, name="checkpoint-writer", daemon=True).start()

    def submit(self, **checkpoint: Any) -> None:
        with self._lock:
            self._pending = checkpoint
        self._wake.set()

    def clear(self) -> None:
        with self._lock:
            self._pending = None
            clear(self.where)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until what was submitted is on disk (tests, and the end of a process)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._pending is None:
                    return
            time.sleep(0.01)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                job, self._pending = self._pending, None
                if job is None:
                    continue
                try:
                    save(self.where, **job)
                    self.written += 1
                except OSError as exc:
                    log.warning("device checkpoint not written to %s: %s", self.where, exc)

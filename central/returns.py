"""What goes back to a device whose update the central aggregated (``Strategy.client_returns``:
SCAFFOLD's ``delta_i``), kept on disk until the device's next round takes it there.

The central keeps no device's tensors between rounds. After round ``r`` it writes each
aggregated device's returns, before the round's checkpoint, to

    <run>/client-returns/<device>.<r>.safetensors   ("tag/key", the whole model)

and records ``r`` in the strategy state as ``adopt/<device>`` (an int64 scalar,
checkpointed with the weights). Each later ``RoundStart`` carries, for every participant
with a record, its returns ("<device>/tag/key") and ``adopt[device] = r``; the device
folds them in once (``common.strategies.base.KeptState``). A device's older files go once
a newer round's checkpoint names a newer one, so a central resumed from any checkpoint
finds the files it names. Written whole (``common.tensorfile`` over ``common.atomic``);
nothing is pickled.
"""

from __future__ import annotations

import os
import re

import torch

from common.errors import TestbedError
from common.tensorfile import TensorFileError, read_tensors, write_tensors

FOLDER = "client-returns"
ADOPT = "adopt/"
_FILE = re.compile(r"^(?P<device>.+)\.(?P<round>[0-9]+)\.safetensors$")


class ReturnsError(TestbedError):
    """A file the checkpoint names cannot be read: the run folder is damaged."""


def adopted(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """device -> the last round whose update of it was aggregated, from the strategy state."""
    return {k[len(ADOPT):]: int(v.item()) for k, v in state.items() if k.startswith(ADOPT)}


class ClientReturns:
    def __init__(self, run_dir: str) -> None:
        self.folder = os.path.join(run_dir, FOLDER)

    def _path(self, device: str, round: int) -> str:
        if os.sep in device or device.startswith("."):
            raise ValueError(f"device name {device!r} cannot name a file")
        return os.path.join(self.folder, f"{device}.{round}.safetensors")

    def keep(self, round: int, returns: dict[str, dict[str, torch.Tensor]],
             state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Write each device's returns of ``round`` and give the strategy state that names
        them (``adopt/DEVICE``). Raises ``OSError`` (nothing in ``state`` changes then)."""
        if not returns:
            return state
        os.makedirs(self.folder, exist_ok=True)
        for device, tensors in sorted(returns.items()):
            write_tensors(self._path(device, round), tensors, {"device": device, "round": str(round)})
        return {**state, **{ADOPT + d: torch.tensor(round, dtype=torch.int64) for d in returns}}

    def outgoing(self, state: dict[str, torch.Tensor],
                 participants: list[str] | tuple[str, ...]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """For a RoundStart: each participant's last returns ("DEVICE/tag/key") and its
        round (``adopt``). Raises ``ReturnsError`` for a file that cannot be read."""
        rounds = adopted(state)
        tensors: dict[str, torch.Tensor] = {}
        adopt: dict[str, int] = {}
        for d in participants:
            r = rounds.get(d, 0)
            if r < 1:
                continue
            path = self._path(d, r)
            try:
                got, _ = read_tensors(path)
            except (OSError, TensorFileError) as exc:
                raise ReturnsError(f"{path} (what goes back to {d} for round {r}) cannot be read: {exc}") from None
            tensors.update({f"{d}/{k}": v for k, v in got.items()})
            adopt[d] = r
        return tensors, adopt

    def prune(self, state: dict[str, torch.Tensor]) -> None:
        """Remove each device's files of rounds older than the one ``state`` names (call it
        once the checkpoint holding ``state`` is written)."""
        rounds = adopted(state)
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return
        for name in names:
            mt = _FILE.match(name)
            if mt and int(mt["round"]) < rounds.get(mt["device"], 0):
                try:
                    os.unlink(os.path.join(self.folder, name))
                except OSError:
                    pass

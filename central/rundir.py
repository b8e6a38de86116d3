"""A run's folder: its name, and whether it holds a checkpoint to resume from.

Kept apart from ``central.checkpoint`` (which reads and writes tensors) so that the
launcher and the namespace testbed, which only start processes, never import torch.
"""

from __future__ import annotations

import os
import time

from common.errors import ConfigError

# The checkpoint's JSON half, written last (``central.checkpoint``): its presence means a
# whole checkpoint is there.
CHECKPOINT_META = "checkpoint.json"


def new_run_dir(cfg) -> tuple[str, str]:
    """The run's name and folder. A folder is never reused: a ``run.name`` whose folder
    exists is refused (resume it, or name another run); a generated name gets a suffix."""
    out = cfg.run.out
    if cfg.run.name:
        run_dir = os.path.join(out, cfg.run.name)
        if os.path.exists(os.path.join(run_dir, "summary.json")):
            raise ConfigError("run.name", f"a run named {cfg.run.name!r} exists already in {run_dir}",
                              f"continue it with --resume {run_dir}, or choose another run.name")
        return cfg.run.name, run_dir
    base = time.strftime("%Y%m%d-%H%M%S") + f"-{cfg.mode}"
    name, n = base, 1
    while os.path.exists(os.path.join(out, name)):
        n += 1
        name = f"{base}-{n}"
    return name, os.path.join(out, name)


def has_checkpoint(run_dir: str) -> bool:
    """True if ``run_dir`` holds a checkpoint a restarted central can resume from."""
    return os.path.exists(os.path.join(run_dir, CHECKPOINT_META))

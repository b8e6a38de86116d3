"""Split training over TCP is bit-identical to training the whole model in one process."""

from __future__ import annotations

import pytest
import torch

from central.strategies import make_strategy
from common.cli import data_spec
from common.config import load_config
from common.data import load_train_shard
from common.models import build_model, state_sha256
from common.training import round_batches, set_threads, train_reference_round
from tests.testbed import run_launch, write_config

pytestmark = pytest.mark.process  # whole-testbed runs: the slow tier (tests/conftest.py)


def reference_sha(cfg_path, rounds: int, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """The same run as the devices and edges would do, in this process: each device's
    whole model trained on its batches, the strategy's aggregation over the devices in name
    order. ``overrides``: ``--set`` values, as the roles would be given them."""
    cfg = load_config(str(cfg_path), list(overrides))
    old = torch.get_num_threads()
    set_threads(cfg.training.threads)
    try:
        shards = {d: load_train_shard(data_spec(cfg), devices=cfg.device_names, device=d) for d in cfg.device_names}
        t = cfg.training
        weights = build_model(cfg.model_key, seed=cfg.run.seed).state_dict()
        strategy, state = make_strategy(cfg.strategy), {}
        for r in range(1, rounds + 1):
            updates = []
            for device, (x, y) in shards.items():
                model = build_model(cfg.model_key, seed=0)
                model.load_state_dict(weights)
                batches = round_batches(len(x), t.batch_size, local_epochs=t.local_epochs, seed=cfg.run.seed,
                                        device=device, round=r)
                train_reference_round(model, x, y, batches, lr=t.lr, momentum=t.momentum, algo=strategy.algo())
                updates.append((model.state_dict(), len(x)))
            weights, state = strategy.aggregate(updates, current=weights, state=state)
        return state_sha256(weights)
    finally:
        torch.set_num_threads(old)


def test_a_split_run_equals_in_process_training(tmp_path):
    # Two edges and two devices with the fault tests' short deadlines (tests/test_faults.py
    # compares its runs with reference_sha on the strength of this test): a clean run is
    # exact and records no fault, though every link must prove itself alive every 0.2 s.
    cfg = write_config(tmp_path, edges=2, devices=2, rounds=2, samples_per_device=300, batch_size=50,
                       extra={"training": {"local_epochs": 2}, "faults": {"heartbeat_s": 0.2, "dead_after_s": 1.0}})
    status, out, summary = run_launch(cfg)
    assert status == 0, out
    assert summary["final_model_sha256"] == reference_sha(cfg, rounds=2)
    assert summary["faults"] == [], summary["faults"]

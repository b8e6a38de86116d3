"""Every device may cut the model at its own layer (``devices.NAME.split_layer``): one edge
serves sessions of different cuts, a session moves with its cut, FedAvg averages full models."""

from __future__ import annotations

import pytest

from common.config import build_config
from common.errors import ConfigError
from tests.test_config import _set, local_raw


def test_a_device_cut_overrides_the_models_and_is_checked():
    raw = _set(_set(local_raw(), "devices.device2.split_layer", 1), "devices.device4.split_layer", 3)
    cfg = build_config(raw)
    assert [cfg.split_of(d) for d in cfg.device_names] == [3, 1, 3, 3]
    assert cfg.splits == {"device2": 1}
    with pytest.raises(ConfigError) as err:
        build_config(_set(local_raw(), "devices.device3.split_layer", 6))
    assert err.value.key == "devices.device3.split_layer" and "5 (fc1)" in str(err.value)


def test_devices_of_different_cuts_with_fedprox_and_a_move_equal_whole_model_training(tmp_path):
    """Real processes: three cuts of VGG-5 on 8x8 images, FedProx, device1 (cut 1) moves
    to edge2, which serves device2 (cut 3) and device3 (cut 5). The final model is the
    in-process whole-model run's (FedProx included), bit for bit."""
    from tests.test_exactness import reference_sha
    from tests.testbed import run_launch, write_config
    cfg = write_config(tmp_path, edges=2, devices=3, rounds=1, samples_per_device=16, batch_size=4, split_layer=3,
                       moves=[{"device": "device1", "to": "edge2", "round": 1, "at": 0.5}],
                       device_edges={"device1": "edge1", "device2": "edge2", "device3": "edge2"},
                       extra={"devices.device1": {"split_layer": 1}, "devices.device3": {"split_layer": 5},
                              "strategy": {"name": "fedprox", "mu": 0.1},
                              "data": {"image_size": 8, "test_samples": 50}})
    status, out, summary = run_launch(cfg)
    assert status == 0, out
    assert summary["cuts"] == {"device1": 1, "device2": 3, "device3": 5}
    assert summary["strategy"] == {"name": "fedprox", "mu": 0.1}
    (mig,) = summary["migrations"]
    assert (mig["device"], mig["to"], mig["step"], mig["mode"]) == ("device1", "edge2", 2, "fedfly")
    assert summary["final_model_sha256"] == reference_sha(cfg, rounds=1)

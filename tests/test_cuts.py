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


@pytest.mark.process
def test_devices_of_different_cuts_with_fedprox_and_a_move_equal_whole_model_training(tmp_path):
    """Real processes: three cuts of VGG-5 on 8x8 images, FedProx, device1 (cut 1) moves
    to edge2, which serves device2 (cut "auto": chosen at start) and device3 (cut 5). The
    final model is the in-process whole-model run's (FedProx included), bit for bit."""
    from tests.test_exactness import reference_sha
    from tests.testbed import run_dir_of, run_launch, write_config
    cfg = write_config(tmp_path, edges=2, devices=3, rounds=1, samples_per_device=16, batch_size=4, split_layer=3,
                       moves=[{"device": "device1", "to": "edge2", "round": 1, "at": 0.5}],
                       device_edges={"device1": "edge1", "device2": "edge2", "device3": "edge2"},
                       extra={"devices.device1": {"split_layer": 1}, "devices.device3": {"split_layer": 5},
                              "devices.device2": {"split_layer": "auto"},
                              "strategy": {"name": "fedprox", "mu": 0.1},
                              "data": {"image_size": 8, "test_samples": 50}})
    status, out, summary = run_launch(cfg)
    assert status == 0, out
    auto = summary["auto_split"]["device2"]
    assert summary["cuts"] == {"device1": 1, "device2": auto["cut"], "device3": 5}
    assert auto["predicted"]["train_s"] > 0 and len(auto["measured_train_s"]) == 1
    assert set(auto["round_s_by_cut"]) == {str(c) for c in range(6)}
    assert summary["strategy"] == {"name": "fedprox", "mu": 0.1}
    (mig,) = summary["migrations"]
    assert (mig["device"], mig["to"], mig["step"], mig["mode"]) == ("device1", "edge2", 2, "fedfly")
    assert summary["final_model_sha256"] == reference_sha(cfg, rounds=1)
    # the per-round CSV beside summary.json
    rows = (run_dir_of(out) / "rounds.csv").read_text().splitlines()
    assert rows[0].startswith("round,seconds,") and len(rows) == 2
    row = dict(zip(rows[0].split(","), rows[1].split(",")))
    assert row["round"] == "1" and row["devices"] == "3" and row["migrations"] == "1"
    assert int(row["migration_bytes"]) == mig["state_bytes"] and row["samples"] == "48"


def test_rounds_csv_counts_lists_and_sums_migrations():
    from central.results import rounds_csv
    summary = {"rounds": [{"round": 1, "seconds": 2.5, "test_accuracy": 0.5, "devices": ["a", "b"], "missing": [],
                           "dropped": [{"device": "c"}], "samples": 10, "samples_lost": 5},
                          {"round": 2, "seconds": 1.0, "devices": ["a"], "missing": ["b"]}],
               "migrations": [{"round": 1, "state_bytes": 100, "pause_ms": 1.5},
                              {"round": 1, "state_bytes": 50, "pause_ms": 2.0}]}
    lines = rounds_csv(summary).splitlines()
    assert lines[0] == ("round,seconds,eval_seconds,test_accuracy,test_loss,samples,devices,missing,dropped,"
                        "samples_lost,migrations,migration_bytes,migration_pause_ms")
    assert lines[1] == "1,2.5,,0.5,,10,2,0,1,5,2,150,3.5"
    assert lines[2] == "2,1.0,,,,,1,1,,,0,0,0"


def test_auto_picks_the_cut_the_cost_model_predicts_fastest():
    from central.autosplit import Profile, choose, predict
    # four layers of 1 s each per batch; activations shrink 1000 -> 10 bytes, weights grow
    p = Profile(seconds=(1.0, 1.0, 1.0, 1.0), out_bytes=(1000, 100, 10, 4), param_bytes=(10, 100, 1000, 10))
    got = predict(p, 1, steps=10, slowdown=2.0, edge_load=3, mbit=0.001)  # 1000 bit/s
    assert got["device_s"] == 10 * 2 * 2.0 and got["edge_s"] == 10 * 2 * 3
    assert got["link_s"] == 10 * 2 * 100 * 8 / 1000 and got["weights_s"] == 2 * 110 * 8 / 1000
    assert got["round_s"] == got["device_s"] + got["edge_s"] + got["link_s"] + got["weights_s"]
    raw = local_raw()
    for d in raw["devices"]:
        raw["devices"][d]["split_layer"] = "auto"
    raw["devices"]["device1"]["slowdown"] = 50.0     # a very slow device: as little as it can
    raw["devices"]["device2"]["link_mbit"] = 0.0001  # a very slow link: the smallest activations
    cfg = build_config(raw)
    chosen = choose(cfg, {d: 100 for d in cfg.devices}, p=Profile((1.0,) * 7, (10**6, 10, 10**6, 10**6, 10**6, 10**6, 4),
                                                                  (0,) * 7))
    assert chosen["device1"]["cut"] == 0 and chosen["device2"]["cut"] == 1
    assert set(chosen) == set(cfg.devices) and chosen["device3"]["round_s_by_cut"]["0"] > 0


def test_auto_in_the_config_and_the_plan():
    from common.errors import LocalProtocolError
    from common.plan import RoundPlan
    cfg = build_config(_set(local_raw(), "model.split_layer", "auto"))
    assert cfg.split_of("device1") == "auto" and cfg.base_cut == 3 and cfg.splits == {}
    with pytest.raises(ConfigError) as err:
        build_config(_set(local_raw(), "devices.device1.split_layer", "automatic"))
    assert err.value.key == "devices.device1.split_layer" and '"auto"' in str(err.value)
    plan = RoundPlan(round=1, lr=0.1, momentum=0.0, batch_size=4, local_epochs=1, participants=("a",), cuts={"a": 2})
    assert RoundPlan.from_wire(plan.to_wire()) == plan
    with pytest.raises(LocalProtocolError):
        RoundPlan(round=1, lr=0.1, momentum=0.0, batch_size=4, local_epochs=1, participants=("a",), cuts={"a": "2"})

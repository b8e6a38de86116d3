"""The real processes on loopback: a whole run, a wrong key, a bad config."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.testbed import ROOT, Testbed, _env, run_launch, run_dir_of, write_config

ROUND_FIELDS = {"round", "seconds", "test_accuracy", "test_loss", "samples"}


def test_full_run_learns_and_writes_every_result(tmp_path):
    cfg = write_config(tmp_path, edges=2, devices=4, rounds=3, samples_per_device=300, batch_size=50)
    status, out, summary = run_launch(cfg)
    assert status == 0, out
    assert summary is not None, out
    assert summary["mode"] == "fedfly" and summary["status"] == "finished"
    assert len(summary["rounds"]) == 3
    for rec in summary["rounds"]:
        assert ROUND_FIELDS <= set(rec)
        assert 0.0 <= rec["test_accuracy"] <= 1.0
        assert rec["samples"] == 4 * 300
    accs = [r["test_accuracy"] for r in summary["rounds"]]
    assert accs[-1] > 0.2, accs  # chance is 0.1
    assert set(summary["devices"]) == {f"device{i}" for i in range(1, 5)}
    for dev in summary["devices"].values():
        assert dev["samples"] == 300 and len(dev["round_seconds"]) == 3
    assert summary["migrations"] == []
    assert len(summary["final_model_sha256"]) == 64
    assert summary["threads"] == 1
    run_dir = run_dir_of(out)
    from common.models import state_sha256
    from common.tensorfile import read_tensors
    weights, meta = read_tensors(str(run_dir / "final_model.safetensors"))
    assert state_sha256(weights) == summary["final_model_sha256"] == meta["sha256"]
    logs = {p.name for p in run_dir.glob("events-*.jsonl")}
    assert logs == {"events-central.jsonl", "events-edge1.jsonl", "events-edge2.jsonl"} | \
        {f"events-device{i}.jsonl" for i in range(1, 5)}
    first = json.loads((run_dir / "events-edge1.jsonl").read_text().splitlines()[0])
    assert {"ts", "process", "event", "cpu_percent", "rss_mb"} <= set(first)
    # the progress line and the final table
    assert "round 3/3" in out and "ETA" in out and "final model sha256" in out


def test_wrong_key_is_refused(tmp_path):
    cfg = write_config(tmp_path, edges=1, devices=1, rounds=1, extra={"run": {"startup_timeout": 15.0}})
    other = tmp_path / "other.key"
    other.write_text("ab" * 32)
    bed = Testbed(cfg, log_dir=tmp_path / "logs")
    try:
        bed.start("central")
        edge = bed.start("edge", "edge1", f'security.key_file="{other}"', "run.startup_timeout=20")
        assert bed.wait("edge1", 60) == 1
        assert "could not prove" in bed.log("edge1") or "did not accept" in bed.log("edge1")
        assert bed.wait("central", 60) == 1  # nobody valid joined: start-up times out, run aborted
        events = next((tmp_path / "runs").glob("*/events-central.jsonl")).read_text()
        assert '"refused"' in events
        del edge
    finally:
        bed.stop()


def test_bad_config_names_the_key(tmp_path):
    cfg = write_config(tmp_path, edges=1, devices=1)
    status, out, _ = run_launch(cfg, "training.lrr=0.1", timeout=60)
    assert status == 2 and "training.lrr" in out
    r = subprocess.run([sys.executable, "-m", "device", "--config", str(cfg), "--name", "device1",
                        "--set", "devices.device1.edge=edge9"], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "devices.device1.edge" in r.stderr and "edge1" in r.stderr

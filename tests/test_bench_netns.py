"""The handover matrix behind the netns testbed's shaped backhaul (``bench_migration
--network netns``, ``scripts/netns_bench.py``) and the before/after comparison
(``scripts/bench_ab.py``): their plumbing without processes, and one tiny relay run in
namespaces (root and iproute2; skipped elsewhere with the reason). No timing is asserted."""

from __future__ import annotations

import json

import pytest

from common.config import load_config
from scripts import bench_ab, bench_migration, benchlib, netns_bench
from scripts.netns_testbed import namespaces_named, probe


def test_a_loopback_config_moves_to_the_labs_addresses_with_only_the_backhaul_shaped(tmp_path):
    cfg = bench_migration._matrix_config(tmp_path, "pair", "key", "relay", 1, "t")
    sets = netns_bench.overrides(cfg, 100.0)
    moved, lab = load_config(str(cfg), sets), load_config(str(netns_bench.NETNS_CONFIG))
    assert moved.central.host == lab.central.host
    assert {e: moved.edges[e].host for e in moved.edges} == {e: lab.edges[e].host for e in moved.edges}
    assert {d: moved.devices[d].host for d in moved.devices} == {d: lab.devices[d].host for d in moved.devices}
    assert (moved.links.device_mbit, moved.links.edge_mbit, moved.links.central_mbit) == (0.0, 100.0, 0.0)
    assert moved.mobility.handover == "relay"


def test_networks_and_the_matrix_report_name_the_network():
    assert bench_migration._networks(["loopback", "netns"], [100.0, 1000.0]) == [
        ("loopback", 0.0), ("netns 100 Mbit", 100.0), ("netns 1000 Mbit", 1000.0)]
    with pytest.raises(SystemExit):
        bench_migration._networks(["wifi"], [100.0])
    s = benchlib.summarize([10.0, 12.0])
    rows = [{"network": nw, "scenario": "alone", "security": "key", "move": mv, "repeat": 0, "moves": 9,
             "pause_ms": s, "transfer_ms": s, "first_step_ms": s, "other_step_ms": s, "before_move_step_ms": s,
             "after_move_step_ms": s, "foreign_cpu_share": 0.1, "loadavg_before": 2.0}
            for nw in ("loopback", "netns 100 Mbit") for mv in ("relay", "pull")]
    text = bench_migration.report_matrix({"runs": rows, "plain": []})
    assert text.count("netns 100 Mbit") == 2 and text.count("loopback") == 2


def test_before_after_compares_medians_and_spreads():
    passes = [("before", 10.0), ("after", 9.0), ("after", 11.0), ("before", 14.0), ("before", 12.0), ("after", 12.0)]
    runs = [{"side": side, "repeat": i // 2, "figures": {"pause (ms)": v}} for i, (side, v) in enumerate(passes)]
    (row,) = bench_ab.compare({"runs": runs})
    assert (row["before_median"], row["before_spread"]) == (12.0, 4.0)
    assert (row["after_median"], row["after_spread"]) == (11.0, 3.0)
    assert row["after_over_before"] == pytest.approx(11 / 12)
    assert sorted(row["paired_diffs"]) == [-3.0, -1.0, 0.0] and row["paired_diff_median"] == -1.0


@pytest.mark.process
def test_a_relay_behind_the_shaped_backhaul(tmp_path):
    reason = probe()
    if reason:
        pytest.skip(reason)
    moves = benchlib.ping_pong_moves("device1", ("edge1", "edge2"), "edge1", [(1, 0.5)])
    cfg = benchlib.write_config(tmp_path, "relay", edges=2, devices=1, rounds=1, moves=moves, samples_per_device=200,
                                batch_size=50, test_samples=100, extra={"mobility": {"handover": "relay"}})
    res = netns_bench.launch(cfg, 50.0, timeout=240)
    (mig,) = res.summary["migrations"]
    assert (mig["from"], mig["to"], mig["state_bytes"]) == ("edge1", "edge2", 0)  # relayed: nothing copied
    state = json.loads((res.run_dir / "netns.json").read_text())
    assert [u["mbit"] for u in state["plan"]["uplinks"]] == [50.0, 50.0]
    assert [h["mbit"] for h in state["plan"]["hosts"].values()] == [0.0] * 4
    assert namespaces_named(state["prefix"]) == []

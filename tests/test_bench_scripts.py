"""The benchmark scripts' own plumbing, fast: the plot script on small synthetic results,
the goal table, and the codec benchmark in its tiny form. No timing is asserted."""

from __future__ import annotations

import json

import pytest

from scripts import bench, benchlib


def _summary(mode: str, name: str) -> dict:
    rounds = [{"round": r, "seconds": 2.0 + 0.1 * r, "eval_seconds": 0.2, "test_accuracy": 0.2 + 0.1 * r,
               "test_loss": 2.0 - 0.2 * r, "samples": 400, "devices": ["device1", "device2"], "missing": []}
              for r in range(1, 5)]
    return {"run_name": name, "mode": mode, "status": "finished", "rounds": rounds,
            "devices": {d: {"samples": 200, "round_seconds": [1.9, 2.0, 2.1, 2.2], "steps": [4] * 4,
                            "edges": ["edge1"] * 4} for d in ("device1", "device2")},
            "migrations": [{"device": "device1", "from": "edge1", "to": "edge2", "round": 2, "step": 2,
                            "mode": mode, "pause_ms": 15.0, "state_bytes": 4508886, "transfer_ms": 12.0}],
            "final_model_sha256": "0" * 64, "threads": 1, "device_settings": {}, "training": {}}


def _bench_results() -> dict:
    points = [{"f": k / 10, "f_effective": k / 10, "fedfly_s": 2.0, "restart_s": 2.0 * (1 + k / 10),
               "saving": (k / 10) / (1 + k / 10) - 0.01, "ideal": (k / 10) / (1 + k / 10), "gap_pp": -1.0,
               "fedfly_rounds_s": [2.0], "restart_rounds_s": [2.0 * (1 + k / 10)]} for k in range(1, 10)]
    schedule = [[2 + i, k / 10] for i, k in enumerate(range(1, 10))] + [[11, None]]
    runs = [{"mode": mode, "repetition": 1, "run_dir": "x", "round_seconds": [3.0] + [2.5] * 10,
             "schedule": schedule, "moves": [[r, 5, 15.0] for r in range(2, 11)]} for mode in ("fedfly", "restart")]
    sweep = {"balanced": {"setting": "balanced", "devices": 1, "mover": "device1", "mover_samples": 2000, "steps": 20,
                          "repetitions": 1, "no_move_round_s": {"fedfly": 2.0, "restart": 2.0}, "points": points,
                          "max_gap_pp": 1.0, "fedfly_pause_ms": benchlib.summarize([15.0]), "runs": runs}}
    migs = [{"device": "device1", "from": "edge1", "to": "edge2", "round": 2, "step": s, "mode": "fedfly",
             "pause_ms": 15.0 + s, "state_bytes": 4508886, "transfer_ms": 12.0 + s} for s in range(1, 10)]
    acc_runs = [{"name": f"{d}-{m}-{mv}", "distribution": d, "mode": m, "moves": mv, "accuracy": [0.2, 0.3, 0.4],
                 "loss": [2.0, 1.8, 1.6], "round_seconds": [2.0] * 3, "migrations": 6 if mv else 0, "sha256": "0",
                 "shard_sizes": {"device1": 100}, "run_dir": "x", "identical_to_fedfly_static": True}
                for d in ("balanced", "imbalanced") for mv in (False, True) for m in ("fedfly", "restart", "classic")]
    central = {d: [{"epoch": e, "test_accuracy": 0.2 + 0.15 * e, "test_loss": 1.0} for e in (1, 2, 3)]
               for d in ("balanced", "imbalanced")}
    plain = benchlib.summarize([2.0, 2.5])
    return {
        "sweep": {"figures": sweep},
        "migration": {"figures": {"moves": 9, "pause_ms": benchlib.summarize([m["pause_ms"] for m in migs]),
                                  "transfer_ms": benchlib.summarize([m["transfer_ms"] for m in migs]),
                                  "state_bytes": benchlib.summarize([4508886.0]), "plain_transfer_ms": plain,
                                  "plain_connect_transfer_ms": plain, "pause_over_plain": 8.0,
                                  "pause_over_plain_connect": 6.0},
                      "migrations": migs},
        "accuracy": {"dataset": "synthetic", "figures": {"runs": acc_runs, "centralised": central}},
        "split": {"figures": {"tcp_samples_per_s": 700.0, "in_process_samples_per_s": 720.0, "ratio": 0.97}},
        "scale": {"figures": {"devices": 32, "devices_wanted": 32, "status": "finished",
                              "rounds": [{"round": 1, "seconds": 9.0, "longest_device_s": 5.0, "overhead_s": 4.0,
                                          "eval_seconds": 0.5, "moves": 8, "missing": []}]}},
        "codec": {"figures": {"encode_decode": {"gb_per_s": 4.0}}},
    }


@pytest.fixture
def matplotlib_available():
    pytest.importorskip("matplotlib", reason="matplotlib is the optional 'plot' extra; pip install -e '.[plot]'")


def test_plot_run_folder_writes_pngs(tmp_path, matplotlib_available):
    from scripts import plot
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps(_summary("fedfly", "run")))
    assert plot.main([str(run)]) == 0
    for name in ("accuracy.png", "round_times.png"):
        assert (run / name).stat().st_size > 1000


def test_plot_folder_of_runs_puts_every_run_on_one_figure(tmp_path, matplotlib_available):
    from scripts import plot
    for mode in ("fedfly", "restart"):
        (tmp_path / mode).mkdir()
        (tmp_path / mode / "summary.json").write_text(json.dumps(_summary(mode, mode)))
    written = plot.plot(tmp_path, tmp_path / "figs")
    assert {p.name for p in written} == {"accuracy.png", "round_times.png"}


def test_plot_bench_folder_writes_every_figure(tmp_path, matplotlib_available):
    from scripts import plot
    benchlib.write_json(tmp_path / "results.json", {"results": _bench_results()})
    assert plot.main([str(tmp_path)]) == 0
    names = {p.name for p in (tmp_path / "figures").glob("*.png")}
    assert names == {"sweep.png", "round_times.png", "accuracy.png", "migration.png", "split.png", "scale.png"}


def test_plot_of_an_empty_folder_is_an_error(tmp_path, matplotlib_available):
    from scripts import plot
    assert plot.main([str(tmp_path)]) == 2


def test_goal_table_marks_pass_and_miss():
    checks = bench.goals(_bench_results())
    by_goal = {c["goal"]: c["pass"] for c in checks}
    assert by_goal["migration pause, median"] is True
    assert by_goal["migration pause / plain socket, same bytes, open connection"] is False
    assert by_goal["split over TCP / in-process samples/s"] is True
    table = bench.goal_table(checks)
    assert "PASS" in table and "MISS" in table


def test_codec_benchmark_tiny(tmp_path):
    from scripts import bench_codec
    result = bench_codec.run(tmp_path, "tiny")
    f = result["figures"]
    assert f["frame_bytes"] > 4_000_000  # VGG-5 split 3: weights and momentum of the edge part
    assert f["encode_decode"]["gb_per_s"] > 0
    assert "GB/s" in bench_codec.report(result)


def test_statistics_helpers():
    assert benchlib.percentile([1, 2, 3, 4, 5], 50) == 3
    assert benchlib.percentile([1, 2, 3, 4, 5], 100) == 5
    s = benchlib.summarize([4.0, 1.0, 3.0, 2.0])
    assert s["count"] == 4 and s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0


def test_move_plans_never_move_to_the_current_edge():
    from scripts import bench_migration, bench_scale
    for moves, first in ((bench_migration.plan(2), {"device1": "edge1"}),):
        here = dict(first)
        for mv in moves:
            assert mv["to"] != here[mv["device"]]
            here[mv["device"]] = mv["to"]
    names = benchlib.device_names(32)
    here = {d: benchlib.edge_names(4)[i % 4] for i, d in enumerate(names)}
    for mv in bench_scale.moves(32, 3):
        assert mv["to"] != here[mv["device"]]
        here[mv["device"]] = mv["to"]


def test_config_written_by_benchlib_loads(tmp_path):
    from common.config import load_config
    from scripts import bench_sweep
    moves = benchlib.ping_pong_moves("device1", ("edge1", "edge2"), "edge1", [(1, 0.3), (1, 0.6), (2, 0.5)])
    path = benchlib.write_config(tmp_path, "t", edges=2, devices=4, rounds=3, moves=moves)
    cfg = load_config(str(path))
    assert sorted(cfg.edges) == ["edge1", "edge2"] and len(cfg.devices) == 4 and len(cfg.moves) == 3
    assert (tmp_path / "bench.key").exists()
    assert bench_sweep.effective_f(0.5, 2000) == 0.5
    assert bench_sweep.effective_f(0.5, 1680) == 800 / 1680


def test_the_faults_benchmark_plan_is_a_valid_testbed_file(tmp_path):
    from common.config import load_config
    from scripts import bench_faults
    drops, moves = bench_faults.plan(3)
    cfg = load_config(str(benchlib.write_config(tmp_path, "f", edges=2, devices=1, rounds=4, drops=drops,
                                                moves=moves, extra={"faults": bench_faults.FAULTS})))
    assert len(cfg.drops) == 9 and len(cfg.moves) == 3 and cfg.faults.dead_after_s == 2.0
    checks = bench.goals({"faults": {"figures": {"detected_s": benchlib.summarize([2.0, 2.01]), "dead_after_s": 2.0,
                                                 "identical_to_reference": True}}})
    assert [c["pass"] for c in checks] == [True, True]

"""Scale: 1 central, 4 edges and 32 devices on this machine, with moves every round.

    python -m scripts.bench_scale [--quick | --full] [--out DIR]

Every role is its own process (37 of them, each with its own PyTorch), mode fedfly,
VGG-5 split 3, synthetic data, small shards. Every round a quarter of the devices (8)
move to the next edge, at 50% of their round. Reported: whether the run finished, the
peak memory of all its processes (summed RSS and USS, sampled every second), and per
round: the round's seconds (central: round start sent to the last update in), the
longest device training time of that round, and the overhead beyond compute, taken as
``round seconds - longest device training time`` (start-up of the round, the weights out
and back, the moves' bookkeeping; evaluation is apart, ``eval seconds``). Its median is
over rounds 2 and later: round 1 also pays every process's one-off start-up costs.

Before starting, the machine's available memory is checked against an estimate per
process; with too little, fewer devices are run and the result says so.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

import psutil

from scripts import benchlib

EDGES = 4
# scale -> (devices, rounds, samples per device, batch)
SCALES = {"tiny": (8, 2, 100, 50), "quick": (32, 3, 100, 50), "full": (32, 10, 500, 50)}
SPLIT = 3
# Unique memory of one role process (PyTorch's own libraries, a small model, a shard);
# a bound above what BENCHMARKS.md, section 6 measured. Used only to decide whether the
# testbed fits.
EST_PROCESS_MB = 450
MEMORY_MARGIN_MB = 2048


def describe(scale: str) -> dict[str, Any]:
    devices, rounds, samples, batch = SCALES[scale]
    return {"testbed": f"1 central, {EDGES} edges, {devices} devices, one process each", "mode": "fedfly",
            "model": f"VGG-5 split {SPLIT}", "rounds": rounds, "samples per device": samples, "batch": batch,
            "moves": f"every round {devices // 4} devices move to the next edge at 50%", "threads": 1,
            "memory check": f"{EST_PROCESS_MB} MB per process + {MEMORY_MARGIN_MB} MB margin"}


def fitting_devices(wanted: int) -> tuple[int, float]:
    """(devices that fit in the available memory, available MB)."""
    avail = psutil.virtual_memory().available / 2**20
    fit = int((avail - MEMORY_MARGIN_MB) // EST_PROCESS_MB) - 1 - EDGES
    return max(EDGES, min(wanted, fit)), avail


def moves(devices: int, rounds: int) -> list[dict]:
    names, edges = benchlib.device_names(devices), benchlib.edge_names(EDGES)
    out = []
    for i in range(0, devices, 4):  # every fourth device moves each round
        here = i % EDGES
        for r in range(1, rounds + 1):
            here = (here + 1) % EDGES
            out.append({"device": names[i], "to": edges[here], "round": r, "at": 0.5})
    return out


def run(out: Path, scale: str) -> dict[str, Any]:
    wanted, rounds, samples, batch = SCALES[scale]
    devices, avail = fitting_devices(wanted)
    cfg = benchlib.write_config(out, "scale", edges=EDGES, devices=devices, rounds=rounds, mode="fedfly",
                                moves=moves(devices, rounds), samples_per_device=samples, batch_size=batch,
                                split_layer=SPLIT, test_samples=500)
    res = benchlib.launch(cfg, timeout=900 + 300 * rounds, sample_memory=True)
    s = res.summary or {}
    per_round = []
    for rec in s.get("rounds", []):
        i = rec["round"] - 1
        longest = max(d["round_seconds"][i] for d in s["devices"].values() if len(d["round_seconds"]) > i)
        per_round.append({"round": rec["round"], "seconds": rec["seconds"], "longest_device_s": longest,
                          "overhead_s": rec["seconds"] - longest, "eval_seconds": rec["eval_seconds"],
                          "moves": sum(1 for mv in s["migrations"] if mv["round"] == rec["round"]),
                          "missing": rec["missing"]})
    migs = s.get("migrations", [])
    figures = {
        "devices_wanted": wanted, "devices": devices, "available_mb_before": avail,
        "status": s.get("status", f"no summary (launcher status {res.status})"), "launcher_status": res.status,
        "wall_seconds": res.seconds, "total_seconds": s.get("total_seconds"),
        "memory": s.get("bench_memory"), "rounds": per_round, "migrations": len(migs),
        "pause_ms": benchlib.summarize([mv["pause_ms"] for mv in migs]),
        # Round 1 pays each process's one-off start-up (imports, first allocations): apart.
        "overhead_median_s": statistics.median(r["overhead_s"] for r in per_round[1:]) if len(per_round) > 1 else None,
        "failures": s.get("failures", []), "run_dir": str(res.run_dir) if res.run_dir else None,
        "output": str(res.output_path),
    }
    return {"benchmark": "scale", "scale": scale, "config": describe(scale), "figures": figures}


def report(result: dict[str, Any]) -> str:
    f = result["figures"]
    lines = []
    if f["devices"] < f["devices_wanted"]:
        lines.append(f"scale: only {f['devices']} of {f['devices_wanted']} devices fit in the "
                     f"{f['available_mb_before']:.0f} MB available")
    rows = [[r["round"], r["seconds"], r["longest_device_s"], r["overhead_s"], r["eval_seconds"], r["moves"],
             len(r["missing"])] for r in f["rounds"]]
    lines.append(benchlib.table(["round", "seconds", "longest device s", "overhead s", "eval s", "moves", "missing"],
                                rows, floatfmt=".2f"))
    mem = f["memory"] or {}
    lines.append(f"scale: {EDGES} edges, {f['devices']} devices: {f['status']} in {f['wall_seconds']:.0f} s "
                 f"(launcher status {f['launcher_status']}); {f['migrations']} migrations, pause median "
                 f"{f['pause_ms'].get('median', float('nan')):.1f} ms; "
                 f"peak memory {mem.get('uss_mb', 0) / 1024:.1f} GB "
                 f"unique ({mem.get('rss_mb', 0) / 1024:.1f} GB RSS) over {mem.get('processes', 0)} processes; "
                 "overhead beyond compute per round after round 1, median "
                 f"{f['overhead_median_s'] or float('nan'):.2f} s")
    return "\n".join(lines)


def ok(result: dict[str, Any]) -> bool:
    return result["figures"]["status"] == "finished"


if __name__ == "__main__":
    sys.exit(benchlib.standalone("scale", describe, run, report))

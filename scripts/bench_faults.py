"""What unplanned mobility costs: how long a silent peer takes to be noticed, and how long
a device stands still after its link drops, next to a planned move in the same run.

    python -m scripts.bench_faults [--quick | --full] [--out DIR]

One device and two edges on loopback, mode fedfly, VGG-5 split 3. Round 1 is a warm-up
(no fault). Every later round, from the testbed file's trace (``[[mobility.drops]]``) and
schedule (``[[mobility.moves]]``), at 20/40/60/80% of the round:

    reconnect   the link drops (0 s outage) and the device comes back on the same edge:
                its session is still there (reconnect + handshake + attach)
    elsewhere   the link drops and the device comes back on the other edge, which pulls
                the session from the edge it left (reconnect + handshake + pull)
    planned     a planned move back (break-before-make; the migration benchmark's pause)
    silent      the radio is out for dead_after_s + 0.5 s; the edge notices the silence
                (``detected_s``), the device comes back on the other edge

A second run with no fault and no move gives the reference final model: a fault the run
survives must leave it bit for bit the same. From ``summary.json``: each fault's
``down_s`` (the device's pause, from the link going to training going on) and the edge's
``detected_s``; each move's ``pause_ms``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from common.config import boundary
from scripts import benchlib

# scale -> (samples per device, measured rounds)
SCALES = {"tiny": (400, 1), "quick": (1000, 4), "full": (2000, 12)}
BATCH = 50
FAULTS = {"heartbeat_s": 0.5, "dead_after_s": 2.0, "device_grace_s": 8.0}
SILENT_S = FAULTS["dead_after_s"] + 0.5


def describe(scale: str) -> dict[str, Any]:
    samples, measured = SCALES[scale]
    return {"testbed": "1 central, 2 edges, 1 device on loopback; mode fedfly", "model": "VGG-5 split 3",
            "steps per round": samples // BATCH, "rounds": f"1 warm-up + {measured}",
            "per measured round": "drop+reconnect same edge, drop+reconnect other edge, planned move, "
                                  f"{SILENT_S:g} s radio loss", "faults": FAULTS,
            "reference": "the same run without faults or moves (final model compared)"}


def plan(measured: int) -> tuple[list[dict], list[dict]]:
    """The trace and the schedule: round r starts on edge ``here`` and ends on the other."""
    drops, moves = [], []
    here, other = "edge1", "edge2"
    for r in range(2, 2 + measured):
        drops.append({"device": "device1", "round": r, "at": 0.2, "seconds": 0.0, "to": here})
        drops.append({"device": "device1", "round": r, "at": 0.4, "seconds": 0.0, "to": other})
        moves.append({"device": "device1", "to": here, "round": r, "at": 0.6})
        drops.append({"device": "device1", "round": r, "at": 0.8, "seconds": SILENT_S, "to": other})
        here, other = other, here
    return drops, moves


def run(out: Path, scale: str) -> dict[str, Any]:
    samples, measured = SCALES[scale]
    drops, moves = plan(measured)
    common = dict(edges=2, devices=1, rounds=1 + measured, mode="fedfly", samples_per_device=samples,
                  batch_size=BATCH, test_samples=500, extra={"faults": FAULTS})
    cfg = benchlib.write_config(out, "faults", drops=drops, moves=moves, **common)
    ref_cfg = benchlib.write_config(out, "reference", **common)
    res = benchlib.launch_ok(cfg, timeout=600 + 120 * measured)
    ref = benchlib.launch_ok(ref_cfg, timeout=600 + 120 * measured)
    faults = [f for f in res.summary["faults"] if f.get("round", 0) > 1]
    steps = samples // BATCH
    at_step = {boundary(at, steps): k for at, k in ((0.2, "reconnect"), (0.4, "elsewhere"), (0.8, "silent"))}
    down: dict[str, list[float]] = {"reconnect": [], "elsewhere": [], "silent": []}
    for f in faults:
        if f["process"] == "device1" and f["step"] in at_step:
            down[at_step[f["step"]]].append(f["down_s"] * 1000)
    detected = [f["detected_s"] for f in faults if f["kind"] == "peer_silent" and f["process"].startswith("edge")]
    planned = [mv["pause_ms"] for mv in res.summary["migrations"] if mv["round"] > 1]
    figures = {
        "down_ms": {k: benchlib.summarize(v) for k, v in down.items() if v},
        "planned_pause_ms": benchlib.summarize(planned),
        "detected_s": benchlib.summarize(detected) if detected else None,
        "dead_after_s": FAULTS["dead_after_s"],
        "identical_to_reference": res.summary["final_model_sha256"] == ref.summary["final_model_sha256"],
        "seconds": {"with_faults": res.summary["training_seconds"] if "training_seconds" in res.summary
                    else sum(r["seconds"] for r in res.summary["rounds"]),
                    "reference": sum(r["seconds"] for r in ref.summary["rounds"])},
        "faults_recorded": len(res.summary["faults"]),
        "run_dir": str(res.run_dir), "reference_dir": str(ref.run_dir),
    }
    return {"benchmark": "faults", "scale": scale, "config": describe(scale), "figures": figures}


def report(result: dict[str, Any]) -> str:
    f = result["figures"]
    names = {"reconnect": "drop, back on the same edge", "elsewhere": "drop, back on the other edge (pull)",
             "silent": f"{SILENT_S:g} s radio loss, back on the other edge"}
    rows = [[names[k], s["count"], s["median"], s["p95"], s["min"], s["max"]] for k, s in f["down_ms"].items()]
    p = f["planned_pause_ms"]
    rows.append(["planned move (same run)", p["count"], p["median"], p["p95"], p["min"], p["max"]])
    lines = ["device pause per event (ms):",
             benchlib.table(["event", "n", "median", "p95", "min", "max"], rows, floatfmt=".1f")]
    if f["detected_s"]:
        d = f["detected_s"]
        lines.append(f"silence noticed by the edge after {d['median']:.2f} s median (max {d['max']:.2f} s); "
                     f"faults.dead_after_s = {f['dead_after_s']:g} s")
    s = f["seconds"]
    lines.append(f"training time {s['with_faults']:.1f} s with faults, {s['reference']:.1f} s without; final model "
                 f"{'bit-identical to' if f['identical_to_reference'] else 'DIFFERENT from'} the run without faults")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(benchlib.standalone("faults", describe, run, report))

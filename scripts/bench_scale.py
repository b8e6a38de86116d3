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

    python -m scripts.bench_scale --fleet [--tiny | --quick | --full] [--sizes 8,32,128]

The fleet (issue 25 item 5): 8, 32 and 128 devices (``--tiny``: 8; ``--quick``: 8 and 32;
``--full``: all three; ``--sizes`` picks), 8 devices an edge, moving under the
random-waypoint model, TLS with a certificate per process, 3 rounds of 32 tiny samples
(8x8 images: the least compute that is still the split VGG-5). Each size runs with the
devices forked from one host (``central.launch --device-host``) and, where the estimate
says it fits, started one by one. Reported per run: the testbed's memory at its peak
(summed PSS, by role, and USS and RSS, from ``/proc/PID/smaps_rollup``), the machine's
used memory before and at the peak, the round times, and whether every move a device
made is in ``summary.json``'s migrations (the devices' ``moved`` events against them).
"""

from __future__ import annotations

import argparse
import json
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


# -- the fleet: a hundred devices on one machine ------------------------------------------

FLEET_SIZES = {"tiny": (8,), "quick": (8, 32), "full": (8, 32, 128)}
FLEET_PER_EDGE = 8
FLEET_ROUNDS, FLEET_SAMPLES, FLEET_BATCH, FLEET_IMAGE = 3, 32, 8, 8
# PSS of a forked device (it shares torch with its host) and of a started process of the
# fleet's tiny model: bounds above BENCHMARKS.md's figures, to decide which runs fit
# (the one with every role forked is always run).
EST_FORKED_MB = 150
EST_STARTED_MB = 350
# On 2 cores a hundred processes answer late: heartbeats and graces sized for that, so a
# slow peer is not taken for a dead one.
FLEET_FAULTS = {"heartbeat_s": 2.0, "dead_after_s": 120.0, "device_grace_s": 240.0, "central_grace_s": 600.0,
                "give_up_s": 1200.0}
_fleet: dict[str, tuple[int, ...]] = {"sizes": ()}  # --sizes


def fleet_options(p: argparse.ArgumentParser):
    p.add_argument("--fleet", action="store_true", help="the fleet: 8, 32, 128 devices with and without the host")
    p.add_argument("--sizes", default="", help="with --fleet: the device counts, e.g. 128 (default: the scale's)")

    def apply(args: argparse.Namespace) -> None:
        _fleet["sizes"] = tuple(int(x) for x in args.sizes.split(",") if x)
    return apply


def fleet_runs(scale: str) -> list[tuple[int, tuple[str, ...]]]:
    """(devices, roles forked from a host) of every run: each size with the devices and
    edges forked; with only the devices forked, and with every process started, where the
    estimates fit in the available memory."""
    avail = psutil.virtual_memory().available / 2**20
    out = []
    for n in _fleet["sizes"] or FLEET_SIZES[scale]:
        edges = max(2, n // FLEET_PER_EDGE)
        out.append((n, ("device", "edge")))
        if n * EST_FORKED_MB + (1 + edges) * EST_STARTED_MB + MEMORY_MARGIN_MB < avail:
            out.append((n, ("device",)))
        if (1 + n + edges) * EST_STARTED_MB + MEMORY_MARGIN_MB < avail:
            out.append((n, ()))
    return out


def _how(hosts: tuple[str, ...]) -> str:
    return "+".join(f"{r}s" for r in hosts) + " forked" if hosts else "started"


def describe_fleet(scale: str) -> dict[str, Any]:
    return {"runs": ", ".join(f"{n} devices, {_how(h)}" for n, h in fleet_runs(scale)),
            "edges": f"1 per {FLEET_PER_EDGE} devices (at least 2)", "mode": "fedfly", "security": "tls",
            "model": f"VGG-5 split {SPLIT}, {FLEET_IMAGE}x{FLEET_IMAGE} images", "rounds": FLEET_ROUNDS,
            "samples per device": FLEET_SAMPLES, "batch": FLEET_BATCH,
            "mobility": "waypoint: 100 m cells, 10 m/s, no pause", "malloc": "lean", "faults": FLEET_FAULTS, "threads": 1}


def moves_recorded(run_dir: Path, summary: dict) -> dict[str, int]:
    """The devices' ``moved`` and ``move_failed`` events, and the summary's migrations."""
    moved = failed = 0
    for path in run_dir.glob("events-device*.jsonl"):
        for line in path.read_text().splitlines():
            kind = json.loads(line).get("event")
            moved += kind == "moved"
            failed += kind == "move_failed"
    return {"moved": moved, "move_failed": failed, "migrations": len(summary.get("migrations", []))}


def run_fleet_one(out: Path, devices: int, hosts: tuple[str, ...]) -> dict[str, Any]:
    edges = max(2, devices // FLEET_PER_EDGE)
    name = f"fleet{devices}-{'-'.join(hosts) or 'started'}"
    cfg = benchlib.write_config(
        out, name, edges=edges, devices=devices, rounds=FLEET_ROUNDS, mode="fedfly",
        samples_per_device=FLEET_SAMPLES, batch_size=FLEET_BATCH, split_layer=SPLIT, test_samples=100,
        run_timeout=3600.0,
        extra={"run": {"startup_timeout": 1800.0}, "data": {"image_size": FLEET_IMAGE},
               # many processes on one machine: freed blocks go back to it (common/malloc.py)
               "training": {"malloc": "lean"},
               "security": {"mode": "tls", "certs": str(out / "certs"), "key_file": ""},
               "faults": FLEET_FAULTS, "mobility": {"model": "waypoint"},
               "mobility.waypoint": {"cell_m": 100.0, "speed_mps": 10.0}})
    load_before = [round(x, 2) for x in benchlib.os.getloadavg()]
    res = benchlib.launch(cfg, timeout=600 + 30 * devices * FLEET_ROUNDS, sample_memory=True,
                          args=tuple(f"--{role}-host" for role in hosts))
    s = res.summary or {}
    secs = [r["seconds"] for r in s.get("rounds", [])]
    return {"devices": devices, "edges": edges, "forked": list(hosts), "status": s.get("status", f"no summary "
            f"(launcher status {res.status})"), "wall_seconds": res.seconds, "round_seconds": secs,
            "round_median_s": statistics.median(secs[1:]) if len(secs) > 1 else None,
            "memory": s.get("bench_memory"), "load_before": load_before,
            "load_after": [round(x, 2) for x in benchlib.os.getloadavg()],
            "moves": moves_recorded(res.run_dir, s) if res.run_dir else None,
            "final_model_sha256": s.get("final_model_sha256"),
            "run_dir": str(res.run_dir) if res.run_dir else None, "output": str(res.output_path)}


def run_fleet(out: Path, scale: str) -> dict[str, Any]:
    runs = [run_fleet_one(out, n, hosts) for n, hosts in fleet_runs(scale)]
    return {"benchmark": "scale-fleet", "scale": scale, "config": describe_fleet(scale), "figures": {"runs": runs}}


def report_fleet(result: dict[str, Any]) -> str:
    """A row per run; "same model": its final model is the first run's of its size (the
    hosts change how processes start, never what they train)."""
    rows, first = [], {}
    for r in result["figures"]["runs"]:
        first.setdefault(r["devices"], r["final_model_sha256"])
        mem, mv = r["memory"] or {}, r["moves"] or {}
        roles = mem.get("pss_by_role_mb", {})
        rows.append([r["devices"], r["edges"], _how(tuple(r["forked"])), r["status"],
                     mem.get("pss_mb", 0) / 1024, roles.get("device", 0) / max(1, r["devices"]),
                     mem.get("uss_mb", 0) / 1024,
                     (mem.get("machine_used_mb", 0) - mem.get("machine_used_before_mb", 0)) / 1024,
                     r["round_median_s"] or float("nan"), r["wall_seconds"],
                     f"{mv.get('moved', 0)}/{mv.get('migrations', 0)}/{mv.get('move_failed', 0)}",
                     "yes" if r["final_model_sha256"] and r["final_model_sha256"] == first[r["devices"]] else "NO",
                     "/".join(str(x) for x in r["load_before"])])
    return benchlib.table(["devices", "edges", "processes", "status", "PSS GB", "device PSS MB", "USS GB",
                           "machine +GB", "round s", "wall s", "moved/recorded/failed", "same model", "load before"],
                          rows, floatfmt=".2f")


def main(argv: list[str] | None = None) -> int:
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--fleet", action="store_true")
    if probe.parse_known_args(argv)[0].fleet:
        return benchlib.standalone("scale", describe_fleet, run_fleet, report_fleet, argv, options=fleet_options)
    return benchlib.standalone("scale", describe, run, report, argv, options=fleet_options)


if __name__ == "__main__":
    sys.exit(main())

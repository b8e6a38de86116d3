"""Move-point sweep, the paper's headline: the moving device's round time when it moves at
10%, 20%, ... 90% of a round, in mode ``fedfly`` (its session migrates) and in mode
``restart`` (the SplitFed-style baseline: it starts the round over on the new edge).

    python -m scripts.bench_sweep [--quick | --full] [--out DIR] [--models-only]

Per data setting and repetition, one testbed run per mode (the modes alternate in time),
the same config otherwise (same seed, data, shards, schedule):

* round 1 is a warm-up with two moves (into each edge once: the first session an edge
  process builds pays one-off imports);
* then one round per move point ``f``, in a seeded shuffled order: the device moves just
  before step ``floor(f * S)`` to the edge it is not on;
* a last round without a move gives the round time ``T`` with no move.

Per point: the moving device's round time in both modes (its ``round_seconds``, the median
over repetitions), the saving ``1 - fedfly/restart`` and the ideal saving ``f/(1+f)`` with
the effective ``f``: the share of the device's samples trained before the move (equal to
the nominal ``f`` when ``S`` is a multiple of 10 and batches are whole). The paper
reports 33% at 50% and 45% at 90%.

Settings: ``balanced`` is one device alone (its time is not shared with other devices on
this 2-core machine, so the numbers are clean); ``imbalanced`` is four devices with
Dirichlet shards (alpha 0.5), the largest of them moving, all sharing the machine's cores.

Other models (``MODEL_RUNS``): the same sweep, one device alone, for ResNet-18 and
MobileNetV2 at two cuts each, on fewer points (``MODEL_POINTS``), smaller images and
batches (``MODEL_IMAGE``, ``MODEL_BATCH``: ResNet-18 on 32x32 batches of 100 takes seconds a
step on a CPU): does FedFly's saving hold for a deeper model, and how many bytes
does a migration move at each cut?
"""

from __future__ import annotations

import random
import statistics
import sys
from pathlib import Path
from typing import Any

from scripts import benchlib

POINTS = [k / 10 for k in range(1, 10)]
BATCH = 100
SPLIT = 3
WARMUP_MOVES = [0.3, 0.6]
# scale -> setting -> (devices, samples_per_device, repetitions of the 9 points)
SETTINGS = {
    "tiny": {"balanced": (1, 1000, 1)},
    "quick": {"balanced": (1, 2000, 3), "imbalanced": (4, 1500, 2)},
    "full": {"balanced": (1, 5000, 5), "imbalanced": (4, 5000, 3)},
}
MODES = ("fedfly", "restart")
# the other models: (model, cut) pairs per scale, an early and a late cut each
MODEL_RUNS = {
    "tiny": [("resnet18", 4), ("mobilenetv2", 9)],
    "quick": [("resnet18", 2), ("resnet18", 6), ("mobilenetv2", 3), ("mobilenetv2", 14)],
    "full": [("resnet18", 2), ("resnet18", 6), ("mobilenetv2", 3), ("mobilenetv2", 14)],
}
MODEL_POINTS = [0.3, 0.6, 0.9]
MODEL_IMAGE = 16                                                    # data.image_size
MODEL_BATCH = 20
MODEL_SAMPLES = {"tiny": (100, 1), "quick": (200, 1), "full": (1000, 3)}  # samples per device, repetitions


def describe(scale: str) -> dict[str, Any]:
    d: dict[str, Any] = {"model": f"VGG-5 split {SPLIT}", "batch": BATCH, "edges": 2, "modes": ", ".join(MODES),
                         "move points": ", ".join(f"{p:.0%}" for p in POINTS), "threads": 1, "dataset": "synthetic"}
    for name, (devices, samples, reps) in SETTINGS[scale].items():
        extra = "" if devices == 1 else " (Dirichlet alpha 0.5 over a pool of devices x samples; the largest moves)"
        d[name] = (f"{devices} device(s), {samples} samples per device{extra}; "
                   f"{reps} repetition(s) x 2 modes, each a testbed run of 1 warm-up round + {len(POINTS)} "
                   "rounds with one move (shuffled order) + 1 round without a move")
    runs = ", ".join(f"{m} cut {c}" for m, c in MODEL_RUNS[scale])
    samples, reps = MODEL_SAMPLES[scale]
    d["other models"] = (f"{runs}: 1 device, {samples} samples, batch {MODEL_BATCH}, {MODEL_IMAGE}x{MODEL_IMAGE} "
                         f"images, points {', '.join(f'{p:.0%}' for p in MODEL_POINTS)}, {reps} repetition(s)")
    return d


def _mover(devices: int, samples: int) -> tuple[str, int]:
    """(moving device, its sample count): the device with the largest shard."""
    if devices == 1:
        return benchlib.device_names(1)[0], samples
    from common.data import DataSpec, shard_sizes
    spec = DataSpec(dataset="synthetic", distribution="imbalanced", alpha=0.5, samples_per_device=samples, seed=1)
    sizes = shard_sizes(spec, devices=benchlib.device_names(devices))
    name = max(sizes, key=lambda d: (sizes[d], d))
    return name, sizes[name]


def schedule(rep: int, points: list[float] = POINTS) -> list[tuple[int, float | None]]:
    """(round, move point or None) of every measured round of repetition ``rep`` (round 1
    is the warm-up): the points in a seeded shuffled order, so that a burst of load from
    elsewhere on the machine lands on a different point in each repetition, then a round
    without a move."""
    order = list(points)
    random.Random(rep).shuffle(order)
    rounds: list[tuple[int, float | None]] = [(2 + i, f) for i, f in enumerate(order)]
    rounds.append((2 + len(order), None))
    return rounds


def effective_f(f: float, samples: int, batch: int = BATCH) -> float:
    """Share of the device's samples trained before the move at ``f``."""
    steps = -(-samples // batch)
    return min(int(f * steps) * batch, samples) / samples


def run_setting(out: Path, setting: str, devices: int, samples: int, reps: int, *, at: list[float] = POINTS,
                batch: int = BATCH, split: int = SPLIT, model: str = "vgg5", image_size: int = 0) -> dict[str, Any]:
    """Per repetition one testbed run per mode, the modes alternating in time so that
    changes in the machine's load fall on both alike."""
    mover, n = _mover(devices, samples)
    dist = "balanced" if devices == 1 else "imbalanced"
    first_edge = benchlib.edge_names(2)[benchlib.device_names(devices).index(mover) % 2]
    other = "edge2" if first_edge == "edge1" else "edge1"
    times: dict[str, dict[float, list[float]]] = {mode: {f: [] for f in at} for mode in MODES}
    no_move: dict[str, list[float]] = {mode: [] for mode in MODES}
    pauses: list[float] = []
    state_bytes: list[float] = []
    runs: list[dict[str, Any]] = []
    extra = {"model": {"name": model}, "data": {"image_size": image_size}}
    for rep in range(reps):
        rounds = schedule(rep, at)
        points = [(1, w) for w in WARMUP_MOVES] + [(r, f) for r, f in rounds if f is not None]
        moves = benchlib.ping_pong_moves(mover, (first_edge, other), first_edge, points)
        for mode in MODES:
            cfg = benchlib.write_config(out, f"sweep-{setting}-{mode}-{rep + 1}", edges=2, devices=devices,
                                        rounds=1 + len(rounds), mode=mode, moves=moves, samples_per_device=samples,
                                        batch_size=batch, split_layer=split, distribution=dist, test_samples=500,
                                        extra=extra)
            res = benchlib.launch_timed(cfg, timeout=900 + 60 * len(rounds))
            secs = res.summary["devices"][mover]["round_seconds"]
            for r, f in rounds:
                (times[mode][f] if f is not None else no_move[mode]).append(secs[r - 1])
            if mode == "fedfly":
                pauses += [mv["pause_ms"] for mv in res.summary["migrations"] if mv["round"] > 1]
                state_bytes += [mv["state_bytes"] for mv in res.summary["migrations"] if mv["round"] > 1]
            runs.append({"mode": mode, "repetition": rep + 1, "run_dir": str(res.run_dir),
                         "foreign_cpu_share": res.attempts,
                         "round_seconds": secs, "schedule": rounds,
                         "moves": [[mv["round"], mv["step"], mv["pause_ms"]] for mv in res.summary["migrations"]
                                   if mv["device"] == mover]})
    table = []
    for f in at:
        fed = statistics.median(times["fedfly"][f])
        rst = statistics.median(times["restart"][f])
        fe = effective_f(f, n, batch)
        saving = 1 - fed / rst
        ideal = fe / (1 + fe)
        table.append({"f": f, "f_effective": fe, "fedfly_s": fed, "restart_s": rst, "saving": saving,
                      "ideal": ideal, "gap_pp": (saving - ideal) * 100,
                      "fedfly_rounds_s": times["fedfly"][f], "restart_rounds_s": times["restart"][f]})
    return {
        "setting": setting, "devices": devices, "samples_per_device": samples, "repetitions": reps,
        "model": model, "split_layer": split, "image_size": image_size, "batch": batch,
        "mover": mover, "mover_samples": n, "steps": -(-n // batch),
        "no_move_round_s": {mode: statistics.median(no_move[mode]) for mode in MODES},
        "points": table,
        "max_gap_pp": max(abs(p["gap_pp"]) for p in table),
        "fedfly_pause_ms": benchlib.summarize(pauses),
        "state_bytes": benchlib.summarize(state_bytes),
        "foreign_cpu_share_max": max(r["foreign_cpu_share"][-1] for r in runs),
        "runs": runs,
    }


def run(out: Path, scale: str) -> dict[str, Any]:
    settings = {}
    for name, (devices, samples, reps) in SETTINGS[scale].items():
        settings[name] = run_setting(out, name, devices, samples, reps)
    return {"benchmark": "sweep", "scale": scale, "config": describe(scale), "figures": settings,
            "models": run_models(out, scale)}


def run_models(out: Path, scale: str) -> dict[str, Any]:
    """The sweep for the other models, one device alone, at two cuts each."""
    samples, reps = MODEL_SAMPLES[scale]
    return {f"{model}-cut{cut}": run_setting(out, f"{model}-cut{cut}", 1, samples, reps, at=MODEL_POINTS,
                                             batch=MODEL_BATCH, split=cut, model=model, image_size=MODEL_IMAGE)
            for model, cut in MODEL_RUNS[scale]}


def report(result: dict[str, Any]) -> str:
    lines = []
    for name, s in result["figures"].items():
        lines.append(f"sweep {name}: {s['mover']} moves ({s['mover_samples']} samples, {s['steps']} steps per round, "
                     f"{s['devices']} device(s), median of {s['repetitions']} round(s) per point); round without a "
                     f"move: fedfly {s['no_move_round_s']['fedfly']:.2f} s, "
                     f"restart {s['no_move_round_s']['restart']:.2f} s")
        rows = [[f"{p['f']:.0%}", f"{p['f_effective']:.3f}", p["fedfly_s"], p["restart_s"], f"{p['saving']:.1%}",
                 f"{p['ideal']:.1%}", f"{p['gap_pp']:+.1f}"] for p in s["points"]]
        lines.append(benchlib.table(["move at", "f eff", "fedfly s", "restart s", "saving", "ideal f/(1+f)", "gap pp"],
                                    rows, floatfmt=".2f"))
        fed = [x for p in s["points"] for x in p["fedfly_rounds_s"]]
        per_unit = [x / (1 + p["f_effective"]) for p in s["points"] for x in p["restart_rounds_s"]]
        if len(fed) > 1:
            lines.append(f"round-to-round variation of the mover's rounds: fedfly sd {statistics.stdev(fed):.2f} s "
                         f"({statistics.stdev(fed) / statistics.mean(fed):.1%} of {statistics.mean(fed):.2f} s); "
                         f"restart per (1+f) mean {statistics.mean(per_unit):.2f} s; "
                         f"no move {s['no_move_round_s']['fedfly']:.2f} s")
        lines.append(f"sweep {name}: largest gap to the ideal saving {s['max_gap_pp']:.1f} pp (goal <= 2 pp); "
                     f"saving at 50% {s['points'][4]['saving']:.1%} (paper 33%), at 90% {s['points'][8]['saving']:.1%} "
                     f"(paper 45%)")
    if result.get("models"):
        rows = []
        for name, s in result["models"].items():
            for p in s["points"]:
                rows.append([s["model"], s["split_layer"], f"{p['f']:.0%}", p["fedfly_s"], p["restart_s"],
                             f"{p['saving']:.1%}", f"{p['ideal']:.1%}", s["state_bytes"].get("median", 0) / 1e6,
                             s["fedfly_pause_ms"].get("median", 0.0)])
        lines.append(f"sweep, other models ({MODEL_IMAGE}x{MODEL_IMAGE} images, batch {MODEL_BATCH}, one device):")
        lines.append(benchlib.table(["model", "cut", "move at", "fedfly s", "restart s", "saving", "ideal f/(1+f)",
                                     "migration MB", "pause ms"], rows, floatfmt=".2f"))
    return "\n".join(lines)


def run_models_only(out: Path, scale: str) -> dict[str, Any]:
    return {"benchmark": "sweep", "scale": scale, "config": describe(scale), "figures": {},
            "models": run_models(out, scale)}


if __name__ == "__main__":
    # --models-only: just the other models' sweep (ResNet-18, MobileNetV2)
    only = "--models-only" in sys.argv
    argv = [a for a in sys.argv[1:] if a != "--models-only"]
    sys.exit(benchlib.standalone("sweep", describe, run_models_only if only else run, report, argv))

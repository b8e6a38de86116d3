"""What crash recovery costs and buys: buddy replication every K steps (issue 9).

    python -m scripts.bench_replication [--quick | --full] [--out DIR]

Cost. The same testbed (2 edges, 2 devices, one per edge, mode fedfly, VGG-5 split 3, 40
steps a round at the quick scale) with ``faults.checkpoint_steps`` K = 0 (off), 1, 5 and 10, the runs
interleaved (K0, K1, K5, K10, K0, ...) so that a change in the machine's load hits every
K alike. Training time is the central's round seconds after round 1 (a warm-up); the
slowdown of K is its median over the median of K = 0.

Recovery. With K = 5, the roles started one by one; the edge of device2 is killed
(SIGKILL) in the middle of round 2. From ``summary.json``: the device's pause (kill ->
training going on, ``down_s``), the steps it trained again (``replayed``), and from the
event logs the time from the kill to the buddy installing its copy. The final model is
compared with the same run without the kill.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common.security import CONTROLLER
from scripts import benchlib

KS = (0, 1, 5, 10)
# scale -> (samples per device, measured rounds, repetitions per K)
SCALES = {"tiny": (200, 1, 1), "quick": (2000, 3, 3), "full": (4000, 6, 5)}
BATCH = 50
FAULTS = {"heartbeat_s": 0.5, "dead_after_s": 2.0, "device_grace_s": 20.0}


def describe(scale: str) -> dict[str, Any]:
    samples, measured, reps = SCALES[scale]
    return {"testbed": "1 central, 2 edges, 2 devices (one per edge) on loopback; mode fedfly",
            "model": "VGG-5 split 3", "steps per round": samples // BATCH, "rounds": f"1 warm-up + {measured}",
            "K (faults.checkpoint_steps)": list(KS), "repetitions per K": reps,
            "recovery": "K = 5, edge2 SIGKILLed mid-round 2"}


def _config(out: Path, name: str, k: int, samples: int, rounds: int) -> Path:
    return benchlib.write_config(out, name, edges=2, devices=2, rounds=rounds, mode="fedfly",
                                 samples_per_device=samples, batch_size=BATCH, test_samples=500,
                                 extra={"faults": {**FAULTS, "checkpoint_steps": k}})


def _train_seconds(summary: dict) -> float:
    return sum(r["seconds"] for r in summary["rounds"] if r["round"] > 1)


def recovery(out: Path, samples: int, rounds: int) -> dict[str, Any]:
    """Start the roles one by one, kill edge2 mid-round 2, wait for the run to end."""
    from central.mobility import status
    from common.config import load_config
    cfg_path = _config(out, "recovery", 5, samples, rounds)
    cfg = load_config(str(cfg_path))
    creds = cfg.credentials(CONTROLLER)
    logs = out / "recovery-logs"
    logs.mkdir(exist_ok=True)
    procs: dict[str, subprocess.Popen] = {}

    def start(role: str, name: str) -> None:
        cmd = [sys.executable, "-m", role, "--config", str(cfg_path)] + ([] if role == "central" else ["--name", name])
        with open(logs / f"{name}.log", "wb") as log:
            procs[name] = subprocess.Popen(cmd, cwd=benchlib.ROOT, env=benchlib._env(), stdout=log,
                                           stderr=subprocess.STDOUT)
    killed_at = 0.0
    try:
        start("central", "central")
        for e in sorted(cfg.edges):
            start("edge", e)
        for d in cfg.device_names:
            start("device", d)
        deadline = time.monotonic() + 600
        while True:
            assert time.monotonic() < deadline and procs["central"].poll() is None, "the run ended too soon"
            try:
                st = status(cfg, "device2", creds=creds)
                if st.round == 2 and st.steps and st.step >= st.steps // 2 + 2:  # between two copies
                    break
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.05)
        killed_at = time.time()
        os.kill(procs["edge2"].pid, signal.SIGKILL)
        procs["central"].wait(timeout=600)
    finally:
        for p in procs.values():
            if p.poll() is None:
                benchlib.kill_tree(p.pid)
                p.wait()
    run_dir = Path(cfg.run.out) / "recovery"
    summary = json.loads((run_dir / "summary.json").read_text())
    dev = [f for f in summary["faults"] if f["process"] == "device2"]
    installed = [json.loads(line) for line in (run_dir / "events-edge1.jsonl").read_text().splitlines()
                 if '"replica_installed"' in line]
    return {"status": summary["status"], "final_model_sha256": summary["final_model_sha256"],
            "device_down_s": dev[0]["down_s"] if dev else None, "replayed": dev[0]["replayed"] if dev else None,
            "recovery": dev[0]["recovery"] if dev else None,
            "kill_to_replica_installed_s": round(installed[0]["ts"] - killed_at, 3) if installed else None,
            "run_dir": str(run_dir)}


def run(out: Path, scale: str) -> dict[str, Any]:
    samples, measured, reps = SCALES[scale]
    rounds = 1 + measured
    seconds: dict[int, list[float]] = {k: [] for k in KS}
    hashes: dict[int, set[str]] = {k: set() for k in KS}
    shares: list[float] = []
    for rep in range(reps):
        for k in KS:
            res = benchlib.launch_ok(_config(out, f"k{k}-{rep + 1}", k, samples, rounds), timeout=1200)
            seconds[k].append(_train_seconds(res.summary))
            hashes[k].add(res.summary["final_model_sha256"])
            shares.append(round(res.foreign_share, 3))
    base = statistics.median(seconds[0])
    rec = recovery(out, samples, rounds)
    every = set().union(*hashes.values())
    figures = {
        "train_seconds": {str(k): v for k, v in seconds.items()},
        "slowdown": {str(k): statistics.median(seconds[k]) / base - 1 for k in KS if k},
        "identical_across_k": len(every) == 1,
        "recovery": rec,
        "recovery_identical": rec["final_model_sha256"] in every,
        "foreign_cpu_share": shares,
    }
    return {"benchmark": "replication", "scale": scale, "config": describe(scale), "figures": figures}


def report(result: dict[str, Any]) -> str:
    f = result["figures"]
    rows = [[k, len(v), statistics.median(v), (f["slowdown"].get(k, 0.0)) * 100] for k, v in f["train_seconds"].items()]
    lines = ["training time after the warm-up round, by faults.checkpoint_steps K:",
             benchlib.table(["K", "runs", "median s", "slowdown %"], rows, floatfmt=".2f"),
             f"final model the same for every K: {f['identical_across_k']}"]
    r = f["recovery"]
    lines.append(f"edge killed mid-round (K = 5): run {r['status']}, device back after {r['device_down_s']} s, "
                 f"{r['replayed']} steps trained again ({r['recovery']}), the buddy's copy installed "
                 f"{r['kill_to_replica_installed_s']} s after the kill; final model "
                 f"{'bit-identical to' if f['recovery_identical'] else 'DIFFERENT from'} the runs without the kill")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(benchlib.standalone("replication", describe, run, report))

"""Offer against pull when the device's radio is slower than the edges' backhaul.

    python -m scripts.bench_offer [--rtt-ms 0,10] [--backhaul-mbit 0,1000] [--security key,tls]
        [--rounds N] [--repeat N] [--out DIR]

One device and two edges on loopback, mode fedfly, VGG-5 split 3, batch 100, 2,000
synthetic samples: the ping-pong of ``scripts.bench_migration`` (a warm-up round with two
moves, then 9 moves per measured round). The device reaches each edge through a proxy of
our own that holds every byte RTT/2 each way (``tests.faultproxy --delay-ms``: a radio's
round trip; ``netem`` is not available here), while the edges reach each other directly
(a wired backhaul), or through a proxy that passes at most ``--backhaul-mbit`` (0: no
limit; a 4.5 MB session takes 36 ms at 1000 Mbit/s). Each combination runs twice, one
right after the other: with ``mobility.offer = false`` (the destination pulls the session
once the device attached) and with ``mobility.offer`` (the default: the source sends it as
the device leaves, while the device connects). Reported: the pause medians (the device's view) and offer / pull.

The roles are started one by one (a central, two edges, the proxies, the device, which
alone is told the proxies' ports), and stopped by their PIDs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from scripts import bench_migration, benchlib

BATCH, SPLIT, SAMPLES = 100, 3, 2000


def _config(out: Path, name: str, security: str, offer: bool, rounds: int) -> Path:
    extra: dict[str, dict[str, Any]] = {"mobility": {"offer": offer}}
    extra["security"] = {"mode": "tls", "certs": str(out / "certs")} if security == "tls" else {"mode": "key"}
    return benchlib.write_config(out, name, edges=2, devices=1, rounds=1 + rounds, mode="fedfly",
                                 moves=bench_migration.plan(rounds), samples_per_device=SAMPLES, batch_size=BATCH,
                                 split_layer=SPLIT, test_samples=200, device_edges={"device1": "edge1"},
                                 extra=extra)


def run_one(cfg_path: Path, rtt_ms: float, backhaul_mbit: float, timeout: float) -> dict[str, Any]:
    """Start every role of ``cfg_path`` one by one, the device through delaying proxies
    (and the edges to each other through rate-limiting ones); wait for the central; stop
    all by PID. The summary's measured migrations."""
    from common import pki
    from common.config import load_config

    cfg = load_config(str(cfg_path))
    if cfg.security.mode == "tls":
        pki.ensure(cfg)
    root, env = benchlib.ROOT, benchlib._env()
    logs = cfg_path.parent / f"{cfg_path.stem}-logs"
    logs.mkdir(exist_ok=True)
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, cmd: list[str]) -> None:
        with open(logs / f"{name}.log", "wb") as log:
            procs[name] = subprocess.Popen([sys.executable, "-m", *cmd], cwd=root, env=env, stdout=log,
                                           stderr=subprocess.STDOUT)

    base = ["--config", str(cfg_path)]
    via: list[str] = []
    try:
        start("central", ["central", *base])
        backhaul: dict[str, int] = {}  # edge -> the port of the proxy the other edges reach it through
        if backhaul_mbit > 0:
            ports = benchlib.free_ports(len(cfg.edges))
            for port, (e, ep) in zip(ports, sorted(cfg.edges.items())):
                start(f"backhaul-{e}", ["tests.faultproxy", "--listen", str(port), "--to", f"{ep.host}:{ep.port}",
                                        "--rate-mbit", str(backhaul_mbit), "--lifetime", str(timeout + 60)])
                backhaul[e] = port
        for e in sorted(cfg.edges):
            peers = [x for other, port in backhaul.items() if other != e
                     for x in ("--set", f"edges.{other}.port={port}")]
            start(e, ["edge", *base, "--name", e, *peers])
        if rtt_ms > 0:
            ports = benchlib.free_ports(len(cfg.edges))
            for port, (e, ep) in zip(ports, sorted(cfg.edges.items())):
                start(f"proxy-{e}", ["tests.faultproxy", "--listen", str(port), "--to", f"{ep.host}:{ep.port}",
                                     "--delay-ms", str(rtt_ms / 2), "--lifetime", str(timeout + 60)])
                via += ["--set", f"edges.{e}.port={port}"]
        start("device1", ["device", *base, "--name", "device1", *via])
        try:
            status = procs["central"].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"bench_offer: {cfg_path.stem} did not finish within {timeout:.0f} s; logs in {logs}")
        if status != 0:
            raise SystemExit(f"bench_offer: the central of {cfg_path.stem} exited {status}; logs in {logs}")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 10
        for p in procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                benchlib.kill_tree(p.pid)
                p.wait()
    (summary,) = list(Path(cfg.run.out).glob(f"*{cfg_path.stem}*/summary.json"))
    data = json.loads(summary.read_text())
    migs = [mv for mv in data["migrations"] if mv["round"] > 1]
    offered = 0
    for f in summary.parent.glob("events-edge*.jsonl"):
        offered += sum(1 for line in f.read_text().splitlines() if '"migrated_in"' in line
                       and '"offered": true' in line and '"round": 1,' not in line)
    return {"moves": len(migs), "pause_ms": benchlib.summarize([mv["pause_ms"] for mv in migs]),
            "final_model_sha256": data["final_model_sha256"], "offered": offered, "run_dir": str(summary.parent)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts.bench_offer", description=__doc__.splitlines()[0])
    p.add_argument("--rtt-ms", default="0,10", help="the device's round trips to try, comma-separated")
    p.add_argument("--backhaul-mbit", default="0", help="the edges' link rates to try (0: no limit)")
    p.add_argument("--security", default="key")
    p.add_argument("--rounds", type=int, default=2, help="measured rounds per run (9 moves each)")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    out = benchlib.out_dir(args.out) / "offer"
    rtts = [float(x) for x in args.rtt_ms.split(",")]
    backhauls = [float(x) for x in args.backhaul_mbit.split(",")]
    combos = [(rtt, bh) for rtt in rtts for bh in backhauls]
    securities = args.security.split(",")
    benchlib.print_config("offer", {"testbed": "1 central, 2 edges, 1 device on loopback; mode fedfly",
                                    "device link": "through a proxy holding RTT/2 each way; edges direct",
                                    "model": f"VGG-5 split {SPLIT}", "batch": BATCH, "samples": SAMPLES,
                                    "moves": f"9 per measured round, {args.rounds} measured rounds",
                                    "rtt_ms": rtts, "backhaul_mbit": backhauls, "security": securities, "repeat": args.repeat})
    runs: list[dict[str, Any]] = []
    for rep in range(args.repeat):
        for rtt, bh in combos:
            for security in securities:
                pair = {}
                for offer in (False, True):
                    name = f"rtt{rtt:g}-bh{bh:g}-{security}-{'offer' if offer else 'pull'}-r{rep}"
                    cfg = _config(out, name, security, offer, args.rounds)
                    with benchlib.ForeignLoad() as fl:
                        res = run_one(cfg, rtt, bh, timeout=300 + 200 * args.rounds)
                    res.update(rtt_ms=rtt, backhaul_mbit=bh, security=security, offer=offer, repeat=rep,
                               foreign_cpu_share=round(fl.share, 3))
                    runs.append(res)
                    pair[offer] = res
                    print(f"   rtt {rtt:4g} ms backhaul {bh:5g} Mbit {security:3} {'offer' if offer else 'pull ':5} pause median "
                          f"{res['pause_ms']['median']:7.2f} ms (p95 {res['pause_ms']['p95']:7.2f}), "
                          f"{res['offered']}/{res['moves']} offered; others took {fl.share:.0%}", flush=True)
                if pair[False]["final_model_sha256"] != pair[True]["final_model_sha256"]:
                    raise SystemExit("bench_offer: offer and pull ended with different models")
    rows = []
    for rtt, bh in combos:
        for security in securities:
            med = {o: statistics.median(r["pause_ms"]["median"] for r in runs
                                        if (r["rtt_ms"], r["backhaul_mbit"], r["security"], r["offer"]) == (rtt, bh, security, o))
                   for o in (False, True)}
            rows.append([rtt, bh, security, med[False], med[True], med[True] / med[False]])
    print(benchlib.table(["device RTT ms", "backhaul Mbit/s", "security", "pull pause", "offer pause", "offer / pull"],
                         rows, floatfmt=".2f"))
    benchlib.write_json(out / "offer.json", {"benchmark": "offer", "runs": runs, "machine": benchlib.machine()})
    return 0


if __name__ == "__main__":
    sys.exit(main())

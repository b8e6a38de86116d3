"""Migration overhead: pause, bytes and edge-to-edge transfer time per migration, next to
the time a plain socket takes to move the same bytes on the same link in the same run.

    python -m scripts.bench_migration [--quick | --full] [--out DIR]

One device and two edges on loopback, mode fedfly, VGG-5 split 3, batch 100. Round 1 is a
warm-up with two moves (one into each edge, so both edges have built a session once:
the first session an edge process builds pays one-off imports, reported apart). Every
later round the device ping-pongs between the edges at 10%, 20%, ... 90% of the round.
From ``summary.json``: per migration ``pause_ms`` (the device's view: leaving the source
to the destination's go-ahead), ``transfer_ms`` (the destination's pull: connect, request,
snapshot, verify, install, release) and ``state_bytes``. Then ``scripts.bench_plainsock``
moves the median ``state_bytes`` over loopback, on an open connection and on a fresh one.

Last, the pull's critical path in one process, piece by piece (snapshot with checksum at
the source, framing, verify and rebuild at the destination), to say what bounds the pause.

    python -m scripts.bench_migration --matrix [--scenarios alone,pair,four]
        [--security key,tls] [--moves break,pull,preconnect,relay,restart] [--rounds N] [--repeat N]
        [--network loopback,netns] [--backhaul-mbit M[,M...]] [--out DIR]

The matrix: the same ping-pong of device1 in every combination of the load on the
machine (``alone``: 1 device; ``pair``: device2 trains on edge2 all along, five processes
on two cores; ``four``: 4 devices on 2 edges), the security mode (``key``: a MAC on every
record; ``tls``) and the move mode (``break``: break-before-make, the default, where the
source offers the session to the destination when the device announces the move, a step
ahead, ``mobility.offer``;
``pull``: the same with ``mobility.offer = false``, the destination pulls it once the
device attached; ``preconnect``: ``mobility.preconnect``; ``relay``: ``mobility.handover =
"relay"``, nothing moves, the new edge forwards every later step to the session's edge;
``restart``: ``run.mode = "restart"``, the round again from its weights on the new edge),
the runs interleaved (``--repeat`` passes over
the matrix), with the plain socket measured between them. Per combination: the pause,
the pull (for an offered session: from its notice until it was verified and rebuilt,
which with an announced move is before the device arrives), the first step after each move against the median step of device1 (its
``round_done`` events' ``step_ms``), and the median step from a round's first move to its
end against the median step before it, and the median step on the edge the round began on
(``home``: a relayed session's edge) against the one on the other edge (``away``), neither
the first after a move: a relay's cost per step is away - home. Every run records the share of the CPUs others
took; nothing is re-run (the machine's load is reported, not waited out). ``--baseline
DIR`` (another checkout, e.g. ``git worktree add DIR main``) runs every break-before-make
combination from that code too, right after the same one from this code.

``--network``: ``loopback`` (the default), ``netns`` (every combination again inside the
netns testbed, ``scripts.netns_bench``: each host in its own network namespace, the
edges' uplinks shaped with ``tc tbf`` at each ``--backhaul-mbit`` rate, the devices' and
the central's links unshaped; needs root), or both, a combination's networks one after
the other. Behind a shaped backhaul a pull pays the session's bytes at the backhaul's
rate during the pause, and a relay pays a step's activations and gradient twice per step.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from scripts import bench_plainsock, benchlib, netns_bench

# scale -> (samples per device, measured rounds); 9 moves per measured round.
SCALES = {"tiny": (1000, 1), "quick": (2000, 4), "full": (5000, 12)}
POINTS = [k / 10 for k in range(1, 10)]
PLAIN_REPEATS = {"tiny": 10, "quick": 50, "full": 200}
BATCH = 100
SPLIT = 3
WARMUP_MOVES = [(1, 0.3), (1, 0.6)]


def describe(scale: str) -> dict[str, Any]:
    samples, measured = SCALES[scale]
    return {"testbed": "1 central, 2 edges, 1 device on loopback; mode fedfly", "model": f"VGG-5 split {SPLIT}",
            "batch": BATCH, "steps per round": samples // BATCH, "rounds": f"1 warm-up (2 moves) + {measured}",
            "moves": f"{len(POINTS)} per measured round at {POINTS[0]:.0%}..{POINTS[-1]:.0%} = "
                     f"{len(POINTS) * measured}",
            "plain-socket repeats": PLAIN_REPEATS[scale], "threads": 1}


def plan(measured: int) -> list[dict]:
    points = WARMUP_MOVES + [(r, at) for r in range(2, 2 + measured) for at in POINTS]
    return benchlib.ping_pong_moves("device1", ("edge1", "edge2"), "edge1", points)


def run(out: Path, scale: str) -> dict[str, Any]:
    samples, measured = SCALES[scale]
    cfg = benchlib.write_config(out, "migration", edges=2, devices=1, rounds=1 + measured, mode="fedfly",
                                moves=plan(measured), samples_per_device=samples, batch_size=BATCH,
                                split_layer=SPLIT, test_samples=500)
    res = benchlib.launch_timed(cfg, timeout=600 + 120 * measured)
    migs = res.summary["migrations"]
    warm = [mv for mv in migs if mv["round"] == 1]
    moves = [mv for mv in migs if mv["round"] > 1]
    state_bytes = int(statistics.median(mv["state_bytes"] for mv in moves))
    plain, plain_shares = benchlib.quietly(lambda _: bench_plainsock.measure(state_bytes, PLAIN_REPEATS[scale]),
                                           what="plain socket")
    pause = benchlib.summarize([mv["pause_ms"] for mv in moves])
    transfer = benchlib.summarize([mv["transfer_ms"] for mv in moves])
    figures = {
        "moves": len(moves),
        "pause_ms": pause,
        "transfer_ms": transfer,
        "state_bytes": benchlib.summarize([mv["state_bytes"] for mv in moves]),
        "plain_transfer_ms": plain["transfer"],
        "plain_connect_transfer_ms": plain["connect_transfer"],
        "pause_over_plain": pause["median"] / plain["transfer"]["median"],
        "pause_over_plain_connect": pause["median"] / plain["connect_transfer"]["median"],
        "warmup_moves": [{k: mv[k] for k in ("from", "to", "step", "pause_ms", "transfer_ms")} for mv in warm],
        "breakdown_ms": breakdown(20 if scale != "tiny" else 3),
        "run_dir": str(res.run_dir),
        "foreign_cpu_share": {"testbed": res.attempts, "plain_socket": plain_shares},
    }
    return {"benchmark": "migration", "scale": scale, "config": describe(scale), "figures": figures,
            "migrations": migs, "load_after": benchlib.machine()["loadavg"]}


def breakdown(repeats: int) -> dict[str, float]:
    """Median ms of each piece of a pull's critical path, in this process."""
    import hashlib

    from common import codec
    from common.training import make_optimizer, set_threads
    from common.transport import RECV_CHUNK
    from edge.checksum import snapshot_checksum
    from edge.session import EdgeSession
    from scripts.bench_codec import snapshot_message

    import torch

    set_threads(1)
    make_optimizer([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.0)  # one-off imports
    msg = snapshot_message()
    frame = codec.encode_bytes(msg)

    def decode():
        dec = codec.FrameDecoder()
        view = memoryview(frame)
        for i in range(0, len(frame), RECV_CHUNK):
            dec.receive_data(view[i:i + RECV_CHUNK])
        return dec.next_message()

    got = decode()
    blob = bytes(len(frame))
    pieces = {
        "source: snapshot_checksum (as the edge computes it)": lambda: snapshot_checksum(msg.meta, msg.state),
        "frame: encode": lambda: codec.encode(msg),
        "frame: decode (1 MiB chunks)": decode,
        "destination: EdgeSession.from_snapshot (verify checksum, rebuild)":
            lambda: EdgeSession.from_snapshot(got.meta, got.state, got.checksum, expect_model="vgg5",
                                              expect_split=SPLIT),
        "reference: one hashlib.sha256 over the frame's bytes": lambda: hashlib.sha256(blob).digest(),
        "reference: zlib.crc32 over the frame's bytes": lambda: __import__("zlib").crc32(blob),
        "reference: common.digest (Poly1305) over the frame's bytes": lambda: __import__("common.digest").digest.of(blob),
    }
    result = {}
    for name, fn in pieces.items():
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
        result[name] = statistics.median(times)
    return result


SCENARIOS = {"alone": 1, "pair": 2, "four": 4}


def _matrix_config(out: Path, scenario: str, security: str, move: str, rounds: int, tag: str) -> Path:
    devices = SCENARIOS[scenario]
    placement = {"device1": "edge1", "device2": "edge2", "device3": "edge1", "device4": "edge2"}
    # mobility.preconnect and .offer only when not the default, so that the matrix also runs
    # on code without them
    extra: dict[str, dict[str, Any]] = {"mobility": {"preconnect": True}} if move == "preconnect" else \
        {"mobility": {"offer": False}} if move == "pull" else \
        {"mobility": {"handover": "relay"}} if move == "relay" else {}
    if security == "tls":
        extra["security"] = {"mode": "tls", "certs": str(out / "certs")}
    else:
        extra["security"] = {"mode": "key"}
    return benchlib.write_config(out, f"{scenario}-{security}-{move}-{tag}", edges=2, devices=devices,
                                 rounds=1 + rounds, mode="restart" if move == "restart" else "fedfly",
                                 moves=plan(rounds), samples_per_device=2000,
                                 batch_size=BATCH, split_layer=SPLIT, test_samples=200,
                                 device_edges={d: placement[d] for d in benchlib.device_names(devices)}, extra=extra)


def _step_figures(run_dir: Path, moves: list[dict]) -> dict[str, Any]:
    """device1's step times: the first step after each measured move, and every other step
    of the measured rounds (its ``round_done`` events)."""
    import json
    steps: dict[int, list] = {}
    for line in (run_dir / "events-device1.jsonl").read_text().splitlines():
        ev = json.loads(line)
        if ev.get("event") == "round_done" and ev.get("step_ms") and ev.get("round", 0) > 1:
            steps[ev["round"]] = ev["step_ms"]
    after = {(mv["round"], mv["step"]) for mv in moves}
    first = [steps[r][s] for r, s in sorted(after) if r in steps and s < len(steps[r]) and steps[r][s] is not None]
    other = [ms for r, row in steps.items() for s, ms in enumerate(row) if ms is not None and (r, s) not in after]
    # a round's steps before its first move, and from it on (not the first after each move)
    moved_at = {r: min(s for rr, s in after if rr == r) for r, _ in after}
    before = [ms for r, row in steps.items() for s, ms in enumerate(row)
              if ms is not None and s < moved_at.get(r, len(row))]
    since = [ms for r, row in steps.items() for s, ms in enumerate(row)
             if ms is not None and s >= moved_at.get(r, len(row)) and (r, s) not in after]
    # steps on the edge a round began on (a relayed session's edge) and on the other one,
    # neither the first after a move: a relay's cost per step is away - home
    home, away = [], []
    for r, row in steps.items():
        here = sorted((mv["step"], mv) for mv in moves if mv["round"] == r)
        for s, ms in enumerate(row):
            if ms is None or (r, s) in after or not here:
                continue
            edge = next((mv["to"] for st, mv in reversed(here) if st <= s), here[0][1]["from"])
            (home if edge == here[0][1]["from"] else away).append(ms)
    return {"first_step_ms": benchlib.summarize(first) if first else None,
            "home_step_ms": benchlib.summarize(home) if home else None,
            "away_step_ms": benchlib.summarize(away) if away else None,
            "other_step_ms": benchlib.summarize(other) if other else None,
            "before_move_step_ms": benchlib.summarize(before) if before else None,
            "after_move_step_ms": benchlib.summarize(since) if since else None}


def _networks(names: list[str], backhaul_mbit: list[float]) -> list[tuple[str, float]]:
    """(label, backhaul Mbit/s; 0 for loopback) for each network asked for."""
    unknown = set(names) - {"loopback", "netns"}
    if unknown:
        raise SystemExit(f"bench_migration: --network {','.join(sorted(unknown))}: use loopback and/or netns")
    return [(n, 0.0) for n in names if n == "loopback"] + \
           [(f"netns {m:g} Mbit", m) for n in names if n == "netns" for m in backhaul_mbit]


def _launch(cfg: Path, mbit: float, timeout: float, code: Path | None) -> benchlib.RunOutcome:
    if mbit:
        return netns_bench.launch(cfg, mbit, timeout=timeout)
    return benchlib.launch_ok(cfg, timeout=timeout, code=code)


def run_matrix(out: Path, *, scenarios: list[str], securities: list[str], moves: list[str], rounds: int,
               repeat: int, baseline: Path | None = None,
               networks: list[tuple[str, float]] = (("loopback", 0.0),)) -> dict[str, Any]:
    from common import pki
    from common.config import load_config

    results: list[dict[str, Any]] = []
    plains: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for rep in range(repeat):
        for scenario in scenarios:
            for security in securities:
                for move, code, (network, mbit) in [
                        (mv, c, nw) for mv in moves for nw in networks
                        for c in ([None] if baseline is None or mv != "break" or nw[1] else [None, baseline])]:
                    tag = f"r{rep}" + ("-baseline" if code is not None else "") + (f"-netns{mbit:g}" if mbit else "")
                    cfg = _matrix_config(out, scenario, security, move, rounds, tag)
                    if security == "tls":
                        pki.ensure(load_config(str(cfg)))
                    load0 = os.getloadavg()[0]
                    try:
                        with benchlib.ForeignLoad() as fl:
                            res = _launch(cfg, mbit, 300 + 120 * rounds * SCENARIOS[scenario], code)
                    except benchlib.RunFailed as exc:  # reported, and the matrix goes on
                        failed.append({"run": cfg.stem, "network": network, "error": str(exc).splitlines()[0]})
                        print(f"   {network:16} {scenario:5} {security:3} {move:15} FAILED: {failed[-1]['error']}",
                              flush=True)
                        continue
                    migs = [mv for mv in res.summary["migrations"] if mv["round"] > 1]
                    move = move if code is None else "break, baseline"
                    row = {"network": network, "scenario": scenario, "security": security, "move": move, "repeat": rep,
                           "moves": len(migs), "pause_ms": benchlib.summarize([mv["pause_ms"] for mv in migs]),
                           "transfer_ms": benchlib.summarize([mv["transfer_ms"] for mv in migs]),
                           "state_bytes": int(statistics.median(mv["state_bytes"] for mv in migs)),
                           **_step_figures(res.run_dir, migs), "foreign_cpu_share": round(fl.share, 3),
                           "loadavg_before": load0, "run_dir": str(res.run_dir)}
                    results.append(row)
                    print(f"   {network:16} {scenario:5} {security:3} {move:15} pause median {row['pause_ms']['median']:6.2f} ms "
                          f"(p95 {row['pause_ms']['p95']:6.2f}), first step {_med(row['first_step_ms'])} vs "
                          f"{_med(row['other_step_ms'])} ms, steps before/after a round's first move "
                          f"{_med(row['before_move_step_ms'])}/{_med(row['after_move_step_ms'])} ms; "
                          f"others took {fl.share:.0%}, load {load0:.1f}", flush=True)
                    if scenario == "alone" and code is None and row["state_bytes"] and not mbit:  # relay, restart: none moved
                        with benchlib.ForeignLoad() as fl:
                            plain = bench_plainsock.measure(row["state_bytes"], 50)
                        plains.append({"after": f"{scenario}-{security}-{move}-r{rep}", **plain,
                                       "foreign_cpu_share": round(fl.share, 3)})
                    benchlib.write_json(out / "runs-so-far.json", {"runs": results, "plain": plains, "failed": failed})
    return {"benchmark": "migration-matrix", "runs": results, "plain": plains, "failed": failed,
            "machine": benchlib.machine()}


def _med(s: dict | None) -> str:
    return "-" if not s else f"{s['median']:.1f}"


def report_matrix(result: dict[str, Any]) -> str:
    """One row per combination: medians over the repeats' medians."""
    plain = statistics.median(p["transfer"]["median"] for p in result["plain"]) if result["plain"] else float("nan")
    groups: dict[tuple, list[dict]] = {}
    for row in result["runs"]:
        groups.setdefault((row.get("network", "loopback"), row["scenario"], row["security"], row["move"]), []).append(row)
    rows = []
    for (network, scenario, security, move), rs in groups.items():
        pause = statistics.median(r["pause_ms"]["median"] for r in rs)
        p95 = statistics.median(r["pause_ms"]["p95"] for r in rs)
        pull = statistics.median(r["transfer_ms"]["median"] for r in rs)
        first = [r["first_step_ms"]["median"] for r in rs if r["first_step_ms"]]
        other = [r["other_step_ms"]["median"] for r in rs if r["other_step_ms"]]
        before = [r["before_move_step_ms"]["median"] for r in rs if r.get("before_move_step_ms")]
        since = [r["after_move_step_ms"]["median"] for r in rs if r.get("after_move_step_ms")]
        home = [r["home_step_ms"]["median"] for r in rs if r.get("home_step_ms")]
        away = [r["away_step_ms"]["median"] for r in rs if r.get("away_step_ms")]
        rows.append([network, scenario, security, move, sum(r["moves"] for r in rs), pause, p95, pull,
                     pause / plain if scenario == "alone" and network == "loopback" else float("nan"),
                     statistics.median(first) if first else float("nan"),
                     statistics.median(other) if other else float("nan"),
                     statistics.median(before) if before else float("nan"),
                     statistics.median(since) if since else float("nan"),
                     statistics.median(home) if home else float("nan"),
                     statistics.median(away) if away else float("nan"),
                     "/".join(f"{r['foreign_cpu_share']:.0%}" for r in rs),
                     "/".join(f"{r['loadavg_before']:.1f}" for r in rs)])
    head = ["network", "scenario", "security", "move", "n", "pause med", "pause p95", "pull med", "x plain", "1st step",
            "med step", "step before", "step after", "step home", "step away", "others' CPU", "load"]
    return "\n".join([benchlib.table(head, rows, floatfmt=".2f"),
                      *[f"FAILED (not in the table): {f['run']}: {f['error']}" for f in result.get("failed", [])],
                      f"plain socket, open connection, same bytes: median {plain:.3f} ms "
                      f"({len(result['plain'])} measurements of 50)"])


def matrix_main(argv: list[str]) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="scripts.bench_migration --matrix")
    p.add_argument("--matrix", action="store_true")
    p.add_argument("--scenarios", default="alone,pair,four")
    p.add_argument("--security", default="key,tls")
    p.add_argument("--moves", default="break,pull,preconnect,relay,restart")
    p.add_argument("--rounds", type=int, default=2, help="measured rounds per run (9 moves each)")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--baseline", default=None, metavar="DIR",
                   help="another checkout of the project: each break-before-make run again from its code, beside")
    p.add_argument("--network", default="loopback", help="loopback and/or netns (root: the netns testbed)")
    p.add_argument("--backhaul-mbit", default="100", help="netns: the edges' uplink rates to try, Mbit/s")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    networks = _networks(args.network.split(","), [float(m) for m in args.backhaul_mbit.split(",")])
    out = benchlib.out_dir(args.out) / "migration-matrix"
    out.mkdir(parents=True, exist_ok=True)
    result = run_matrix(out, scenarios=args.scenarios.split(","), securities=args.security.split(","),
                        moves=args.moves.split(","), rounds=args.rounds, repeat=args.repeat,
                        baseline=Path(args.baseline) if args.baseline else None, networks=networks)
    benchlib.write_json(out / "result.json", result)
    print(report_matrix(result), flush=True)
    return 0


def report(result: dict[str, Any]) -> str:
    f = result["figures"]
    rows = []
    for name, key in (("pause (device)", "pause_ms"), ("edge-to-edge transfer", "transfer_ms"),
                      ("plain socket, open connection", "plain_transfer_ms"),
                      ("plain socket, connect + transfer", "plain_connect_transfer_ms")):
        s = f[key]
        rows.append([name, s["count"], s["median"], s["p95"], s["min"], s["max"]])
    sb = f["state_bytes"]
    lines = [f"migration: {f['moves']} moves, state {sb['median']:,.0f} bytes per move "
             f"(min {sb['min']:,.0f}, max {sb['max']:,.0f})",
             benchlib.table(["ms", "n", "median", "p95", "min", "max"], rows, floatfmt=".2f")]
    for mv in f["warmup_moves"]:
        lines.append(f"warm-up move {mv['from']}->{mv['to']} at step {mv['step']}: pause {mv['pause_ms']:.1f} ms "
                     f"(transfer {mv['transfer_ms']:.1f} ms)")
    lines.append("critical path in one process (median ms):")
    lines += [f"  {v:8.2f}  {k}" for k, v in f["breakdown_ms"].items()]
    lines.append(f"migration pause median {f['pause_ms']['median']:.1f} ms (goal <= 20 ms), p95 "
                 f"{f['pause_ms']['p95']:.1f} ms; {f['pause_over_plain']:.1f}x the plain-socket transfer of the same "
                 f"bytes on an open connection, {f['pause_over_plain_connect']:.1f}x on a new connection (goal <= 5x)")
    return "\n".join(lines)


if __name__ == "__main__":
    if "--matrix" in sys.argv[1:]:
        sys.exit(matrix_main(sys.argv[1:]))
    sys.exit(benchlib.standalone("migration", describe, run, report))

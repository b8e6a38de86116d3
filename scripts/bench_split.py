"""Split-training overhead: samples per second of split training over TCP (one device, one
edge) against training the same full model in one process on the same batches.

    python -m scripts.bench_split [--quick | --full] [--out DIR] [--malloc auto|tuned|lean|system] [--one-pass]

Over TCP: a testbed of 1 central, 1 edge, 1 device, mode fedfly, VGG-5 split 3, batch 100,
run twice: in the shared-key mode (a MAC on every record) and with TLS 1.3 (``security.mode``);
per round the device's ``round_seconds`` (its training loop: activations out, gradient
back, backward, step) gives samples/s. In one process: ``common.training.train_reference_round``
on the device's own shard, with the batches ``round_batches`` gives it for the same
rounds, with the same thread count. Round 1 of each is a warm-up and is not counted.

Passes (1 for ``--tiny``, 3 otherwise), one after the other: in one process, the key
mode, TLS, ..., and in one process again at the end. Each testbed run is compared with
the in-process runs right before and after its pass (their rounds pooled), so that a
change in the machine's speed between passes falls on both sides alike; the figure
reported is the median of the passes' ratios (an in-process step time can drift within
minutes by more than the effect measured: BENCHMARKS.md, section 3).

``--malloc``: ``training.malloc`` for the testbed's processes and this one's in-process
training alike (default ``tuned``, the default on hosts of 2 GiB and more; ``lean`` gives big
blocks back, the default on smaller ones; ``system`` leaves glibc's malloc
as it is). ``--one-pass``: the edge's backward in one pass (``training.cut_gradient_first =
false``), not the gradient at the cut first (the default); the in-process training is the
same either way.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

from common.config import MALLOC_MODES
from scripts import benchlib

# scale -> (samples per device, rounds including the warm-up, passes)
SCALES = {"tiny": (500, 2, 1), "quick": (2000, 5, 3), "full": (5000, 11, 3)}
BATCH = 100
SPLIT = 3
MALLOC = "tuned"  # training.malloc, both sides (--malloc)
CUT_FIRST = True  # training.cut_gradient_first, the edge's (--one-pass: False)


def describe(scale: str) -> dict[str, Any]:
    samples, rounds, passes = SCALES[scale]
    return {"over TCP": "1 central, 1 edge, 1 device on loopback; mode fedfly", "model": f"VGG-5 split {SPLIT}",
            "batch": BATCH, "samples": samples, "steps per round": -(-samples // BATCH),
            "rounds": f"{rounds} (round 1 is a warm-up)", "in one process": "train_reference_round, same batches",
            "threads": 1, "dataset": "synthetic", "passes": passes, "malloc": MALLOC,
            "edge's backward": "the cut's gradient first" if CUT_FIRST else "one pass"}


def in_process(cfg_path: Path, rounds: int) -> list[float]:
    """Seconds per round (rounds 2..) of training the full model in this process."""
    from common.cli import data_spec
    from common.config import load_config
    from common.data import load_train_shard
    from common.models import build_model
    from common.training import round_batches, set_threads, train_reference_round, tune_malloc

    cfg = load_config(str(cfg_path))
    set_threads(cfg.training.threads)
    tune_malloc(cfg.training.malloc)  # as the testbed's processes do
    device = cfg.device_names[0]
    x, y = load_train_shard(data_spec(cfg), devices=cfg.device_names, device=device)
    model = build_model(cfg.model_key, seed=cfg.run.seed)
    t = cfg.training
    seconds = []
    for r in range(1, rounds + 1):
        batches = round_batches(len(x), t.batch_size, local_epochs=t.local_epochs, seed=cfg.run.seed,
                                device=device, round=r)
        t0 = time.perf_counter()
        train_reference_round(model, x, y, batches, lr=t.lr, momentum=t.momentum)
        seconds.append(time.perf_counter() - t0)
    return seconds[1:]


def run(out: Path, scale: str) -> dict[str, Any]:
    samples, rounds, passes = SCALES[scale]
    cfg = benchlib.write_config(out, "split", edges=1, devices=1, rounds=rounds, mode="fedfly",
                                samples_per_device=samples, batch_size=BATCH, split_layer=SPLIT, test_samples=500,
                                extra={"training": {"malloc": MALLOC, "cut_gradient_first": CUT_FIRST}})
    local_runs, shares_local = [], []
    key_runs, tls_runs = [], []
    for k in range(passes + 1):
        secs, shares = benchlib.quietly(lambda _: in_process(cfg, rounds), what="in-process training")
        local_runs.append(secs)
        shares_local.append(shares)
        if k == passes:
            break
        key_runs.append(benchlib.launch_timed(cfg, 'security.mode="key"', f'run.name="split-key-{k}"',
                                              timeout=600 + 60 * rounds))
        # the same run with TLS 1.3 on every connection (certificates made by the launcher)
        tls_runs.append(benchlib.launch_timed(cfg, 'security.mode="tls"', 'security.certs="certs"',
                                              f'run.name="split-tls-{k}"', timeout=600 + 60 * rounds))

    def device_rounds(res) -> list[float]:
        return next(iter(res.summary["devices"].values()))["round_seconds"][1:]

    # each pass against the in-process runs on both sides of it
    pass_local = [local_runs[k] + local_runs[k + 1] for k in range(passes)]
    key_ratios = [statistics.median(pass_local[k]) / statistics.median(device_rounds(key_runs[k]))
                  for k in range(passes)]
    tls_ratios = [statistics.median(pass_local[k]) / statistics.median(device_rounds(tls_runs[k]))
                  for k in range(passes)]
    res = key_runs[0]
    dev = next(iter(res.summary["devices"].values()))
    tcp = [s for r in key_runs for s in device_rounds(r)]
    tls = [s for r in tls_runs for s in device_rounds(r)]
    central = [r["seconds"] for run_ in key_runs for r in run_.summary["rounds"][1:]]
    local = [s for secs in local_runs for s in secs]
    tcp_rate = samples / statistics.median(tcp)
    local_rate = samples / statistics.median(local)
    figures = {
        "samples_per_round": samples, "steps_per_round": dev["steps"][0],
        "tcp_round_s": tcp, "in_process_round_s": local, "central_round_s": central,
        "tcp_samples_per_s": tcp_rate, "in_process_samples_per_s": local_rate,
        "central_samples_per_s": samples / statistics.median(central),
        "ratio": statistics.median(key_ratios), "pass_ratios": key_ratios,
        "tls_round_s": tls, "tls_samples_per_s": samples / statistics.median(tls),
        "tls_ratio": statistics.median(tls_ratios), "tls_pass_ratios": tls_ratios,
        "tls_step_ms": statistics.median(tls) / dev["steps"][0] * 1000,
        "tcp_step_ms": statistics.median(tcp) / dev["steps"][0] * 1000,
        "in_process_step_ms": statistics.median(local) / dev["steps"][0] * 1000,
        "run_dir": str(res.run_dir),
        "foreign_cpu_share": {"in_process": shares_local, "testbed": [r.attempts for r in key_runs],
                              "tls": [r.attempts for r in tls_runs]},
    }
    return {"benchmark": "split", "scale": scale, "config": describe(scale), "figures": figures}


def report(result: dict[str, Any]) -> str:
    f = result["figures"]
    rows = [["split over TCP (device's round)", f["tcp_samples_per_s"], f["tcp_step_ms"], len(f["tcp_round_s"])],
            *([["split over TLS (device's round)", f["tls_samples_per_s"], f["tls_step_ms"], len(f["tls_round_s"])]]
              if "tls_ratio" in f else []),
            ["one process, full model", f["in_process_samples_per_s"], f["in_process_step_ms"],
             len(f["in_process_round_s"])],
            ["split over TCP (central's round)", f["central_samples_per_s"],
             statistics.median(f["central_round_s"]) / f["steps_per_round"] * 1000, len(f["central_round_s"])]]
    return (benchlib.table(["", "samples/s", "ms/step", "rounds"], rows, floatfmt=".1f")
            + f"\nsplit training over TCP: {f['ratio']:.3f}x the in-process samples/s (goal >= 0.95x)"
            + _passes(f.get("pass_ratios"))
            + (f"\nsplit training over TLS: {f['tls_ratio']:.3f}x the in-process samples/s (goal >= 0.95x)"
               + _passes(f.get("tls_pass_ratios")) if "tls_ratio" in f else ""))


def _passes(ratios: list[float] | None) -> str:
    """The passes' ratios, when there was more than one (the figure is their median)."""
    return "" if not ratios or len(ratios) < 2 else f"; median of passes {', '.join(f'{r:.3f}' for r in ratios)}"


def _options(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], None]:
    parser.add_argument("--malloc", choices=MALLOC_MODES, default=MALLOC,
                        help="training.malloc of the testbed's processes and of the in-process reference")
    parser.add_argument("--one-pass", action="store_true",
                        help="training.cut_gradient_first = false: the edge's backward in one pass")

    def use(args: argparse.Namespace) -> None:
        global MALLOC, CUT_FIRST
        MALLOC, CUT_FIRST = args.malloc, not args.one_pass
    return use


if __name__ == "__main__":
    sys.exit(benchlib.standalone("split", describe, run, report, options=_options))

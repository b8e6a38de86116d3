"""Client drift: SCAFFOLD against FedAvg and FedProx on label-skewed shards, at equal rounds.

    python -m scripts.bench_scaffold [--tiny | --quick | --full] [--out DIR]

Data: the real CIFAR-10 images (``../shared/data/cifar10-jpeg.tar.gz``, extracted under the
output folder, removed after) when the archive is there, else the synthetic set; the
imbalanced split (``data.distribution = "imbalanced"``, Dirichlet ``alpha`` 0.1: most
devices see two or three classes). VGG-5, plain SGD on the devices (momentum 0: SCAFFOLD's
update of the control variates, ``(x - y) / (K * lr)``, assumes it), several local
epochs per round, so that the clients drift apart.

The rounds are played in this process (``common.training.ReferenceRun``: the strategy's
client step, its ``aggregate`` and the devices' kept state), with no network: a testbed run is bit-identical to it, moves and faults
included (``tests/test_scaffold.py``), and this way three strategies fit in minutes on a
small machine. Each strategy starts from the same weights and sees the same batches.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

from scripts import benchlib
from scripts.bench_accuracy import prepare_data

DEVICES, BATCH, LR, MOMENTUM, EPOCHS, ALPHA = 4, 25, 0.05, 0.0, 2, 0.1
STRATEGIES: list[dict[str, Any]] = [{"name": "fedavg"}, {"name": "fedprox", "mu": 0.01},
                                    {"name": "scaffold", "server_lr": 1.0}]
# scale -> (rounds, samples per device, test samples)
SCALES = {"tiny": (2, 60, 200), "quick": (8, 150, 1000), "full": (50, 1000, 0)}


def describe(scale: str) -> dict[str, Any]:
    rounds, samples, test = SCALES[scale]
    data = ("CIFAR-10 JPEG (imagefolder)" if benchlib.CIFAR_ARCHIVE.exists() else "synthetic (no CIFAR-10 archive)")
    return {"data": data, "split": f"imbalanced, Dirichlet alpha {ALPHA}", "devices": DEVICES,
            "samples per device": samples, "test samples": test or "whole test set", "model": "VGG-5",
            "rounds": rounds, "local epochs": EPOCHS, "batch": BATCH, "lr": LR, "momentum": MOMENTUM,
            "strategies": ", ".join(str(s) for s in STRATEGIES), "where": "in this process (no network)"}


def play(cfg_path: Path, section: dict[str, Any]) -> dict[str, Any]:
    """The config's rounds with strategy ``section``: accuracy and loss after each."""
    from common import strategies
    from common.cli import data_spec
    from common.config import load_config
    from common.data import load_test_set, load_train_shard
    from common.models import build_model, state_sha256
    from common.training import ReferenceRun, evaluate, set_threads

    cfg = load_config(str(cfg_path))
    set_threads(cfg.training.threads)
    spec = data_spec(cfg)
    names = cfg.device_names
    shards = {d: load_train_shard(spec, devices=names, device=d) for d in names}
    tx, ty = load_test_set(spec)
    strat = strategies.make({**cfg.strategy, **section})
    model = build_model(cfg.model_key, seed=cfg.run.seed)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    t = cfg.training
    ref = ReferenceRun(strat, cfg.model_key, lr=t.lr, momentum=t.momentum, batch_size=t.batch_size,
                       local_epochs=t.local_epochs, seed=cfg.run.seed)
    curve = []
    t0 = time.perf_counter()
    for r in range(1, t.rounds + 1):
        weights = ref.round(r, weights, shards)  # each device's c_i kept and folded as on a device
        model.load_state_dict(weights)
        acc, loss = evaluate(model, tx, ty)
        curve.append({"round": r, "test_accuracy": acc, "test_loss": loss})
        print(f"   {strat.name} round {r}: accuracy {acc:.3f} loss {loss:.3f}", flush=True)
    return {"strategy": strat.describe(), "curve": curve, "seconds": round(time.perf_counter() - t0, 1),
            "sha256": state_sha256(weights), "shard_labels": {d: sorted(set(shards[d][1].tolist())) for d in names}}


def run(out: Path, scale: str) -> dict[str, Any]:
    rounds, samples, test = SCALES[scale]
    dataset, root = prepare_data(out)
    try:
        cfg = benchlib.write_config(out, "scaffold", edges=1, devices=DEVICES, rounds=rounds, mode="classic",
                                    samples_per_device=samples, batch_size=BATCH, distribution="imbalanced",
                                    alpha=ALPHA, dataset=dataset, data_root=root, test_samples=test, lr=LR,
                                    extra={"training": {"momentum": MOMENTUM, "local_epochs": EPOCHS}})
        runs = [play(cfg, section) for section in STRATEGIES]
    finally:
        if dataset == "imagefolder":
            shutil.rmtree(out / "data", ignore_errors=True)  # 60,000 small files; the archive stays
    return {"benchmark": "scaffold", "scale": scale, "config": describe(scale), "dataset": dataset,
            "machine": benchlib.machine(), "figures": {"runs": runs}}


def report(result: dict[str, Any]) -> str:
    runs = result["figures"]["runs"]
    n = len(runs[0]["curve"])
    shown = sorted(set([0, n - 1] + list(range(0, n, max(1, n // 6)))))
    rows = [[r["strategy"]["name"], *[f"{r['curve'][i]['test_accuracy']:.3f}" for i in shown],
             f"{max(c['test_accuracy'] for c in r['curve']):.3f}", f"{r['curve'][-1]['test_loss']:.3f}", r["seconds"]]
            for r in runs]
    labels = "; ".join(f"{d}: {v}" for d, v in runs[0]["shard_labels"].items())
    return "\n".join([f"scaffold ({result['dataset']}, imbalanced alpha {ALPHA}): test accuracy after each round",
                      f"classes per device: {labels}",
                      benchlib.table(["strategy", *[f"r{i + 1}" for i in shown], "best", "final loss", "seconds"],
                                     rows)])


def options(parser):
    parser.add_argument("--archive", default=None, help="the CIFAR-10 JPEG archive, if not where benchlib looks")
    parser.add_argument("--lr", type=float, default=LR, help=f"the devices' learning rate (default {LR})")

    def apply(args) -> None:
        global LR
        LR = args.lr
        if args.archive:
            benchlib.CIFAR_ARCHIVE = Path(args.archive)
    return apply


if __name__ == "__main__":
    sys.exit(benchlib.standalone("scaffold", describe, run, report, options=options))

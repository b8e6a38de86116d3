"""Accuracy: test accuracy per round of modes ``fedfly``, ``restart`` and ``classic`` on the
same data, balanced and imbalanced, with and without moves, against training the same
model centrally on the union of the devices' data for the same number of epochs.

    python -m scripts.bench_accuracy [--quick | --full] [--out DIR]

Data: the real CIFAR-10 images (``../shared/data/cifar10-jpeg.tar.gz``, extracted under the
output folder and read as dataset ``imagefolder``) when the archive is there, else the
synthetic set. Testbed: 1 central, 2 edges, 4 devices, VGG-5 split 3, batch 100, lr 0.01,
momentum 0.9, one local epoch per round. "With moves": every round ``device1`` moves at
50% of its round and ``device4`` at 30%, each to the edge it is not on.

The centralised yardstick trains the full model in this process, from the same initial
weights, on the union of the four shards, one epoch per round (a seeded shuffle each
epoch, the same batch size and optimizer), evaluated on the same test set after each epoch.

Besides accuracy, each run's final-weights SHA-256 is compared: a migration that moves
the whole session leaves the result bit-identical to the run without moves.
"""

from __future__ import annotations

import shutil
import sys
import tarfile
from pathlib import Path
from typing import Any

from scripts import benchlib

MODES = ("fedfly", "restart", "classic")
DISTRIBUTIONS = ("balanced", "imbalanced")
DEVICES = 4
BATCH = 100
SPLIT = 3
LR = 0.01
# scale -> (rounds, samples per device (0: the whole training set), test samples (0: all))
SCALES = {"tiny": (2, 200, 200), "quick": (5, 500, 1000), "full": (100, 0, 0)}


def describe(scale: str) -> dict[str, Any]:
    rounds, samples, test = SCALES[scale]
    data = ("CIFAR-10 JPEG (imagefolder)" if benchlib.CIFAR_ARCHIVE.exists() else "synthetic (no CIFAR-10 archive)")
    return {"data": data, "testbed": f"1 central, 2 edges, {DEVICES} devices", "model": f"VGG-5 split {SPLIT}",
            "rounds": rounds, "samples per device": samples or "whole training set / devices",
            "test samples": test or "whole test set", "batch": BATCH, "lr": LR, "momentum": 0.9,
            "modes": ", ".join(MODES), "distributions": ", ".join(DISTRIBUTIONS),
            "moves": "none, or every round device1 at 50% and device4 at 30%",
            "centralised": "full model, one process, union of the shards, one epoch per round"}


def moves(rounds: int) -> list[dict]:
    names = benchlib.device_names(DEVICES)
    out = []
    for dev, at, first in ((names[0], 0.5, "edge1"), (names[-1], 0.3, "edge2")):
        out += benchlib.ping_pong_moves(dev, ("edge1", "edge2"), first, [(r, at) for r in range(1, rounds + 1)])
    return out


def prepare_data(out: Path) -> tuple[str, str]:
    """(dataset, root): the CIFAR-10 JPEGs extracted under ``out`` if the archive exists."""
    if not benchlib.CIFAR_ARCHIVE.exists():
        return "synthetic", ""
    root = out / "data" / "cifar10-jpeg"
    if not (root / "train").is_dir():
        with tarfile.open(benchlib.CIFAR_ARCHIVE) as tar:
            tar.extractall(out / "data", filter="data")
    return "imagefolder", str(root)


def centralised(cfg_path: Path, rounds: int) -> list[dict[str, float]]:
    """Accuracy and loss after each epoch of training the full model on the union of the shards."""
    import torch

    from common.cli import data_spec
    from common.config import load_config
    from common.data import load_test_set, load_train_shard
    from common.models import build_model
    from common.training import evaluate, round_batches, set_threads, train_reference_round

    cfg = load_config(str(cfg_path))
    set_threads(cfg.training.threads)
    spec = data_spec(cfg)
    parts = [load_train_shard(spec, devices=cfg.device_names, device=d) for d in cfg.device_names]
    x = torch.cat([p[0] for p in parts])
    y = torch.cat([p[1] for p in parts])
    tx, ty = load_test_set(spec)
    model = build_model(cfg.model_key, seed=cfg.run.seed)
    t = cfg.training
    curve = []
    for epoch in range(1, rounds * t.local_epochs + 1):
        batches = round_batches(len(x), t.batch_size, local_epochs=1, seed=cfg.run.seed, device="centralised",
                                round=epoch)
        train_reference_round(model, x, y, batches, lr=t.lr, momentum=t.momentum)
        acc, loss = evaluate(model, tx, ty)
        curve.append({"epoch": epoch, "test_accuracy": acc, "test_loss": loss})
    return curve


def run(out: Path, scale: str) -> dict[str, Any]:
    rounds, samples, test = SCALES[scale]
    dataset, root = prepare_data(out)
    runs = []
    central: dict[str, list] = {}
    try:
        for dist in DISTRIBUTIONS:
            for moving in (False, True):
                for mode in MODES:
                    name = f"acc-{dist}-{mode}-{'moves' if moving else 'static'}"
                    cfg = benchlib.write_config(out, name, edges=2, devices=DEVICES, rounds=rounds, mode=mode,
                                                moves=moves(rounds) if moving else None, samples_per_device=samples,
                                                batch_size=BATCH, split_layer=SPLIT, distribution=dist, dataset=dataset,
                                                data_root=root, test_samples=test, lr=LR)
                    res = benchlib.launch_ok(cfg, timeout=900 + 600 * rounds)
                    s = res.summary
                    runs.append({"name": name, "distribution": dist, "mode": mode, "moves": moving,
                                 "accuracy": [r["test_accuracy"] for r in s["rounds"]],
                                 "loss": [r["test_loss"] for r in s["rounds"]],
                                 "round_seconds": [r["seconds"] for r in s["rounds"]],
                                 "migrations": len(s["migrations"]), "sha256": s["final_model_sha256"],
                                 "shard_sizes": {d: v["samples"] for d, v in s["devices"].items()},
                                 "run_dir": str(res.run_dir)})
            central[dist] = centralised(cfg, rounds)
    finally:
        if dataset == "imagefolder":
            shutil.rmtree(out / "data", ignore_errors=True)  # 60,000 small files; the archive stays
    for r in runs:
        ref = next(x for x in runs if x["distribution"] == r["distribution"] and x["mode"] == "fedfly"
                   and not x["moves"])
        r["identical_to_fedfly_static"] = r["sha256"] == ref["sha256"]
    return {"benchmark": "accuracy", "scale": scale, "config": describe(scale), "dataset": dataset,
            "figures": {"runs": runs, "centralised": central}}


def report(result: dict[str, Any]) -> str:
    f = result["figures"]
    lines = [f"accuracy ({result['dataset']}): test accuracy after each round"]
    for dist in DISTRIBUTIONS:
        runs = [r for r in f["runs"] if r["distribution"] == dist]
        if not runs:
            continue
        n = len(runs[0]["accuracy"])
        shown = sorted(set([0, n - 1] + list(range(0, n, max(1, n // 8)))))
        rows = []
        for r in runs:
            rows.append([f"{r['mode']}{' + moves' if r['moves'] else ''}", r["migrations"],
                         *[f"{r['accuracy'][i]:.3f}" for i in shown],
                         "yes" if r["identical_to_fedfly_static"] else "NO"])
        c = f["centralised"][dist]
        rows.append(["centralised", "-", *[f"{c[i]['test_accuracy']:.3f}" for i in shown], "-"])
        shards = ", ".join(f"{d} {n}" for d, n in sorted(runs[0]["shard_sizes"].items()))
        lines.append(f"-- {dist} (samples per device: {shards})")
        lines.append(benchlib.table(["run", "moves", *[f"r{i + 1}" for i in shown], "same weights"], rows))
        fed = next(r for r in runs if r["mode"] == "fedfly" and r["moves"])
        lines.append(f"accuracy {dist}: fedfly with moves {fed['accuracy'][-1]:.3f} after {n} rounds, centralised "
                     f"{c[-1]['test_accuracy']:.3f}; runs with the same final weights as fedfly without moves: "
                     f"{sum(r['identical_to_fedfly_static'] for r in runs)}/{len(runs)}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(benchlib.standalone("accuracy", describe, run, report))

"""Hostile updates: each aggregation strategy's accuracy with one hostile device of six,
beside the honest run's; and the largest ratio an honest update reaches, which the default
``strategy.refuse_factor`` must stay far above.

    python -m scripts.bench_robust [--tiny | --quick | --full] [--out DIR]

The rounds are played in this process, with the project's own pieces: each device's
shard (``common.data``), its local epoch with the seeded batches a device uses
(``common.training``: the whole model, as mode ``classic``; split training gives the same
weights bit for bit), the refusal the central applies (``central.robust.judge`` at the
factor given) and the strategy (``central.strategies``). The network is left out on
purpose: what is measured is what the aggregation makes of the updates (the refusal over
real processes and a real certificate is ``tests/test_hostile.py``'s).

The hostile device (the last by name) sends, in place of its update, the round's weights
(floating-point tensors; integers as they are) transformed:

    scale   times 1e30 (finite, the right layout and sample count)
    flip    times -1
    noise   plus Gaussian noise of each tensor's own standard deviation (seeded)

Honest ratios: every honest update's move over the median of the others' moves, the
largest of all rounds, for 4 devices (``configs/local.toml``'s testbed: VGG-5, batch 100)
balanced and imbalanced, and for the six honest devices of the hostile table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from scripts import benchlib

ATTACKS = ("none", "scale", "flip", "noise")
# (label, [strategy] section, refuse_factor): fedavg with the default refusal and without
# it, then each robust strategy alone (refusal off), to show what it does by itself.
STRATEGY_CASES: tuple[tuple[str, dict[str, Any], float | None], ...] = (
    ("fedavg", {"name": "fedavg"}, None),
    ("fedavg, refusal off", {"name": "fedavg"}, 0.0),
    ("median", {"name": "median"}, 0.0),
    ("trimmed_mean 0.2", {"name": "trimmed_mean", "trim_fraction": 0.2}, 0.0),
    ("krum f=1", {"name": "krum", "krum_byzantine": 1}, 0.0),
    ("clip (median)", {"name": "clip"}, 0.0),
)
# scale -> (rounds, samples per device, test samples, devices in the hostile table)
SCALES = {"tiny": (2, 64, 200, 6), "quick": (4, 300, 1000, 6), "full": (5, 1000, 2000, 6)}
HONEST_SCALE = {"tiny": (2, 100), "quick": (5, 1000), "full": (5, 1000)}   # (rounds, samples) at 4 devices
BATCH = 100


def hostile_weights(kind: str, weights: dict, seed: int) -> dict:
    """What the hostile device sends in place of its update (``kind`` in ``ATTACKS[1:]``)."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, t in weights.items():
        if not t.is_floating_point():
            out[k] = t.clone()
        elif kind == "scale":
            out[k] = t * 1e30
        elif kind == "flip":
            out[k] = -t
        elif kind == "noise":
            std = float(t.float().std()) if t.numel() > 1 else float(t.abs().sum())
            out[k] = t + torch.randn(t.shape, generator=gen, dtype=t.dtype) * std
        else:
            raise ValueError(f"unknown attack {kind!r}")
    return out


def make_config(folder: Path, name: str, *, devices: int, rounds: int, samples: int, test: int,
                distribution: str = "balanced", batch: int = BATCH, image_size: int = 0) -> Path:
    extra = {"data": {"image_size": image_size}} if image_size else None
    return benchlib.write_config(folder, name, edges=2, devices=devices, rounds=rounds, mode="classic",
                                 samples_per_device=samples, batch_size=batch, distribution=distribution,
                                 test_samples=test, extra=extra)


def play(cfg_path: Path, *, strategy: dict[str, Any], refuse_factor: float | None, attack: str = "none",
         on_round: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """The config's rounds in this process; the last device hostile unless ``attack`` is
    "none". ``refuse_factor`` None: the config's default. Returns per round accuracy,
    loss, the ratios of the honest updates, who was refused, and the final weights."""
    import math

    import torch

    from central import robust
    from central.strategies import make_strategy
    from common.cli import data_spec
    from common.config import load_config
    from common.data import load_test_set, load_train_shard
    from common.models import build_model
    from common.training import evaluate, round_batches, set_threads, train_reference_round

    cfg = load_config(str(cfg_path))
    set_threads(cfg.training.threads)
    spec = data_spec(cfg)
    names = cfg.device_names
    shards = {d: load_train_shard(spec, devices=names, device=d) for d in names}
    tx, ty = load_test_set(spec)
    section = {**cfg.strategy, **strategy}
    factor = section["refuse_factor"] if refuse_factor is None else refuse_factor
    strat = make_strategy(section)
    t = cfg.training
    model = build_model(cfg.model_key, seed=cfg.run.seed)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    hostile = names[-1] if attack != "none" else None
    state: dict = {}
    rounds = []
    for r in range(1, t.rounds + 1):
        ups = []
        for d in names:  # the fixed order of summation
            x, y = shards[d]
            if d == hostile:
                ups.append((hostile_weights(attack, weights, seed=r), len(x)))
                continue
            model.load_state_dict(weights)
            batches = round_batches(len(x), t.batch_size, local_epochs=t.local_epochs, seed=cfg.run.seed,
                                    device=d, round=r)
            train_reference_round(model, x, y, batches, lr=t.lr, momentum=t.momentum)
            ups.append(({k: v.clone() for k, v in model.state_dict().items()}, len(x)))
        dists = [robust.distance(w, weights) for w, _ in ups]
        ratios = robust.ratios(dists)
        refused = [d for d, bad in zip(names, robust.judge(dists, factor)) if bad]
        kept = [u for d, u in zip(names, ups) if d not in refused]
        weights, state = strat.aggregate(kept, (), current=weights, state=state)
        finite = all(bool(torch.isfinite(v).all()) for v in weights.values() if v.is_floating_point())
        model.load_state_dict(weights)
        acc, loss = evaluate(model, tx, ty) if finite else (float("nan"), float("nan"))
        rec = {"round": r, "test_accuracy": acc, "test_loss": loss, "refused": refused, "finite": finite,
               "honest_ratio_max": max(x for d, x in zip(names, ratios) if d != hostile),
               "hostile_ratio": next((x for d, x in zip(names, ratios) if d == hostile), None)}
        rounds.append(rec)
        if on_round is not None:
            on_round(rec)
        if not finite:
            break
    return {"rounds": rounds, "weights": weights, "hostile": hostile,
            "final_accuracy": rounds[-1]["test_accuracy"] if rounds[-1]["finite"] else math.nan}


def describe(scale: str) -> dict[str, Any]:
    rounds, samples, test, devices = SCALES[scale]
    hr, hs = HONEST_SCALE[scale]
    return {"data": "synthetic", "model": "VGG-5 (whole model per device, as mode classic)",
            "hostile table": f"{devices} devices (the last hostile), {rounds} rounds, {samples} samples each, "
                             f"batch {BATCH}, lr 0.01, momentum 0.9",
            "attacks": "scale x1e30, flip x-1, noise of each tensor's std",
            "honest ratios": f"4 devices, {hr} rounds, {hs} samples each, balanced and imbalanced (alpha 0.5); "
                             f"and the {devices} honest devices of the table",
            "strategies": ", ".join(label for label, _, _ in STRATEGY_CASES)}


def run(out: Path, scale: str) -> dict[str, Any]:
    rounds, samples, test, devices = SCALES[scale]
    hr, hs = HONEST_SCALE[scale]
    honest = {}
    for dist in ("balanced", "imbalanced"):
        cfg = make_config(out, f"honest-{dist}", devices=4, rounds=hr, samples=hs, test=test, distribution=dist)
        res = play(cfg, strategy={"name": "fedavg"}, refuse_factor=0.0)
        honest[f"4 devices, {dist}"] = max(r["honest_ratio_max"] for r in res["rounds"])
    cfg = make_config(out, "hostile", devices=devices, rounds=rounds, samples=samples, test=test)
    table = []
    for label, section, factor in STRATEGY_CASES:
        row = {"strategy": label}
        for attack in ATTACKS:
            res = play(cfg, strategy=section, refuse_factor=factor, attack=attack)
            row[attack] = res["final_accuracy"]
            row[f"{attack}_refused"] = sum(len(r["refused"]) for r in res["rounds"])
            if attack == "none" and label == "fedavg":
                honest[f"{devices} devices, balanced"] = max(r["honest_ratio_max"] for r in res["rounds"])
            if attack != "none":
                row[f"{attack}_ratio"] = min(r["hostile_ratio"] for r in res["rounds"])
        table.append(row)
        print(f"  {label}: " + "  ".join(f"{a} {row[a]:.3f}" for a in ATTACKS), flush=True)
    return {"scale": scale, "honest_ratio_max": honest, "table": table}


def report(result: dict[str, Any]) -> str:
    rows = [[r["strategy"], *[r[a] for a in ATTACKS],
             " ".join(str(r[f"{a}_refused"]) for a in ATTACKS[1:])] for r in result["table"]]
    lines = [benchlib.table(["strategy", "honest", "scale x1e30", "flip", "noise", "refused (s/f/n)"], rows), ""]
    first = result["table"][0]
    lines.append("smallest hostile ratio: " + ", ".join(f"{a} {first[f'{a}_ratio']:.3g}" for a in ATTACKS[1:]))
    lines.append("largest honest ratio: " + ", ".join(f"{k} {v:.3f}" for k, v in result["honest_ratio_max"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return benchlib.standalone("robust", describe, run, report, argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""``split_layer = "auto"``: each device's cut from a cost model measured at start.

FedAdapt learns the cut with reinforcement learning; a measured cost model is simpler and
says why it chose what it chose. At start the central times every layer of the model,
forward and backward, on a batch of ``training.batch_size`` (``profile``), and predicts a
device's round at each cut ``s`` (``predict``):

    steps x (device compute of layers 0..s          (this host's time x devices.NAME.slowdown)
             + edge compute of layers s+1..last      (x the devices that start on that edge:
                                                      one core trains them all, in turn)
             + activations up and gradients down     (2 x the cut's bytes / the link's rate))
    + the device part's weights down and up          (2 x its bytes / the link's rate)

The link's rate is ``Config.link_rate`` (the device's ``link_mbit``, else its edge's, else
``links.device_mbit``: what the namespace testbed shapes); an unshaped link counts as
``UNSHAPED_MBIT``. The cut with the smallest prediction wins (the earlier one on a tie).
The device's time is this host's scaled by ``slowdown``, the testbed's model of a slower
device: a device whose real speed differs (a Pi) is predicted only as well as its
``slowdown`` describes it. ``summary.json`` gets each choice with its predictions under
``auto_split``, and the measured training seconds of every round beside them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from common.config import Config
from common.models import build_model
from common.nets import ModelSpec
from common.training import LOSS

UNSHAPED_MBIT = 10_000.0   # an unshaped link (loopback, a LAN): about 10 Gbit/s
REPEATS = 3                # timings per layer; the median counts


@dataclass(frozen=True)
class Profile:
    """Per layer, for one batch: forward + backward seconds, output bytes, parameter bytes."""
    seconds: tuple[float, ...]
    out_bytes: tuple[int, ...]
    param_bytes: tuple[int, ...]


def profile(model_key: str, batch_size: int, *, repeats: int = REPEATS) -> Profile:
    """Time every layer of ``model_key`` on a random batch (train mode, as in training)."""
    spec = ModelSpec.parse(model_key)
    model = build_model(model_key, seed=0)
    model.train()
    x = torch.randn(batch_size, spec.channels, spec.height, spec.width)
    y = torch.zeros(batch_size, dtype=torch.long)
    seconds, out_bytes, param_bytes = [], [], []
    layers = list(model.layers.values())
    with torch.random.fork_rng(devices=[]):
        for i, layer in enumerate(layers):
            times = []
            for _ in range(repeats):
                inp = x.detach().requires_grad_(True)
                t0 = time.perf_counter()
                out = layer(inp)
                loss = LOSS(out, y) if i == len(layers) - 1 else out.float().sum()
                loss.backward()
                times.append(time.perf_counter() - t0)
            seconds.append(sorted(times)[len(times) // 2])
            out_bytes.append(out.numel() * out.element_size())
            param_bytes.append(sum(t.numel() * t.element_size() for t in layer.state_dict().values()))
            x = out.detach()
    return Profile(tuple(seconds), tuple(out_bytes), tuple(param_bytes))


def predict(p: Profile, cut: int, *, steps: int, slowdown: float, edge_load: int, mbit: float) -> dict[str, float]:
    """Predicted seconds of a device's round at ``cut``, by part (see the module's docstring)."""
    bits_per_s = (mbit or UNSHAPED_MBIT) * 1e6
    device = sum(p.seconds[: cut + 1]) * slowdown
    edge = sum(p.seconds[cut + 1:]) * max(1, edge_load)
    link = 2 * p.out_bytes[cut] * 8 / bits_per_s
    weights = 2 * sum(p.param_bytes[: cut + 1]) * 8 / bits_per_s
    train = steps * (device + edge + link)
    return {"device_s": steps * device, "edge_s": steps * edge, "link_s": steps * link, "weights_s": weights,
            "train_s": train, "round_s": train + weights}


def choose(cfg: Config, shard_samples: dict[str, int], p: Profile | None = None) -> dict[str, dict[str, Any]]:
    """For every device whose split_layer is "auto": its cut and the predictions behind it."""
    auto = [d for d in cfg.device_names if cfg.split_of(d) == "auto"]
    if not auto:
        return {}
    t = cfg.training
    p = p or profile(cfg.model_key, t.batch_size)
    load: dict[str, int] = {}
    for d in cfg.device_names:
        load[cfg.devices[d].edge] = load.get(cfg.devices[d].edge, 0) + 1
    out = {}
    for d in auto:
        steps = math.ceil(shard_samples.get(d, t.batch_size) / t.batch_size) * t.local_epochs
        preds = {cut: predict(p, cut, steps=steps, slowdown=cfg.devices[d].slowdown, edge_load=load[cfg.devices[d].edge],
                              mbit=cfg.link_rate(d))
                 for cut in range(len(p.seconds) - 1)}
        best = min(preds, key=lambda c: (preds[c]["round_s"], c))
        out[d] = {"cut": best, "predicted": {k: round(v, 4) for k, v in preds[best].items()},
                  "round_s_by_cut": {str(c): round(v["round_s"], 4) for c, v in preds.items()},
                  "measured_train_s": []}
    return out

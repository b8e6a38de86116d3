"""Updates judged against the round, and aggregation that one device cannot steer: pure
functions over ``(weights, sample_count)`` pairs, no network.

A device with a real certificate may still send anything that has the model's layout: the
round's weights times 1e30, with the sign flipped, or noise. Two defences, both here:

- ``judge``: each update's distance from the round's starting weights (the L2 norm of
  what it changed, over every floating-point tensor) against the median of the *others'*
  distances. An honest update moves the weights about as far as its peers (one local
  epoch at the round's learning rate; a bigger shard takes more steps, so somewhat
  further); a far larger move is refused. The median of the others (not of all) so that
  with two devices the hostile one cannot pull the yardstick up to itself.
- robust aggregators (``coordinate_median``, ``trimmed_mean``, ``multi_krum``,
  ``norm_clip``), for runs that want a defence that does not depend on a threshold.

Every function here sums and sorts in the order given (callers pass devices sorted by
name), in float64, and casts back to each tensor's dtype, so the result depends only on
the updates. Integer tensors (batch norm's ``num_batches_tracked``) are not weights that
train: they take FedAvg's value.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from central.fedavg import Weights, fedavg

Updates = Sequence[tuple[Weights, int]]


def _check(updates: Updates) -> Weights:
    if not updates:
        raise ValueError("aggregation needs at least one update")
    first = updates[0][0]
    for w, _ in updates:
        if w.keys() != first.keys() or any(w[k].shape != first[k].shape for k in first):
            raise ValueError("updates do not describe the same model")
    return first


def _float_keys(w: Weights) -> list[str]:
    return [k for k, t in w.items() if t.is_floating_point()]


def distance(w: Weights, current: Weights) -> float:
    """L2 norm of ``w - current`` over the floating-point tensors, in float64; ``inf``
    when it overflows (a finite update can still be that far)."""
    total = 0.0
    for k in _float_keys(current):
        d = w[k].to(torch.float64) - current[k].to(torch.float64)
        total += float(torch.dot(d.reshape(-1), d.reshape(-1)))
    return math.sqrt(total) if math.isfinite(total) else math.inf


def ratios(dists: Sequence[float]) -> list[float]:
    """Each distance over the median of the others' (1.0 for a lone update: nothing to
    judge it by; ``inf`` for a move where the others did not move at all)."""
    out = []
    for i, d in enumerate(dists):
        others = [x for j, x in enumerate(dists) if j != i]
        if not others:
            out.append(1.0)
            continue
        med = _median(others)
        out.append(d / med if med > 0 else (1.0 if d == 0 else math.inf))
    return out


def judge(dists: Sequence[float], factor: float) -> list[bool]:
    """Which updates to refuse: those whose distance is more than ``factor`` times the
    median of the others'. ``factor`` 0: none (the check is off)."""
    if factor <= 0:
        return [False] * len(dists)
    return [r > factor for r in ratios(dists)]


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def _stack(updates: Updates, key: str) -> torch.Tensor:
    return torch.stack([w[key].to(torch.float64) for w, _ in updates])


def _per_coordinate(updates: Updates, reduce) -> Weights:
    """``reduce`` (over a sorted stack, dim 0) on each floating-point tensor; the
    integer ones as FedAvg has them."""
    first = _check(updates)
    avg = fedavg(updates)
    out: Weights = {}
    for k, ref in first.items():
        if not ref.is_floating_point():
            out[k] = avg[k]
            continue
        ordered, _ = torch.sort(_stack(updates, k), dim=0)
        out[k] = reduce(ordered).to(ref.dtype)
    return out


def coordinate_median(updates: Updates) -> Weights:
    """Coordinate-wise median (Yin et al., ICML 2018), not weighted by samples; an even
    count takes the mean of the two middle values. Up to half the updates less one can be
    anything without moving a coordinate outside the honest ones' range."""
    n = len(updates)

    def mid(s: torch.Tensor) -> torch.Tensor:
        return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    return _per_coordinate(updates, mid)


def trimmed_mean(updates: Updates, fraction: float) -> Weights:
    """Coordinate-wise mean after dropping the ``floor(fraction * n)`` smallest and
    largest values of each coordinate (Yin et al. 2018). Raises ``ValueError`` unless
    ``0 <= fraction < 0.5``."""
    if not 0 <= fraction < 0.5:
        raise ValueError("trimmed_mean: fraction must be in [0, 0.5)")
    n = len(updates)
    k = int(math.floor(fraction * n))
    return _per_coordinate(updates, lambda s: s[k:n - k].mean(dim=0))


def krum_scores(updates: Updates, byzantine: int) -> list[float]:
    """Krum's score of each update (Blanchard et al., NeurIPS 2017): the sum of squared
    distances to its ``n - byzantine - 2`` nearest others (at least 1, at most n - 1)."""
    first = _check(updates)
    keys = _float_keys(first)
    flat = [torch.cat([w[k].to(torch.float64).reshape(-1) for k in keys]) for w, _ in updates]
    n = len(flat)
    near = min(n - 1, max(1, n - byzantine - 2))
    d2 = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            diff = flat[i] - flat[j]
            v = float(torch.dot(diff, diff))
            d2[i][j] = d2[j][i] = v if math.isfinite(v) else math.inf
    return [sum(sorted(d2[i][j] for j in range(n) if j != i)[:near]) for i in range(n)]


def multi_krum(updates: Updates, byzantine: int, keep: int = 0) -> tuple[Weights, list[int]]:
    """Multi-Krum: FedAvg (by samples, in the order given) of the ``keep`` updates with the
    lowest Krum scores (``keep`` 0: ``n - byzantine``); ties go to the earlier update.
    Returns (weights, the indices kept, ascending). Raises ``ValueError`` on a negative
    ``byzantine`` or ``keep``."""
    if byzantine < 0 or keep < 0:
        raise ValueError("multi_krum: byzantine and keep must be >= 0")
    n = len(updates)
    scores = krum_scores(updates, byzantine)
    m = min(n, max(1, keep or n - byzantine))
    chosen = sorted(sorted(range(n), key=lambda i: (scores[i], i))[:m])
    return fedavg([updates[i] for i in chosen]), chosen


def norm_clip(updates: Updates, current: Weights, max_norm: float = 0.0) -> tuple[Weights, float]:
    """FedAvg of the updates' moves, each scaled down to at most ``max_norm`` (L2 over the
    floating-point tensors; 0: the median of the round's move norms), added to
    ``current`` (Sun et al. 2019, "Can you really backdoor federated learning?").
    Returns (weights, the bound used). Raises ``ValueError`` on a negative ``max_norm``."""
    if max_norm < 0:
        raise ValueError("norm_clip: max_norm must be >= 0")
    first = _check(updates)
    avg = fedavg(updates)
    norms = [distance(w, current) for w, _ in updates]
    bound = max_norm or _median(norms)
    scale = [1.0 if nrm <= bound or not math.isfinite(bound) else (bound / nrm if math.isfinite(nrm) else 0.0)
             for nrm in norms]
    total = sum(n for _, n in updates)
    out: Weights = {}
    for k, ref in first.items():
        if not ref.is_floating_point():
            out[k] = avg[k]
            continue
        base = current[k].to(torch.float64)
        acc = base.clone()
        for (w, n), s in zip(updates, scale):
            if s:
                acc += (w[k].to(torch.float64) - base) * (s * n / total)
        out[k] = acc.to(ref.dtype)
    return out, bound

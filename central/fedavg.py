"""Aggregation: pure functions over ``(weights, sample_count)`` pairs, no network.

The order of the pairs is the order of summation. Callers pass devices sorted by name so
that the global model depends only on what each device computed, never on which edge
reported it or when: float addition is not associative.
"""

from __future__ import annotations

from typing import Sequence

import torch

Weights = dict[str, torch.Tensor]


def fedavg(updates: Sequence[tuple[Weights, int]]) -> Weights:
    """Sample-weighted mean of every tensor, summed in the order given.

    Accumulates in float64 and casts back to each tensor's dtype; integer tensors (batch
    norm's ``num_batches_tracked``) are rounded. Raises ``ValueError`` on no updates, a
    zero total of samples, or updates whose keys or shapes differ.
    """
    if not updates:
        raise ValueError("fedavg needs at least one update")
    total = sum(n for _, n in updates)
    if total <= 0:
        raise ValueError("fedavg needs a positive number of samples")
    first = updates[0][0]
    for w, n in updates:
        if n < 0:
            raise ValueError("sample counts must be >= 0")
        if w.keys() != first.keys() or any(w[k].shape != first[k].shape for k in first):
            raise ValueError("updates do not describe the same model")
    out: Weights = {}
    for key, ref in first.items():
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for w, n in updates:
            acc += w[key].to(torch.float64) * (n / total)
        out[key] = acc.round().to(ref.dtype) if not ref.is_floating_point() else acc.to(ref.dtype)
    return out

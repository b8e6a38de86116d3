"""Whether a device's update is summed, judged twice: as it arrives (``update_problem``:
its layout, its values, its claims) and once the round's updates are in (``Judge``: how
far each moved the weights against the others, ``central.robust.judge``). A refusal is
recorded the same way either time: a failure in summary.json, an ``update_refused``
event and a line of output. The updates not refused are summed exactly as if the checks
did not exist."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from central import robust
from central.results import RunResults
from common import messages as m
from common.bounds import weights_bound_problem
from common.events import EventLog


def finite_or_none(x: float) -> float | None:
    """``x``, or None for an infinity (JSON has none)."""
    return x if math.isfinite(x) else None


def update_problem(msg: m.DeviceUpdate, *, devices: Any, spec: dict[str, tuple[tuple[int, ...], torch.dtype]],
                   shard_samples: dict[str, int]) -> str:
    """Why an update may not be summed ('' if it may): the strategy must never see a
    device not in ``devices``, weights of another layout than ``spec`` or that are not
    finite (``common.bounds.weights_bound_problem``, as an edge checks a device's part),
    or a made-up weight (``samples`` other than the device's shard size, when known)."""
    if msg.device not in devices:
        return f"unknown device {msg.device}"
    if problem := weights_bound_problem(msg.weights, spec):
        return problem
    if msg.samples <= 0:
        return "no samples"
    expected = shard_samples.get(msg.device)
    if expected is not None and msg.samples != expected:
        return f"claims {msg.samples} samples, its shard has {expected}"
    return ""


class Judge:
    """The round's updates against each other (``__call__``), and the record of every
    refusal (``refuse``)."""

    def __init__(self, *, factor: float, results: RunResults, events: EventLog, say: Callable[[str], None]) -> None:
        self.factor = factor  # strategy.refuse_factor; 0: no update is refused for its distance
        self.results = results
        self.events = events
        self.say = say

    def refuse(self, r: int, device: str, edge: str, reason: str, samples: int, **measures: float | None) -> None:
        self.results.add_failure({"round": r, "device": device, "edge": edge, "reason": reason, "samples": samples,
                                  **measures})
        self.events.emit("update_refused", round=r, device=device, edge=edge, reason=reason, **measures)
        self.say(f"  refused: {device}'s update of round {r}: {reason}")

    def __call__(self, r: int, current: dict[str, torch.Tensor],
                 updates: dict[str, m.DeviceUpdate]) -> tuple[float | None, list[dict[str, Any]]]:
        """Refuse (remove from ``updates``) each update that moved the weights more than
        ``factor`` times the median of the others' moves. Returns (the round's largest
        ratio, rounded; None with fewer than two updates, the dropped records of the
        refused)."""
        order = sorted(updates)
        if len(order) < 2:
            return None, []
        dists = [robust.distance(updates[d].weights, current) for d in order]
        ratios = robust.ratios(dists)
        out = []
        for d, dist, ratio, bad in zip(order, dists, ratios, robust.judge(dists, self.factor)):
            if not bad:
                continue
            u = updates.pop(d)
            reason = (f"its update moved the weights {ratio:.3g} times as far as the median of the others' "
                      f"(strategy.refuse_factor = {self.factor:g})")
            self.refuse(r, d, u.edge, reason, u.samples, distance=finite_or_none(dist), ratio=finite_or_none(ratio))
            out.append({"device": d, "reason": reason, "samples": u.samples})
        return finite_or_none(round(max(ratios), 4)), out

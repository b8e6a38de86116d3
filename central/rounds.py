"""One round's bookkeeping, pure (no network, no clock of its own): who takes part, whose
update is in, who is gone and since when, and when the round is complete.

A round's participants are the devices attached to some edge when it starts; a device
that is attached nowhere for longer than ``grace_s`` is dropped from the round (a failure
recorded with the samples it cost), so the round never waits for a peer known to be gone.
A device whose edge lost its link to the central is ``held``: the central cannot see it,
but it may well be training (only the edge's uplink broke), so its grace does not run out
while it is held; its absence still counts from when it was last seen. Each device's
update is taken once: a copy sent again after a lost link is a duplicate,
acknowledged and ignored (the same device computes the same weights, bit for bit). A
device whose update is refused (malformed: the central cannot sum it) is dropped at once:
the update was acknowledged, so nothing else will come from it this round, and waiting
for it would cost the others the whole round timeout.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Dropped:
    device: str
    reason: str
    samples: int
    absent_s: float
    refused: bool = False  # dropped because its update was refused, not because it was absent


@dataclass
class RoundTracker:
    round: int
    participants: frozenset[str]
    shard_samples: dict[str, int]
    grace_s: float
    started: float
    updates: dict[str, object] = field(default_factory=dict)
    dropped: dict[str, Dropped] = field(default_factory=dict)
    absent_since: dict[str, float] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Every participant delivered or was dropped."""
        return set(self.updates) | set(self.dropped) >= self.participants

    @property
    def waiting_for(self) -> list[str]:
        return sorted(self.participants - set(self.updates) - set(self.dropped))

    def presence(self, attached: set[str], now: float) -> None:
        """The devices attached to a live edge now."""
        for d in self.waiting_for:
            if d in attached:
                self.absent_since.pop(d, None)
            else:
                self.absent_since.setdefault(d, now)

    def offer(self, device: str, round: int) -> str:
        """Whether an update of ``device`` for ``round`` is taken: "take", or why not
        ("duplicate", "late", "refused" (a copy of one refused before), "stale", "not a
        participant")."""
        if round != self.round:
            return "stale" if round < self.round else "from the future"
        if device not in self.participants:
            return "not a participant"
        if device in self.updates:
            return "duplicate"
        if device in self.dropped:
            return "refused" if self.dropped[device].refused else "late"
        return "take"

    def take(self, device: str, update: object) -> None:
        self.updates[device] = update
        self.absent_since.pop(device, None)

    def expire(self, now: float, held: frozenset[str] = frozenset()) -> list[Dropped]:
        """Drop every participant absent for longer than the grace period (not ``held``)."""
        out = []
        for d in self.waiting_for:
            if d in held:
                continue
            since = self.absent_since.get(d)
            if since is not None and now - since > self.grace_s:
                rec = Dropped(d, f"attached to no edge for {now - since:.1f} s (faults.device_grace_s = "
                                 f"{self.grace_s:g})", self.shard_samples.get(d, 0), now - since)
                self.dropped[d] = rec
                out.append(rec)
        return out

    def drop(self, device: str, reason: str, now: float) -> Dropped | None:
        """Drop one participant now (round timeout)."""
        if device not in self.waiting_for:
            return None
        since = self.absent_since.get(device, now)
        rec = Dropped(device, reason, self.shard_samples.get(device, 0), now - since)
        self.dropped[device] = rec
        return rec

    def refuse(self, device: str, reason: str, now: float) -> Dropped | None:
        """Drop one participant whose update was refused, now, with the samples it cost;
        None if it was not waited for (its update was in, or it was dropped already)."""
        if device not in self.waiting_for:
            return None
        rec = Dropped(device, reason, self.shard_samples.get(device, 0), now - self.absent_since.get(device, now),
                      refused=True)
        self.dropped[device] = rec
        return rec

    def next_deadline(self, held: frozenset[str] = frozenset()) -> float | None:
        """When the next grace period runs out (None: nobody is absent and not held)."""
        pending = [self.absent_since[d] + self.grace_s for d in self.waiting_for
                   if d in self.absent_since and d not in held]
        return min(pending) if pending else None

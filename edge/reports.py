"""What a device may report to the central through its edge, and who it was.

A device sends ``FaultReport``s (a link it lost, a process of its own that started
again) and ``MigrationReport``s (a move it made); its edge forwards them to the central,
whose results keep them. A certificate proves who a device is, not that what it says is
true, so the edge forwards a report only if it speaks for its sender:

- a ``FaultReport`` names the device itself as ``process``, an edge of the testbed (or
  none) as ``peer``, and a kind a device has (``DEVICE_FAULT_KINDS``);
- a ``MigrationReport`` names the device itself, from an edge (or none) to an edge;
- every field is bounded: names are the testbed's, text is at most ``MAX_TEXT``
  characters, numbers lie in ranges no honest run leaves (``MAX_*`` below).

A report that breaks this is refused with ``ReportRefused`` (a ``RemoteProtocolError``:
the edge closes that link and records it). One that passes is stamped with the identity
that delivered it (``delivered_by``: the link's certificate, whatever the device wrote
there), and the central records that identity beside it.

Reports are also rate-limited per link (``ReportBudget``): a device that sends thousands
has the first ``REPORT_BURST`` forwarded, then ``REPORT_RATE`` a second; the rest are
dropped and counted (the edge says how many in its event log), so a flood costs the
central neither memory nor output lines. Pure: no socket, no clock of its own.
"""

from __future__ import annotations

import dataclasses
import math

from common import messages as m
from common.config import MODES
from common.errors import RemoteProtocolError

# What a device itself reports (``device.link``, ``device.client``): its link to an edge
# lost or silent, its own process started again. The others are what edges and the
# central see.
DEVICE_FAULT_KINDS = frozenset({"link_lost", "peer_silent", "restarted"})
# A device's own text (a detail, a recovery) is at most 300 characters where it is made;
# names are the config's.
MAX_TEXT = 300
# Bounds no honest run reaches: rounds and steps of a long run, a day for any pause or
# wait, a state of the payload cap, a dataset several times ImageNet's size.
MAX_ROUND = 1_000_000
MAX_STEP = 100_000_000
MAX_SECONDS = 86_400.0
MAX_STATE_BYTES = 1 << 32
MAX_SAMPLES = 10_000_000
# Per link: an honest device sends one report per move or reconnect, and the few held
# while it was unlinked all at once when it links again.
REPORT_BURST = 32
REPORT_RATE = 4.0  # a second, after the burst


class ReportRefused(RemoteProtocolError):
    """A device's report speaks for someone else, or holds a value out of bounds."""


def delivered_by(port: object, device: str) -> str:
    """The identity of the link ``port`` (a device's): its certificate's (``device NAME``),
    or in the shared-key mode, where the key is all a peer proves, the name it attached as."""
    identity = getattr(getattr(port, "conn", None), "identity", None)
    return str(identity) if identity is not None else f"device {device}"


def screen(msg: m.FaultReport | m.MigrationReport, *, device: str, edges: frozenset[str] | set[str],
           by: str) -> m.FaultReport | m.MigrationReport:
    """``msg`` from ``device``'s link, stamped ``delivered_by=by``, if it speaks only for
    ``device`` and every field is in bounds; else raises ``ReportRefused`` saying why."""
    where = f"{msg.TYPE} from {device}"
    if isinstance(msg, m.FaultReport):
        if msg.process != device:
            raise ReportRefused(f"{where}: speaks for {_quote(msg.process)}, not its sender")
        if msg.kind not in DEVICE_FAULT_KINDS:
            raise ReportRefused(f"{where}: kind {msg.kind} is not a device's to report")
        _name(where, "peer", msg.peer, edges)
        _text(where, "detail", msg.detail)
        _text(where, "recovery", msg.recovery)
        _count(where, "round", msg.round, MAX_ROUND)
        _count(where, "step", msg.step, MAX_STEP)
        _count(where, "replayed", msg.replayed, MAX_STEP)
        _count(where, "samples_lost", msg.samples_lost, MAX_SAMPLES)
        _seconds(where, "detected_s", msg.detected_s)
        _seconds(where, "down_s", msg.down_s)
    elif isinstance(msg, m.MigrationReport):
        if msg.device != device:
            raise ReportRefused(f"{where}: speaks for {_quote(msg.device)}, not its sender")
        _name(where, "source", msg.source, edges)
        _name(where, "target", msg.target, edges, empty=False)
        if msg.mode not in MODES:
            raise ReportRefused(f"{where}: mode {_quote(msg.mode)} is not one of {MODES}")
        _count(where, "round", msg.round, MAX_ROUND)
        _count(where, "step", msg.step, MAX_STEP)
        _count(where, "state_bytes", msg.state_bytes, MAX_STATE_BYTES)
        _text(where, "how", msg.how)
        _seconds(where, "pause_ms", msg.pause_ms / 1000)
        _seconds(where, "transfer_ms", msg.transfer_ms / 1000)
    else:  # pragma: no cover - the core passes reports only
        raise ReportRefused(f"{where}: not a report")
    return dataclasses.replace(msg, delivered_by=by)


def _quote(value: str) -> str:
    return repr(value[:40])  # what the peer wrote, short (printed escaped further on)


def _name(where: str, field: str, value: str, names: frozenset[str] | set[str], *, empty: bool = True) -> None:
    if value not in names and not (empty and value == ""):
        raise ReportRefused(f"{where}: {field} {_quote(value)} is not an edge of the testbed")


def _text(where: str, field: str, value: str) -> None:
    if len(value) > MAX_TEXT:
        raise ReportRefused(f"{where}: {field} of {len(value)} characters, more than {MAX_TEXT}")


def _count(where: str, field: str, value: int, limit: int) -> None:
    if not 0 <= value <= limit:
        raise ReportRefused(f"{where}: {field} {value} is outside 0..{limit}")


def _seconds(where: str, field: str, value: float) -> None:
    if not (math.isfinite(value) and 0.0 <= value <= MAX_SECONDS):
        raise ReportRefused(f"{where}: {field} {value!r} is not a time of 0..{MAX_SECONDS:g} s")


class ReportBudget:
    """A token bucket: ``take(now)`` is True for a report that may go on, False for one
    dropped (counted in ``dropped``)."""

    def __init__(self, *, burst: int = REPORT_BURST, rate: float = REPORT_RATE, now: float = 0.0) -> None:
        self.burst = burst
        self.rate = rate
        self._tokens = float(burst)
        self._at = now
        self.dropped = 0

    def take(self, now: float) -> bool:
        self._tokens = min(float(self.burst), self._tokens + max(0.0, now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self.dropped += 1
        return False


class ReportGate:
    """The budget of each device's current link. A new link of the device starts a new
    budget (an honest device reports once per move or reconnect, each on a new link); a
    report still arriving on a link the device replaced spends the current link's, so an
    old link cannot refill it."""

    def __init__(self, *, burst: int = REPORT_BURST, rate: float = REPORT_RATE) -> None:
        self.burst = burst
        self.rate = rate
        self._budgets: dict[str, tuple[object, ReportBudget]] = {}

    def admit(self, device: str, port: object, current: object, now: float) -> ReportBudget | None:
        """The budget that let a report from ``device`` on ``port`` go on (``current``:
        the device's link now, None if none), or None: dropped."""
        held = self._budgets.get(device)
        if held is None or (held[0] is not port and port is current):
            held = self._budgets[device] = (port, ReportBudget(burst=self.burst, rate=self.rate, now=now))
        return held[1] if held[1].take(now) else None

    def dropped(self, device: str) -> int:
        """Reports of ``device``'s current link dropped so far."""
        held = self._budgets.get(device)
        return held[1].dropped if held is not None else 0

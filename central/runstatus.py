"""How a run ended, in ``summary.json``, whatever ended it (no torch here: the launcher
uses it).

``status`` is one of ``STATUSES``, with ``reason`` beside it: "running" while the central
is at work; "finished" (every round done), "stopped" (a signal: Ctrl-C, SIGTERM, the
launcher tearing the testbed down) or "failed" (the run could not go on). The central
writes its own end; ``settle`` is for whoever finds a run that could not (a central
killed outright, or stopped before it had a summary): it says so without touching what
was recorded.

``RunStopped`` is what a signal turns into in the central's main thread (``install``):
raised once, wherever the thread is, so that a run stopped at any moment, before round 1
included, still writes how it ended. Later signals are ignored: Ctrl-C reaches the whole
process group and the launcher's SIGTERM follows it; neither may cut that end short (the
launcher's SIGKILL comes after ``common.supervisor.KILL_AFTER_S`` all the same).
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

from common.atomic import write_json_atomic

SUMMARY = "summary.json"
STATUSES = ("running", "finished", "stopped", "failed")


class RunStopped(KeyboardInterrupt):
    """A signal asked the run to stop."""

    def __init__(self, signame: str) -> None:
        super().__init__(signame)
        self.signame = signame


def install(signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """Turn the first of ``signals`` into ``RunStopped`` in the main thread; ignore later ones."""
    fired: list[str] = []

    def handler(signum: int, frame: Any) -> None:
        if fired:
            return
        fired.append(signal.Signals(signum).name)
        raise RunStopped(fired[0])

    for sig in signals:
        signal.signal(sig, handler)


def exit_code(status: str, signame: str = "") -> int:
    """0 finished; 128 + the signal's number stopped (the shell's way); 1 failed."""
    if status == "finished":
        return 0
    if status == "stopped" and signame:
        return 128 + int(getattr(signal, signame, signal.SIGTERM))
    return 1


def read(run_dir: str) -> dict[str, Any] | None:
    """summary.json of ``run_dir``, or None if there is none (or it is not a JSON object)."""
    try:
        with open(os.path.join(run_dir, SUMMARY), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def settle(run_dir: str, status: str, reason: str, header: dict[str, Any] | None = None) -> bool:
    """Say in ``run_dir``'s summary.json that the run ended with ``status`` and ``reason``,
    if it does not say how it ended already: a missing summary is written (``header`` and
    no rounds), one still "running" gets ``status`` and ``reason`` and keeps the rest.
    Returns whether it wrote. Raises ``OSError`` when it cannot write."""
    if status not in STATUSES[1:]:
        raise ValueError(f"status must be one of {', '.join(STATUSES[1:])}")
    summary = read(run_dir)
    if summary is not None and summary.get("status") != "running":
        return False
    if summary is None:
        if not os.path.isdir(run_dir):
            os.makedirs(run_dir, exist_ok=True)
        summary = {**(header or {}), "rounds": [], "devices": {}, "migrations": [], "failures": [], "faults": [],
                   "final_model_sha256": None}
    summary["status"] = status
    summary["reason"] = reason
    write_json_atomic(os.path.join(run_dir, SUMMARY), summary, indent=2)
    return True

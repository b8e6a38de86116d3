"""The edge's training thread: steps are trained here, beside the core, not on it.

    core     Activations -> StepJob ----> trainer thread: session.train_step (forward,
                                                 backward, reply, optimizer step)
    core  <- StepDone (the job's outcome) <-----'

While a device's step is on this thread the core holds every event that concerns that
device (and every event that concerns no device in particular, a stop or a tick
excepted, and whatever came after such an event), and handles them in their order once
the step is done (``EdgeCore._waits``): nothing snapshots, moves or drops a session
while it trains, as when the core trained steps itself. What the core no longer does is wait for a step: an
attach, an install or a pull of *another* device is handled while a step trains, so a
device that moves to a busy edge is not kept waiting for someone else's step.

One long-lived thread for every session of the edge, so a migrated session never lands
on a cold thread (the first PyTorch step on a new OS thread is slower). Steps are trained
one at a time in the order the core hands them over, as the core trained them before.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from common.errors import MigrationError, RemoteProtocolError
from edge.session import EdgeSession

log = logging.getLogger("edge")


@dataclass
class StepDone:
    """A step the trainer finished: ``trained`` as ``EdgeSession.train_step`` returned it,
    or ``error`` (then the session is unchanged, and the device broke the protocol)."""
    job: "StepJob"
    trained: bool = False
    error: RemoteProtocolError | None = None

    @property
    def device(self) -> str:
        return self.job.device


@dataclass
class StepJob:
    """One step of one session, with the reply that sends its gradient."""
    device: str
    session: EdgeSession
    round: int
    step: int
    x: torch.Tensor
    y: torch.Tensor
    reply: Callable[[torch.Tensor, float], None]
    cut_first: bool = True  # training.cut_gradient_first

    def run(self) -> StepDone:
        """Train it (on whatever thread calls this); never raises for a bad batch."""
        try:
            trained = self.session.train_step(self.step, self.x, self.y, self.reply, cut_first=self.cut_first)
        except MigrationError as exc:
            return StepDone(self, error=RemoteProtocolError(str(exc)))
        except Exception as exc:  # noqa: BLE001 - shapes or values that do not fit the edge part
            return StepDone(self, error=RemoteProtocolError(
                f"edge part cannot take this batch: {type(exc).__name__}: {exc}"))
        return StepDone(self, trained=trained)


class Trainer:
    """The thread; ``done(StepDone)`` is called on it after each step (the core's
    ``submit``)."""

    def __init__(self, done: Callable[[StepDone], None], *, name: str = "trainer") -> None:
        self._done = done
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "Trainer":
        self._thread.start()
        return self

    def submit(self, job: StepJob) -> None:
        self._jobs.put(job)

    def stop(self, timeout: float = 5.0) -> None:
        """Finish the steps handed over so far and end the thread."""
        self._jobs.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                outcome = job.run()
            except BaseException as exc:  # pragma: no cover - run() catches what a batch can cause
                log.exception("trainer: step %s of %s failed", job.step, job.device)
                outcome = StepDone(job, error=RemoteProtocolError(f"edge step failed: {exc}"))
            self._done(outcome)

"""The run's end, however it came (every round done, a signal, a failure): said on the
terminal and in the event log, written down (the final weights and summary.json,
``RunResults.finish``), the edges told to shut down, and the exit status
(``central.runstatus.exit_code``)."""

from __future__ import annotations

import time
from typing import Callable

import torch

from central.edges import EdgeRegistry
from central.results import RunResults, final_table
from central.runstatus import exit_code
from common import messages as m
from common.events import EventLog
from common.transport import Listener

# After the Shutdown, how long the edges' links get to deliver it (one small message; the
# run is over, so a lost link only delays the exit).
SHUTDOWN_FLUSH_S = 2.0


def end_run(results: RunResults, weights: dict[str, torch.Tensor] | None, *, status: str, reason: str,
            signame: str, registry: EdgeRegistry, listener: Listener | None, events: EventLog,
            say: Callable[[str], None]) -> int:
    """Write the run's end (``status``, ``reason``; ``signame``: the signal that stopped
    it), close every edge's link and the ``listener``; returns the exit status. A summary
    that cannot be written is said, and the status is then at least 1."""
    if status != "finished":
        say(f"run {status}: {reason}")
        events.emit(status, reason=reason)
    try:
        sha = results.finish(weights, status=status, reason=reason)
        status, reason = results.summary["status"], results.summary["reason"]
        code = exit_code(status, signame)
    except OSError as exc:
        sha, code = None, exit_code(status, signame) or 1
        say(f"central: error: the results cannot be written in {results.run_dir}: {exc}; "
            f"summary.json there is the last one written, whole")
    if results.summary.get("final_model_error"):
        say(f"central: error: {results.summary['final_model_error']}")
    events.emit("finished", status=status, reason=reason, final_model_sha256=sha)
    links = registry.close_all(notice=m.Shutdown(reason=f"run {status}"))
    deadline = time.monotonic() + SHUTDOWN_FLUSH_S
    for link in links:
        link.wait_closed(max(0.0, deadline - time.monotonic()))
    if listener is not None:
        listener.close()
    say(final_table(results.summary))
    say(f"central: results in {results.run_dir}")
    return code

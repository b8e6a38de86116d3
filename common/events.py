"""Event log: one JSON object per line, per process, with CPU and memory from psutil.

Events raised before the run folder is known (an edge or device learns the run's name
from its peer) are kept in memory and written once ``open`` names the file.

Writing an event never raises: a process out of descriptors, disk or memory must not die
of a log line. A line that cannot be written is counted (``dropped``) and dropped; a file
that cannot be opened is tried again at later events while lines wait in memory (at most
``MAX_PENDING``, the rest counted and dropped). When writing works again, an
``events_dropped`` line says how many were lost.

Every event and its fields are declared in ``common.eventschema`` (the log's schema, listed
in docs/RESULTS.md). Every string an event holds is written ``printable`` (``common.text``): events quote what
peers sent (names, details, errors), and a line read back with ``jq -r`` or ``grep`` must
not carry a peer's escape sequences to the reader's terminal.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

import psutil

from common import eventschema
from common.text import printable_fields

log = logging.getLogger(__name__)

# Lines held while no file is open: enough for a start-up's worth of events; a flood of
# them while the file cannot be opened must not grow memory without bound.
MAX_PENDING = 10_000
# A file that failed to open is tried again at most this often (at the next event).
REOPEN_S = 1.0


class EventLog:
    def __init__(self, *, process: str, role: str) -> None:
        self.process = process
        self.role = role
        self._proc = psutil.Process()
        try:
            self._proc.cpu_percent(None)  # first call primes the counter
        except (OSError, psutil.Error):
            pass
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._file = None
        self._folder: str | None = None   # where ``open`` was asked to write
        self._next_try = 0.0
        self.path: str | None = None
        self.dropped = 0          # lines lost (write failed, or too many held)
        self._dropped_said = 0    # of them, already said in an ``events_dropped`` line
        self._undeclared: set[str] = set()  # events already warned of as not in the schema

    def open(self, folder: str) -> None:
        """Start writing to ``folder/events-<process>.jsonl`` (flushing what was held back).
        Each process life has its own file: a process started again in the same run (a
        resumed central, a restarted edge) writes ``events-<process>.1.jsonl``, and so on.
        Never raises: a folder or file that cannot be made is tried again at later events."""
        with self._lock:
            if self._file is not None:
                return
            self._folder = folder
            self._try_open()

    def _try_open(self) -> bool:
        """Open the file (lock held); False, and a later retry, if that fails."""
        folder = self._folder
        if folder is None:
            return False
        try:
            os.makedirs(folder, exist_ok=True)
            path, n = os.path.join(folder, f"events-{self.process}.jsonl"), 0
            while os.path.exists(path):
                n += 1
                path = os.path.join(folder, f"events-{self.process}.{n}.jsonl")
            self._file = open(path, "a", encoding="utf-8")
        except OSError as exc:
            self._next_try = time.monotonic() + REOPEN_S
            log.warning("event log: cannot open a file in %s (%s); %d lines held", folder, exc, len(self._pending))
            return False
        self.path = path
        pending, self._pending = self._pending, []
        self._write(pending)
        return True

    def _write(self, lines: list[str]) -> None:
        """Write ``lines`` (lock held); a failure drops and counts them."""
        if not lines:
            return
        lost = self.dropped - self._dropped_said
        head = [self._line("events_dropped", {"count": lost, "total": self.dropped}, stats=False)] if lost else []
        try:
            self._file.write("".join(head + lines))
            self._file.flush()
        except (OSError, ValueError) as exc:  # ValueError: a file closed under us
            self.dropped += len(lines)
            if self.dropped == len(lines) or self.dropped % 1000 < len(lines):  # the first, then every ~1000
                log.warning("event log: write failed (%s); %d lines dropped so far", exc, self.dropped)
            return
        self._dropped_said += lost

    def _line(self, event: str, fields: dict[str, Any], *, stats: bool = True) -> str:
        cpu = rss = None
        if stats:
            try:  # psutil opens /proc files: out of descriptors, the line goes without these
                rss = round(self._proc.memory_info().rss / 2**20, 1)
                cpu = self._proc.cpu_percent(None)
            except (OSError, psutil.Error):
                pass
        record = {"ts": round(time.time(), 6), "process": self.process, "role": self.role, "event": event,
                  "cpu_percent": cpu, "rss_mb": rss, **printable_fields(fields)}
        return json.dumps(record, default=str) + "\n"

    def emit(self, event: str, **fields: Any) -> None:
        """Write one event (held in memory until ``open``). Never raises, but for an event
        or field ``common.eventschema`` does not declare, where ``eventschema.strict()`` (the
        tests); elsewhere such a line is written all the same, with a warning once."""
        bad = eventschema.problem(event, fields)
        if bad:
            if eventschema.strict():
                raise eventschema.EventSchemaError(bad)
            if event not in self._undeclared:
                self._undeclared.add(event)
                log.warning("event log: %s", bad)
        try:
            line = self._line(event, fields)
        except Exception:  # noqa: BLE001 - a field that cannot be serialised, memory: the event is lost
            with self._lock:
                self.dropped += 1
            return
        with self._lock:
            if self._file is None and self._folder is not None and time.monotonic() >= self._next_try:
                self._try_open()
            if self._file is None:
                if len(self._pending) >= MAX_PENDING:
                    self.dropped += 1
                else:
                    self._pending.append(line)
            else:
                self._write([line])

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                try:
                    self._file.close()
                except OSError:
                    self.dropped += 1
                self._file = None
            if self.dropped:
                log.warning("event log of %s: %d lines could not be written", self.process, self.dropped)

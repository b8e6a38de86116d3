"""Event log: one JSON object per line, per process, with CPU and memory from psutil.

Events raised before the run folder is known (an edge or device learns the run's name
from its peer) are kept in memory and written once ``open`` names the file.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import psutil


class EventLog:
    def __init__(self, *, process: str, role: str) -> None:
        self.process = process
        self.role = role
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)  # first call primes the counter
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._file = None
        self.path: str | None = None

    def open(self, folder: str) -> None:
        """Start writing to ``folder/events-<process>.jsonl`` (flushing what was held back).
        Each process life has its own file: a process started again in the same run (a
        resumed central, a restarted edge) writes ``events-<process>.1.jsonl``, and so on."""
        os.makedirs(folder, exist_ok=True)
        with self._lock:
            if self._file is not None:
                return
            path, n = os.path.join(folder, f"events-{self.process}.jsonl"), 0
            while os.path.exists(path):
                n += 1
                path = os.path.join(folder, f"events-{self.process}.{n}.jsonl")
            self.path = path
            self._file = open(self.path, "a", encoding="utf-8")
            for line in self._pending:
                self._file.write(line)
            self._pending.clear()
            self._file.flush()

    def emit(self, event: str, **fields: Any) -> None:
        mem = self._proc.memory_info().rss
        record = {"ts": round(time.time(), 6), "process": self.process, "role": self.role, "event": event,
                  "cpu_percent": self._proc.cpu_percent(None), "rss_mb": round(mem / 2**20, 1), **fields}
        line = json.dumps(record, default=str) + "\n"
        with self._lock:
            if self._file is None:
                self._pending.append(line)
            else:
                self._file.write(line)
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

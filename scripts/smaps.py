"""``/proc/PID/smaps_rollup`` read once: a process's RSS, PSS, USS and anonymous memory.

Torch-free and import-light on purpose: ``scripts.memprobe`` reads it inside a device
process between its stages, the benchmarks for every process of a testbed each second
(one read per process, where psutil's USS walks every mapping: too slow for a hundred
processes). A process that is gone, or a zombie, raises ``OSError`` (ProcessLookupError).
"""

from __future__ import annotations


def rollup(pid: int | str = "self") -> dict[str, float]:
    """MiB of ``pid``: ``rss``, ``pss`` (shared pages split among the processes mapping
    them), ``uss`` (private pages, clean and dirty) and ``anon`` (anonymous)."""
    kb: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "kB":
                kb[parts[0].rstrip(":")] = int(parts[1])
    return {"rss": kb.get("Rss", 0) / 1024, "pss": kb.get("Pss", 0) / 1024,
            "uss": (kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)) / 1024,
            "anon": kb.get("Anonymous", 0) / 1024}

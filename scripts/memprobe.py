"""Memory read inside a real device process, stage by stage (``scripts.bench_memory``).

``scripts.bench_memory`` starts a testbed with a ``sitecustomize`` on the path that calls
``install()`` in the device process only: it wraps the functions a device runs (its
warm-up, data, client, link, steps) to read ``/proc/self/smaps_rollup`` and glibc's
``mallinfo2`` as each stage ends, and writes what it read to ``$MEMPROBE_OUT`` (JSON). The
device's code runs as it is; the probe adds only the reads (no thread of its own), and,
after the last round's update is delivered, one ``malloc_trim(0)`` to show what malloc
keeps.
"""

from __future__ import annotations

import ctypes
import json
import os
from typing import Any

from scripts.smaps import rollup

OUT_ENV = "MEMPROBE_OUT"
_MIB = 1 << 20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc():
    try:
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = _MallInfo2
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def malloc_stats() -> dict[str, float]:
    """glibc's own count, MiB: ``heap`` (main and thread arenas, from the system),
    ``heap_used`` / ``heap_free`` (in blocks handed out / freed and kept), ``mmapped``
    (blocks served by mmap)."""
    if _LIBC is None:
        return {}
    mi = _LIBC.mallinfo2()
    return {"heap": mi.arena / _MIB, "heap_used": mi.uordblks / _MIB, "heap_free": mi.fordblks / _MIB,
            "mmapped": mi.hblkhd / _MIB}


def mappings(pid: int | str = "self") -> dict[str, float]:
    """Private MiB of ``pid`` by kind of mapping: ``heap`` (the main arena), ``thread
    arenas`` (glibc's 64 MiB-aligned heaps of other threads), ``thread stacks`` (behind a
    guard page), ``file`` (pages of mapped files written or mapped by this process only),
    ``anonymous`` (the rest: torch's and Python's own mmaps, malloc's mmap'd blocks)."""
    maps: list[dict[str, Any]] = []
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if not parts[0].endswith(":") and "-" in parts[0]:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                maps.append({"lo": lo, "hi": hi, "perm": parts[1], "name": parts[5] if len(parts) > 5 else "",
                             "kb": 0})
            elif parts[0] in ("Private_Clean:", "Private_Dirty:"):
                maps[-1]["kb"] += int(parts[1])
    kinds: dict[str, float] = {}
    for i, m in enumerate(maps):
        after = maps[i + 1] if i + 1 < len(maps) else None
        before = maps[i - 1] if i else None
        if m["name"] == "[heap]":
            kind = "heap"
        elif m["name"].startswith("/"):
            kind = "file"
        elif m["name"]:
            kind = "other"
        elif m["lo"] % (64 * _MIB) == 0 and after and after["lo"] == m["hi"] and after["perm"].startswith("---"):
            kind = "thread arenas"
        elif before and before["hi"] == m["lo"] and before["perm"].startswith("---") \
                and before["hi"] - before["lo"] == 4096:
            kind = "thread stacks"
        else:
            kind = "anonymous"
        kinds[kind] = kinds.get(kind, 0.0) + m["kb"] / 1024
    return kinds


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


class Probe:
    """What the device's stages read; written out after each stage."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.data: dict[str, Any] = {"stages": {}, "steps": [], "step_peak_rss": []}
        self.mark("interpreter")

    def mark(self, stage: str, *, detail: bool = False) -> dict[str, float]:
        read = {**rollup(), **{f"malloc {k}": v for k, v in malloc_stats().items()}, "threads": threads()}
        if detail:
            read["mappings"] = mappings()
        self.data["stages"][stage] = read
        self.write()
        return read

    def write(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f)
        os.replace(tmp, self.path)


def _after(owner: Any, name: str, then) -> None:
    """Wrap ``owner.name`` so that ``then(result, *args)`` runs after each call."""
    fn = getattr(owner, name)

    def wrapped(*args, **kwargs):
        result = fn(*args, **kwargs)
        then(result, *args)
        return result

    setattr(owner, name, wrapped)


def _peak_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the RSS now


def _peak_rss() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _round_tensors(rnd) -> int:
    """Bytes of the tensors a round holds: its start weights, model, optimizer state and
    kept steps."""
    import torch

    seen: dict[int, int] = {}

    def add(obj) -> None:
        if isinstance(obj, torch.Tensor):
            seen[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
        elif isinstance(obj, dict):
            for v in obj.values():
                add(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                add(v)

    add([rnd.start, rnd.model.state_dict(), [p.grad for p in rnd.model.parameters()], rnd.opt.state_dict(),
         rnd.ckpts])
    return sum(seen.values())


def install() -> None:
    """Wrap the device's stages (called by the bench's ``sitecustomize`` in the device)."""
    probe = Probe(os.environ[OUT_ENV])
    import common.data
    import common.training
    import device.client
    import device.link

    probe.mark("modules imported")
    _after(common.training, "warm_up", lambda r, *a: probe.mark("threads, malloc, warm-up"))
    def data(shard, *args) -> None:
        probe.data["data_mb"] = sum(t.numel() * t.element_size() for t in shard) / _MIB
        probe.mark("credentials, data shard")

    _after(common.data, "load_train_shard", data)
    _after(device.client.DeviceClient, "__init__", lambda r, *a: probe.mark("credentials, client, link objects"))
    _after(device.link.EdgeLink, "join", lambda r, *a: probe.mark("joined (TLS, link threads, control)"))
    client = device.client.DeviceClient
    split_step = client._split_step

    def step(self, rnd, x, y):
        read = rollup()
        probe.data["steps"].append({"uss": read["uss"], "anon": read["anon"], "round": rnd.round,
                                    "step": rnd.step})
        _peak_reset()
        result = split_step(self, rnd, x, y)
        probe.data["step_peak_rss"].append(_peak_rss() - read["rss"])
        return result

    client._split_step = step
    link_step = device.link.EdgeLink.step

    def activations(self, *args, **kwargs):
        live = rollup()["uss"]
        probe.data.setdefault("forward_live", []).append(live)
        return link_step(self, *args, **kwargs)

    device.link.EdgeLink.step = activations
    finish = client._finish

    def finished(self, rnd):
        outcome = finish(self, rnd)
        if rnd.round == self.cfg.training.rounds - 1:
            probe.data["round_tensors_mb"] = _round_tensors(rnd) / _MIB
            probe.mark("last round delivered", detail=True)
            if _LIBC is not None:
                _LIBC.malloc_trim(0)
            probe.mark("after malloc_trim(0)", detail=True)
        return outcome

    client._finish = finished

"""scripts.bench_memory_arm64's split of a process's private memory into the guest's
mappings and the rest (qemu's own), checked on this process, which has no qemu: its own
maps are all "guest"."""

from __future__ import annotations

import os

from scripts.bench_memory_arm64 import qemu_split
from scripts.smaps import rollup


def test_own_maps_hold_every_private_page():
    with open("/proc/self/maps") as f:
        maps = f.read()
    split = qemu_split(os.getpid(), maps)
    uss = rollup()["uss"]
    assert split["qemu"] < 1.0, split  # a mapping made between the two reads, at most
    assert abs(split["guest"] - uss) < 0.05 * uss, (split, uss)
    assert 0 < split["guest anon"] <= rollup()["anon"] + 1.0


def test_no_guest_maps_leave_everything_to_qemu():
    split = qemu_split(os.getpid(), "")
    assert split["guest"] == 0 and split["guest anon"] == 0
    assert split["qemu"] > 0

"""``training.malloc``: glibc's malloc tuned so that a step's big blocks are reused, not
faulted in afresh every step (``common.training.tune_malloc``). Each case runs in its own
process, since the setting is the whole process's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from common.config import build_config
from common.errors import ConfigError
from tests.test_config import assert_names, local_raw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A step's pattern: several big blocks (activations, a convolution's buffers, a frame)
# made, written whole, and freed together, step after step. glibc's own threshold follows
# the largest block freed, so the blocks come from the heap after the first step; but
# when the step's blocks are freed together, more than twice that threshold lies free at
# the heap's top, which it hands back to the system, and the next step faults it in anew.
PROBE = r"""
import json, resource, sys
from common.training import tune_malloc
def anon_kb():
    return next(int(l.split()[1]) for l in open("/proc/self/smaps_rollup") if l.startswith("Anonymous:"))
took = tune_malloc(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
anon_before = anon_kb()
for step in range(20):
    blocks = [bytearray(6 << 20) for _ in range(3)]   # zero-filled: every page touched
    del blocks                                         # the step's end
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"took": took, "faults": faults, "kept_kb": anon_kb() - anon_before}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux hosts")
def test_tuned_malloc_reuses_big_blocks_where_the_system_one_faults_them_in_again():
    system, tuned = _probe("system"), _probe("tuned")
    assert system["took"] is False
    if not tuned["took"]:
        pytest.skip("this C library has no glibc mallopt (left as it is, as the product does)")
    pages = 20 * 3 * (6 << 20) // 4096  # every block's pages, were each faulted in anew
    assert system["faults"] > pages // 2, system
    assert tuned["faults"] < system["faults"] // 4, (tuned, system)


def test_the_malloc_setting_is_checked():
    raw = local_raw()
    raw["training"]["malloc"] = "jemalloc"
    with pytest.raises(ConfigError) as info:
        build_config(raw)
    assert_names(info.value, "training.malloc")
    raw["training"]["malloc"] = "system"
    assert build_config(raw).training.malloc == "system"
    raw["training"]["malloc"] = "lean"
    assert build_config(raw).training.malloc == "lean"
    del raw["training"]["malloc"]
    assert build_config(raw).training.malloc == "auto"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux hosts")
def test_lean_malloc_gives_a_steps_big_blocks_back_where_tuned_keeps_them():
    tuned, lean = _probe("tuned"), _probe("lean")
    if not lean["took"]:
        pytest.skip("this C library has no glibc mallopt (left as it is, as the product does)")
    step_kb = 3 * (6 << 20) // 1024
    assert tuned["kept_kb"] > step_kb // 2, tuned
    assert lean["kept_kb"] < step_kb // 8, lean


def test_auto_is_lean_on_a_small_host_only(monkeypatch):
    from common import malloc
    assert malloc.resolve("system") == "system"
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": (1 << 30) // 4096}   # a Raspberry Pi 3
    monkeypatch.setattr(malloc.os, "sysconf", lambda name: pages[name])
    assert malloc.resolve("auto") == "lean"
    pages["SC_PHYS_PAGES"] = (24 << 30) // 4096
    assert malloc.resolve("auto") == "tuned"

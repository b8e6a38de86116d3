"""One /proc/PID/smaps_rollup parser for the memory benchmarks and the in-device probe."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from scripts.smaps import rollup


def test_this_process():
    mb = rollup()
    assert set(mb) == {"rss", "pss", "uss", "anon"}
    assert 0 < mb["uss"] <= mb["pss"] <= mb["rss"] and 0 < mb["anon"] <= mb["rss"]


def test_torch_free():
    out = subprocess.run([sys.executable, "-c", "import sys; from scripts import memprobe, smaps; "
                          "print(sorted(m for m in ('torch', 'psutil', 'scripts.benchlib') if m in sys.modules))"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_zombie_raises_oserror():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        for _ in range(200):  # until it has exited (not reaped: a zombie)
            with open(f"/proc/{child.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.05)
        with pytest.raises(OSError):
            rollup(child.pid)
    finally:
        child.wait()

"""Roles that do not train do not load torch (issue 25): the launcher, the mobility
controller, the certificate command, the namespace testbed and what the scenario scripts
run start without it. Each entry module is imported in a fresh interpreter, which then
names every heavy module it holds. Their start-up time and memory are figures, printed by
``python -m scripts.bench_memory``, not asserted here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What the scenario scripts (scripts/scenarios/common.sh) run is central.mobility and
# common.config; the launcher and the namespace testbed only start processes.
LIGHT = ["central.launch", "central.mobility", "scripts.certs", "scripts.netns_testbed", "common.config"]
HEAVY = ["torch", "numpy", "torchvision"]

PROBE = r"""
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(m for m in sys.argv[2:] if m in sys.modules)))
"""


def _heavy_modules_after(module: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", PROBE, module, *HEAVY], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("module", LIGHT)
def test_entry_module_does_not_import_torch(module):
    assert _heavy_modules_after(module) == []


def test_probe_sees_torch_where_it_is_imported():
    # the probe itself can fail: a role that trains does load torch
    assert "torch" in _heavy_modules_after("common.training")


CONTROL_EXCHANGE = r"""
import json, sys
from common import codec, messages as m
sent = [m.MoveCommand(device="d1", to="edge2"), m.StatusRequest(),
        m.MoveReply(accepted=True, reason="", edge="edge2"),
        m.StatusReply(device="d1", edge="edge2", round=1, step=3, steps=5, pending="", link="attached")]
got = list(codec.decode_all(b"".join(codec.encode_bytes(msg) for msg in sent)))
print(json.dumps({"same": got == sent, "torch": "torch" in sys.modules}))
"""


def test_control_exchange_encodes_and_decodes_without_torch():
    # the controller's whole exchange (commands out, replies back) through the real codec
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", CONTROL_EXCHANGE], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    assert json.loads(out.stdout) == {"same": True, "torch": False}

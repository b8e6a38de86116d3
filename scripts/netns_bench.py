"""A benchmark's testbed run inside the netns testbed, behind a shaped backhaul.

``scripts.netns_testbed`` gives every host its own network namespace and shapes the
links with ``tc tbf`` (``netem`` is not available here). A benchmark writes its testbed
file as for loopback (``benchlib.write_config``); ``launch`` runs it there, with every
host's address taken from the netns config (``configs/netns.toml`` unless told: the
topology comes from a config, never from code), the edges' uplinks (edge to edge, edge to
central) at ``backhaul_mbit`` and every other link unshaped, so that what a policy sends
between edges is what the shaping shows. The testbed's driver plays the moves: it re-wires
the device's link to the destination edge's network, then sends the move.

Needs root and iproute2 (``probe`` says why not); every namespace is gone afterwards.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from common.config import load_config
from scripts import benchlib

NETNS_CONFIG = benchlib.ROOT / "configs" / "netns.toml"
STOP_GRACE_S = 30.0  # netns_testbed tears its network down on SIGTERM


def overrides(cfg_path: Path, backhaul_mbit: float, netns_config: Path = NETNS_CONFIG) -> list[str]:
    """``--set`` overrides that put ``cfg_path``'s hosts at the netns config's addresses
    (edges and devices by name) and shape only the backhaul."""
    cfg, lab = load_config(str(cfg_path)), load_config(str(netns_config))
    missing = [e for e in cfg.edges if e not in lab.edges] + [d for d in cfg.devices if d not in lab.devices]
    if missing:
        raise SystemExit(f"netns_bench: {netns_config} has no address for {', '.join(missing)}")
    sets = [f'central.host="{lab.central.host}"']
    sets += [f'edges.{e}.host="{lab.edges[e].host}"' for e in cfg.edges]
    sets += [f'devices.{d}.host="{lab.devices[d].host}"' for d in cfg.devices]
    return sets + ["links.device_mbit=0.0", f"links.edge_mbit={float(backhaul_mbit)!r}", "links.central_mbit=0.0"]


def launch(cfg_path: Path, backhaul_mbit: float, *, timeout: float,
           netns_config: Path = NETNS_CONFIG) -> benchlib.RunOutcome:
    """Run ``cfg_path`` through ``scripts.netns_testbed run``; its output goes to
    ``<config>.out``. After ``timeout`` seconds it is told to stop (SIGTERM: it kills its
    roles and deletes its namespaces), then killed. Raises ``benchlib.RunFailed`` unless
    the run finished."""
    cmd = [sys.executable, "-m", "scripts.netns_testbed", "run", "--config", str(cfg_path)]
    cmd += [a for o in overrides(cfg_path, backhaul_mbit, netns_config) for a in ("--set", o)]
    out_path = cfg_path.with_suffix(".out")
    t0 = time.monotonic()
    with benchlib.ForeignLoad() as foreign, open(out_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=benchlib.ROOT, env=benchlib._env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                benchlib.kill_tree(proc.pid)
                proc.wait()
            status = 124
    text = out_path.read_text(errors="replace")
    run_dir = next((Path(line.split(": ", 1)[1].strip()) for line in text.splitlines()
                    if line.startswith("results: ")), None)
    summary = None
    if run_dir is not None and (run_dir / "summary.json").exists():
        summary = json.loads((run_dir / "summary.json").read_text())
    res = benchlib.RunOutcome(status, time.monotonic() - t0, run_dir, summary, out_path, foreign.share)
    if not res.ok:
        tail = "\n".join(text.splitlines()[-25:])
        raise benchlib.RunFailed(f"netns run {cfg_path.stem} ended with status {status} (output: {out_path})\n{tail}")
    return res

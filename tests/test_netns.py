"""The lab on one machine: hosts in network namespaces with shaped links
(scripts/netns_testbed.py), and devices slower than the machine they run on.

The namespace tests need root (CAP_NET_ADMIN) and iproute2; elsewhere they are skipped with
the reason. Their traffic stays inside namespaces they create (addresses from
configs/netns.toml), and each run's namespaces, links and processes are gone afterwards.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from common.config import load_config
from common.errors import ConfigError
from scripts.netns_testbed import (BACKBONE, build_commands, moves_override, namespaces_named, parse_move, plan, probe,
                                   reshape_commands)
from tests.test_exactness import reference_sha
from tests.testbed import LOOPBACK, ROOT, _env, kill_tree, run_dir_of, run_launch, write_config

NETNS = ROOT / "configs" / "netns.toml"
# A short run of configs/netns.toml: 1 round of 4 steps on each of its 4 devices (the move
# at its half: every check below needs no second round).
SHORT = ["training.rounds=1", "training.batch_size=50", "data.samples_per_device=200", "data.test_samples=500",
         "mobility.moves=[]"]


# -- the plan (no root needed) ------------------------------------------------------------

def test_plan_follows_the_config():
    cfg = load_config(str(NETNS))
    p = plan(cfg, prefix="fftest")
    assert p.hosts["central"].bridge == BACKBONE and p.hosts["central"].mbit == cfg.links.central_mbit
    for e in cfg.edges:
        assert p.hosts[e].bridge == p.edge_bridges[e]
    for d, dev in cfg.devices.items():
        assert p.hosts[d].bridge == p.edge_bridges[dev.edge]
        assert p.hosts[d].mbit == (dev.link_mbit or cfg.links.device_mbit)
    assert p.hosts["device3"].mbit == 10 and p.hosts["device1"].mbit == 20  # link_mbit wins over device_mbit
    assert [u.mbit for u in p.uplinks] == [cfg.links.edge_mbit] * len(cfg.edges)
    # addresses are the config's, names fit Linux's 15 characters, namespaces are ours
    want = {cfg.central.host} | {e.host for e in cfg.edges.values()} | {d.host for d in cfg.devices.values()}
    assert {h.address for h in p.hosts.values()} == want
    ifnames = [h.port for h in p.hosts.values()] + [u.near for u in p.uplinks] + [u.far for u in p.uplinks]
    assert len(set(ifnames)) == len(ifnames) and all(len(n) <= 15 for n in ifnames)
    assert len(set(p.namespaces)) == len(p.namespaces) and all(ns.startswith("fftest-") for ns in p.namespaces)
    # every command acts inside one of our namespaces, never on the machine's own network
    for cmd in build_commands(p):
        if cmd[:3] == ["ip", "netns", "add"]:
            assert cmd[3] in p.namespaces
        else:
            assert cmd[1] == "-n" and cmd[2] in p.namespaces, cmd
            if cmd[0] == "tc":
                assert "tbf" in cmd


def test_an_edges_link_rate_shapes_its_devices_and_follows_a_move():
    cfg = load_config(str(NETNS), ["edges.edge2.link_mbit=5"])
    p = plan(cfg, prefix="fftest")
    # device4 (on edge2, no rate of its own) takes edge2's; device3's own 10 wins; edge1's follow device_mbit
    assert {d: p.hosts[d].mbit for d in cfg.devices} == {"device1": 20, "device2": 20, "device3": 10, "device4": 5}
    assert cfg.link_rate("device2", "edge2") == 5 and cfg.link_rate("device4", "edge1") == 20
    assert cfg.link_rate("device3", "edge2") == 10
    for cmd in reshape_commands(p, "device2", 5.0):
        assert cmd[:3] == ["tc", "-n", cmd[2]] and cmd[2] in p.namespaces and "tbf" in cmd and "5mbit" in cmd
    assert [c[4] for c in reshape_commands(p, "device2", 0.0)] == ["del", "del"]


def test_plan_refuses_addresses_a_namespace_testbed_cannot_use():
    cfg = load_config(str(NETNS))
    edge1 = cfg.edges["edge1"].host
    other_subnet = str(ipaddress.IPv4Address(cfg.central.host) + 256)
    for override, key in [(f'central.host="{LOOPBACK}"', "central.host"),
                          ('central.host="localhost"', "central.host"),
                          (f'devices.device1.host="{edge1}"', "devices.device1.host"),
                          (f'central.host="{other_subnet}"', "hosts")]:
        with pytest.raises(ConfigError) as exc:
            plan(load_config(str(NETNS), [override]), prefix="fftest")
        assert exc.value.args and key in str(exc.value), override


def test_moves_become_one_override():
    moves = [parse_move("device1:edge2:1:0.5"), parse_move("device1:edge1:2:0.25")]
    cfg = load_config(str(NETNS), [moves_override(moves)])
    assert [(m.device, m.to, m.round, m.at) for m in cfg.moves] == [("device1", "edge2", 1, 0.5),
                                                                     ("device1", "edge1", 2, 0.25)]
    with pytest.raises(ConfigError):
        parse_move("device1:edge2:1")


# -- the namespace testbed (root) ---------------------------------------------------------

@pytest.fixture(scope="module")
def netns_ok():
    reason = probe()
    if reason:
        pytest.skip(reason)


def _netns_cmd(tmp: Path, prefix: str, *extra: str) -> list[str]:
    key = tmp / "test.key"
    key.write_text(secrets.token_hex(32))
    sets = SHORT + [f'run.out="{tmp / "runs"}"', 'run.name="netns"', f'security.key_file="{key}"']
    return [sys.executable, "-m", "scripts.netns_testbed", "run", "--config", str(NETNS), "--prefix", prefix,
            *[a for s in sets for a in ("--set", s)], *extra]


def _alive(pids: dict[str, int]) -> list[str]:
    alive = []
    for name, pid in pids.items():
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(name)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.process
def test_namespaces_with_shaped_links_and_a_rewired_move_give_the_loopback_model(tmp_path, netns_ok):
    prefix = "ff" + secrets.token_hex(3)
    t0 = time.monotonic()
    proc = subprocess.Popen(_netns_cmd(tmp_path, prefix, "--move", "device1:edge2:1:0.5"), cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # the same training without any move (the run a loopback testbed ends with, trained
        # in this process: tests/test_exactness.py), while the testbed's links are the bound
        sha = reference_sha(NETNS, rounds=1, overrides=SHORT)
        out, _ = proc.communicate(timeout=240)
    except BaseException as exc:
        kill_tree(proc)  # SIGKILL: its own clean-up cannot run, so clean up after it
        subprocess.run([sys.executable, "-m", "scripts.netns_testbed", "clean", "--prefix", prefix], cwd=ROOT,
                       env=_env(), timeout=60)
        if isinstance(exc, subprocess.TimeoutExpired):
            raise AssertionError("the namespace testbed did not finish within 240 s") from None
        raise
    seconds = time.monotonic() - t0
    run_dir = tmp_path / "runs" / "netns"
    state = json.loads((run_dir / "netns.json").read_text())
    # everything is gone: namespaces (with their veths and bridges) and processes
    assert namespaces_named(prefix) == []
    assert _alive(state["pids"]) == [] and state["stray_pids_killed"] == []
    assert proc.returncode == 0, out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished"
    (mig,) = summary["migrations"]
    assert (mig["device"], mig["from"], mig["to"]) == ("device1", "edge1", "edge2") and mig["state_bytes"] > 1_000_000
    assert summary["devices"]["device1"]["edges"][-1] == "edge2"
    # the move was a network change: the kernel had device1's link on edge1's bridge, then edge2's
    p = state["plan"]
    (rw,) = state["rewires"]
    assert (rw["bridge_before"], rw["bridge_after"]) == (p["edge_bridges"]["edge1"], p["edge_bridges"]["edge2"])
    # the lab's heterogeneity shows: device3's 10 Mbit/s link (1.6 MB of activations a step
    # each way dominates its rounds), device2's slowdown of 3 (recorded; its effect on time
    # is checked on loopback below, where compute is not hidden behind a slow link)
    secs = {d: sum(v["round_seconds"]) for d, v in summary["devices"].items()}
    assert secs["device3"] > 1.3 * secs["device4"], secs
    assert summary["device_settings"]["device2"]["slowdown"] == 3.0
    # exactness: the same training without any move ends in the same weights
    assert summary["final_model_sha256"] == sha
    print(f"netns run {seconds:.1f} s; move {mig['pause_ms']:.0f} ms pause, "
          f"{mig['state_bytes'] / 1e6:.2f} MB; sha256 {sha[:16]} as the run without moves")


@pytest.mark.process
def test_ctrl_c_tears_everything_down(tmp_path, netns_ok):
    prefix = "ff" + secrets.token_hex(3)
    proc = subprocess.Popen(_netns_cmd(tmp_path, prefix, "--set", "training.rounds=20"), cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state_file = tmp_path / "runs" / "netns" / "netns.json"
    try:
        deadline = time.monotonic() + 60
        while not (state_file.exists() and json.loads(state_file.read_text() or "{}").get("pids")):
            assert time.monotonic() < deadline and proc.poll() is None, "the testbed did not come up"
            time.sleep(0.2)
        pids = json.loads(state_file.read_text())["pids"]
        time.sleep(3)  # mid-start-up: roles loading, connecting
        assert len(namespaces_named(prefix)) == 8 and len(_alive(pids)) == 7
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
            subprocess.run([sys.executable, "-m", "scripts.netns_testbed", "clean", "--prefix", prefix], cwd=ROOT,
                           env=_env(), timeout=60)
    assert proc.returncode == 130, out
    assert namespaces_named(prefix) == [] and _alive(pids) == []
    assert "torn down" in out


# -- device heterogeneity (no root needed) ------------------------------------------------

@pytest.fixture(scope="module")
def heterogeneous(tmp_path_factory):
    """One run for the two checks below: device2 slowed down 3x, with 2 threads of its own."""
    cfg = write_config(tmp_path_factory.mktemp("hetero"), edges=1, devices=2, rounds=2, samples_per_device=200,
                       batch_size=50, extra={"devices.device2": {"slowdown": 3.0, "threads": 2}})
    status, out, summary = run_launch(cfg)
    assert status == 0, out
    return out, summary


@pytest.mark.process
def test_slowdown_stretches_a_device_and_the_summary_records_it(heterogeneous):
    out, summary = heterogeneous
    assert summary["device_settings"] == {"device1": {"edge": "edge1", "slowdown": 1.0, "threads": 1},
                                          "device2": {"edge": "edge1", "slowdown": 3.0, "threads": 2}}
    fast, slow = summary["devices"]["device1"]["round_seconds"], summary["devices"]["device2"]["round_seconds"]
    assert sum(slow) > sum(fast), (fast, slow)
    # the throttle is in force: device2 sleeps (slowdown - 1) x its own compute, device1 not at all
    run_dir = run_dir_of(out)
    for dev, factor in (("device1", 0.0), ("device2", 2.0)):
        done = [json.loads(line) for line in (run_dir / f"events-{dev}.jsonl").read_text().splitlines()
                if '"round_done"' in line]
        assert len(done) == 2
        for ev in done:
            assert ev["compute_seconds"] > 0
            assert ev["throttle_seconds"] == pytest.approx(factor * ev["compute_seconds"], rel=1e-6)


@pytest.mark.process
def test_per_device_threads_are_in_force_and_recorded(heterogeneous):
    out, summary = heterogeneous
    assert summary["device_settings"]["device2"]["threads"] == 2
    assert summary["device_settings"]["device1"]["threads"] == 1  # training.threads
    events = (run_dir_of(out) / "events-device2.jsonl").read_text().splitlines()
    loaded = [json.loads(line) for line in events if '"data_loaded"' in line]
    assert loaded and loaded[0]["threads"] == 2

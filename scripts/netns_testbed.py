"""A multi-host testbed on one Linux machine: a network namespace per host, shaped links.

    python -m scripts.netns_testbed run   --config FILE [--move DEVICE:EDGE:ROUND:FRACTION]... [--set K=V]...
    python -m scripts.netns_testbed check
    python -m scripts.netns_testbed clean --prefix PREFIX

``run`` builds the network below, starts every role of the config in its own namespace,
plays the moves, waits for the run to end, and tears everything down: after a run, a
failure, Ctrl-C or SIGTERM. ``check`` says whether this machine can do it (root, iproute2).
``clean`` removes what a killed ``run`` left behind (``run`` prints its prefix first).

The network. Each host of the config (the central, every edge, every device) gets a
namespace ``<prefix>-h-<name>`` holding one interface, ``eth0``, with the address the config
gives that host. The other end of each veth sits in one more namespace, the switch
``<prefix>-switch``, on a bridge: the central's on the backbone bridge, an edge's and its
devices' on the bridge of that edge's network, and every edge network has an uplink (a
veth pair) to the backbone. One subnet, one L2 segment, a tree: any host reaches any other
along the path a lab would take. A device talks to its own edge inside the edge's network;
edge to edge, edge to central, and a device to a foreign edge cross the uplinks. Nothing is
added to the root namespace, so nothing inside can reach the machine's own networks.

Shaping (``tc tbf`` on both directions of a link, rates from [links], each edge's
``link_mbit`` and each device's ``link_mbit``): a device's link at its own rate, else the
rate of the edge it is attached to, else ``device_mbit``; each uplink at ``edge_mbit``, the
central's link at ``central_mbit``; 0 leaves a link unshaped. An edge's own link is its
network: unshaped.

A move. The script plays every move (``--move`` and the config's [[mobility.moves]]; the
roles themselves get none) from a driver process in the central's namespace: it waits
until the device is in the move's round at or past the fraction, moves the device's veth to
the destination edge's bridge, drops the device's stale entries from the bridges'
forwarding tables and sends one datagram from the device so they learn its new place, and
only then sends the move command. The device finishes its current step with the source
edge, now across the uplinks; at the step boundary it closes that connection and attaches
to the destination edge, inside that edge's network. The device process runs on throughout;
its address stays (its radio moved); its link rate becomes the destination edge's when
that edge has a ``link_mbit`` and the device none of its own (the new cell's radio). Every
re-wire, with the bridge the kernel reports before and after and the rates, is recorded in
``<run dir>/netns.json``. Moves of a time-based mobility model (trace ``time_s`` rows,
waypoint) are not played here: the driver plays round-based moves only.

With the config's ``run.device_host`` (``run.edge_host``) on, or ``--device-host``
(``--edge-host``), the devices (edges) are forked from one host process, as ``central.launch``
forks them: the host stays in the root namespace and opens no socket; each forked role
joins its own host's namespace (``setns``) before it runs, so the network is the same.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from central.rundir import has_checkpoint
from common.config import Config, load_config
from common.errors import ConfigError
from common import pki
from common.security import CONTROLLER
from common.hostspawn import HOSTABLE, HostSpawner, hosted_roles
from common.supervisor import Child, NetnsSpawner, Policy, Supervisor, stop_all

ROOT = Path(__file__).resolve().parent.parent
BACKBONE = "bb"
IP_TIMEOUT_S = 20.0        # one ip/tc/bridge call; they take milliseconds
# tbf needs a bucket of at least one timer tick of traffic at its rate (4 ms at HZ=250), and
# a few full-size segments at low rates, or it cannot reach the rate it is given.
MIN_BURST_BYTES = 32 * 1024
BURST_SECONDS = 0.004
TBF_LATENCY = "100ms"      # the queue a shaped link holds before it drops, like a NIC's buffer
DISCARD_PORT = 9           # where the "I moved" datagram goes (RFC 863: nobody answers)


class NetnsError(Exception):
    """A namespace, link or shaping command failed."""


@dataclass(frozen=True)
class Host:
    name: str
    role: str        # central | edge | device
    address: str
    ns: str
    port: str        # its veth end in the switch namespace
    bridge: str      # the bridge that end is on at the start
    mbit: float      # its link's rate, both directions (0: unshaped)


@dataclass(frozen=True)
class Uplink:
    bridge: str      # the edge network's bridge
    near: str        # the uplink's end on that bridge
    far: str         # its end on the backbone
    mbit: float


@dataclass(frozen=True)
class Plan:
    prefix: str
    switch: str
    prefix_len: int
    edge_bridges: dict[str, str]
    hosts: dict[str, Host]
    uplinks: tuple[Uplink, ...]

    @property
    def namespaces(self) -> list[str]:
        return [h.ns for h in self.hosts.values()] + [self.switch]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Plan:
        return cls(prefix=d["prefix"], switch=d["switch"], prefix_len=d["prefix_len"], edge_bridges=d["edge_bridges"],
                   hosts={n: Host(**h) for n, h in d["hosts"].items()}, uplinks=tuple(Uplink(**u) for u in d["uplinks"]))


# -- the plan: pure, from the config ------------------------------------------------------

def plan(cfg: Config, *, prefix: str, prefix_len: int = 24) -> Plan:
    """Names, addresses, bridges and rates for ``cfg``. Raises ``ConfigError`` for an address
    a namespace testbed cannot use."""
    links = cfg.links
    edge_bridges = {e: f"br{i}" for i, e in enumerate(sorted(cfg.edges), 1)}
    roles = [("central", "central", "central.host", cfg.central.host, BACKBONE, links.central_mbit)]
    roles += [(e, "edge", f"edges.{e}.host", cfg.edges[e].host, edge_bridges[e], 0.0) for e in sorted(cfg.edges)]
    roles += [(d, "device", f"devices.{d}.host", cfg.devices[d].host, edge_bridges[cfg.devices[d].edge],
               cfg.link_rate(d)) for d in cfg.device_names]
    _check_addresses([(key, addr) for _, _, key, addr, _, _ in roles], prefix_len)
    hosts = {name: Host(name=name, role=role, address=addr, ns=f"{prefix}-h-{name}", port=f"h{i}", bridge=bridge,
                        mbit=mbit)
             for i, (name, role, _, addr, bridge, mbit) in enumerate(roles)}
    uplinks = tuple(Uplink(bridge=br, near=f"v{i}", far=f"u{i}", mbit=links.edge_mbit)
                    for i, br in enumerate(edge_bridges.values(), 1))
    return Plan(prefix=prefix, switch=f"{prefix}-switch", prefix_len=prefix_len, edge_bridges=edge_bridges,
                hosts=hosts, uplinks=uplinks)


def _check_addresses(named: list[tuple[str, str]], prefix_len: int) -> None:
    fix = "give every host its own private IPv4 address, all in one subnet (see configs/netns.toml)"
    seen: dict[str, str] = {}
    nets = set()
    for key, addr in named:
        try:
            ip = ipaddress.IPv4Address(addr)
        except ValueError:
            raise ConfigError(key, f"{addr!r} is not an IPv4 address", fix) from None
        if ip.is_loopback or not ip.is_private:
            raise ConfigError(key, f"{addr} is not a private address; it would shadow a real network", fix)
        if addr in seen:
            raise ConfigError(key, f"{addr} is also {seen[addr]}: one namespace per host needs one address per host", fix)
        seen[addr] = key
        net = ipaddress.IPv4Network(f"{addr}/{prefix_len}", strict=False)
        if ip in (net.network_address, net.broadcast_address):
            raise ConfigError(key, f"{addr} is the network or broadcast address of {net}", fix)
        nets.add(net)
    if len(nets) > 1:
        raise ConfigError("hosts", f"the addresses span {len(nets)} /{prefix_len} subnets", fix + " (or --prefix-len)")


def tbf(mbit: float) -> list[str]:
    burst = max(MIN_BURST_BYTES, int(mbit * 1e6 / 8 * BURST_SECONDS))
    return ["root", "tbf", "rate", f"{mbit:g}mbit", "burst", str(burst), "latency", TBF_LATENCY]


def build_commands(p: Plan) -> list[list[str]]:
    """Every command that builds ``p``, in order."""
    sw = p.switch
    cmds = [["ip", "netns", "add", sw], ["ip", "-n", sw, "link", "set", "lo", "up"]]
    for br in [BACKBONE, *p.edge_bridges.values()]:
        cmds += [["ip", "-n", sw, "link", "add", br, "type", "bridge"], ["ip", "-n", sw, "link", "set", br, "up"]]
    for up in p.uplinks:
        cmds += [["ip", "-n", sw, "link", "add", up.far, "type", "veth", "peer", "name", up.near],
                 ["ip", "-n", sw, "link", "set", up.far, "master", BACKBONE, "up"],
                 ["ip", "-n", sw, "link", "set", up.near, "master", up.bridge, "up"]]
        if up.mbit:
            cmds += [["tc", "-n", sw, "qdisc", "replace", "dev", end, *tbf(up.mbit)] for end in (up.far, up.near)]
    for h in p.hosts.values():
        cmds += [["ip", "netns", "add", h.ns], ["ip", "-n", h.ns, "link", "set", "lo", "up"],
                 ["ip", "-n", sw, "link", "add", h.port, "type", "veth", "peer", "name", "eth0", "netns", h.ns],
                 ["ip", "-n", sw, "link", "set", h.port, "master", h.bridge, "up"],
                 ["ip", "-n", h.ns, "addr", "add", f"{h.address}/{p.prefix_len}", "dev", "eth0"],
                 ["ip", "-n", h.ns, "link", "set", "eth0", "up"]]
        if h.mbit:
            cmds += [["tc", "-n", sw, "qdisc", "replace", "dev", h.port, *tbf(h.mbit)],
                     ["tc", "-n", h.ns, "qdisc", "replace", "dev", "eth0", *tbf(h.mbit)]]
    return cmds


# -- the kernel side ----------------------------------------------------------------------

def sh(*argv: str, check: bool = True) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{' '.join(argv)}: {exc}") from exc
    if check and r.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {r.stderr.strip() or f'status {r.returncode}'}")
    return r.stdout


def build(p: Plan) -> None:
    for cmd in build_commands(p):
        sh(*cmd)


def teardown(namespaces: list[str]) -> list[int]:
    """Kill whatever still runs in these namespaces (by PID: they are ours), then delete them,
    which deletes every veth and bridge in them. Returns the PIDs it killed."""
    killed = []
    for ns in namespaces:
        for pid in sh("ip", "netns", "pids", ns, check=False).split():
            try:
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
            except (ProcessLookupError, ValueError):
                pass
    for ns in namespaces:
        sh("ip", "netns", "del", ns, check=False)
    return killed


def namespaces_named(prefix: str) -> list[str]:
    names = [line.split()[0] for line in sh("ip", "netns", "list", check=False).splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix + "-")]


def master_of(p: Plan, port: str) -> str:
    return json.loads(sh("ip", "-n", p.switch, "-j", "link", "show", port))[0].get("master", "")


def reshape_commands(p: Plan, device: str, mbit: float) -> list[list[str]]:
    """The commands that put ``device``'s link (both directions) at ``mbit`` (0: unshaped)."""
    h = p.hosts[device]
    ends = [("-n", p.switch, h.port), ("-n", h.ns, "eth0")]
    if mbit:
        return [["tc", n, ns, "qdisc", "replace", "dev", dev, *tbf(mbit)] for n, ns, dev in ends]
    return [["tc", n, ns, "qdisc", "del", "dev", dev, "root"] for n, ns, dev in ends]


def rewire(p: Plan, device: str, edge: str, *, mbit: float | None = None, mbit_before: float | None = None) -> dict:
    """Move ``device``'s link to ``edge``'s network, at ``mbit`` if that differs from
    ``mbit_before`` (the destination cell's rate). Returns the record of the change."""
    h, sw, target = p.hosts[device], p.switch, p.edge_bridges[edge]
    before = master_of(p, h.port)
    t0 = time.perf_counter()
    sh("ip", "-n", sw, "link", "set", h.port, "nomaster")
    sh("ip", "-n", sw, "link", "set", h.port, "master", target)
    if mbit is not None and mbit != mbit_before:
        for cmd in reshape_commands(p, device, mbit):
            sh(*cmd, check=bool(mbit))  # deleting a qdisc that is not there is fine
    # The backbone still sends the device's frames towards the old network until it hears
    # from the device: forget it there, then let it speak once.
    mac = json.loads(sh("ip", "-n", h.ns, "-j", "link", "show", "eth0"))[0]["address"]
    for entry in json.loads(sh("bridge", "-n", sw, "-j", "fdb", "show") or "[]"):
        if entry.get("mac") == mac and entry.get("master") and not entry.get("state") and entry["ifname"] != h.port:
            sh("bridge", "-n", sw, "fdb", "del", mac, "dev", entry["ifname"], "master", check=False)
    sh("ip", "netns", "exec", h.ns, sys.executable, "-S", "-c",
       "import socket, sys; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto("
       "b'fedfly-netns: moved', (sys.argv[1], int(sys.argv[2])))", p.hosts["central"].address, str(DISCARD_PORT))
    return {"device": device, "to": edge, "bridge_before": before, "bridge_after": master_of(p, h.port),
            "mbit_before": mbit_before, "mbit_after": mbit if mbit is not None else mbit_before,
            "rewire_ms": round((time.perf_counter() - t0) * 1000, 3), "ts": round(time.time(), 6)}


def probe() -> str | None:
    """None if this machine can build a namespace testbed, else why not."""
    missing = [tool for tool in ("ip", "tc", "bridge") if shutil.which(tool) is None]
    if missing:
        return f"iproute2 tools missing: {', '.join(missing)} (apt-get install iproute2)"
    name = f"ff{secrets.token_hex(3)}-probe"
    try:
        sh("ip", "netns", "add", name)
        sh("ip", "-n", name, "link", "add", "b0", "type", "bridge")
        sh("ip", "-n", name, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
        sh("ip", "-n", name, "link", "set", "p0", "master", "b0")
        sh("tc", "-n", name, "qdisc", "replace", "dev", "p0", *tbf(20.0))
    except NetnsError as exc:
        return f"cannot build network namespaces with bridges, veths and tbf here (needs root): {exc}"
    finally:
        sh("ip", "netns", "del", name, check=False)
    return None


# -- processes ----------------------------------------------------------------------------

def role_argv(role: str, name: str, config: str, overrides: list[str]) -> list[str]:
    argv = [sys.executable, "-m", role, "--config", config] + (["--name", name] if role != "central" else [])
    return argv + [a for o in overrides for a in ("--set", o)]


# -- moves --------------------------------------------------------------------------------

def parse_move(text: str) -> dict:
    try:
        device, to, rnd, at = text.split(":")
        return {"device": device, "to": to, "round": int(rnd), "at": float(at)}
    except ValueError:
        raise ConfigError("--move", f"{text!r} is not DEVICE:EDGE:ROUND:FRACTION", "e.g. --move device1:edge2:2:0.5") from None


def moves_override(moves: list[dict]) -> str:
    """The moves as one ``--set`` (an inline TOML array of tables)."""
    items = [f'{{device = "{m["device"]}", to = "{m["to"]}", round = {m["round"]}, at = {m["at"]!r}}}' for m in moves]
    return "mobility.moves=[" + ", ".join(items) + "]"


def drive(cfg: Config, p: Plan, record: Path) -> int:
    """Play ``cfg.moves`` (run inside the central's namespace): re-wire, then move."""
    from central import mobility
    from common.errors import TransportError
    creds = cfg.credentials(CONTROLLER)
    deadline = time.monotonic() + cfg.run.startup_timeout + cfg.training.rounds * cfg.run.round_timeout
    rate = {d: p.hosts[d].mbit for d in cfg.devices}
    for mv in cfg.moves:
        while True:  # the device may not be listening yet
            try:
                mobility.wait_until_at(cfg, mv.device, mv.round, mv.at, creds=creds,
                                       timeout=max(0.0, deadline - time.monotonic()))
                break
            except TransportError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)
        rec = rewire(p, mv.device, mv.to, mbit=cfg.link_rate(mv.device, mv.to), mbit_before=rate[mv.device])
        rate[mv.device] = cfg.link_rate(mv.device, mv.to)
        reply = mobility.move(cfg, mv.device, mv.to, creds=creds)
        if not reply.accepted:
            print(f"netns: {mv.device} refused the move to {mv.to}: {reply.reason}", file=sys.stderr)
            return 3
        st = mobility.wait_until_on(cfg, mv.device, mv.to, creds=creds, timeout=max(1.0, deadline - time.monotonic()))
        rec.update(scheduled={"round": mv.round, "at": mv.at}, landed={"round": st.round, "step": st.step})
        with open(record, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"netns: {mv.device} re-wired {rec['bridge_before']} -> {rec['bridge_after']} and moved to {mv.to} "
              f"(round {st.round}, step {st.step})", flush=True)
    return 0


# -- the commands -------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    try:
        base = load_config(args.config, overrides)
        moves = [vars(mv) for mv in base.moves] + [parse_move(t) for t in args.move]
        overrides_all = overrides + [moves_override(moves)]
        cfg = load_config(args.config, overrides_all)  # checks the --move ones too
        pki.prepare(cfg)
        prefix = args.prefix or f"ff{secrets.token_hex(3)}"
        if not prefix.isalnum() or len(prefix) < 4:
            raise ConfigError("--prefix", f"{prefix!r} must be 4 or more letters and digits", "e.g. --prefix fflab1")
        if namespaces_named(prefix):
            raise ConfigError("--prefix", f"namespaces named {prefix}-* exist already (another run?)",
                              f"choose another prefix, or remove them: netns_testbed clean --prefix {prefix}")
        p = plan(cfg, prefix=prefix, prefix_len=args.prefix_len)
    except ConfigError as exc:
        print(f"netns_testbed: error: {exc}", file=sys.stderr)
        return 2
    run_name = cfg.run.name or time.strftime("%Y%m%d-%H%M%S") + f"-{cfg.mode}-netns"
    run_dir = Path(cfg.run.out) / run_name
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    state_path, record = run_dir / "netns.json", run_dir / "logs" / "netns-moves.jsonl"
    state: dict = {"prefix": p.prefix, "plan": p.to_json(), "pids": {}, "rewires": []}
    role_overrides = overrides + [f'run.name="{run_name}"', "mobility.moves=[]"]
    if cfg.mobility.model != "schedule":  # the driver plays the round-based moves; the roles none
        role_overrides += ['mobility.model="schedule"', 'mobility.trace=""', "mobility.waypoint={}"]

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    children: list[Child] = []
    spawner = None
    status = 1
    print(f"netns: prefix {p.prefix}; {len(p.hosts)} hosts, run {run_dir}", flush=True)
    try:
        t0 = time.monotonic()
        build(p)
        state_path.write_text(json.dumps(state, indent=2))
        devices = ", ".join(f"{h.name} {h.mbit:g}" for h in p.hosts.values() if h.role == "device")
        print(f"netns: built {len(p.namespaces)} namespaces in {time.monotonic() - t0:.1f} s; links in Mbit/s "
              f"(0 = unshaped): {devices}; uplinks {cfg.links.edge_mbit:g}; central {cfg.links.central_mbit:g}",
              flush=True)
        logs = str(run_dir / "logs")
        hosts = sorted(p.hosts.values(), key=lambda h: h.role != "central")  # the central first
        for h in hosts:  # the central's progress goes to our terminal, like central.launch's
            def argv(resume: bool, _h=h) -> list[str]:
                return role_argv(_h.role, _h.name, args.config, role_overrides) + \
                    (["--resume", str(run_dir)] if resume else [])
            children.append(Child(h.name, h.role, argv, None if h.role == "central" else logs))
        if cfg.moves:
            driver = [sys.executable, "-m", "scripts.netns_testbed", "_drive", "--config", args.config,
                      "--state", str(state_path), "--record", str(record)]
            driver += [a for o in overrides_all for a in ("--set", o)]
            children.append(Child("netns-driver", "driver", lambda resume, _d=driver: _d, logs, restartable=False))
        ns_of = {h.name: h.ns for h in p.hosts.values()} | {"netns-driver": p.hosts["central"].ns}
        spawner = NetnsSpawner(lambda c: ns_of[c.name], extra_path=str(ROOT))
        hosted = hosted_roles(cfg.run, {"device": len(cfg.devices), "edge": len(cfg.edges)},
                              {role: getattr(args, f"{role}_host", None) for role in HOSTABLE})
        if hosted:   # one host each, in our namespace; each child joins its own (common/forkhost.py)
            spawner = HostSpawner(hosted, str(ROOT), "netns", others=spawner, namespace_of=lambda c: ns_of[c.name])
            print(f"netns: the {' and '.join(r + 's' for r in hosted)} forked from a host, each in its namespace "
                  f"(run.device_host, run.edge_host)", flush=True)
        sup = Supervisor(children, spawner,
                         Policy(on_death=cfg.faults.on_death, max_restarts=cfg.faults.max_restarts,
                                can_resume=lambda: has_checkpoint(str(run_dir))), say="netns")
        sup.start_all()
        state["pids"] = {c.name: c.proc.pid for c in children}
        state_path.write_text(json.dumps(state, indent=2))
        status = sup.run()
    except KeyboardInterrupt:
        print("netns: interrupted; stopping every process and deleting the namespaces", file=sys.stderr)
        status = 130
    except NetnsError as exc:
        print(f"netns_testbed: error: {exc}", file=sys.stderr)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave half a network
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_all(children)
        if isinstance(spawner, HostSpawner):
            spawner.close()
        state["stray_pids_killed"] = teardown(p.namespaces)
        if record.exists():
            state["rewires"] = [json.loads(line) for line in record.read_text().splitlines() if line.strip()]
        state["status"] = status
        state_path.write_text(json.dumps(state, indent=2))
    print(f"netns: torn down ({p.prefix}-*)\nresults: {run_dir}", flush=True)
    return status


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="netns_testbed", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("run", help="build the namespaces, run an experiment, tear down")
    pd = sub.add_parser("_drive", help=argparse.SUPPRESS)
    for q in (pr, pd):
        q.add_argument("--config", required=True)
        q.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    pr.add_argument("--move", action="append", default=[], metavar="DEVICE:EDGE:ROUND:FRACTION",
                    help="one more move (re-wire, then move); repeatable")
    pr.add_argument("--prefix", default="", help="namespace name prefix (default: ff + 6 random hex digits)")
    pr.add_argument("--prefix-len", type=int, default=24, help="subnet prefix length of the addresses (default 24)")
    for role in HOSTABLE:
        pr.add_argument(f"--{role}-host", action=argparse.BooleanOptionalAction, default=None,
                        help=f"fork the {role}s from one host process, each joining its namespace, or not; wins "
                             f"over the config's run.{role}_host")
    pd.add_argument("--state", required=True)
    pd.add_argument("--record", required=True)
    sub.add_parser("check", help="can this machine build a namespace testbed?")
    pc = sub.add_parser("clean", help="remove what a killed run left: processes in, and namespaces named PREFIX-*")
    pc.add_argument("--prefix", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "run":
        return run(args)
    if args.cmd == "_drive":
        from common.errors import TestbedError
        p = Plan.from_json(json.loads(Path(args.state).read_text())["plan"])
        try:
            return drive(load_config(args.config, args.overrides), p, Path(args.record))
        except (TestbedError, NetnsError, TimeoutError) as exc:
            print(f"netns driver: error: {exc}", file=sys.stderr)
            return 1
    if args.cmd == "check":
        reason = probe()
        print(reason or "ok: this machine can build a namespace testbed")
        return 1 if reason else 0
    if len(args.prefix) < 4:
        print("netns_testbed: error: --prefix is too short to be one run's (run prints its prefix)", file=sys.stderr)
        return 2
    mine = namespaces_named(args.prefix)
    killed = teardown(mine)
    print(f"removed {len(mine)} namespaces named {args.prefix}-*, killed {len(killed)} processes in them")
    return 0


if __name__ == "__main__":
    sys.exit(main())

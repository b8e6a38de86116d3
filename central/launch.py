"""``python -m central.launch --config FILE``: the whole testbed on this machine.

Refuses to start when a port of the config is taken (naming the process that holds it).
Starts the central, every edge and every device of the config as separate processes,
waits for the run to end, and stops every process it started: when the run ends, on
Ctrl-C or SIGTERM (summary.json then says "stopped"), or as soon as one of them dies
(naming it and showing the end of its log) unless ``faults.on_death = "restart"`` (or
``--chaos``) starts it again. Prints where the results are. The supervision itself is
``common.supervisor``'s.

The config's ``run.device_host`` (``run.edge_host``), or ``--device-host`` /
``--no-device-host`` (``--edge-host`` / ``--no-edge-host``), which win over it, fork the
devices (edges) from one process that has imported torch once, instead of starting each
anew: each is still its own process with its own sockets and certificate, but they share
torch's pages (``common.forkhost``), which is what a fleet of a hundred devices on one
machine needs (docs/DEPLOY.md, "A fleet on one machine"). "auto", the default, forks a
role when the config has ``HOST_AUTO_MIN`` or more of it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from central import runstatus
from central.rundir import has_checkpoint, new_run_dir
from common import pki
from common.config import HOST_AUTO_MIN, Config, load_config
from common.errors import ConfigError
from common.hostspawn import HostSpawner, hosted_roles
from common.portcheck import busy_ports
from common.supervisor import Child, LocalSpawner, Policy, Supervisor, stop_all

def command(role: str, cfg_path: str, name: str, overrides: list[str], resume: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", role, "--config", cfg_path]
    if role != "central":
        cmd += ["--name", name]
    elif resume:
        cmd += ["--resume", resume]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def children_of(cfg: Config, cfg_path: str, overrides: list[str], log_dir: str, run_dir: str,
                resume_now: bool) -> list[Child]:
    """Central first (its progress goes to our terminal), then the edges and devices."""
    os.makedirs(log_dir, exist_ok=True)
    plan = [("central", "central")] + [("edge", e) for e in sorted(cfg.edges)] + \
           [("device", d) for d in cfg.device_names]
    out = []
    for role, name in plan:
        def argv(resume: bool, _role=role, _name=name) -> list[str]:
            return command(_role, cfg_path, _name, overrides, run_dir if (resume or resume_now) else None)
        out.append(Child(name, role, argv, None if role == "central" else log_dir))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedfly-launch", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="go on with the run in RUN_DIR from its last completed round")
    p.add_argument("--chaos", metavar="SECONDS", type=float, default=0.0,
                   help="soak test: SIGKILL a random role about every SECONDS (implies faults.on_death=restart)")
    p.add_argument("--chaos-max", metavar="N", type=int, default=3, help="at most N chaos kills (default 3)")
    p.add_argument("--chaos-seed", metavar="S", type=int, default=0, help="seed of the chaos (which role, when)")
    p.add_argument("--device-host", action=argparse.BooleanOptionalAction, default=None,
                   help="fork every device from one process that imported torch once (shared memory), or not; "
                        f"wins over the config's run.device_host (default \"auto\": forked from {HOST_AUTO_MIN} devices on)")
    p.add_argument("--edge-host", action=argparse.BooleanOptionalAction, default=None,
                   help="the same for the edges; wins over run.edge_host")
    args = p.parse_args(argv)
    if args.chaos < 0 or args.chaos_max < 0:
        print("fedfly-launch: error: --chaos and --chaos-max must be >= 0", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        # fail here, once, rather than in every child; TLS certificates made on first use
        pki.prepare(cfg)
    except ConfigError as exc:
        print(f"fedfly-launch: error: {exc}", file=sys.stderr)
        return 2
    busy = busy_ports(cfg)
    if busy:  # at once, before any role starts and waits for a central that is not ours
        for b in busy:
            print(f"fedfly-launch: error: {b}", file=sys.stderr)
        print("fedfly-launch: stop that process, or give this testbed other ports", file=sys.stderr)
        return 1
    overrides = list(args.overrides)
    if args.resume:
        run_dir = os.path.abspath(args.resume)
        if not os.path.isdir(run_dir):
            print(f"fedfly-launch: error: --resume {args.resume}: no such run folder", file=sys.stderr)
            return 2
        run_name = os.path.basename(run_dir.rstrip(os.sep))
        overrides += [f'run.name="{run_name}"', f'run.out="{os.path.dirname(run_dir)}"']
    else:
        try:
            run_name, run_dir = new_run_dir(cfg)
        except ConfigError as exc:
            print(f"fedfly-launch: error: {exc}", file=sys.stderr)
            return 2
        if not cfg.run.name:
            overrides.append(f'run.name="{run_name}"')
    print(f"launch: {len(cfg.edges)} edges, {len(cfg.devices)} devices, mode {cfg.mode}, run {run_dir}", flush=True)

    stopped_by: list[str] = []

    def on_signal(signum, frame):
        # once: a second Ctrl-C must not cut short the stopping of every process
        if not stopped_by:
            stopped_by.append(signal.Signals(signum).name)
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log_dir = os.path.join(run_dir, "logs")
    children = children_of(cfg, args.config, overrides, log_dir, run_dir, bool(args.resume))
    policy = Policy(on_death="restart" if args.chaos else cfg.faults.on_death,
                    max_restarts=cfg.faults.max_restarts, chaos_s=args.chaos, chaos_max=args.chaos_max,
                    chaos_seed=args.chaos_seed, can_resume=lambda: has_checkpoint(run_dir))
    hosted = hosted_roles(cfg.run, {"device": len(cfg.devices), "edge": len(cfg.edges)},
                          {"device": args.device_host, "edge": args.edge_host})
    for role in hosted:
        why = f"--{role}-host" if getattr(args, f"{role}_host") else f"run.{role}_host = \"{getattr(cfg.run, f'{role}_host')}\""
        print(f"launch: the {role}s forked from one host ({why}; --no-{role}-host starts each anew)", flush=True)
    spawner = HostSpawner(hosted) if hosted else LocalSpawner()
    sup = Supervisor(children, spawner, policy, say="launch")
    try:
        sup.start_all()
        status = sup.run()
    except KeyboardInterrupt:
        print("launch: interrupted; stopping every process", file=sys.stderr)
        status = 130
    except OSError as exc:  # a process that cannot be started (or forked: the host is gone)
        print(f"fedfly-launch: error: {exc}; stopping every process", file=sys.stderr)
        status = 1
    finally:
        stop_all(children)
        if hosted:
            spawner.close()
    ended(run_dir, status, stopped_by[0] if stopped_by else "", run_name, cfg)
    print(f"results: {run_dir}", flush=True)
    return status


def ended(run_dir: str, status: int, signame: str, run_name: str, cfg: Config) -> None:
    """A central that could not say how the run ended (killed after ``KILL_AFTER_S``, or
    dead of a bug): summary.json says it for it, keeping what it recorded."""
    if signame:
        how, why = "stopped", f"{signame} to the launcher"
    elif status == 0:
        return
    else:
        how, why = "failed", f"the testbed stopped with status {status} (the launcher's output says which process)"
    try:
        if runstatus.settle(run_dir, how, why, {"run_name": run_name, "mode": cfg.mode, "config": cfg.path}):
            print(f"launch: summary.json completed: {how} ({why})", file=sys.stderr)
    except OSError as exc:
        print(f"fedfly-launch: error: summary.json cannot be written in {run_dir}: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

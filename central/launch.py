"""``python -m central.launch --config FILE``: the whole testbed on this machine.

Starts the central, every edge and every device of the config as separate processes,
waits for the run to end, and stops every process it started: when the run ends, on
Ctrl-C or SIGTERM, or as soon as one of them dies (naming it and showing the end of its
log). Prints where the results are.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from central import checkpoint
from common.config import Config, load_config
from common.errors import ConfigError

POLL_S = 0.2
# After the central exits, edges and devices get this long to follow its Shutdown.
DRAIN_S = 30.0
# SIGTERM first; SIGKILL whoever is still there after this long.
KILL_AFTER_S = 5.0


@dataclass
class Child:
    name: str
    role: str
    proc: subprocess.Popen
    log_path: str | None


def command(role: str, cfg_path: str, name: str, overrides: list[str], resume: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", role, "--config", cfg_path]
    if role != "central":
        cmd += ["--name", name]
    elif resume:
        cmd += ["--resume", resume]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def fresh_path(path: str) -> str:
    """``path``, or ``stem.1.ext``, ``stem.2.ext``... : a file of an earlier process life
    (a resumed run) is never overwritten."""
    stem, ext = os.path.splitext(path)
    n = 0
    while os.path.exists(path):
        n += 1
        path = f"{stem}.{n}{ext}"
    return path


def start_all(cfg: Config, cfg_path: str, overrides: list[str], log_dir: str,
              resume: str | None = None) -> list[Child]:
    os.makedirs(log_dir, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    children = []
    plan = [("central", "central")] + [("edge", e) for e in sorted(cfg.edges)] + \
           [("device", d) for d in cfg.device_names]
    for role, name in plan:
        if role == "central":
            out, log_path = None, None  # the central's progress goes to our terminal
        else:
            log_path = fresh_path(os.path.join(log_dir, f"{name}.log"))
            out = open(log_path, "wb")
        proc = subprocess.Popen(command(role, cfg_path, name, overrides, resume), stdout=out,
                                stderr=subprocess.STDOUT if out else None, env=env, start_new_session=True)
        if out:
            out.close()
        children.append(Child(name, role, proc, log_path))
    return children


def stop_all(children: list[Child]) -> None:
    """SIGTERM every child still running, then SIGKILL the ones that do not exit."""
    for c in children:
        if c.proc.poll() is None:
            c.proc.terminate()
    deadline = time.monotonic() + KILL_AFTER_S
    for c in children:
        left = max(0.0, deadline - time.monotonic())
        try:
            c.proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            c.proc.kill()
            c.proc.wait()


def tail(path: str | None, lines: int = 15) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        text = f.read().decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


class Supervisor:
    """Waits for the central and applies ``faults.on_death`` to every other death: ``stop``
    tears the testbed down naming the dead one; ``restart`` starts it again with backoff,
    at most ``faults.max_restarts`` times per process (the central with ``--resume``).
    ``chaos``: every so often (SECONDS x 0.5..1.5) SIGKILL a random running role, at most
    ``chaos_max`` times: a soak test of crash recovery."""

    def __init__(self, children: list[Child], *, cfg: Config, cfg_path: str, overrides: list[str], log_dir: str,
                 run_dir: str, chaos_s: float = 0.0, chaos_max: int = 0, chaos_seed: int = 0) -> None:
        self.children = children
        self.cfg, self.cfg_path, self.overrides, self.log_dir = cfg, cfg_path, overrides, log_dir
        self.run_dir = run_dir
        self.policy = "restart" if chaos_s else cfg.faults["on_death"]
        self.max_restarts = cfg.faults["max_restarts"]
        self.restarts: dict[str, int] = {}
        self.chaos_s, self.chaos_max = chaos_s, chaos_max
        self.rng = random.Random(chaos_seed)
        self.kills = 0
        self.next_kill = self._next_kill(time.monotonic())

    def _next_kill(self, now: float) -> float:
        return now + self.chaos_s * self.rng.uniform(0.5, 1.5) if self.chaos_s else float("inf")

    def _restart(self, c: Child) -> bool:
        n = self.restarts.get(c.name, 0)
        if self.policy != "restart" or n >= self.max_restarts:
            return False
        self.restarts[c.name] = n + 1
        time.sleep(min(2.0, 0.2 * 2 ** n))
        # the central goes on from its checkpoint; one that died before writing any starts again
        resume = self.run_dir if c.role == "central" and checkpoint.exists(self.run_dir) else None
        out = None
        log_path = c.log_path
        if c.role != "central":
            log_path = fresh_path(os.path.join(self.log_dir, f"{c.name}.log"))
            out = open(log_path, "wb")
        c.proc = subprocess.Popen(command(c.role, self.cfg_path, c.name, self.overrides, resume), stdout=out,
                                  stderr=subprocess.STDOUT if out else None, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                  start_new_session=True)
        if out:
            out.close()
        c.log_path = log_path
        print(f"launch: started {c.role} {c.name} again (pid {c.proc.pid}; restart {n + 1} of {self.max_restarts})",
              file=sys.stderr, flush=True)
        return True

    def _chaos(self) -> None:
        now = time.monotonic()
        if self.kills >= self.chaos_max or now < self.next_kill:
            return
        alive = [c for c in self.children if c.proc.poll() is None and
                 self.restarts.get(c.name, 0) < self.max_restarts]
        self.next_kill = self._next_kill(now)
        if not alive:
            return
        victim = self.rng.choice(alive)
        self.kills += 1
        print(f"launch: chaos: killing {victim.role} {victim.name} (pid {victim.proc.pid}); kill {self.kills} of "
              f"{self.chaos_max}", file=sys.stderr, flush=True)
        try:
            os.kill(victim.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def run(self) -> int:
        """Wait for the central; returns the launcher's exit status."""
        central = self.children[0]
        while True:
            self._chaos()
            status = central.proc.poll()
            if status is not None:
                if status < 0 and self._restart(central):  # killed by a signal: resume it
                    continue
                break
            for c in self.children[1:]:
                code = c.proc.poll()
                if code not in (None, 0):
                    print(f"launch: {c.role} {c.name} (pid {c.proc.pid}) died with status {code}", file=sys.stderr)
                    text = tail(c.log_path)
                    if text:
                        print(f"--- last lines of {c.log_path} ---\n{text}", file=sys.stderr)
                    if self._restart(c):
                        continue
                    print("launch: stopping the testbed", file=sys.stderr)
                    return 1
            time.sleep(POLL_S)
        deadline = time.monotonic() + DRAIN_S
        while time.monotonic() < deadline and any(c.proc.poll() is None for c in self.children):
            time.sleep(POLL_S)
        failed = [c for c in self.children[1:] if c.proc.poll() not in (None, 0)]
        for c in failed:
            print(f"launch: {c.role} {c.name} exited with status {c.proc.returncode} (log: {c.log_path})",
                  file=sys.stderr)
        return status if status != 0 else (1 if failed else 0)


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
    args = p.parse_args(argv)
    if args.chaos < 0 or args.chaos_max < 0:
        print("fedfly-launch: error: --chaos and --chaos-max must be >= 0", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        key_ok = cfg.key()  # fail here, once, rather than in every child
        del key_ok
    except ConfigError as exc:
        print(f"fedfly-launch: error: {exc}", file=sys.stderr)
        return 2
    overrides = list(args.overrides)
    from central.__main__ import new_run_dir
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
        if not cfg.run["name"]:
            overrides.append(f'run.name="{run_name}"')
    print(f"launch: {len(cfg.edges)} edges, {len(cfg.devices)} devices, mode {cfg.mode}, run {run_dir}", flush=True)

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    children: list[Child] = []
    try:
        log_dir = os.path.join(run_dir, "logs")
        children = start_all(cfg, args.config, overrides, log_dir, args.resume and run_dir)
        status = Supervisor(children, cfg=cfg, cfg_path=args.config, overrides=overrides, log_dir=log_dir,
                            run_dir=run_dir, chaos_s=args.chaos, chaos_max=args.chaos_max,
                            chaos_seed=args.chaos_seed).run()
    except KeyboardInterrupt:
        print("launch: interrupted; stopping every process", file=sys.stderr)
        status = 130
    finally:
        stop_all(children)
    print(f"results: {run_dir}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())

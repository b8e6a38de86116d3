"""``python -m central.launch --config FILE``: the whole testbed on this machine.

Starts the central, every edge and every device of the config as separate processes,
waits for the run to end, and stops every process it started: when the run ends, on
Ctrl-C or SIGTERM, or as soon as one of them dies (naming it and showing the end of its
log). Prints where the results are.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

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


def supervise(children: list[Child]) -> int:
    """Wait for the central; returns the launcher's exit status."""
    central = children[0]
    while True:
        status = central.proc.poll()
        if status is not None:
            break
        for c in children[1:]:
            code = c.proc.poll()
            if code not in (None, 0):
                print(f"launch: {c.role} {c.name} (pid {c.proc.pid}) died with status {code}; stopping the testbed",
                      file=sys.stderr)
                text = tail(c.log_path)
                if text:
                    print(f"--- last lines of {c.log_path} ---\n{text}", file=sys.stderr)
                return 1
        time.sleep(POLL_S)
    deadline = time.monotonic() + DRAIN_S
    while time.monotonic() < deadline and any(c.proc.poll() is None for c in children):
        time.sleep(POLL_S)
    failed = [c for c in children[1:] if c.proc.poll() not in (None, 0)]
    for c in failed:
        print(f"launch: {c.role} {c.name} exited with status {c.proc.returncode} (log: {c.log_path})", file=sys.stderr)
    return status if status != 0 else (1 if failed else 0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedfly-launch", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="go on with the run in RUN_DIR from its last completed round")
    args = p.parse_args(argv)
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
        children = start_all(cfg, args.config, overrides, os.path.join(run_dir, "logs"), args.resume and run_dir)
        status = supervise(children)
    except KeyboardInterrupt:
        print("launch: interrupted; stopping every process", file=sys.stderr)
        status = 130
    finally:
        stop_all(children)
    print(f"results: {run_dir}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())

"""One supervisor for the testbed's processes, wherever they run.

    Spawner      starts one process: ``LocalSpawner`` (this machine), ``NetnsSpawner``
                 (inside a network namespace, ``ip netns exec``). A spawner is the only
                 thing that differs between the launcher and the namespace testbed.
    Supervisor   waits for the central; applies ``faults.on_death`` to every other death
                 (``stop``: tear down, naming the dead one; ``restart``: start it again
                 with backoff, at most ``faults.max_restarts`` times each, the central with
                 ``--resume``); ``--chaos`` kills a random role every so often.
    stop_all     SIGTERM, then SIGKILL whoever is left, by PID.

Each ``Child`` knows how to make its own command line (``argv(resume)``), so a restart
is the same command (a resumed central gets ``--resume RUN_DIR``). The ssh launcher
(``scripts/remote.py``) runs its processes detached on other hosts and polls them over
ssh; it keeps its own loop (see its docstring).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from common.limits import Backoff
from common.text import printable_lines

# How often the processes are looked at: a death is seen within a fifth of a second, at no cost.
POLL_S = 0.2
# After the central exits, the others get this long to follow its Shutdown.
DRAIN_S = 30.0
# SIGTERM first; SIGKILL whoever is still there after this long.
KILL_AFTER_S = 5.0
# Before a restart, this long, doubled on each restart of the same child, at most the cap:
# a crash at start-up (a port still held) is not repeated in a tight loop.
RESTART_FIRST_S = 0.2
RESTART_MAX_S = 2.0


def fresh_path(path: str) -> str:
    """``path``, or ``stem.1.ext``, ``stem.2.ext``... : a file of an earlier process life
    (a resumed run) is never overwritten."""
    stem, ext = os.path.splitext(path)
    n = 0
    while os.path.exists(path):
        n += 1
        path = f"{stem}.{n}{ext}"
    return path


def tail(path: str | None, lines: int = 15) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        text = f.read().decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def env(extra_path: str | None = None) -> dict[str, str]:
    e = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if extra_path:
        e["PYTHONPATH"] = extra_path + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


class Spawner(Protocol):
    def spawn(self, child: "Child", argv: list[str], log_path: str | None) -> subprocess.Popen: ...


class LocalSpawner:
    def __init__(self, extra_path: str | None = None) -> None:
        self.extra_path = extra_path

    def spawn(self, child: "Child", argv: list[str], log_path: str | None) -> subprocess.Popen:
        out = open(log_path, "wb") if log_path else None
        try:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT if out else None, env=env(self.extra_path),
                                    start_new_session=True)
        finally:
            if out:
                out.close()


class NetnsSpawner(LocalSpawner):
    """Each child in its own namespace (``namespace_of(child)``); ``ip netns exec`` execs
    the command, so the PID is the role's."""

    def __init__(self, namespace_of: Callable[["Child"], str], extra_path: str | None = None) -> None:
        super().__init__(extra_path)
        self.namespace_of = namespace_of

    def spawn(self, child: "Child", argv: list[str], log_path: str | None) -> subprocess.Popen:
        return super().spawn(child, ["ip", "netns", "exec", self.namespace_of(child), *argv], log_path)


@dataclass
class Child:
    name: str
    role: str                                  # central, edge, device, or a helper ("driver")
    argv: Callable[[bool], list[str]]          # the command line (True: resume the run)
    log_dir: str | None                        # None: output on our terminal
    proc: subprocess.Popen | None = None
    log_path: str | None = None
    restarts: int = 0
    restartable: bool = True
    backoff: Backoff = field(default_factory=lambda: Backoff(RESTART_FIRST_S, RESTART_MAX_S), repr=False)

    def start(self, spawner: Spawner, resume: bool = False) -> None:
        self.log_path = fresh_path(os.path.join(self.log_dir, f"{self.name}.log")) if self.log_dir else None
        self.proc = spawner.spawn(self, self.argv(resume), self.log_path)


def stop_all(children: list[Child], kill_after_s: float = KILL_AFTER_S) -> None:
    """SIGTERM every child still running, then SIGKILL the ones that do not exit."""
    live = [c for c in children if c.proc is not None]
    for c in live:
        if c.proc.poll() is None:
            c.proc.terminate()
    deadline = time.monotonic() + kill_after_s
    for c in live:
        try:
            c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            c.proc.kill()
            c.proc.wait()


@dataclass
class Policy:
    on_death: str = "stop"          # stop | restart
    max_restarts: int = 3
    chaos_s: float = 0.0            # 0: no chaos
    chaos_max: int = 0
    chaos_seed: int = 0
    can_resume: Callable[[], bool] = field(default=lambda: False)  # has the central a checkpoint?


class Supervisor:
    """See the module docstring. ``say`` prefixes every line (e.g. "launch")."""

    def __init__(self, children: list[Child], spawner: Spawner, policy: Policy, *, say: str = "launch") -> None:
        self.children = children
        self.spawner = spawner
        self.policy = policy
        self.prefix = say
        self.rng = random.Random(policy.chaos_seed)
        self.kills = 0
        self.next_kill = self._next_kill(time.monotonic())

    def _say(self, text: str) -> None:
        print(f"{self.prefix}: {text}", file=sys.stderr, flush=True)

    def _next_kill(self, now: float) -> float:
        return now + self.policy.chaos_s * self.rng.uniform(0.5, 1.5) if self.policy.chaos_s else float("inf")

    def start_all(self) -> None:
        for c in self.children:
            c.start(self.spawner)

    def _restart(self, c: Child) -> bool:
        if self.policy.on_death != "restart" or not c.restartable or c.restarts >= self.policy.max_restarts:
            return False
        time.sleep(c.backoff.next())
        c.restarts += 1
        # the central goes on from its checkpoint; one that died before writing any starts again
        c.start(self.spawner, resume=c.role == "central" and self.policy.can_resume())
        self._say(f"started {c.role} {c.name} again (pid {c.proc.pid}; restart {c.restarts} of "
                  f"{self.policy.max_restarts})")
        return True

    def _chaos(self) -> None:
        now = time.monotonic()
        if self.kills >= self.policy.chaos_max or now < self.next_kill:
            return
        self.next_kill = self._next_kill(now)
        alive = [c for c in self.children if c.restartable and c.proc is not None and c.proc.poll() is None
                 and c.restarts < self.policy.max_restarts]
        if not alive:
            return
        victim = self.rng.choice(alive)
        self.kills += 1
        self._say(f"chaos: killing {victim.role} {victim.name} (pid {victim.proc.pid}); kill {self.kills} of "
                  f"{self.policy.chaos_max}")
        try:
            os.kill(victim.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def run(self) -> int:
        """Wait for the central (the first child); returns the exit status: the central's,
        or 1 if another process failed."""
        central = self.children[0]
        others = self.children[1:]
        while True:
            self._chaos()
            status = central.proc.poll()
            if status is not None:
                if status < 0 and self._restart(central):  # killed by a signal: resume it
                    continue
                break
            for c in others:
                code = c.proc.poll()
                if code not in (None, 0):
                    self._say(f"{c.role} {c.name} (pid {c.proc.pid}) died with status {code}")
                    text = tail(c.log_path)
                    if text:
                        # a role's own lines are escaped already; what Python printed raw on its way out may quote a peer
                        print(f"--- last lines of {c.log_path} ---\n{printable_lines(text)}", file=sys.stderr)
                    if self._restart(c):
                        continue
                    self._say("stopping the testbed")
                    return 1
            time.sleep(POLL_S)
        deadline = time.monotonic() + DRAIN_S
        while time.monotonic() < deadline and any(c.proc.poll() is None for c in others):
            time.sleep(POLL_S)
        failed = [c for c in others if c.proc.poll() not in (None, 0)]
        for c in failed:
            self._say(f"{c.role} {c.name} exited with status {c.proc.returncode} (log: {c.log_path})")
        for c in others:
            if c.proc.poll() is None:
                self._say(f"{c.role} {c.name} is still running after the run; stopping it")
        return status if status != 0 else (1 if failed else 0)

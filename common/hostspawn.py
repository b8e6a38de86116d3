"""The launcher's side of a fork host (``common.forkhost``): whether a launcher forks a
role's processes from a host, and the spawner that does.

Whether a launcher uses a host is ``hosting``'s answer: its option if given, else the
config's ``run.device_host`` / ``run.edge_host`` ("auto": where one machine runs
``HOST_AUTO_MIN`` or more of the role).

``HostSpawner`` is a ``common.supervisor`` spawner whose processes are ``Forked``
handles, so the supervisor's ``faults.on_death``, ``--chaos`` and ``stop_all`` apply to
forked children exactly as to started ones. It talks to each ``Host`` over the host's
stdin and stdout (the protocol is ``common.forkhost``'s); closing the host's stdin stops
it and its children.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

from common.config import HOST_AUTO_MIN
from common.forkhost import signal_pid
from common.supervisor import KILL_AFTER_S, POLL_S, LocalSpawner, env

HOSTABLE = ("device", "edge")   # the roles a host can fork (run.device_host, run.edge_host)


def hosting(setting: str, count: int, option: bool | None = None) -> bool:
    """Whether a machine that runs ``count`` processes of a role forks them from a host: the
    launcher's option when given (``--device-host``, ``--no-device-host``), else the config's
    setting (``run.device_host``: "on", "off", or "auto": ``HOST_AUTO_MIN`` or more, on Linux)."""
    if option is not None:
        return option
    if setting == "auto":
        return count >= HOST_AUTO_MIN and sys.platform.startswith("linux")
    return setting == "on"


def hosted_roles(run, counts: dict[str, int], options: dict[str, bool | None] | None = None) -> list[str]:
    """The roles (of ``HOSTABLE``) a launcher forks from a host, given the config's [run]
    section and how many of each role one machine runs."""
    options = options or {}
    return [role for role in HOSTABLE
            if hosting(getattr(run, f"{role}_host"), counts.get(role, 0), options.get(role))]


class Host:
    """One host process (started at once: it imports while the central and edges start)."""

    def __init__(self, role: str, extra_path: str | None = None, say: str = "launch") -> None:
        self.role, self.say = role, say
        e = env(extra_path)
        e.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS would start a thread at import
        self.proc = subprocess.Popen([sys.executable, "-m", "common.forkhost", "--role", role],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=e, start_new_session=True)
        self.buf = b""
        self.replies: list[dict] = []
        self.forked: dict[int, Forked] = {}
        self.gone = False

    def fork(self, argv: list[str], log_path: str | None, netns: str | None = None) -> "Forked":
        request = {"argv": argv, "log": log_path} | ({"netns": netns} if netns else {})
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        while not self.replies:
            if self.gone:
                raise OSError(f"the {self.role} host (pid {self.proc.pid}) is gone")
            self.pump(None)
        reply = self.replies.pop(0)
        if "error" in reply:
            raise OSError(f"the {self.role} host cannot fork: {reply['error']}")
        child = self.forked[reply["pid"]] = Forked(self, reply["pid"], argv)
        return child

    def pump(self, timeout: float | None = 0.0) -> None:
        """Read what the host said (waiting at most ``timeout`` seconds for it)."""
        if self.gone:
            return
        fd = self.proc.stdout.fileno()
        if not select.select([fd], [], [], timeout)[0]:
            return
        data = os.read(fd, 65536)
        if not data:
            self._host_died()
            return
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            msg = json.loads(line)
            if "exit" in msg:
                child = self.forked.pop(msg["exit"], None)
                if child is not None:
                    child.returncode = msg["status"]
            else:
                self.replies.append(msg)

    def _host_died(self) -> None:
        """Its children die with it (PR_SET_PDEATHSIG); make sure, and say so."""
        self.gone = True
        status = self.proc.wait()
        print(f"{self.say}: the {self.role} host (pid {self.proc.pid}) exited with status {status}; "
              f"its {len(self.forked)} running {self.role}s are stopped", file=sys.stderr, flush=True)
        for pid, child in self.forked.items():
            signal_pid(pid, signal.SIGKILL)
            child.returncode = -signal.SIGKILL
        self.forked.clear()

    def close(self) -> None:
        """Close its stdin: it stops its children and exits; SIGKILL if it does not."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=KILL_AFTER_S + 2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Forked:
    """A forked child, as much of ``subprocess.Popen`` as the supervisor uses."""

    def __init__(self, host: Host, pid: int, argv: list[str]) -> None:
        self.host, self.pid, self.args = host, pid, argv
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.host.pump()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = POLL_S if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.host.pump(min(POLL_S, left))
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            signal_pid(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class HostSpawner:
    """Forks the children of the ``roles`` given from one host per role; starts the others
    with ``others`` (default: a ``LocalSpawner``). With ``namespace_of`` (the namespace
    testbed) each forked child joins its own network namespace; the host, which opens no
    socket, stays in ours."""

    def __init__(self, roles: list[str], extra_path: str | None = None, say: str = "launch", *,
                 others=None, namespace_of=None) -> None:
        self.others = others or LocalSpawner(extra_path)
        self.namespace_of = namespace_of
        self.hosts = {role: Host(role, extra_path, say) for role in roles}

    def spawn(self, child, argv: list[str], log_path: str | None):
        host = self.hosts.get(child.role)
        if host is None:
            return self.others.spawn(child, argv, log_path)
        return host.fork(argv, log_path, self.namespace_of(child) if self.namespace_of else None)

    def close(self) -> None:
        for host in self.hosts.values():
            host.close()

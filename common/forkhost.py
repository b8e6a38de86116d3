"""A fork host: many device (or edge) processes from one import of torch.

``python -m central.launch --device-host`` (``--edge-host``) starts one host process per
role, ``python -m common.forkhost --role device``, which imports torch and the role's
modules once, then forks each device the launcher asks for. Every forked child is a full
device: its own PID, session, sockets, certificate, log file; it runs the same
``main(argv)`` as ``python -m device``, with the same arguments. What the children share
is what the host had before the fork (torch's pages, the imported modules), copy-on-write;
that is what lets 128 devices fit on one machine (BENCHMARKS.md, "A fleet on one machine").

Forking is safe only while the host has one thread: a thread pool started before the
fork would be missing in the child, its locks held for ever. So the host never trains
(torch starts its intra-op pool on the first parallel operation, lazily), keeps numpy's
BLAS from starting its thread at import (``OPENBLAS_NUM_THREADS``), and checks its thread
count before every fork. Each child sets its own torch threads, as ``python -m device``.

The launcher talks to the host over its stdin and stdout, one JSON object a line (local
pipes, no pickle):

    launcher -> host   {"argv": [...the role's command line...], "log": PATH or null}
    host -> launcher   {"pid": N} (or {"error": TEXT}) in reply, in order;
                       {"exit": N, "status": S} when child N ends (S as Popen.returncode)

The launcher side is ``HostSpawner``: a ``common.supervisor`` spawner whose processes are
``Forked`` handles, so the supervisor's ``faults.on_death``, ``--chaos`` and ``stop_all``
apply to forked children exactly as to started ones. When the launcher closes the host's
stdin (or dies), the host stops its children (SIGTERM, then SIGKILL) and exits; a child
whose host dies is killed by the kernel (``PR_SET_PDEATHSIG``, Linux).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

from common.supervisor import KILL_AFTER_S, POLL_S, LocalSpawner, env

# What each role's host imports before forking: the entry point, what its body imports,
# and what the first steps import lazily (numpy's random for the synthetic labels; an
# edge's bounds run the device part on the meta device, which imports sympy: several
# hundred modules that each process would otherwise hold on its own (BENCHMARKS.md, "A
# fleet on one machine"). A device never imports sympy (common.footprint,
# tests/test_footprint.py): its host does not either.
LAZY = ("numpy.random", "encodings.idna")
PRELOAD = {"device": ("device.__main__", "device.client", "common.data", *LAZY),
           "edge": ("edge.__main__", "edge.server", "torch.fx.experimental.symbolic_shapes", *LAZY)}


# -- the host process ---------------------------------------------------------------------

def _threads() -> int:
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1


def _send(fd: int, obj: dict) -> bool:
    """False once the launcher is gone."""
    try:
        os.write(fd, (json.dumps(obj) + "\n").encode())
        return True
    except OSError:
        return False


def _as_own_process(argv: list[str], host_pid: int) -> None:
    """Die with the host; be named after the role's name (``ps -o comm``, ``top``)."""
    name = argv[argv.index("--name") + 1] if "--name" in argv[:-1] else ""
    try:
        import ctypes
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if name:
            prctl(15, ctypes.c_char_p(name.encode()[:15]))  # PR_SET_NAME
    except (OSError, AttributeError):
        pass  # not Linux: the host still stops its children when it is asked to stop
    if os.getppid() != host_pid:  # the host died before the line above
        os._exit(1)


def _child(main, argv: list[str], log: str | None, host_pid: int, reply_fd: int) -> None:
    """In the forked child: become the role's own process, run its main, never return."""
    status = 1
    try:
        os.close(reply_fd)
        os.setsid()
        _as_own_process(argv, host_pid)
        for sig in (signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if log else os.dup(2)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(null)
        os.close(out)
        import gc
        gc.enable()
        status = main(argv)
    except SystemExit as exc:  # argparse's --help and errors
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - a child must never return into the host's loop
        import traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _fork(role: str, main, request, reply_fd: int) -> dict:
    if not isinstance(request, dict):
        return {"error": "a request that is not a JSON object"}
    argv, log = request.get("argv"), request.get("log")
    if not (isinstance(argv, list) and argv[1:3] == ["-m", role] and all(isinstance(a, str) for a in argv)):
        return {"error": f"not a {role} command line: {argv!r}"}
    threads = _threads()
    if threads != 1:
        return {"error": f"the {role} host has {threads} threads; a forked child would lack all but one"}
    sys.stdout.flush()
    sys.stderr.flush()
    host_pid = os.getpid()
    pid = os.fork()
    if pid == 0:
        _child(main, argv[3:], log, host_pid, reply_fd)
    return {"pid": pid}


def host_main(role: str) -> int:
    import gc
    import importlib
    # replies go on a copy of stdout; fd 1 itself goes to stderr, so that nothing an
    # import prints can land in the middle of a reply
    reply_fd = os.dup(1)
    os.dup2(2, 1)
    for name in PRELOAD[role]:
        importlib.import_module(name)
    from common.training import warm_up
    import torch
    torch.set_num_interop_threads(1)  # as every role sets it (common.training.set_threads)
    warm_up()  # its imports and one-time set-up, paid once for every child
    main = sys.modules[f"{role}.__main__"].main
    # Objects made so far are never collected: a child's collections do not write to
    # (and so copy) the pages holding them.
    gc.collect()
    gc.freeze()
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher stops us, after the children
    children: set[int] = set()
    buf, reading, kill_at = b"", True, None
    while reading or children:
        if stopping and reading:
            reading = False
        if not reading and kill_at is None:
            for pid in children:
                _signal(pid, signal.SIGTERM)
            kill_at = time.monotonic() + KILL_AFTER_S
        if kill_at is not None and time.monotonic() > kill_at:
            for pid in children:
                _signal(pid, signal.SIGKILL)
        ready = select.select([0] if reading else [], [], [], POLL_S)[0]
        if ready:
            data = os.read(0, 65536)
            reading = bool(data)
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    reply = _fork(role, main, json.loads(line), reply_fd)
                except ValueError:
                    reply = {"error": "a request that is not JSON"}
                if "pid" in reply:
                    children.add(reply["pid"])
                reading = _send(reply_fd, reply) and reading
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            if reading:
                reading = _send(reply_fd, {"exit": pid, "status": os.waitstatus_to_exitcode(status)})
    return 0


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# -- the launcher's side ------------------------------------------------------------------

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

    def fork(self, argv: list[str], log_path: str | None) -> "Forked":
        self.proc.stdin.write((json.dumps({"argv": argv, "log": log_path}) + "\n").encode())
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
            _signal(pid, signal.SIGKILL)
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
            _signal(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class HostSpawner(LocalSpawner):
    """Forks the children of the ``roles`` given from one host per role; starts the others
    as ``LocalSpawner`` does."""

    def __init__(self, roles: list[str], extra_path: str | None = None, say: str = "launch") -> None:
        super().__init__(extra_path)
        self.hosts = {role: Host(role, extra_path, say) for role in roles}

    def spawn(self, child, argv: list[str], log_path: str | None):
        host = self.hosts.get(child.role)
        return host.fork(argv, log_path) if host else super().spawn(child, argv, log_path)

    def close(self) -> None:
        for host in self.hosts.values():
            host.close()


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(prog="fedfly-forkhost", description="forks device or edge processes for the launcher")
    p.add_argument("--role", required=True, choices=sorted(PRELOAD))
    sys.exit(host_main(p.parse_args().role))

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

    launcher -> host   {"argv": [...the role's command line...], "log": PATH or null,
                        "netns": NAME (optional: the child joins that network namespace)}
    host -> launcher   {"pid": N} (or {"error": TEXT}) in reply, in order;
                       {"exit": N, "status": S} when child N ends (S as Popen.returncode)

The launcher's side (``HostSpawner``, and whether to use a host at all: ``hosting``) is
``common.hostspawn``. When the launcher closes the host's stdin (or dies), the host stops
its children (SIGTERM, then SIGKILL) and exits; a child whose host dies is killed by the
kernel (``PR_SET_PDEATHSIG``, Linux). Launchers that leave nothing on this machine to talk
to (the ssh launcher, the containers) run a host on its own instead, ``python -m
common.forkhost --role device --config F --name A --name B ...``: it forks each named role
with the config and ``--set`` overrides given, says when each ends, and exits when all have
(status 1 if any failed); SIGTERM stops them all.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time

from common.supervisor import KILL_AFTER_S, POLL_S, fresh_path

# What each role's host imports before forking: the entry point, what its body imports,
# and what the first steps import lazily (numpy's random for the synthetic labels): several
# hundred modules that each process would otherwise hold on its own (BENCHMARKS.md, "A
# fleet on one machine"). Neither role imports sympy or torch._dynamo any more (a device's
# backward pass: common.footprint; an edge's bounds: common.bounds._rows), so no host does.
LAZY = ("numpy.random", "encodings.idna")
PRELOAD = {"device": ("device.__main__", "device.client", "common.data", *LAZY),
           "edge": ("edge.__main__", "edge.server", *LAZY)}
NETNS_DIR = "/run/netns"    # where ``ip netns add`` names its namespaces
CLONE_NEWNET = 0x40000000   # <sched.h>; os.setns and os.CLONE_NEWNET come with Python 3.12


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


def _child(main, argv: list[str], log: str | None, host_pid: int, reply_fd: int | None,
           netns: str | None = None) -> None:
    """In the forked child: become the role's own process, run its main, never return."""
    status = 1
    try:
        if reply_fd is not None:
            os.close(reply_fd)
        os.setsid()
        _as_own_process(argv, host_pid)
        if netns:
            _enter_netns(netns)
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


def _enter_netns(name: str) -> None:
    """Join the network namespace ``name`` (``ip netns add``'s), as ``ip netns exec`` does
    for the network; needs CAP_SYS_ADMIN, as the namespace testbed has."""
    import ctypes
    fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _fork(role: str, main, request, reply_fd: int | None) -> dict:
    if not isinstance(request, dict):
        return {"error": "a request that is not a JSON object"}
    argv, log, netns = request.get("argv"), request.get("log"), request.get("netns")
    if not (isinstance(argv, list) and argv[1:3] == ["-m", role] and all(isinstance(a, str) for a in argv)):
        return {"error": f"not a {role} command line: {argv!r}"}
    if netns is not None and not (isinstance(netns, str) and netns and "/" not in netns and netns[0] != "."):
        return {"error": f"not a namespace name: {netns!r}"}
    threads = _threads()
    if threads != 1:
        return {"error": f"the {role} host has {threads} threads; a forked child would lack all but one"}
    sys.stdout.flush()
    sys.stderr.flush()
    host_pid = os.getpid()
    pid = os.fork()
    if pid == 0:
        _child(main, argv[3:], log, host_pid, reply_fd, netns)
    return {"pid": pid}


def _ready(role: str):
    """Import what the role's children will need, once; returns the role's ``main``."""
    import gc
    import importlib
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
    return main


def host_main(role: str) -> int:
    # replies go on a copy of stdout; fd 1 itself goes to stderr, so that nothing an
    # import prints can land in the middle of a reply
    reply_fd = os.dup(1)
    os.dup2(2, 1)
    main = _ready(role)
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher stops us, after the children
    children: set[int] = set()
    buf, reading, kill_at = b"", True, None
    while reading or children:
        if stopping and reading:
            reading = False
        if not reading:
            kill_at = _stop_children(children, kill_at)
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


def _stop_children(pids, kill_at: float | None) -> float:
    """One turn of stopping forked children: SIGTERM to each the first time (``kill_at``
    None), SIGKILL to those left once ``KILL_AFTER_S`` have passed; the deadline to keep."""
    if kill_at is None:
        for pid in pids:
            signal_pid(pid, signal.SIGTERM)
        return time.monotonic() + KILL_AFTER_S
    if time.monotonic() > kill_at:
        for pid in pids:
            signal_pid(pid, signal.SIGKILL)
    return kill_at


def node_main(role: str, names: list[str], config: str, overrides: list[str], log_dir: str | None) -> int:
    """A host on its own (a container's or an ssh host's devices): fork every role of
    ``names`` and wait for them all. One that fails is said at once and the others go on
    (one device's loss never stops the run); returns 1 if any failed, else 0."""
    def say(text: str) -> None:
        print(f"forkhost: {text}", file=sys.stderr, flush=True)

    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    main = _ready(role)
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.append(1))
    children: dict[int, str] = {}
    failed = 0
    for name in names:
        argv = [sys.executable, "-m", role, "--config", config, "--name", name]
        argv += [a for o in overrides for a in ("--set", o)]
        log = fresh_path(os.path.join(log_dir, f"{name}.log")) if log_dir else None
        reply = _fork(role, main, {"argv": argv, "log": log}, None)
        if "error" in reply:
            say(f"cannot fork {role} {name}: {reply['error']}; stopping")
            stopping.append(1)
            failed += 1
            break
        children[reply["pid"]] = name
        say(f"{role} {name}: pid {reply['pid']}" + (f", log {log}" if log else ""))
    kill_at = None
    while children:
        if stopping:
            kill_at = _stop_children(children, kill_at)
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            time.sleep(POLL_S)
            continue
        name, code = children.pop(pid, "?"), os.waitstatus_to_exitcode(status)
        failed += code != 0
        say(f"{role} {name} (pid {pid}) exited with status {code}")
    return 1 if failed else 0


def signal_pid(pid: int, sig: int) -> None:
    """Signal ``pid`` if it still runs."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="fedfly-forkhost", description="forks device or edge processes from one import "
                                "of torch: for a launcher (over stdin and stdout), or on its own with --config")
    p.add_argument("--role", required=True, choices=sorted(PRELOAD))
    p.add_argument("--config", help="on its own: the testbed file of the roles to fork")
    p.add_argument("--name", dest="names", action="append", default=[], help="on its own: a role to fork (repeat)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="on its own: given to every role forked")
    p.add_argument("--log-dir", help="on its own: each role's output in LOG_DIR/NAME.log (default: ours)")
    args = p.parse_args(argv)
    if not args.config:
        return host_main(args.role)
    if not args.names:
        p.error("--config needs at least one --name")
    # numpy's BLAS would start a thread when the preload imports it, and the host could not fork
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    return node_main(args.role, args.names, args.config, args.overrides, args.log_dir)


if __name__ == "__main__":
    sys.exit(main())

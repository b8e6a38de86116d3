"""Run the testbed on real hosts (Raspberry Pis, edge servers) over ssh, from the one config.

    python -m scripts.remote run     --config FILE [--set K=V]... [--sync-code] [--timeout S]
    python -m scripts.remote up      --config FILE [--set K=V]... [--sync-code]
    python -m scripts.remote status  --state STATE
    python -m scripts.remote wait    --state STATE [--timeout S]
    python -m scripts.remote collect --state STATE
    python -m scripts.remote down    --state STATE

Every role runs on its host: the role's ``ssh`` target if the config sets one, else its
``host``. Hosts are reached with the system ``ssh`` and ``scp`` and the config's [remote]
settings: ``user``, ``ssh_port``, ``identity`` (a private key; relative to the config file),
``ssh_options`` (added to every call, before ours: ``BatchMode=yes``, ``ConnectTimeout``);
``workdir`` is the folder on every host that holds the code (relative to the remote home,
or absolute) and ``python`` the interpreter there (relative to ``workdir``, or absolute).

``up`` writes to every host, in one ssh call, ``<workdir>/.fedfly/<run>/``: the config and
the shared key (mode 600; it travels inside ssh, never on a command line), plus with
``--sync-code`` the code itself into ``<workdir>``. It starts each role there under nohup,
the central first, with its log in ``.fedfly/<run>/logs/`` and its results in
``.fedfly/<run>/results/``, and records each role's host and PID in the state file,
``<run.out>/<run>/remote.json`` on this machine. ``status`` says which still run; ``wait``
returns once the central has exited; ``collect`` copies every host's logs and results
into ``<run.out>/<run>/`` here; ``down`` stops every recorded process by its PID (SIGTERM,
then SIGKILL), after checking that the PID still runs this run's command. ``run`` does it
all, and always ends with ``down``. Exit status 0: done (for ``run``/``wait``: the run
finished); 1: a host or process failed; 2: a bad config.

A machine that runs several devices (edges) of the file runs them from one host process
when the file's ``run.device_host`` (``run.edge_host``) says so ("auto": from
``HOST_AUTO_MIN`` on that machine; ``--device-host`` / ``--no-device-host`` win): ``python
-m common.forkhost --role device --config ... --name A --name B ...``, which imports torch
once and forks each device (common/forkhost.py). The state then records the host, as
``device-host@<machine>``, with the devices it runs; each device still logs to
``logs/<name>.log``; ``status`` and ``down`` see and stop the host, which stops its devices.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import pki
from common.config import ENV_OVERRIDES, Config, load_config
from common.errors import ConfigError
from common.hostspawn import HOSTABLE, hosting
from common.security import CENTRAL, Identity, tls_files

ROOT = Path(__file__).resolve().parent.parent
CODE = ("central", "edge", "device", "common", "scripts", "setup.cfg", "pyproject.toml")
SSH_TIMEOUT_S = 120.0      # one ssh or scp call; a code sync to a Pi over Wi-Fi takes seconds
CONNECT_TIMEOUT_S = 10
POLL_S = 2.0               # how often ``wait`` asks whether the central still runs
KILL_AFTER_S = 5           # SIGTERM, then SIGKILL whoever is still there
# POSIX sh: is PID $1 alive and running this run's command (its config path, $2)? A PID the
# system reused for something else, or a zombie, is not.
ALIVE_SH = ("alive() { { tr '\\0' ' ' < /proc/$1/cmdline || ps -o args= -p \"$1\"; } 2>/dev/null "
            "| grep -qF -- \"$2\"; }")


class RemoteError(Exception):
    """An ssh or scp call failed."""


@dataclass(frozen=True)
class Ssh:
    """How to reach hosts: the [remote] section, with the identity made absolute."""
    user: str
    port: int
    identity: str
    options: str

    def dest(self, target: str) -> str:
        return target if "@" in target or not self.user else f"{self.user}@{target}"

    def _opts(self) -> list[str]:
        opts = shlex.split(self.options)
        if self.identity:
            opts += ["-i", self.identity, "-o", "IdentitiesOnly=yes"]
        return opts + ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}"]

    def ssh(self, target: str, command: str, *, data: bytes | None = None,
            timeout: float = SSH_TIMEOUT_S) -> str:
        """Run ``command`` (a POSIX sh line) on ``target``; returns its stdout."""
        argv = ["ssh", "-p", str(self.port), *self._opts(), self.dest(target), command]
        return _call(argv, data, timeout, f"ssh {self.dest(target)}")

    def fetch(self, target: str, remote_path: str, local_dir: Path, *, timeout: float = SSH_TIMEOUT_S) -> None:
        """Copy ``remote_path`` (a file or folder) into ``local_dir``."""
        argv = ["scp", "-q", "-r", "-P", str(self.port), *self._opts(), f"{self.dest(target)}:{remote_path}",
                str(local_dir)]
        _call(argv, None, timeout, f"scp from {self.dest(target)}")


def _call(argv: list[str], data: bytes | None, timeout: float, what: str) -> str:
    try:
        r = subprocess.run(argv, input=data if data is not None else b"", capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RemoteError(f"{what}: no answer within {timeout:.0f} s") from None
    except OSError as exc:
        raise RemoteError(f"{what}: {exc}") from None
    if r.returncode != 0:
        raise RemoteError(f"{what}: status {r.returncode}: {r.stderr.decode(errors='replace').strip()}")
    return r.stdout.decode(errors="replace")


@dataclass
class Proc:
    name: str
    role: str      # central | edge | device
    target: str    # ssh destination, [user@]host
    pid: int = 0
    names: list[str] = field(default_factory=list)   # a fork host's: the roles it runs

    @property
    def identities(self) -> list[Identity]:
        """Whose keys this process needs: its own, or each of a host's roles'."""
        if self.role == "central":
            return [CENTRAL]
        return [Identity(self.role, n) for n in (self.names or [self.name])]


@dataclass
class State:
    """What ``up`` did, for the other commands (``remote.json``)."""
    run_name: str
    run_dir: str          # here
    workdir: str          # on every host
    ssh: Ssh
    procs: list[Proc] = field(default_factory=list)
    security_mode: str = "key"

    @property
    def remote_dir(self) -> str:  # relative to workdir
        return f".fedfly/{self.run_name}"

    def on_host(self, rel: str) -> str:
        """A path relative to workdir, as ssh/scp see it (relative to the remote home)."""
        return f"{self.workdir.rstrip('/')}/{rel}" if self.workdir else rel

    @property
    def marker(self) -> str:  # in the command line of every process of this run
        return f"{self.remote_dir}/testbed.toml"

    def targets(self) -> dict[str, list[Proc]]:
        by: dict[str, list[Proc]] = {}
        for p in self.procs:
            by.setdefault(p.target, []).append(p)
        return by

    def save(self) -> Path:
        path = Path(self.run_dir) / "remote.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, path: str) -> State:
        d = json.loads(Path(path).read_text())
        return cls(run_name=d["run_name"], run_dir=d["run_dir"], workdir=d["workdir"], ssh=Ssh(**d["ssh"]),
                   procs=[Proc(**p) for p in d["procs"]], security_mode=d.get("security_mode", "key"))


# -- up -----------------------------------------------------------------------------------

def plan(cfg: Config, ssh: Ssh, options: dict[str, bool | None] | None = None) -> list[Proc]:
    """Every process and the ssh destination it runs on, central first: each role's, but
    where a machine forks its edges or devices from a host (``run.edge_host``,
    ``run.device_host``; ``options`` win), that host's, running them all."""
    options = options or {}
    procs = [Proc("central", "central", ssh.dest(cfg.central.ssh or cfg.central.host))]
    procs += [Proc(e, "edge", ssh.dest(cfg.edges[e].ssh or cfg.edges[e].host)) for e in sorted(cfg.edges)]
    procs += [Proc(d, "device", ssh.dest(cfg.devices[d].ssh or cfg.devices[d].host)) for d in cfg.device_names]
    for role in HOSTABLE:
        by_target: dict[str, list[Proc]] = {}
        for p in procs:
            if p.role == role:
                by_target.setdefault(p.target, []).append(p)
        for target, mine in by_target.items():
            if hosting(getattr(cfg.run, f"{role}_host"), len(mine), options.get(role)):
                host = Proc(f"{role}-host@{target.split('@')[-1]}", role, target, names=[p.name for p in mine])
                at = procs.index(mine[0])
                procs = [p for p in procs if p not in mine]
                procs.insert(at, host)
    return procs


def bundle(cfg: Config, remote_dir: str, *, code: bool, who: list[Identity] = ()) -> bytes:
    """A tar of what a host needs: the config, the key (or in the ``tls`` mode the CA's
    certificate and the keys and certificates of ``who``, the processes it runs), and
    with ``code`` the code."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add_bytes(name: str, data: bytes, mode: int) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, int(time.time())
            tar.addfile(info, io.BytesIO(data))

        for d in (".fedfly", remote_dir, f"{remote_dir}/logs", f"{remote_dir}/results", f"{remote_dir}/certs"):
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o700, int(time.time())
            tar.addfile(info)
        add_bytes(f"{remote_dir}/testbed.toml", Path(cfg.path).read_bytes(), 0o600)
        if cfg.security_mode == "tls":
            certs = cfg.certs_dir()
            add_bytes(f"{remote_dir}/certs/ca.crt", Path(certs, "ca.crt").read_bytes(), 0o644)
            for ident in who:
                for path in (tls_files(certs, ident)["cert"], tls_files(certs, ident)["key"]):
                    add_bytes(f"{remote_dir}/certs/{os.path.basename(path)}", Path(path).read_bytes(), 0o600)
        else:
            # the key this machine checked, whether it came from key_file or key_env
            add_bytes(f"{remote_dir}/testbed.key", cfg.key().hex().encode() + b"\n", 0o600)
        if code:
            def no_cache(ti: tarfile.TarInfo) -> tarfile.TarInfo | None:
                return None if "__pycache__" in ti.name.split("/") or ti.name.endswith(".pyc") else ti

            for name in CODE:
                if (ROOT / name).exists():
                    tar.add(ROOT / name, arcname=name, filter=no_cache)
    return buf.getvalue()


def role_command(state: State, proc: Proc, overrides: list[str], python: str) -> str:
    """The sh line that starts ``proc`` in the background on its host and prints its PID."""
    rd = state.remote_dir
    # the key file or the certificates sit beside the config (.fedfly/<run>/testbed.key or
    # certs/); key_env is not used there
    sets = list(overrides) + [f'run.name="{state.run_name}"', f'run.out="{rd}/results"',
                              'security.key_file="testbed.key"', 'security.key_env=""', 'security.certs="certs"',
                              f'security.mode="{state.security_mode}"']
    if proc.names:   # a fork host: each of its roles logs beside the others' (logs/NAME.log)
        argv = [python, "-m", "common.forkhost", "--role", proc.role, "--config", f"{rd}/testbed.toml",
                *(a for n in proc.names for a in ("--name", n)), "--log-dir", f"{rd}/logs"]
    else:
        argv = [python, "-m", proc.role, "--config", f"{rd}/testbed.toml"]
        argv += ["--name", proc.name] if proc.role != "central" else []
    argv += [a for s in sets for a in ("--set", s)]
    q = shlex.quote
    # "cd || exit" and not "cd &&": "a && b &" would put a subshell, not the role, in the background
    cd = f"cd {q(state.workdir)} || exit 1; " if state.workdir else ""
    return (f"{cd}PYTHONPATH=\"$PWD\" PYTHONUNBUFFERED=1 nohup {' '.join(q(a) for a in argv)} "
            f"> {q(f'{rd}/logs/{proc.name}.log')} 2>&1 < /dev/null & echo $!")


def up(cfg: Config, overrides: list[str], *, sync_code: bool, options: dict[str, bool | None] | None = None) -> State:
    r = cfg.remote
    identity = r.identity
    if identity:
        identity = os.path.expanduser(identity)
        if not os.path.isabs(identity):
            identity = os.path.join(os.path.dirname(os.path.abspath(cfg.path)), identity)
    run_name = cfg.run.name or time.strftime("%Y%m%d-%H%M%S") + f"-{cfg.mode}-remote"
    state = State(run_name=run_name, run_dir=str(Path(cfg.run.out) / run_name), workdir=r.workdir,
                  ssh=Ssh(user=r.user, port=r.ssh_port, identity=identity, options=r.ssh_options),
                  security_mode=cfg.security_mode)
    procs = plan(cfg, state.ssh, options)
    for target in dict.fromkeys(p.target for p in procs):
        who = [ident for p in procs if p.target == target for ident in p.identities]
        data = bundle(cfg, state.remote_dir, code=sync_code, who=who)
        mk = f"mkdir -p {shlex.quote(state.workdir)} && " if state.workdir else ""
        cd = f"cd {shlex.quote(state.workdir)} && " if state.workdir else ""
        state.ssh.ssh(target, f"{mk}{cd}umask 077 && tar --no-same-owner -xf -", data=data)
        print(f"remote: {target}: config, key{' and code' if sync_code else ''} in "
              f"{state.on_host(state.remote_dir)}", flush=True)
    try:
        for p in procs:
            out = state.ssh.ssh(p.target, role_command(state, p, overrides, r.python))
            try:
                p.pid = int(out.split()[-1])
            except (ValueError, IndexError):
                raise RemoteError(f"{p.name} on {p.target}: no PID from the start command: {out!r}") from None
            state.procs.append(p)
            state.save()
            runs = f" (forks {', '.join(p.names)})" if p.names else ""
            print(f"remote: {p.role} {p.name} on {p.target}: pid {p.pid}{runs}", flush=True)
    except (RemoteError, KeyboardInterrupt):
        down(state)  # whatever did start must not stay behind
        raise
    print(f"remote: state in {Path(state.run_dir) / 'remote.json'}", flush=True)
    return state


# -- status, wait, collect, down ----------------------------------------------------------

def status(state: State) -> dict[str, bool]:
    """Role name -> still running."""
    running: dict[str, bool] = {}
    for target, procs in state.targets().items():
        checks = "; ".join(f"alive {p.pid} {shlex.quote(state.marker)} && echo {p.pid} up || echo {p.pid} gone"
                           for p in procs)
        out = state.ssh.ssh(target, f"{ALIVE_SH}; {checks}")
        up_pids = {int(line.split()[0]) for line in out.splitlines() if line.endswith(" up")}
        running.update({p.name: p.pid in up_pids for p in procs})
    return running


def wait(state: State, timeout: float) -> bool:
    """True once the central has exited; False if it still runs after ``timeout`` seconds."""
    central = next(p for p in state.procs if p.role == "central")
    deadline = time.monotonic() + timeout
    check = f"{ALIVE_SH}; alive {central.pid} {shlex.quote(state.marker)} && echo up || echo gone"
    while state.ssh.ssh(central.target, check).strip() == "up":
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
    return True


def collect(state: State) -> list[str]:
    """Copy every host's logs and results here; returns what could not be copied."""
    run_dir = Path(state.run_dir)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    problems = []
    with tempfile.TemporaryDirectory(prefix="fedfly-collect-") as tmp:
        for i, target in enumerate(state.targets()):
            stage = Path(tmp) / str(i)
            stage.mkdir()
            for rel in (f"{state.remote_dir}/logs", f"{state.remote_dir}/results/{state.run_name}"):
                try:
                    state.ssh.fetch(target, state.on_host(rel), stage)
                except RemoteError as exc:
                    problems.append(str(exc))
            if (stage / "logs").is_dir():
                shutil.copytree(stage / "logs", run_dir / "logs", dirs_exist_ok=True)
            if (stage / state.run_name).is_dir():
                shutil.copytree(stage / state.run_name, run_dir, dirs_exist_ok=True)
    return problems


def down(state: State) -> list[str]:
    """Stop every recorded process by PID; returns the ones that would not stop."""
    survivors = []
    for target, procs in state.targets().items():
        pids = " ".join(str(p.pid) for p in procs if p.pid)
        if not pids:
            continue
        m = shlex.quote(state.marker)
        script = (f"{ALIVE_SH}; P='{pids}'; for p in $P; do alive $p {m} && kill -TERM $p; done; i=0; "
                  f"while [ $i -lt {KILL_AFTER_S * 10} ]; do a=; for p in $P; do alive $p {m} && a=1; done; "
                  f"[ -z \"$a\" ] && break; sleep 0.1; i=$((i+1)); done; "
                  f"for p in $P; do alive $p {m} && kill -KILL $p && echo killed $p; done; sleep 0.2; "
                  f"for p in $P; do alive $p {m} && echo survivor $p; done; true")
        try:
            out = state.ssh.ssh(target, script)
        except RemoteError as exc:
            survivors += [f"{p.name} (pid {p.pid} on {target}): {exc}" for p in procs]
            continue
        left = {int(line.split()[1]) for line in out.splitlines() if line.startswith("survivor ")}
        survivors += [f"{p.name} (pid {p.pid} on {target})" for p in procs if p.pid in left]
    return survivors


# -- the command line ---------------------------------------------------------------------

def _summary_ok(state: State) -> bool:
    path = Path(state.run_dir) / "summary.json"
    if not path.exists():
        print("remote: no summary.json came back from the central's host", file=sys.stderr)
        return False
    summary = json.loads(path.read_text())
    print(f"remote: run {summary.get('status')}, final model sha256 {summary.get('final_model_sha256')}")
    return summary.get("status") == "finished"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="remote", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "up"):
        q = sub.add_parser(name)
        q.add_argument("--config", required=True)
        q.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
        q.add_argument("--sync-code", action="store_true", help="copy the code into workdir on every host")
        for role in HOSTABLE:
            q.add_argument(f"--{role}-host", action=argparse.BooleanOptionalAction, default=None,
                           help=f"fork the {role}s of each machine from one host process, or not; wins over the "
                                f"config's run.{role}_host")
        if name == "run":
            q.add_argument("--timeout", type=float, default=None, help="seconds to wait for the central")
    for name in ("status", "wait", "collect", "down"):
        q = sub.add_parser(name)
        q.add_argument("--state", required=True, help="the remote.json that up wrote")
        if name == "wait":
            q.add_argument("--timeout", type=float, default=24 * 3600.0)
    args = ap.parse_args(argv)
    try:
        if args.cmd in ("run", "up"):
            try:
                # FEDFLY_SET here is applied remotely too, as --set before the command line's
                overrides = shlex.split(os.environ.get(ENV_OVERRIDES, "")) + args.overrides
                cfg = load_config(args.config, overrides, env={})
                pki.prepare(cfg)
            except ConfigError as exc:
                print(f"remote: error: {exc}", file=sys.stderr)
                return 2
            state = up(cfg, overrides, sync_code=args.sync_code,
                       options={role: getattr(args, f"{role}_host") for role in HOSTABLE})
            if args.cmd == "up":
                return 0
            try:
                timeout = args.timeout or cfg.run.startup_timeout + cfg.training.rounds * cfg.run.round_timeout
                finished = wait(state, timeout)
                if not finished:
                    print(f"remote: the central still runs after {timeout:.0f} s; stopping", file=sys.stderr)
            finally:
                problems = collect(state)
                survivors = down(state)
            for p in problems:
                print(f"remote: collect: {p}", file=sys.stderr)
            for s in survivors:
                print(f"remote: could not stop {s}", file=sys.stderr)
            print(f"results: {state.run_dir}")
            return 0 if finished and _summary_ok(state) and not survivors else 1
        state = State.load(args.state)
        if args.cmd == "status":
            for name, alive in status(state).items():
                print(f"{name} {'running' if alive else 'gone'}")
            return 0
        if args.cmd == "wait":
            if wait(state, args.timeout):
                print("remote: the central has exited (collect brings its summary.json here)")
                return 0
            print(f"remote: the central still runs after {args.timeout:.0f} s", file=sys.stderr)
            return 1
        if args.cmd == "collect":
            problems = collect(state)
            for p in problems:
                print(f"remote: collect: {p}", file=sys.stderr)
            print(f"results: {state.run_dir}")
            return 1 if problems else 0
        survivors = down(state)
        for s in survivors:
            print(f"remote: could not stop {s}", file=sys.stderr)
        return 1 if survivors else 0
    except RemoteError as exc:
        print(f"remote: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("remote: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

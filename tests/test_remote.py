"""scripts/remote.py against a real OpenSSH server that the test starts on loopback.

The server (``sshd -D``) listens on 127.0.0.1 only, with a host key and an authorized key
that the test makes; every "remote host" of the config is 127.0.0.1, reached over ssh
with that key, host key checking on. The test stops sshd by its PID.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from scripts.remote import State
from tests.testbed import LOOPBACK, ROOT, _env, free_ports, kill_tree, write_config

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
pytestmark = pytest.mark.skipif(
    SSHD is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None,
    reason="OpenSSH server or client not installed (apt-get install openssh-server openssh-client; .ci/run does)")


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A throw-away sshd on 127.0.0.1: yields (port, identity file, ssh_options)."""
    d = tmp_path_factory.mktemp("sshd")
    _keygen(d / "host_key")
    _keygen(d / "user_key")
    shutil.copy(d / "user_key.pub", d / "authorized_keys")
    (port,) = free_ports(1)
    (d / "sshd_config").write_text("\n".join([
        f"Port {port}", f"ListenAddress {LOOPBACK}", f"HostKey {d / 'host_key'}", f"PidFile {d / 'sshd.pid'}",
        f"AuthorizedKeysFile {d / 'authorized_keys'}", "StrictModes no", "UsePAM no",
        "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes", "Subsystem sftp internal-sftp", "MaxStartups 50", ""]))
    host_key = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[{LOOPBACK}]:{port} {host_key[0]} {host_key[1]}\n")
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        os.makedirs("/run/sshd", mode=0o755)  # sshd's privilege separation directory
    log = open(d / "sshd.log", "wb")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection((LOOPBACK, port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    text = (d / "sshd.log").read_text(errors="replace")
                    if os.geteuid() != 0:
                        pytest.skip(f"sshd would not start as a non-root user here: {text[-500:]}")
                    raise AssertionError(f"sshd did not start:\n{text}")
                time.sleep(0.1)
        options = f"-o UserKnownHostsFile={d / 'known_hosts'} -o StrictHostKeyChecking=yes -o LogLevel=ERROR"
        yield port, d / "user_key", options
    finally:
        kill_tree(proc)


def _config(tmp: Path, sshd, *, tls: bool = False, **kw) -> Path:
    port, identity, options = sshd
    remote = {"user": getpass.getuser(), "workdir": str(tmp / "remote-home" / "fedfly"), "python": sys.executable,
              "ssh_port": port, "identity": str(identity), "ssh_options": options}
    # one device names its ssh target itself, with the user in it
    extra = {"remote": remote, "devices.device2": {"ssh": f"{getpass.getuser()}@{LOOPBACK}"}}
    if tls:
        extra["security"] = {"mode": "tls", "certs": "certs"}
    return write_config(tmp, extra=extra, **kw)


def _remote(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-m", "scripts.remote", *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise AssertionError(f"scripts.remote {args[0]} did not finish within {timeout} s")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _running(pid: int, marker: str) -> bool:
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE and marker in " ".join(p.cmdline())
    except psutil.NoSuchProcess:
        return False


def _kill_left(state: State) -> None:
    for p in state.procs:
        if _running(p.pid, state.marker):
            os.kill(p.pid, 9)


def test_bundle_gives_a_host_the_ca_and_only_its_own_keys_in_the_tls_mode(tmp_path):
    import io
    import tarfile

    from common import pki
    from common.config import load_config
    from common.security import CENTRAL, Identity
    from scripts.remote import bundle
    cfg = load_config(str(write_config(tmp_path, edges=2, devices=2,
                                       extra={"security": {"mode": "tls", "certs": "certs"}})))
    pki.ensure(cfg)
    data = bundle(cfg, ".fedfly/r", code=False, who=[Identity("edge", "edge1"), Identity("device", "device2")])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        files = {t.name: t.mode for t in tar.getmembers() if t.isfile()}
    certs = {n.rsplit("/", 1)[1]: mode for n, mode in files.items() if "/certs/" in n}
    assert set(certs) == {"ca.crt", "edge-edge1.crt", "edge-edge1.key", "device-device2.crt", "device-device2.key"}
    assert certs["edge-edge1.key"] & 0o077 == 0 and ".fedfly/r/testbed.key" not in files
    assert CENTRAL.stem + ".key" not in certs


@pytest.mark.process
def test_run_over_ssh_syncs_code_collects_results_and_leaves_nothing(tmp_path, sshd):
    cfg = _config(tmp_path, sshd, edges=2, devices=2, rounds=2, tls=True)
    t0 = time.monotonic()
    r = _remote("run", "--config", str(cfg), "--sync-code", "--set", 'run.name="over-ssh"')
    seconds = time.monotonic() - t0
    run_dir = tmp_path / "runs" / "over-ssh"
    state = State.load(str(run_dir / "remote.json"))
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        workdir = tmp_path / "remote-home" / "fedfly"
        assert (workdir / "edge" / "server.py").exists() and (workdir / "common" / "config.py").exists()
        # TLS: the certificates were made here and each host got the CA's and its own
        certs = workdir / ".fedfly" / "over-ssh" / "certs"
        key = certs / "device-device1.key"
        assert key.stat().st_mode & 0o077 == 0, "a key must not be readable by others on the host"
        assert (certs / "ca.crt").exists() and not (certs / "ca.key").exists()
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "finished" and len(summary["rounds"]) == 2
        assert summary["rounds"][-1]["samples"] == 2 * 200
        for name in ("central", "edge1", "edge2", "device1", "device2"):
            assert (run_dir / f"events-{name}.jsonl").exists(), name
            assert (run_dir / "logs" / f"{name}.log").exists(), name
        assert {p.name: p.target.split("@")[-1] for p in state.procs} == \
            {n: LOOPBACK for n in ("central", "edge1", "edge2", "device1", "device2")}
        assert all(not _running(p.pid, state.marker) for p in state.procs)
        print(f"ssh run: {seconds:.1f} s, final model {summary['final_model_sha256'][:16]}")
    finally:
        _kill_left(state)


@pytest.mark.process
def test_up_status_down_stop_every_process_by_pid(tmp_path, sshd):
    # a long run, so that every role is still up when down comes
    cfg = _config(tmp_path, sshd, edges=2, devices=2, rounds=50, samples_per_device=400)
    r = _remote("up", "--config", str(cfg), "--set", 'run.name="long"', timeout=120)
    state_file = tmp_path / "runs" / "long" / "remote.json"
    assert state_file.exists(), r.stdout + r.stderr
    state = State.load(str(state_file))
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        assert len(state.procs) == 5 and all(p.pid > 0 for p in state.procs)
        st = _remote("status", "--state", str(state_file), timeout=60)
        assert st.returncode == 0 and st.stdout.count(" running") == 5, st.stdout + st.stderr
        assert all(_running(p.pid, state.marker) for p in state.procs)
        down = _remote("down", "--state", str(state_file), timeout=60)
        assert down.returncode == 0, down.stdout + down.stderr
        deadline = time.monotonic() + 10
        while any(_running(p.pid, state.marker) for p in state.procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p.name for p in state.procs if _running(p.pid, state.marker)]
        st = _remote("status", "--state", str(state_file), timeout=60)
        assert st.stdout.count(" gone") == 5, st.stdout
        # collect still brings back whatever the stopped roles wrote
        col = _remote("collect", "--state", str(state_file), timeout=60)
        assert (tmp_path / "runs" / "long" / "logs" / "central.log").exists(), col.stdout + col.stderr
    finally:
        _kill_left(state)


@pytest.mark.process
def test_bad_config_and_unreachable_host_fail_cleanly(tmp_path, sshd):
    cfg = _config(tmp_path, sshd, edges=1, devices=2)
    r = _remote("up", "--config", str(cfg), "--set", "remote.ssh_port=0", timeout=60)
    assert r.returncode == 2 and "remote.ssh_port" in r.stderr
    (closed,) = free_ports(1)  # nothing listens there: the very first ssh call fails, nothing starts
    r = _remote("run", "--config", str(cfg), "--set", f"remote.ssh_port={closed}", timeout=120)
    assert r.returncode == 1 and "ssh" in r.stderr, r.stdout + r.stderr

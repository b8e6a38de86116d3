"""docker/: the compose file, the Dockerfile and the entry point, checked without a docker engine.

No docker engine runs on the machines this project is built and tested on, so the image is
never built here and `docker compose up` never runs. Instead: the compose file parses and
describes the testbed of configs/docker.toml (every command a real entry point with the
mounted config, every name of the config a service and back, key as a secret, results on
a volume, health checks on the right ports, `up` ending with the central's status); the
Dockerfile is CPU-only per architecture and runs as a non-root user; the entry point
behaves as documented; and every service's command, run through the entry point with its
compose environment, completes an experiment on loopback.
"""

from __future__ import annotations

import configparser
import importlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from common.config import load_config
from tests.testbed import LOOPBACK, ROOT, _env, free_ports, kill_tree, read_summary

DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
ENTRYPOINT = DOCKER / "entrypoint.sh"
CONFIG_IN_CONTAINER = "/etc/fedfly/testbed.toml"
ROLES = {"central", "edge1", "edge2", "device1", "device2", "device3", "device4"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def cfg():
    return load_config(str(ROOT / "configs" / "docker.toml"))


def console_scripts() -> dict[str, str]:
    cp = configparser.ConfigParser()
    cp.read(ROOT / "setup.cfg")
    lines = [line.strip() for line in cp["options.entry_points"]["console_scripts"].splitlines() if line.strip()]
    return dict(tuple(part.strip() for part in line.split("=", 1)) for line in lines)


def _flag(command: list[str], flag: str) -> str | None:
    return command[command.index(flag) + 1] if flag in command else None


def _default(value: str) -> str:
    """A compose value with each ${VAR:-default} replaced by its default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def _mount(service: dict, target: str) -> str | None:
    for v in service.get("volumes", []):
        parts = _default(v).split(":")
        if parts[1] == target:
            return parts[0]
    return None


def test_services_are_the_testbed_of_the_config(compose, cfg):
    services = compose["services"]
    assert set(services) == ROLES | {"mobility"}
    scripts = console_scripts()
    names = {"edge": set(), "device": set()}
    for name in ROLES:
        svc = services[name]
        cmd = svc["command"]
        # a real entry point: a console script of setup.cfg whose function exists
        assert cmd[0] in scripts, f"{name}: {cmd[0]} is not a console script of setup.cfg"
        module, func = scripts[cmd[0]].split(":")
        assert callable(getattr(importlib.import_module(module), func))
        role = module.split(".")[0]
        assert _flag(cmd, "--config") == CONFIG_IN_CONTAINER
        src = _mount(svc, CONFIG_IN_CONTAINER)
        assert src and (DOCKER / src.split(":")[0]).resolve() == ROOT / "configs" / "docker.toml"
        # another testbed file for the same services: FEDFLY_CONFIG (tests/test_containers.py)
        assert f"${{FEDFLY_CONFIG:-{src}}}:{CONFIG_IN_CONTAINER}:ro" in svc["volumes"]
        if role == "central":
            assert name == "central" and "--name" not in cmd
            ep = cfg.central
        else:
            assert _flag(cmd, "--name") == name, f"service {name} must run the role of the same name"
            names[role].add(name)
            ep = cfg.edges[name] if role == "edge" else cfg.devices[name].control
        # peers find it by its service name; it listens on the container's network
        assert ep.host == name and svc.get("hostname", name) == name
        assert ep.bind == "0.0.0.0"
        # its health check looks for its own port
        test = svc["healthcheck"]["test"]
        assert test[:2] == ["CMD", "/app/docker/entrypoint.sh"] and test[2:] == ["health", str(ep.port)]
        assert svc["restart"] == "no" and svc["init"] is True
    assert names["edge"] == set(cfg.edges) and names["device"] == set(cfg.devices)


def test_start_order_and_exit_status(compose, cfg):
    services = compose["services"]
    for e in cfg.edges:
        assert services[e]["depends_on"] == {"central": {"condition": "service_healthy"}}
    for d, dev in cfg.devices.items():
        assert services[d]["depends_on"] == {dev.edge: {"condition": "service_healthy"}}
    # `up --exit-code-from central`: the workers outlive the central so it exits first
    assert services["central"]["environment"]["FEDFLY_LINGER_S"] == "0"
    for name in ROLES - {"central"}:
        assert int(services[name]["environment"]["FEDFLY_LINGER_S"]) >= 10
    text = COMPOSE.read_text() + (ROOT / "docs" / "DEPLOY.md").read_text()
    assert "up --build --exit-code-from central" in text


def test_key_is_a_secret_and_results_a_volume(compose, cfg):
    secret = compose["secrets"]["fedfly_key"]["file"]
    default = re.fullmatch(r"\$\{FEDFLY_KEY_FILE:-(.+)\}", secret)
    assert default, "the key file is chosen with FEDFLY_KEY_FILE"
    assert (DOCKER / default.group(1)).resolve().is_file()
    assert cfg.key_file() == "/run/secrets/fedfly_key" and not cfg.security.key_env
    assert "volumes" in compose and "results" in compose["volumes"]
    for name in ROLES | {"mobility"}:
        svc = compose["services"][name]
        assert svc["secrets"] == ["fedfly_key"]
        assert _mount(svc, cfg.run.out) == "results", f"{name} must write results to the volume"
    # never in the image
    assert "**/*.key" in (ROOT / ".dockerignore").read_text().split()
    assert ".key" not in (DOCKER / "Dockerfile").read_text().replace("*.key", "")


def test_mobility_one_shot_plays_a_scenario(compose, cfg):
    svc = compose["services"]["mobility"]
    assert svc["profiles"] == ["scenario"], "not part of `up`: its exit would end the run"
    cmd = svc["command"]
    assert cmd[0] == "bash" and (ROOT / cmd[1]).is_file()
    config, device, to, rnd = cmd[2:]
    assert config == CONFIG_IN_CONTAINER and device in cfg.devices and to in cfg.edges
    assert cfg.devices[device].edge != to and 1 <= int(rnd) <= cfg.training.rounds


def test_dockerfile_cpu_torch_per_architecture_non_root():
    text = (DOCKER / "Dockerfile").read_text()
    # the public image by default; a local base (scripts/containers.py) by build argument
    assert re.search(r"^ARG BASE=python:3\.11-slim$", text, re.M) and re.search(r"^FROM \$\{BASE\}$", text, re.M)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    assert "https://download.pytorch.org/whl/cpu" in text
    pins = dict(re.findall(r"^\s+(amd64|arm64)\) torch=\"([^\"]+)\"", text, re.M))
    make = (ROOT / "Makefile").read_text()
    arm, x86 = re.findall(r"^TORCH := (.+)$", make, re.M)
    assert pins == {"arm64": arm.strip(), "amd64": x86.strip()}, "Dockerfile and Makefile pin the same torch"
    assert 'ENTRYPOINT ["/app/docker/entrypoint.sh"]' in text


# -- the entry point ----------------------------------------------------------------------

def _entry(*args: str, linger: str = "0", timeout: float = 30) -> tuple[int, float]:
    t0 = time.monotonic()
    r = subprocess.run(["sh", str(ENTRYPOINT), *args], env={**os.environ, "FEDFLY_LINGER_S": linger},
                       timeout=timeout, capture_output=True)
    return r.returncode, time.monotonic() - t0


def test_entrypoint_health_check_sees_a_listener_without_connecting():
    s = socket.socket()
    s.bind((LOOPBACK, 0))
    port = s.getsockname()[1]
    try:
        assert _entry("health", str(port))[0] == 1  # bound, not listening
        s.listen()
        assert _entry("health", str(port))[0] == 0
    finally:
        s.close()
    assert _entry("health", str(port))[0] == 1


def _catches_term(pid: int) -> bool:
    """Whether process ``pid`` has a handler for SIGTERM (the shell's trap is set)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def _await(pred, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_entrypoint_lingers_only_after_success():
    assert _entry("true")[0] == 0
    status, took = _entry("true", linger="1")
    assert status == 0 and took >= 1
    status, took = _entry("sh", "-c", "exit 3", linger="30")
    assert status == 3 and took < 10
    # compose stops a lingering container with SIGTERM: it leaves at once, with 0
    proc = subprocess.Popen(["sh", str(ENTRYPOINT), "true"], env={**os.environ, "FEDFLY_LINGER_S": "60"})
    try:
        # lingering: its `sleep` runs (started after the lingering trap is set)
        _await(lambda: any(p.name() == "sleep" for p in psutil.Process(proc.pid).children()), "no linger")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    # ...and a SIGTERM while the role runs goes to the role
    proc = subprocess.Popen(["sh", str(ENTRYPOINT), sys.executable, "-c", "import time; time.sleep(60)"],
                            env={**os.environ, "FEDFLY_LINGER_S": "60"})
    try:
        _await(lambda: psutil.Process(proc.pid).children() and _catches_term(proc.pid), "no role or no trap")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            kill_tree(proc)


# -- the services' commands, run as compose would, on loopback ------------------------------

def _as_here(argv: list[str], config: Path) -> list[str]:
    return [str(config) if a == CONFIG_IN_CONTAINER else a for a in argv]


@pytest.mark.process
def test_compose_commands_run_an_experiment_on_loopback(compose, cfg, tmp_path):
    """Each service's command through the entry point, with the service's environment; the
    config is configs/docker.toml with addresses, ports, key and results moved here by
    FEDFLY_SET (as an environment override would be in compose). The config's scheduled
    move and the mobility one-shot both happen."""
    bin_dir = Path(sys.executable).parent
    if not all((bin_dir / c).exists() or shutil.which(c) for c in ("fedfly-central", "fedfly-edge", "fedfly-device")):
        pytest.skip("the console scripts are not installed (pip install -e .)")
    config = ROOT / "configs" / "docker.toml"
    key = tmp_path / "test.key"
    key.write_text(os.urandom(32).hex())
    ports = dict(zip(sorted(ROLES), free_ports(len(ROLES))))
    # 4 rounds: the one-shot's round 3 must not be the last, or a move that arrives after
    # device3's last step would have no step left to land on
    sets = [f'security.key_file="{key}"', f'security.certs="{tmp_path / "certs"}"', f'run.out="{tmp_path / "runs"}"',
            'run.name="compose"',
            "training.rounds=4", "training.batch_size=50", "data.samples_per_device=200", "data.test_samples=500",
            f'central.host="{LOOPBACK}"', 'central.bind=""', f"central.port={ports['central']}"]
    for e in cfg.edges:
        sets += [f'edges.{e}.host="{LOOPBACK}"', f'edges.{e}.bind=""', f"edges.{e}.port={ports[e]}"]
    for d in cfg.devices:
        sets += [f'devices.{d}.host="{LOOPBACK}"', f'devices.{d}.bind=""', f"devices.{d}.control_port={ports[d]}"]
    base_env = {**_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                "FEDFLY_SET": " ".join(shlex.quote(s) for s in sets)}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str) -> subprocess.Popen:
        svc = compose["services"][name]
        env = {**base_env, **{k: _interpolate(str(v)) for k, v in svc.get("environment", {}).items()}}
        if env.get("FEDFLY_CERTS_FOR") == CONFIG_IN_CONTAINER:
            env["FEDFLY_CERTS_FOR"] = str(config)
        # the service's own overrides (TLS), then the test's (the certificates here)
        env["FEDFLY_SET"] = " ".join(filter(None, [_interpolate(str(svc.get("environment", {}).get("FEDFLY_SET", ""))),
                                                   base_env["FEDFLY_SET"]]))
        if name != "central" and name != "mobility":
            env["FEDFLY_LINGER_S"] = "1"  # not 60: the test need not wait for compose to stop them
        with open(logs / f"{name}.log", "wb") as log:
            procs[name] = subprocess.Popen(["sh", str(ENTRYPOINT), *_as_here(svc["command"], config)], cwd=ROOT,
                                           env=env, stdout=log, stderr=subprocess.STDOUT)
        return procs[name]

    try:
        for name in ["central", *sorted(cfg.edges), *sorted(cfg.devices)]:  # the depends_on order
            start(name)
        deadline = time.monotonic() + 120  # `docker compose run mobility` comes once the testbed is up
        while _entry("health", str(ports["device3"]))[0] != 0:
            assert time.monotonic() < deadline and procs["device3"].poll() is None, (logs / "device3.log").read_text()
            time.sleep(0.5)
        mob = start("mobility")
        assert mob.wait(timeout=240) == 0, (logs / "mobility.log").read_text()
        assert procs["central"].wait(timeout=240) == 0, (logs / "central.log").read_text()[-3000:]
        for name, p in procs.items():
            assert p.wait(timeout=60) == 0, f"{name}:\n{(logs / f'{name}.log').read_text()[-2000:]}"
    finally:
        for p in procs.values():
            if p.poll() is None:
                kill_tree(p)
    summary = read_summary(f"results: {tmp_path / 'runs' / 'compose'}")
    assert summary["status"] == "finished" and len(summary["rounds"]) == 4
    moved = {(m["device"], m["to"]) for m in summary["migrations"]}
    assert moved == {("device1", "edge2"), ("device3", "edge1")}
    assert summary["device_settings"]["device4"]["slowdown"] == 3.0
    # TLS by default: the central's entry point made every certificate before it listened
    assert (tmp_path / "certs" / "ca.crt").exists() and (tmp_path / "certs" / "device-device4.key").exists()


def _interpolate(text: str) -> str:
    """``${VAR:-default}`` as compose reads it, from this environment."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda mo: os.environ.get(mo.group(1)) or mo.group(2), text)


def _compose_cli() -> list[str] | None:
    """A compose implementation that can check the file without an engine: the docker CLI's
    compose plugin, or Debian's docker-compose (1.29, which .ci/run installs)."""
    if shutil.which("docker"):
        r = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if r.returncode == 0:
            return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


@pytest.mark.process
def test_a_compose_implementation_accepts_the_file():
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed (apt-get install docker-compose)")
    for profile in ([], ["--profile", "scenario"]):
        r = subprocess.run([*cli, "-f", str(COMPOSE), *profile, "config", "--quiet"], capture_output=True, text=True,
                           timeout=60, env={k: v for k, v in os.environ.items() if k != "FEDFLY_KEY_FILE"})
        assert r.returncode == 0, r.stdout + r.stderr

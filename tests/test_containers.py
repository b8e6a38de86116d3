"""The image, the compose file and the Kubernetes manifests, run for real with podman.

The image is built here (scripts/containers.py: a debootstrap base, this host's wheels, the
Dockerfile; all cached, so only the first run of a machine pays for it). Then a compose
file (podman-compose) and manifests (`podman kube play`) each run a testbed over podman's
bridge network, roles reaching each other by their names: files that scripts/deploy.py
makes from a localhost testbed file of 3 edges and 4 devices (2 rounds of 4 steps, one
move), and with FEDFLY_TEST_DEMO_CONTAINERS=1 also the committed demo files with
configs/docker.toml made small (2 rounds of 4 steps per device, its scheduled move kept). Each run must finish with the move
recorded and the same `final_model_sha256` as the same training on loopback.

Without podman (not root, not installed: `.ci/run` installs it) these tests are skipped
with the reason; the checks of the manifests themselves need no engine. Everything a test
starts (containers, pods, networks, volumes, secrets) is removed by that test.

The arm64 image (qemu-user-static) runs one device in the kube run only when
FEDFLY_TEST_ARM64=1: under emulation its build alone takes many minutes.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import secrets
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from common.config import load_config
from scripts import containers, deploy
from scripts.benchlib import render_toml, write_config
from tests.test_exactness import reference_sha
from tests.testbed import LOOPBACK, ROOT, free_ports

COMPOSE = ROOT / "docker" / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
DOCKER_TOML = ROOT / "configs" / "docker.toml"
CONFIG_IN_CONTAINER = "/etc/fedfly/testbed.toml"
KEY_IN_CONTAINER = "/run/secrets/fedfly_key"
IMAGE_UID = 1000             # the Dockerfile's default UID: the key file must be readable by it
RUN_NAME = "containers"
# configs/docker.toml made small: 2 rounds of 4 steps on each of its 4 devices
SMALL = {"training": {"rounds": 2, "batch_size": 50}, "data": {"samples_per_device": 200, "test_samples": 500},
         "run": {"name": RUN_NAME}}
START_TIMEOUT_S = 300        # podman-compose up -d / podman kube play: create and start 7 containers
RUN_TIMEOUT_S = 600          # the central's whole run (about 20 s here)
# The first test to use the image builds it: 3 min here with nothing cached (debootstrap,
# the wheels, unpacking torch), and more on a busy machine than setup.cfg's 600 s per test.
BUILD_AND_RUN_TIMEOUT_S = 1800


def _manifests() -> list[dict]:
    docs: list[dict] = []
    for f in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def _of_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _sections(raw: dict) -> tuple[dict[str, dict], list[dict]]:
    """A parsed testbed file as benchlib.render_toml's sections and moves."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    moves = raw.pop("mobility", {}).get("moves", [])
    sections: dict[str, dict] = {}
    for name, table in raw.items():
        if name in ("edges", "devices"):
            sections.update({f"{name}.{n}": dict(t) for n, t in table.items()})
        else:
            sections[name] = dict(table)
    return sections, moves


# -- the manifests, without an engine --------------------------------------------------------

def test_configmap_is_the_compose_testbed_file_and_secret_the_demo_key():
    docs = _manifests()
    cm = _of_kind(docs, "ConfigMap")["fedfly-testbed"]
    assert cm["data"]["testbed.toml"] == DOCKER_TOML.read_text(), "deploy/k8s/config.yaml drifted from configs/docker.toml"
    secret = _of_kind(docs, "Secret")["fedfly-key"]
    key = base64.b64decode(secret["data"]["fedfly_key"])
    assert key == (ROOT / "configs" / "demo-INSECURE.key").read_bytes()
    assert "INSECURE" in next(K8S.glob("*INSECURE*.yaml")).name


def test_one_pod_per_role_placed_by_role_with_services_for_the_names():
    cfg = tomllib.loads(DOCKER_TOML.read_text())
    docs = _manifests()
    pods, services = _of_kind(docs, "Pod"), _of_kind(docs, "Service")
    compose = yaml.safe_load(COMPOSE.read_text())
    # name -> (role, its table in the testbed file, its port, its command)
    roles = {"central": ("central", cfg["central"], cfg["central"]["port"],
                         ["fedfly-central", "--config", CONFIG_IN_CONTAINER])}
    roles |= {e: ("edge", t, t["port"], ["fedfly-edge", "--config", CONFIG_IN_CONTAINER, "--name", e])
              for e, t in cfg["edges"].items()}
    roles |= {d: ("device", t, t["control_port"], ["fedfly-device", "--config", CONFIG_IN_CONTAINER, "--name", d])
              for d, t in cfg["devices"].items()}
    assert set(pods) == set(roles)
    for name, (role, table, port, argv) in roles.items():
        spec = pods[name]["spec"]
        (ctr,) = spec["containers"]
        assert ctr["args"] == argv == compose["services"][name]["command"]
        assert ctr["image"] == compose["services"][name]["image"] and ctr["imagePullPolicy"] == "IfNotPresent"
        assert spec["restartPolicy"] == "Never"
        assert spec["nodeSelector"]["fedfly.io/role"] == role
        if role == "device":
            assert spec["nodeSelector"]["kubernetes.io/arch"] == "arm64", "devices run on the Pis"
        mounts = {m["mountPath"]: m["name"] for m in ctr["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes[mounts[str(Path(CONFIG_IN_CONTAINER).parent)]]["configMap"]["name"] == "fedfly-testbed"
        assert volumes[mounts[str(Path(KEY_IN_CONTAINER).parent)]]["secret"]["secretName"] == "fedfly-key"
        assert "hostPath" in volumes[mounts[cfg["run"]["out"]]]
        # reached by its name: a Service of that name selects this pod, on the config's port
        svc = services[name]["spec"]
        assert pods[name]["metadata"]["labels"].items() >= svc["selector"].items()
        assert [(p["port"], p["targetPort"]) for p in svc["ports"]] == [(port, port)]
        assert table["host"] == name and table["bind"] == "0.0.0.0"


# -- the image and the runs -----------------------------------------------------------------

@dataclass
class Deployment:
    """One testbed, ready for podman: its compose file and the environment that file wants,
    its Kubernetes documents (the ConfigMap holding the run's testbed file, the Secret its
    key), and the testbed file whose training on loopback the runs must match."""
    compose: Path
    compose_env: dict[str, str]
    k8s_docs: list[dict]
    key: Path
    loopback_toml: Path
    moves: set[tuple[str, str]]


def _container_docs(config_text: str, key: Path, docs: list[dict]) -> list[dict]:
    """``docs`` with the ConfigMap holding ``config_text`` and the Secret the key ``key``."""
    for d in docs:
        if d["kind"] == "ConfigMap":
            d["data"]["testbed.toml"] = config_text
    docs = [d for d in docs if d["kind"] != "Secret"]
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "fedfly-key"}, "type": "Opaque",
              "data": {"fedfly_key": base64.b64encode(key.read_bytes()).decode()}}
    return [secret, *docs]  # the Secret first: podman makes it before the pods that mount it


def _demo(tmp: Path) -> Deployment:
    """The committed files (docker/docker-compose.yml, deploy/k8s/) running configs/docker.toml
    made small (2 rounds of 4 steps on each of its 4 devices, its scheduled move kept)."""
    key = tmp / "test.key"
    key.write_text(secrets.token_hex(32))
    key.chmod(0o600)
    os.chown(key, IMAGE_UID, IMAGE_UID)  # compose hands it in as a bind mount that keeps its owner
    sections, moves = _sections(tomllib.loads(DOCKER_TOML.read_text()))
    for sec, vals in SMALL.items():
        sections[sec].update(vals)
    container = tmp / "container.toml"
    container.write_text(render_toml(sections, moves))
    # the same run here: loopback addresses and free ports, the key and results in tmp
    ports = iter(free_ports(sum(1 for s in sections if s == "central" or s.startswith(("edges.", "devices.")))))
    for sec, vals in sections.items():
        if sec == "central" or sec.startswith(("edges.", "devices.")):
            vals.update(host=LOOPBACK, bind="")
            vals["control_port" if sec.startswith("devices.") else "port"] = next(ports)
    sections["security"]["key_file"] = str(key)
    sections["run"]["out"] = str(tmp / "runs")
    loopback = tmp / "loopback.toml"
    loopback.write_text(render_toml(sections, moves))
    return Deployment(COMPOSE, {"FEDFLY_CONFIG": str(container), "FEDFLY_KEY_FILE": str(key)},
                      _container_docs(container.read_text(), key, _manifests()), key, loopback,
                      {(m["device"], m["to"]) for m in moves})


def _generated(tmp: Path) -> Deployment:
    """A topology that is not the demo's, 3 edges and 4 devices, as a localhost testbed file
    (loopback addresses, its key and results here); the compose file and the manifests are
    made from that very file by scripts/deploy.py, and the same file trained on loopback
    gives the final model they must end with."""
    moves = [{"device": "device1", "to": "edge3", "round": 2, "at": 0.5}]
    path = write_config(tmp, RUN_NAME, edges=3, devices=4, rounds=SMALL["training"]["rounds"],
                        batch_size=SMALL["training"]["batch_size"],
                        samples_per_device=SMALL["data"]["samples_per_device"],
                        test_samples=SMALL["data"]["test_samples"], moves=moves)
    key = tmp / "bench.key"   # write_config's
    os.chown(key, IMAGE_UID, IMAGE_UID)
    cfg = load_config(str(path), env={})
    compose = tmp / "compose" / "docker-compose.yml"
    compose.parent.mkdir()
    compose.write_text(deploy.compose(cfg, config_ref=str(path), root_ref=str(ROOT)))
    docs = [d for text in (deploy.k8s_config(path.read_text()), deploy.k8s_testbed(cfg))
            for d in yaml.safe_load_all(text)]
    return Deployment(compose, {"FEDFLY_KEY_FILE": str(key)}, _container_docs(path.read_text(), key, docs), key,
                      path, {(m["device"], m["to"]) for m in moves})


DEPLOYMENTS = {"demo": _demo, "3 edges, 4 devices": _generated}
# The demo's committed files are the generator's output for configs/docker.toml
# (tests/test_deploy.py checks them byte for byte and reads them back), so the suite runs
# the generated topology only; FEDFLY_TEST_DEMO_CONTAINERS=1 runs the demo's files too.
RUN = [d for d in DEPLOYMENTS if d != "demo" or os.environ.get("FEDFLY_TEST_DEMO_CONTAINERS") == "1"]


@pytest.fixture(scope="module")
def image() -> str:
    reason = containers.probe()
    if reason:
        pytest.skip(reason)
    try:
        return containers.build_image(log=lambda m: None)
    except containers.ContainerError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module", params=RUN)
def deployment(request, tmp_path_factory) -> Deployment:
    return DEPLOYMENTS[request.param](tmp_path_factory.mktemp("containers"))


@pytest.fixture(scope="module")
def loopback_sha(deployment) -> str:
    """The final model of the same run here, trained in this process (the whole model,
    FedAvg in name order): a loopback run ends with it, moves or not (tests/test_exactness.py)."""
    return reference_sha(deployment.loopback_toml, rounds=SMALL["training"]["rounds"])


def _podman(*args: str, timeout: float = 120, check: bool = True) -> str:
    try:
        return containers.podman(*args, timeout=timeout, check=check).stdout.strip()
    except containers.ContainerError as exc:
        raise AssertionError(str(exc)) from None


def _logs(names: list[str]) -> str:
    out = []
    for n in names:
        r = containers.podman("logs", n, check=False, timeout=60)
        out.append(f"--- {n}:\n{(r.stdout + r.stderr)[-1500:]}")
    return "\n".join(out)


def _wait(container: str, names: list[str]) -> None:
    """Until ``container`` exits; it must exit with 0."""
    status = _podman("wait", container, timeout=RUN_TIMEOUT_S)
    assert status == "0", f"{container} exited with {status}\n{_logs(names)}"


def _story(run_dir: Path | None) -> str:
    """What a failed run's event logs say: every event that is not routine, by process."""
    if run_dir is None:
        return "(no results)"
    routine = {"session_state", "heartbeat"}
    out = []
    for f in sorted(run_dir.glob("events-*.jsonl")):
        lines = []
        for ln in f.read_text(errors="replace").splitlines():
            try:
                event = json.loads(ln).get("event")
            except ValueError:  # a line cut short by a killed process: shown as it is
                event = None
            if event not in routine:
                lines.append(ln)
        out.append(f"--- {f.name}:\n" + "\n".join(lines[-40:]))
    return "\n".join(out)


def _check(summary: dict, cfg: Deployment, expected_sha: str | None, run_dir: Path | None = None) -> None:
    assert summary["status"] == "finished" and len(summary["rounds"]) == SMALL["training"]["rounds"], _story(run_dir)
    assert {(m["device"], m["to"]) for m in summary["migrations"]} == cfg.moves, (
        f"migrations {summary['migrations']}\nfaults {summary['faults']}\n{_story(run_dir)}")
    if expected_sha is not None:
        assert summary["final_model_sha256"] == expected_sha, "the container run trained differently from loopback"


@pytest.mark.process
@pytest.mark.timeout(BUILD_AND_RUN_TIMEOUT_S)
def test_compose_up_runs_the_testbed(image, deployment, loopback_sha, tmp_path):
    if shutil.which("podman-compose") is None:
        pytest.skip("podman-compose is not installed (apt-get install podman-compose)")
    compose = yaml.safe_load(deployment.compose.read_text())
    # podman-compose 1.0.3 (Debian 12) knows no profiles: name the services of `up`
    services = [s for s, svc in compose["services"].items() if not svc.get("profiles")]
    project = f"fftest{secrets.token_hex(3)}"
    cmd = ["podman-compose", "-p", project, "-f", str(deployment.compose)]
    env = containers.podman_env({**os.environ, **deployment.compose_env})
    names = [f"{project}_{s}_1" for s in services]
    summary = None
    try:
        r = subprocess.run([*cmd, "up", "-d", "--no-build", *services], env=env, capture_output=True, text=True,
                           timeout=START_TIMEOUT_S)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        _wait(f"{project}_central_1", names)
        results = Path(_podman("volume", "inspect", f"{project}_results", "--format", "{{.Mountpoint}}"))
        shutil.copytree(results / RUN_NAME, tmp_path / RUN_NAME)  # the volume goes with `down`
        summary = json.loads((tmp_path / RUN_NAME / "summary.json").read_text())
    finally:
        subprocess.run([*cmd, "down", "-v", "-t", "5"], env=env, capture_output=True, timeout=START_TIMEOUT_S)
        # whatever down left (podman-compose 1.0.3 leaves the network; an interrupted up, more)
        left = _podman("ps", "-aq", "--filter", f"label=io.podman.compose.project={project}", check=False).split()
        if left:
            _podman("rm", "-f", "-t", "0", *left, check=False)
        _podman("volume", "rm", "-f", f"{project}_results", f"{project}_certs", check=False)
        _podman("network", "rm", "-f", f"{project}_testbed", check=False)
    _check(summary, deployment, loopback_sha, tmp_path / RUN_NAME)


def _kube_play(deployment: Deployment, tmp: Path, *, images: dict[str, str] | None = None) -> tuple[dict, dict]:
    """Run the deployment's manifests with `podman kube play`: each node's results folder is
    ``tmp/results``, and ``images`` gives some pods another image. Everything is removed
    afterwards. Returns summary.json and the architecture each pod's container ran."""
    docs = copy.deepcopy(deployment.k8s_docs)
    results = tmp / "results"
    results.mkdir()
    for d in docs:
        if d["kind"] == "Pod":
            for v in d["spec"]["volumes"]:
                if "hostPath" in v:
                    v["hostPath"]["path"] = str(results)
            for c in d["spec"]["containers"] + d["spec"].get("initContainers", []):
                c["image"] = (images or {}).get(d["metadata"]["name"], c["image"])
    play = tmp / "play.yaml"
    play.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    pods = list(_of_kind(docs, "Pod"))
    # podman names are global: never touch what is not ours
    volumes = list(_of_kind(docs, "ConfigMap")) + list(_of_kind(docs, "Secret"))
    taken = [p for p in pods if containers.podman("pod", "exists", p, check=False).returncode == 0]
    taken += [v for v in volumes if containers.podman("volume", "exists", v, check=False).returncode == 0]
    taken += [s for s in _of_kind(docs, "Secret") if containers.podman("secret", "inspect", s, check=False).returncode == 0]
    assert not taken, f"podman already has pods, volumes or secrets named {taken}: remove them to run this test"
    network = f"fftest{secrets.token_hex(3)}"
    names = [f"{p}-{c['name']}" for p, d in _of_kind(docs, "Pod").items() for c in d["spec"]["containers"]]
    _podman("network", "create", network)
    try:
        _podman("kube", "play", "--network", network, str(play), timeout=START_TIMEOUT_S)
        _wait("central-central", names)
        arch = {n.split("-")[0]: _podman("image", "inspect", _podman("inspect", n, "--format", "{{.Image}}"),
                                         "--format", "{{.Architecture}}") for n in names}
        return json.loads((results / RUN_NAME / "summary.json").read_text()), arch
    finally:
        containers.podman("kube", "down", str(play), check=False, timeout=START_TIMEOUT_S)
        for p in pods:  # a play that failed half-way
            containers.podman("pod", "rm", "-f", "-t", "0", p, check=False)
        containers.podman("volume", "rm", "-f", *volumes, check=False)
        for s in _of_kind(docs, "Secret"):
            containers.podman("secret", "rm", s, check=False)
        containers.podman("network", "rm", "-f", network, check=False)


@pytest.mark.process
@pytest.mark.timeout(BUILD_AND_RUN_TIMEOUT_S)
def test_kube_play_runs_the_manifests(image, deployment, loopback_sha, tmp_path):
    summary, arch = _kube_play(deployment, tmp_path)
    _check(summary, deployment, loopback_sha, tmp_path / "results" / RUN_NAME)
    assert set(arch.values()) == {containers.native_arch()}


@pytest.mark.process
@pytest.mark.timeout(7200)
def test_arm64_device_among_x86_roles(image, tmp_path):
    """device1 from the arm64 image (under qemu), the others from this machine's: the run
    finishes with the move; its weights differ from x86's (another torch build on device1)."""
    if os.environ.get("FEDFLY_TEST_ARM64") != "1":
        pytest.skip("opt-in: FEDFLY_TEST_ARM64=1 (builds the arm64 image under qemu: slow)")
    reason = containers.probe("arm64")
    if reason:
        pytest.skip(reason)
    arm = containers.build_image("arm64", log=lambda m: None)
    assert _podman("image", "inspect", arm, "--format", "{{.Architecture}}") == "arm64"
    demo = _demo(tmp_path / "demo")
    summary, arch = _kube_play(demo, tmp_path, images={"device1": arm})
    _check(summary, demo, None)
    assert arch.pop("device1") == "arm64" and set(arch.values()) == {containers.native_arch()}
    assert summary["devices"]["device1"]["steps"] == summary["devices"]["device2"]["steps"]

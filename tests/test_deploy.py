"""scripts/deploy.py: the compose file and the Kubernetes manifests made from a testbed file,
checked without an engine for several topologies, and the committed demo files checked to
be its output for configs/docker.toml (tests/test_containers.py runs them with podman)."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from common.config import load_config
from common.errors import ConfigError
from scripts import deploy, yamltext
from scripts.benchlib import write_config
from tests.testbed import ROOT

DOCKER_TOML = ROOT / "configs" / "docker.toml"
COMPOSE = ROOT / "docker" / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
# libyaml's loader where PyYAML has it: the 128-device files take seconds in pure Python
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load(text: str):
    return yaml.load(text, Loader=LOADER)


def _load_all(text: str) -> list:
    return list(yaml.load_all(text, Loader=LOADER))


# -- the committed files are the generator's --------------------------------------------------

def test_committed_compose_file_is_generated_from_configs_docker_toml():
    cfg = load_config(str(DOCKER_TOML), env={})
    made = deploy.compose(cfg, config_ref="../configs/docker.toml", root_ref="..")
    assert COMPOSE.read_text() == made, (
        "docker/docker-compose.yml is not the generator's: "
        "python -m scripts.deploy compose --config configs/docker.toml --out docker/docker-compose.yml")


def test_committed_manifests_are_generated_from_configs_docker_toml():
    cfg = load_config(str(DOCKER_TOML), env={})
    fix = "python -m scripts.deploy k8s --config configs/docker.toml --out deploy/k8s"
    assert (K8S / "testbed.yaml").read_text() == deploy.k8s_testbed(cfg), f"deploy/k8s/testbed.yaml drifted: {fix}"
    assert (K8S / "config.yaml").read_text() == deploy.k8s_config(DOCKER_TOML.read_text()), (
        f"deploy/k8s/config.yaml drifted: {fix}")


# -- the YAML writer ------------------------------------------------------------------------

def test_yaml_text_reads_back_as_the_same_data():
    data = {
        "plain": "fedfly", "no": "no", "yes": True, "octal": "0440", "mode": 0o440, "empty": "", "colon": "a: b",
        "hash": "#x", "quote": 'say "hi"\\', "unicode": "Pi \u00e9t\u00e9", "float": 3.0, "none": None,
        "text": "line 1\n  indented\n\nlast \n", "no final newline": "a\nb", "two final": "a\n\n",
        "lead space": " a\nb\n", "tab": "a\tb\nc\n", "fedfly.io/role": "edge", "on": [],
        "nested": {"list": [{"a": 1, "b": [1, "2"]}, "x", {}], "map": {}, "deep": [{"k": {"v": [True]}}]},
    }
    assert yaml.safe_load(yamltext.dump(data, "a header\nof two lines")) == data
    assert list(yaml.safe_load_all(yamltext.dump_all([data, {"b": 2}], "h"))) == [data, {"b": 2}]
    with pytest.raises(TypeError):
        yamltext.dump({"x": object()})
    shared = yamltext.Anchor("s", 'a="b" c')
    text = yamltext.dump({"one": {"env": shared}, "two": [shared, {"k": shared}], "three": [shared]})
    assert text.count('a=\\"b\\" c') == 1
    assert yaml.safe_load(text) == {"one": {"env": 'a="b" c'}, "two": ['a="b" c', {"k": 'a="b" c'}],
                                    "three": ['a="b" c']}


# -- any topology -------------------------------------------------------------------------------

TOPOLOGIES = {  # edges, devices
    "one edge, one device": (1, 1),
    "3 edges, 6 devices": (3, 6),
    "16 edges, 128 devices": (16, 128),
}


@pytest.fixture(params=[*TOPOLOGIES, "configs/docker.toml"])
def testbed(request, tmp_path) -> Path:
    """A localhost testbed file (loopback addresses, its own key and results folder), or
    the demo's file written for containers."""
    if request.param in TOPOLOGIES:
        edges, devices = TOPOLOGIES[request.param]
        return write_config(tmp_path, "topo", edges=edges, devices=devices, rounds=4)
    return DOCKER_TOML


@functools.cache
def _in_container(cfg_path: Path, env_set: str):
    """The config as a container loads it: the file, then its FEDFLY_SET."""
    return load_config(str(cfg_path), env={"FEDFLY_SET": env_set})


def _check_addresses(c) -> None:
    assert (c.central.host, c.central.bind) == ("central", "0.0.0.0")
    for e, ep in c.edges.items():
        assert (ep.host, ep.bind) == (e, "0.0.0.0")
    for d, dev in c.devices.items():
        assert (dev.host, dev.bind) == (d, "0.0.0.0")
    assert c.run.out == deploy.RESULTS_IN_CONTAINER
    assert c.key_file() == deploy.KEY_IN_CONTAINER and not c.security.key_env


def test_compose_has_every_role_reached_by_its_name(testbed):
    cfg = load_config(str(testbed), env={})
    doc = _load(deploy.compose(cfg, config_ref=str(testbed), root_ref=str(ROOT)))
    services = doc["services"]
    roles = {"central": ("central", cfg.central.port)}
    roles |= {e: ("edge", ep.port) for e, ep in cfg.edges.items()}
    roles |= {d: ("device", dev.control_port) for d, dev in cfg.devices.items()}
    assert set(services) - {"mobility"} == set(roles)
    for name, (role, port) in roles.items():
        svc = services[name]
        cmd = svc["command"]
        assert cmd[:3] == [f"fedfly-{role}", "--config", deploy.CONFIG_IN_CONTAINER]
        assert cmd[3:] == ([] if role == "central" else ["--name", name])
        assert svc["hostname"] == name and svc["networks"] == ["testbed"]
        assert svc["healthcheck"]["test"][-2:] == ["health", str(port)]
        assert svc["restart"] == "no" and svc["init"] is True and svc["secrets"] == ["fedfly_key"]
        assert f"${{FEDFLY_CONFIG:-{testbed}}}:{deploy.CONFIG_IN_CONTAINER}:ro" in svc["volumes"]
        assert "results:/results" in svc["volumes"]
        upstream = {"central": None, "edge": "central"}.get(role, cfg.devices[name].edge if role == "device" else None)
        assert svc.get("depends_on") == ({upstream: {"condition": "service_healthy"}} if upstream else None)
        # what the container loads: the file with its FEDFLY_SET (compose's ${..:-tls} as its default)
        sets = svc["environment"]["FEDFLY_SET"].replace("${FEDFLY_SECURITY:-tls}", "tls")
        c = _in_container(testbed, sets)
        _check_addresses(c)
        assert c.security_mode == "tls" and c.certs_dir() == deploy.CERTS_IN_CONTAINER
    assert services["central"]["environment"]["FEDFLY_CERTS_FOR"] == deploy.CONFIG_IN_CONTAINER
    assert "certs:/certs" in services["central"]["volumes"]
    assert all("certs:/certs:ro" in services[n]["volumes"] for n in roles if n != "central")
    # the one-shot scenario moves a device of the testbed to another edge of it
    if len(cfg.edges) > 1:
        _, _, config, device, to, rnd = services["mobility"]["command"]
        assert config == deploy.CONFIG_IN_CONTAINER and cfg.devices[device].edge != to and to in cfg.edges
        assert 1 <= int(rnd) <= cfg.training.rounds and services["mobility"]["profiles"] == ["scenario"]
    else:
        assert "mobility" not in services
    assert doc["secrets"]["fedfly_key"]["file"] == f"${{FEDFLY_KEY_FILE:-{ROOT}/configs/demo-INSECURE.key}}"


def test_k8s_pod_and_service_per_role_placed_by_node_labels(testbed):
    cfg = load_config(str(testbed), env={})
    docs = _load_all(deploy.k8s_testbed(cfg))
    pods = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Pod"}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert len(pods) + len(services) == len(docs)
    roles = {"central": ("central", cfg.central.port)}
    roles |= {e: ("edge", ep.port) for e, ep in cfg.edges.items()}
    roles |= {d: ("device", dev.control_port) for d, dev in cfg.devices.items()}
    assert set(pods) == set(services) == set(roles)
    for name, (role, port) in roles.items():
        spec = pods[name]["spec"]
        (ctr,) = spec["containers"]
        assert ctr["args"][0] == f"fedfly-{role}" and ctr["args"][1:3] == ["--config", deploy.CONFIG_IN_CONTAINER]
        assert spec["restartPolicy"] == "Never"
        assert spec["nodeSelector"] == ({"fedfly.io/role": role, "kubernetes.io/arch": "arm64"} if role == "device"
                                        else {"fedfly.io/role": role})
        if role != "central":
            (term,) = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            assert term["labelSelector"]["matchLabels"] == {"fedfly.io/role": role}
        assert "ports" not in ctr, "podman kube play would publish them on the host"
        svc = services[name]["spec"]
        assert pods[name]["metadata"]["labels"].items() >= svc["selector"].items()
        assert [(p["port"], p["targetPort"]) for p in svc["ports"]] == [(port, port)]
        mounts = {m["mountPath"]: m["name"] for m in ctr["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes[mounts["/etc/fedfly"]]["configMap"]["name"] == "fedfly-testbed"
        assert volumes[mounts["/run/secrets"]]["secret"]["secretName"] == "fedfly-key"
        assert volumes[mounts[deploy.RESULTS_IN_CONTAINER]]["hostPath"]["path"] == deploy.NODE_RESULTS
        env = {e["name"]: e["value"] for e in ctr["env"]}
        c = _in_container(testbed, env.get("FEDFLY_SET", ""))
        _check_addresses(c)
        assert c.security_mode == "key"
    cm = yaml.safe_load(deploy.k8s_config(testbed.read_text()))
    assert cm["data"]["testbed.toml"] == testbed.read_text()


def test_names_that_cannot_name_a_container_are_refused(tmp_path, capsys):
    path = write_config(tmp_path, "bad", edges=1, devices=1, device_edges=None)
    path.write_text(path.read_text().replace("devices.device1", "devices.Device_1"))
    cfg = load_config(str(path), env={})
    with pytest.raises(ConfigError, match="Device_1"):
        deploy.k8s_testbed(cfg)
    assert deploy.main(["compose", "--config", str(path)]) == 2
    said = capsys.readouterr()
    assert "DNS label" in said.err and not said.out


def test_command_writes_files_or_stdout(tmp_path, capsys, monkeypatch):
    path = write_config(tmp_path, "topo", edges=3, devices=6)
    out = tmp_path / "out"

    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("FEDFLY_SET", raising=False)

    def run(*args: str) -> str:
        capsys.readouterr()
        assert deploy.main([*args, "--config", str(path)]) == 0
        return capsys.readouterr().out

    cfg = load_config(str(path), env={})
    run("compose", "--out", str(out / "docker-compose.yml"))
    doc = yaml.safe_load((out / "docker-compose.yml").read_text())
    # paths in a compose file are from its folder
    assert f"${{FEDFLY_CONFIG:-../topo.toml}}:{deploy.CONFIG_IN_CONTAINER}:ro" in doc["services"]["edge3"]["volumes"]
    assert (out / doc["services"]["central"]["build"]["context"]).resolve() == ROOT
    assert yaml.safe_load(run("compose")) == yaml.safe_load(
        deploy.compose(cfg, config_ref=os.path.relpath(path, ROOT), root_ref="."))
    run("k8s", "--out", str(out / "k8s"))
    assert (out / "k8s" / "testbed.yaml").read_text() == deploy.k8s_testbed(cfg)
    assert (out / "k8s" / "config.yaml").read_text() == deploy.k8s_config(path.read_text())
    kinds = [d["kind"] for d in yaml.safe_load_all(run("k8s"))]
    assert kinds == ["ConfigMap"] + ["Service"] * 10 + ["Pod"] * 10


@pytest.mark.process
def test_a_compose_implementation_accepts_a_generated_file(tmp_path):
    """docker compose (or Debian's docker-compose 1.29) checks a 3-edge, 6-device file made
    from a localhost testbed file, its one-shot scenario included, without an engine."""
    from tests.test_docker import _compose_cli
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed (apt-get install docker-compose)")
    path = write_config(tmp_path, "topo", edges=3, devices=6)
    out = tmp_path / "compose" / "docker-compose.yml"
    assert deploy.main(["compose", "--config", str(path), "--out", str(out)]) == 0
    for profile in ([], ["--profile", "scenario"]):
        r = subprocess.run([*cli, "-f", str(out), *profile, "config", "--quiet"], capture_output=True, text=True,
                           timeout=60, env={k: v for k, v in os.environ.items() if k != "FEDFLY_KEY_FILE"})
        assert r.returncode == 0, r.stdout + r.stderr

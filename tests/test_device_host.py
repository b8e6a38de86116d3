"""``run.device_host`` / ``run.edge_host``: the fork host (common/forkhost.py) as a config key,
and in every launcher that can use it: its parsing and errors, who decides (an option wins,
"auto" counts what one machine runs), the compose file and manifests with one device
container, the ssh launcher's host per machine, the container health check of several
ports. No process is started here but the entry point's ``sh`` (tests/test_forkhost.py
runs the testbed with the key; the namespace testbed is run by hand, see the report)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import yaml

from central import launch
from common.config import HOST_AUTO_MIN, load_config
from common.errors import ConfigError
from common.forkhost import _fork
from common.forkhost import main as forkhost_main
from common.hostspawn import hosted_roles, hosting
from scripts import deploy, remote
from tests.testbed import LOOPBACK, ROOT, write_config

LINUX = sys.platform.startswith("linux")


def _cfg(tmp_path, devices: int = 4, edges: int = 2, **run):
    return load_config(str(write_config(tmp_path, edges=edges, devices=devices, extra={"run": run} if run else None)),
                       env={})


# -- the keys -----------------------------------------------------------------------------------

def test_keys_default_to_auto_and_take_on_and_off(tmp_path):
    cfg = _cfg(tmp_path)
    assert (cfg.run.device_host, cfg.run.edge_host) == ("auto", "auto")
    cfg = _cfg(tmp_path, device_host="on", edge_host="off")
    assert (cfg.run.device_host, cfg.run.edge_host) == ("on", "off")
    cfg = load_config(str(write_config(tmp_path)), ['run.edge_host="on"'], env={})
    assert cfg.run.edge_host == "on"


@pytest.mark.parametrize("key, value, said", [
    ("device_host", '"yes"', "'yes' must be one of auto, on, off"),
    ("edge_host", "true", "is bool True, must be str"),
    ("device_host", "1", "is int 1, must be str"),
])
def test_a_bad_value_names_the_key_and_the_choices(tmp_path, key, value, said):
    path = write_config(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(str(path), [f"run.{key}={value}"], env={})
    assert err.value.key == f"run.{key}" and said in err.value.problem
    assert err.value.fix == 'write one of "auto", "on", "off"'


def test_an_option_wins_and_auto_counts_what_one_machine_runs():
    for setting in ("auto", "on", "off"):
        assert hosting(setting, 1, True) is True and hosting(setting, 500, False) is False
    assert hosting("on", 1) and not hosting("off", 500)
    assert not hosting("auto", HOST_AUTO_MIN - 1)
    assert hosting("auto", HOST_AUTO_MIN) is LINUX


def test_hosted_roles_per_role(tmp_path):
    run = _cfg(tmp_path, device_host="on", edge_host="auto").run
    assert hosted_roles(run, {"device": 4, "edge": 2}) == ["device"]
    assert hosted_roles(run, {"device": 4, "edge": HOST_AUTO_MIN}) == (["device", "edge"] if LINUX else ["device"])
    assert hosted_roles(run, {"device": 4, "edge": 2}, {"device": False, "edge": True}) == ["edge"]


def test_the_launcher_says_its_options_win_over_the_keys(capsys):
    with pytest.raises(SystemExit):
        launch.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--device-host, --no-device-host" in text and "--edge-host, --no-edge-host" in text
    assert "wins over the config's run.device_host" in text and "wins over run.edge_host" in text


def test_the_host_refuses_what_it_cannot_fork_and_a_lone_host_needs_names(capsys):
    argv = [sys.executable, "-m", "device", "--config", "x.toml", "--name", "d1"]
    for bad in ("../etc", "a/b", "", 3):
        assert "namespace" in _fork("device", None, {"argv": argv, "netns": bad}, None)["error"]
    assert "command line" in _fork("device", None, {"argv": ["python", "-m", "edge"]}, None)["error"]
    with pytest.raises(SystemExit) as exc:
        forkhost_main(["--role", "device", "--config", "x.toml"])
    assert exc.value.code == 2 and "--config needs at least one --name" in capsys.readouterr().err


# -- compose and Kubernetes ---------------------------------------------------------------------

def _compose(cfg):
    return yaml.safe_load(deploy.compose(cfg, config_ref="testbed.toml", root_ref="."))


def test_compose_puts_every_device_in_one_container_reached_at_its_name(tmp_path):
    cfg = _cfg(tmp_path, devices=6, edges=3, device_host="on")
    text = deploy.compose(cfg, config_ref="testbed.toml", root_ref=".")
    services = yaml.safe_load(text)["services"]
    devices = sorted(cfg.devices)
    assert set(services) == {"central", "edge1", "edge2", "edge3", deploy.HOST, "mobility"}
    host = services[deploy.HOST]
    assert host["command"] == ["python", "-m", "common.forkhost", "--role", "device", "--config",
                               deploy.CONFIG_IN_CONTAINER, *(a for d in devices for a in ("--name", d))]
    assert host["networks"] == ["testbed"] and host["hostname"] == deploy.HOST
    assert host["depends_on"] == {e: {"condition": "service_healthy"} for e in ("edge1", "edge2", "edge3")}
    assert host["healthcheck"]["test"][2:] == ["health", *(str(cfg.devices[d].control_port) for d in devices)]
    assert host["environment"]["FEDFLY_LINGER_S"] == str(deploy.WORKER_LINGER_S)
    # every container (the one-shot mobility controller's too) loads each device's address
    # as that container's name, on all its interfaces
    for svc in (host, services["central"], services["mobility"]):
        sets = svc["environment"]["FEDFLY_SET"].replace("${FEDFLY_SECURITY:-tls}", "tls")
        c = load_config(cfg.path, env={"FEDFLY_SET": sets})
        assert all((dev.host, dev.bind) == (deploy.HOST, "0.0.0.0") for dev in c.devices.values())
        assert all((ep.host, ep.bind) == (e, "0.0.0.0") for e, ep in c.edges.items())
    assert "forked in one container (device-host; run.device_host)" in " ".join(text.split())


def test_auto_hosts_compose_devices_from_the_threshold_but_never_kubernetes_pods(tmp_path, capsys):
    small, big = _cfg(tmp_path / "s", devices=HOST_AUTO_MIN - 1), _cfg(tmp_path / "b", devices=HOST_AUTO_MIN)
    assert deploy.HOST not in _compose(small)["services"] and "device1" in _compose(small)["services"]
    assert (deploy.HOST in _compose(big)["services"]) is LINUX
    pods = [d["metadata"]["name"] for d in yaml.safe_load_all(deploy.k8s_testbed(big)) if d["kind"] == "Pod"]
    assert deploy.HOST not in pods and len(pods) == 1 + 2 + HOST_AUTO_MIN
    assert deploy.main(["k8s", "--config", big.path]) == 0
    assert 'run.device_host = "auto" keeps one Pod per device here' in capsys.readouterr().err


def test_k8s_runs_the_devices_in_one_pod_with_one_service_a_port_each(tmp_path):
    cfg = _cfg(tmp_path, device_host="on")
    docs = list(yaml.safe_load_all(deploy.k8s_testbed(cfg)))
    pods = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Pod"}
    services = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Service"}
    assert set(pods) == {"central", "edge1", "edge2", deploy.HOST}
    assert set(services) == set(pods)
    host = pods[deploy.HOST]
    assert host["metadata"]["labels"]["fedfly.io/role"] == "device"
    assert host["spec"]["nodeSelector"] == {"fedfly.io/role": "device", "kubernetes.io/arch": "arm64"}
    assert "affinity" not in host["spec"]   # one Pod: nothing to spread
    (ctr,) = host["spec"]["containers"]
    assert ctr["args"] == deploy.host_command(cfg)
    assert services[deploy.HOST]["selector"] == {"fedfly.io/name": deploy.HOST}
    assert services[deploy.HOST]["ports"] == [{"name": f"p{dev.control_port}", "port": dev.control_port,
                                               "targetPort": dev.control_port} for _, dev in sorted(cfg.devices.items())]
    env = {e["name"]: e["value"] for e in ctr["env"]}
    c = load_config(cfg.path, env={"FEDFLY_SET": env["FEDFLY_SET"]})
    assert all(dev.host == deploy.HOST for dev in c.devices.values())
    assert "affinity" in pods["edge1"]["spec"]


def test_one_container_of_devices_needs_their_ports_apart_and_its_name_free(tmp_path):
    path = write_config(tmp_path, extra={"run": {"device_host": "on"}})
    cfg = load_config(str(path), env={})
    clash = load_config(str(path), [f"devices.device3.control_port={cfg.devices['device1'].control_port}",
                                    'devices.device3.host="device3"'], env={})
    with pytest.raises(ConfigError) as err:
        deploy.compose(clash, config_ref="t.toml", root_ref=".")
    assert err.value.key == "devices.device3.control_port" and "device1's" in err.value.problem
    assert 'run.device_host = "off"' in err.value.fix
    named = tmp_path / "named.toml"
    named.write_text(path.read_text().replace("devices.device4", f"devices.{deploy.HOST}"))
    with pytest.raises(ConfigError, match=f"devices.{deploy.HOST}"):
        deploy.k8s_testbed(load_config(str(named), env={}))


def test_deploy_says_edges_keep_their_containers(tmp_path, capsys):
    cfg = _cfg(tmp_path, edge_host="on")
    assert deploy.main(["compose", "--config", cfg.path]) == 0
    said = capsys.readouterr()
    assert 'run.edge_host = "on" is for the launchers of one machine' in said.err
    assert set(yaml.safe_load(said.out)["services"]) >= {"edge1", "edge2", "device1"}


def test_the_health_check_takes_several_ports():
    def health(*ports: int) -> int:
        return subprocess.run(["sh", str(ROOT / "docker" / "entrypoint.sh"), "health", *map(str, ports)],
                              capture_output=True, timeout=30).returncode

    a, b = socket.socket(), socket.socket()
    try:
        a.bind((LOOPBACK, 0))
        b.bind((LOOPBACK, 0))
        a.listen()
        pa, pb = a.getsockname()[1], b.getsockname()[1]
        assert health(pa) == 0 and health(pa, pb) == 1 and health(pb, pa) == 1
        b.listen()
        assert health(pa, pb) == 0
    finally:
        a.close()
        b.close()
    assert health() == 2


# -- the ssh launcher ---------------------------------------------------------------------------

SSH = remote.Ssh(user="pi", port=22, identity="", options="")


def _shared_machine(tmp_path, **run):
    """devices 1-3 on one machine (their ssh target), device4 on another."""
    path = write_config(tmp_path, extra={"run": run} if run else None)
    sets = [f'devices.device{i}.ssh="big"' for i in (1, 2, 3)] + ['devices.device4.ssh="pi4"']
    return load_config(str(path), sets, env={})


def test_ssh_runs_one_host_per_machine_with_its_devices(tmp_path):
    cfg = _shared_machine(tmp_path, device_host="on")
    procs = remote.plan(cfg, SSH)
    assert [(p.name, p.role, p.target, p.names) for p in procs[3:]] == [
        ("device-host@big", "device", "pi@big", ["device1", "device2", "device3"]),
        ("device-host@pi4", "device", "pi@pi4", ["device4"])]
    assert [p.name for p in procs[:3]] == ["central", "edge1", "edge2"] and not any(p.names for p in procs[:3])
    assert [i.stem for i in procs[3].identities] == ["device-device1", "device-device2", "device-device3"]
    state = remote.State(run_name="r", run_dir=str(tmp_path / "r"), workdir="fedfly", ssh=SSH)
    line = remote.role_command(state, procs[3], ["training.rounds=1"], "python3")
    assert ("python3 -m common.forkhost --role device --config .fedfly/r/testbed.toml --name device1 --name device2 "
            "--name device3 --log-dir .fedfly/r/logs --set training.rounds=1") in line
    assert "> .fedfly/r/logs/device-host@big.log" in line
    # the state file keeps who a host runs
    state.procs = procs
    assert remote.State.load(str(state.save())).procs == procs


def test_ssh_auto_counts_each_machine_and_an_option_wins(tmp_path):
    cfg = _shared_machine(tmp_path)
    assert [p.name for p in remote.plan(cfg, SSH)][3:] == ["device1", "device2", "device3", "device4"]
    assert [p.name for p in remote.plan(cfg, SSH, {"device": True})][3:] == ["device-host@big", "device-host@pi4"]
    cfg = _shared_machine(tmp_path, device_host="on", edge_host="on")
    names = [p.name for p in remote.plan(cfg, SSH, {"device": False})]
    # both edges run on the loopback address, one machine: one edge host
    assert names == ["central", f"edge-host@{LOOPBACK}", "device1", "device2", "device3", "device4"]

"""The compose file and the Kubernetes manifests of a testbed, made from its testbed file.

    python -m scripts.deploy compose --config F [--out docker-compose.yml]
    python -m scripts.deploy k8s --config F [--out DIR]       # DIR/testbed.yaml, DIR/config.yaml

One container (compose service, Kubernetes Pod) per role of the file, named as the file
names it (``central``, each edge, each device) and reached by that name; with the file's
``run.device_host`` on (compose: also "auto" from ``HOST_AUTO_MIN`` devices, as they all
run on one machine), one container ``device-host`` runs every device instead, forked from
one import of torch (``python -m common.forkhost``), each device reached at that
container's name on its own port (``devices.NAME.host`` set so in every container).
``run.edge_host`` is not used here: each edge keeps its container, as each is a machine of
its own in a lab. A role whose
``host`` in the file is not its name, or whose ``bind`` is not ``0.0.0.0``, gets the
right ones by ``FEDFLY_SET`` in every container, and so do ``run.out`` (the results
volume) and ``security.key_file`` (the secret), so that the same file that runs on
localhost runs in containers and ends with the same final model. Without ``--out`` the
text goes to stdout (``k8s``: the ConfigMap and the manifests as one stream, for
``kubectl apply -f -``).

What the files do is documented in docs/DEPLOY.md; ``docker/docker-compose.yml`` and
``deploy/k8s/{testbed,config}.yaml`` are this module's output for configs/docker.toml
(tests/test_deploy.py regenerates them and compares the text).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from common.cli import run_main
from common.config import HOST_AUTO_MIN, Config
from common.errors import ConfigError
from common.hostspawn import hosting
from scripts import yamltext

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "fedfly-testbed:latest"
CONFIG_IN_CONTAINER = "/etc/fedfly/testbed.toml"
KEY_IN_CONTAINER = "/run/secrets/fedfly_key"
RESULTS_IN_CONTAINER = "/results"
CERTS_IN_CONTAINER = "/certs"
NODE_RESULTS = "/var/lib/fedfly/results"   # each Kubernetes node's results folder
IMAGE_UID = 1000                            # the Dockerfile's user
LISTEN_ALL = "0.0.0.0"
WORKER_LINGER_S = 60   # compose: edges and devices outlive the central (docker/entrypoint.sh)
HOST = "device-host"   # the container of every device when run.device_host is on
# A container's, a Service's and a Pod's name: a DNS label (RFC 1123)
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
_TLS = f'security.mode="${{FEDFLY_SECURITY:-tls}}" security.certs="{CERTS_IN_CONTAINER}"'


# -- what both targets share ------------------------------------------------------------------

def roles(cfg: Config) -> list[tuple[str, str, int, list[str]]]:
    """(name, role, port, command) of every process of the testbed, central first, then
    the edges and the devices in name order; ``port`` is the one it listens on."""
    out = [("central", "central", cfg.central.port, ["fedfly-central", "--config", CONFIG_IN_CONTAINER])]
    out += [(e, "edge", cfg.edges[e].port, ["fedfly-edge", "--config", CONFIG_IN_CONTAINER, "--name", e])
            for e in sorted(cfg.edges)]
    out += [(d, "device", cfg.devices[d].control_port,
             ["fedfly-device", "--config", CONFIG_IN_CONTAINER, "--name", d]) for d in sorted(cfg.devices)]
    for name, role, _, _ in out:
        if not _DNS_LABEL.match(name):
            raise ConfigError(f"{role}s.{name}" if role != "central" else "central",
                              f"{name!r} cannot name a container, Service or Pod",
                              "name it with lower-case letters, digits and '-' (a DNS label)")
    return out


def device_host(cfg: Config, target: str) -> bool:
    """Whether ``target``'s devices share one container: ``run.device_host`` "on"; "auto"
    too for compose from ``HOST_AUTO_MIN`` devices (one machine runs them all), never for
    Kubernetes (the Pods of one-device-per-Pi placement may be on as many nodes)."""
    setting = cfg.run.device_host if target == "compose" or cfg.run.device_host != "auto" else "off"
    if not hosting(setting, len(cfg.devices)):
        return False
    if HOST in cfg.edges or HOST in cfg.devices:
        raise ConfigError(f"{'edges' if HOST in cfg.edges else 'devices'}.{HOST}",
                          "is the name of the container of every device (run.device_host)", "rename it")
    seen: dict[int, str] = {}
    for d in sorted(cfg.devices):
        port = cfg.devices[d].control_port
        if port in seen:
            raise ConfigError(f"devices.{d}.control_port", f"{port} is also {seen[port]}'s, and with run.device_host "
                              "every device listens in one container", "give every device its own control_port, or "
                              "set run.device_host = \"off\"")
        seen[port] = d
    return True


def host_command(cfg: Config) -> list[str]:
    """The device host's command: every device of the file, forked from one process."""
    return ["python", "-m", "common.forkhost", "--role", "device", "--config", CONFIG_IN_CONTAINER,
            *(a for d in sorted(cfg.devices) for a in ("--name", d))]


def overrides(cfg: Config, hosted: bool = False) -> list[str]:
    """The ``FEDFLY_SET`` settings that make the file's addresses, results folder and key
    the containers' ones; none for a file written for containers (configs/docker.toml).
    ``hosted``: every device is in the container ``HOST``, and reached there."""
    sets = []
    if (cfg.central.host, cfg.central.bind) != ("central", LISTEN_ALL):
        sets += ['central.host="central"', f'central.bind="{LISTEN_ALL}"']
    for e in sorted(cfg.edges):
        if (cfg.edges[e].host, cfg.edges[e].bind) != (e, LISTEN_ALL):
            sets += [f'edges.{e}.host="{e}"', f'edges.{e}.bind="{LISTEN_ALL}"']
    for d in sorted(cfg.devices):
        at = HOST if hosted else d
        if (cfg.devices[d].host, cfg.devices[d].bind) != (at, LISTEN_ALL):
            sets += [f'devices.{d}.host="{at}"', f'devices.{d}.bind="{LISTEN_ALL}"']
    if cfg.run.out != RESULTS_IN_CONTAINER:
        sets.append(f'run.out="{RESULTS_IN_CONTAINER}"')
    if cfg.security.key_file != KEY_IN_CONTAINER or cfg.security.key_env:
        sets += [f'security.key_file="{KEY_IN_CONTAINER}"', 'security.key_env=""']
    return sets


def scenario(cfg: Config) -> tuple[str, str, int] | None:
    """The live move of the compose file's ``mobility`` one-shot: the first device of the
    last edge that has one (other than the first edge) goes to the first edge, half-way
    through the middle round; None with fewer than two edges."""
    edges = sorted(cfg.edges)
    if len(edges) < 2:
        return None
    rnd = min(cfg.training.rounds, cfg.training.rounds // 2 + 1)
    for e in reversed(edges[1:]):
        on = sorted(d for d, dev in cfg.devices.items() if dev.edge == e)
        if on:
            return on[0], edges[0], rnd
    first = sorted(cfg.devices)[0]
    return first, edges[1], rnd


# -- compose --------------------------------------------------------------------------------

def compose(cfg: Config, *, config_ref: str, root_ref: str) -> str:
    """The compose file's text. ``config_ref`` is the testbed file and ``root_ref`` the
    repository, as paths from the folder the compose file will be in."""
    hosted = device_host(cfg, "compose")
    # written once, then by alias: with a localhost file it names every role's address
    sets = yamltext.Anchor("fedfly_set", " ".join([_TLS, *(shlex.quote(s) for s in overrides(cfg, hosted))]))
    config_mount = f"${{FEDFLY_CONFIG:-{config_ref}}}:{CONFIG_IN_CONTAINER}:ro"
    out = cfg.run.out if cfg.run.out == RESULTS_IN_CONTAINER else RESULTS_IN_CONTAINER

    def service(name: str, command: list[str], *, central: bool = False) -> dict[str, Any]:
        return {
            "image": IMAGE,
            "build": {"context": root_ref, "dockerfile": "docker/Dockerfile"},
            "init": True,
            "restart": "no",
            "networks": ["testbed"],
            "hostname": name,
            "command": command,
            "volumes": [config_mount, f"results:{out}",
                        f"certs:{CERTS_IN_CONTAINER}" + ("" if central else ":ro")],
            "secrets": ["fedfly_key"],
            "environment": {"FEDFLY_LINGER_S": "0" if central else str(WORKER_LINGER_S), "FEDFLY_SET": sets},
        }

    def healthcheck(*ports: int) -> dict[str, Any]:
        return {"test": ["CMD", "/app/docker/entrypoint.sh", "health", *map(str, ports)],
                "interval": "2s", "timeout": "5s", "retries": 60, "start_period": "120s"}

    services: dict[str, Any] = {}
    for name, role, port, command in roles(cfg):
        if hosted and role == "device":
            continue
        svc = service(name, command, central=role == "central")
        if role == "central":
            svc["environment"]["FEDFLY_CERTS_FOR"] = CONFIG_IN_CONTAINER
        else:
            upstream = "central" if role == "edge" else cfg.devices[name].edge
            svc["depends_on"] = {upstream: {"condition": "service_healthy"}}
        svc["healthcheck"] = healthcheck(port)
        services[name] = svc
    if hosted:   # every device in one container, reached at its name (not by aliases: podman-compose 1.0 has none)
        devices = sorted(cfg.devices)
        svc = service(HOST, host_command(cfg))
        svc["depends_on"] = {e: {"condition": "service_healthy"} for e in sorted({cfg.devices[d].edge for d in devices})}
        svc["healthcheck"] = healthcheck(*(cfg.devices[d].control_port for d in devices))
        services[HOST] = svc
    move = scenario(cfg)
    if move is not None:
        device, to, rnd = move
        svc = service("mobility", ["bash", "scripts/scenarios/move_half.sh", CONFIG_IN_CONTAINER, device, to, str(rnd)])
        del svc["hostname"]
        svc["profiles"] = ["scenario"]
        svc["environment"] = {"FEDFLY_LINGER_S": "0", "FEDFLY_SET": sets, "PYTHON": "python"}
        services["mobility"] = svc
    doc = {
        "services": services,
        "networks": {"testbed": {}},
        "volumes": {"results": {}, "certs": {}},
        "secrets": {"fedfly_key": {"file": f"${{FEDFLY_KEY_FILE:-{root_ref}/configs/demo-INSECURE.key}}"}},
    }
    return yamltext.dump(doc, _compose_header(cfg, move, hosted))


def _compose_header(cfg: Config, move: tuple[str, str, int] | None, hosted: bool) -> str:
    each = (f"one container each but the devices,\nforked in one container ({HOST}; run.device_host), "
            if hosted else "one container each, ")
    text = f"""\
Made by `python -m scripts.deploy compose --config {_shown(cfg.path)}`: do not edit, make it again.
FedFly in compose: 1 central, {len(cfg.edges)} edges, {len(cfg.devices)} devices, {each}on the
network "testbed", each reached by its name. A whole experiment, from this file's folder:

  docker compose -f FILE up --build --exit-code-from central

It exits with the central's status; edges and devices stay up FEDFLY_LINGER_S seconds
after they finish, so the central exits first (docker/entrypoint.sh). FEDFLY_CONFIG mounts
another testbed file with the same names. Results: the volume "results". Security: TLS 1.3,
mutual; the central's container makes every certificate into the volume "certs" on first
use. FEDFLY_SECURITY=key runs the shared-key mode with the key FEDFLY_KEY_FILE (default:
the committed DEMO key, fine on a laptop, never on a network). See docs/DEPLOY.md."""
    if move is not None:
        text += (f"\nA live move while it runs (profile \"scenario\": {move[0]} to {move[1]} in round {move[2]}):"
                 "\n\n  docker compose -f FILE run --rm mobility")
    return text


# -- Kubernetes -----------------------------------------------------------------------------

def k8s_config(config_text: str) -> str:
    """The ConfigMap ``fedfly-testbed`` holding the testbed file, byte for byte."""
    doc = {"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": "fedfly-testbed", "labels": {"app.kubernetes.io/name": "fedfly"}},
           "data": {"testbed.toml": config_text}}
    return yamltext.dump(doc, """\
The testbed file of the Kubernetes run, byte for byte (made by `python -m scripts.deploy k8s`).
Every pod mounts it at /etc/fedfly/testbed.toml. See docs/DEPLOY.md, "Kubernetes (k3s)".""")


def k8s_testbed(cfg: Config) -> str:
    """A Service and a Pod per role. Pods are placed by the node label
    ``fedfly.io/role=central|edge|device`` (devices on arm64 nodes: the Pis), one edge and
    one device per node; each is reached by its name, the name of its Service (and of its
    Pod, which `podman kube play` resolves)."""
    hosted = device_host(cfg, "k8s")
    sets = " ".join(shlex.quote(s) for s in overrides(cfg, hosted))
    out = cfg.run.out if cfg.run.out == RESULTS_IN_CONTAINER else RESULTS_IN_CONTAINER
    # (Pod and Service, role, ports, command): every role's own, or with run.device_host one
    # of every device, a port each (the devices' host is then that Pod's name)
    units = [(n, r, [p], c) for n, r, p, c in roles(cfg) if not (hosted and r == "device")]
    if hosted:
        units.append((HOST, "device", [cfg.devices[d].control_port for d in sorted(cfg.devices)], host_command(cfg)))
    services, pods = [], []
    for name, role, ports, command in units:
        why = {"central": "the edges join the central here",
               "edge": "devices attach and edges hand sessions over here",
               "device": "the mobility controller's way to the device" + ("s" if name == HOST else "")}[role]
        services.append({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "fedfly"},
                         "annotations": {"fedfly.io/why": why}},
            "spec": {"selector": {"fedfly.io/name": name},
                     # several ports must be named apart (a DNS label of at most 15 characters)
                     "ports": [{"name": f"p{port}" if name == HOST else "fedfly", "port": port, "targetPort": port}
                               for port in ports]},
        })
    for name, role, _, command in units:
        selector = {"fedfly.io/role": role}
        if role == "device":
            selector["kubernetes.io/arch"] = "arm64"
        env = [{"name": "FEDFLY_LINGER_S", "value": "0"}]
        if sets:
            env.append({"name": "FEDFLY_SET", "value": sets})
        spec: dict[str, Any] = {"restartPolicy": "Never", "automountServiceAccountToken": False,
                                "nodeSelector": selector}
        if role != "central" and name != HOST:   # one edge per host, one device per host, as in the lab
            spec["affinity"] = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": {"matchLabels": {"fedfly.io/role": role}},
                 "topologyKey": "kubernetes.io/hostname"}]}}
        spec |= {
            "securityContext": {"runAsUser": IMAGE_UID, "runAsGroup": IMAGE_UID, "fsGroup": IMAGE_UID},
            # a hostPath folder is root's: hand it to the roles' user
            "initContainers": [{"name": "results-owner", "image": IMAGE, "imagePullPolicy": "IfNotPresent",
                                "command": ["chown", f"{IMAGE_UID}:{IMAGE_UID}", out],
                                "securityContext": {"runAsUser": 0},
                                "volumeMounts": [{"name": "results", "mountPath": out}]}],
            # No "ports": the Service reaches the port without it, and `podman kube play`
            # (4.3) would publish every containerPort on the host, where another program
            # may hold it.
            "containers": [{"name": role, "image": IMAGE, "imagePullPolicy": "IfNotPresent", "args": command,
                            "env": env,
                            "volumeMounts": [
                                {"name": "config", "mountPath": os.path.dirname(CONFIG_IN_CONTAINER), "readOnly": True},
                                {"name": "key", "mountPath": os.path.dirname(KEY_IN_CONTAINER), "readOnly": True},
                                {"name": "results", "mountPath": out}]}],
            "volumes": [{"name": "config", "configMap": {"name": "fedfly-testbed"}},
                        {"name": "key", "secret": {"secretName": "fedfly-key", "defaultMode": 0o440,
                                                   "optional": False}},
                        {"name": "results", "hostPath": {"path": NODE_RESULTS, "type": "DirectoryOrCreate"}}],
        }
        pods.append({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "fedfly",
                                                           "fedfly.io/role": role, "fedfly.io/name": name}},
                     "spec": spec})
    each = f"one Pod each but the devices, forked in one Pod\n({HOST}; run.device_host)," if hosted else "one Pod each,"
    return yamltext.dump_all(services + pods, f"""\
Made by `python -m scripts.deploy k8s --config {_shown(cfg.path)}`: do not edit, make it again.
FedFly on Kubernetes (k3s on the lab's Pis and edge hosts): 1 central, {len(cfg.edges)} edges and
{len(cfg.devices)} devices, {each} with the testbed file from the ConfigMap fedfly-testbed
(config.yaml) and the key from the Secret fedfly-key. Label the nodes:
  kubectl label node <edge host> fedfly.io/role=edge      (x86_64 or arm64)
  kubectl label node <pi>        fedfly.io/role=device    (arm64: Raspberry Pi 4/5, 64-bit OS)
  kubectl label node <server>    fedfly.io/role=central
Every role is reached by its name, its Service's; the Pods have the same names, so
`podman kube play` (which ignores Services and resolves Pod names) runs this file too.
Results: /var/lib/fedfly/results on each node. The Pods run once (restartPolicy: Never).
See docs/DEPLOY.md, "Kubernetes (k3s)".""")


# -- the command ----------------------------------------------------------------------------

def _shown(path: str) -> str:
    """The config's path as the header shows it: from the repository, if it is in it."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else p.name


def _rel(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target.resolve(), start.resolve())).as_posix()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.deploy", description=__doc__.split("\n\n")[0])
    ap.add_argument("target", choices=("compose", "k8s"))
    ap.add_argument("--config", required=True, help="the testbed's TOML file")
    # no --set: the containers read the file itself, so what they run must be in it
    ap.set_defaults(overrides=[])
    ap.add_argument("--out", help="compose: the file to write; k8s: the folder for testbed.yaml and config.yaml "
                                  "(default: stdout)")
    ap.add_argument("--log-level", default="WARNING")
    return run_main(argv, ap, _body)


def _notes(cfg: Config, target: str) -> list[str]:
    """What the file's host keys do not do here, said rather than silently ignored."""
    notes = []
    if cfg.run.edge_host == "on":
        notes.append("run.edge_host = \"on\" is for the launchers of one machine: each edge keeps its own container "
                     "here, a machine of its own in a lab (docs/DEPLOY.md)")
    if target == "k8s" and cfg.run.device_host == "auto" and len(cfg.devices) >= HOST_AUTO_MIN:
        notes.append(f"run.device_host = \"auto\" keeps one Pod per device here (their nodes are not known); "
                     f"\"on\" runs the {len(cfg.devices)} devices in one Pod, {HOST} (docs/DEPLOY.md)")
    return notes


def _body(args: argparse.Namespace, cfg: Config) -> int:
    for note in _notes(cfg, args.target):
        print(f"deploy: note: {note}", file=sys.stderr)
    if args.target == "compose":
        base = Path(args.out).parent if args.out else Path.cwd()
        text = compose(cfg, config_ref=_rel(Path(cfg.path), base), root_ref=_rel(ROOT, base))
        if not args.out:
            sys.stdout.write(text)
        else:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text)
            print(f"wrote {args.out}")
        return 0
    config = k8s_config(Path(cfg.path).read_text())
    testbed = k8s_testbed(cfg)
    if not args.out:
        sys.stdout.write(config + "---\n" + testbed)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(config)
    (out / "testbed.yaml").write_text(testbed)
    print(f"wrote {out / 'config.yaml'} and {out / 'testbed.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

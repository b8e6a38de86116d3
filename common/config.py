"""The testbed file: one TOML file describes a whole testbed; every process reads it.

``load_config(path, overrides)`` parses, applies overrides (``section.key=value``, from
the ``FEDFLY_SET`` environment variable first, then the command line), checks every key
and value, and returns a frozen ``Config``, each section a frozen dataclass made from its
schema (``cfg.faults.dead_after_s``; ``common.sections``). Any mistake raises
``ConfigError`` naming the key and the fix. Relative ``security.key_file`` and
``security.certs`` paths are relative to the config file; ``run.out`` and ``data.root`` to
the working directory.
"""

from __future__ import annotations

import functools
import math
import os
import shlex
import tomllib
from dataclasses import dataclass, field
from typing import Any

from common.datasets import DATASETS, dataset_info
from common.errors import ConfigError
from common.mobility_models import TimedMove, TraceError, read_trace, waypoint_trace
from common.nets import NETS, ModelSpec, net
from common.sections import Section, section_class
from common import strategies

MODES = ("fedfly", "restart", "classic")
RECONNECT_POLICIES = ("same", "nearest", "controller")
DEATH_POLICIES = ("stop", "restart")
from common.malloc import MODES as MALLOC_MODES  # training.malloc
DISTRIBUTIONS = ("balanced", "imbalanced")
MOBILITY_MODELS = ("schedule", "trace", "waypoint")  # common/mobility_models.py
HOST_MODES = ("auto", "on", "off")  # run.device_host, run.edge_host (common/hostspawn.py)
# "auto" forks a role from a host where one machine runs at least this many of it: from
# there, started processes each holding their own torch cost gigabytes (BENCHMARKS.md, "A
# fleet on one machine"); below it they fit, and each stays a plain ``python -m device``
# that ps and a debugger show as itself.
HOST_AUTO_MIN = 16
REQUIRED = object()
# strategy.refuse_factor's default: far above the largest ratio an honest update reached in
# the suite and the benchmarks (BENCHMARKS.md, "Hostile updates"), far below what a scaled,
# sign-flipped or noise update reaches.
REFUSE_FACTOR = 10.0
ENV_OVERRIDES = "FEDFLY_SET"

# section -> key -> (type, default, rule or None). A rule returns an error text or None.
_POSITIVE = (lambda v: None if v > 0 else "must be > 0")
_AT_LEAST_1 = (lambda v: None if v >= 1 else "must be >= 1")
_PORT = (lambda v: None if 1 <= v <= 65535 else "must be a TCP port, 1-65535")
_NONNEG = (lambda v: None if v >= 0 else "must be >= 0")
_REFUSE_RULE = (lambda v: None if v == 0 or v > 1 else
                "must be 0 (no update refused) or > 1: an update is refused when it moved the weights more than "
                "this many times the median of the others' moves, and at 1 or below honest ones would be")


class Cut:
    """Schema type of a split layer: an int, or "auto" (chosen at start: central/autosplit.py)."""


AUTO = "auto"


class Rounds:
    """Schema type of a list of round numbers (each >= 1); empty: every round."""


def _choice(options: tuple[str, ...]):
    rule = lambda v: None if v in options else f"must be one of {', '.join(options)}"
    rule.options = options   # for the reference (python -m scripts.configref)
    return rule


# A key: (type, default, rule or None, what it does). The last is the key's line in
# docs/CONFIGURATION.md (python -m scripts.configref; tests/test_configref.py keeps them equal).
Key = tuple[type, Any, Any, str]
SECTIONS: dict[str, dict[str, Key]] = {
    "run": {
        "mode": (str, "fedfly", _choice(MODES), "fedfly: a moving device's session follows it; restart: the baseline, "
                 "the round starts again on the new edge; classic: each device trains the whole model alone"),
        "seed": (int, 0, None, "seeds the weights, shards and batches: the same seed, the same final model"),
        "out": (str, "runs", None, "the results root (relative to the working directory); each run gets a folder "
                "in it"),
        "name": (str, "", None, "the run's folder under out (\"\": the time and mode); a name whose run exists is "
                 "refused"),
        "round_timeout": (float, 1800.0, _POSITIVE, "a device with no update this long after its round began is "
                          "dropped from the round; generous, so a slow device's round is not cut"),
        "startup_timeout": (float, 300.0, _POSITIVE, "how long the processes wait for each other at start (room for "
                            "a slow host to load torch and its data); a device tries other edges after half of it"),
        "device_host": (str, "auto", _choice(HOST_MODES), "on: the devices a machine runs are forked from one host "
                        "process that imported torch once, sharing its pages (each still its own process, the same "
                        f"bits); off: each started anew; auto: on where one machine runs {HOST_AUTO_MIN} or more "
                        "(Linux only; a launcher's --device-host/--no-device-host wins; docs/DEPLOY.md)"),
        "edge_host": (str, "auto", _choice(HOST_MODES), "the same for the edges (--edge-host/--no-edge-host)"),
    },
    # Unplanned mobility and silent peers (see docs/FAULTS.md).
    "faults": {
        "heartbeat_s": (float, 1.0, _POSITIVE, "an idle link sends a heartbeat this often: a few bytes a "
                        "second, so a silent peer is noticed within dead_after_s"),
        "dead_after_s": (float, 5.0, _POSITIVE, "a peer silent this long is gone; at least twice heartbeat_s, so one "
                         "late heartbeat (a busy host) is not a death"),
        "device_grace_s": (float, 10.0, _NONNEG, "a device gone this long leaves the round; keep it at least twice "
                           "dead_after_s (one to notice a silent edge, one to attach elsewhere)"),
        "reconnect": (str, "same", _choice(RECONNECT_POLICIES), "where a device whose link dropped reconnects: the "
                      "edge it lost, the first to answer, or where the controller says"),
        "central_grace_s": (float, 60.0, _POSITIVE, "edges wait this long for a lost central, serving their devices "
                            "meanwhile: room for a restarted central to resume"),
        "give_up_s": (float, 300.0, _POSITIVE, "a device with no edge this long exits with status 1 (longer than any "
                      "grace above: every edge had its chance)"),
        "checkpoint_steps": (int, 0, _NONNEG, "every this many steps (mode fedfly) an edge copies each session to its "
                             "buddy edge and the device keeps its own state: a dead edge costs the steps since "
                             "(0, off: each copy costs memory and backhaul; a dead edge costs the round)"),
        "on_death": (str, "stop", _choice(DEATH_POLICIES), "what the launcher does when a process it started dies: "
                     "stop the testbed (naming it), or start it again (the central with --resume)"),
        "max_restarts": (int, 3, _NONNEG, "with on_death = \"restart\": at most this many restarts of each process, "
                         "so one that dies at start does not loop for ever"),
        "replicas_kept": (int, 3, _AT_LEAST_1, "a buddy edge keeps this many newest copies of each session "
                          "(checkpoint_steps): a device's own checkpoint lags its session by up to a step and a copy "
                          "takes time to arrive; each copy is a whole session in memory (fewer on a small host)"),
    },
    "security": {
        "mode": (str, "", _choice(("", "tls", "key")), "tls: TLS 1.3, mutual, one certificate per process from the "
                 "testbed's CA; key: a shared key, a MAC on every record, nothing encrypted; \"\": tls when certs is "
                 "set, else key"),
        "certs": (str, "", None, "the folder of the CA and each process's certificate and key (relative to the config "
                  "file; python -m scripts.certs makes them)"),
        "key_file": (str, "", None, "mode key: the file holding the shared key (relative to the config file)"),
        "key_env": (str, "", None, "mode key: the environment variable holding the shared key, instead of key_file"),
    },
    "central": {
        "host": (str, REQUIRED, None, "the address the others reach the central at"),
        "port": (int, REQUIRED, _PORT, "the central's port"),
        "bind": (str, "", None, "where the central listens when that is not host (e.g. 0.0.0.0 in a container)"),
        "ssh": (str, "", None, "ssh target when it differs from host (scripts/remote.py)"),
    },
    # Link shaping for the network-namespace testbed (scripts/netns_testbed.py); 0 = unshaped.
    "links": {
        "device_mbit": (float, 0.0, _NONNEG, "the rate of every device's link to its edge, Mbit/s (unless its edge "
                        "or itself sets one)"),
        "edge_mbit": (float, 0.0, _NONNEG, "the rate of every edge network's uplink (to the other edges and the "
                      "central), Mbit/s"),
        "central_mbit": (float, 0.0, _NONNEG, "the rate of the central's link, Mbit/s"),
    },
    # Launching on real hosts over ssh (scripts/remote.py).
    "remote": {
        "user": (str, "", None, "the ssh user on every host (\"\": ssh's default)"),
        "workdir": (str, "fedfly", None, "the folder holding the code on every host (relative to the remote home, "
                    "or absolute)"),
        "python": (str, "python3", None, "the interpreter on every host (relative to workdir, or absolute)"),
        "ssh_port": (int, 22, _PORT, "the hosts' ssh port"),
        "identity": (str, "", None, "the ssh private key (relative to the config file; \"\": ssh's default)"),
        "ssh_options": (str, "", None, "options added to every ssh call, before the launcher's own"),
    },
    "model": {
        "name": (str, "vgg5", _choice(tuple(NETS)), "the model (common/nets/); built for the data set's input"),
        "split_layer": (Cut, 3, None, "the cut: the device runs layers 0..split_layer, the edge the rest; \"auto\": "
                        "chosen per device at start from a measured cost model. 3: FedFly's cut of VGG-5"),
    },
    "data": {
        "dataset": (str, "synthetic", _choice(tuple(DATASETS)), "the data set (common/datasets/); synthetic needs no "
                    "download and no files"),
        "root": (str, "data", None, "where the data set's files are (relative to the working directory)"),
        "download": (bool, False, None, "fetch a torchvision data set into root when it is not there"),
        "image_size": (int, 0, _NONNEG, "0: the data set's own size; else images are resized to image_size x "
                       "image_size (and the model built for it): small inputs for tests and quick sweeps"),
        "distribution": (str, "balanced", _choice(DISTRIBUTIONS), "balanced: equal IID shards; imbalanced: labels "
                         "skewed per class by a Dirichlet(alpha) draw"),
        "alpha": (float, 0.5, _POSITIVE, "imbalanced: the Dirichlet concentration; smaller is more skewed"),
        "samples_per_device": (int, 0, _NONNEG, "0: the whole training set split over the devices; else "
                               "devices x this many samples"),
        "test_samples": (int, 0, _NONNEG, "0: the whole test set; else the first N of a seeded permutation"),
    },
    # Aggregation: the keys every strategy has; each strategy's own are in its module
    # (common/strategies/), checked by _strategy_section.
    "strategy": {
        "name": (str, "fedavg", _choice(strategies.NAMES), "how the central combines the round's updates "
                 "(common/strategies/); each strategy's own keys are in its table below"),
        # REFUSE_FACTOR says why the default.
        "refuse_factor": (float, REFUSE_FACTOR, _REFUSE_RULE, "every strategy: an update that moved the weights more "
                          "than this many times the median of the others' moves is refused (central/robust.py; 0: off); "
                          "10 is far above honest updates, far below scaled or sign-flipped ones"),
    },
    "training": {
        "rounds": (int, 5, _AT_LEAST_1, "how many rounds the run has"),
        "batch_size": (int, 100, _AT_LEAST_1, "samples per step"),
        "lr": (float, 0.01, _POSITIVE, "the local SGD learning rate"),
        "momentum": (float, 0.9, lambda v: None if 0 <= v < 1 else "must be in [0, 1)", "the local SGD momentum"),
        "local_epochs": (int, 1, _AT_LEAST_1, "passes over its shard each device makes per round"),
        "threads": (int, 1, _AT_LEAST_1, "torch threads of every process (a device's own devices.NAME.threads "
                   "wins); one count everywhere: kernels split work by it, so another count changes the last bits"),
        "malloc": (str, "auto", _choice(MALLOC_MODES), "tuned: big blocks kept on the heap between steps (faster); "
                   "lean: given back (smaller); auto: lean on a host under 2 GiB, tuned elsewhere (common.malloc); "
                   "results are the same"),
        "cut_gradient_first": (bool, True, None, "the edge sends the gradient at the cut before it computes its own "
                               "weights' gradients, so the device's backward pass starts sooner; false: one backward "
                               "pass. The same bits either way"),
    },
}
EDGE_KEYS: dict[str, Key] = {
    "host": (str, REQUIRED, None, "the address devices and the other edges reach this edge at"),
    "port": (int, REQUIRED, _PORT, "the edge's port"),
    "bind": (str, "", None, "where the edge listens when that is not host (e.g. 0.0.0.0 in a container)"),
    "ssh": (str, "", None, "ssh target when it differs from host (scripts/remote.py)"),
    "link_mbit": (float, 0.0, _NONNEG, "the rate of every device attached here, Mbit/s (netns testbed and the "
                  "auto cut; 0: links.device_mbit); a device's own link_mbit wins"),
}
DEVICE_KEYS: dict[str, Key] = {
    "edge": (str, REQUIRED, None, "the edge the device attaches to first"),
    "host": (str, REQUIRED, None, "the address the controller reaches this device at"),
    "control_port": (int, REQUIRED, _PORT, "the port of the device's control listener (the controller's moves)"),
    "bind": (str, "", None, "where the device listens when that is not host"),
    "slowdown": (float, 1.0, lambda v: None if v >= 1 else "must be >= 1 (1 = full speed)",
                 "the device computes this many times slower than its host (emulates weaker hardware)"),
    "slowdown_rounds": (Rounds, (), None, "the rounds slowdown applies in, e.g. [1, 3] (empty: every round): a device "
                        "slow only for a while, as a Pi under another load; a test slows only the round its fault is in"),
    "threads": (int, 0, _NONNEG, "the device's torch threads (0: training.threads; another count "
                 "changes the last bits of its results)"),
    "link_mbit": (float, 0.0, _NONNEG, "the rate of this device's link, Mbit/s (netns testbed and the auto cut; "
                  "0: its edge's link_mbit, else links.device_mbit)"),
    "split_layer": (Cut, None, None, "this device's cut, or \"auto\" (unset: model.split_layer)"),
    "ssh": (str, "", None, "ssh target when it differs from host (scripts/remote.py)"),
}
MOVE_KEYS: dict[str, Key] = {
    "device": (str, REQUIRED, None, "the device that moves"),
    "to": (str, REQUIRED, None, "the edge it moves to"),
    "round": (int, REQUIRED, _AT_LEAST_1, "the round it moves in"),
    "at": (float, REQUIRED, lambda v: None if 0 < v < 1 else "must be a fraction of the round, 0 < at < 1",
           "when, as a fraction of the round: just before step floor(at x steps)"),
}
HANDOVERS = ("offer", "pull", "relay")   # edge/handover/
# [mobility]: which model moves the devices ([[mobility.moves]] and [[mobility.drops]] apply
# under every model), and how a moving device's session follows it. Its tables
# ([mobility.waypoint], [[mobility.moves]], [[mobility.drops]]) have their own schemas below.
MOBILITY_KEYS: dict[str, Key] = {
    "model": (str, "schedule", _choice(MOBILITY_MODELS), "what moves the devices: [[mobility.moves]], a trace file, "
              "or random waypoint over a grid of edge cells"),
    "trace": (str, "", None, "model trace: a CSV (relative to the config file) of time_s,device,edge or "
              "round,at,device,edge rows"),
    "preconnect": (bool, False, None, "make-before-break: a device opens its link to the next edge one step before a "
                   "scheduled move; off by default, as a radio cannot always reach the next cell early"),
    "handover": (str, "offer", _choice(HANDOVERS), "mode fedfly: how a session follows a moving device: the old edge "
                 "sends it ahead (offer), the new one fetches it on attach (pull), or it stays and steps are "
                 "forwarded to it (relay)"),
    "offer": (bool, True, None, "the old spelling of handover: true is \"offer\", false \"pull\""),
    "handover_limit_s": (float, 30.0, _POSITIVE, "how long a live peer edge may take to answer a pull or an offer "
                         "(a whole session over a slow link, rebuilt on a slow host); a silent one is noticed "
                         "sooner, by faults.dead_after_s"),
}
MOBILITY_TABLES = ("moves", "drops", "waypoint")   # [mobility]'s own tables
# [mobility.waypoint]: random waypoint over a grid of edge cells (common/mobility_models.py)
WAYPOINT_KEYS: dict[str, Key] = {
    "cell_m": (float, 100.0, _POSITIVE, "side of an edge's square cell, metres"),
    "speed_mps": (float, 1.5, _POSITIVE, "walking speed, metres per second"),
    "pause_s": (float, 0.0, _NONNEG, "pause at each waypoint"),
    "columns": (int, 0, _NONNEG, "cells per row (0: ceil(sqrt(edges)))"),
    "seed": (int, -1, None, "the walks' seed (-1: run.seed)"),
    "horizon_s": (float, 3600.0, _POSITIVE, "how far ahead the walk is drawn"),
}
DROP_KEYS: dict[str, Key] = {
    "device": (str, REQUIRED, None, "the device whose radio goes out"),
    "round": (int, REQUIRED, _AT_LEAST_1, "the round it happens in"),
    "at": (float, REQUIRED, lambda v: None if 0 <= v < 1 else "must be a fraction of the round, 0 <= at < 1",
           "when, as a fraction of the round (a step boundary, as a move's)"),
    "seconds": (float, 0.0, _NONNEG, "how long the radio is out"),
    "to": (str, "", None, "where it comes back (\"\": as faults.reconnect says)"),
}
# Which processes read each key: "section" for all its keys, "section.key" where one
# differs (the launchers: central.launch, scripts.remote, scripts.netns_testbed).
READ_BY: dict[str, str] = {
    "run": "central, edge, device", "run.out": "central, edge, device, launcher", "run.name": "central, launcher",
    "run.round_timeout": "central, device", "run.device_host": "launcher", "run.edge_host": "launcher",
    "faults": "central, edge, device", "faults.device_grace_s": "central, device", "faults.reconnect": "device",
    "faults.central_grace_s": "central, edge", "faults.give_up_s": "device", "faults.checkpoint_steps": "edge, device",
    "faults.on_death": "launcher", "faults.max_restarts": "launcher", "faults.replicas_kept": "edge",
    "security": "central, edge, device, controller, launcher",
    "central": "central, edge, controller, launcher", "central.bind": "central", "central.ssh": "launcher (remote)",
    "links": "launcher (netns)",
    "remote": "launcher (remote)",
    "model": "central, edge, device", "model.split_layer": "central, edge, device",
    "data": "central, device",
    "strategy": "central",
    "training": "central", "training.rounds": "central, launcher", "training.threads": "central, edge, device",
    "training.malloc": "central, edge, device", "training.cut_gradient_first": "edge",
    "edges": "central, edge, device, controller, launcher", "edges.bind": "edge", "edges.ssh": "launcher (remote)",
    "edges.link_mbit": "central, launcher (netns)",
    "devices": "device", "devices.edge": "central, device, launcher", "devices.host": "device, controller, launcher",
    "devices.control_port": "device, controller, launcher", "devices.slowdown": "central, device",
    "devices.slowdown_rounds": "device",
    "devices.link_mbit": "central, launcher (netns)", "devices.split_layer": "central, edge, device",
    "devices.ssh": "launcher (remote)",
    "mobility": "central, device", "mobility.preconnect": "device", "mobility.handover": "central, edge, device",
    "mobility.offer": "central, edge, device", "mobility.handover_limit_s": "edge",
    "mobility.waypoint": "central, device", "mobility.moves": "central, device, launcher (netns)",
    "mobility.drops": "central, device",
}
# Every table of the file, in the reference's order: (its heading, its keys, its name in READ_BY).
TABLES: tuple[tuple[str, dict[str, Key], str], ...] = (
    *((heading, keys, name) for name, section in SECTIONS.items()
      for heading, keys in [(f"[{name}]", section)] + ([
          (f'[strategy] name = "{s}"', strategies.params_of(s)) for s in strategies.NAMES if strategies.params_of(s)]
          if name == "strategy" else [])),
    ("[edges.NAME]", EDGE_KEYS, "edges"), ("[devices.NAME]", DEVICE_KEYS, "devices"),
    ("[mobility]", MOBILITY_KEYS, "mobility"),
    ("[mobility.waypoint]", WAYPOINT_KEYS, "mobility.waypoint"),
    ("[[mobility.moves]]", MOVE_KEYS, "mobility.moves"), ("[[mobility.drops]]", DROP_KEYS, "mobility.drops"),
)


def read_by(table: str, key: str) -> str:
    """Which processes read ``key`` of ``table`` (a ``TABLES`` name), per ``READ_BY``."""
    return READ_BY.get(f"{table}.{key}") or READ_BY[table]


def default(key: str) -> Any:
    """The schema's default of ``key`` ("section.key"), for a constructor that takes it as an
    argument but is also built without a config (in tests)."""
    table, name = key.rsplit(".", 1)
    return {**SECTIONS, "mobility": MOBILITY_KEYS}[table][name][1]


def _section(table: str, keys: dict[str, Key]) -> type[Section]:
    return section_class(table, keys, module=__name__, types={Cut: int | str}, required=REQUIRED)


# The typed sections (``cfg.faults.dead_after_s``): frozen dataclasses made from the schema
# above, so it stays the one place a key is declared. [central] is an ``Endpoint``;
# [strategy] is still a mapping (central/strategies.py's strategies own their parameters).
RunSection = _section("run", SECTIONS["run"])
FaultsSection = _section("faults", SECTIONS["faults"])
SecuritySection = _section("security", SECTIONS["security"])
LinksSection = _section("links", SECTIONS["links"])
RemoteSection = _section("remote", SECTIONS["remote"])
ModelSection = _section("model", SECTIONS["model"])
DataSection = _section("data", SECTIONS["data"])
TrainingSection = _section("training", SECTIONS["training"])
MobilitySection = _section("mobility", MOBILITY_KEYS)
MobilityWaypointSection = _section("mobility.waypoint", WAYPOINT_KEYS)
TYPED_SECTIONS: dict[str, type[Section]] = {
    "run": RunSection, "faults": FaultsSection, "security": SecuritySection, "links": LinksSection,
    "remote": RemoteSection, "model": ModelSection, "data": DataSection, "training": TrainingSection,
}


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    bind: str = ""
    ssh: str = ""
    link_mbit: float = 0.0   # edges only: the rate of the devices attached there

    @property
    def listen_host(self) -> str:
        """Where to listen: ``bind`` if set (e.g. 0.0.0.0 in a container), else ``host``."""
        return self.bind or self.host


@dataclass(frozen=True)
class DeviceConfig:
    name: str
    edge: str
    host: str
    control_port: int
    bind: str = ""
    slowdown: float = 1.0
    slowdown_rounds: tuple[int, ...] = ()   # empty: every round
    threads: int = 0
    link_mbit: float = 0.0
    ssh: str = ""
    split_layer: int | str | None = None   # an int, "auto", or None: the model's

    def slowdown_in(self, round_: int) -> float:
        """The stretch of this device's compute in round ``round_`` (1 outside slowdown_rounds)."""
        return self.slowdown if not self.slowdown_rounds or round_ in self.slowdown_rounds else 1.0

    @property
    def control(self) -> Endpoint:
        return Endpoint(self.host, self.control_port, self.bind, self.ssh)


@dataclass(frozen=True)
class Move:
    device: str
    to: str
    round: int
    at: float

    def step(self, steps_in_round: int) -> int:
        """The step boundary the move happens at: just before step floor(at * S)."""
        return boundary(self.at, steps_in_round)


def boundary(at: float, steps_in_round: int) -> int:
    """The step boundary at fraction ``at`` of a round: just before step floor(at * S)."""
    # The epsilon keeps 0.29 x 100 (28.999999999999996 in binary) at step 29.
    return math.floor(at * steps_in_round + 1e-9)


@dataclass(frozen=True)
class Drop:
    """An unplanned move from a trace (``[[mobility.drops]]``): the device's radio goes out
    at a step boundary for ``seconds``; it comes back on ``to`` (or where the policy says)."""
    device: str
    round: int
    at: float
    seconds: float = 0.0
    to: str = ""

    def step(self, steps_in_round: int) -> int:
        return boundary(self.at, steps_in_round)


@dataclass(frozen=True)
class Config:
    path: str
    run: RunSection
    faults: FaultsSection
    security: SecuritySection
    central: Endpoint
    edges: dict[str, Endpoint]
    devices: dict[str, DeviceConfig]
    model: ModelSection
    data: DataSection
    training: TrainingSection
    strategy: dict[str, Any]
    links: LinksSection
    remote: RemoteSection
    # [mobility]. preconnect: make-before-break. A device opens and secures its link to the
    # next edge while it still trains on this one (a scheduled move, one step ahead), so a
    # move's pause covers only the handover. Off by default: a radio cannot always reach
    # the next cell before it leaves this one.
    # handover (mode fedfly): how a session follows a moving device (``edge.handover``).
    # "offer": a device that leaves for a planned move says where it goes, and its edge
    # sends the session there, which verifies and rebuilds it before the device comes. A
    # scheduled move is announced a step ahead, once the edge's gradient for the step before
    # it is in, so the session travels during the device's backward pass; a move known only
    # at the boundary is announced as the device leaves. With preconnect too, the move is
    # announced the same way and its link is already open. "pull": the destination pulls it
    # once the device attached (the path a lost link takes). BENCHMARKS 2c, 2e.
    # ``offer = true | false`` is the old spelling of "offer" / "pull"; after the check it
    # always agrees with handover.
    mobility: MobilitySection = field(default_factory=MobilitySection)
    waypoint: MobilityWaypointSection | None = None   # [mobility.waypoint], when that is the model
    moves: tuple[Move, ...] = field(default_factory=tuple)
    drops: tuple[Drop, ...] = field(default_factory=tuple)
    traced_moves: tuple[TimedMove, ...] = field(default_factory=tuple)  # a time-based trace's
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def mode(self) -> str:
        return self.run.mode

    @property
    def model_key(self) -> str:
        """The model built for this data set's input (``common.nets.ModelSpec.key``)."""
        info = dataset_info(self.data.dataset)
        c, h, w = info.shape
        size = self.data.image_size
        return ModelSpec(self.model.name, c, size or h, size or w, info.classes).key

    @property
    def device_names(self) -> list[str]:
        """Devices in the fixed order used everywhere (FedAvg, shards): sorted by name."""
        return sorted(self.devices)

    def split_of(self, device: str) -> int | str:
        """``device``'s cut: its own ``split_layer`` or the model's; ``"auto"`` when the
        central chooses it at start (it comes in every round's plan, ``RoundPlan.cuts``)."""
        own = self.devices[device].split_layer
        return self.model.split_layer if own is None else own

    @property
    def base_cut(self) -> int:
        """The model's cut; with ``model.split_layer = "auto"``, a placeholder (the middle
        cut) until the plan names each device's."""
        cut = self.model.split_layer
        return cut if cut != AUTO else len(net(self.model.name).cuts) // 2

    @property
    def splits(self) -> dict[str, int]:
        """The devices that cut elsewhere than ``base_cut`` (and not "auto"), with their cut."""
        return {d: c for d in sorted(self.devices) if (c := self.split_of(d)) != AUTO and c != self.base_cut}

    def link_rate(self, device: str, edge: str | None = None) -> float:
        """Mbit/s of ``device``'s link while attached to ``edge`` (default: its first edge):
        its own ``link_mbit``, else the edge's, else ``links.device_mbit``; 0 = unshaped."""
        return (self.devices[device].link_mbit or self.edges[edge or self.devices[device].edge].link_mbit
                or self.links.device_mbit)

    def device_threads(self, name: str) -> int:
        return self.devices[name].threads or self.training.threads

    def moves_for(self, device: str) -> list[Move]:
        return [mv for mv in self.moves if mv.device == device]

    @functools.cached_property
    def timed_moves(self) -> tuple[TimedMove, ...]:
        """Time-based moves: a trace's, or the random-waypoint walk (drawn on first use:
        only devices and the central need it)."""
        if self.waypoint is None:
            return self.traced_moves
        return tuple(waypoint_trace(devices={n: d.edge for n, d in self.devices.items()}, edges=list(self.edges),
                                    **self.waypoint.as_dict()))

    def timed_moves_for(self, device: str) -> list[TimedMove]:
        return [mv for mv in self.timed_moves if mv.device == device]

    def drops_for(self, device: str) -> list[Drop]:
        return [d for d in self.drops if d.device == device]

    def key_file(self) -> str | None:
        kf = self.security.key_file
        if not kf:
            return None
        return kf if os.path.isabs(kf) else os.path.join(os.path.dirname(os.path.abspath(self.path)), kf)

    def key(self) -> bytes:
        from common.auth import load_key
        return load_key(key_file=self.key_file(), key_env=self.security.key_env or None)

    @property
    def security_mode(self) -> str:
        return self.security.mode or ("tls" if self.security.certs else "key")

    def certs_dir(self) -> str:
        """The folder of the TLS files (relative to the config file), ``security.certs``."""
        d = self.security.certs or "certs"
        return d if os.path.isabs(d) else os.path.join(os.path.dirname(os.path.abspath(self.path)), d)

    def credentials(self, identity):
        """What process ``identity`` (a ``common.security.Identity``) secures its
        connections with, as ``security.mode`` says. Raises ``ConfigError``."""
        from common import security
        if self.security_mode == "tls":
            return security.load_tls(self.certs_dir(), identity)
        return security.SharedKey(self.key())

    def identities(self) -> list:
        """Every process of the testbed that holds a certificate in the ``tls`` mode."""
        from common.security import CENTRAL, CONTROLLER, Identity
        return [CENTRAL, CONTROLLER, *(Identity("edge", e) for e in sorted(self.edges)),
                *(Identity("device", d) for d in sorted(self.devices))]

    def require(self, role: str, name: str) -> None:
        """Check that ``name`` is a ``role`` of this testbed (for ``--name``)."""
        names = {"edge": self.edges, "device": self.devices}.get(role)
        if names is not None and name not in names:
            raise ConfigError(f"{role}s.{name}", f"--name {name} is not a {role} of {self.path}",
                              f"use one of: {', '.join(sorted(names))}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (path, value). The value is read as TOML (so numbers,
    booleans and quoted strings work), else taken as a bare string."""
    if "=" not in text:
        raise ConfigError(text, "an override must look like section.key=value", "e.g. --set training.rounds=3")
    key, value = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) < 2 or not all(path):
        raise ConfigError(key, "an override needs a section and a key", "e.g. --set run.mode=restart")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return path, parsed


def _apply(raw: dict, path: list[str], value: Any) -> None:
    node = raw
    for i, part in enumerate(path[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(".".join(path[: i + 1]), "is not a table, so it has no keys to set", "check the key's spelling")
        node = nxt
    node[path[-1]] = value


def _typed(key: str, value: Any, typ: type, rule: Any = None) -> Any:
    if typ is Cut:
        if value == AUTO or type(value) is int:
            return value
        raise ConfigError(key, f"is {type(value).__name__} {value!r}, must be a layer number or \"auto\"",
                          'write it like 3, or "auto" (chosen from a cost model at start)')
    if typ is Rounds:
        if isinstance(value, list) and all(type(v) is int and v >= 1 for v in value):
            return tuple(sorted(set(value)))
        raise ConfigError(key, f"is {value!r}, must be a list of round numbers (each >= 1)",
                          "write it like [1] or [1, 3] (empty [] or left out: every round)")
    if typ is float and type(value) is int:
        return float(value)
    if type(value) is not typ:
        example = {str: '"text"', int: "3", float: "0.5", bool: "true"}[typ]
        raise ConfigError(key, f"is {type(value).__name__} {value!r}, must be {typ.__name__}",
                          _choices(rule) or f"write it like {example}")
    return value


def _choices(rule: Any) -> str:
    """The fix for a key of a few choices (``_choice``): name them."""
    options = getattr(rule, "options", None)
    return "write one of " + ", ".join(f'"{o}"' for o in options) if options else ""


def _strategy_section(given: Any) -> dict[str, Any]:
    """``[strategy]``: the keys every strategy has, and the named strategy's own (its
    table in ``common.strategies``); a key of another strategy names the one it is for."""
    common = _table("strategy", {k: v for k, v in given.items() if k in SECTIONS["strategy"]}, SECTIONS["strategy"]) \
        if isinstance(given, dict) else _table("strategy", given, {})
    name = common["name"]
    own = strategies.params_of(name)
    for key in given:
        if key not in SECTIONS["strategy"] and key not in own and (takers := strategies.owners(key)):
            raise ConfigError(f"strategy.{key}", f"belongs to {', '.join(takers)}, not to {name}",
                              f"remove it, or set name = \"{takers[0]}\"")
    return {**common, **_table("strategy", {k: v for k, v in given.items() if k not in SECTIONS["strategy"]}, own,
                               known=set(SECTIONS["strategy"]))}


def _table(where: str, given: Any, schema: dict[str, Key], *, known: set[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(given, dict):
        raise ConfigError(where, "must be a table", f"write it as [{where}]")
    unknown = sorted(set(given) - set(schema))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", "is not a known key",
                          f"remove it or use one of: {', '.join(sorted(set(schema) | known))}")
    out: dict[str, Any] = {}
    for key, (typ, default, rule, _what) in schema.items():
        name = f"{where}.{key}"
        if key not in given:
            if default is REQUIRED:
                raise ConfigError(name, "is missing", f"add {key} = ... under [{where}]")
            out[key] = default
            continue
        value = _typed(name, given[key], typ, rule)
        problem = rule(value) if rule else None
        if problem:
            raise ConfigError(name, f"{value!r} {problem}", _choices(rule))
        out[key] = value
    return out


def load_config(path: str, overrides: list[str] | None = None, *, env: dict[str, str] | None = None) -> Config:
    """Read and check a testbed file. Raises ``ConfigError``."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}", "pass the path of a testbed .toml file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{path} is not valid TOML: {exc}", "fix the syntax at the line named") from None
    env = os.environ if env is None else env
    texts = shlex.split(env.get(ENV_OVERRIDES, "")) + list(overrides or [])
    for text in texts:
        _apply(raw, *parse_override(text))
    return build_config(raw, path=path)


def build_config(raw: dict[str, Any], *, path: str = "<memory>") -> Config:
    """Check an already-parsed testbed dict (see ``load_config``)."""
    known = set(SECTIONS) | {"edges", "devices", "mobility"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(unknown[0], "is not a known section", f"use one of: {', '.join(sorted(known))}")
    sections = {name: _strategy_section(raw.get(name, {})) if name == "strategy" else _table(name, raw.get(name, {}), schema)
                for name, schema in SECTIONS.items()}
    central = Endpoint(**sections.pop("central"))

    edges_raw = raw.get("edges")
    if not isinstance(edges_raw, dict) or not edges_raw:
        raise ConfigError("edges", "no edge servers are defined", "add at least one [edges.NAME] table with host and port")
    edges = {name: Endpoint(**_table(f"edges.{name}", t, EDGE_KEYS)) for name, t in edges_raw.items()}

    devices_raw = raw.get("devices")
    if not isinstance(devices_raw, dict) or not devices_raw:
        raise ConfigError("devices", "no devices are defined", "add at least one [devices.NAME] table with edge, host and control_port")
    devices = {name: DeviceConfig(name=name, **_table(f"devices.{name}", t, DEVICE_KEYS)) for name, t in devices_raw.items()}
    for dev in devices.values():
        if dev.edge not in edges:
            raise ConfigError(f"devices.{dev.name}.edge", f"names edge {dev.edge!r}, which is not defined",
                              f"use one of: {', '.join(sorted(edges))}")
    for name in list(edges) + list(devices):
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(name, "names may hold letters, digits, '-' and '_' only", "rename it")
    if set(edges) & set(devices):
        clash = sorted(set(edges) & set(devices))[0]
        raise ConfigError(clash, "is both an edge and a device", "give every process its own name")

    typed = {name: TYPED_SECTIONS[name](**values) for name, values in sections.items() if name in TYPED_SECTIONS}
    f = typed["faults"]
    if f.dead_after_s < 2 * f.heartbeat_s:
        raise ConfigError("faults.dead_after_s", f"{f.dead_after_s} is less than twice faults.heartbeat_s "
                          f"({f.heartbeat_s}): one late heartbeat would look like a dead peer",
                          f"set it to at least {2 * f.heartbeat_s:g}")
    model = typed["model"]
    _check_cut("model.split_layer", model.split_layer, model.name)
    for dev in devices.values():
        if dev.split_layer is not None:
            _check_cut(f"devices.{dev.name}.split_layer", dev.split_layer, model.name)

    _check_endpoints(central, edges, devices)
    rounds = typed["training"].rounds
    mobility_raw = raw.get("mobility", {})
    moves = _moves(mobility_raw, edges, devices, rounds)
    drops = _drops(mobility_raw, edges, devices, rounds)
    mobility, waypoint, traced, timed = _mobility_model(mobility_raw, path, edges, devices, rounds, typed["run"].seed)
    moves = tuple(sorted(moves + traced, key=lambda x: (x.round, x.at, x.device)))
    _check_timeline(moves, drops, devices)
    return Config(path=path, central=central, edges=edges, devices=devices, moves=moves, drops=drops, raw=raw,
                  traced_moves=timed, mobility=mobility, waypoint=waypoint, strategy=sections["strategy"], **typed)


def _handover(given: dict, settings: dict[str, Any]) -> str:
    """``mobility.handover``, or its old spelling ``mobility.offer`` (true: "offer", false:
    "pull"), from the checked ``settings``; ``given`` says which of the two the file set."""
    if "handover" not in given:
        return "offer" if settings["offer"] else "pull"
    value = settings["handover"]
    if "offer" in given and (value == "offer") != settings["offer"]:
        raise ConfigError("mobility.offer", f"{settings['offer']!r} contradicts mobility.handover = {value!r}",
                          "remove mobility.offer (the old spelling of handover = \"offer\" / \"pull\")")
    return value


def _check_cut(key: str, split: int | str, model: str) -> None:
    entry = net(model)
    if split != AUTO and split not in entry.cuts:
        raise ConfigError(key, f"{split} is not a cut point of {model}",
                          f"use one of {entry.describe_cuts()} (the device runs layers 0..split_layer, the edge the rest)")


def _check_endpoints(central: Endpoint, edges: dict[str, Endpoint], devices: dict[str, DeviceConfig]) -> None:
    seen: dict[tuple[str, int], str] = {("", 0): ""}
    listening = [("central.port", central)] + [(f"edges.{n}.port", e) for n, e in edges.items()] + \
                [(f"devices.{n}.control_port", d.control) for n, d in devices.items()]
    for key, ep in listening:
        where = (ep.host, ep.port)
        if where in seen:
            raise ConfigError(key, f"{ep.host}:{ep.port} is already used by {seen[where]}", "give every listener its own port")
        seen[where] = key


def _moves(mobility: Any, edges: dict, devices: dict, rounds: int) -> tuple[Move, ...]:
    if not isinstance(mobility, dict):
        raise ConfigError("mobility", "must be a table", "write moves as [[mobility.moves]] tables")
    unknown = sorted(set(mobility) - set(MOBILITY_TABLES) - set(MOBILITY_KEYS))
    if unknown:
        raise ConfigError(f"mobility.{unknown[0]}", "is not a known key",
                          f"use [[mobility.moves]], [[mobility.drops]], [mobility.waypoint] or one of: "
                          f"{', '.join(MOBILITY_KEYS)}")
    return _mobility_list(mobility, "moves", Move, MOVE_KEYS, edges, devices, rounds)


def _mobility_model(mobility: dict, path: str, edges: dict, devices: dict, rounds: int, seed: int) -> tuple[
        MobilitySection, MobilityWaypointSection | None, tuple[Move, ...], tuple[TimedMove, ...]]:
    """The ``[mobility]`` settings, its ``[mobility.waypoint]`` (when that is the model), the
    round-based moves of a trace, and the time-based moves of a trace."""
    given = {k: v for k, v in mobility.items() if k not in MOBILITY_TABLES}
    settings = _table("mobility", given, MOBILITY_KEYS)
    settings["handover"] = _handover(given, settings)
    settings["offer"] = settings["handover"] == "offer"   # the old spelling, agreeing with handover
    model = settings["model"]
    if mobility.get("waypoint") and model != "waypoint":
        raise ConfigError("mobility.waypoint", f"is set but mobility.model is {model!r}", 'set model = "waypoint"')
    if settings["trace"] and model != "trace":
        raise ConfigError("mobility.trace", f"is set but mobility.model is {model!r}", 'set model = "trace"')
    rounds_moves: list[Move] = []
    timed: list[TimedMove] = []
    waypoint = None
    if model == "trace":
        if not settings["trace"]:
            raise ConfigError("mobility.trace", "is missing (mobility.model is \"trace\")",
                              'add trace = "moves.csv" (time_s,device,edge or round,at,device,edge)')
        file = settings["trace"]
        file = file if os.path.isabs(file) else os.path.join(os.path.dirname(os.path.abspath(path)), file)
        try:
            rows = read_trace(file)
        except TraceError as exc:
            raise ConfigError("mobility.trace", str(exc), "fix the file or point trace at another") from None
        for i, row in enumerate(rows):
            where = f"mobility.trace (row {i + 1} of {settings['trace']})"
            if row.device not in devices:
                raise ConfigError(where, f"{row.device!r} is not a device", f"use one of: {', '.join(sorted(devices))}")
            if row.to not in edges:
                raise ConfigError(where, f"{row.to!r} is not an edge", f"use one of: {', '.join(sorted(edges))}")
            if isinstance(row, TimedMove):
                timed.append(row)
            elif not 1 <= row.round <= rounds:
                raise ConfigError(where, f"round {row.round} is not a round of this run", f"use 1 to {rounds}")
            else:
                rounds_moves.append(Move(row.device, row.to, row.round, row.at))
        timed.sort(key=lambda mv: (mv.time_s, mv.device))
    elif model == "waypoint":
        wp = _table("mobility.waypoint", mobility.get("waypoint", {}), WAYPOINT_KEYS)
        wp["seed"] = seed if wp["seed"] == -1 else wp["seed"]
        waypoint = MobilityWaypointSection(**wp)
    return MobilitySection(**settings), waypoint, tuple(rounds_moves), tuple(timed)


def _mobility_list(mobility: dict, kind: str, cls: type, schema: dict, edges: dict, devices: dict,
                   rounds: int) -> tuple[Any, ...]:
    """``[[mobility.<kind>]]`` tables as ``cls`` objects, each naming a device, an edge
    (``to``; a drop may leave it out) and a round of this testbed; sorted by (round, at)."""
    given = mobility.get(kind, [])
    if not isinstance(given, list):
        raise ConfigError(f"mobility.{kind}", "must be an array of tables", f"write each as [[mobility.{kind}]]")
    out = []
    for i, t in enumerate(given):
        where = f"mobility.{kind}[{i}]"
        item = cls(**_table(where, t, schema))
        if item.device not in devices:
            raise ConfigError(f"{where}.device", f"{item.device!r} is not a device",
                              f"use one of: {', '.join(sorted(devices))}")
        if (item.to or kind == "moves") and item.to not in edges:
            raise ConfigError(f"{where}.to", f"{item.to!r} is not an edge", f"use one of: {', '.join(sorted(edges))}")
        if item.round > rounds:
            raise ConfigError(f"{where}.round", f"round {item.round} is after the last round ({rounds})",
                              f"use 1 to {rounds}")
        out.append(item)
    return tuple(sorted(out, key=lambda x: (x.round, x.at, x.device)))


def _check_timeline(moves: tuple[Move, ...], drops: tuple["Drop", ...], devices: dict) -> None:
    """No planned move to the edge the device is on by then (a drop that names an edge
    puts it there; at the same boundary the drop comes first)."""
    events = sorted([(d.device, d.round, d.at, 0, d.to) for d in drops if d.to] +
                    [(mv.device, mv.round, mv.at, 1, mv.to) for mv in moves])
    here = {name: d.edge for name, d in devices.items()}
    for device, rnd, at, is_move, to in events:
        if is_move and here[device] == to:
            raise ConfigError("mobility.moves", f"{device} would move to {to} in round {rnd} at {at}, "
                              "where it already is", "remove that move or name another edge")
        here[device] = to


def _drops(mobility: dict, edges: dict, devices: dict, rounds: int) -> tuple[Drop, ...]:
    return _mobility_list(mobility, "drops", Drop, DROP_KEYS, edges, devices, rounds)

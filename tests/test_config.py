"""The testbed file: every mistake is a ConfigError that names the key; overrides work."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tomllib

import pytest

from common.config import Config, Move, build_config, load_config, parse_override
from common.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = os.path.join(ROOT, "configs", "local.toml")


def local_raw() -> dict:
    with open(LOCAL, "rb") as f:
        return tomllib.load(f)


def config_error(raw: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        build_config(raw)
    return info.value


def assert_names(exc: ConfigError, key: str) -> None:
    assert exc.key == key, str(exc)
    assert f"'{key}'" in str(exc)


# -- the shipped file --------------------------------------------------------------------

def test_load_local_toml():
    cfg = load_config(LOCAL, env={})
    assert isinstance(cfg, Config)
    assert cfg.mode == "fedfly" and cfg.run.seed == 1
    assert (cfg.central.host, cfg.central.port) == ("127.0.0.1", 47000)
    assert sorted(cfg.edges) == ["edge1", "edge2"]
    assert cfg.edges["edge2"].port == 47002 and cfg.edges["edge2"].listen_host == "127.0.0.1"
    assert cfg.device_names == ["device1", "device2", "device3", "device4"]
    assert cfg.devices["device3"].edge == "edge2" and cfg.devices["device3"].control_port == 47013
    assert (cfg.model.name, cfg.model.split_layer) == ("vgg5", 3)
    assert cfg.data.dataset == "synthetic" and cfg.data.samples_per_device == 1000
    assert cfg.training.rounds == 5 and cfg.training.lr == 0.01 and cfg.training.threads == 1
    assert cfg.moves == (Move("device1", "edge2", 2, 0.5), Move("device1", "edge1", 4, 0.3))
    assert cfg.moves_for("device1") == list(cfg.moves) and cfg.moves_for("device2") == []
    assert cfg.device_threads("device1") == 1
    # defaults filled in
    assert cfg.run.round_timeout == 1800.0 and cfg.data.download is False
    # the relative key file is found beside the config, whatever the working directory
    assert cfg.key_file() == os.path.join(ROOT, "configs", "demo-INSECURE.key")
    assert len(cfg.key()) >= 16


def test_key_file_relative_to_the_config_and_absolute(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "t.key").write_text("cd" * 32)
    raw = local_raw()
    raw["security"]["key_file"] = "sub/t.key"
    cfg = build_config(raw, path=str(tmp_path / "testbed.toml"))
    monkeypatch.chdir("/")
    assert cfg.key() == b"\xcd" * 32
    raw["security"]["key_file"] = str(tmp_path / "sub" / "t.key")
    assert build_config(raw, path="/elsewhere/x.toml").key() == b"\xcd" * 32


def test_int_is_accepted_where_a_float_is_expected():
    raw = local_raw()
    raw["training"]["lr"] = 1
    cfg = build_config(raw)
    assert cfg.training.lr == 1.0 and type(cfg.training.lr) is float


# -- errors name the key -----------------------------------------------------------------

def _set(raw: dict, path: str, value) -> dict:
    raw = copy.deepcopy(raw)
    node = raw
    parts = path.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return raw


def _del(raw: dict, path: str) -> dict:
    raw = copy.deepcopy(raw)
    node = raw
    parts = path.split(".")
    for p in parts[:-1]:
        node = node[p]
    del node[parts[-1]]
    return raw


SET_ERRORS = [
    ("bogus", {}, "bogus"),                                   # unknown section
    ("training.lrr", 0.1, "training.lrr"),                    # unknown key
    ("edges.edge1.prot", 1, "edges.edge1.prot"),
    ("devices.device2.colour", "red", "devices.device2.colour"),
    ("training.rounds", "3", "training.rounds"),              # wrong type
    ("training.rounds", True, "training.rounds"),             # bool is not an int
    ("training.rounds", 3.0, "training.rounds"),              # float is not an int
    ("training.lr", "0.1", "training.lr"),
    ("training.lr", True, "training.lr"),
    ("data.download", 1, "data.download"),                    # int is not a bool
    ("run.name", 2024, "run.name"),
    ("edges.edge1.port", "47001", "edges.edge1.port"),
    ("edges.edge1", 5, "edges.edge1"),                        # not a table
    ("training", [1], "training"),
    ("training.rounds", 0, "training.rounds"),                # value rules
    ("training.batch_size", -1, "training.batch_size"),
    ("training.lr", 0.0, "training.lr"),
    ("training.momentum", 1.0, "training.momentum"),
    ("training.momentum", -0.1, "training.momentum"),
    ("run.mode", "fedfli", "run.mode"),                        # bad choices
    ("run.mode", "FEDFLY", "run.mode"),
    ("data.dataset", "imagenet", "data.dataset"),
    ("data.distribution", "skewed", "data.distribution"),
    ("model.name", "resnet", "model.name"),
    ("model.split_layer", -1, "model.split_layer"),           # split out of range
    ("model.split_layer", 6, "model.split_layer"),
    ("central.port", 0, "central.port"),
    ("central.port", 65536, "central.port"),
    ("devices.device4.control_port", 70000, "devices.device4.control_port"),
    ("devices.device1.slowdown", 0.5, "devices.device1.slowdown"),
    ("devices.device1.edge", "edge3", "devices.device1.edge"),  # names a missing edge
    ("edges.edge2.port", 47001, "edges.edge2.port"),          # duplicate host:port
    ("devices.device2.control_port", 47000, "devices.device2.control_port"),
    ("devices.device4.control_port", 47011, "devices.device4.control_port"),
    ("edges", {}, "edges"),
    ("devices", {}, "devices"),
    ("mobility.teleports", [], "mobility.teleports"),
    ("mobility.moves", {"device": "device1"}, "mobility.moves"),
    ("mobility", [], "mobility"),
    ("mobility.offer", "yes", "mobility.offer"),
    ("mobility.handover", "teleport", "mobility.handover"),
    ("mobility.handover", True, "mobility.handover"),
    ("mobility.preconnect", 1, "mobility.preconnect"),
]


@pytest.mark.parametrize("path,value,key", SET_ERRORS, ids=[f"{p}={v!r}" for p, v, _ in SET_ERRORS])
def test_bad_value_names_the_key(path, value, key):
    assert_names(config_error(_set(local_raw(), path, value)), key)


def test_handover_and_its_old_spelling():
    assert build_config(local_raw()).mobility.handover == "offer"  # the default: today's behaviour
    for raw_mobility, want in (({"offer": False}, "pull"), ({"offer": True}, "offer"), ({"handover": "pull"}, "pull"),
                               ({"handover": "offer", "offer": True}, "offer")):
        raw = local_raw()
        raw.setdefault("mobility", {}).update(raw_mobility)
        cfg = build_config(raw)
        assert cfg.mobility.handover == want and cfg.mobility.offer == (want == "offer")
    raw = local_raw()
    raw.setdefault("mobility", {}).update(handover="pull", offer=True)
    assert_names(config_error(raw), "mobility.offer")  # the two spellings disagree


@pytest.mark.parametrize("path", ["edges.edge1.port", "edges.edge2.host", "central.host", "central.port",
                                  "devices.device1.edge", "devices.device3.host", "devices.device2.control_port"])
def test_missing_required_key_names_it(path):
    assert_names(config_error(_del(local_raw(), path)), path)


def test_missing_sections():
    assert_names(config_error(_del(local_raw(), "edges")), "edges")
    assert_names(config_error(_del(local_raw(), "devices")), "devices")
    assert_names(config_error(_del(local_raw(), "central")), "central.host")


def test_valid_split_layers_and_same_port_on_other_hosts():
    for split in range(0, 6):
        assert build_config(_set(local_raw(), "model.split_layer", split)).model.split_layer == split
    raw = _set(local_raw(), "edges.edge2.port", 47001)
    raw["edges"]["edge2"]["host"] = "127.0.0.2"  # the same port on another host is fine
    assert build_config(raw).edges["edge2"].port == 47001


def test_a_wrong_cut_names_the_valid_ones_of_that_model():
    exc = config_error(_set(_set(local_raw(), "model.name", "resnet18"), "model.split_layer", 9))
    assert_names(exc, "model.split_layer")
    assert "0 (stem)" in str(exc) and "8 (layer4.1)" in str(exc) and "9 (head)" not in str(exc)
    cfg = build_config(_set(_set(local_raw(), "model.name", "mobilenetv2"), "model.split_layer", 18))
    assert cfg.model_key == "mobilenetv2"


def test_the_model_is_built_for_the_data_sets_input():
    assert build_config(local_raw()).model_key == "vgg5"
    cfg = build_config(_set(_set(local_raw(), "data.image_size", 8), "model.name", "resnet18"))
    assert cfg.model_key == "resnet18/3x8x8/10"


def test_names_must_be_plain_and_distinct():
    raw = local_raw()
    raw["edges"]["edge 3"] = {"host": "127.0.0.1", "port": 47003}
    assert_names(config_error(raw), "edge 3")
    raw = local_raw()
    raw["edges"]["device1"] = {"host": "127.0.0.1", "port": 47003}
    assert_names(config_error(raw), "device1")


# -- mobility ----------------------------------------------------------------------------

def _with_moves(*moves: dict, rounds: int = 5) -> dict:
    raw = local_raw()
    raw["training"]["rounds"] = rounds
    raw["mobility"] = {"moves": [dict(m) for m in moves]}
    return raw


def _mv(device="device1", to="edge2", round=2, at=0.5) -> dict:
    return {"device": device, "to": to, "round": round, "at": at}


@pytest.mark.parametrize("move,key", [
    (_mv(device="device9"), "mobility.moves[0].device"),
    (_mv(to="edge9"), "mobility.moves[0].to"),
    (_mv(round=6), "mobility.moves[0].round"),
    (_mv(round=0), "mobility.moves[0].round"),
    (_mv(at=0.0), "mobility.moves[0].at"),
    (_mv(at=1.0), "mobility.moves[0].at"),
    (_mv(at=1.5), "mobility.moves[0].at"),
    (_mv(at=-0.2), "mobility.moves[0].at"),
    (_mv(at=0), "mobility.moves[0].at"),
    (_mv(at="0.5"), "mobility.moves[0].at"),
    ({"device": "device1", "to": "edge2", "round": 2}, "mobility.moves[0].at"),
    ({**_mv(), "when": 3}, "mobility.moves[0].when"),
])
def test_bad_move_names_the_key(move, key):
    assert_names(config_error(_with_moves(move)), key)


def test_bad_second_move_is_named_by_its_index():
    assert_names(config_error(_with_moves(_mv(), _mv(device="device3", to="edge7"))), "mobility.moves[1].to")


def test_move_to_the_edge_it_is_already_on():
    exc = config_error(_with_moves(_mv(to="edge1")))  # device1 starts on edge1
    assert exc.key == "mobility.moves" and "device1" in str(exc) and "edge1" in str(exc)


def test_move_to_the_edge_it_moved_to_before():
    exc = config_error(_with_moves(_mv(round=2, to="edge2"), _mv(round=3, to="edge2")))
    assert exc.key == "mobility.moves" and "round 3" in str(exc)
    # the same round, later in it
    exc = config_error(_with_moves(_mv(round=2, at=0.2, to="edge2"), _mv(round=2, at=0.7, to="edge2")))
    assert exc.key == "mobility.moves" and "0.7" in str(exc)


def test_moves_are_checked_in_time_order_not_file_order():
    # listed back to front: edge2 -> edge1 in round 4, edge1 -> edge2 in round 2; valid in time order
    cfg = build_config(_with_moves(_mv(round=4, to="edge1"), _mv(round=2, to="edge2")))
    assert [(m.round, m.to) for m in cfg.moves] == [(2, "edge2"), (4, "edge1")]
    # and the same two in an order that is wrong in time is refused
    exc = config_error(_with_moves(_mv(round=4, to="edge2"), _mv(round=2, to="edge1")))
    assert exc.key == "mobility.moves"


def test_moves_are_sorted_by_round_then_fraction_then_device():
    cfg = build_config(_with_moves(_mv(device="device3", to="edge1", round=2, at=0.5),
                                   _mv(device="device1", to="edge2", round=2, at=0.5),
                                   _mv(device="device2", to="edge2", round=1, at=0.9),
                                   _mv(device="device4", to="edge1", round=2, at=0.1)))
    assert [(m.round, m.at, m.device) for m in cfg.moves] == [
        (1, 0.9, "device2"), (2, 0.1, "device4"), (2, 0.5, "device1"), (2, 0.5, "device3")]


@pytest.mark.parametrize("at,steps,want", [
    (0.5, 10, 5), (0.5, 7, 3), (0.25, 4, 1), (0.75, 9, 6), (0.99, 10, 9), (0.01, 10, 0),
    (0.5, 1, 0), (0.999, 1000, 999), (0.125, 8, 1), (0.3, 10, 3),
])
def test_move_step_is_the_floor(at, steps, want):
    assert Move("d", "e", 1, at).step(steps) == want


def test_device_names_are_sorted_whatever_the_file_order():
    raw = local_raw()
    devs = raw["devices"]
    raw["devices"] = {"zeta": devs["device1"], "alpha": devs["device2"], "Mid": devs["device3"], "beta2": devs["device4"]}
    raw["mobility"] = {}
    cfg = build_config(raw)
    assert list(cfg.devices) == ["zeta", "alpha", "Mid", "beta2"]  # file order kept in the map
    assert cfg.device_names == ["Mid", "alpha", "beta2", "zeta"]


# -- require (--name) --------------------------------------------------------------------

def test_require():
    cfg = load_config(LOCAL, env={})
    cfg.require("edge", "edge1")
    cfg.require("device", "device4")
    for role, name, key in [("edge", "edge9", "edges.edge9"), ("device", "edge1", "devices.edge1"),
                            ("edge", "device1", "edges.device1")]:
        with pytest.raises(ConfigError) as info:
            cfg.require(role, name)
        assert_names(info.value, key)


# -- overrides ---------------------------------------------------------------------------

def test_parse_override_values():
    assert parse_override("training.rounds=3") == (["training", "rounds"], 3)
    assert parse_override("training.lr=0.05") == (["training", "lr"], 0.05)
    assert parse_override("run.mode=restart") == (["run", "mode"], "restart")
    assert parse_override('run.name="a b"') == (["run", "name"], "a b")
    assert parse_override("data.download=true") == (["data", "download"], True)
    assert parse_override("devices.device1.edge=edge2") == (["devices", "device1", "edge"], "edge2")
    assert parse_override("mobility.moves=[]") == (["mobility", "moves"], [])
    assert parse_override("run.out=/tmp/x=y") == (["run", "out"], "/tmp/x=y")


@pytest.mark.parametrize("text", ["training.rounds", "rounds=3", ".rounds=3", "training.=3", "=3"])
def test_malformed_override(text):
    with pytest.raises(ConfigError):
        parse_override(text)


def test_overrides_through_load_config():
    cfg = load_config(LOCAL, ["training.rounds=3", "training.lr=0.05", "run.mode=restart", 'run.name="my run"',
                              "data.download=true", "devices.device1.edge=edge2", "mobility.moves=[]",
                              "model.split_layer=0", "run.out=/tmp/out dir"], env={})
    assert cfg.training.rounds == 3 and cfg.training.lr == 0.05
    assert cfg.mode == "restart" and cfg.run.name == "my run" and cfg.run.out == "/tmp/out dir"
    assert cfg.data.download is True
    assert cfg.devices["device1"].edge == "edge2"
    assert cfg.moves == () and cfg.model.split_layer == 0


def test_inline_table_moves_override():
    cfg = load_config(LOCAL, ['mobility.moves=[{device="device3",to="edge1",round=1,at=0.25}]'], env={})
    assert cfg.moves == (Move("device3", "edge1", 1, 0.25),)


@pytest.mark.parametrize("override,key", [
    ("training.lrr=0.1", "training.lrr"),
    ("training.rounds=three", "training.rounds"),
    ("training.rounds=1", "mobility.moves[0].round"),  # the file's moves are in rounds 2 and 4
    ("devices.device1.edge=edge2", "mobility.moves"),  # device1 then "moves" to edge2 where it is
    ("run.mode=sideways", "run.mode"),
    ("nosuch.key=1", "nosuch"),
    ("devices.device9.edge=edge1", "devices.device9.host"),
    ("mobility.moves.x=1", "mobility.moves"),
])
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(LOCAL, [override], env={})
    assert_names(info.value, key)


def test_environment_overrides_come_before_the_command_line(monkeypatch):
    env = {"FEDFLY_SET": "training.rounds=7 run.mode=classic 'run.name=from env'"}
    cfg = load_config(LOCAL, [], env=env)
    assert cfg.training.rounds == 7 and cfg.mode == "classic" and cfg.run.name == "from env"
    cfg = load_config(LOCAL, ["training.rounds=9"], env=env)
    assert cfg.training.rounds == 9 and cfg.mode == "classic"  # CLI wins, the rest stays
    # an explicit env mapping replaces os.environ; without one, os.environ is read
    monkeypatch.setenv("FEDFLY_SET", "training.rounds=6")
    assert load_config(LOCAL, env={}).training.rounds == 5
    assert load_config(LOCAL).training.rounds == 6
    monkeypatch.setenv("FEDFLY_SET", "training.bogus=1")
    with pytest.raises(ConfigError) as info:
        load_config(LOCAL)
    assert_names(info.value, "training.bogus")


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "missing.toml"), env={})
    assert info.value.key == "--config"
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nmode = 'x'\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(bad), env={})
    assert info.value.key == "--config"


def test_error_carries_a_fix():
    exc = config_error(_set(local_raw(), "training.lrr", 1))
    assert exc.fix and "lr" in exc.fix and "fix:" in str(exc)


# -- the command line --------------------------------------------------------------------

def _run_edge(tmp_path, config: str, name: str = "edge1") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FEDFLY_SET"}
    env["PYTHONPATH"] = ROOT
    return subprocess.run([sys.executable, "-m", "edge", "--config", config, "--name", name],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


@pytest.mark.process
def test_cli_with_a_bad_config_exits_2_and_names_the_key(tmp_path):
    text = open(LOCAL).read().replace("lr = 0.01", "lrr = 0.01")
    assert "lrr" in text
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    proc = _run_edge(tmp_path, str(bad))
    assert proc.returncode == 2, proc.stderr
    assert "training.lrr" in proc.stderr


@pytest.mark.process
def test_cli_with_a_wrong_name_exits_2_and_names_the_key(tmp_path):
    proc = _run_edge(tmp_path, LOCAL, name="edge9")
    assert proc.returncode == 2, proc.stderr
    assert "edges.edge9" in proc.stderr


def test_drops_of_a_trace_are_checked_and_sorted(tmp_path):
    base = {"central": {"host": "127.0.0.1", "port": 1},
            "edges": {"edge1": {"host": "127.0.0.1", "port": 2}, "edge2": {"host": "127.0.0.1", "port": 3}},
            "devices": {"device1": {"edge": "edge1", "host": "127.0.0.1", "control_port": 4}},
            "training": {"rounds": 2}}
    cfg = build_config({**base, "mobility": {"drops": [
        {"device": "device1", "round": 2, "at": 0.0, "seconds": 1.0},
        {"device": "device1", "round": 1, "at": 0.5, "seconds": 2.5, "to": "edge2"}]}})
    assert [(d.round, d.to, d.seconds) for d in cfg.drops_for("device1")] == [(1, "edge2", 2.5), (2, "", 1.0)]
    for bad, key in [({"device": "device9", "round": 1, "at": 0.5}, "mobility.drops[0].device"),
                     ({"device": "device1", "round": 1, "at": 0.5, "to": "edge7"}, "mobility.drops[0].to"),
                     ({"device": "device1", "round": 3, "at": 0.5}, "mobility.drops[0].round"),
                     ({"device": "device1", "round": 1, "at": 1.5}, "mobility.drops[0].at"),
                     ({"device": "device1", "round": 1, "at": 0.5, "seconds": -1}, "mobility.drops[0].seconds")]:
        with pytest.raises(ConfigError) as err:
            build_config({**base, "mobility": {"drops": [bad]}})
        assert err.value.key == key

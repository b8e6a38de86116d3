"""The typed config: each section's dataclass is its schema, every [mobility] key is in the
schema, and the keys that were constants reach the code that uses them."""

from __future__ import annotations

import dataclasses
import types

import pytest

from common import config
from common.config import MOBILITY_KEYS, REQUIRED, SECTIONS, TYPED_SECTIONS, WAYPOINT_KEYS, build_config
from common.errors import ConfigError
from tests.test_config import _set, assert_names, config_error, local_raw

CLASSES = [(name, cls, SECTIONS[name]) for name, cls in TYPED_SECTIONS.items()] + [
    ("mobility", config.MobilitySection, MOBILITY_KEYS), ("mobility.waypoint", config.MobilityWaypointSection,
                                                           WAYPOINT_KEYS)]


@pytest.mark.parametrize("name,cls,keys", CLASSES, ids=[c[0] for c in CLASSES])
def test_each_section_class_is_its_schema(name, cls, keys):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert list(fields) == list(keys), f"[{name}]: the class's fields are not the schema's keys, in order"
    for key, (_typ, default, _rule, _what) in keys.items():
        if default is not REQUIRED:
            assert fields[key].default == default, f"{name}.{key}"
    assert cls.__dataclass_params__.frozen


def test_every_section_of_the_file_is_typed_but_central_and_strategy():
    # [central] is an Endpoint; [strategy]'s keys belong to the strategies (central/strategies.py)
    assert set(SECTIONS) - set(TYPED_SECTIONS) == {"central", "strategy"}
    cfg = build_config(local_raw())
    for name, cls in TYPED_SECTIONS.items():
        assert type(getattr(cfg, name)) is cls


def test_a_section_reads_by_attribute_only():
    cfg = build_config(_set(local_raw(), "faults.dead_after_s", 7))
    assert cfg.faults.dead_after_s == 7.0
    with pytest.raises(AttributeError):
        cfg.faults.dead_after  # a misspelt key fails where it is written
    with pytest.raises(TypeError):
        cfg.faults["dead_after_s"]  # one way to read a key
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.faults.dead_after_s = 1.0
    assert cfg.faults.as_dict()["dead_after_s"] == 7.0 and list(cfg.faults.as_dict()) == list(SECTIONS["faults"])


def test_mobility_keys_are_the_schemas_with_the_old_spelling_kept():
    cfg = build_config(local_raw())
    assert (cfg.mobility.preconnect, cfg.mobility.handover, cfg.mobility.offer) == (False, "offer", True)
    assert cfg.mobility.handover_limit_s == 30.0 and cfg.waypoint is None
    cfg = build_config(_set(_set(local_raw(), "mobility.offer", False), "mobility.handover_limit_s", 90))
    assert (cfg.mobility.handover, cfg.mobility.offer, cfg.mobility.handover_limit_s) == ("pull", False, 90.0)


@pytest.mark.parametrize("path,value,fix", [
    ("mobility.handover", True, 'write one of "offer", "pull", "relay"'),
    ("mobility.handover", "teleport", 'write one of "offer", "pull", "relay"'),
    ("mobility.offer", "yes", "write it like true"),
    ("mobility.handover_limit_s", 0, None),
    ("mobility.handover_limit_s", "30", "write it like 0.5"),
    ("faults.replicas_kept", 0, None),
])
def test_a_bad_mobility_or_new_key_names_key_value_and_fix(path, value, fix):
    exc = config_error(_set(local_raw(), path, value))
    assert_names(exc, path)
    assert repr(value) in str(exc)
    if fix:
        assert exc.fix == fix


def test_an_unknown_mobility_key_lists_the_known_ones():
    exc = config_error(_set(local_raw(), "mobility.handover_limit", 5))
    assert_names(exc, "mobility.handover_limit")
    assert all(key in exc.fix for key in MOBILITY_KEYS) and "[[mobility.moves]]" in exc.fix


def test_faults_replicas_kept_bounds_the_copies_a_buddy_keeps():
    from edge.handover.replica import Recovery, Replica
    core = types.SimpleNamespace(replicas={}, replicas_kept=build_config(_set(local_raw(), "faults.replicas_kept",
                                                                               2)).faults.replicas_kept)
    recovery = Recovery(core)
    for step in (1, 2, 3, 4):
        recovery.keep("device1", Replica("edge1", 1, step, {}, "", {}))
    assert [r.step for r in core.replicas["device1"]] == [3, 4]
    assert config.default("faults.replicas_kept") == 3


def test_the_default_of_a_key_is_the_schemas():
    assert config.default("mobility.handover_limit_s") == MOBILITY_KEYS["handover_limit_s"][1]
    assert config.default("faults.dead_after_s") == SECTIONS["faults"]["dead_after_s"][1]
    with pytest.raises(KeyError):
        config.default("faults.nope")


def test_a_cut_field_takes_a_layer_or_auto():
    assert build_config(_set(local_raw(), "model.split_layer", "auto")).model.split_layer == "auto"
    with pytest.raises(ConfigError):
        build_config(_set(local_raw(), "model.split_layer", 2.5))

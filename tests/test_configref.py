"""docs/CONFIGURATION.md is the schema's own reference: generated, complete, never stale."""

from __future__ import annotations

import pytest

from common import config
from scripts import configref

ROLES = {"central", "edge", "device", "controller", "launcher", "launcher (remote)", "launcher (netns)"}


def test_the_committed_reference_is_the_commands_output():
    with open(configref.PATH, encoding="utf-8") as f:
        committed = f.read()
    assert committed == configref.render(), "docs/CONFIGURATION.md is stale: run python -m scripts.configref"


def test_every_table_of_the_schema_is_in_the_reference():
    tables = [keys for _, keys, _ in config.TABLES]
    schemas = list(config.SECTIONS.values()) + [v for k, v in vars(config).items() if k.endswith("_KEYS")]
    missing = [s for s in schemas if not any(s is t or s.items() <= t.items() for t in tables)]
    assert not missing, f"tables not in common.config.TABLES: {[sorted(s) for s in missing]}"


@pytest.mark.parametrize("heading,keys,table", config.TABLES, ids=[t[0] for t in config.TABLES])
def test_every_key_says_what_it_does_and_who_reads_it(heading, keys, table):
    for key, entry in keys.items():
        assert len(entry) == 4, f"{heading} {key}: (type, default, rule, what it does)"
        what = entry[3]
        assert isinstance(what, str) and what.strip(), f"{heading} {key} has no description"
        assert "\n" not in what, f"{heading} {key}: a description is one line"
        roles = config.read_by(table, key).split(", ")
        assert set(roles) <= ROLES, f"{heading} {key}: read by {roles}, not all of {sorted(ROLES)}"


def test_read_by_names_only_tables_and_keys_that_exist():
    known = {table for _, _, table in config.TABLES}
    known |= {f"{table}.{key}" for _, keys, table in config.TABLES for key in keys}
    assert set(config.READ_BY) <= known, sorted(set(config.READ_BY) - known)


def test_check_fails_on_a_stale_file_and_passes_once_written(tmp_path, monkeypatch):
    monkeypatch.setattr(configref, "PATH", str(tmp_path / "CONFIGURATION.md"))
    assert configref.main(["--check"]) == 1      # missing
    (tmp_path / "CONFIGURATION.md").write_text(configref.render().replace("required", "optional"))
    assert configref.main(["--check"]) == 1      # stale
    assert configref.main([]) == 0
    assert configref.main(["--check"]) == 0

"""The event log's schema (common/eventschema.py) is complete and is what docs/RESULTS.md
lists: every event the code emits is declared with its fields, the scripts that read the
logs read declared names, and an undeclared event fails in the tests but is kept in a run."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import pytest

from common import eventschema, events
from common.eventschema import COMMON, EVENTS, FIELDS
from scripts import eventref

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("central", "edge", "device", "common", "scripts")
READERS = ("scripts/timeline.py", "scripts/report.py")


def _strings(node: ast.AST) -> list[str] | None:
    """The names an emit's first argument can be: a constant, or either branch of a
    conditional of constants; None when it is computed (checked as it runs)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        a, b = _strings(node.body), _strings(node.orelse)
        return None if a is None or b is None else a + b
    return None


def _fields(call: ast.Call) -> list[str]:
    """The field names an emit call spells out (keywords, and the keys of literal dicts
    spread into it, either branch of a conditional)."""
    out = [k.arg for k in call.keywords if k.arg]
    for k in call.keywords:
        if k.arg is None:
            for node in ast.walk(k.value):
                if isinstance(node, ast.Dict):
                    out += [x.value for x in node.keys if isinstance(x, ast.Constant)]
    return out


def _emits():
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "emit" \
                        and node.args:
                    yield f"{path.relative_to(ROOT)}:{node.lineno}", _strings(node.args[0]), _fields(node)


def test_every_event_the_code_emits_is_declared_with_its_fields():
    sites = list(_emits())
    assert len(sites) > 100  # the scan finds the emitting calls
    problems = [f"{where}: {eventschema.problem(name, fields)}" for where, names, fields in sites
                for name in names or [] if eventschema.problem(name, fields)]
    assert not problems, "\n".join(problems)


def test_every_declared_event_is_emitted_somewhere():
    emitted = {n for _, names, _ in _emits() for n in names or []}
    # computed names: the central's end status, the listener's refusals, the log's own count
    emitted |= {"failed", "stopped", "refused", "refused_suppressed", "events_dropped"}
    assert sorted(set(EVENTS) - emitted) == []


def test_every_field_has_one_meaning_and_every_meaning_is_used():
    used = {f for ev in EVENTS.values() for f in ev.fields}
    assert sorted(used - set(FIELDS)) == [], "fields without a meaning in FIELDS"
    assert sorted(set(FIELDS) - used) == [], "meanings of fields no event carries"
    for name, ev in EVENTS.items():
        assert ev.what and set(ev.by) <= set(eventschema.ROLES), name
        assert len(set(ev.fields)) == len(ev.fields), f"{name}: a field twice"


def _read_names(path: Path) -> set[str]:
    """Event names a reader compares with: ``ev["event"] == "x"``, ``e in ("x", ...)`` (``e``
    holding ``ev["event"]``), and the GOODBYES set."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()

    def is_event(node: ast.AST) -> bool:
        return (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)
                and node.slice.value == "event") or (isinstance(node, ast.Name) and node.id == "e")

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and is_event(node.left):
            for c in node.comparators:
                names |= {x.value for x in ast.walk(c) if isinstance(x, ast.Constant) and isinstance(x.value, str)}
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "GOODBYES" for t in node.targets):
            names |= {x.value for x in ast.walk(node.value) if isinstance(x, ast.Constant)}
    return names


@pytest.mark.parametrize("reader", READERS)
def test_the_scripts_that_read_the_logs_read_declared_names(reader):
    names = _read_names(ROOT / reader)
    if reader.endswith("timeline.py"):
        assert {"round_start", "moved", "fault", "shutdown"} <= names  # the scan sees them
    assert sorted(names - set(EVENTS)) == []


def test_results_page_lists_the_schema():
    with open(eventref.PATH, encoding="utf-8") as f:
        page = f.read()
    assert page == eventref.replaced(page), "docs/RESULTS.md is stale: run python -m scripts.eventref"
    for name in list(EVENTS) + list(FIELDS) + list(COMMON):
        assert f"| `{name}` |" in page


def test_check_fails_on_a_stale_page_and_passes_once_written(tmp_path, monkeypatch):
    page = Path(eventref.PATH).read_text(encoding="utf-8")
    monkeypatch.setattr(eventref, "PATH", str(tmp_path / "RESULTS.md"))
    (tmp_path / "RESULTS.md").write_text(page.replace("| `moved` |", "| `went` |"))
    assert eventref.main(["--check"]) == 1
    assert eventref.main([]) == 0
    assert eventref.main(["--check"]) == 0
    assert (tmp_path / "RESULTS.md").read_text() == page


def test_an_undeclared_event_or_field_raises_in_the_tests(tmp_path):
    assert eventschema.strict()  # tests/conftest.py sets it, for the processes the tests start too
    log = events.EventLog(process="edge1", role="edge")
    log.open(str(tmp_path))
    log.emit("moved", to="edge2", round=1, step=3)
    with pytest.raises(eventschema.EventSchemaError, match="'teleported' is not declared"):
        log.emit("teleported", to="edge2")
    with pytest.raises(eventschema.EventSchemaError, match=r"\['speed'\]"):
        log.emit("moved", to="edge2", speed=3)
    log.close()
    assert [json.loads(x)["event"] for x in open(log.path)] == ["moved"]


def test_in_a_run_an_undeclared_event_is_written_all_the_same_and_said_once(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(eventschema.STRICT_ENV)
    log = events.EventLog(process="edge1", role="edge")
    log.open(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="common.events"):
        log.emit("teleported", to="edge2")
        log.emit("teleported", to="edge3")
    log.close()
    assert [json.loads(x)["to"] for x in open(log.path)] == ["edge2", "edge3"]
    assert sum("teleported" in r.getMessage() for r in caplog.records) == 1

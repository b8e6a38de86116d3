"""docs/PROTOCOL.md against the code: every message type and field is described, and the
session table there is the table in ``edge.lifecycle``. (That a device can be written
from the document is ``test_foreign_device``.)"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from common import messages as m
from edge.lifecycle import TRANSITIONS, Event, State

DOC = (Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md").read_text()
BODY, INDEX = DOC.split("\n## 11. ", 1)


def _definition(name: str) -> str:
    """The text that describes message ``name``: from its first definition (``**Name**``
    or a table row starting with it) to the next definition of any message."""
    starts = []
    for other in m.MESSAGE_TYPES:
        for pat in (rf"\*\*{other}\*\*", rf"\n    {other}\s{{2,}}"):
            starts += [(mt.start(), other) for mt in re.finditer(pat, BODY)]
    starts.sort()
    mine = [pos for pos, who in starts if who == name]
    assert mine, f"{name} is not described in docs/PROTOCOL.md"
    later = [pos for pos, _ in starts if pos > mine[0]]
    return BODY[mine[0]:later[0] if later else len(BODY)]


def test_the_index_lists_every_message_type_once() -> None:
    listed = [line.split()[0] for line in INDEX.splitlines() if line.startswith("    ") and line.split()]
    listed = [x for x in listed if x != "type"]
    assert sorted(listed) == sorted(m.MESSAGE_TYPES)


@pytest.mark.parametrize("name", sorted(m.MESSAGE_TYPES))
def test_every_field_of_every_message_is_described(name: str) -> None:
    text = _definition(name)
    missing = [f.name for f in dataclasses.fields(m.MESSAGE_TYPES[name])
               if not re.search(rf"\b{f.name}\b", text)]
    assert not missing, f"{name}: fields {missing} are not in its description"


def _doc_table() -> dict[State, dict[Event, State]]:
    """The blocks of section 8 that start with ``state\\event``, read by column."""
    section = DOC.split("\n## 8. ", 1)[1].split("\n## 9. ", 1)[0]
    table: dict[State, dict[Event, State]] = {s: {} for s in State}
    for block in section.split("    state\\event")[1:]:
        lines = ("    state\\event" + block).split("\n\n")[0].splitlines()
        names = lines[0].split()
        for line in lines[1:]:
            cells = line.split()
            assert len(cells) == len(names), f"section 8: {line.strip()!r} has {len(cells)} cells, not {len(names)}"
            state = State[cells[0]]
            for col, cell in zip(names[1:], cells[1:]):
                assert Event[col] not in table[state], f"section 8: {state.name} x {col} twice"
                if cell != "-":
                    table[state][Event[col]] = State[cell]
    return table


def test_the_session_table_is_the_code_s() -> None:
    doc = _doc_table()
    for state in State:
        for event in Event:
            want, said = TRANSITIONS[state].get(event), doc[state].get(event)
            assert said == want, f"{state.name} x {event.name}: the document says {said}, the code {want}"

"""Text from the network, made safe to print: the one function every role uses before
peer text reaches a terminal, a log line, an event log or a results file.

A peer's name, a report's detail or an error it quotes may hold ANSI escapes (clear the
screen, move the cursor, retitle the terminal), a CR that overwrites the line before it,
a BEL, a newline that forges a log line of its own, or Unicode that looks like something
else. ``printable`` keeps printable ASCII as it is and writes everything else as Python
writes it in a string literal (``\\x1b``, ``\\r``, ``\\u202e``), so the result is one line of
plain ASCII. Honest text (the testbed's names, its own messages) is printable ASCII and
comes out unchanged, at the cost of one scan; so does text made printable already, so a
line escaped by two layers (a record, then the output) is not escaped twice.
"""

from __future__ import annotations

from typing import Any


def printable(value: Any, limit: int | None = None) -> str:
    """``value`` (text, bytes, or anything ``str`` takes) as one line of printable ASCII:
    every other character escaped (``\\x1b``, ``\\n``, ``\\u2028``...); printable ASCII, a
    result of ``printable`` included, as it is.
    ``limit``: at most that many characters of the result, and ``...`` after them when
    cut (an escape is never cut in half)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        text = bytes(value).decode("latin-1")
    else:
        text = value if isinstance(value, str) else str(value)
    if text.isascii() and text.isprintable():
        # the common case, one C scan: nothing to escape
        return text if limit is None or len(text) <= limit else text[:limit] + "..."
    out: list[str] = []
    used = 0
    for ch in text:
        if " " <= ch <= "~":
            piece = ch
        else:
            piece = ch.encode("unicode_escape").decode("ascii")
        if limit is not None and used + len(piece) > limit:
            return "".join(out) + "..."
        out.append(piece)
        used += len(piece)
    return "".join(out)


def printable_fields(value: Any) -> Any:
    """``value`` (plain data: what an event or a results record holds) with every string
    in it, map keys too, made ``printable``; numbers, booleans and None as they are, and
    anything else as its ``printable`` ``str`` (what ``json.dumps(default=str)`` wrote)."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, dict):
        return {printable(k): printable_fields(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [printable_fields(v) for v in value]
    return printable(value)


def printable_lines(text: str) -> str:
    """Several lines of our own (a table, a traceback) each made ``printable``: the
    newlines between them stay, a CR or an escape inside one does not."""
    return "\n".join(printable(line) for line in text.split("\n"))

"""YAML text from plain data, without a YAML library (PyYAML is a test extra only).

``dump(value)`` writes dicts, lists, strings, ints, floats, bools and None in block style;
lists of scalars in flow style. Strings are always double-quoted the JSON way (a JSON
string is a YAML double-quoted scalar), so ``"no"`` or ``"0440"`` stay strings; text of
several lines ending in one newline is a literal block (``|``), kept byte for byte. Keys
are plain when nothing could misread them. Whatever this writes, ``yaml.safe_load``
reads back as the same data (tests/test_deploy.py). A scalar wrapped in ``Anchor`` is
written once, as ``&name value``, and as the alias ``*name`` wherever it comes again.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*\Z")
# YAML 1.1 reads these as booleans or null even as keys
_SPECIAL = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}


@dataclass(frozen=True)
class Anchor:
    """A scalar that is written in full once per document, then by alias."""
    name: str
    value: Any


def dump(value: Any, header: str = "") -> str:
    """One YAML document; ``header`` becomes its leading ``#`` comment lines."""
    lines = [f"# {ln}".rstrip() for ln in header.splitlines()] if header else []
    lines += _Writer().block(value, 0)
    return "\n".join(lines) + "\n"


def dump_all(values: list[Any], header: str = "") -> str:
    """Several documents, separated by ``---`` (an anchor is per document, as YAML's are)."""
    head = "".join(f"# {ln}".rstrip() + "\n" for ln in header.splitlines())
    return head + "---\n".join(dump(v) for v in values)


def _key(k: str) -> str:
    if not isinstance(k, str):
        raise TypeError(f"YAML keys here are strings, not {type(k).__name__}")
    return k if _PLAIN_KEY.match(k) and k.lower() not in _SPECIAL else json.dumps(k)


def _scalar(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return json.dumps(v)
    if isinstance(v, str):
        return json.dumps(v)
    raise TypeError(f"cannot write a {type(v).__name__} as YAML")


def _literal_ok(s: str) -> bool:
    """Whether ``s`` reads back exactly from a ``|`` block: several lines, one final
    newline, no first line starting with a space, no carriage returns or tabs."""
    return ("\n" in s[:-1] and s.endswith("\n") and not s.endswith("\n\n") and not s.startswith((" ", "\n"))
            and "\r" not in s and "\t" not in s and all(ch.isprintable() or ch == "\n" for ch in s))


def _is_scalar(v: Any) -> bool:
    return not isinstance(v, (dict, list, Anchor))


class _Writer:
    def __init__(self) -> None:
        self.anchors: set[str] = set()

    def inline(self, v: Any) -> str | None:
        return _inline(v) if not isinstance(v, Anchor) else self.anchor(v)

    def anchor(self, a: Anchor) -> str:
        if not _is_scalar(a.value) or not re.fullmatch(r"[A-Za-z0-9_-]+", a.name):
            raise TypeError("an anchor here is a scalar with a plain name")
        if a.name in self.anchors:
            return f"*{a.name}"
        self.anchors.add(a.name)
        return f"&{a.name} {_scalar(a.value)}"

    def block(self, v: Any, indent: int) -> list[str]:
        return _block(v, indent, self)


def _inline(v: Any) -> str | None:
    """``v`` on the line of its key or dash, or None if it needs lines of its own."""
    if isinstance(v, dict):
        return "{}" if not v else None
    if isinstance(v, list):
        if not v:
            return "[]"
        return "[" + ", ".join(_scalar(x) for x in v) + "]" if all(_is_scalar(x) for x in v) else None
    if isinstance(v, str) and _literal_ok(v):
        return None
    return _scalar(v)


def _block(v: Any, indent: int, w: _Writer) -> list[str]:
    pad = " " * indent
    if isinstance(v, dict):
        out = []
        for k, x in v.items():
            inline = w.inline(x)
            if inline is not None:
                out.append(f"{pad}{_key(k)}: {inline}")
            elif isinstance(x, str):
                out.append(f"{pad}{_key(k)}: |")
                out += [f"{pad}  {ln}" if ln else "" for ln in x[:-1].split("\n")]
            else:
                out.append(f"{pad}{_key(k)}:")
                out += _block(x, indent + (0 if isinstance(x, list) else 2), w)
        return out or [pad + "{}"]
    if isinstance(v, list):
        out = []
        for x in v:
            inline = w.inline(x)
            if inline is not None:
                out.append(f"{pad}- {inline}")
            elif isinstance(x, dict):
                inner = _block(x, indent + 2, w)
                out.append(f"{pad}- {inner[0][indent + 2:]}")
                out += inner[1:]
            else:
                raise TypeError("lists of lists or of multi-line text are not written here")
        return out or [pad + "[]"]
    inline = w.inline(v)
    if inline is None:
        raise TypeError("a document of bare multi-line text is not written here")
    return [pad + inline]

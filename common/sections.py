"""Typed config sections: one frozen dataclass per table of the testbed file, made from
its schema (``common.config.SECTIONS``), so code reads ``cfg.faults.dead_after_s`` and a
misspelt key is an ``AttributeError`` where it is written, not a ``KeyError`` in a run.

The classes are generated, not written out: the schema (type, default, rule, description)
stays the one place a key is declared, and the dataclass cannot drift from it.
"""

from __future__ import annotations

import dataclasses
from typing import Any


class Section:
    """Base of every generated section class (frozen: a process never edits its config)."""

    def as_dict(self) -> dict[str, Any]:
        """The keys and their values, in schema order (summary.json records them)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def section_class(table: str, keys: dict[str, tuple], *, module: str, types: dict[type, Any] | None = None,
                  required: object = None) -> type[Section]:
    """A frozen dataclass with one field per schema entry of ``table``, in schema order,
    each defaulting to the schema's default. ``types`` maps a schema type to the field's
    annotation where they differ (a cut is an int or "auto"); a ``required`` key has no
    default (it comes first, as a dataclass needs). The class is named after ``table``
    and belongs to ``module``, which binds it to that name."""
    types = types or {}
    fields = [(key, types.get(typ, typ)) if default is required else
              (key, types.get(typ, typ), dataclasses.field(default=default))
              for key, (typ, default, _rule, _what) in keys.items()]
    fields.sort(key=lambda f: len(f) == 3)   # required first; stable, so schema order otherwise
    name = "".join(part.title() for part in table.replace(".", "_").split("_")) + "Section"
    cls = dataclasses.make_dataclass(name, fields, bases=(Section,), frozen=True)
    cls.__module__ = module   # (make_dataclass takes it as an argument from Python 3.12)
    return cls

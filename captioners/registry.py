"""Captioner registry: name -> class, imported lazily, extended through entry points.

Built-in captioners are listed as import paths, so naming one imports torch only when it is
created. Third-party packages add captioners by declaring an entry point in the
``controlforge.captioners`` group (``name = "package.module:Class"``); ``package.module:Class``
itself also works as a name.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from importlib import metadata
from typing import Any, Mapping

from annotators.registry import _coerce
from captioners.base import Captioner, CaptionerParams

ENTRY_POINT_GROUP = "controlforge.captioners"

BUILTIN: dict[str, str] = {
    "blip": "captioners.blip:BlipCaptioner",
    "florence2": "captioners.florence2:Florence2Captioner",
    "vlm": "captioners.vlm:VlmCaptioner",
}


class UnknownCaptionerError(ValueError):
    """Raised for a name no built-in or installed plugin provides."""


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available() -> list[str]:
    """Every captioner name: built-in and installed plugins."""
    return sorted({*BUILTIN, *_entry_points()})


def get(name: str) -> type[Captioner]:
    """The captioner class registered as ``name``, or at import path ``package.module:Class``."""
    if name in BUILTIN or ":" in name:
        module, _, attr = BUILTIN.get(name, name).partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise UnknownCaptionerError(f"captioner {name!r} cannot be imported: {exc}") from exc
    else:
        plugins = _entry_points()
        if name not in plugins:
            raise UnknownCaptionerError(
                f"unknown captioner {name!r}; known: {', '.join(available())} "
                f"(plugins register in the entry-point group {ENTRY_POINT_GROUP!r})"
            )
        cls = plugins[name].load()
    if not (isinstance(cls, type) and issubclass(cls, Captioner)):
        raise TypeError(f"captioner {name!r} resolves to {cls!r}, not a Captioner subclass")
    return cls


def parse_params(cls: type[Captioner], overrides: Mapping[str, Any]) -> CaptionerParams:
    """Build ``cls.Params`` from overrides given as strings (``-p NAME.KEY=VALUE`` on the command
    line, already split into KEY and VALUE) or typed values (code).

    annotators.registry.parse_params does the same for annotators, but its messages name an
    annotator; the string-to-type conversion is shared.
    """
    fields = {f.name: f for f in dataclasses.fields(cls.Params)}
    hints = typing.get_type_hints(cls.Params)
    values: dict[str, Any] = {}
    for key, raw in overrides.items():
        if key not in fields:
            raise ValueError(f"captioner {cls.name!r} has no parameter {key!r}; "
                             f"its parameters: {', '.join(fields) or '(none)'}")
        values[key] = _coerce(raw, hints[key], f"{cls.name}.{key}")
    try:
        return cls.Params(**values)
    except ValueError as exc:  # a check in __post_init__: say which captioner
        raise ValueError(f"captioner {cls.name!r}: {exc}") from exc


def create(name: str, overrides: Mapping[str, Any] | None = None, weights_dir: str | None = None) -> Captioner:
    """A captioner instance by name with parameter overrides (the model loads in ``setup``)."""
    cls = get(name)
    return cls(parse_params(cls, overrides or {}), weights_dir)

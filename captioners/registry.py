"""Captioner registry: name -> class, imported lazily, extended through entry points.

Built-in captioners are listed as import paths, so naming one imports torch only when it is
created. Third-party packages add captioners by declaring an entry point in the
``controlforge.captioners`` group (``name = "package.module:Class"``); ``package.module:Class``
itself also works as a name.
"""

from __future__ import annotations

from typing import Any, Mapping

from annotators.registry import load_plugin, param_values, plugin_names
from captioners.base import Captioner, CaptionerParams

ENTRY_POINT_GROUP = "controlforge.captioners"

BUILTIN: dict[str, str] = {
    "blip": "captioners.blip:BlipCaptioner",
    "florence2": "captioners.florence2:Florence2Captioner",
    "vlm": "captioners.vlm:VlmCaptioner",
}


class UnknownCaptionerError(ValueError):
    """Raised for a name no built-in or installed plugin provides."""


def available() -> list[str]:
    """Every captioner name: built-in and installed plugins."""
    return plugin_names(BUILTIN, ENTRY_POINT_GROUP)


def get(name: str) -> type[Captioner]:
    """The captioner class registered as ``name``, or at import path ``package.module:Class``."""
    return load_plugin(name, "captioner", BUILTIN, ENTRY_POINT_GROUP, Captioner, UnknownCaptionerError)


def parse_params(cls: type[Captioner], overrides: Mapping[str, Any]) -> CaptionerParams:
    """Build ``cls.Params`` from overrides given as strings (``-p NAME.KEY=VALUE`` on the command
    line, already split into KEY and VALUE) or typed values (code)."""
    values = param_values(cls, overrides, "captioner")
    try:
        return cls.Params(**values)
    except ValueError as exc:  # a check in __post_init__: say which captioner
        raise ValueError(f"captioner {cls.name!r}: {exc}") from exc


def create(name: str, overrides: Mapping[str, Any] | None = None, weights_dir: str | None = None) -> Captioner:
    """A captioner instance by name with parameter overrides (the model loads in ``setup``)."""
    cls = get(name)
    return cls(parse_params(cls, overrides or {}), weights_dir)

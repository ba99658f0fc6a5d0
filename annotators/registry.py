"""Annotator registry: name -> class, imported lazily, extended through entry points.

Built-in annotators are listed as import paths so that asking for ``canny`` never imports torch.
Third-party packages add annotators by declaring an entry point in the ``controlforge.annotators``
group (``name = "package.module:Class"``).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import typing
from importlib import metadata
from typing import Any, Mapping

from annotators.base import Annotator, AnnotatorParams

ENTRY_POINT_GROUP = "controlforge.annotators"

BUILTIN: dict[str, str] = {
    "canny": "annotators.canny:CannyAnnotator",
    "hed": "annotators.hed:HedAnnotator",
    "depth": "annotators.depth:DepthAnnotator",
    "openpose": "annotators.openpose:OpenposeAnnotator",
    "mediapipe_pose": "annotators.mediapipe_pose:MediapipePoseAnnotator",
    "mediapipe_face": "annotators.mediapipe_face:MediapipeFaceAnnotator",
    "person_mask": "annotators.person_mask:PersonMaskAnnotator",
    "segmentation": "annotators.segmentation:SegmentationAnnotator",
}


class UnknownAnnotatorError(ValueError):
    """Raised for a name no built-in or installed plugin provides."""


def plugin_names(builtin: Mapping[str, str], group: str) -> list[str]:
    """Every plugin name of a kind: its built-ins and the installed entry points of ``group``."""
    return sorted({*builtin, *(ep.name for ep in metadata.entry_points(group=group))})


def load_plugin(name: str, kind: str, builtin: Mapping[str, str], group: str, base: type,
                unknown: type[Exception]) -> type:
    """The class registered as ``name`` (a built-in or an entry point of ``group``), or at import path
    ``package.module:Class``; ``unknown`` is raised for a name nothing provides, naming ``kind``."""
    if name in builtin or ":" in name:
        module, _, attr = builtin.get(name, name).partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise unknown(f"{kind} {name!r} cannot be imported: {exc}") from exc
    else:
        plugins = {ep.name: ep for ep in metadata.entry_points(group=group)}
        if name not in plugins:
            raise unknown(f"unknown {kind} {name!r}; known: {', '.join(plugin_names(builtin, group))} "
                          f"(plugins register in the entry-point group {group!r})")
        cls = plugins[name].load()
    if not (isinstance(cls, type) and issubclass(cls, base)):
        article = "an" if base.__name__[0] in "AEIOU" else "a"
        raise TypeError(f"{kind} {name!r} resolves to {cls!r}, not {article} {base.__name__} subclass")
    return cls


def param_values(cls: type, overrides: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """Keyword arguments for ``cls.Params`` from overrides given as strings (``-p NAME.KEY=VALUE``,
    already split) or typed values (code); an unknown key names the ``kind`` of plugin and its parameters."""
    fields = {f.name: f for f in dataclasses.fields(cls.Params)}
    hints = typing.get_type_hints(cls.Params)
    values: dict[str, Any] = {}
    for key, raw in overrides.items():
        if key not in fields:
            raise ValueError(f"{kind} {cls.name!r} has no parameter {key!r}; "
                             f"its parameters: {', '.join(fields) or '(none)'}")
        values[key] = _coerce(raw, hints[key], f"{cls.name}.{key}")
    return values


def available() -> list[str]:
    """Every annotator name: built-in and installed plugins."""
    return plugin_names(BUILTIN, ENTRY_POINT_GROUP)


def get(name: str) -> type[Annotator]:
    """The annotator class registered as ``name``, or at import path ``package.module:Class``.

    The import-path form runs an annotator of your own without packaging it (its ``name``
    attribute names the column); on a cluster its module must be importable by the workers.
    """
    return load_plugin(name, "annotator", BUILTIN, ENTRY_POINT_GROUP, Annotator, UnknownAnnotatorError)


def parse_params(cls: type[Annotator], overrides: Mapping[str, Any]) -> AnnotatorParams:
    """Build ``cls.Params`` from overrides given as strings (CLI) or typed values (code)."""
    params = cls.Params(**param_values(cls, overrides, "annotator"))
    if not 0.0 <= params.min_coverage <= 1.0:
        raise ValueError(f"{cls.name}.min_coverage {params.min_coverage}: a share of pixels, 0..1 (e.g. 0.005)")
    if not 0 <= params.coverage_level < 255:
        raise ValueError(f"{cls.name}.coverage_level {params.coverage_level}: a pixel value, 0..254")
    return params


def _coerce(raw: Any, hint: Any, label: str) -> Any:
    """Turn a CLI string into the field's type (bool, int, float, str, or Optional of them)."""
    if not isinstance(raw, str):
        return raw
    args = typing.get_args(hint)
    if type(None) in args:  # Optional[X]: "none" means None, anything else is an X
        if raw.lower() in ("none", "null"):
            return None
        hint = next(a for a in args if a is not type(None))
    if hint not in (bool, int, float, str):
        return raw
    try:
        value = _parse_bool(raw) if hint is bool else hint(raw)
    except ValueError as exc:
        raise ValueError(f"{label}: cannot read {raw!r} as {hint.__name__}") from exc
    if hint is float and not math.isfinite(value):  # nan passes every range check and reaches provenance JSON
        raise ValueError(f"{label} {raw}: give a finite value (nan and infinity are refused)")
    return value


def _parse_bool(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def create(name: str, overrides: Mapping[str, Any] | None = None, weights_dir: str | None = None) -> Annotator:
    """An annotator instance by name with parameter overrides (weights load in ``setup``)."""
    cls = get(name)
    return cls(parse_params(cls, overrides or {}), weights_dir)

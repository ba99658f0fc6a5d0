"""Annotator registry: name -> class, imported lazily, extended through entry points.

Built-in annotators are listed as import paths so that asking for ``canny`` never imports torch.
Third-party packages add annotators by declaring an entry point in the ``controlforge.annotators``
group (``name = "package.module:Class"``).
"""

from __future__ import annotations

import dataclasses
import importlib
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


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available() -> list[str]:
    """Every annotator name: built-in and installed plugins."""
    return sorted({*BUILTIN, *_entry_points()})


def get(name: str) -> type[Annotator]:
    """The annotator class registered as ``name``, or at import path ``package.module:Class``.

    The import-path form runs an annotator of your own without packaging it (its ``name``
    attribute names the column); on a cluster its module must be importable by the workers.
    """
    if name in BUILTIN or ":" in name:
        module, _, attr = BUILTIN.get(name, name).partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise UnknownAnnotatorError(f"annotator {name!r} cannot be imported: {exc}") from exc
    else:
        plugins = _entry_points()
        if name not in plugins:
            raise UnknownAnnotatorError(
                f"unknown annotator {name!r}; known: {', '.join(available())} "
                f"(plugins register in the entry-point group {ENTRY_POINT_GROUP!r})"
            )
        cls = plugins[name].load()
    if not (isinstance(cls, type) and issubclass(cls, Annotator)):
        raise TypeError(f"annotator {name!r} resolves to {cls!r}, not an Annotator subclass")
    return cls


def parse_params(cls: type[Annotator], overrides: Mapping[str, Any]) -> AnnotatorParams:
    """Build ``cls.Params`` from overrides given as strings (CLI) or typed values (code)."""
    fields = {f.name: f for f in dataclasses.fields(cls.Params)}
    hints = typing.get_type_hints(cls.Params)
    values: dict[str, Any] = {}
    for key, raw in overrides.items():
        if key not in fields:
            raise ValueError(
                f"annotator {cls.name!r} has no parameter {key!r}; "
                f"its parameters: {', '.join(fields) or '(none)'}"
            )
        values[key] = _coerce(raw, hints[key], f"{cls.name}.{key}")
    params = cls.Params(**values)
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
    try:
        if hint is bool:
            return _parse_bool(raw)
        if hint in (int, float, str):
            return hint(raw)
    except ValueError as exc:
        raise ValueError(f"{label}: cannot read {raw!r} as {hint.__name__}") from exc
    return raw


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

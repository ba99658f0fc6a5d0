"""Command-line flags built from documented dataclass fields, shared by every CLI of the project.

A config dataclass documents each field with a string literal under it; ``add_dataclass_flags``
turns each field into one flag whose help is that docstring and whose default is the field's, so a
flag is defined once (``pipeline/annotate.py`` and ``train/train.py`` both build their flags this
way). It lives in ``manifests/`` because that is the one package both halves already import (and
that Ray workers and cluster nodes already receive); ``pipeline/`` never imports ``train/``.

Field metadata the builder reads: ``separator`` (a tuple given as one value, e.g. ``canny,depth``),
``choices``, ``metavar``, and ``flag: False`` for a field set some other way (no flag of its own).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import re
import textwrap
import typing
from typing import Any, Callable, Iterable

NONFINITE_HINT = "give a finite value (nan and infinity are refused)"


def finite_float(text: str) -> float:
    """argparse type of every float flag: a number, refusing nan and +-inf (they would reach JSON files
    and comparisons that silently pass, e.g. ``nan < 1`` is False)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: {NONFINITE_HINT}")
    return value


def nonfinite_problem(config: Any, flag: Callable[[str], str]) -> str | None:
    """A one-line message naming the first float field of a dataclass instance holding nan or +-inf
    (``flag`` turns a field name into its flag), or None when every float is finite."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            return f"{flag(field.name)} {value}: {NONFINITE_HINT}"
    return None


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it), read from the source of the class and of
    the dataclasses it extends (a subclass's own docstring wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def flag_name(field: str, dashes: bool) -> str:
    """``max_aspect`` -> ``--max-aspect`` (dashes) or ``--max_aspect`` (diffusers' style)."""
    return "--" + (field.replace("_", "-") if dashes else field)


def field_default(field: dataclasses.Field) -> Any:
    """The field's default value (calling its factory); ``dataclasses.MISSING`` when it has none."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def add_dataclass_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                        dashes: bool = False, names: Iterable[str] | None = None) -> dict[str, argparse.Action]:
    """One flag per field of ``cls`` (or of ``names`` only), help from its docstring, default from the
    field, required when the field has no default; returns the actions by field name.

    bool -> a switch (``--no-x`` too when it defaults to True); ``X | None`` -> X; float -> finite
    numbers only; tuple -> one comma-separated value with ``separator`` metadata, else several values.
    """
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    wanted = None if names is None else set(names)
    fields = [f for f in dataclasses.fields(cls)
              if f.metadata.get("flag", True) and (wanted is None or f.name in wanted)]
    flags = {f.name: flag_name(f.name, dashes) for f in dataclasses.fields(cls) if f.metadata.get("flag", True)}
    actions = {}
    for field in fields:
        default = field_default(field)
        required = default is dataclasses.MISSING
        extra = _kind_options(hints[field.name], field, None if required else default)
        extra.update({k: field.metadata[k] for k in ("choices", "metavar") if k in field.metadata})
        help_text = _with_flag_names(docs[field.name], flags).replace("%", "%%")  # argparse formats help with %
        actions[field.name] = parser.add_argument(flags[field.name], dest=field.name, required=required,
                                                  help=help_text, **extra)
    return actions


def _kind_options(kind: Any, field: dataclasses.Field, default: Any) -> dict[str, Any]:
    """argparse options for a field of type ``kind`` (its default already converted for the flag)."""
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction if default else "store_true", "default": default}
    if typing.get_origin(kind) is tuple:
        separator = field.metadata.get("separator")
        if separator:  # one value, e.g. --condition canny,depth; the default is shown the same way
            shown = separator.join(default) if isinstance(default, tuple) else default
            return {"type": _splitter(separator), "default": shown}
        return {"nargs": "*", "type": str, "default": default}
    value_type = next(a for a in typing.get_args(kind) or (kind,) if a is not type(None))
    return {"type": finite_float if value_type is float else value_type, "default": default}


def _splitter(separator: str) -> Callable[[str], tuple[str, ...]]:
    def split(value: str) -> tuple[str, ...]:
        return tuple(v.strip() for v in value.split(separator) if v.strip())
    return split


def _with_flag_names(doc: str, flags: dict[str, str]) -> str:
    """A docstring as help text: ````field```` references to fields written as the flags a user types, other
    ````literals```` as plain text."""
    return re.sub(r"``(.+?)``", lambda m: flags.get(m.group(1), m.group(1)), doc)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that ends with ``(default: X)`` where a default says something: not for required flags, switches
    that are off, or None and empty defaults (the help text says what leaving them out does)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        silent = (default is None or default is False or default is argparse.SUPPRESS
                  or (isinstance(default, (str, list, tuple)) and not default))  # 0 is a default worth showing
        if action.required or silent:
            return action.help or ""
        return super()._get_help_string(action)


def parsed_fields(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The parsed values of ``cls``'s flag fields (lists made tuples), ready for ``cls(**...)``."""
    values = vars(args)
    return {f.name: tuple(values[f.name]) if isinstance(values[f.name], list) else values[f.name]
            for f in dataclasses.fields(cls) if f.name in values}

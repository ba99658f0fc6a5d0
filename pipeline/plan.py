"""Plan shards from a streamed listing: fixed slices of the input, each written to a small plan file.

The driver never holds the collection: it reads the listing one slice at a time, fingerprints
the slice (file names and stamps, plus the job's settings), keeps the slice when the output
already holds a shard made from the same fingerprint, and otherwise writes the slice to a plan
file that the shard's task reads. What stays in the driver is one small ``ShardSpec`` per shard
to do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import uuid
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.io import Location, is_uri, join, resolve
from pipeline.reader import InputItem

#: Folder under the output holding each run's plan files (removed when the run ends).
PLAN_DIR = "_plan"

_ITEM_FIELDS = [f.name for f in dataclasses.fields(InputItem)]
_PLAN_SCHEMA = pa.schema([pa.field(name, pa.string()) for name in _ITEM_FIELDS])


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """One shard's work order; its files are in its plan file, so the spec stays small."""

    index: int
    fingerprint: str
    """``<settings fingerprint>-<slice key>``: stored with the shard; resume compares it."""
    rows: int
    """Files in the slice (one row each)."""
    plan: str | Location
    """Path or URI (or resolved location) of the plan file listing the slice's ``InputItem``s."""


@dataclasses.dataclass
class Plan:
    """The shards of one run: those to do, and how many were kept from an earlier run."""

    todo: list[ShardSpec]
    kept: list[int]
    rows: int
    """Files in the whole (possibly ``--limit``-ed) input."""
    shards: int


def slice_fingerprint(items: Iterable[InputItem], settings_fingerprint: str) -> str:
    """The fingerprint of a slice: names and stamps (size, mtime of the file and its sidecar, the
    metadata caption), so an overwritten image or an edited caption redoes its shard."""
    digest = hashlib.sha256()
    for i, item in enumerate(items):
        digest.update(f"{chr(10) if i else ''}{item.source}\t{item.stamp}".encode("utf-8", "surrogateescape"))
    return f"{settings_fingerprint}-{digest.hexdigest()[:16]}"


def plan_shards(items: Iterable[InputItem], shard_size: int, settings_fingerprint: str,
                is_done: Callable[[int, str], bool], plan_dir: str | Location) -> Plan:
    """Cut the streamed ``items`` into slices of ``shard_size``; write a plan file for each slice
    that ``is_done(index, fingerprint)`` says is not done yet."""
    todo: list[ShardSpec] = []
    kept: list[int] = []
    rows = 0
    stream = iter(items)
    for index in itertools.count():
        chunk = list(itertools.islice(stream, shard_size))
        if not chunk:
            return Plan(todo, kept, rows, index)
        rows += len(chunk)
        fp = slice_fingerprint(chunk, settings_fingerprint)
        if is_done(index, fp):
            kept.append(index)
        else:
            todo.append(ShardSpec(index, fp, len(chunk), write_plan(plan_dir, index, chunk)))
    raise AssertionError("unreachable")


def run_plan_dir(output: str | Location) -> str | Location:
    """A fresh plan folder for this run under the output (absolute: workers run in other folders); under
    a resolved ``Location``, a ``Location`` on its filesystem (nothing is resolved again)."""
    if isinstance(output, Location):
        return join(output, PLAN_DIR, uuid.uuid4().hex)
    root = output if is_uri(output) else resolve(output)[1]  # a URI keeps its query (endpoint_override=...)
    return join(root, PLAN_DIR, uuid.uuid4().hex)


def write_plan(plan_dir: str | Location, index: int, items: list[InputItem]) -> str | Location:
    """Write one slice's items as a small Parquet file; returns its path or URI."""
    fs, base = resolve(plan_dir)
    fs.create_dir(base, recursive=True)
    columns = {name: [_text(getattr(item, name)) for item in items] for name in _ITEM_FIELDS}
    path = join(plan_dir, f"{index}.parquet")
    _, local = resolve(path)
    with fs.open_output_stream(local) as stream:
        pq.write_table(pa.table(columns, schema=_PLAN_SCHEMA), stream, compression="zstd")
    return path


def read_plan(path: str | Location) -> list[InputItem]:
    """The items a plan file lists, in order."""
    fs, local = resolve(path)
    with fs.open_input_file(local) as f:
        table = pq.read_table(f)
    columns = {name: table[name].to_pylist() for name in _ITEM_FIELDS}
    return [InputItem(**{name: columns[name][i] for name in _ITEM_FIELDS}) for i in range(table.num_rows)]


def remove_plans(output: str | Location) -> None:
    """Delete every run's plan folder (plans are scratch: a run writes its own)."""
    fs, base = resolve(output)
    try:
        fs.delete_dir(join(base, PLAN_DIR))
    except (FileNotFoundError, OSError):
        pass


def _text(value: str | None) -> str | None:
    """Plan text as valid UTF-8 (Parquet strings must be): a name that is not UTF-8 keeps its bytes
    as ``\\xNN`` escapes; such items carry a ``problem`` and are never opened."""
    if value is None:
        return None
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")

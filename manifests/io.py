"""Manifest storage: locations, Parquet shards made visible atomically, ``_manifest.json`` last.

Reading rows (``manifests.read``, the ``datasets`` view) is ``manifests/readers.py``."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
import uuid
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from manifests.schema import (
    IMAGE_STRUCT,
    KNOWN_SCHEMA_VERSIONS,
    MANIFEST_JSON,
    PROVENANCE_KEY,
    is_shard_name,
    shard_index,
)

# Row groups are cut by size, not by pyarrow's default of 1Mi rows: a row here carries
# hundreds of kB of image bytes, and readers load a whole row group at a time.
ROW_GROUP_BYTES = 32 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Location:
    """A folder or file resolved once: the text it was given as, its filesystem and the path within it.

    Resolving builds a filesystem object (on S3 a client that looks up credentials and opens its own
    connections), so a job resolves its output once (``locate``) and passes this down: ``resolve`` and
    ``join`` take it in place of a path or URI and build nothing. It pickles with its filesystem, so
    workers use the same location without resolving it again.
    """

    uri: str
    """The path or URI as given (what messages show)."""
    fs: pafs.FileSystem = dataclasses.field(compare=False)  # filesystems do not hash; uri and path say where
    path: str
    """The path within ``fs`` (absolute for a local folder)."""

    def __str__(self) -> str:
        return self.uri


def locate(where: str | Location) -> Location:
    """``where`` resolved; a ``Location`` is returned as it is (resolving it again would build another
    filesystem)."""
    if isinstance(where, Location):
        return where
    fs, path = resolve(where)
    return Location(where, fs, path)


def resolve(uri_or_path: str | Location) -> tuple[pafs.FileSystem, str]:
    """A filesystem and path for a local path or any URI pyarrow (or fsspec) can open.

    A URI's query configures its filesystem (``s3://bucket/out?endpoint_override=http://host:9000``);
    one pyarrow does not accept is refused here with a ``ValueError`` naming it. A ``Location`` gives
    its own filesystem and path (nothing is built).
    """
    if isinstance(uri_or_path, Location):
        return uri_or_path.fs, uri_or_path.path
    if not is_uri(uri_or_path):
        local = pafs.LocalFileSystem()
        return local, _abspath(uri_or_path)
    try:
        return pafs.FileSystem.from_uri(uri_or_path)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        # pyarrow knows the scheme but not a query parameter: refuse, as fsspec could take it for part of the path
        if "query" in str(exc).lower():
            raise ValueError(f"{uri_or_path}: {exc}; pyarrow takes the parameters listed at "
                             "https://arrow.apache.org/docs/python/filesystems.html (for s3://: endpoint_override, "
                             "region, scheme, access_key, secret_key, ...)") from exc
        return _fsspec(uri_or_path)


def _fsspec(uri: str) -> tuple[pafs.FileSystem, str]:
    """A scheme pyarrow does not know, through fsspec."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def is_uri(path: str | Location) -> bool:
    """Whether ``path`` is a URI (``scheme://...``) rather than a local path."""
    return "://" in str(path)


def _abspath(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


@typing.overload
def join(base: str, *parts: str) -> str:
    ...


@typing.overload
def join(base: Location, *parts: str) -> Location:
    ...


def join(base: str | Location, *parts: str) -> str | Location:
    """Join path parts with '/', as every pyarrow filesystem expects.

    ``base`` may be a filesystem path or a URI: a URI's query (``?endpoint_override=...``) stays at its
    end, after the joined path. Parts are plain names and are not re-encoded. The URI is split by hand,
    not by ``urllib``, whose round trip drops an empty authority (``local:///tmp/x`` became ``local:/tmp/x``).
    A ``Location`` gives the ``Location`` below it, on the same filesystem.
    """
    if isinstance(base, Location):
        return Location(join(base.uri, *parts), base.fs, join(base.path, *parts))
    if not is_uri(base):
        return "/".join([base.rstrip("/"), *parts])
    location, mark, query = base.partition("?")
    return "/".join([location.rstrip("/"), *parts]) + mark + query


def _row_group_rows(table: pa.Table) -> int:
    """Rows per row group so that a group holds about ``ROW_GROUP_BYTES``."""
    if table.num_rows == 0:
        return 1
    per_row = max(1, table.nbytes // table.num_rows)
    return max(1, ROW_GROUP_BYTES // per_row)


def write_shard(rows: Sequence[dict[str, Any]], schema: pa.Schema, out_dir: str | Location, name: str) -> str:
    """Write ``rows`` as shard ``name`` under ``out_dir``; visible only once complete.

    The shard is written under a temporary name and then moved into place, so a crash never
    leaves a file that looks finished and a rerun can trust every ``part-*.parquet`` it sees.
    """
    fs, base = resolve(out_dir)
    fs.create_dir(base, recursive=True)
    table = pa.Table.from_pylist(list(rows), schema=schema)
    final = join(base, name)
    tmp = join(base, f".tmp-{uuid.uuid4().hex}-{name}")
    try:
        with fs.open_output_stream(tmp) as stream:
            pq.write_table(
                table,
                stream,
                row_group_size=_row_group_rows(table),
                # Image bytes are JPEG/PNG already: compressing or dictionary-encoding them again
                # costs time and saves nothing. Text columns get zstd.
                compression={f.name: "none" if f.type == IMAGE_STRUCT else "zstd" for f in schema},
                use_dictionary=["id", "status", "error", "caption", "source", "caption_source"],
            )
        fs.move(tmp, final)
    except BaseException:
        delete_quietly(fs, tmp)
        raise
    return final


def delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    """Delete a file if it is there (absent or already gone is fine)."""
    try:
        fs.delete_file(path)
    except (FileNotFoundError, OSError):
        pass


def strict_json(payload: Any, **kwargs: Any) -> str:
    """JSON that strict parsers accept: nan and +-inf (which ``json.dumps`` writes as ``NaN``/``Infinity``,
    outside the JSON standard) become ``null``, and ``allow_nan=False`` guarantees none is left."""
    return json.dumps(_finite_or_none(payload), allow_nan=False, **kwargs)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def write_bytes(fs: pafs.FileSystem, folder: str, name: str, data: bytes) -> str:
    """Write ``folder/name`` atomically (a temp file moved into place)."""
    final = join(folder, name)
    tmp = join(folder, f".tmp-{uuid.uuid4().hex}-{name}")
    try:
        with fs.open_output_stream(tmp) as stream:
            stream.write(data)
        fs.move(tmp, final)
    except BaseException:
        delete_quietly(fs, tmp)
        raise
    return final


def write_json(fs: pafs.FileSystem, folder: str, name: str, payload: Any) -> str:
    """Write ``folder/name`` as JSON atomically (a temp file moved into place)."""
    return write_bytes(fs, folder, name, strict_json(payload, indent=2, sort_keys=True).encode())


def write_manifest_json(out_dir: str | Location, summary: dict[str, Any]) -> str:
    """Write ``_manifest.json`` (last, atomically): its presence means the manifest is complete."""
    fs, base = resolve(out_dir)
    return write_json(fs, base, MANIFEST_JSON, summary)


def read_manifest_json(path: str | Location) -> dict[str, Any]:
    """The parsed ``_manifest.json`` of the manifest at ``path``."""
    fs, base = resolve(path)
    try:
        with fs.open_input_stream(join(base, MANIFEST_JSON)) as stream:
            summary = json.loads(stream.read())
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{path} has no {MANIFEST_JSON}: it is not a manifest, or the job that writes it "
            "has not finished (rerun `python pipeline/annotate.py` with the same flags to finish it)"
        ) from exc
    version = summary.get("schema_version")
    if version not in KNOWN_SCHEMA_VERSIONS:
        raise ValueError(
            f"{path}: schema_version {version!r} is not one this code reads "
            f"({sorted(KNOWN_SCHEMA_VERSIONS)}); upgrade the project"
        )
    return summary


def list_shards(path: str | Location) -> list[str]:
    """Full paths of the complete shards under ``path``, in shard index order."""
    fs, base = resolve(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=False))
    except FileNotFoundError:
        return []
    names = [i.base_name for i in infos if i.type == pafs.FileType.File and is_shard_name(i.base_name)]
    return [join(base, n) for n in sorted(names, key=_shard_order)]


def _shard_order(name: str) -> tuple[int, str]:
    """Shards in index order, whatever the width of their names (older manifests used 5 digits)."""
    index = shard_index(name)
    return (-1 if index is None else index, name)


def shard_provenance(shard_path: str, filesystem: pafs.FileSystem | None = None) -> dict[str, Any] | None:
    """The job provenance stored in a shard's key-value metadata, if any.

    ``shard_path`` is a local path or URI, or, with ``filesystem``, a path within that filesystem (what
    ``list_shards`` and listings return: on an object store a bucket-relative path, not a local one).
    """
    fs, path = (filesystem, shard_path) if filesystem is not None else resolve(shard_path)
    with fs.open_input_file(path) as f:
        metadata = pq.read_schema(f).metadata or {}
    raw = metadata.get(PROVENANCE_KEY)
    return json.loads(raw) if raw else None

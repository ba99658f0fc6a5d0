"""Training rows that do not hold their bytes: one memory-mapped Arrow file per manifest.

The columns training needs (of the ``status=ok`` rows) are copied once per manifest, one Parquet row
group at a time and in a child process, into an uncompressed Arrow IPC file in a cache folder. Every
process maps that file (zero-copy), so ranks and DataLoader workers on a machine share its pages
through the page cache, and each keeps only an index in memory: the row positions in id order. A
row's bytes are read when the row is used. Memory therefore does not grow with the manifest's bytes,
only (by 8 bytes a row) with its row count.

The file is named by a hash of the manifest's ``_manifest.json``, its shard files (name, size,
modification time), the columns and ``FORMAT_VERSION``: a changed manifest gets a new file, an
unchanged one is reused by later runs. It is written under a temporary name and renamed, so a
crash never leaves a file a later run would trust.

Shards that went missing or bad after annotation are named in the error, never skipped: a shard
``_manifest.json`` lists but the folder lacks is an error (a cache of the old listing does not hide it),
and a shard whose footer does not read, or whose row count is not the listed one, is an error before
any cache is built from it (``check_shards``; the training CLI runs it before loading models).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import manifests
from manifests import io as mio
from manifests.schema import MANIFEST_JSON, STATUS_OK

log = logging.getLogger("train")

CACHE_ENV = "CONTROLFORGE_CACHE"
FORMAT_VERSION = 1
TMP_PREFIX = ".tmp-"


def default_cache_dir() -> Path:
    """``$CONTROLFORGE_CACHE``, else ``~/.cache/controlforge``."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/controlforge").expanduser()


REANNOTATE = ("re-run annotation (`python pipeline/annotate.py` with the manifest's --input, --output and flags; "
              "it writes missing shards again)")


def shard_error(path: str, problem: str) -> str:
    """One line naming a bad shard, what is wrong with it and what to do."""
    return f"manifest shard {path} {problem}: restore it, or delete it and {REANNOTATE}"


def missing_shards(manifest: str, summary: dict[str, Any]) -> list[str]:
    """Paths of the shards ``_manifest.json`` lists that are not in the folder (one listing)."""
    listed = [s["name"] for s in summary.get("shards", []) if isinstance(s, dict) and s.get("name")]
    present = {Path(p).name for p in mio.list_shards(manifest)}
    _, base = mio.resolve(manifest)
    return [mio.join(base, name) for name in listed if name not in present]


def check_missing(manifest: str, summary: dict[str, Any]) -> None:
    """FileNotFoundError naming the shards ``_manifest.json`` lists that are gone."""
    missing = missing_shards(manifest, summary)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        what = "shard" if len(missing) == 1 else f"{len(missing)} shards"
        raise FileNotFoundError(f"manifest {what} {shown} listed in {MANIFEST_JSON} "
                                f"{'is' if len(missing) == 1 else 'are'} missing: restore "
                                f"{'it' if len(missing) == 1 else 'them'}, or {REANNOTATE}")


def check_shards(manifest: str, columns: Sequence[str], cache_dir: str | os.PathLike | None = None,
                 summary: dict[str, Any] | None = None) -> None:
    """Fail, naming the shard, when one the manifest lists is gone (FileNotFoundError) or does not read as
    the Parquet file annotation wrote (ValueError: truncated, overwritten, another row count).

    Footers are read only when no row cache of the shards as they are now (names, sizes, modification
    times) exists: a built cache means every one of them was read whole since it last changed."""
    summary = summary if summary is not None else manifests.read_manifest_json(manifest)
    if cache_file(manifest, columns, cache_dir).exists():  # cache_file first fails on missing shards
        return
    rows = {s["name"]: s.get("rows") for s in summary.get("shards", []) if isinstance(s, dict) and s.get("name")}
    fs, _ = mio.resolve(manifest)
    for shard in mio.list_shards(manifest):
        try:
            with fs.open_input_file(shard) as f:
                found = pq.ParquetFile(f).metadata.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(shard_error(shard, f"is not a readable Parquet file, truncated or corrupt "
                                                f"({_first_line(exc)})")) from exc
        expected = rows.get(Path(shard).name)
        if expected is not None and found != expected:
            raise ValueError(shard_error(shard, f"holds {found} rows where {MANIFEST_JSON} "
                                                f"lists {expected}: it was changed after annotation"))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def cache_file(manifest: str, columns: Sequence[str], cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the cache of these columns of this manifest lives (whether built or not).

    FileNotFoundError when a shard ``_manifest.json`` lists is gone: a cache of the other shards must not
    stand in for the manifest."""
    summary = manifests.read_manifest_json(manifest)  # fails clearly on a folder that is not a manifest
    check_missing(manifest, summary)
    fs, _ = mio.resolve(manifest)
    shards = [[i.base_name, i.size, i.mtime_ns] for i in fs.get_file_info(mio.list_shards(manifest))]
    key = json.dumps({"format": FORMAT_VERSION, "columns": list(columns), "manifest": summary, "shards": shards},
                     sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return Path(cache_dir or default_cache_dir()).expanduser() / "rows" / f"rows-{digest}.arrow"


def open_table(path: str | os.PathLike) -> pa.Table:
    """The cache file as a table whose buffers point into the mapped file (nothing is copied)."""
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def ensure_cache(manifest: str, columns: Sequence[str], cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache file of these columns of the manifest's ok rows, built if missing."""
    path = cache_file(manifest, columns, cache_dir)
    if path.exists():
        try:
            open_table(path)
            return path
        except (pa.ArrowInvalid, OSError) as exc:  # only a file changed outside this module gets here
            log.warning("rebuilding unreadable row cache %s (%s)", path, exc)
    log.info("building the row cache of %s at %s (once per manifest)", manifest, path)
    _build_in_child(manifest, columns, path)
    return path


def _build_in_child(manifest: str, columns: Sequence[str], path: Path) -> None:
    """``build`` in a fresh interpreter: whatever the allocator keeps after reading Parquet goes back to
    the system when it exits, so the training process's memory stays flat however large the manifest.
    (A plain subprocess, not multiprocessing's spawn, which would re-run the caller's main script.)"""
    root = str(Path(__file__).resolve().parents[1])  # the folder holding the `train` package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    code = ("import json, sys; from pathlib import Path; from train.row_cache import build, BadShard\n"
            "m, c, p = json.loads(sys.argv[1])\n"
            "try:\n    build(m, c, Path(p))\n"
            f"except BadShard as exc:\n    print(exc, file=sys.stderr); sys.exit({BAD_SHARD_EXIT})")
    done = subprocess.run([sys.executable, "-c", code, json.dumps([manifest, list(columns), str(path)])],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode < 0:
        raise RuntimeError(f"the process building the row cache of {manifest} died (signal {-done.returncode}: "
                           "out of memory? killed?); nothing was kept, run again to rebuild it")
    if done.returncode == BAD_SHARD_EXIT:  # the child's one line names the shard and says what to do
        raise BadShard((done.stderr.strip().splitlines() or ["a manifest shard is unreadable"])[-1])
    if done.returncode:
        reason = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"building the row cache of {manifest} failed: {reason}\n{done.stderr[-3000:]}")


class BadShard(RuntimeError):
    """A manifest shard that cannot be read while building the cache (the message names it)."""


BAD_SHARD_EXIT = 3


def build(manifest: str, columns: Sequence[str], path: Path) -> None:
    """Copy ``columns`` of the ok rows, in shard order, into ``path``; one row group in memory at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temporaries(path)
    tmp = path.with_name(f"{TMP_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}-{path.name}")
    fs, _ = mio.resolve(manifest)
    shards = mio.list_shards(manifest)
    if not shards:
        raise ValueError(f"{manifest} has no shards")
    metadata = {"controlforge_rows": json.dumps({"format": FORMAT_VERSION, "manifest": manifest,
                                                 "columns": list(columns)})}
    try:
        with pa.OSFile(str(tmp), "wb") as sink:
            writer = None
            for shard in shards:
                try:
                    f = fs.open_input_file(shard)
                except FileNotFoundError as exc:  # deleted since it was listed
                    raise BadShard(shard_error(shard, "disappeared while the row cache was built")) from exc
                with f:
                    try:
                        parquet = pq.ParquetFile(f, pre_buffer=False)  # one row group in memory, no read-ahead
                    except (pa.ArrowException, OSError) as exc:
                        raise BadShard(shard_error(shard, f"is not a readable Parquet file, truncated or corrupt "
                                                          f"({_first_line(exc)})")) from exc
                    if writer is None:
                        fields = [parquet.schema_arrow.field(name) for name in columns]
                        schema = pa.schema(fields, metadata=metadata)
                        writer = pa.ipc.new_file(sink, schema)
                    for group in range(parquet.num_row_groups):
                        try:
                            table = parquet.read_row_group(group, columns=[*columns, "status"], use_threads=False)
                        except (pa.ArrowException, OSError) as exc:
                            raise BadShard(shard_error(shard, f"is corrupt: row group {group} does not read "
                                                              f"({_first_line(exc)})")) from exc
                        ok = pc.equal(table["status"], STATUS_OK)
                        if not pc.all(ok).as_py():  # filtering copies the group: only when needed
                            table = table.filter(ok)
                        table = table.select(list(columns))
                        if table.num_rows:
                            writer.write_table(pa.Table.from_arrays(table.columns, schema=schema))
            writer.close()
        with open(tmp, "rb+") as f:  # on disk before it gets the name later runs trust
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_dead_temporaries(path: Path) -> None:
    """Delete temporaries of ``path`` left by killed builds on this host (their process is gone)."""
    host = socket.gethostname()
    for tmp in path.parent.glob(f"{TMP_PREFIX}{host}-*-{path.name}"):
        try:
            pid = int(tmp.name[len(f"{TMP_PREFIX}{host}-"):].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, PermissionError):
            pass


class CachedRows(Sequence[dict]):
    """Rows of a cache file at ``positions``, read on access; pickles as (path, positions).

    Each row is a dict of the cached columns (``id``, ``caption``, ``image={'bytes', 'path'}``,
    ``cond_<name>=...``), as ``manifests.read(...).to_dict("records")`` gives. The file is mapped
    lazily, once per process, so forked and spawned DataLoader workers both work.
    """

    def __init__(self, path: str | os.PathLike, positions: np.ndarray, table: pa.Table | None = None):
        self.path = str(path)
        self.positions = np.asarray(positions, dtype=np.int64)
        self._table, self._starts = None, None
        if table is not None:
            self._map(table)

    def _map(self, table: pa.Table) -> None:
        self._batches = table.to_batches()  # zero-copy; one per row group that had ok rows
        self._starts = np.cumsum([0, *(len(b) for b in self._batches)]).tolist()
        self._table = table

    @property
    def table(self) -> pa.Table:
        if self._table is None:
            self._map(open_table(self.path))
        return self._table

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return CachedRows(self.path, self.positions[index], self._table)
        position = int(self.positions[index])
        self.table  # noqa: B018 - maps the file on first use
        k = bisect.bisect_right(self._starts, position) - 1
        return self._batches[k].slice(position - self._starts[k], 1).to_pylist()[0]

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))

    def captions(self) -> list[str | None]:
        """Every row's caption, without reading image bytes."""
        return self.table["caption"].take(pa.array(self.positions)).to_pylist()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "positions": self.positions}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["positions"])


def sorted_rows(manifest: str, columns: Sequence[str], cache_dir: str | os.PathLike | None = None,
                skip_ids: pa.Array | None = None) -> CachedRows:
    """The manifest's ok rows sorted by id (stable), as views on the cache (built if missing), leaving
    out the rows whose id is in ``skip_ids`` (the manifest's duplicates; the cache holds every ok row,
    so keeping or skipping them never rebuilds it)."""
    path = ensure_cache(manifest, columns, cache_dir)
    table = open_table(path)
    order = pc.sort_indices(table["id"]).to_numpy().astype(np.int64)  # Arrow's sort is stable
    if skip_ids is not None and len(skip_ids):
        keep = ~pc.is_in(table["id"], value_set=skip_ids).to_numpy(zero_copy_only=False)
        order = order[keep[order]]
    return CachedRows(path, order, table)

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
from manifests.schema import STATUS_OK

log = logging.getLogger("train")

CACHE_ENV = "CONTROLFORGE_CACHE"
FORMAT_VERSION = 1
TMP_PREFIX = ".tmp-"


def default_cache_dir() -> Path:
    """``$CONTROLFORGE_CACHE``, else ``~/.cache/controlforge``."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/controlforge").expanduser()


def cache_file(manifest: str, columns: Sequence[str], cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the cache of these columns of this manifest lives (whether built or not)."""
    summary = manifests.read_manifest_json(manifest)  # fails clearly on a folder that is not a manifest
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
    code = ("import json, sys; from pathlib import Path; from train.row_cache import build; "
            "m, c, p = json.loads(sys.argv[1]); build(m, c, Path(p))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps([manifest, list(columns), str(path)])],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode < 0:
        raise RuntimeError(f"the process building the row cache of {manifest} died (signal {-done.returncode}: "
                           "out of memory? killed?); nothing was kept, run again to rebuild it")
    if done.returncode:
        reason = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"building the row cache of {manifest} failed: {reason}\n{done.stderr[-3000:]}")


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
                with fs.open_input_file(shard) as f:
                    parquet = pq.ParquetFile(f, pre_buffer=False)  # one row group in memory, no read-ahead
                    if writer is None:
                        fields = [parquet.schema_arrow.field(name) for name in columns]
                        schema = pa.schema(fields, metadata=metadata)
                        writer = pa.ipc.new_file(sink, schema)
                    for group in range(parquet.num_row_groups):
                        table = parquet.read_row_group(group, columns=[*columns, "status"], use_threads=False)
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


def sorted_rows(manifest: str, columns: Sequence[str], cache_dir: str | os.PathLike | None = None) -> CachedRows:
    """The manifest's ok rows sorted by id (stable), as views on the cache (built if missing)."""
    path = ensure_cache(manifest, columns, cache_dir)
    table = open_table(path)
    order = pc.sort_indices(table["id"]).to_numpy().astype(np.int64)  # Arrow's sort is stable
    return CachedRows(path, order, table)

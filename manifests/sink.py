"""Write one manifest: shards committed atomically, each with a small stats file; ``_manifest.json`` last.

The write lifecycle follows Ray Data's ``Datasink``: the driver calls :meth:`ManifestSink.on_write_start`
once (after every refusal check), workers call :meth:`ManifestSink.write` once per shard (any
process: the sink is small and picklable), and the driver ends with :meth:`on_write_complete`
(the summary and ``_manifest.json``) or :meth:`on_write_failed` (no ``_manifest.json``: the
manifest is incomplete and the same command finishes it).

Each shard's stats file (``_stats/part-NNNNNN.json``: fingerprint, rows, counts, error reasons)
is written right after its shard, so resume planning is one listing plus small reads, and the
summary never re-reads the shards. A shard is done only when both files are there and agree.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime
import json
import logging
from pathlib import PurePosixPath
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from manifests.card import CARD_FILE, is_our_card, write_card
from manifests.duplicates import DUPLICATES_DIR, DUPLICATES_FILE
from manifests.io import (Location, delete_quietly, join, resolve, shard_provenance, write_json, write_manifest_json,
                          write_shard)
from manifests.rows import error_kind, storable_rows
from manifests.schema import (
    MANIFEST_JSON,
    SCHEMA_MINOR,
    SCHEMA_VERSION,
    SHARD_DIGITS,
    STATS_DIR,
    STATUSES,
    cond_column,
    manifest_schema,
    shard_index,
    shard_name,
)

log = logging.getLogger("annotate")

#: Threads reading stats files (small objects: on S3 the latency, not the bytes, is the cost).
READ_THREADS = 32


@dataclasses.dataclass
class ShardStats:
    """What one shard holds, written next to it so nobody needs to read the shard to know."""

    shard: int
    fingerprint: str
    """Settings fingerprint and slice key: resume keeps the shard only when this matches its plan."""
    rows: int
    counts: dict[str, int]
    """Rows by status (``ok``, ``error``, ``filtered``)."""
    error_reasons: dict[str, int]
    """Rows that are not ok, by the stage in their ``error`` (``decode``, ``annotate[hed]``, ...)."""
    captions_not_utf8: list[str] = dataclasses.field(default_factory=list)
    """Caption sidecars decoded with a legacy encoding, with the encoding used."""
    seconds: float = 0.0
    captions_truncated: int = 0
    """Rows whose caption was cut to the job's ``max_caption_chars`` (``caption_original_length`` set)."""

    @classmethod
    def from_rows(cls, shard: int, fingerprint: str, rows: Sequence[dict[str, Any]],
                  captions_not_utf8: Sequence[str] = (), seconds: float = 0.0) -> "ShardStats":
        reasons = collections.Counter(error_kind(r["error"]) for r in rows if r["error"])
        return cls(shard, fingerprint, len(rows), {s: sum(r["status"] == s for r in rows) for s in STATUSES},
                   dict(reasons), list(captions_not_utf8), round(seconds, 3),
                   sum(r.get("caption_original_length") is not None for r in rows))

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> "ShardStats":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in payload.items() if k in fields})


@dataclasses.dataclass
class ExistingShards:
    """What an output folder holds before a run: one listing of it and of its stats folder."""

    paths: dict[int, str]
    """Shard index -> path of every complete shard file."""
    stats: dict[int, ShardStats]
    """Shard index -> stats, for shards whose stats file is there (read from shard footers for
    shards written before stats files existed, or whose stats write was cut off)."""
    foreign: list[str]
    """Names of files this project did not write (never deleted)."""
    digits: int
    """Digits of the shard names already there (new shards use the same, so names keep sorting)."""
    unreadable: dict[int, str] = dataclasses.field(default_factory=dict)
    """Shard index -> why its file does not read as a shard (no stats file, and its footer is cut short
    or not Parquet): never kept; only ``--overwrite`` replaces it."""

    def done(self, index: int, fingerprint: str) -> bool:
        """True when shard ``index`` is complete and was written from the same plan."""
        stats = self.stats.get(index)
        return index in self.paths and stats is not None and stats.fingerprint == fingerprint

    def rows(self) -> int:
        return sum(s.rows for i, s in self.stats.items() if i in self.paths)


@dataclasses.dataclass
class ManifestSink:
    """Writes the shards and the summary of one manifest (see the module docstring)."""

    output: str | Location
    """The manifest folder (resolved once by the job: workers write through the same location)."""
    annotator_names: list[str]
    provenance: dict[str, Any]
    """Job provenance stored in every shard's metadata (settings, fingerprint, annotators)."""
    digits: int = SHARD_DIGITS
    """Digits of shard names (``existing`` sets it to the width already in the folder)."""

    # ------------------------------------------------------------------------------ driver side

    def existing(self, also_ours: Iterable[str] = ()) -> ExistingShards:
        """The output's shards, their stats and any foreign files; reads no shard that has a stats file."""
        fs, base = resolve(self.output)
        infos = _list(fs, base)
        ours = {MANIFEST_JSON, STATS_DIR, DUPLICATES_DIR, *also_ours}
        paths: dict[int, str] = {}
        foreign: list[str] = []
        unreadable: dict[int, str] = {}
        widths = set()
        for info in infos:
            index = shard_index(info.base_name) if info.type == pafs.FileType.File else None
            if index is not None:
                paths[index] = info.path
                widths.add(len(info.base_name) - len("part-.parquet"))
            elif info.base_name == CARD_FILE and _is_our_card_file(fs, info.path):
                continue  # our dataset card; a user's .huggingface.yaml is foreign like any other file
            elif info.base_name not in ours and not info.base_name.startswith(".tmp-"):
                foreign.append(info.base_name)
        stats = self._read_stats(fs, base, paths)
        unstated = [i for i in paths if i not in stats]
        for index, footer in zip(unstated, _parallel(lambda i: _read_footer(fs, paths[i]), unstated)):
            if isinstance(footer, str):  # cut short or overwritten: not a shard a rerun can keep
                unreadable[index] = footer
            elif footer[0] is None:  # a Parquet file named like a shard that this project did not write
                foreign.append(PurePosixPath(paths[index]).name)
            else:
                stats[index] = ShardStats(index, footer[0].get("fingerprint", ""), footer[1], {}, {})
        # One width for the whole folder; several only if someone mixed manifests (then keep the widest).
        self.digits = max(widths) if widths else self.digits
        return ExistingShards(paths, stats, sorted(foreign), self.digits, unreadable)

    def on_write_start(self, existing: ExistingShards, overwrite: bool, writes: bool = True) -> None:
        """Make the output ready for this run's shards (call only once every refusal check passed):
        the manifest stops being complete, temp files of killed writes go, and with ``overwrite``
        every earlier shard and its stats go. When shards will be ``writes``-en, the duplicates table
        goes too (it no longer covers every row; the run makes it again)."""
        fs, base = resolve(self.output)
        delete_quietly(fs, join(base, MANIFEST_JSON))  # present only while the manifest is complete
        delete_quietly(fs, join(base, CARD_FILE))  # ours (existing() refused a user's): it describes a complete one
        if writes or overwrite:
            delete_quietly(fs, join(base, DUPLICATES_FILE))
        stale = [i.path for folder in (base, join(base, STATS_DIR), join(base, DUPLICATES_DIR)) for i in _list(fs, folder)
                 if i.base_name.startswith(".tmp-") and not i.base_name.endswith("-lock")
                 and i.type == pafs.FileType.File]
        for path in stale:
            delete_quietly(fs, path)
        # A duplicates pass killed mid-way leaves its scratch folder; one run at a time holds the output
        # (the output lock), so no other pass is using it.
        scratch = [i.path for i in _list(fs, join(base, DUPLICATES_DIR))
                   if i.base_name.startswith(".tmp-work-") and i.type == pafs.FileType.Directory]
        for path in scratch:
            fs.delete_dir(path)
        if stale or scratch:
            log.info("removed %d temp files and %d scratch folders left by an interrupted run", len(stale), len(scratch))
        if overwrite:
            for index, path in existing.paths.items():
                fs.delete_file(path)
                delete_quietly(fs, self._stats_path(base, index))
            existing.paths.clear()
            existing.stats.clear()
        fs.create_dir(join(base, STATS_DIR), recursive=True)

    def summary(self, input_info: dict[str, Any], run_info: dict[str, Any]) -> dict[str, Any]:
        """The ``_manifest.json`` content, from the stats files (shards are not read)."""
        fs, base = resolve(self.output)
        paths = {shard_index(i.base_name): i.path for i in _list(fs, base)
                 if i.type == pafs.FileType.File and shard_index(i.base_name) is not None}
        stats = self._read_stats(fs, base, paths)
        for index in sorted(set(paths) - set(stats)):  # an older manifest's shard: counted once, stats kept
            stats[index] = self._stats_from_shard(fs, base, index, paths[index])
        counts: collections.Counter[str] = collections.Counter()
        reasons: collections.Counter[str] = collections.Counter()
        for s in stats.values():
            counts.update(s.counts)
            reasons.update(s.error_reasons)
        order = sorted(paths)
        summary = {
            "schema_version": SCHEMA_VERSION,
            "schema_minor": SCHEMA_MINOR,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "input": input_info,
            "settings": self.provenance["settings"],
            "settings_fingerprint": self.provenance["settings_fingerprint"],
            "annotators": self.provenance["annotators"],
            # the validator takes the captioner's name as a known caption_source from here
            "captioner": self.provenance.get("captioner"),
            "columns": ["image", *[cond_column(n) for n in self.annotator_names]],
            "counts": {"rows": sum(s.rows for s in stats.values()), **{k: counts.get(k, 0) for k in STATUSES}},
            "error_reasons": dict(reasons.most_common()),
            "captions_truncated": sum(s.captions_truncated for s in stats.values()),
            "shards": [{"name": PurePosixPath(paths[i]).name, "rows": stats[i].rows} for i in order],
            "run": run_info,
        }
        return summary

    def on_write_complete(self, summary: dict[str, Any]) -> None:
        """Declare the manifest complete: its dataset card (the columns of this run's shards: a rerun with
        other annotators rewrites it), then ``_manifest.json`` (last, atomically)."""
        write_card(self.output, manifest_schema(self.annotator_names))
        write_manifest_json(self.output, summary)

    def on_write_failed(self, error: BaseException) -> None:
        """Leave the manifest incomplete (no ``_manifest.json``): the shards written stay and a rerun
        keeps them."""
        log.error("the manifest at %s is incomplete (%s); rerun the same command to finish it",
                  self.output, type(error).__name__)

    # ------------------------------------------------------------------------------ worker side

    def write(self, rows: Sequence[dict[str, Any]], shard: int, fingerprint: str,
              captions_not_utf8: Sequence[str] = (), seconds: float = 0.0) -> ShardStats:
        """Commit one shard (atomically), then its stats file; returns the stats."""
        schema = manifest_schema(self.annotator_names,
                                 {**self.provenance, "shard": shard, "fingerprint": fingerprint})
        try:
            write_shard(rows, schema, self.output, shard_name(shard, self.digits))
        except (pa.ArrowException, UnicodeError, TypeError, ValueError, OverflowError) as exc:
            # The last line of defence: a value Arrow cannot store fails its row, not the shard.
            rows = storable_rows(rows, schema, exc)
            write_shard(rows, schema, self.output, shard_name(shard, self.digits))
        stats = ShardStats.from_rows(shard, fingerprint, rows, captions_not_utf8, seconds)
        fs, base = resolve(self.output)
        self._write_stats(fs, base, stats)
        return stats

    # ------------------------------------------------------------------------------ helpers

    def _stats_path(self, base: str, index: int) -> str:
        return join(base, STATS_DIR, shard_name(index, self.digits).removesuffix(".parquet") + ".json")

    def _write_stats(self, fs: pafs.FileSystem, base: str, stats: ShardStats) -> None:
        folder = join(base, STATS_DIR)
        fs.create_dir(folder, recursive=True)
        write_json(fs, folder, PurePosixPath(self._stats_path(base, stats.shard)).name, dataclasses.asdict(stats))

    def _read_stats(self, fs: pafs.FileSystem, base: str, paths: dict[int, str]) -> dict[int, ShardStats]:
        """Stats of the listed shards whose stats file exists (one listing, then parallel small reads)."""
        listed = {}
        for info in _list(fs, join(base, STATS_DIR)):
            index = shard_index(info.base_name.removesuffix(".json") + ".parquet")
            if index in paths and info.base_name.endswith(".json"):
                listed[index] = info.path

        def read(path: str) -> ShardStats | None:
            try:
                with fs.open_input_stream(path) as stream:
                    return ShardStats.from_json(json.loads(stream.read()))
            except (OSError, ValueError, TypeError):  # unreadable or cut short: read the shard instead
                return None

        indices = sorted(listed)
        return {i: s for i, s in zip(indices, _parallel(read, [listed[i] for i in indices])) if s is not None}

    def _stats_from_shard(self, fs: pafs.FileSystem, base: str, index: int, path: str) -> ShardStats:
        """Stats of a shard written without a stats file, read from its status and error columns."""
        table = pq.read_table(path, columns=["status", "error"], filesystem=fs)
        rows = table.to_pylist()
        provenance = shard_provenance(path, fs) or {}
        stats = ShardStats.from_rows(index, provenance.get("fingerprint", ""), rows)
        self._write_stats(fs, base, stats)
        return stats


def _read_footer(fs: pafs.FileSystem, path: str) -> tuple[dict[str, Any] | None, int] | str:
    """(provenance or None, rows) from a shard's footer, or why it cannot be read (one line)."""
    try:
        provenance = shard_provenance(path, fs)
        with fs.open_input_file(path) as f:
            return provenance, pq.ParquetFile(f).metadata.num_rows
    except (OSError, pa.ArrowException, ValueError) as exc:
        return " ".join(str(exc).split()) or type(exc).__name__
def _is_our_card_file(fs: pafs.FileSystem, path: str) -> bool:
    """True when the file at ``path`` is a dataset card this project wrote (one small read)."""
    with fs.open_input_stream(path) as stream:
        return is_our_card(stream.read())


def _list(fs: pafs.FileSystem, folder: str) -> list[pafs.FileInfo]:
    """A folder's entries (none when it does not exist)."""
    return fs.get_file_info(pafs.FileSelector(folder, recursive=False, allow_not_found=True))


def _parallel(fn: Any, items: Sequence[Any]) -> list[Any]:
    """``[fn(x) for x in items]`` on a thread pool: small reads overlap their latency."""
    if len(items) < 2:
        return [fn(x) for x in items]
    with concurrent.futures.ThreadPoolExecutor(min(READ_THREADS, len(items))) as pool:
        return list(pool.map(fn, items))

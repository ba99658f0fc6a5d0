"""A readable report of a manifest: rows, status, error and filter reasons, sizes, captions, duplicates,
annotators."""

from __future__ import annotations

import collections
import dataclasses
import json
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from manifests import duplicates
from manifests.io import list_shards, read_manifest_json, resolve
from manifests.rows import error_kind
from manifests.schema import image_columns

#: Caption lengths in words, bucketed: (lowest, highest) per bucket; CLIP reads 77 tokens, about 55-60
#: English words, so the last bucket is what SD 1.x/2.x text encoders cut off.
CAPTION_WORD_BINS = ((0, 0), (1, 4), (5, 9), (10, 19), (20, 39), (40, 59), (60, None))


@dataclasses.dataclass
class _Tally:
    """What ``inspect`` counts over the shards (small columns and footers only)."""

    statuses: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    reasons: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    filters: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    sizes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    caption_sources: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    column_bytes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    caption_words: list[np.ndarray] = dataclasses.field(default_factory=list)
    disk: int = 0

    def add(self, shard: str, fs: pafs.FileSystem) -> None:
        """Count one shard: its bytes per column from the footer, then its small columns."""
        meta = pq.read_metadata(shard, filesystem=fs)
        self.disk += fs.get_file_info(shard).size
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                col = group.column(c)
                self.column_bytes[col.path_in_schema.split(".")[0]] += col.total_compressed_size
        names = set(meta.schema.to_arrow_schema().names)
        wanted = ["status", "error", "width", "height", "caption", "caption_source"]
        table = pq.read_table(shard, columns=[c for c in wanted if c in names], filesystem=fs)
        self.statuses.update(table["status"].to_pylist())
        self.reasons.update(_reason(e) for e in table["error"].to_pylist() if e)
        filtered = table.filter(pc.equal(table["status"], "filtered"))
        self.filters.update(error_kind(e) for e in filtered["error"].to_pylist() if e)
        ok = table.filter(pc.equal(table["status"], "ok"))
        self.sizes.update(f"{w}x{h}" for w, h in zip(ok["width"].to_pylist(), ok["height"].to_pylist()))
        if "caption" in names:
            self.caption_words.append(_word_counts(ok["caption"]))
        if "caption_source" in names:
            self.caption_sources.update(s or "none" for s in ok["caption_source"].to_pylist())


def inspect(path: str) -> str:
    """The report as text (reads only small columns, image columns' sizes from the footers)."""
    summary = read_manifest_json(path)
    fs, _ = resolve(path)
    shards = list_shards(path)
    tally = _Tally()
    for shard in shards:
        tally.add(shard, fs)
    schema_cols = image_columns(pq.read_schema(shards[0], filesystem=fs)) if shards else []
    return "\n".join([*_header_lines(path, summary, len(shards), tally.disk), *_row_lines(path, tally),
                      *_column_lines(tally, schema_cols), *_annotator_lines(summary)])


def _header_lines(path: str, summary: dict[str, Any], shards: int, disk: int) -> list[str]:
    """Where the manifest is, its schema version and size, and what it was made from."""
    version = f"v{summary['schema_version']}" + (f".{summary['schema_minor']}" if "schema_minor" in summary else "")
    lines = [
        f"manifest  {path}",
        f"schema    {version}, {shards} shards, {disk / 1e6:.1f} MB on disk",
    ]
    source = summary.get("input") or {}
    if source:
        lines.append(f"input     {source.get('uri')} ({source.get('images')} images, "
                     f"{source.get('ignored_files')} other files ignored)")
    return lines


def _row_lines(path: str, tally: _Tally) -> list[str]:
    """Rows by status, why rows are not ok, duplicates, sizes and captions."""
    statuses = tally.statuses
    rows = sum(statuses.values())
    lines = [f"rows      {rows}: " + ", ".join(f"{s} {statuses.get(s, 0)}" for s in ("ok", "error", "filtered"))]
    if tally.reasons:
        lines.append("not ok    " + "; ".join(f"{n} x {r}" for r, n in tally.reasons.most_common(10)))
    if statuses.get("filtered"):
        lines.append("filtered  " + ", ".join(f"{kind} {n}" for kind, n in tally.filters.most_common())
                     + f" (of {statuses['filtered']} filtered rows)")
    lines.append(_duplicates_line(path, statuses.get("ok", 0)))
    if tally.sizes:
        lines.append("sizes     " + ", ".join(f"{s} ({n})" for s, n in tally.sizes.most_common(5)))
    if tally.caption_words:
        lines.extend(_caption_lines(np.concatenate(tally.caption_words)))
    if tally.caption_sources:
        lines.append("captions  from " + ", ".join(f"{s} {n}" for s, n in tally.caption_sources.most_common()))
    return lines


def _column_lines(tally: _Tally, schema_cols: list[str]) -> list[str]:
    """Bytes of each image column, in all and per ok row."""
    per_ok = max(1, tally.statuses.get("ok", 0))
    return [f"column    {col}: {tally.column_bytes[col] / 1e6:.1f} MB, "
            f"{tally.column_bytes[col] / per_ok / 1e3:.0f} kB per ok row" for col in schema_cols]


def _annotator_lines(summary: dict[str, Any]) -> list[str]:
    """Each annotator's class, versions, parameters and weights, then the run's speed."""
    lines = []
    for a in summary.get("annotators", []):
        versions = ", ".join(f"{k} {v}" for k, v in a.get("versions", {}).items() if v)
        lines.append(f"annotator {a['name']} ({a['class']}; {versions})")
        lines.append(f"          params {json.dumps(a.get('params', {}), sort_keys=True)}")
        for name, digest in a.get("weights", {}).items():
            lines.append(f"          weights {name} sha256:{digest[:16]}")
    run = summary.get("run", {})
    if run:
        lines.append(f"run       {run.get('wall_s')} s wall, {run.get('images_per_s')} images/s, "
                     f"ray {run.get('ray', {}).get('mode')}")
    return lines


def _duplicates_line(path: str, ok_rows: int) -> str:
    """Counts of the duplicates table, or why there is none."""
    table = duplicates.read_table(path)
    if table is None:
        return "duplicates not computed (no _duplicates/duplicates.parquet: a manifest from before them)"
    found = duplicates.counts(table)
    made = duplicates.read_summary(path) or {}
    distance = made.get("max_distance", "?")
    near = "exact copies only" if distance is None else f"near: within {distance} bits of 64"
    groups = len(set(table["duplicate_of"].to_pylist()))
    return (f"duplicates exact {found['exact']}, near {found['near']} ({near}), in {groups} group{'' if groups == 1 else 's'}; "
            f"{ok_rows - table.num_rows} of {ok_rows} ok rows kept (readers and training skip the rest)")


def _word_counts(captions) -> np.ndarray:
    """Words per caption (null counts as empty)."""
    # Runs of non-space characters: splitting on whitespace would count "" (and edge spaces) as words.
    words = pc.count_substring_regex(pc.fill_null(captions, ""), r"\S+")
    return np.asarray(words.to_numpy(zero_copy_only=False), dtype=np.int64)


def _caption_lines(words: np.ndarray) -> list[str]:
    """A histogram of caption lengths in words over the ok rows, one line."""
    if words.size == 0:
        return []
    parts = []
    for low, high in CAPTION_WORD_BINS:
        n = int(((words >= low) & (words <= (np.inf if high is None else high))).sum())
        label = "empty" if high == 0 else f"{low}+" if high is None else f"{low}-{high}"
        parts.append(f"{label} {n}")
    return ["captions  words per ok row: " + ", ".join(parts)
            + f"; median {int(np.median(words))}, longest {int(words.max())}"]


def _reason(error: str) -> str:
    """Group errors by their code and first words: 'decode: image file is truncated'."""
    code, _, message = error.partition(":")
    message = message.split(" (")[0]  # details in parentheses differ per file (byte counts, sizes)
    return f"{code}: {' '.join(message.split()[:6])}".strip()

"""A readable report of a manifest: rows, status, error reasons, sizes, annotators."""

from __future__ import annotations

import collections
import json

import pyarrow.compute as pc
import pyarrow.parquet as pq

from manifests.io import list_shards, read_manifest_json, resolve
from manifests.schema import image_columns


def inspect(path: str) -> str:
    """The report as text (reads only small columns, image columns' sizes from the footers)."""
    summary = read_manifest_json(path)
    fs, _ = resolve(path)
    shards = list_shards(path)
    statuses: collections.Counter[str] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    sizes: collections.Counter[str] = collections.Counter()
    column_bytes: collections.Counter[str] = collections.Counter()
    disk = 0
    for shard in shards:
        meta = pq.read_metadata(shard, filesystem=fs)
        disk += fs.get_file_info(shard).size
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                col = group.column(c)
                column_bytes[col.path_in_schema.split(".")[0]] += col.total_compressed_size
        table = pq.read_table(shard, columns=["status", "error", "width", "height"], filesystem=fs)
        statuses.update(table["status"].to_pylist())
        reasons.update(_reason(e) for e in table["error"].to_pylist() if e)
        ok = table.filter(pc.equal(table["status"], "ok"))
        sizes.update(f"{w}x{h}" for w, h in zip(ok["width"].to_pylist(), ok["height"].to_pylist()))
    rows = sum(statuses.values())
    schema_cols = image_columns(pq.read_schema(shards[0], filesystem=fs)) if shards else []
    lines = [
        f"manifest  {path}",
        f"schema    v{summary['schema_version']}, {len(shards)} shards, {disk / 1e6:.1f} MB on disk",
        f"input     {summary['input']['uri']} ({summary['input']['images']} images, "
        f"{summary['input']['ignored_files']} other files ignored)",
        f"rows      {rows}: " + ", ".join(f"{s} {statuses.get(s, 0)}" for s in ("ok", "error", "filtered")),
    ]
    if reasons:
        lines.append("not ok    " + "; ".join(f"{n} x {r}" for r, n in reasons.most_common(10)))
    if sizes:
        lines.append("sizes     " + ", ".join(f"{s} ({n})" for s, n in sizes.most_common(5)))
    for col in schema_cols:
        per_row = column_bytes[col] / max(1, statuses.get("ok", 0))
        lines.append(f"column    {col}: {column_bytes[col] / 1e6:.1f} MB, {per_row / 1e3:.0f} kB per ok row")
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
    return "\n".join(lines)


def _reason(error: str) -> str:
    """Group errors by their code and first words: 'decode: image file is truncated'."""
    code, _, message = error.partition(":")
    message = message.split(" (")[0]  # details in parentheses differ per file (byte counts, sizes)
    return f"{code}: {' '.join(message.split()[:6])}".strip()

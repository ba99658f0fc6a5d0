"""Check every invariant of a manifest; each problem names the offending ids."""

from __future__ import annotations

import collections
import dataclasses
import io
from typing import Iterator

import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from manifests.io import list_shards, read_manifest_json, resolve
from manifests.schema import BASE_FIELDS, STATUS_OK, STATUSES, TAIL_FIELDS, image_columns

MAX_IDS_SHOWN = 20


@dataclasses.dataclass
class Problem:
    """One broken invariant and the rows (ids) that break it."""

    check: str
    message: str
    ids: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        shown = ", ".join(self.ids[:MAX_IDS_SHOWN])
        more = f" (+{len(self.ids) - MAX_IDS_SHOWN} more)" if len(self.ids) > MAX_IDS_SHOWN else ""
        return f"[{self.check}] {self.message}" + (f": {shown}{more}" if self.ids else "")


def validate(path: str, decode: bool = True, progress: bool = True) -> list[Problem]:
    """All problems found in the manifest at ``path`` (an empty list means valid).

    ``decode`` fully decodes every image of every ok row (slow on big manifests, but it is the
    only way to know the bytes are good); without it only headers are read.
    """
    try:
        summary = read_manifest_json(path)
    except (FileNotFoundError, ValueError) as exc:
        return [Problem("manifest_json", str(exc))]
    problems: list[Problem] = []
    fs, _ = resolve(path)
    seen: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    shards = list_shards(path)
    bar = tqdm(total=summary.get("counts", {}).get("rows"), unit="row", desc="validate", disable=not progress)
    for shard in shards:
        schema = pq.read_schema(shard, filesystem=fs)
        missing = [f.name for f in (*BASE_FIELDS, *TAIL_FIELDS) if f.name not in schema.names]
        if missing:
            problems.append(Problem("schema", f"{shard} lacks columns {missing}"))
            continue
        table = pq.read_table(shard, filesystem=fs)
        rows = table.to_pylist()
        seen.update(r["id"] for r in rows)
        counts.update(r["status"] for r in rows)
        problems.extend(_row_problems(rows, image_columns(schema), decode))
        bar.update(len(rows))
    bar.close()
    duplicates = [i for i, n in seen.items() if n > 1]
    if duplicates:
        problems.append(Problem("unique_id", "ids appear more than once", duplicates))
    problems.extend(_count_problems(summary, counts, len(shards)))
    return _merge(problems)


def _row_problems(rows: list[dict], image_cols: list[str], decode: bool) -> Iterator[Problem]:
    for row in rows:
        status, error, rid = row["status"], row["error"], row["id"]
        if status not in STATUSES:
            yield Problem("status", f"status not in {STATUSES}", [rid])
            continue
        if (status == STATUS_OK) == bool(error):
            yield Problem("error_iff_not_ok", "error must be set exactly when status is not ok", [rid])
        if status != STATUS_OK:
            continue
        for col in image_cols:
            reason = _image_problem(row[col], row["width"], row["height"], decode)
            if reason:
                yield Problem(f"decode:{col}", reason, [rid])


def _image_problem(cell: dict | None, width: int | None, height: int | None, decode: bool) -> str | None:
    """Why an image cell of an ok row is unusable, or None when it is fine."""
    if cell is None or not cell.get("bytes"):
        return "missing image bytes"
    try:
        with Image.open(io.BytesIO(cell["bytes"])) as im:
            if decode:
                im.load()
            size = im.size
    except Exception as exc:
        return f"does not decode ({exc})"
    if size != (width, height):
        return f"size is not width x height"
    return None


def _count_problems(summary: dict, counts: collections.Counter[str], shards: int) -> Iterator[Problem]:
    stated = summary.get("counts", {})
    actual = {"rows": sum(counts.values()), **{s: counts.get(s, 0) for s in STATUSES}}
    for key, value in actual.items():
        if stated.get(key) != value:
            yield Problem("counts", f"_manifest.json says {key}={stated.get(key)}, shards hold {value}")
    if len(summary.get("shards", [])) != shards:
        yield Problem("counts", f"_manifest.json lists {len(summary.get('shards', []))} shards, folder holds {shards}")


def _merge(problems: list[Problem]) -> list[Problem]:
    """One problem per (check, message), with all its ids."""
    merged: dict[tuple[str, str], Problem] = {}
    for p in problems:
        key = (p.check, p.message)
        if key in merged:
            merged[key].ids.extend(p.ids)
        else:
            merged[key] = Problem(p.check, p.message, list(p.ids))
    return list(merged.values())

"""Check every invariant of a manifest; each problem names the offending ids."""

from __future__ import annotations

import collections
import dataclasses
import io
from typing import Iterator

import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

import pyarrow as pa

from manifests import duplicates as dup
from manifests.card import CARD_FILE, card_text, is_our_card, read_card
from manifests.io import join, list_shards, read_manifest_json, resolve
from manifests.schema import (BASE_FIELDS, CAPTION_SOURCES, COND_PREFIX, STATUS_OK, STATUSES, TAIL_FIELDS,
                              V1_1_FIELDS, image_columns, manifest_schema)

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
    sources = caption_sources(summary)
    ok_ids: set[str] = set()
    bar = tqdm(total=summary.get("counts", {}).get("rows"), unit="row", desc="validate", disable=not progress)
    for shard in shards:
        schema = pq.read_schema(shard, filesystem=fs)
        missing = [f.name for f in (*BASE_FIELDS, *TAIL_FIELDS) if f.name not in schema.names]
        if missing:
            problems.append(Problem("schema", f"{shard} lacks columns {missing}"))
            continue
        v1_1 = _v1_1_schema_problem(schema)
        if v1_1:
            problems.append(Problem("schema", f"{shard} {v1_1}"))
            continue
        table = pq.read_table(shard, filesystem=fs)
        rows = table.to_pylist()
        seen.update(r["id"] for r in rows)
        counts.update(r["status"] for r in rows)
        ok_ids.update(r["id"] for r in rows if r["status"] == STATUS_OK)
        problems.extend(_row_problems(rows, image_columns(schema), decode))
        if "phash" in schema.names:
            problems.extend(_v1_1_row_problems(rows, sources))
        bar.update(len(rows))
    bar.close()
    duplicates = [i for i, n in seen.items() if n > 1]
    if duplicates:
        problems.append(Problem("unique_id", "ids appear more than once", duplicates))
    problems.extend(_count_problems(summary, counts, len(shards)))
    problems.extend(_duplicates_problems(path, ok_ids))
    problems.extend(_card_problems(path, summary))
    return _merge(problems)


def caption_sources(summary: dict) -> set[str]:
    """The values ``caption_source`` may take in this manifest: "" (no caption), the fixed origins, and
    the name of the captioner the job ran, if any."""
    allowed = {"", *CAPTION_SOURCES}
    captioner = summary.get("captioner") or {}
    if captioner.get("name"):
        allowed.add(captioner["name"])
    return allowed


def _v1_1_schema_problem(schema: pa.Schema) -> str | None:
    """A shard has both v1.1 columns with their types, or neither (written before v1.1)."""
    present = [f for f in V1_1_FIELDS if f.name in schema.names]
    if not present:
        return None
    if len(present) != len(V1_1_FIELDS):
        return f"has {present[0].name} but not {', '.join(f.name for f in V1_1_FIELDS if f not in present)}"
    wrong = [f"{f.name} is {schema.field(f.name).type}, not {f.type}" for f in V1_1_FIELDS
             if schema.field(f.name).type != f.type]
    return "; ".join(wrong) or None


def _v1_1_row_problems(rows: list[dict], sources: set[str]) -> Iterator[Problem]:
    """Every ok row has its perceptual hash; ``caption_source`` names a known origin, empty exactly
    when the caption is."""
    for row in rows:
        if row["status"] != STATUS_OK:
            continue
        rid = row["id"]
        if row["phash"] is None:
            yield Problem("phash", "ok rows need a phash", [rid])
        source = row["caption_source"] or ""
        if source not in sources:
            yield Problem("caption_source", f"caption_source {source!r} is not one of {sorted(sources)}", [rid])
        elif bool(source) != bool(row["caption"]):
            yield Problem("caption_source", "caption_source must be set exactly when the caption is", [rid])


def _duplicates_problems(path: str, ok_ids: set[str]) -> Iterator[Problem]:
    """The duplicates side table names ok rows of this manifest, each once, each pointing at a kept
    (not itself duplicate) row other than itself, with a distance of 0..64 (0 when exact)."""
    try:
        table = dup.read_table(path)
    except Exception as exc:  # unreadable: readers would fail the same way
        yield Problem("duplicates", f"{dup.DUPLICATES_FILE} does not read ({exc})")
        return
    if table is None:
        return
    missing = [f.name for f in dup.SCHEMA if f.name not in table.schema.names]
    if missing:
        yield Problem("duplicates", f"{dup.DUPLICATES_FILE} lacks columns {missing}")
        return
    rows = table.to_pylist()
    listed = collections.Counter(r["id"] for r in rows)
    for row in rows:
        rid, kept, distance = row["id"], row["duplicate_of"], row["distance"]
        if rid not in ok_ids or kept not in ok_ids:
            yield Problem("duplicates", "duplicates table names ids that are not ok rows of the manifest", [rid])
        elif rid == kept:
            yield Problem("duplicates", "a row listed as a duplicate of itself", [rid])
        elif kept in listed:
            yield Problem("duplicates", "duplicate_of names a row that is itself a duplicate", [rid])
        if listed[rid] > 1:
            yield Problem("duplicates", "ids listed more than once in the duplicates table", [rid])
        if (distance is not None and not 0 <= distance <= 64) or (row["exact"] and distance not in (0, None)):
            yield Problem("duplicates", "distance must be 0..64 bits, and 0 for exact copies", [rid])


def _card_problems(path: str, summary: dict) -> Iterator[Problem]:
    """The dataset card is the one the job writes for this manifest's columns (so ``datasets.load_dataset(path)``
    reads the shards alone, images as PIL); a manifest without one is fine until a side table would be read
    as data."""
    text = read_card(path)
    rerun = "rerun the annotate command with the same flags to write it"
    if text is None:
        fs, base = resolve(path)
        if fs.get_file_info(join(base, dup.DUPLICATES_FILE)).type != pafs.FileType.NotFound:
            yield Problem("dataset_card", f"no {CARD_FILE}: datasets.load_dataset({path!r}) reads "
                          f"{dup.DUPLICATES_FILE} as data and fails; {rerun}")
        return
    if not is_our_card(text):
        yield Problem("dataset_card", f"{CARD_FILE} was not written by this project; remove it and {rerun}")
        return
    names = [c[len(COND_PREFIX):] for c in summary.get("columns", []) if c.startswith(COND_PREFIX)]
    if text != card_text(manifest_schema(names)):
        yield Problem("dataset_card", f"{CARD_FILE} does not declare this manifest's shards and columns "
                      f"({', '.join(summary.get('columns', []))}); {rerun}")


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

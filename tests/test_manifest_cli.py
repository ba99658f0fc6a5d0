"""``python -m manifests inspect|validate|preview`` on a real manifest and on broken copies."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from manifests.__main__ import main
from manifests.schema import shard_name
from manifests.validate import validate


def test_inspect_reports_counts_reasons_sizes_and_annotators(demo_manifest, capsys):
    assert main(["inspect", str(demo_manifest)]) == 0
    out = capsys.readouterr().out
    assert "rows      20: ok 18, error 2, filtered 0" in out
    assert "decode: " in out and "annotator canny" in out and "cond_canny" in out
    assert "3 shards" in out


def test_validate_passes_on_a_fresh_manifest(demo_manifest, capsys):
    assert main(["validate", str(demo_manifest)]) == 0
    assert "valid" in capsys.readouterr().out


def _rewrite_shard(path, change):
    table = pq.read_table(path)
    rows = table.to_pylist()
    change(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)


def test_validate_names_duplicate_ids(manifest_copy, capsys):
    shard = manifest_copy / shard_name(0)
    dup = pq.read_table(shard, columns=["id"])["id"][0].as_py()
    _rewrite_shard(shard, lambda rows: rows[1].update(id=dup))
    assert main(["validate", str(manifest_copy)]) == 1
    out = capsys.readouterr().out
    assert "[unique_id]" in out and dup in out


def test_validate_catches_error_status_mismatch_and_bad_images(manifest_copy):
    shard = manifest_copy / shard_name(2)

    def break_rows(rows):
        rows[0]["error"] = "decode: invented"  # ok row with an error
        rows[1]["cond_canny"] = {"bytes": b"not a png", "path": None}
        rows[2]["width"] = rows[2]["width"] + 8

    _rewrite_shard(shard, break_rows)
    ids = pq.read_table(shard, columns=["id"])["id"].to_pylist()
    found: dict[str, list[str]] = {}
    for problem in validate(str(manifest_copy), progress=False):
        found.setdefault(problem.check, []).extend(problem.ids)
    assert found["error_iff_not_ok"] == [ids[0]]
    assert ids[1] in found["decode:cond_canny"]
    assert ids[2] in found["decode:image"]


def test_validate_checks_counts_against_shards(manifest_copy, capsys):
    path = manifest_copy / "_manifest.json"
    summary = json.loads(path.read_text())
    summary["counts"]["ok"] += 1
    path.write_text(json.dumps(summary))
    assert main(["validate", str(manifest_copy)]) == 1
    assert "_manifest.json says ok=19, shards hold 18" in capsys.readouterr().out


def test_validate_refuses_unknown_schema_version(manifest_copy, capsys):
    path = manifest_copy / "_manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "schema_version": 7}))
    assert main(["validate", str(manifest_copy)]) == 1
    assert "schema_version 7" in capsys.readouterr().out


def test_preview_writes_a_contact_sheet(demo_manifest, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["preview", str(demo_manifest), "--out", str(out), "--rows", "3", "--tile", "128"]) == 0
    sheet = Image.open(out)
    assert sheet.width >= 2 * 128 and sheet.height >= 3 * 128  # image | cond_canny, three rows
    pixels = sheet.convert("L").getextrema()
    assert pixels[0] < 50 and pixels[1] > 200  # not blank


def test_preview_of_error_rows_fails_clearly_when_none(demo_manifest, tmp_path, capsys):
    assert main(["preview", str(demo_manifest), "--out", str(tmp_path / "g.png"), "--status", "filtered"]) == 2
    assert "no rows with status 'filtered'" in capsys.readouterr().err


def _problems(path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for problem in validate(str(path), progress=False):
        found.setdefault(problem.check, []).extend(problem.ids)
    return found


def test_validate_checks_the_v1_1_columns_of_ok_rows(manifest_copy):
    shard = manifest_copy / shard_name(0)
    table = pq.read_table(shard)
    ok = [r["id"] for r in table.to_pylist() if r["status"] == "ok"]

    def break_rows(rows):
        by_id = {r["id"]: r for r in rows}
        by_id[ok[0]]["phash"] = None  # an ok row without its hash
        by_id[ok[1]]["caption_source"] = "my-own-tool"  # no such origin in this manifest
        by_id[ok[2]].update(caption="", caption_source="sidecar")  # an origin for no caption
        by_id[ok[3]].update(caption="a caption", caption_source="")  # a caption from nowhere

    _rewrite_shard(shard, break_rows)
    found = _problems(manifest_copy)
    assert found["phash"] == [ok[0]]
    assert sorted(found["caption_source"]) == sorted(ok[1:4])


def test_validate_requires_both_v1_1_columns_with_their_types_but_reads_v1_0_shards(manifest_copy):
    older, half = manifest_copy / shard_name(0), manifest_copy / shard_name(1)
    pq.write_table(pq.read_table(older).drop_columns(["caption_source", "phash"]), older)  # a v1.0 shard: fine
    table = pq.read_table(half)
    pq.write_table(table.set_column(table.schema.get_field_index("phash"), "phash",
                                    table["phash"].cast(pa.string())), half)
    # (a shard refused by its schema is not counted, so the counts disagree too)
    problems = [str(p) for p in validate(str(manifest_copy), progress=False) if p.check != "counts"]
    assert problems == [f"[schema] {half} phash is string, not int64"]
    pq.write_table(table.drop_columns(["phash"]), half)
    problems = [str(p) for p in validate(str(manifest_copy), progress=False) if p.check != "counts"]
    assert problems == [f"[schema] {half} has caption_source but not phash"]


def test_validate_checks_the_duplicates_side_table(manifest_copy):
    from manifests import duplicates

    table = duplicates.read_table(str(manifest_copy))
    assert table is not None and table.num_rows >= 2, "the demo collection holds copies of one picture"
    assert validate(str(manifest_copy), progress=False) == []
    rows = table.to_pylist()
    kept = rows[0]["duplicate_of"]
    broken = [
        {**rows[0], "duplicate_of": "no-such-id"},  # points outside the manifest
        {**rows[1], "duplicate_of": rows[1]["id"]},  # its own duplicate
        {"id": kept, "duplicate_of": rows[1]["id"], "distance": 70, "exact": False},  # a kept row listed, 70 bits
        *rows[2:],
    ]
    pq.write_table(pa.Table.from_pylist(broken, schema=table.schema), manifest_copy / duplicates.DUPLICATES_FILE)
    found = [str(p) for p in validate(str(manifest_copy), progress=False)]
    assert any("not ok rows of the manifest" in p and rows[0]["id"] in p for p in found), found
    assert any("a duplicate of itself" in p and rows[1]["id"] in p for p in found), found
    assert any("itself a duplicate" in p and rows[0]["id"] not in p for p in found), found
    assert any("0..64 bits" in p and kept in p for p in found), found

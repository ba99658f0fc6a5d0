"""Captions from every source: one that is not text, or not valid Unicode, fails its own row (never the
shard or the job); an overlong one is cut, recorded in the row and counted; a row Arrow cannot store
becomes an error row."""

from __future__ import annotations

import json
import re
import tracemalloc
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import manifests
from manifests.rows import empty_row
from manifests.sink import ManifestSink
from manifests.validate import validate
from pipeline.annotate import main
from pipeline.reader import CaptionError, SourceReader, caption_text, list_inputs
from tests.test_annotate_hostile_inputs import args, rows_by_source, write_image
from tests.test_decode import header_claims

SURROGATE = "a cat \ud800"  # valid JSON ("\ud800"), but no UTF-8 encoder takes it


def json_line(record: dict) -> str:
    return json.dumps(record)  # ensure_ascii: the surrogate is written as the escape \ud800


@pytest.mark.parametrize(("value", "message"), [
    (SURROGATE, "lone surrogate U+D800 at character 6"),
    (["a", "cat"], "the caption is a list, not text"),
    ({"en": "a cat"}, "the caption is an object, not text"),
    (5, "the caption is a int, not text"),
    (True, "the caption is a bool, not text"),
])
def test_a_caption_that_is_not_text_is_refused_naming_where(value, message):
    with pytest.raises(CaptionError, match=f"^meta.jsonl line 3: .*{re.escape(message)}"):
        caption_text(value, "meta.jsonl line 3")
    assert caption_text(None, "x") is None and caption_text(float("nan"), "x") is None
    assert caption_text("un café ☕", "x") == "un café ☕"


def test_metadata_records_with_bad_captions_name_their_line_and_the_rest_are_kept(tmp_path):
    root = tmp_path / "photos"
    for name in ("a", "b", "c", "d", "e", "f"):
        write_image(root / f"{name}.png")
    lines = [json_line({"file_name": "a.png", "text": "a good caption"}),
             json_line({"file_name": "b.png", "text": SURROGATE}),
             json_line({"file_name": "c.png", "text": ["a", "list"]}),
             "",
             json_line({"file_name": "d.png", "text": 42}),
             json_line({"file_name": "e.png", "text": {"nested": "object"}}),
             json_line({"file_name": "f.png", "text": None})]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    items = {i.source: i for i in list_inputs(str(root)).items}
    assert items["a.png"].caption == "a good caption" and items["a.png"].caption_problem is None
    assert items["f.png"].caption == "" and items["f.png"].caption_problem is None
    assert "metadata.jsonl line 2" in items["b.png"].caption_problem and "surrogate" in items["b.png"].caption_problem
    assert items["c.png"].caption_problem == "metadata.jsonl line 3: the caption is a list, not text"
    assert items["d.png"].caption_problem == "metadata.jsonl line 5: the caption is a int, not text"
    assert items["e.png"].caption_problem == "metadata.jsonl line 6: the caption is an object, not text"


def test_bad_captions_from_every_source_fail_their_own_rows_and_the_job_goes_on(tmp_path, local_ray):
    """Sidecars (.json with a surrogate, a list, invalid JSON; .txt with odd bytes) and metadata
    records: each bad one fails its row at the caption stage, naming the file; the other rows of the
    same shards are written, and a rerun keeps every shard (the failures are rows, not shard failures)."""
    root = tmp_path / "photos"
    names = ("good_json", "surrogate_json", "list_json", "broken_json", "null_then_text", "odd_bytes",
             "meta_ok", "meta_surrogate", "meta_list", "meta_number")
    for name in names:
        write_image(root / f"{name}.png")
    (root / "good_json.json").write_text(json.dumps({"caption": "a good caption"}))
    (root / "surrogate_json.json").write_text(json_line({"caption": SURROGATE}))
    (root / "list_json.json").write_text(json.dumps({"caption": ["a", "b"]}))
    (root / "broken_json.json").write_text('{"caption": "cut sh')
    (root / "null_then_text.json").write_text(json.dumps({"caption": None, "text": "from text"}))
    (root / "odd_bytes.txt").write_bytes(b"\x00\x81\xfe bytes \xff\xfe")
    (root / "metadata.jsonl").write_text("\n".join([
        json_line({"file_name": "meta_ok.png", "text": "from metadata"}),
        json_line({"file_name": "meta_surrogate.png", "text": SURROGATE}),
        json_line({"file_name": "meta_list.png", "text": ["a", "b"]}),
        json_line({"file_name": "meta_number.png", "text": 3.5}),
    ]) + "\n")
    write_image(root / "lying_header.png")
    (root / "lying_header.jpg").write_bytes(header_claims((9000, 9000)))  # item 7 in a job: an error row
    out = tmp_path / "out"
    assert main(args(root, out)) == 0
    rows = rows_by_source(out)
    assert len(rows) == len(names) + 2
    status = {source: row["status"] for source, row in rows.items()}
    assert {s for s, v in status.items() if v == "ok"} == {
        "good_json.png", "null_then_text.png", "odd_bytes.png", "meta_ok.png", "lying_header.png"}
    assert rows["good_json.png"]["caption"] == "a good caption"
    assert rows["null_then_text.png"]["caption"] == "from text"
    assert rows["meta_ok.png"]["caption"] == "from metadata"
    error = {source: row["error"] for source, row in rows.items()}
    assert error["surrogate_json.png"].startswith("caption: surrogate_json.json field 'caption': the caption is "
                                                  "not valid Unicode (a lone surrogate U+D800")
    assert error["list_json.png"] == "caption: list_json.json field 'caption': the caption is a list, not text"
    assert error["broken_json.png"].startswith("caption: broken_json.json is not valid JSON")
    assert error["meta_surrogate.png"].startswith("caption: metadata.jsonl line 2: the caption is not valid Unicode")
    assert error["meta_list.png"] == "caption: metadata.jsonl line 3: the caption is a list, not text"
    assert error["meta_number.png"] == "caption: metadata.jsonl line 4: the caption is a float, not text"
    assert error["lying_header.jpg"].startswith("decode: truncated JPEG: its 9000x9000 header needs")
    assert validate(str(out), progress=False) == []
    assert main(args(root, out)) == 0  # nothing failed as a shard: the rerun keeps every one
    assert manifests.read_manifest_json(str(out))["run"]["shards_written"] == 0


def test_bad_captions_in_an_input_list_fail_their_rows(tmp_path, local_ray):
    root = tmp_path / "photos"
    for name in ("a", "b", "c"):
        write_image(root / f"{name}.png")
    listing = tmp_path / "list.parquet"
    pq.write_table(pa.table({"path": ["a.png", "b.png", "c.png"],
                             "caption": pa.array([["x"], None, ["y", "z"]], pa.list_(pa.string()))}), listing)
    out = tmp_path / "out"
    assert main(["--input-list", str(listing), *args(root, out)]) == 0
    rows = rows_by_source(out)
    assert rows["b.png"]["status"] == "ok" and rows["b.png"]["caption"] == ""
    assert rows["a.png"]["error"] == f"caption: --input-list {listing} row 1 caption: the caption is a list, not text"
    assert rows["c.png"]["status"] == "error"


# --- the last line of defence: writing the shard -------------------------------------------------------

def test_a_row_arrow_cannot_store_becomes_an_error_row_not_a_lost_shard(tmp_path):
    """Whatever slips past the caption checks (a plugin's value, a future source) fails its own row."""
    sink = ManifestSink(str(tmp_path / "out"), ["canny"], {"settings": {}, "settings_fingerprint": "f"})
    good = empty_row("id-good", "good.png", ["canny"])
    good.update(caption="fine", caption_source="sidecar")
    bad = empty_row("id-bad", "bad.png", ["canny"])
    bad.update(caption=SURROGATE, caption_source="sidecar")
    stats = sink.write([good, bad], 0, "f")
    assert stats.rows == 2 and stats.counts["error"] == 1 and stats.error_reasons == {"write": 1}
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "part-000000.parquet").to_pylist()}
    assert rows["id-good"]["caption"] == "fine" and rows["id-good"]["status"] == "ok"
    assert rows["id-bad"]["status"] == "error" and rows["id-bad"]["source"] == "bad.png"
    assert rows["id-bad"]["error"].startswith("write: UnicodeEncodeError") and "surrogates not allowed" in rows["id-bad"]["error"]


# --- item 9: an overlong caption is cut, recorded and counted ------------------------------------------

def test_an_overlong_caption_is_cut_recorded_in_its_row_and_counted(tmp_path, local_ray, capsys):
    root = tmp_path / "photos"
    for name in ("log", "meta", "short", "json"):
        write_image(root / f"{name}.png")
    (root / "log.txt").write_text("é line of a log file\n" * 5000)  # 105,000 characters, 2 bytes for é
    (root / "short.txt").write_text("a short caption")
    (root / "json.json").write_text(json.dumps({"caption": "x" * 300}))
    (root / "metadata.jsonl").write_text(json_line({"file_name": "meta.png", "text": "word " * 100}) + "\n")
    out = tmp_path / "out"
    assert main([*args(root, out), "--max-caption-chars", "200"]) == 0
    rows = rows_by_source(out)
    assert all(row["status"] == "ok" for row in rows.values())
    assert rows["log.png"]["caption"] == ("é line of a log file\n" * 10)[:200].rstrip()
    assert rows["log.png"]["caption_original_length"] == 104_999  # measured as the caption is: stripped
    assert rows["json.png"]["caption"] == "x" * 200 and rows["json.png"]["caption_original_length"] == 300
    assert len(rows["meta.png"]["caption"]) <= 200 and rows["meta.png"]["caption_original_length"] == 500
    assert rows["short.png"]["caption"] == "a short caption" and pd.isna(rows["short.png"]["caption_original_length"])
    assert manifests.read_manifest_json(str(out))["captions_truncated"] == 3
    assert "3 captions were longer than --max-caption-chars" in capsys.readouterr().out
    assert validate(str(out), progress=False) == []


def test_a_huge_text_sidecar_is_read_in_bounded_memory_and_counted_exactly(tmp_path):
    sidecar = tmp_path / "a.txt"
    sidecar.write_bytes(("naïve café log line ☕\n" * 1_000_000).encode())  # 22,000,000 characters, ~26 MB
    reader = SourceReader(str(tmp_path))
    tracemalloc.start()
    try:
        caption, encoding, length = reader.read_sidecar_capped("a.txt", 1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert length == 21_999_999 and encoding is None  # the last newline is not part of the caption
    assert caption.startswith("naïve café log line ☕") and len(caption) < 4100
    assert peak < 12 * 2**20, f"peak {peak / 2**20:.1f} MiB: the sidecar was held whole"


def test_a_sidecar_cut_inside_a_character_is_still_read_as_utf8(tmp_path):
    """The bounded read may end in the middle of a multi-byte character: that is not a legacy encoding."""
    for n in range(1, 8):
        (tmp_path / "a.txt").write_text("☕" * (n + 50) + "a" * 40)
        caption, encoding, length = SourceReader(str(tmp_path)).read_sidecar_capped("a.txt", 10 + n)
        assert encoding is None and caption.startswith("☕" * 10) and length == n + 90


@pytest.mark.parametrize(("text", "caption", "length"), [
    ("a cat" + "\n" * 100, "a cat", 5),  # whole: padding after it is not a cut caption
    ("\n" * 100 + "a cat", "a cat", 5),  # whitespace before it does not hide it
    ("  " + "x" * 30 + " \n" * 40, "x" * 11, 30),  # cut: its length without the padding
    ("\ufeff" + "é" * 12 + "\n" * 60, "é" * 11, 12),  # a BOM is not a character of the caption
], ids=["trailing", "leading", "cut", "bom"])
def test_a_padded_sidecar_is_measured_as_a_small_one_is(tmp_path, text, caption, length):
    """A sidecar past the bounded read is measured like one read whole (without leading and trailing
    whitespace), so ``caption_original_length`` is set only when the caption was really cut."""
    (tmp_path / "a.txt").write_bytes(text.encode())
    got, encoding, measured = SourceReader(str(tmp_path)).read_sidecar_capped("a.txt", 10)
    assert (got[:11], measured) == (caption, length) and encoding is None
    whole, _, whole_length = SourceReader(str(tmp_path)).read_sidecar_capped("a.txt", 10_000)
    assert whole_length == measured and whole.startswith(got[:10])


def test_shards_written_before_the_column_still_read_and_validate(tmp_path, local_ray):
    root = tmp_path / "photos"
    for name in ("a", "b", "c"):
        write_image(root / f"{name}.png")
    out = tmp_path / "out"
    assert main(args(root, out)) == 0
    shard = out / "part-000000.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.drop_columns(["caption_original_length"]).replace_schema_metadata(table.schema.metadata),
                   shard)
    frame = manifests.read(str(out), status=None, duplicates="keep")
    assert len(frame) == 3 and frame["caption_original_length"].isna().all()
    assert validate(str(out), progress=False) == []

"""Curation in the job: useless pairs are filtered with their reasons, every caption says where it
came from, and the schema's v1.1 columns are written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

import manifests
from manifests.validate import validate
from pipeline.annotate import main


def square(path: Path, size: tuple[int, int] = (64, 64), value: int = 60) -> Path:
    """An image with a bright square in it (Canny finds its outline)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size[1], size[0], 3), value, np.uint8)
    h, w = size[1], size[0]
    pixels[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255 - value
    Image.fromarray(pixels).save(path)
    return path


def run(root: Path, out: Path, *extra: str) -> dict:
    assert main(["--input", str(root), "--output", str(out), "--resolution", "64", "--shard-size", "4",
                 *extra]) == 0
    return manifests.read_manifest_json(str(out))


def by_source(out: Path) -> dict:
    frame = manifests.read(str(out), status=None, duplicates="keep")
    return {row["source"]: row for _, row in frame.iterrows()}


def test_an_empty_canvas_and_a_banner_are_filtered_with_their_reasons(tmp_path, local_ray):
    root = tmp_path / "photos"
    square(root / "ok.png")
    Image.new("RGB", (64, 64), (200, 200, 200)).save(root / "canvas.png")  # no edge at all
    Image.new("RGB", (10000, 50), (10, 20, 30)).save(root / "banner.png")
    summary = run(root, tmp_path / "out", "-p", "canny.min_coverage=0.005")
    rows = by_source(tmp_path / "out")
    assert rows["ok.png"]["status"] == "ok"
    assert rows["canvas.png"]["status"] == "filtered"
    assert rows["canvas.png"]["error"].startswith("canny: empty map (coverage 0.0000 < min_coverage 0.005)")
    # a hash for ok rows only, read exactly (pandas' float64 for a column with nulls would round 64-bit hashes)
    (stored,) = [r["phash"] for r in pq.read_table(next((tmp_path / "out").glob("part-*.parquet"))).to_pylist()
                 if r["source"] == "ok.png"]
    assert rows["ok.png"]["phash"] == stored and pd.isna(rows["canvas.png"]["phash"])
    assert rows["banner.png"]["status"] == "filtered" and rows["banner.png"]["error"].startswith("max_aspect:")
    assert summary["error_reasons"] == {"canny": 1, "max_aspect": 1}


def test_without_min_coverage_an_empty_map_is_kept(tmp_path, local_ray):
    root = tmp_path / "photos"
    root.mkdir()
    Image.new("RGB", (64, 64), (200, 200, 200)).save(root / "canvas.png")
    run(root, tmp_path / "out")
    assert by_source(tmp_path / "out")["canvas.png"]["status"] == "ok"


def test_min_aspect_filters_portraits_before_decoding(tmp_path, local_ray):
    root = tmp_path / "photos"
    square(root / "landscape.png", (96, 64))
    square(root / "portrait.png", (64, 96))
    run(root, tmp_path / "out", "--min-aspect", "1")
    rows = by_source(tmp_path / "out")
    assert rows["landscape.png"]["status"] == "ok"
    assert rows["portrait.png"]["status"] == "filtered"
    assert rows["portrait.png"]["error"] == "min_aspect: 64x96 is narrower than --min-aspect 1 (width / height)"


@pytest.mark.parametrize(("flags", "says"), [
    (["--min-aspect", "0"], "--min-aspect 0.0"),
    (["--min-aspect", "5"], "at most --max-aspect 4"),
    (["-p", "canny.min_coverage=2"], "canny.min_coverage 2.0"),
    (["-p", "canny.coverage_level=300"], "canny.coverage_level 300"),
])
def test_bad_curation_flags_fail_fast(tmp_path, capsys, flags, says):
    with pytest.raises(SystemExit):
        main(["--input", str(tmp_path), "--output", str(tmp_path / "out"), *flags])
    assert says in capsys.readouterr().err


def test_caption_source_says_where_each_caption_came_from(tmp_path, local_ray):
    root = tmp_path / "photos"
    for name in ("a", "b", "c", "d"):
        square(root / f"{name}.png", value=40 + 30 * ord(name[0]) % 100)
    (root / "a.txt").write_text("a sidecar caption")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "b.png", "text": "a metadata caption"}) + "\n"
                                         + json.dumps({"file_name": "c.png", "text": ""}) + "\n")
    run(root, tmp_path / "out")
    rows = by_source(tmp_path / "out")
    assert {s: (r["caption"], r["caption_source"]) for s, r in rows.items()} == {
        "a.png": ("a sidecar caption", "sidecar"), "b.png": ("a metadata caption", "metadata"),
        "c.png": ("", ""), "d.png": ("", ""),
    }
    listing = tmp_path / "list.csv"
    listing.write_text("path,caption\nd.png,a listed caption\n")
    assert main(["--input", str(root), "--input-list", str(listing), "--output", str(tmp_path / "out2"),
                 "--resolution", "64"]) == 0
    assert by_source(tmp_path / "out2")["d.png"]["caption_source"] == "list"


def test_a_new_manifest_declares_its_minor_version_and_validates(tmp_path, local_ray):
    from manifests.schema import SCHEMA_MINOR

    root = tmp_path / "photos"
    square(root / "a.png")
    summary = run(root, tmp_path / "out")
    assert summary["schema_version"] == 1 and summary["schema_minor"] == SCHEMA_MINOR == 2
    schema = pq.read_schema(next((tmp_path / "out").glob("part-*.parquet")))
    assert {"caption_source", "phash", "caption_original_length"} <= set(schema.names)
    assert validate(str(tmp_path / "out"), progress=False) == []


def test_the_job_lists_exact_and_near_duplicates_in_a_side_table_and_readers_skip_them(tmp_path, local_ray):
    from skimage import data

    root = tmp_path / "photos"
    root.mkdir()
    Image.fromarray(data.astronaut()).save(root / "a_astronaut.png")
    (root / "b_copy.png").write_bytes((root / "a_astronaut.png").read_bytes())  # byte-identical
    Image.fromarray(data.astronaut()).resize((256, 256)).save(root / "c_small.jpg", quality=70)  # near
    Image.fromarray(data.coffee()).save(root / "d_coffee.png")  # another photo
    summary = run(root, tmp_path / "out")
    assert summary["run"]["duplicates"] == {"exact": 1, "near": 1, "max_distance": 4}
    table = pq.read_table(tmp_path / "out" / "_duplicates" / "duplicates.parquet").to_pylist()
    ids = {r["source"]: r["id"] for r in manifests.read(str(tmp_path / "out"), columns=["id", "source"],
                                                         duplicates="keep").to_dict("records")}
    assert {(r["id"], r["duplicate_of"], r["exact"]) for r in table} == {
        (ids["b_copy.png"], ids["a_astronaut.png"], True), (ids["c_small.jpg"], ids["a_astronaut.png"], False)}
    assert sorted(manifests.read(str(tmp_path / "out"))["source"]) == ["a_astronaut.png", "d_coffee.png"]
    assert validate(str(tmp_path / "out"), progress=False) == []


def test_a_rerun_remakes_the_duplicates_table_for_new_shards_and_for_another_distance(tmp_path, local_ray):
    from PIL import ImageEnhance
    from skimage import data

    root = tmp_path / "photos"
    root.mkdir()
    Image.fromarray(data.astronaut()).save(root / "a_astronaut.png")
    Image.fromarray(data.coffee()).save(root / "b_coffee.png")
    out = tmp_path / "out"
    assert run(root, out, "--shard-size", "2")["run"]["duplicates"] == {"exact": 0, "near": 0, "max_distance": 4}
    # a second shard of copies: kept shard 0, new shard 1, and a table that must cover both
    ImageEnhance.Contrast(Image.open(root / "a_astronaut.png")).enhance(1.3).save(root / "c_contrast.png")  # 2 bits
    (root / "z_copy.png").write_bytes((root / "a_astronaut.png").read_bytes())
    summary = run(root, out, "--shard-size", "2")
    assert (summary["run"]["shards_kept"], summary["run"]["shards_written"]) == (1, 1)
    assert summary["run"]["duplicates"] == {"exact": 1, "near": 1, "max_distance": 4}
    assert sorted(manifests.read(str(out))["source"]) == ["a_astronaut.png", "b_coffee.png"]
    # another distance writes no shard, but the table must follow it
    summary = run(root, out, "--shard-size", "2", "--near-duplicate-distance", "1")
    assert summary["run"]["shards_written"] == 0
    assert summary["run"]["duplicates"] == {"exact": 1, "near": 0, "max_distance": 1}
    assert sorted(manifests.read(str(out))["source"]) == ["a_astronaut.png", "b_coffee.png", "c_contrast.png"]
    assert validate(str(out), progress=False) == []


COLOUR = "tests.plugins:ColourCaptioner"


@pytest.mark.parametrize(("first", "changed"), [
    ([], ["--min-aspect", "0.5"]), ([], ["-p", "canny.min_coverage=0.01"]), ([], ["--captioner", COLOUR]),
    (["--captioner", COLOUR], ["--captioner", COLOUR, "--caption-policy", "always"]),
    (["--captioner", COLOUR], ["--captioner", COLOUR, "-p", f"{COLOUR}.max_new_tokens=5"]),
])
def test_a_rerun_with_another_curation_setting_is_refused(tmp_path, local_ray, capsys, first, changed):
    root = tmp_path / "photos"
    square(root / "a.png")
    run(root, tmp_path / "out", *first)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "out").iterdir())
    assert main(["--input", str(root), "--output", str(tmp_path / "out"), "--resolution", "64", "--shard-size", "4",
                 *changed]) == 2
    assert "other settings" in capsys.readouterr().err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "out").iterdir()) == before

"""Nothing lost, nothing false: refused reruns change nothing; one odd image never fails its shard."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import manifests
from pipeline.annotate import main


def snapshot(folder) -> dict[str, bytes]:
    """Every file of a folder by name, with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def args(collection, out, *extra) -> list[str]:
    return ["--input", str(collection), "--output", str(out), "--shard-size", "8", *extra]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--resolution", "256"], "written with other settings"),
        (["-p", "canny.low=10"], "written with other settings"),
        (["--limit", "4"], "holds 20 rows and this run would keep 4 (--limit 4)"),
    ],
)
def test_a_refused_rerun_changes_nothing(manifest_copy, demo_collection, local_ray, capsys, extra, message):
    before = snapshot(manifest_copy)
    assert main(args(demo_collection, manifest_copy, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "nothing was changed" in err and "--overwrite" in err
    assert snapshot(manifest_copy) == before  # _manifest.json included


def test_limit_with_overwrite_rewrites_with_fewer_rows(manifest_copy, demo_collection, local_ray):
    assert main(args(demo_collection, manifest_copy, "--limit", "4", "--overwrite")) == 0
    assert manifests.read_manifest_json(str(manifest_copy))["counts"]["rows"] == 4
    assert sorted(p.name for p in manifest_copy.glob("part-*")) == ["part-000000.parquet"]


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_files_of_others_in_the_output_are_refused_untouched(tmp_path, demo_collection, local_ray, capsys, overwrite):
    out = tmp_path / "shared"
    out.mkdir()
    pq.write_table(pa.table({"x": [1, 2, 3]}), out / "part-000000.parquet")  # someone else's shard
    (out / "notes.txt").write_text("keep me")
    before = snapshot(out)
    assert main(args(demo_collection / "scenes", out, *overwrite)) == 2
    err = capsys.readouterr().err
    assert "files this project did not write (notes.txt, part-000000.parquet)" in err
    assert snapshot(out) == before


def banner_collection(tmp_path):
    """Three ordinary images and a 20000x16 banner."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (80, 64), (40 * i, 100, 200)).save(folder / f"ok{i}.png")
    Image.new("RGB", (20000, 16), (250, 20, 20)).save(folder / "banner.png")
    return folder


def test_a_banner_is_filtered_by_aspect_and_its_shard_keeps_every_other_row(tmp_path, local_ray):
    folder = banner_collection(tmp_path)
    out = tmp_path / "m"
    assert main(["--input", str(folder), "--output", str(out), "--resolution", "64"]) == 0
    frame = manifests.read(str(out), status=None, duplicates="keep").set_index("source")
    assert frame.loc["banner.png", "status"] == "filtered"
    assert frame.loc["banner.png", "error"] == "max_aspect: 20000x16 is longer than --max-aspect 4 to 1"
    assert (frame.drop("banner.png")["status"] == "ok").all()


def test_an_image_that_cannot_be_encoded_fails_its_row_not_its_shard(tmp_path, local_ray):
    """Allowed by --max-aspect, a banner prepared at 80000x64 px is past JPEG's limit: its row says so."""
    folder = banner_collection(tmp_path)
    out = tmp_path / "m"
    assert main(["--input", str(folder), "--output", str(out), "--resolution", "64", "--max-aspect", "5000"]) == 0
    frame = manifests.read(str(out), status=None, duplicates="keep").set_index("source")
    assert frame.loc["banner.png", "status"] == "error"
    assert frame.loc["banner.png", "error"].startswith("encode: ")
    assert (frame.loc["banner.png", "orig_width"], frame.loc["banner.png", "orig_height"]) == (20000, 16)
    ok = frame.drop("banner.png")
    assert (ok["status"] == "ok").all() and ok["cond_canny"].notna().all()
    image = np.asarray(Image.open(__import__("io").BytesIO(ok.iloc[0]["image"]["bytes"])))
    assert image.shape == (64, 80, 3)


def test_an_output_that_is_a_file_or_unwritable_fails_before_any_work(tmp_path, demo_collection, capsys):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    assert main(args(demo_collection / "scenes", taken)) == 2
    assert f"--output {taken} is a file" in capsys.readouterr().err
    assert main(args(demo_collection / "scenes", "/proc/controlforge-manifest")) == 2
    assert "--output /proc/controlforge-manifest is not writable" in capsys.readouterr().err


def test_an_input_without_images_says_so_before_ray(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "notes.md").write_text("no pictures here")
    assert main(args(folder, tmp_path / "out")) == 2
    assert f"no images found under {folder} (1 other files)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

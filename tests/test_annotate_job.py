"""The Ray annotation job end to end: one row per file, aligned maps, resume, HF/pandas reads."""

from __future__ import annotations

import glob
import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import manifests
from manifests.schema import shard_name
from pipeline.annotate import ResumeConflict, main, parse_args, run
from pipeline.config import AnnotateConfig


def decode(cell: dict) -> Image.Image:
    return Image.open(io.BytesIO(cell["bytes"]))


def test_every_input_file_is_one_row(demo_manifest):
    frame = manifests.read(str(demo_manifest), status=None, duplicates="keep").set_index("source")
    assert len(frame) == 20 and frame["id"].is_unique
    errors = frame[frame["status"] == "error"]
    assert sorted(errors.index) == ["edge_cases/not_an_image.png", "edge_cases/truncated.jpg"]
    assert errors["error"].str.startswith("decode: ").all()
    assert errors["image"].isna().all()
    assert (frame.loc[frame["status"] == "ok", "error"].isna()).all()
    summary = manifests.read_manifest_json(str(demo_manifest))
    assert summary["counts"] == {"rows": 20, "ok": 18, "error": 2, "filtered": 0}
    assert summary["input"]["ignored_files"] == 1  # notes.md


def test_maps_align_with_images(demo_manifest):
    frame = manifests.read(str(demo_manifest), duplicates="keep")
    for _, row in frame.iterrows():
        image, cond = decode(row["image"]), decode(row["cond_canny"])
        assert image.size == cond.size == (row["width"], row["height"])
        assert row["width"] % 8 == 0 and row["height"] % 8 == 0
        assert min(row["width"], row["height"]) == 512
        edges = np.asarray(cond)
        assert edges.ndim == 2 and set(np.unique(edges)) <= {0, 255}


def test_edge_cases_are_prepared_upright_and_with_captions(demo_manifest):
    frame = manifests.read(str(demo_manifest), duplicates="keep").set_index("source")
    rotated = frame.loc["edge_cases/rotated_exif.jpg"]
    assert rotated["height"] > rotated["width"]  # stored landscape, EXIF says portrait
    assert (rotated["orig_width"], rotated["orig_height"]) == (240, 320)
    assert frame.loc["photos/astronaut.jpg", "caption"].startswith("an astronaut")
    assert frame.loc["photos/coffee.jpg", "caption"] == "a cup of coffee on a saucer on a wooden table"  # .json
    assert frame.loc["scenes/scene_00.png", "caption"].endswith("on a gradient background")  # metadata.jsonl
    assert frame.loc["edge_cases/cmyk.jpg", "caption"] == ""
    assert len(frame.loc["photos/astronaut.jpg", "source_sha256"]) == 64


def test_resume_after_losing_a_shard_gives_identical_rows(manifest_copy, demo_collection, local_ray):
    before = manifests.read(str(manifest_copy), status=None, duplicates="keep")
    (manifest_copy / shard_name(1)).unlink()
    summary = run(AnnotateConfig(input=str(demo_collection), output=str(manifest_copy), shard_size=8))
    assert (summary["run"]["shards_written"], summary["run"]["shards_kept"]) == (1, 2)
    pd.testing.assert_frame_equal(manifests.read(str(manifest_copy), status=None, duplicates="keep"), before)


def test_rerun_keeps_complete_shards_and_overwrite_redoes_them(manifest_copy, demo_collection, local_ray):
    config = AnnotateConfig(input=str(demo_collection), output=str(manifest_copy), shard_size=8)
    assert run(config)["run"]["shards_written"] == 0
    config.overwrite = True
    assert run(config)["run"]["shards_written"] == 3


def test_other_settings_on_the_same_output_stop_before_work(manifest_copy, demo_collection, local_ray):
    config = AnnotateConfig(input=str(demo_collection), output=str(manifest_copy), shard_size=8, resolution=256)
    with pytest.raises(ResumeConflict, match="--overwrite"):
        run(config)


def test_datasets_loads_images_as_pil(demo_manifest):
    import datasets

    ds = datasets.load_dataset("parquet", data_files=glob.glob(f"{demo_manifest}/*.parquet"), split="train")
    ok = ds.filter(lambda r: r["status"] == "ok")
    row = ok[0]
    assert isinstance(row["image"], Image.Image) and isinstance(row["cond_canny"], Image.Image)
    assert row["image"].size == row["cond_canny"].size == (row["width"], row["height"])
    assert len(ds) == 20


def test_pandas_reads_the_folder(demo_manifest):
    frame = pd.read_parquet(demo_manifest)
    assert len(frame) == 20
    assert {"id", "source", "caption", "image", "cond_canny", "status", "error"} <= set(frame.columns)


def test_an_annotator_failing_on_one_image_marks_only_that_row(tmp_path, local_ray):
    src = tmp_path / "in"
    src.mkdir()
    for i, width in enumerate((512, 520, 528, 552)):  # 520 and 552 are not multiples of 16
        Image.new("RGB", (width, 512), (i * 40, 90, 200)).save(src / f"img{i}.png")
    out = tmp_path / "out"
    run(AnnotateConfig(input=str(src), output=str(out), annotators=("canny", "tests.plugins:FailsOnSomeAnnotator"),
                       batch_size=4))
    frame = manifests.read(str(out), status=None, duplicates="keep").set_index("source")
    assert frame["status"].to_dict() == {"img0.png": "ok", "img1.png": "error", "img2.png": "ok", "img3.png": "error"}
    assert frame.loc["img1.png", "error"] == "annotate[flaky]: cannot handle width 520"
    assert frame.loc["img2.png", "cond_flaky"] is not None and frame.loc["img2.png", "cond_canny"] is not None
    columns = json.loads((out / "_manifest.json").read_text())["columns"]
    assert columns == ["image", "cond_canny", "cond_flaky"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--resolution", "500"], "multiple of 8"),
        (["--annotators", "sobel"], "unknown annotator 'sobel'; known: canny"),
        (["--param", "canny.low=x"], "canny.low: cannot read 'x' as int"),
        (["--param", "canny"], "NAME.KEY=VALUE"),
        (["--param", "hed.x=1"], "not in --annotators"),
        (["--image-format", "gif"], "--image-format"),
    ],
)
def test_bad_flags_fail_fast_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--input", "x", "--output", "y", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_input_exits_with_a_message(tmp_path, capsys, local_ray):
    assert main(["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def edge_f1(found: np.ndarray, truth: np.ndarray, tolerance: int = 2) -> float:
    """F1 of two binary edge maps, a pixel counting as matched within ``tolerance`` pixels."""
    import cv2

    kernel = np.ones((2 * tolerance + 1, 2 * tolerance + 1), np.uint8)
    found, truth = found > 0, truth > 0
    if not found.any() or not truth.any():
        return float(found.any() == truth.any())
    precision = (found & (cv2.dilate(truth.astype(np.uint8), kernel) > 0)).sum() / found.sum()
    recall = (truth & (cv2.dilate(found.astype(np.uint8), kernel) > 0)).sum() / truth.sum()
    return float(2 * precision * recall / max(precision + recall, 1e-9))


def test_maps_lie_on_the_edges_of_their_own_images(demo_manifest):
    """Canny of each stored (JPEG) image finds the stored map's edges; mirrored, it does not."""
    import cv2

    frame = manifests.read(str(demo_manifest), duplicates="keep").set_index("source")
    for source in ("photos/astronaut.jpg", "photos/chelsea.jpg", "photos/rocket.jpg", "photos/camera.jpg"):
        image = np.asarray(decode(frame.loc[source, "image"]).convert("RGB"))
        stored = np.asarray(decode(frame.loc[source, "cond_canny"]))
        own = edge_f1(cv2.Canny(image, 100, 200), stored)
        mirrored = edge_f1(cv2.Canny(image[:, ::-1].copy(), 100, 200), stored)
        flipped = edge_f1(cv2.Canny(image[::-1].copy(), 100, 200), stored)
        assert own > 0.8 and own > max(mirrored, flipped) + 0.3, (source, own, mirrored, flipped)


def test_rerun_with_other_annotator_parameters_is_refused_not_mixed(manifest_copy, demo_collection, local_ray, capsys):
    """Parameters are part of the settings: keeping low=100 rows under a low=10 summary would lie."""
    shards = {p.name: p.read_bytes() for p in manifest_copy.glob("part-*.parquet")}
    code = main(["--input", str(demo_collection), "--output", str(manifest_copy), "--shard-size", "8",
                 "-p", "canny.low=10"])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in manifest_copy.glob("part-*.parquet")} == shards  # untouched
    assert main(["--input", str(demo_collection), "--output", str(manifest_copy), "--shard-size", "8",
                 "-p", "canny.low=10", "--overwrite"]) == 0
    after = manifests.read_manifest_json(str(manifest_copy))
    assert after["annotators"][0]["params"]["low"] == 10
    frame = manifests.read(str(manifest_copy), duplicates="keep").set_index("source")
    edges = np.asarray(decode(frame.loc["photos/astronaut.jpg", "cond_canny"]))
    image = np.asarray(decode(frame.loc["photos/astronaut.jpg", "image"]).convert("RGB"))
    import cv2

    assert edge_f1(cv2.Canny(image, 10, 200), edges) > edge_f1(cv2.Canny(image, 100, 200), edges)

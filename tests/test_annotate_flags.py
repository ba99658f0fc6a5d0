"""What the README promises of the annotation flags, checked by content through the CLI."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

import manifests
from pipeline.annotate import main
from pipeline.reader import list_inputs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def decoded(cell: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(cell["bytes"])))


def marked_image(width: int, height: int, seed: int) -> np.ndarray:
    """Noise-free drawing with an off-centre marker: a white square in the top-left quarter and a
    black bar in the bottom-right, so any mirror, flip or transpose moves them."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.uint8)
    image[:] = rng.integers(60, 200, 3)
    cv2.rectangle(image, (width // 10, height // 10), (width // 3, height // 3), (255, 255, 255), -1)
    cv2.rectangle(image, (width * 2 // 3, height * 3 // 4), (width - width // 20, height - height // 10),
                  (0, 0, 0), -1)
    return image


@pytest.fixture(scope="module")
def marked_collection(tmp_path_factory):
    """Eight drawn images of several sizes and aspect ratios, as PNG files, plus their arrays."""
    folder = tmp_path_factory.mktemp("marked")
    sizes = [(320, 240), (240, 320), (400, 200), (256, 256), (300, 300), (640, 480), (200, 500), (96, 64)]
    arrays = {}
    for i, (w, h) in enumerate(sizes):
        arrays[f"img{i}.png"] = marked_image(w, h, i)
        Image.fromarray(arrays[f"img{i}.png"]).save(folder / f"img{i}.png")
    return folder, arrays


def annotate(collection, out, *flags) -> int:
    return main(["--input", str(collection), "--output", str(out), "--shard-size", "3", *flags])


def test_png_images_are_exactly_what_the_annotators_saw(marked_collection, tmp_path, local_ray):
    """With --image-format png the stored image is lossless, so Canny of it must equal the map:
    any flip, shift or resize between annotating and storing breaks equality."""
    folder, arrays = marked_collection
    out = tmp_path / "m"
    assert annotate(folder, out, "--image-format", "png", "--resolution", "128") == 0
    frame = manifests.read(str(out), duplicates="keep").set_index("source")
    assert len(frame) == len(arrays)
    for source, row in frame.iterrows():
        assert row["image"]["bytes"].startswith(PNG_SIGNATURE)
        image = decoded(row["image"])
        assert np.array_equal(cv2.Canny(image, 100, 200), decoded(row["cond_canny"])), source
        assert_same_layout(arrays[source], image, source)


def assert_same_layout(raw: np.ndarray, prepared: np.ndarray, source: str) -> None:
    """The prepared image shows the raw one's content where it was (no mirror, no transpose)."""
    height, width = prepared.shape[:2]
    expected = cv2.resize(raw, (width, height), interpolation=cv2.INTER_AREA)
    # a centre crop may cut a few pixels off the longer side: compare the shared middle
    raw_h, raw_w = raw.shape[:2]
    scale = max(width / raw_w, height / raw_h)
    if abs(raw_w * scale - width) > 2 or abs(raw_h * scale - height) > 2:
        return  # cropped to another aspect ratio: covered by the crop test
    diff = np.abs(expected.astype(int) - prepared.astype(int)).mean()
    mirrored = np.abs(expected[:, ::-1].astype(int) - prepared.astype(int)).mean()
    assert diff < 12 and mirrored > diff + 10, (source, diff, mirrored)


def test_jpeg_quality_trades_bytes_for_fidelity(marked_collection, tmp_path, local_ray):
    """Lower --jpeg-quality: fewer bytes, further from the lossless (PNG) prepared image."""
    folder, _ = marked_collection
    images = {}
    for name, flags in {"png": ["--image-format", "png"], "q20": ["--jpeg-quality", "20"],
                        "q95": ["--jpeg-quality", "95"]}.items():
        out = tmp_path / name
        assert annotate(folder, out, "--resolution", "128", *flags) == 0
        images[name] = manifests.read(str(out), columns=["image"], duplicates="keep")["image"].tolist()
    assert all(cell["bytes"][:2] == b"\xff\xd8" for cell in images["q20"] + images["q95"])  # JPEG
    size = {q: sum(len(cell["bytes"]) for cell in images[q]) for q in ("q20", "q95")}
    assert size["q20"] < 0.7 * size["q95"]
    error = {q: np.mean([np.abs(decoded(a).astype(int) - decoded(b).astype(int)).mean()
                         for a, b in zip(images[q], images["png"])]) for q in ("q20", "q95")}
    assert error["q95"] < 1.5 < error["q20"], error


def test_limit_takes_the_first_files_of_the_sorted_input(marked_collection, tmp_path, local_ray):
    folder, _ = marked_collection
    out = tmp_path / "m"
    assert annotate(folder, out, "--limit", "4", "--resolution", "64") == 0
    frame = manifests.read(str(out), status=None, duplicates="keep")
    first = [item.source for item in list_inputs(str(folder)).items[:4]]
    assert frame["source"].tolist() == first
    assert manifests.read_manifest_json(str(out))["counts"]["rows"] == 4


def test_center_crop_min_side_and_max_pixels(marked_collection, tmp_path, local_ray):
    """Square crops of the centre; images with a side under --min-side filtered; images over
    --max-pixels errors; each with its reason."""
    folder, arrays = marked_collection
    out = tmp_path / "m"
    assert annotate(folder, out, "--center-crop", "--resolution", "64", "--min-side", "100",
                    "--max-pixels", str(500 * 500)) == 0
    frame = manifests.read(str(out), status=None, duplicates="keep").set_index("source")
    assert frame.loc["img7.png", "status"] == "filtered"  # 96x64
    assert frame.loc["img7.png", "error"] == "min_side: 96x64 is below --min-side 100"
    assert frame.loc["img5.png", "status"] == "error"  # 640x480
    assert frame.loc["img5.png", "error"].startswith("decode: 640x480 pixels exceeds --max-pixels")
    ok = frame[frame["status"] == "ok"]
    assert len(ok) == 6 and (ok["width"] == 64).all() and (ok["height"] == 64).all()
    # img2 is 400x200: the square is its middle 200x200, so the top-left marker (x 40..133) is cut
    # at its left and the bar (x 266..380) at its right edge
    image = decoded(ok.loc["img2.png", "image"])
    middle = cv2.resize(arrays["img2.png"][:, 100:300], (64, 64), interpolation=cv2.INTER_AREA)
    assert np.abs(image.astype(int) - middle.astype(int)).mean() < 12


def test_float_tiff_images_become_ok_rows(tmp_path, local_ray):
    """Mode F (32-bit float) images, as scientific cameras write them, are scaled to 0..255."""
    folder = tmp_path / "in"
    folder.mkdir()
    ramp = np.tile(np.linspace(-3.5, 12.0, 96, dtype=np.float32), (64, 1))
    Image.fromarray(ramp, mode="F").save(folder / "ramp.tif")
    out = tmp_path / "m"
    assert annotate(folder, out, "--resolution", "64", "--image-format", "png") == 0
    (row,) = manifests.read(str(out), status=None, duplicates="keep").to_dict("records")
    assert row["status"] == "ok"
    grey = decoded(row["image"])[:, :, 0].astype(int)
    assert grey[:, 0].mean() < 10 and grey[:, -1].mean() > 245  # full range used
    assert (np.diff(grey.mean(axis=0)) >= -1).all()  # left to right, darker to brighter


def test_fsspec_input_and_output_beyond_file_urls(marked_collection, tmp_path, local_ray):
    """A URI scheme pyarrow does not know goes through fsspec, in the driver and in every worker."""
    folder, arrays = marked_collection
    out = tmp_path / "m"
    assert main(["--input", f"local://{folder}", "--output", f"local://{out}", "--resolution", "64",
                 "--shard-size", "4"]) == 0
    frame = manifests.read(f"local://{out}", status=None, duplicates="keep")
    assert sorted(frame["source"]) == sorted(arrays) and (frame["status"] == "ok").all()
    assert sorted(p.name for p in out.glob("part-*.parquet")) == ["part-000000.parquet", "part-000001.parquet"]


def test_in_memory_fsspec_collection_annotates_in_process(marked_collection):
    """An fsspec memory filesystem (one process: no Ray) is listed, read and written like a folder."""
    import fsspec

    from pipeline.annotate import make_job
    from pipeline.config import AnnotateConfig
    from pipeline.plan import plan_shards
    from pipeline.reader import ListingStats, iter_inputs
    from pipeline.shard import ShardWorker

    folder, arrays = marked_collection
    memory = fsspec.filesystem("memory")
    for name in sorted(arrays)[:3]:
        memory.pipe(f"/collection/sub/{name}", (folder / name).read_bytes())
    memory.pipe("/collection/sub/img0.txt", b"a drawn square and a bar\n")
    config = AnnotateConfig(input="memory://collection", output="memory://manifest", resolution=64)
    listing = list_inputs(config.input)
    assert [i.source for i in listing.items] == ["sub/img0.png", "sub/img1.png", "sub/img2.png"]
    job = make_job(config)
    plan = plan_shards(iter_inputs(config.input, ListingStats()), 8, "fp", lambda i, fp: False, "memory://plans")
    assert plan.kept == [] and len(plan.todo) == 1 and plan.rows == 3
    stats = ShardWorker(job)(plan.todo[0])  # the three stages in this process
    assert stats.counts["ok"] == 3 and stats.rows == 3
    assert memory.exists("/manifest/_stats/part-000000.json")
    assert memory.exists("/manifest/part-000000.parquet")
    import pyarrow.parquet as pq

    with memory.open("/manifest/part-000000.parquet", "rb") as f:
        table = pq.read_table(f)
    assert table["caption"].to_pylist()[0] == "a drawn square and a bar"
    for folder in ("/collection", "/manifest", "/plans"):
        memory.rm(folder, recursive=True)

"""The Ray job with model annotators: actor pools, several columns in one manifest, detection."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import manifests
from manifests.validate import validate
from pipeline.annotate import main, run
from pipeline.config import AnnotateConfig


@pytest.fixture(scope="module")
def people_collection(tmp_path_factory):
    """Four real photos: a person (astronaut) and three without (coffee, cat, rocket)."""
    from skimage import data

    folder = tmp_path_factory.mktemp("people")
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.jpg", quality=95)
    return folder


def decoded(cell) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(cell["bytes"])))


def test_canny_hed_and_pose_make_one_aligned_manifest(people_collection, weights_dir, tmp_path, local_ray):
    out = tmp_path / "m"
    summary = run(AnnotateConfig(
        input=str(people_collection), output=str(out), annotators=("canny", "hed", "mediapipe_pose"),
        weights_dir=str(weights_dir), shard_size=2, batch_size=2,
    ))
    assert summary["columns"] == ["image", "cond_canny", "cond_hed", "cond_mediapipe_pose"]
    assert summary["counts"]["ok"] == 4
    frame = manifests.read(str(out)).set_index("source")
    for _, row in frame.iterrows():
        size = (row["height"], row["width"])
        for col in ("image", "cond_canny", "cond_hed", "cond_mediapipe_pose"):
            assert decoded(row[col]).shape[:2] == size
    assert decoded(frame.loc["astronaut.jpg", "cond_mediapipe_pose"]).any()
    assert not decoded(frame.loc["coffee.jpg", "cond_mediapipe_pose"]).any()
    hashes = {a["name"]: a["weights"] for a in summary["annotators"]}
    assert set(hashes["hed"]) == {"ControlNetHED.pth"}
    assert validate(str(out), progress=False) == []


def test_require_detection_filters_images_without_a_person(people_collection, tmp_path, local_ray):
    out = tmp_path / "m"
    run(AnnotateConfig(input=str(people_collection), output=str(out), annotators=("mediapipe_pose",),
                       require_detection=True, resolution=256))
    frame = manifests.read(str(out), status=None).set_index("source")
    assert frame.loc["astronaut.jpg", "status"] == "ok"
    for name in ("coffee.jpg", "rocket.jpg"):
        assert frame.loc[name, "status"] == "filtered"
        assert frame.loc[name, "error"] == "mediapipe_pose: no person"
    assert validate(str(out), progress=False) == []


def test_all_weight_annotators_with_a_weights_folder(people_collection, weights_dir, tmp_path, local_ray):
    out = tmp_path / "m"
    code = main(["--input", str(people_collection), "--output", str(out), "--resolution", "128",
                 "--annotators", "hed,depth,openpose,segmentation", "--weights-dir", str(weights_dir),
                 "-p", "depth.detect_resolution=128", "--concurrency", "1", "--cpus-per-worker", "2"])
    assert code == 0
    assert validate(str(out), progress=False) == []
    frame = manifests.read(str(out))
    assert len(frame) == 4
    assert {"cond_hed", "cond_depth", "cond_openpose", "cond_segmentation"} <= set(frame.columns)
    assert decoded(frame.iloc[0]["cond_segmentation"]).shape[2] == 3


def test_missing_weights_stop_before_any_work(people_collection, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CONTROLFORGE_WEIGHTS", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["--input", str(people_collection), "--output", str(tmp_path / "m"),
                 "--annotators", "canny,depth", "--weights-dir", str(empty)])
    assert code == 2
    err = capsys.readouterr().err
    assert "dpt_hybrid-midas-501f0c75.pt" in err and str(empty) in err and "huggingface.co/lllyasviel/Annotators" in err
    assert not (tmp_path / "m").exists()

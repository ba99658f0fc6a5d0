"""The Ray job with model annotators: actor pools, several columns in one manifest, detection,
weight provenance in every shard."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import manifests
from annotators.base import sha256_file
from manifests.io import list_shards, read_manifest_json, shard_provenance
from manifests.validate import validate
from pipeline.annotate import main, run
from pipeline.config import AnnotateConfig

pytestmark = pytest.mark.slow  # actor pools loading model weights
from tests.fake_weights import draw_puppet


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


@pytest.fixture(scope="module")
def canny_hed_pose_manifest(people_collection, weights_dir, tmp_path_factory, local_ray):
    """The people photos with canny, hed and mediapipe_pose, two images per shard."""
    out = tmp_path_factory.mktemp("canny_hed_pose") / "m"
    summary = run(AnnotateConfig(
        input=str(people_collection), output=str(out), annotators=("canny", "hed", "mediapipe_pose"),
        weights_dir=str(weights_dir), shard_size=2, batch_size=2,
    ))
    return out, summary


def test_canny_hed_and_pose_make_one_aligned_manifest(canny_hed_pose_manifest):
    out, summary = canny_hed_pose_manifest
    assert summary["columns"] == ["image", "cond_canny", "cond_hed", "cond_mediapipe_pose"]
    assert summary["counts"]["ok"] == 4
    frame = manifests.read(str(out), duplicates="keep").set_index("source")
    for _, row in frame.iterrows():
        size = (row["height"], row["width"])
        for col in ("image", "cond_canny", "cond_hed", "cond_mediapipe_pose"):
            assert decoded(row[col]).shape[:2] == size
    assert decoded(frame.loc["astronaut.jpg", "cond_mediapipe_pose"]).any()
    assert not decoded(frame.loc["coffee.jpg", "cond_mediapipe_pose"]).any()
    hashes = {a["name"]: a["weights"] for a in summary["annotators"]}
    assert set(hashes["hed"]) == {"ControlNetHED.pth"}
    assert validate(str(out), progress=False) == []


def weight_hashes(provenance: dict) -> dict[str, dict[str, str]]:
    return {a["name"]: a["weights"] for a in provenance["annotators"]}


def test_every_shard_records_the_sha256_of_the_weight_files(canny_hed_pose_manifest, weights_dir):
    out, _ = canny_hed_pose_manifest
    expected = {"canny": {}, "hed": {"ControlNetHED.pth": sha256_file(str(weights_dir / "ControlNetHED.pth"))},
                "mediapipe_pose": {}}  # MediaPipe's models ship inside its wheel: no files to hash
    shards = list_shards(str(out))
    assert len(shards) == 2
    for shard in shards:
        assert weight_hashes(shard_provenance(shard)) == expected, shard
    assert weight_hashes(read_manifest_json(str(out))) == expected


def test_require_detection_filters_images_without_a_person(people_collection, tmp_path, local_ray):
    out = tmp_path / "m"
    run(AnnotateConfig(input=str(people_collection), output=str(out), annotators=("mediapipe_pose",),
                       require_detection=True, resolution=256))
    frame = manifests.read(str(out), status=None, duplicates="keep").set_index("source")
    assert frame.loc["astronaut.jpg", "status"] == "ok"
    for name in ("coffee.jpg", "rocket.jpg"):
        assert frame.loc[name, "status"] == "filtered"
        assert frame.loc[name, "error"] == "mediapipe_pose: no person"
    assert validate(str(out), progress=False) == []


@pytest.fixture(scope="module")
def face_and_body_collection(tmp_path_factory) -> Path:
    """The astronaut (face and body), her torso cropped below the face, and a rocket (no one)."""
    from skimage import data

    folder = tmp_path_factory.mktemp("faces")
    astronaut = data.astronaut()
    Image.fromarray(astronaut).save(folder / "astronaut.jpg", quality=95)
    Image.fromarray(astronaut[260:]).save(folder / "torso.jpg", quality=95)
    Image.fromarray(data.rocket()).save(folder / "rocket.jpg", quality=95)
    return folder


def test_require_detection_filters_images_without_a_face_or_a_person(face_and_body_collection, tmp_path, local_ray):
    out = tmp_path / "m"
    code = main(["--input", str(face_and_body_collection), "--output", str(out), "--resolution", "384",
                 "--annotators", "person_mask,mediapipe_face", "--require-detection"])
    assert code == 0
    frame = manifests.read(str(out), status=None, duplicates="keep").set_index("source")
    assert frame.loc["astronaut.jpg", "status"] == "ok" and pd.isna(frame.loc["astronaut.jpg", "error"])
    assert decoded(frame.loc["astronaut.jpg", "cond_mediapipe_face"]).any()
    assert decoded(frame.loc["astronaut.jpg", "cond_person_mask"]).any()
    # annotators run in the order given; the first that finds nothing names the reason
    assert tuple(frame.loc["torso.jpg", ["status", "error"]]) == ("filtered", "mediapipe_face: no face")
    assert tuple(frame.loc["rocket.jpg", ["status", "error"]]) == ("filtered", "person_mask: no person")
    assert validate(str(out), progress=False) == []


@pytest.fixture(scope="module")
def puppet_collection(people_collection, tmp_path_factory) -> Path:
    """The people photos plus one with the fake OpenPose model's puppet drawn on it."""
    folder = tmp_path_factory.mktemp("puppet")
    for photo in people_collection.iterdir():
        (folder / photo.name).write_bytes(photo.read_bytes())
    coffee = np.asarray(Image.open(people_collection / "coffee.jpg"))
    Image.fromarray(draw_puppet(coffee, neck=(300, 150), unit=60)).save(folder / "puppet.png")
    return folder


@pytest.fixture(scope="module")
def all_weights_manifest(puppet_collection, weights_dir, tmp_path_factory, local_ray) -> Path:
    """Every weight-loading annotator through the CLI, in an actor pool, two images per shard."""
    out = tmp_path_factory.mktemp("all_weights") / "m"
    code = main(["--input", str(puppet_collection), "--output", str(out), "--resolution", "128",
                 "--annotators", "hed,depth,openpose,segmentation", "--weights-dir", str(weights_dir),
                 "-p", "depth.detect_resolution=128", "--concurrency", "1", "--cpus-per-worker", "2",
                 "--shard-size", "2"])
    assert code == 0
    return out


def test_all_weight_annotators_with_a_weights_folder(all_weights_manifest):
    assert validate(str(all_weights_manifest), progress=False) == []
    frame = manifests.read(str(all_weights_manifest), duplicates="keep").set_index("source")
    assert len(frame) == 5
    assert {"cond_hed", "cond_depth", "cond_openpose", "cond_segmentation"} <= set(frame.columns)
    assert decoded(frame.iloc[0]["cond_segmentation"]).shape[2] == 3
    assert decoded(frame.loc["puppet.png", "cond_openpose"]).any()  # the skeleton survives the job
    assert not decoded(frame.loc["coffee.jpg", "cond_openpose"]).any()
    for depth in frame["cond_depth"]:
        assert decoded(depth).std() > 10  # a depth map, not a flat level


def test_every_shard_records_the_sha256_of_every_model_file(all_weights_manifest, weights_dir):
    expected = {
        "hed": ["ControlNetHED.pth"],
        "depth": ["dpt_hybrid-midas-501f0c75.pt"],
        "openpose": ["body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"],
        "segmentation": ["model.safetensors"],  # a transformers folder: names relative to it
    }
    folders = {"segmentation": weights_dir / "upernet-convnext-small"}
    shards = list_shards(str(all_weights_manifest))
    assert len(shards) == 3
    for shard in shards:
        recorded = weight_hashes(shard_provenance(shard))
        for name, files in expected.items():
            folder = folders.get(name, weights_dir)
            assert recorded[name] == {f: sha256_file(str(folder / f)) for f in files}, (shard, name)


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

"""Captioners in the job: which rows they caption under each policy, where each caption came from,
failures as rows, and missing weights before any work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import manifests
from manifests.validate import validate
from pipeline.annotate import main
from tests.tiny_captioners import write_tiny_blip

COLOUR = "tests.plugins:ColourCaptioner"


def collection(root: Path) -> Path:
    """Three images: one with a sidecar caption, one magenta (the colour captioner fails on it), one plain."""
    root.mkdir(parents=True)
    for name, colour in (("a", (200, 30, 30)), ("b", (255, 0, 255)), ("c", (30, 200, 30))):
        Image.new("RGB", (64, 64), colour).save(root / f"{name}.png")
    (root / "a.txt").write_text("a red square, by hand")
    return root


def rows(out: Path) -> dict:
    frame = manifests.read(str(out), status=None, duplicates="keep")
    return {r["source"]: (r["status"], r["caption"], r["caption_source"], r["error"] if isinstance(r["error"], str) else None)
            for _, r in frame.iterrows()}


def run(root: Path, out: Path, *extra: str) -> int:
    return main(["--input", str(root), "--output", str(out), "--resolution", "64", "--captioner", COLOUR, *extra])


@pytest.mark.slow
def test_policies_decide_which_rows_get_a_generated_caption(tmp_path, local_ray):
    root = collection(tmp_path / "photos")
    assert run(root, tmp_path / "missing") == 0
    assert rows(tmp_path / "missing") == {
        "a.png": ("ok", "a red square, by hand", "sidecar", None),
        "b.png": ("error", "", "", "caption[colour]: cannot caption magenta"),
        "c.png": ("ok", "a picture of colour 30 200 30", "colour", None),
    }
    assert run(root, tmp_path / "always", "--caption-policy", "always") == 0
    assert rows(tmp_path / "always")["a.png"] == ("ok", "a picture of colour 200 30 30", "colour", None)
    assert run(root, tmp_path / "prefix", "--caption-policy", "prefix", "--caption-prefix", "cf_edge,") == 0
    assert rows(tmp_path / "prefix")["c.png"][1:3] == ("cf_edge, a picture of colour 30 200 30", "colour")
    summary = manifests.read_manifest_json(str(tmp_path / "prefix"))
    assert summary["annotators"] and summary["settings"]["caption_policy"] == "prefix"
    assert summary["captioner"]["name"] == "colour" and summary["captioner"]["class"] == "tests.plugins.ColourCaptioner"
    for policy in ("missing", "always", "prefix"):  # the captioner's name is a known caption_source
        assert validate(str(tmp_path / policy), progress=False) == []


@pytest.mark.slow
def test_a_caption_that_is_not_a_str_fails_its_row_not_the_shard(tmp_path, local_ray):
    root = tmp_path / "photos"
    root.mkdir()
    for name, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200)), ("green", (30, 200, 30)),
                         ("grey", (90, 90, 90))):
        Image.new("RGB", (64, 64), colour).save(root / f"{name}.png")
    (root / "red.txt").write_text("a red square, by hand")
    out = tmp_path / "out"
    assert main(["--input", str(root), "--output", str(out), "--resolution", "64", "--captioner",
                 "tests.plugins:OffProtocolCaptioner", "--caption-policy", "always"]) == 0
    assert rows(out) == {  # None must not read as "keep the hand caption", nor a number fail the shard
        "red.png": ("error", "a red square, by hand", "sidecar", "caption[off_protocol]: returned NoneType, not a str"),
        "blue.png": ("error", "", "", "caption[off_protocol]: returned int, not a str"),
        "green.png": ("error", "", "", "caption[off_protocol]: returned bytes, not a str"),
        "grey.png": ("ok", "a fine caption", "off_protocol", None),
    }


@pytest.mark.slow
def test_a_blank_metadata_or_list_caption_counts_as_missing(tmp_path, local_ray):
    root = collection(tmp_path / "photos")
    (root / "metadata.jsonl").write_text('{"file_name": "c.png", "text": "  "}\n')
    assert run(root, tmp_path / "out") == 0
    assert rows(tmp_path / "out")["c.png"] == ("ok", "a picture of colour 30 200 30", "colour", None)
    listing = tmp_path / "list.csv"
    listing.write_text('path,caption\nc.png," "\n')
    assert run(root, tmp_path / "listed", "--input-list", str(listing)) == 0
    assert rows(tmp_path / "listed")["c.png"] == ("ok", "a picture of colour 30 200 30", "colour", None)


@pytest.mark.slow
def test_a_tiny_blip_from_a_weights_folder_captions_the_rows_without_one(tmp_path, local_ray):
    weights = tmp_path / "weights"
    write_tiny_blip(weights / "Salesforce" / "blip-image-captioning-large")
    root = collection(tmp_path / "photos")
    out = tmp_path / "out"
    assert main(["--input", str(root), "--output", str(out), "--resolution", "64", "--captioner", "blip",
                 "--weights-dir", str(weights), "-p", "blip.max_new_tokens=8"]) == 0
    got = rows(out)
    assert got["a.png"][2] == "sidecar" and got["b.png"][2] == got["c.png"][2] == "blip"
    assert got["b.png"][1] and got["c.png"][1]
    shard = next(out.glob("part-*.parquet"))
    provenance = manifests.io.shard_provenance(str(shard))
    assert provenance["captioner"]["name"] == "blip" and provenance["captioner"]["weights"]


def test_missing_captioner_weights_stop_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = collection(tmp_path / "photos")
    assert main(["--input", str(root), "--output", str(tmp_path / "out"), "--captioner", "blip",
                 "--weights-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "blip-image-captioning-large" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("flags", "says"), [
    (["--caption-policy", "always"], "need --captioner"),
    (["--captioner", COLOUR, "--caption-policy", "prefix"], "needs --caption-prefix"),
    (["--captioner", COLOUR, "--caption-prefix", "cf_edge,"], "used by --caption-policy prefix only"),
    (["--captioner", COLOUR, "--caption-policy", "always", "--caption-prefix", "x"], "prefix only, not always"),
    (["--captioner", "nope"], "nope"),
    (["--captioner", COLOUR, "-p", f"{COLOUR}.max_new_tokens=0"], "max_new_tokens"),
])
def test_bad_caption_flags_fail_fast(tmp_path, capsys, flags, says):
    with pytest.raises(SystemExit):
        main(["--input", str(tmp_path), "--output", str(tmp_path / "out"), *flags])
    assert says in capsys.readouterr().err

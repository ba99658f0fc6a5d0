"""Captions come from sidecars or imagefolder metadata files, in that order, else ""."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from PIL import Image

from manifests.io import resolve
from pipeline.reader import list_inputs, read_sidecar_caption


def touch_image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16)).save(path)


def captions_of(root) -> dict[str, str]:
    listing = list_inputs(str(root))
    fs, base = resolve(str(root))
    return {
        i.source: read_sidecar_caption(fs, base, i.sidecar) if i.sidecar else (i.caption or "")
        for i in listing.items
    }


def test_sidecar_txt_caption_and_json(tmp_path):
    for name in ("a", "b", "c", "d", "e"):
        touch_image(tmp_path / f"{name}.jpg")
    (tmp_path / "a.txt").write_text("  a caption from txt \n")
    (tmp_path / "b.caption").write_text("from .caption")
    (tmp_path / "c.json").write_text(json.dumps({"caption": "from json caption"}))
    (tmp_path / "d.json").write_text(json.dumps({"text": "from json text"}))
    assert captions_of(tmp_path) == {
        "a.jpg": "a caption from txt", "b.jpg": "from .caption", "c.jpg": "from json caption",
        "d.jpg": "from json text", "e.jpg": "",
    }


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_metadata_files(tmp_path, kind):
    touch_image(tmp_path / "x.png")
    touch_image(tmp_path / "sub" / "y.png")
    frame = pd.DataFrame({"file_name": ["x.png", "sub/y.png"], "text": ["caption x", "caption y"]})
    path = tmp_path / f"metadata.{kind}"
    if kind == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif kind == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    assert captions_of(tmp_path) == {"x.png": "caption x", "sub/y.png": "caption y"}


def test_metadata_in_a_subfolder_is_relative_to_it(tmp_path):
    touch_image(tmp_path / "part1" / "z.webp")
    (tmp_path / "part1" / "metadata.jsonl").write_text(json.dumps({"file_name": "z.webp", "text": "zed"}) + "\n")
    assert captions_of(tmp_path) == {"part1/z.webp": "zed"}


def test_sidecar_wins_over_metadata(tmp_path):
    touch_image(tmp_path / "x.png")
    (tmp_path / "x.txt").write_text("sidecar")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "metadata"}) + "\n")
    assert captions_of(tmp_path) == {"x.png": "sidecar"}


def test_metadata_without_text_column_fails_clearly(tmp_path):
    touch_image(tmp_path / "x.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "label": 3}) + "\n")
    with pytest.raises(ValueError, match="'text'"):
        list_inputs(str(tmp_path))


def test_listing_is_sorted_recursive_and_counts_other_files(tmp_path):
    for rel in ("b/2.JPG", "a.tif", "b/1.bmp", "c/d/e.gif", "f.jpeg"):
        touch_image(tmp_path / rel)
    (tmp_path / "readme.md").write_text("x")
    listing = list_inputs(str(tmp_path))
    assert [i.source for i in listing.items] == ["a.tif", "b/1.bmp", "b/2.JPG", "c/d/e.gif", "f.jpeg"]
    assert listing.ignored == 1
    assert len({i.id for i in listing.items}) == 5


def test_file_uri_input_lists_the_same(tmp_path):
    touch_image(tmp_path / "a.png")
    assert [i.source for i in list_inputs(f"file://{tmp_path}").items] == ["a.png"]


def test_missing_input_folder_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_inputs(str(tmp_path / "nope"))

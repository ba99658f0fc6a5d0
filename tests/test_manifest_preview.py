"""The preview shows what a manifest holds: with ``--status all --duplicates keep`` (what ``make demo``
runs) every edge case of the demo collection gets a tile, and each error row a tile with its reason."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from manifests.__main__ import main
from manifests.preview import preview

ROOT = Path(__file__).resolve().parents[1]
EDGE_CASES = ["alpha.png", "animated.gif", "cmyk.jpg", "gray16.png", "palette.gif", "rotated_exif.jpg"]
ERRORS = ["not_an_image.png", "truncated.jpg"]


def ink(sheet: Image.Image, box) -> int:
    """Distinct grey levels inside ``box``: 1 for a flat (blank) area, many where something is drawn."""
    return len(np.unique(np.asarray(sheet.convert("L").crop(box))))


def by_name(sheet) -> dict:
    return {Path(row.source).name: row for row in sheet.rows}


def test_every_row_shows_the_edge_cases_and_the_error_rows_with_their_reasons(demo_manifest, tmp_path):
    sheet = preview(str(demo_manifest), str(tmp_path / "all.png"), rows=20, tile=96, status=None, duplicates="keep")
    drawn = Image.open(sheet.path)
    rows = by_name(sheet)
    assert len(sheet.rows) == 20 and set(EDGE_CASES + ERRORS) <= set(rows)
    for name in EDGE_CASES:
        tiles = rows[name].tiles
        assert [t.kind for t in tiles] == ["image", "image"], name  # image | cond_canny
        assert all(ink(drawn, t.box) > 1 for t in tiles), name
    for name in ERRORS:
        reason = rows[name].tiles[0]
        assert reason.kind == "reason" and reason.text.startswith("ERROR\ndecode:"), name
        assert ink(drawn, reason.box) > 2, name  # the text is drawn on the tile
        assert rows[name].status == "error" and "[error]" in rows[name].label
    # The copies the default view leaves out are labelled with the row they copy.
    assert "duplicate of edge_cases/alpha.png" in " ".join(rows["cmyk.jpg"].label.split())  # lines wrapped
    assert "duplicate of" not in rows["alpha.png"].label


def test_the_default_shows_what_training_reads(demo_manifest, tmp_path):
    rows = by_name(preview(str(demo_manifest), str(tmp_path / "ok.png"), rows=20, tile=64))
    assert not set(ERRORS) & set(rows) and "cmyk.jpg" not in rows and "alpha.png" in rows
    assert all(t.kind == "image" for row in rows.values() for t in row.tiles)


def test_make_demo_previews_every_edge_case_and_error_row(demo_manifest, tmp_path, monkeypatch):
    """The preview command of the Makefile's demo, run on the demo manifest."""
    import manifests.__main__ as cli

    sheets = []
    monkeypatch.setattr(cli, "preview", lambda *a, **k: sheets.append(preview(*a, **k)) or sheets[-1])
    line = next(li for li in (ROOT / "Makefile").read_text().splitlines() if "-m manifests preview" in li)
    argv = shlex.split(line.split("-m manifests", 1)[1].replace("$(DEMO)/manifest", str(demo_manifest))
                       .replace("$(DEMO)", str(tmp_path)))
    assert main(argv) == 0
    assert set(EDGE_CASES + ERRORS) <= set(by_name(sheets[0]))
    assert Image.open(tmp_path / "preview.png").size == Image.open(sheets[0].path).size


@pytest.mark.parametrize("flags", [["--rows", "0"], ["--tile", "8"]])
def test_bad_preview_sizes_fail_with_a_message(demo_manifest, tmp_path, capsys, flags):
    assert main(["preview", str(demo_manifest), "--out", str(tmp_path / "g.png"), *flags]) == 2
    assert "--rows must be at least 1 and --tile at least" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()

"""Rows whose image or condition map does not decode (truncated or garbage bytes, another size, a 16-bit
map): training skips them, a nearby row standing in, counts and lists them in train_summary.json, and
stops in one line naming them when there are more than --max_bad_rows_fraction allows; never a traceback,
in the training process or in DataLoader workers, with the row cache."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import manifests
from train.data import (ManifestDataset, SkippedRows, TooManyUnreadableRows, collate, drop_unreadable,
                        load_rows)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 3]


def garbage(_: bytes) -> bytes:
    return bytes(range(256)) * 8


def smaller(data: bytes) -> bytes:
    return png(Image.open(io.BytesIO(data)).convert("L").resize((24, 16)))


def sixteen_bit(data: bytes) -> bytes:
    grey = np.asarray(Image.open(io.BytesIO(data)).convert("L"), np.uint16) * 257
    return png(Image.fromarray(grey))  # mode I;16


def change_cells(manifest: Path, changes: dict[str, dict[str, object]]) -> None:
    """Rewrite the shards holding the rows ``changes`` names: {id: {column: bytes -> bytes}}, schema kept."""
    for shard in sorted(manifest.glob("part-*.parquet")):
        table = pq.read_table(shard)
        ids = table["id"].to_pylist()
        if not set(ids) & set(changes):
            continue
        for column in {c for change in changes.values() for c in change}:
            cells = table[column].to_pylist()
            for i, id_ in enumerate(ids):
                if column in changes.get(id_, {}):
                    cells[i] = {**cells[i], "bytes": changes[id_][column](cells[i]["bytes"])}
            at = table.schema.get_field_index(column)
            table = table.set_column(at, table.schema.field(column), pa.array(cells, table.schema.field(column).type))
        pq.write_table(table, shard)


def ok_ids(manifest: Path) -> list[str]:
    return sorted(manifests.read(str(manifest), columns=["id"], status="ok", duplicates="keep")["id"])


def sources(manifest: Path) -> dict[str, str]:
    frame = manifests.read(str(manifest), columns=["id", "source"], status="ok", duplicates="keep")
    return dict(zip(frame["id"], frame["source"]))


@pytest.mark.parametrize(("column", "damage", "says"), [
    ("image", truncated, "does not decode"),
    ("cond_canny", garbage, "does not decode"),
    ("cond_canny", smaller, "is 24x16 where the row's maps are"),
    ("cond_canny", sixteen_bit, "I;16"),
])
def test_an_unreadable_row_is_stood_in_for_and_reported(manifest_copy, column, damage, says):
    ids = ok_ids(manifest_copy)
    bad = ids[5]
    change_cells(manifest_copy, {bad: {column: damage}})
    rows, _ = load_rows(str(manifest_copy), ["canny"], 0, keep_duplicates=True)  # through the row cache
    dataset = ManifestDataset(rows, ["canny"], 64, seed=0, center_crop=True, proportion_empty_prompts=0.0)
    position = [r["id"] for r in rows].index(bad)
    example = dataset[position]
    [record] = example["skipped_rows"]
    assert record["id"] == bad and record["source"] == sources(manifest_copy)[bad]
    assert record["column"] == column and says in record["reason"]
    # the next row stands in: the same pixels and caption as its own example
    stand_in = dataset[position + 1]
    assert stand_in["skipped_rows"] == [] and not example["unusable"]
    assert torch.equal(example["conditioning_pixel_values"], stand_in["conditioning_pixel_values"])
    assert torch.equal(example["pixel_values"], stand_in["pixel_values"])
    assert example["caption"] == stand_in["caption"]
    good, dropped = drop_unreadable(list(rows), ["canny"])  # how held-out rows are checked
    assert [r["id"] for r in dropped] == [bad] and len(good) == len(rows) - 1


def test_unreadable_rows_are_reported_from_dataloader_workers(manifest_copy):
    ids = ok_ids(manifest_copy)
    change_cells(manifest_copy, {ids[3]: {"image": truncated}, ids[8]: {"cond_canny": garbage}})
    rows, _ = load_rows(str(manifest_copy), ["canny"], 0, keep_duplicates=True)
    dataset = ManifestDataset(rows, ["canny"], 64, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate, num_workers=2,
                                         drop_last=True)
    tally = SkippedRows(str(manifest_copy), len(dataset), max_fraction=0.5)
    for batch in loader:
        assert batch["pixel_values"].shape == (4, 3, 64, 64)  # full batches: stand-ins, not gaps
        tally.add(batch["skipped_rows"], batch["unusable"])
    assert {r["id"]: r["column"] for r in tally.summary()} == {ids[3]: "image", ids[8]: "cond_canny"}


def test_more_unreadable_rows_than_allowed_stop_in_one_line_naming_the_first():
    tally = SkippedRows("data/m", total=100, max_fraction=0.01)
    record = {"id": "abc", "source": "cats/1.jpg", "column": "image", "reason": "does not decode (OSError: x)"}
    tally.add([record])  # 1 of 100: allowed
    with pytest.raises(TooManyUnreadableRows) as caught:
        tally.add([{**record, "id": "def"}])
    message = str(caught.value)
    assert "\n" not in message and "abc" in message and "cats/1.jpg" in message
    assert "python -m manifests validate data/m" in message and "--max_bad_rows_fraction" in message


def test_the_log_says_what_happens_instead_of_an_unreadable_row(caplog):
    """A training row is stood in for by a nearby row; a held-out row is only left out of validation."""
    tally = SkippedRows("data/m", total=100, max_fraction=0.5)
    record = {"id": "abc", "source": "cats/1.jpg", "column": "image", "reason": "does not decode (OSError: x)"}
    with caplog.at_level("WARNING", logger="train"):
        tally.add([record], held_out=True)
        tally.add([{**record, "id": "def"}])
    held_out, trained = [r.getMessage() for r in caplog.records]
    assert "abc" in held_out and "validation goes on without it" in held_out and "nearby row" not in held_out
    assert "def" in trained and "a nearby row is used in its place" in trained


def test_a_row_with_no_readable_row_near_it_marks_its_example_unusable(manifest_copy):
    ids = ok_ids(manifest_copy)
    change_cells(manifest_copy, {i: {"image": garbage} for i in ids})
    rows, _ = load_rows(str(manifest_copy), ["canny"], 0, keep_duplicates=True)
    example = ManifestDataset(rows, ["canny"], 64, seed=0)[0]
    assert example["unusable"] and example["pixel_values"].shape == (3, 64, 64)
    with pytest.raises(TooManyUnreadableRows):
        SkippedRows("m", len(rows), 1.0).add(example["skipped_rows"], example["unusable"])


# --- the trainer ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "2"])
def test_training_skips_unreadable_rows_and_lists_them(manifest_copy, tiny_sd, tmp_path, workers):
    from tests.test_train import train_args
    from train.train import main

    ids = ok_ids(manifest_copy)
    held_out_bad, image_bad, cond_bad = ids[1], ids[6], ids[11]  # 4 rows are held out to validate on
    change_cells(manifest_copy, {held_out_bad: {"cond_canny": smaller}, image_bad: {"image": truncated},
                                 cond_bad: {"cond_canny": garbage}})
    out = tmp_path / "run"
    steps = str((len(ids) - 4) // 2)  # one epoch at batch 2: every training row is met
    assert main(train_args(manifest_copy, tiny_sd, out, "--max_train_steps", steps, "--max_bad_rows_fraction", "0.5",
                           "--dataloader_num_workers", workers, "--validation_steps", steps)) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["figures"]["skipped_rows"] == 3
    listed = {r["id"]: (r["source"], r["column"]) for r in summary["unreadable_rows"]}
    where = sources(manifest_copy)
    assert listed == {held_out_bad: (where[held_out_bad], "cond_canny"), image_bad: (where[image_bad], "image"),
                      cond_bad: (where[cond_bad], "cond_canny")}
    assert held_out_bad not in summary["run"]["held_out_ids"] and len(summary["run"]["held_out_ids"]) == 3


@pytest.mark.slow
def test_training_stops_in_one_line_when_rows_do_not_decode(manifest_copy, tiny_sd, tmp_path, capsys):
    from tests.test_train import train_args
    from train.train import main

    ids = ok_ids(manifest_copy)
    change_cells(manifest_copy, {ids[6]: {"image": truncated}})
    assert main(train_args(manifest_copy, tiny_sd, tmp_path / "run", "--max_train_steps", "8",
                           "--dataloader_num_workers", "1")) == 2  # default: 1% of ~18 rows is none
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert ids[6] in line and sources(manifest_copy)[ids[6]] in line and "manifests validate" in line

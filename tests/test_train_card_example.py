"""The model card's example (the condition map and prompt its snippet generates from) comes from a row that
decodes, with its caption cut as training cuts it: a run whose first row is unreadable still exports, and a
caption that is really a log file never lands whole in README.md."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.test_train_unreadable_rows import change_cells, garbage, ok_ids
from train.data import CHARS_PER_TOKEN


def set_caption(manifest, row_id: str, caption: str) -> None:
    for shard in sorted(manifest.glob("part-*.parquet")):
        table = pq.read_table(shard)
        ids = table["id"].to_pylist()
        if row_id in ids:
            captions = [caption if i == row_id else c for i, c in zip(ids, table["caption"].to_pylist())]
            at = table.schema.get_field_index("caption")
            pq.write_table(table.set_column(at, table.schema.field("caption"), pa.array(captions, pa.string())), shard)


@pytest.mark.slow
def test_an_unreadable_first_row_and_a_huge_caption_never_break_the_export(manifest_copy, tiny_sd, tmp_path):
    from tests.test_train import train_args
    from train.train import main

    ids = ok_ids(manifest_copy)
    # no validation: nothing is held out, so the example comes from the training rows (by id: ids[0] first)
    change_cells(manifest_copy, {ids[0]: {"cond_canny": garbage}})
    huge = "log line: nothing to see here " * 40_000  # 1.2 MB
    set_caption(manifest_copy, ids[1], huge)
    out = tmp_path / "run"
    assert main(train_args(manifest_copy, tiny_sd, out, "--max_train_steps", "2", "--validation_steps", "0",
                           "--max_bad_rows_fraction", "0.5")) == 0
    assert (out / "controlnet" / "config.json").is_file() and (out / "example_condition.png").is_file()
    card = (out / "README.md").read_text()
    assert "load_image(" in card and len(card) < 40 * 77 * CHARS_PER_TOKEN  # the example row's prompt, cut
    assert huge[:200] in card and huge not in card

"""What pandas and ``datasets`` users get from a manifest: integer sizes stay integers when error rows
(no size) are present, and ``manifests.hf_dataset`` gives the rows training uses."""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

import manifests

SIZE_COLUMNS = ["width", "height", "orig_width", "orig_height"]


def check_sizes(frame: pd.DataFrame) -> None:
    """Nullable integers: ``<NA>`` exactly on the rows without a size, ints elsewhere."""
    for name in SIZE_COLUMNS:
        assert frame[name].dtype == pd.Int32Dtype(), (name, frame[name].dtype)
    errors = frame["status"] == "error"
    assert errors.sum() == 2 and frame.loc[errors, "width"].isna().all()
    assert frame.loc[~errors, "width"].notna().all() and (frame.loc[~errors, "width"] % 8 == 0).all()
    assert frame["phash"].dtype == pd.Int64Dtype()


def test_pandas_reads_the_folder_with_integer_sizes(demo_manifest):
    check_sizes(pd.read_parquet(demo_manifest))
    check_sizes(pq.read_table(demo_manifest).to_pandas())


def test_manifests_read_keeps_integer_sizes_with_every_status(demo_manifest):
    frame = manifests.read(str(demo_manifest), status=None, duplicates="keep")
    check_sizes(frame)
    exact = pq.read_table(demo_manifest, columns=["phash"])["phash"].to_pylist()
    assert [None if pd.isna(v) else int(v) for v in frame["phash"]] == exact  # 64-bit hashes, not rounded


def test_manifests_read_keeps_integers_in_shards_written_without_pandas_metadata(manifest_copy):
    for shard in manifest_copy.glob("part-*.parquet"):  # as shards written before the metadata existed
        table = pq.read_table(shard)
        metadata = {k: v for k, v in table.schema.metadata.items() if k != b"pandas"}
        pq.write_table(table.replace_schema_metadata(metadata), shard)
    assert pd.read_parquet(manifest_copy)["width"].dtype == "float64"  # what pandas alone makes of them
    check_sizes(manifests.read(str(manifest_copy), status=None, duplicates="keep"))


def test_hf_dataset_is_exported_and_gives_the_training_rows(demo_manifest, tmp_path):
    pytest.importorskip("datasets")
    ds = manifests.hf_dataset(str(demo_manifest), cache_dir=str(tmp_path / "hf"))
    training = manifests.read(str(demo_manifest), columns=["id"])["id"].tolist()  # ok rows, no duplicates
    assert ds["id"] == training and len(training) < 18  # the demo's copies are left out
    assert isinstance(ds[0]["image"], Image.Image) and isinstance(ds[0]["cond_canny"], Image.Image)
    every = manifests.hf_dataset(str(demo_manifest), duplicates="keep", status=None, cache_dir=str(tmp_path / "hf"))
    assert len(every) == 20

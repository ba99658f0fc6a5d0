"""A manifest folder loads as a Hugging Face dataset of its rows alone, the way diffusers' own
``train_controlnet.py --train_data_dir MANIFEST`` reads it: ``load_dataset(folder)``, then its image,
condition and caption columns."""

from __future__ import annotations

import shutil

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

import manifests
from manifests.card import CARD_FILE
from manifests.validate import validate
from pipeline.annotate import ResumeConflict, run
from pipeline.config import AnnotateConfig

datasets = pytest.importorskip("datasets")


def load_as_diffusers_does(folder, cache, *args):
    """What ``make_train_dataset`` of diffusers' examples/controlnet/train_controlnet.py calls."""
    return datasets.load_dataset(str(folder), *args, cache_dir=str(cache))


def every_row(folder) -> pd.DataFrame:
    return manifests.read(str(folder), columns=["id", "status"], status=None, duplicates="keep")


def assert_trains_as_diffusers(train, conditions=("cond_canny",)):
    """diffusers' preprocess_train: every image and condition ``.convert("RGB")``, every caption a str."""
    for name in ("image", *conditions, "caption"):
        assert name in train.column_names
    for row in train:
        for name in ("image", *conditions):
            assert isinstance(row[name], Image.Image), (name, row["id"])
            assert row[name].convert("RGB").size == (row["width"], row["height"])
        assert isinstance(row["caption"], str)


def test_the_demo_manifest_loads_as_its_ok_rows_and_all_as_every_row(demo_manifest, tmp_path):
    assert (demo_manifest / "_duplicates" / "duplicates.parquet").exists()  # what used to be read as data
    rows = every_row(demo_manifest)
    ds = load_as_diffusers_does(demo_manifest, tmp_path / "hf")
    assert list(ds) == ["train"]
    ok = rows[rows["status"] == "ok"]
    assert ds["train"]["id"] == ok["id"].tolist()  # shard order; duplicates stay (their table is no data)
    assert_trains_as_diffusers(ds["train"])
    everything = load_as_diffusers_does(demo_manifest, tmp_path / "hf", "all")["train"]
    assert everything["id"] == rows["id"].tolist() and everything["status"].count("error") == 2
    assert everything.features["image"] == datasets.Image() and everything.features["width"].dtype == "int32"


def small_collection(folder):
    """Two pictures, an exact copy and a near copy of the first, and a file that does not decode."""
    folder.mkdir()
    first = Image.linear_gradient("L").resize((96, 64)).convert("RGB")
    first.save(folder / "a.png")
    shutil.copy(folder / "a.png", folder / "a_copy.png")
    first.resize((48, 32)).resize((96, 64)).save(folder / "a_small.png")
    Image.radial_gradient("L").resize((80, 80)).convert("RGB").save(folder / "b.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


def test_a_manifest_with_an_error_row_and_duplicates_and_its_rerun_with_other_annotators(tmp_path, local_ray):
    out = tmp_path / "out"
    config = AnnotateConfig(input=str(small_collection(tmp_path / "in")), output=str(out), shard_size=2)
    summary = run(config)
    assert summary["counts"]["error"] == 1 and summary["run"]["duplicates"]["exact"] >= 1
    rows = every_row(out)
    train = load_as_diffusers_does(out, tmp_path / "hf")["train"]
    assert train["id"] == rows.loc[rows["status"] == "ok", "id"].tolist()
    assert_trains_as_diffusers(train)
    assert validate(str(out), progress=False) == []

    # Other annotators (--overwrite): the card follows the new columns.
    config.annotators, config.overwrite = ("canny", "tests.plugins:InvertAnnotator"), True
    run(config)
    train = load_as_diffusers_does(out, tmp_path / "hf2")["train"]
    assert_trains_as_diffusers(train, ("cond_canny", "cond_invert"))
    assert validate(str(out), progress=False) == []

    # A resume that writes nothing keeps it loading (the card is ours, not "files of others").
    config.overwrite = False
    assert run(config)["run"]["shards_written"] == 0
    assert len(load_as_diffusers_does(out, tmp_path / "hf3")["train"]) == len(train)


def test_validate_names_a_missing_or_stale_card(manifest_copy):
    card = manifest_copy / CARD_FILE
    text = card.read_text()
    card.unlink()
    problems = [str(p) for p in validate(str(manifest_copy), progress=False)]
    assert len(problems) == 1 and f"no {CARD_FILE}" in problems[0] and "rerun the annotate command" in problems[0]
    card.write_text(text.replace('"cond_canny"', '"cond_hed"'))
    problems = [str(p) for p in validate(str(manifest_copy), progress=False)]
    assert len(problems) == 1 and "does not declare this manifest's shards and columns" in problems[0]


def test_a_card_of_someone_else_is_refused_untouched(manifest_copy, demo_collection, local_ray):
    (manifest_copy / CARD_FILE).write_text("configs:\n- config_name: mine\n")
    before = {p.name: p.read_bytes() for p in manifest_copy.iterdir() if p.is_file()}
    with pytest.raises(ResumeConflict, match=rf"files this project did not write \({CARD_FILE}\)"):
        run(AnnotateConfig(input=str(demo_collection), output=str(manifest_copy), shard_size=8))
    assert {p.name: p.read_bytes() for p in manifest_copy.iterdir() if p.is_file()} == before


def test_pandas_and_pyarrow_still_read_the_folder_as_its_shards(demo_manifest):
    """The card is a dot-file: pyarrow reads every other file of the folder as Parquet."""
    assert len(pd.read_parquet(demo_manifest)) == len(pq.read_table(demo_manifest)) == 20


def as_older_shard(path) -> None:
    """Rewrite a shard as a v1.1 release wrote it: without ``caption_original_length`` (column and features)."""
    import json

    table = pq.read_table(path)
    metadata = dict(table.schema.metadata)
    hf = json.loads(metadata[b"huggingface"])
    del hf["info"]["features"]["caption_original_length"]
    metadata[b"huggingface"] = json.dumps(hf).encode()
    older = table.drop_columns(["caption_original_length"])
    pq.write_table(older.replace_schema_metadata(metadata), path)


def test_a_manifest_resumed_over_older_shards_loads_with_every_reader(manifest_copy, tmp_path):
    """A manifest begun by the previous release and finished by this one mixes shards with and without the
    v1.2 column: every reader takes all its rows, the older ones with no original caption length."""
    shards = sorted(manifest_copy.glob("part-*.parquet"))
    as_older_shard(shards[0])
    expected = every_row(manifest_copy)
    older_ids = set(pq.read_table(shards[0], columns=["id"])["id"].to_pylist())
    ds = manifests.hf_dataset(str(manifest_copy), duplicates="keep", status=None, cache_dir=str(tmp_path / "c1"))
    assert sorted(ds["id"]) == sorted(expected["id"])
    assert all(length is None for i, length in zip(ds["id"], ds["caption_original_length"]) if i in older_ids)
    assert isinstance(ds[0]["image"], Image.Image)
    ok = manifests.hf_dataset(str(manifest_copy), cache_dir=str(tmp_path / "c2"))
    assert sorted(ok["id"]) == sorted(manifests.read(str(manifest_copy), columns=["id"])["id"])
    train = load_as_diffusers_does(manifest_copy, tmp_path / "c3")["train"]
    assert sorted(train["id"]) == sorted(expected[expected.status == "ok"]["id"])


def test_a_folder_without_shards_fails_as_datasets_says_not_in_the_schema_merge(tmp_path):
    with pytest.raises(ValueError, match="data_files"):
        manifests.hf_dataset(str(tmp_path), duplicates="keep", cache_dir=str(tmp_path / "cache"))

"""A rerun of a complete manifest decides "nothing to do" from the listing and the stats files: no Ray,
no duplicates pass, the side table left as it was, a correct summary."""

from __future__ import annotations

import json

import pytest

from manifests import duplicates as dup
from manifests.schema import MANIFEST_JSON, shard_name
from pipeline import annotate, dispatch, ray_runtime
from pipeline.config import AnnotateConfig


def no_ray(*args, **kwargs):
    pytest.fail("Ray was started (or given tasks) for a run with nothing to do")


def test_a_rerun_of_a_complete_manifest_starts_no_ray_and_keeps_the_duplicates_table(
        manifest_copy, demo_collection, monkeypatch, caplog):
    table = manifest_copy / dup.DUPLICATES_FILE
    before = json.loads((manifest_copy / MANIFEST_JSON).read_text())
    stamp, content = table.stat().st_mtime_ns, table.read_bytes()
    monkeypatch.setattr(ray_runtime, "connect", no_ray)
    monkeypatch.setattr(dispatch, "run_tasks", no_ray)
    caplog.set_level("INFO", logger="annotate")
    summary = annotate.run(AnnotateConfig(input=str(demo_collection), output=str(manifest_copy), shard_size=8))
    assert (table.stat().st_mtime_ns, table.read_bytes()) == (stamp, content)
    assert summary["run"]["shards_written"] == 0 and summary["run"]["ray"]["mode"] == "not started"
    assert summary["counts"] == before["counts"] and summary["shards"] == before["shards"]
    assert summary["run"]["duplicates"] == before["run"]["duplicates"]
    assert json.loads((manifest_copy / MANIFEST_JSON).read_text())["counts"] == before["counts"]
    assert summary["run"]["plan_s"] >= 0 and "listing and planning took" in caplog.text


def test_a_rerun_after_a_shard_was_redone_redoes_the_duplicates_pass(manifest_copy, demo_collection, local_ray,
                                                                    monkeypatch):
    expected = dup.read_table(str(manifest_copy)).replace_schema_metadata(None)
    made_from = dup.read_summary(str(manifest_copy))["computed_from"]
    (manifest_copy / shard_name(1)).unlink()
    calls = []
    real = dispatch.run_tasks
    monkeypatch.setattr(dispatch, "run_tasks", lambda fn, args: calls.append(fn) or real(fn, args))
    summary = annotate.run(AnnotateConfig(input=str(demo_collection), output=str(manifest_copy), shard_size=8))
    assert summary["run"]["shards_written"] == 1 and calls  # the pass ran, as Ray tasks
    assert dup.read_table(str(manifest_copy)).replace_schema_metadata(None).equals(expected)
    assert dup.read_summary(str(manifest_copy))["computed_from"] != made_from  # the redone shard's stats differ


def test_another_distance_or_a_table_of_other_shards_redoes_the_pass(manifest_copy, demo_collection, local_ray):
    config = AnnotateConfig(input=str(demo_collection), output=str(manifest_copy), shard_size=8,
                            near_duplicate_distance=0)
    assert annotate.run(config)["run"]["duplicates"]["max_distance"] == 0
    assert dup.read_summary(str(manifest_copy))["max_distance"] == 0
    # a table without a record of what it was made from (an older manifest) is made again, once
    dup.write_duplicates(str(manifest_copy), 0)
    assert dup.read_summary(str(manifest_copy))["computed_from"] is None
    assert "duplicates_s" in annotate.run(config)["run"]
    assert dup.read_summary(str(manifest_copy))["computed_from"] is not None
    assert "duplicates_s" not in annotate.run(config)["run"]


def test_a_duplicates_pass_killed_mid_way_leaves_nothing_after_the_rerun(manifest_copy, demo_collection, local_ray):
    """A run killed inside the duplicates pass leaves the pass's scratch folder and no table; the same
    command again makes the table and removes the scratch."""
    scratch = manifest_copy / dup.DUPLICATES_DIR / ".tmp-work-killed"
    (scratch / "scatter").mkdir(parents=True)
    (scratch / "scatter" / "part-0.parquet").write_bytes(b"half written")
    (manifest_copy / dup.DUPLICATES_FILE).unlink()
    (manifest_copy / MANIFEST_JSON).unlink()
    annotate.run(AnnotateConfig(input=str(demo_collection), output=str(manifest_copy), shard_size=8))
    assert not scratch.exists()
    assert dup.read_table(str(manifest_copy)) is not None
    assert sorted(p.name for p in (manifest_copy / dup.DUPLICATES_DIR).iterdir()) == ["duplicates.parquet"]


def test_a_duplicates_table_that_does_not_read_is_made_again_instead_of_blocking_the_rerun(
        manifest_copy, demo_collection, local_ray):
    """A cut-short table (disk full, a partial copy) used to be redone by every run; a rerun that now reads
    it to decide whether to skip the pass must not stop on it."""
    table = manifest_copy / dup.DUPLICATES_FILE
    expected = dup.read_table(str(manifest_copy)).replace_schema_metadata(None)
    table.write_bytes(table.read_bytes()[:100])
    summary = annotate.run(AnnotateConfig(input=str(demo_collection), output=str(manifest_copy), shard_size=8))
    assert summary["run"]["shards_written"] == 0 and "duplicates_s" in summary["run"]
    assert dup.read_table(str(manifest_copy)).replace_schema_metadata(None).equals(expected)
    assert dup.read_summary(str(manifest_copy))["computed_from"] is not None

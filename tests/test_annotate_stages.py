"""The job at scale: stages (CPU prepare -> model forward -> CPU finish), plan and stats files,
resume and the summary from stats files, ``--input-list``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import manifests
from manifests import sink as sink_module
from manifests.rows import empty_row, mark
from manifests.schema import STATS_DIR, cond_column
from manifests.sink import ManifestSink
from manifests.validate import validate
from pipeline.annotate import main

PROBE = "tests.plugins:StageProbe"


def write_image(path: Path, value: int, size: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size, size, 3), value, np.uint8)
    pixels[16:48, 16:48] = 255 - value
    Image.fromarray(pixels).save(path)
    return path


def collection(root: Path, count: int) -> Path:
    for i in range(count):
        write_image(root / f"{i:02d}.png", value=20 * i)
    return root


def args(collection: Path | None, out: Path, *extra: str) -> list[str]:
    given = ["--input", str(collection)] if collection is not None else []
    return [*given, "--output", str(out), "--shard-size", "2", "--resolution", "64", "--image-format", "png", *extra]


def no_shard_reads(monkeypatch) -> list[str]:
    """Make any read of a shard's footer or columns fail the test; returns what was attempted."""
    attempts: list[str] = []

    def refuse(*a, **k):
        attempts.append(str(a[0]) if a else "?")
        raise AssertionError(f"a shard was read: {a[:1]}")

    monkeypatch.setattr(sink_module, "shard_provenance", refuse)
    monkeypatch.setattr(sink_module.pq, "read_table", refuse)
    monkeypatch.setattr(sink_module.pq, "ParquetFile", refuse)
    return attempts


@pytest.mark.slow
def test_the_model_actor_runs_only_the_forward_pass(tmp_path, local_ray):
    """preprocess and postprocess run in CPU tasks, forward in the one model actor; the maps are
    what the three parts make together."""
    root = collection(tmp_path / "photos", 6)
    log = tmp_path / "log"
    log.mkdir()
    out = tmp_path / "out"
    assert main(args(root, out, "--annotators", PROBE, "-p", f"{PROBE}.log_dir={log}", "--concurrency", "1")) == 0
    frame = manifests.read(str(out), columns=["id", "image", "cond_stage_probe"], duplicates="keep")
    assert len(frame) == 6
    pids = {stage: {(log / f"{i}.{stage}").read_text() for i in frame["id"]}
            for stage in ("preprocess", "forward", "postprocess")}
    assert len(pids["forward"]) == 1  # one actor
    assert not pids["forward"] & (pids["preprocess"] | pids["postprocess"])
    for row in frame.itertuples():
        image = np.asarray(Image.open(io.BytesIO(row.image["bytes"])))
        cond = np.asarray(Image.open(io.BytesIO(row.cond_stage_probe["bytes"])))
        assert (cond == 255 - image[:, :, 0]).all()


@pytest.mark.slow
def test_a_model_failing_on_every_batch_fails_its_rows_not_the_shard(tmp_path, local_ray):
    root = collection(tmp_path / "photos", 4)
    flag = tmp_path / "fail"
    flag.touch()
    out = tmp_path / "out"
    assert main(args(root, out, "--annotators", f"canny,{PROBE}", "-p", f"{PROBE}.fail_forward_on={flag}")) == 0
    summary = manifests.read_manifest_json(str(out))
    assert summary["counts"] == {"rows": 4, "ok": 0, "error": 4, "filtered": 0}
    assert summary["error_reasons"] == {"annotate[stage_probe]": 4}


def test_each_shard_has_a_stats_file_and_the_plan_files_are_gone(tmp_path, local_ray):
    root = collection(tmp_path / "photos", 5)
    out = tmp_path / "out"
    assert main(args(root, out)) == 0
    stats = sorted((out / STATS_DIR).iterdir())
    assert [p.name for p in stats] == ["part-000000.json", "part-000001.json", "part-000002.json"]
    first = json.loads(stats[0].read_text())
    assert first["rows"] == 2 and first["counts"]["ok"] == 2 and first["fingerprint"]
    footer = manifests.io.shard_provenance(str(out / "part-000000.parquet"))
    assert footer["fingerprint"] == first["fingerprint"]
    assert not (out / "_plan").exists()
    assert sorted(p.name for p in out.iterdir()) == [".huggingface.yaml", "_duplicates", "_manifest.json", "_stats",
                                                     "part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]


def test_resume_and_summary_read_stats_files_not_shards(tmp_path, local_ray, monkeypatch):
    root = collection(tmp_path / "photos", 5)
    out = tmp_path / "out"
    assert main(args(root, out)) == 0
    before = manifests.read_manifest_json(str(out))
    attempts = no_shard_reads(monkeypatch)
    assert main(args(root, out)) == 0
    after = manifests.read_manifest_json(str(out))
    assert attempts == []
    assert after["run"]["shards_kept"] == 3 and after["run"]["shards_written"] == 0
    assert after["counts"] == before["counts"] and after["shards"] == before["shards"]


def test_a_manifest_from_before_stats_files_resumes_keeping_its_shard_names(tmp_path, local_ray):
    """Shards named with 5 digits and no ``_stats``: kept (their footers are read once, stats
    written), and a new shard gets a 5-digit name too, so names keep sorting."""
    root = collection(tmp_path / "photos", 4)
    out = tmp_path / "out"
    assert main(args(root, out)) == 0
    for shard in out.glob("part-*.parquet"):
        shard.rename(out / shard.name.replace("part-0", "part-"))
    for stats in (out / STATS_DIR).iterdir():
        stats.unlink()
    (out / STATS_DIR).rmdir()
    write_image(root / "04.png", value=200)
    assert main(args(root, out)) == 0
    summary = manifests.read_manifest_json(str(out))
    assert summary["run"]["shards_kept"] == 2 and summary["run"]["shards_written"] == 1
    assert [s["name"] for s in summary["shards"]] == ["part-00000.parquet", "part-00001.parquet",
                                                      "part-00002.parquet"]
    assert summary["counts"]["rows"] == 5 and len(list((out / STATS_DIR).iterdir())) == 3
    assert validate(str(out), progress=False) == []


def test_a_stats_file_cut_short_falls_back_to_the_shard_and_is_rewritten(tmp_path, local_ray):
    root = collection(tmp_path / "photos", 4)
    out = tmp_path / "out"
    assert main(args(root, out)) == 0
    broken = out / STATS_DIR / "part-000001.json"
    broken.write_text('{"shard": 1, "fingerp')
    kept = (out / "part-000001.parquet").stat().st_mtime_ns
    assert main(args(root, out)) == 0
    assert (out / "part-000001.parquet").stat().st_mtime_ns == kept  # the shard itself is sound: kept
    assert json.loads(broken.read_text())["rows"] == 2
    assert manifests.read_manifest_json(str(out))["counts"]["rows"] == 4


def test_a_shard_whose_stats_disagree_with_its_plan_is_redone(tmp_path, local_ray):
    """A shard rewritten but killed before its stats file (old fingerprint in the stats) is redone."""
    root = collection(tmp_path / "photos", 4)
    out = tmp_path / "out"
    assert main(args(root, out)) == 0
    stats_path = out / STATS_DIR / "part-000000.json"
    stats = json.loads(stats_path.read_text())
    stats["fingerprint"] = stats["fingerprint"].split("-")[0] + "-0000000000000000"
    stats_path.write_text(json.dumps(stats))
    assert main(args(root, out)) == 0
    assert manifests.read_manifest_json(str(out))["run"]["shards_written"] == 1



def test_a_shard_write_cut_off_leaves_stats_that_redo_it(tmp_path, monkeypatch):
    """The stats file is written after its shard: a rewrite killed before the shard is in place
    leaves the old stats (old fingerprint), so resume redoes the shard instead of keeping the old
    shard under the new plan's fingerprint."""
    out = str(tmp_path / "out")
    provenance = {"settings": {}, "settings_fingerprint": "s", "annotators": []}
    sink = ManifestSink(out, ["canny"], provenance)
    sink.on_write_start(sink.existing(), overwrite=False)
    row = empty_row("a", "a.png", ["canny"])
    mark(row, "error", "decode: not an image")
    sink.write([row], 0, "s-old")

    class Killed(BaseException):
        """The worker dies while writing the shard."""

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(sink_module, "write_shard", killed)
    with pytest.raises(Killed):
        sink.write([row], 0, "s-new")
    existing = ManifestSink(out, ["canny"], provenance).existing()
    assert existing.done(0, "s-old") and not existing.done(0, "s-new")


def test_the_first_failing_annotator_decides_the_row_and_no_map_is_kept():
    """Outcomes apply in column order; the first failure decides the row's status and reason, and
    a failed row keeps no image and no map (not even one a later annotator made)."""
    from pipeline.shard import Failure, apply_outcomes

    names = ["canny", "hed", "depth"]
    row = empty_row("a", "a.png", names)
    row.update(image={"bytes": b"image", "path": None}, width=8, height=8)
    apply_outcomes(row, [("canny", b"canny map"), ("hed", Failure("filtered", "hed: no edges")),
                         ("depth", b"depth map")])
    assert (row["status"], row["error"]) == ("filtered", "hed: no edges")
    assert row["image"] is None and all(row[cond_column(n)] is None for n in names)

    row = empty_row("b", "b.png", names)
    apply_outcomes(row, [("canny", b"canny map"), ("hed", Failure("error", "annotate[hed]: out of memory")),
                         ("depth", Failure("filtered", "depth: flat"))])
    assert (row["status"], row["error"]) == ("error", "annotate[hed]: out of memory")

    row = empty_row("c", "c.png", names)
    apply_outcomes(row, [(n, f"{n} map".encode()) for n in names])
    assert row["status"] == "ok" and [row[cond_column(n)]["bytes"] for n in names] == [b"canny map", b"hed map",
                                                                                      b"depth map"]

def test_input_list_in_text_with_a_root_and_in_parquet_with_absolute_paths_and_captions(tmp_path, local_ray):
    root = collection(tmp_path / "photos", 4)
    listing = tmp_path / "list.txt"
    listing.write_text("# chosen by hand\n03.png\n01.png\nmissing.png\n")
    out = tmp_path / "out"
    assert main(args(root, out, "--input-list", str(listing))) == 0
    frame = manifests.read(str(out), columns=["source", "status", "error"], status=None, duplicates="keep")
    assert list(frame["source"]) == ["03.png", "01.png", "missing.png"]  # the list's order
    assert list(frame["status"]) == ["ok", "ok", "error"] and frame["error"][2].startswith("read:")
    summary = manifests.read_manifest_json(str(out))
    assert summary["input"]["list"] == str(listing) and summary["input"]["images"] == 3

    table = pa.table({"path": [str(root / "00.png"), str(root / "02.png")], "caption": ["zero", "two"]})
    pq.write_table(table, tmp_path / "list.parquet")
    out2 = tmp_path / "out2"
    assert main(args(None, out2, "--input-list", str(tmp_path / "list.parquet"))) == 0
    frame = manifests.read(str(out2), columns=["source", "caption"], duplicates="keep")
    assert list(frame["caption"]) == ["zero", "two"] and frame["source"][0] == str(root / "00.png")
    assert main(args(None, out2, "--input-list", str(tmp_path / "list.parquet"))) == 0  # resume: kept
    assert manifests.read_manifest_json(str(out2))["run"]["shards_kept"] == 1


def test_input_list_errors_fail_fast(tmp_path, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text("relative.png\n")
    assert main(args(None, tmp_path / "out", "--input-list", str(listing))) == 2
    assert "line 1: 'relative.png' is a relative path" in capsys.readouterr().err
    assert main(args(None, tmp_path / "out", "--input-list", str(tmp_path / "nope.txt"))) == 2
    assert "nope.txt does not exist" in capsys.readouterr().err


def test_neither_input_nor_list_is_a_flag_error(capsys):
    with pytest.raises(SystemExit):
        main(["--output", "x"])
    assert "give --input" in capsys.readouterr().err


@pytest.mark.parametrize(("actors", "cpus", "total"), [(2, 1, 2.0), (1, 4, 4.0), (3, 1, 1.0), (1, 1, 8.0)])
def test_model_actors_always_leave_cpus_for_the_prepare_and_finish_tasks(actors, cpus, total):
    """Actors holding every CPU would wait forever for stages nobody can schedule."""
    from pipeline.dispatch import share_cpus

    pool = share_cpus(actors, cpus, 0.0, total)
    assert pool.task_cpus <= total - pool.actors * pool.cpus + 1e-9
    assert pool.cpus == cpus or pool.actors * pool.cpus <= total - pool.task_cpus + 1e-9
    if total - actors * cpus >= 1:
        assert pool.cpus == cpus and pool.task_cpus == 1.0

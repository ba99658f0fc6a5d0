"""Training rows come from a memory-mapped cache: same rows as the pandas loader, without their bytes in memory."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from manifests import io as mio
from manifests.schema import SCHEMA_VERSION, manifest_schema, shard_name
from manifests.rows import empty_row, mark

ROOT = Path(__file__).resolve().parents[1]


def pandas_rows(manifest, conditions, holdout):
    """The loader this replaced: every ok row's bytes in pandas, then in dicts."""
    import manifests
    from manifests.schema import cond_column

    columns = ["id", "source", "caption", "image", "orig_width", "orig_height", *[cond_column(c) for c in conditions]]
    frame = manifests.read(str(manifest), columns=columns, status="ok").sort_values("id", kind="stable")
    rows = frame.to_dict("records")
    for row in rows:  # pandas 3 reads a null caption as NaN, which `caption or ""` made the prompt "nan"
        row["caption"] = None if row["caption"] != row["caption"] else row["caption"]
        for key in ("orig_width", "orig_height"):  # nullable Int32: None for null (NaN from older readers)
            row[key] = None if pd.isna(row[key]) else int(row[key])
    holdout = min(holdout, len(rows) - 1)
    return rows[holdout:], rows[:holdout]


def write_manifest(out: Path, rows_per_shard: int, shards: int, image_bytes: int, seed: int = 0,
                   row_group_bytes: int | None = None) -> int:
    """A synthetic manifest: ids out of order across shards, every 7th row an error; returns its ok bytes."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(rows_per_shard * shards)
    schema = manifest_schema(["canny"], {"job": "test"})
    ok_bytes, counts = 0, {"rows": 0, "ok": 0, "error": 0, "filtered": 0}
    old = mio.ROW_GROUP_BYTES
    mio.ROW_GROUP_BYTES = row_group_bytes or old  # several row groups per shard
    try:
        for k in range(shards):
            rows = []
            for i in ids[k * rows_per_shard:(k + 1) * rows_per_shard]:
                row = empty_row(f"id{i:06d}", f"img_{i}.jpg", ["canny"])
                row.update(caption=f"caption {i}" if i % 3 else None, width=8, height=8,
                           image={"bytes": rng.bytes(image_bytes), "path": None},
                           cond_canny={"bytes": rng.bytes(image_bytes // 4), "path": None})
                if i % 7 == 0:
                    mark(row, "error", "decode: test")
                else:
                    ok_bytes += image_bytes + image_bytes // 4
                counts["rows"] += 1
                counts[row["status"]] += 1
                rows.append(row)
            mio.write_shard(rows, schema, str(out), shard_name(k))
    finally:
        mio.ROW_GROUP_BYTES = old
    mio.write_manifest_json(str(out), {"schema_version": SCHEMA_VERSION, "counts": counts, "seed": seed,
                                       "columns": [f.name for f in schema],
                                       "shards": [{"name": shard_name(k)} for k in range(shards)]})
    return ok_bytes


def cache_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.arrow"))


def test_rows_are_the_pandas_loaders_rows_in_the_same_order(demo_manifest, tmp_path):
    from train.data import load_rows

    synthetic = tmp_path / "synthetic"
    write_manifest(synthetic, rows_per_shard=40, shards=3, image_bytes=3000, row_group_bytes=20_000)
    assert pq.ParquetFile(synthetic / shard_name(0)).num_row_groups > 1
    for manifest, holdout in ((demo_manifest, 4), (synthetic, 5), (synthetic, 0)):
        train, held = load_rows(str(manifest), ["canny"], holdout, cache_dir=str(tmp_path / "cache"))
        old_train, old_held = pandas_rows(manifest, ["canny"], holdout)
        assert len(train) == len(old_train) and len(held) == len(old_held) == holdout
        assert list(train) == old_train and list(held) == old_held  # ids, captions, bytes, order
        assert [train[i] for i in (0, -1, len(train) // 2)] == [old_train[i] for i in (0, -1, len(train) // 2)]
        assert set(train[0]) == {"id", "source", "caption", "image", "orig_width", "orig_height", "cond_canny"} and set(train[0]["image"]) == {"bytes", "path"}


def test_captions_come_without_reading_rows(tmp_path, monkeypatch):
    from train.data import load_rows, row_captions

    write_manifest(tmp_path / "m", rows_per_shard=30, shards=2, image_bytes=1000)
    train, held = load_rows(str(tmp_path / "m"), ["canny"], 3, cache_dir=str(tmp_path / "cache"))
    expected = [row["caption"] for row in pandas_rows(tmp_path / "m", ["canny"], 3)[0]]
    assert None in expected
    with monkeypatch.context() as patch:  # captions must not go through row access (the image bytes)
        patch.setattr(type(train), "__getitem__", None)
        assert row_captions(train) == expected
    assert row_captions([{"caption": "a"}]) == ["a"]  # plain lists of rows still work


def test_a_missing_caption_is_the_empty_prompt(tmp_path):
    import io

    from PIL import Image

    from train.data import ManifestDataset, load_rows

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, "PNG")
    rows = []
    for i, caption in enumerate(["a red square", None, "", None]):
        row = empty_row(f"id{i}", f"{i}.png", ["canny"])
        row.update(caption=caption, image={"bytes": buf.getvalue(), "path": None},
                   cond_canny={"bytes": buf.getvalue(), "path": None}, width=8, height=8)
        rows.append(row)
    mio.write_shard(rows, manifest_schema(["canny"]), str(tmp_path / "m"), shard_name(0))
    mio.write_manifest_json(str(tmp_path / "m"), {"schema_version": SCHEMA_VERSION, "counts": {"ok": 4}})
    train, _ = load_rows(str(tmp_path / "m"), ["canny"], 0, cache_dir=str(tmp_path / "cache"))
    dataset = ManifestDataset(train, ["canny"], 8, seed=0, proportion_empty_prompts=0.0)
    # pandas read a null caption as NaN, which became the prompt "nan"
    assert [dataset[i]["caption"] for i in range(4)] == ["a red square", "", "", ""]


MEASURE = r"""
import json, sys

def status():
    fields = {}
    for line in open("/proc/self/status"):
        key, value = line.split(":", 1)
        if key in ("VmHWM", "VmRSS", "RssAnon"):
            fields[key] = int(value.split()[0]) * 1024
    return fields

from train.data import load_rows

load_rows(sys.argv[3], ["canny"], 4, cache_dir=sys.argv[2])  # one-time set-up (Arrow compute, ...) out of the figures
try:  # reset the peak (VmHWM) so that only the load counts
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
before = status()
train, held = load_rows(sys.argv[1], ["canny"], 4, cache_dir=sys.argv[2])
after = status()
print(json.dumps({"rows": len(train) + len(held), "anon": after["RssAnon"] - before["RssAnon"],
                  "peak": after["VmHWM"] - before["VmRSS"]}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status (Linux)")
def test_loading_holds_neither_the_image_bytes_nor_a_copy_of_them(tmp_path):
    """About 40 MB of ok image bytes in 2 MB row groups: building and loading stay far below that."""
    manifest = tmp_path / "m"
    ok_bytes = write_manifest(manifest, rows_per_shard=100, shards=4, image_bytes=80_000, row_group_bytes=2 << 20)
    assert ok_bytes > 30 << 20
    write_manifest(tmp_path / "small", rows_per_shard=10, shards=1, image_bytes=100)
    figures = []
    for run in ("cold: builds the cache", "warm: maps it"):
        done = subprocess.run([sys.executable, "-c", MEASURE, str(manifest), str(tmp_path / "cache"),
                               str(tmp_path / "small")], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        figures.append((run, json.loads(done.stdout.strip().splitlines()[-1])))
    for run, f in figures:
        assert f["rows"] == 400 - 58  # the ok rows
        # The pandas loader grew anonymous memory by 4.7x the bytes here (160 MB); allow a quarter of them.
        assert f["anon"] < ok_bytes / 4, (run, f, ok_bytes)
        assert f["peak"] < ok_bytes / 2, (run, f, ok_bytes)
    print(figures)


def test_the_cache_is_built_once_reused_and_rebuilt_for_a_changed_manifest(tmp_path, monkeypatch):
    from train import row_cache
    from train.data import load_rows

    manifest, cache = tmp_path / "m", tmp_path / "cache"
    write_manifest(manifest, rows_per_shard=20, shards=2, image_bytes=500)
    first, _ = load_rows(str(manifest), ["canny"], 2, cache_dir=str(cache))
    [built] = cache_files(cache)
    stat = built.stat()

    def no_build(*args):
        raise AssertionError("the cache was built again")

    monkeypatch.setattr(row_cache, "_build_in_child", no_build)
    again, _ = load_rows(str(manifest), ["canny"], 2, cache_dir=str(cache))
    assert list(again) == list(first) and cache_files(cache) == [built]
    assert (built.stat().st_mtime_ns, built.stat().st_ino) == (stat.st_mtime_ns, stat.st_ino)
    monkeypatch.undo()

    # Other columns, or a manifest written again with other rows, get their own cache.
    write_manifest(manifest, rows_per_shard=20, shards=2, image_bytes=500, seed=1)
    changed, _ = load_rows(str(manifest), ["canny"], 2, cache_dir=str(cache))
    assert len(cache_files(cache)) == 2 and built.exists()
    assert list(changed) == pandas_rows(manifest, ["canny"], 2)[0] != list(first)
    # A shard rewritten in place (same _manifest.json) is a changed manifest too.
    os.utime(manifest / shard_name(0), ns=(0, 0))
    load_rows(str(manifest), ["canny"], 2, cache_dir=str(cache))
    assert len(cache_files(cache)) == 3


def test_the_cache_folder_comes_from_the_flag_else_the_environment(demo_manifest, tmp_path, monkeypatch):
    from train.data import load_rows
    from train.train import parse_args

    config = parse_args(["--manifest", str(demo_manifest), "--condition", "canny", "--pretrained_model_name_or_path",
                         "x", "--data_cache_dir", str(tmp_path / "flag")])
    assert config.data_cache_dir == str(tmp_path / "flag")
    load_rows(str(demo_manifest), ["canny"], 4, cache_dir=config.data_cache_dir)
    assert len(cache_files(tmp_path / "flag")) == 1
    monkeypatch.setenv("CONTROLFORGE_CACHE", str(tmp_path / "env"))
    load_rows(str(demo_manifest), ["canny"], 4)
    assert len(cache_files(tmp_path / "env")) == 1


def test_a_failed_build_leaves_nothing(tmp_path):
    from train.data import load_rows

    write_manifest(tmp_path / "m", rows_per_shard=20, shards=3, image_bytes=500)
    (tmp_path / "m" / shard_name(1)).write_bytes(b"not parquet")  # the first shard is copied, then this fails
    with pytest.raises(RuntimeError, match="(?i)parquet"):
        load_rows(str(tmp_path / "m"), ["canny"], 2, cache_dir=str(tmp_path / "cache"))
    assert [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


KILL_HOOK = """
import os, signal
if os.environ.get("KILL_BUILD_AFTER"):  # the row cache build dies after this many row groups
    import pyarrow.parquet as pq

    real, calls = pq.ParquetFile.read_row_group, []

    def read_then_die(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > int(os.environ["KILL_BUILD_AFTER"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, *args, **kwargs)

    pq.ParquetFile.read_row_group = read_then_die
"""


def test_a_build_killed_midway_leaves_no_cache_a_later_run_trusts(tmp_path, monkeypatch):
    from train import row_cache
    from train.data import load_rows

    manifest, cache = tmp_path / "m", tmp_path / "cache"
    write_manifest(manifest, rows_per_shard=20, shards=3, image_bytes=500)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_HOOK)  # runs in the build's own process
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("KILL_BUILD_AFTER", "2")
    with pytest.raises(RuntimeError, match="died"):
        load_rows(str(manifest), ["canny"], 2, cache_dir=str(cache))
    left = [p for p in cache.rglob("*") if p.is_file()]
    assert left and all(p.name.startswith(row_cache.TMP_PREFIX) for p in left)  # a partial file, not trusted
    assert left[0].stat().st_size > 0
    monkeypatch.delenv("KILL_BUILD_AFTER")
    train, held = load_rows(str(manifest), ["canny"], 2, cache_dir=str(cache))
    assert (list(train), list(held)) == pandas_rows(manifest, ["canny"], 2)
    assert [p.name for p in cache.rglob("*") if p.is_file()] == [p.name for p in cache_files(cache)]  # swept


def test_ranks_building_at_once_agree(tmp_path):
    """Without the local-main-first barrier (e.g. two machines on one shared folder) builds race safely."""
    from train.data import load_rows

    write_manifest(tmp_path / "m", rows_per_shard=30, shards=2, image_bytes=2000)
    results, errors = [None] * 4, []

    def rank(k):
        try:
            results[k] = list(load_rows(str(tmp_path / "m"), ["canny"], 2, cache_dir=str(tmp_path / "cache"))[0])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(r == results[0] for r in results) and results[0]
    assert len(cache_files(tmp_path / "cache")) == 1
    assert not [p for p in (tmp_path / "cache").rglob(".tmp-*")]


def test_the_row_view_pickles_small_whatever_the_image_bytes(tmp_path):
    from train.data import load_rows

    sizes = []
    for image_bytes in (100, 100_000):
        manifest = tmp_path / f"m{image_bytes:06d}"
        write_manifest(manifest, rows_per_shard=50, shards=2, image_bytes=image_bytes)
        train, held = load_rows(str(manifest), ["canny"], 4, cache_dir=str(tmp_path / "cache"))
        list(train)  # rows read (and the file mapped) before pickling
        sizes.append(len(pickle.dumps(train)))
        copy = pickle.loads(pickle.dumps(train))
        assert list(copy) == list(train)
    assert sizes[0] == sizes[1] < 1000 + 8 * 100, sizes


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_read_the_same_batches(demo_manifest, context):
    from train.data import ManifestDataset, RankSampler, collate, load_rows

    train, _ = load_rows(str(demo_manifest), ["canny"], 4)

    def batches(workers):
        dataset = ManifestDataset(train, ["canny"], 32, seed=3)
        sampler = RankSampler(len(dataset), 0, 1, seed=3, batch_size=2)
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, sampler=sampler, collate_fn=collate,
                                             num_workers=workers,
                                             multiprocessing_context=context if workers else None)
        return list(loader)

    serial, parallel = batches(0), batches(2)
    assert len(serial) == len(parallel) == len(train) // 2
    for a, b in zip(serial, parallel):
        assert a["indices"] == b["indices"] and a["captions"] == b["captions"]
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert torch.equal(a["conditioning_pixel_values"], b["conditioning_pixel_values"])


def test_two_ranks_share_the_rows_disjointly(demo_manifest):
    from train.data import RankSampler, load_rows

    train, _ = load_rows(str(demo_manifest), ["canny"], 4)
    shares = [list(RankSampler(len(train), rank, 2, seed=5, batch_size=2)) for rank in (0, 1)]
    ids = [{train[i]["id"] for i in share} for share in shares]
    assert not ids[0] & ids[1] and len(ids[0]) == len(ids[1]) == len(shares[0]) > 0

"""The manifest format round-trips, bounds row groups, and never shows half-written shards."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import manifests
from manifests import io as mio
from manifests.schema import IMAGE_STRUCT, SCHEMA_VERSION, manifest_schema, shard_name
from manifests.rows import empty_row


def png(value: int, size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full(size[::-1], value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def make_rows(n: int, start: int = 0) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        row = empty_row(f"id{i:04d}", f"img_{i}.png", ["canny"])
        row.update(caption=f"caption {i}", image={"bytes": png(i % 256), "path": None},
                   cond_canny={"bytes": png(255 - i % 256), "path": None}, width=24, height=16,
                   source_sha256="0" * 64, orig_width=48, orig_height=32)
        rows.append(row)
    return rows


def write_manifest(out, shards: list[list[dict]]):
    schema = manifest_schema(["canny"], {"job": "test"})
    for k, rows in enumerate(shards):
        mio.write_shard(rows, schema, str(out), shard_name(k))
    counts = {"rows": sum(map(len, shards)), "ok": sum(map(len, shards)), "error": 0, "filtered": 0}
    mio.write_manifest_json(str(out), {"schema_version": SCHEMA_VERSION, "counts": counts,
                                       "shards": [{"name": shard_name(k)} for k in range(len(shards))]})


def test_round_trip_keeps_every_value(tmp_path):
    rows = make_rows(5)
    write_manifest(tmp_path, [rows[:3], rows[3:]])
    frame = manifests.read(str(tmp_path), status=None)
    assert frame["id"].tolist() == [r["id"] for r in rows]
    assert frame.iloc[4]["image"]["bytes"] == rows[4]["image"]["bytes"]
    assert frame["width"].dtype.name == "Int32"  # pandas' nullable int32: error rows have no size
    assert manifests.read(str(tmp_path), columns=["id", "caption"]).columns.tolist() == ["id", "caption"]


def test_schema_declares_image_columns_for_datasets(tmp_path):
    write_manifest(tmp_path, [make_rows(2)])
    schema = pq.read_schema(tmp_path / shard_name(0))
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert features["image"] == {"_type": "Image"} and features["cond_canny"] == {"_type": "Image"}
    assert schema.field("image").type == IMAGE_STRUCT
    assert mio.shard_provenance(str(tmp_path / shard_name(0))) == {"job": "test"}


def test_row_groups_are_bounded_in_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(mio, "ROW_GROUP_BYTES", 2000)
    write_manifest(tmp_path, [make_rows(40)])
    meta = pq.read_metadata(tmp_path / shard_name(0))
    assert meta.num_row_groups > 1
    assert all(meta.row_group(g).total_byte_size < 20000 for g in range(meta.num_row_groups))


def test_rows_that_do_not_fit_the_schema_write_nothing(tmp_path):
    bad = make_rows(2)
    bad[1]["width"] = "not a number"
    with pytest.raises(Exception):
        mio.write_shard(bad, manifest_schema(["canny"]), str(tmp_path), shard_name(0))
    assert list(tmp_path.iterdir()) == [] or all(not p.name.startswith(("part-", ".tmp")) for p in tmp_path.iterdir())


def test_temporary_files_are_not_shards(tmp_path):
    write_manifest(tmp_path, [make_rows(2)])
    (tmp_path / f".tmp-abc-{shard_name(1)}").write_bytes(b"half written")
    assert [p.rsplit("/", 1)[1] for p in mio.list_shards(str(tmp_path))] == [shard_name(0)]


def test_reading_a_folder_without_manifest_json_says_why(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no _manifest.json"):
        manifests.read(str(tmp_path))


def test_unknown_schema_version_is_refused(tmp_path):
    mio.write_manifest_json(str(tmp_path), {"schema_version": 99})
    with pytest.raises(ValueError, match="schema_version 99"):
        manifests.read(str(tmp_path))


KILLED_MID_WRITE = """
import os, signal, sys
import pyarrow.parquet as pq
from manifests import io as mio
from manifests.schema import manifest_schema, shard_name
from tests.test_manifest_io import make_rows

real = pq.write_table

def write_then_die(table, where, **kwargs):
    real(table.slice(0, 3), where, **kwargs)  # a valid-looking Parquet file of the first rows...
    os.kill(os.getpid(), signal.SIGKILL)       # ...and the worker dies before finishing the shard

mio.pq.write_table = write_then_die
mio.write_shard(make_rows(40), manifest_schema(["canny"]), sys.argv[1], shard_name(0))
"""


def test_a_worker_killed_mid_write_leaves_no_shard_a_rerun_would_trust(tmp_path):
    """SIGKILL inside the Parquet write: whatever bytes reached the disk must not be a shard."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(tmp_path)], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr[-2000:]
    assert list(tmp_path.iterdir()), "the simulated crash should have left a partial file behind"
    assert mio.list_shards(str(tmp_path)) == []
    assert not (tmp_path / shard_name(0)).exists()


def test_an_error_mid_write_removes_the_partial_file(tmp_path, monkeypatch):
    real = pq.write_table

    def write_then_fail(table, where, **kwargs):
        real(table.slice(0, 3), where, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(mio.pq, "write_table", write_then_fail)
    with pytest.raises(OSError, match="No space left"):
        mio.write_shard(make_rows(10), manifest_schema(["canny"]), str(tmp_path), shard_name(0))
    assert list(tmp_path.iterdir()) == []


def test_shards_are_listed_in_index_order_past_99999(tmp_path):
    for index in (99_999, 100_000, 7, 1_000_000):
        (tmp_path / shard_name(index)).write_bytes(b"")
    names = [p.rsplit("/", 1)[1] for p in mio.list_shards(str(tmp_path))]
    assert names == [shard_name(7), shard_name(99_999), shard_name(100_000), shard_name(1_000_000)]


def test_a_location_resolved_once_serves_every_path_below_it(tmp_path, monkeypatch):
    import pickle

    out = mio.locate(str(tmp_path / "out"))
    assert mio.locate(out) is out and str(out) == str(tmp_path / "out")
    real, built = mio.resolve, []
    monkeypatch.setattr(mio, "resolve", lambda where: (built.append(where) if isinstance(where, str) else None)
                        or real(where))
    plan = mio.join(out, "_plan", "run")
    assert plan.fs is out.fs and plan.path == plan.uri == f"{tmp_path}/out/_plan/run"
    mio.write_shard(make_rows(3), manifest_schema(["canny"]), out, shard_name(0))
    assert [p.rsplit("/", 1)[1] for p in mio.list_shards(out)] == [shard_name(0)]
    assert built == []  # every step used the location's own filesystem
    back = pickle.loads(pickle.dumps(plan))  # what a worker receives: the same place, resolved already
    assert back == plan and back.path == plan.path and type(back.fs) is type(plan.fs)
    assert mio.join(mio.locate("file:///tmp/x?a=1"), "y").uri == "file:///tmp/x/y?a=1"

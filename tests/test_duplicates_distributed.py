"""The duplicates pass in stages of small tasks: the same table as the in-memory ``find_duplicates_in_memory``,
without any one process holding every row's hash."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import manifests
from manifests import duplicates as dup
from manifests.io import list_shards, resolve
from manifests.schema import shard_name


def collisions(n: int, seed: int) -> dict[str, list]:
    """Rows with many equal hashes, near copies (1-6 bits), shared sha256s whose hashes differ, chains,
    missing values and failed rows, in manifest order."""
    rng = np.random.default_rng(seed)
    tiles = rng.integers(-2**63, 2**63 - 1, 40, dtype=np.int64, endpoint=True)
    hashes = tiles[rng.integers(0, len(tiles), n)]
    flips = rng.integers(0, 7, n)
    for k in range(6):  # up to 6 bits flipped per row (some flips repeat a bit: fewer differ)
        bits = rng.integers(0, 64, n).astype(np.uint64)
        hashes = np.where(k < flips, (hashes.view(np.uint64) ^ (np.uint64(1) << bits)).view(np.int64), hashes)
    # chains a~b~c: each link 4 bits, the ends 8 apart, the links in later rows than the ends
    start = rng.integers(-2**63, 2**63 - 1, 30, dtype=np.int64, endpoint=True).view(np.uint64)
    chain = np.stack([start, start ^ np.uint64(0xF), start ^ np.uint64(0xF) ^ np.uint64(0xF00)], 1)
    hashes[-90:] = chain[:, [0, 2, 1]].ravel().view(np.int64)
    sha = [f"{v:064x}" for v in rng.integers(0, n // 2, n)]  # every sha256 about twice, hashes unrelated
    sha[::7] = [f"short-{v}" for v in rng.integers(0, 50, len(sha[::7]))]  # not 64 characters
    phash = [int(h) if rng.random() > 0.05 else None for h in hashes]
    sha = [s if rng.random() > 0.05 else None for s in sha]
    status = ["ok" if rng.random() > 0.05 else "error" for _ in range(n)]
    return {"id": [f"row{k:06d}" for k in range(n)], "status": status, "source_sha256": sha, "phash": phash}


def write_shards(folder, rows: dict[str, list], cuts: list[int]) -> None:
    """Shards of ``rows`` cut at ``cuts`` (uneven, some empty), holding the columns the pass reads."""
    folder.mkdir(parents=True, exist_ok=True)
    bounds = [0, *cuts, len(rows["id"])]
    for k in range(len(bounds) - 1):
        a, b = bounds[k], bounds[k + 1]
        pq.write_table(pa.table({"id": pa.array(rows["id"][a:b], pa.string()),
                                 "status": pa.array(rows["status"][a:b], pa.string()),
                                 "source_sha256": pa.array(rows["source_sha256"][a:b], pa.string()),
                                 "phash": pa.array(rows["phash"][a:b], pa.int64())}), folder / shard_name(k))


def in_memory(rows: dict[str, list], max_distance: int | None) -> pa.Table:
    ok = [k for k, s in enumerate(rows["status"]) if s == "ok"]
    return dup.find_duplicates_in_memory([rows["id"][k] for k in ok], [rows["source_sha256"][k] for k in ok],
                               [rows["phash"][k] for k in ok], max_distance)


def table_of(folder) -> pa.Table:
    return dup.read_table(str(folder)).replace_schema_metadata(None)


@pytest.mark.parametrize("max_distance", [None, 0, 1, 4, 6])
def test_the_staged_pass_gives_the_in_memory_table_on_hashes_with_many_collisions(tmp_path, max_distance):
    rows = collisions(4000, seed=3)
    rng = np.random.default_rng(1)
    cuts = sorted(rng.choice(np.arange(1, 4000), 40, replace=False).tolist()) + [4000]  # the last shard empty
    write_shards(tmp_path / "m", rows, cuts)
    expected = in_memory(rows, max_distance)
    exact = sum(expected["exact"].to_pylist())
    assert expected.num_rows > 1000 and 0 < exact and (max_distance is None or exact < expected.num_rows)
    summary = dup.write_duplicates(str(tmp_path / "m"), max_distance, shards_per_task=5, partitions=3)
    assert table_of(tmp_path / "m").equals(expected)
    assert summary == {**dup.counts(expected), "max_distance": max_distance}
    assert dup.read_summary(str(tmp_path / "m"))["ok_rows"] == rows["status"].count("ok")
    # one task for everything, and many tiny ones, give the same table
    for per_task, partitions in ((1000, 1), (1, 7)):
        dup.write_duplicates(str(tmp_path / "m"), max_distance, shards_per_task=per_task, partitions=partitions)
        assert table_of(tmp_path / "m").equals(expected)
    assert [p.name for p in (tmp_path / "m" / dup.DUPLICATES_DIR).iterdir()] == ["duplicates.parquet"]  # no scratch


def test_a_chain_across_shards_and_partitions_is_one_group_kept_at_its_first_row(tmp_path):
    a, far = 0x0123_4567_89AB_CDEF, 0x7EDC_BA98_7654_3210
    b = a ^ 0b1111  # 4 bits from a
    c = b ^ (0b1111 << 40)  # 4 bits from b, 8 from a
    rows = {"id": ["c", "x", "b", "a2", "a"], "status": ["ok"] * 5,
            "source_sha256": ["s1", "s2", "s3", "s4", "s4"], "phash": [c, far, b, None, a]}
    write_shards(tmp_path / "m", rows, [1, 2, 3, 4])
    dup.write_duplicates(str(tmp_path / "m"), 4, shards_per_task=1, partitions=4)
    assert table_of(tmp_path / "m").to_pylist() == [
        {"id": "b", "duplicate_of": "c", "distance": 4, "exact": False},
        {"id": "a2", "duplicate_of": "c", "distance": None, "exact": False},  # by its sha256, through a
        {"id": "a", "duplicate_of": "c", "distance": 8, "exact": False},
    ]
    assert table_of(tmp_path / "m").equals(in_memory(rows, 4))


def test_no_process_holds_every_hash_and_the_caller_gets_only_counts(tmp_path, monkeypatch):
    rows = collisions(3000, seed=5)
    write_shards(tmp_path / "m", rows, list(range(100, 3000, 100)))
    expected = in_memory(rows, 4)
    monkeypatch.setattr(dup, "find_duplicates_in_memory", lambda *a, **k: pytest.fail("the in-memory pass ran"))
    read = []
    real_shard_rows = dup._shard_rows

    def shard_rows(root, names, first, ok_only):
        read.append(len(names))
        return real_shard_rows(root, names, first, ok_only)

    monkeypatch.setattr(dup, "_shard_rows", shard_rows)
    returned = []

    def run_tasks(fn, calls):
        results = [fn(*args) for args in calls]
        returned.extend(results)
        return results

    dup.write_duplicates(str(tmp_path / "m"), 4, run_tasks=run_tasks, shards_per_task=4, partitions=4)
    assert table_of(tmp_path / "m").equals(expected)
    assert read and max(read) <= 4  # every task read at most its 4 shards
    assert all(r is None or isinstance(r, (int, dict)) for r in returned)  # counts, never rows


def test_a_bucket_of_near_identical_hashes_yields_a_forest_not_all_its_pairs(tmp_path, monkeypatch):
    """2,000 distinct hashes within 2 bits of one another (and 3,000 exact copies of them): every pair
    is a match, about 2 million pairs; the edges that reach the union-find stay linear in the rows."""
    rng = np.random.default_rng(0)
    base = np.uint64(0x0F0F_F0F0_1234_5678)
    bits = rng.choice(64, (2000, 2))
    distinct = np.unique(base ^ (np.uint64(1) << bits[:, 0].astype(np.uint64))
                         ^ (np.uint64(1) << bits[:, 1].astype(np.uint64)))
    hashes = np.concatenate([distinct, distinct[rng.integers(0, len(distinct), 3000)]]).view(np.int64)
    n = len(hashes)
    rows = {"id": [f"r{k}" for k in range(n)], "status": ["ok"] * n, "source_sha256": [None] * n,
            "phash": hashes.tolist()}
    write_shards(tmp_path / "m", rows, list(range(500, n, 500)))
    edges = []

    def run_tasks(fn, calls):
        if fn is dup._union:
            edges.append(dup._read_all(dup.join(calls[0][0], "edges"), dup._EDGES).num_rows)
        return [fn(*args) for args in calls]

    dup.write_duplicates(str(tmp_path / "m"), 4, run_tasks=run_tasks, shards_per_task=2, partitions=2)
    table = table_of(tmp_path / "m")
    assert table.num_rows == n - 1 and set(table["duplicate_of"].to_pylist()) == {"r0"}
    assert table.equals(in_memory(rows, 4))
    # copies point at their first (3,000 edges); each of the 5 bands' buckets gives a forest (fewer edges
    # than its hashes), against about 2 million matching pairs
    assert edges[0] <= 3000 + 5 * len(distinct) < len(distinct) ** 2 / 100


def test_the_pass_as_ray_tasks_on_the_demo_manifest_matches_the_in_memory_pass(manifest_copy, local_ray):
    from pipeline import dispatch

    fs, _ = resolve(str(manifest_copy))
    parts = [pq.read_table(s, columns=["id", "status", "source_sha256", "phash"], filesystem=fs)
             for s in list_shards(str(manifest_copy))]
    rows = pa.concat_tables(parts).to_pydict()
    expected = in_memory(rows, dup.DEFAULT_MAX_DISTANCE)
    assert expected.num_rows >= 4  # the demo holds duplicates (edge cases of one picture)
    (manifest_copy / dup.DUPLICATES_FILE).unlink()
    dup.write_duplicates(str(manifest_copy), run_tasks=dispatch.run_tasks, shards_per_task=1, partitions=2)
    assert table_of(manifest_copy).equals(expected)
    assert len(manifests.read(str(manifest_copy))) == rows["status"].count("ok") - expected.num_rows

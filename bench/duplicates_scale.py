#!/usr/bin/env python
"""The duplicates pass at collection scale: time and driver memory over millions of hashes, against
the in-memory pass and all-pairs.

    python bench/duplicates_scale.py                       # 1,000,000 rows, max distance 4
    python bench/duplicates_scale.py --rows 1000000 10000000 --skip-brute
    python bench/duplicates_scale.py --rows 200000 --sweep 3,4,5

Synthetic rows: uniform random 64-bit hashes (real pHashes are less uniform: see the note printed at
the end) with planted duplicates: ``--exact-share`` of the rows copy an earlier row's sha256 and hash
(exact duplicates), ``--near-share`` copy an earlier row's hash with 1..d bits flipped (near duplicates).
Each measurement runs in a fresh subprocess, so its peak RSS (VmHWM) is its own:

- ``pass``: ``manifests.duplicates.write_duplicates`` end to end, as the annotator runs it (its stages as
  Ray tasks on a local Ray, ``--rows-per-task`` rows each), on a manifest of Parquet shards of
  ``--shard-rows`` rows holding the pass's columns (id, status, source_sha256, phash). Peak RSS of the
  driver process alone (Ray's workers are other processes), interpreter, numpy, pyarrow and Ray included.
- ``memory``: the baseline, the in-memory pass the driver used to run (every shard's columns read into
  one table, ``find_duplicates_in_memory``, the table written): its peak RSS and time. Both tables must be equal.
- ``brute``: the baseline, an all-pairs XOR/popcount loop (numpy, in row blocks) over ``--sample``
  rows made the same way, extrapolated to all rows by (rows / sample)**2; the band search on the same
  rows must find exactly the same pairs.

Targets: 1M rows in under a minute; the driver under 512 MB, flat from 1M to 10M rows (issue 19).
"""

from __future__ import annotations

import argparse
import binascii
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TIME_TARGET_S = 60.0
RSS_TARGET_MB = 512.0


def synthetic(rows: int, near_share: float, exact_share: float, max_distance: int, seed: int = 0):
    """(ids, sha256 hex strings, int64 hashes, planted exact, planted near) in manifest order."""
    import numpy as np

    rng = np.random.default_rng(seed)
    hashes = rng.integers(-2**63, 2**63 - 1, rows, dtype=np.int64, endpoint=True)
    sha = rng.integers(0, 2**63 - 1, (rows, 4), dtype=np.int64, endpoint=True)
    copies = rng.random(rows)
    exact = np.flatnonzero(copies < exact_share)
    near = np.flatnonzero((copies >= exact_share) & (copies < exact_share + near_share))
    exact, near = exact[exact > 0], near[near > 0]
    # Each copy's source: a random earlier row that is not itself a copy (so every planted copy is found,
    # and its group's first row is its source).
    originals = np.flatnonzero(copies >= exact_share + near_share)
    originals = originals[originals < rows]

    def earlier_original(rows_: np.ndarray) -> np.ndarray:
        below = np.searchsorted(originals, rows_)  # originals before each row (row 0 is always one)
        return originals[(rng.random(rows_.size) * below).astype(np.int64)]

    exact, near = exact[np.searchsorted(originals, exact) > 0], near[np.searchsorted(originals, near) > 0]
    exact_src, near_src = earlier_original(exact), earlier_original(near)
    sha[exact] = sha[exact_src]
    hashes[exact] = hashes[exact_src]
    flips = rng.integers(1, max(1, max_distance) + 1, near.size)
    masks = np.zeros(near.size, np.uint64)
    for k in range(int(flips.max(initial=0))):  # k-th flipped bit for the rows that flip more than k
        bits = rng.integers(0, 64, near.size).astype(np.uint64)
        masks = np.where(k < flips, masks | (np.uint64(1) << bits), masks)  # repeats flip fewer: still <= d
    hashes[near] = (hashes[near_src].view(np.uint64) ^ masks).view(np.int64)
    return sha, hashes, exact.size, near.size


def _fixed_strings(data: bytes, width: int):
    """Equal-width ASCII strings packed in ``data`` as an Arrow string array (no Python string per row)."""
    import numpy as np
    import pyarrow as pa

    n = len(data) // width
    offsets = np.arange(0, n * width + 1, width, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def write_manifest(folder: Path, rows: int, shard_rows: int, near_share: float, exact_share: float,
                   max_distance: int) -> dict:
    """Shards holding only the columns the pass reads (written by this script, not by the pipeline)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from manifests.schema import shard_name

    sha, hashes, exact, near = synthetic(rows, near_share, exact_share, max_distance)
    for k, a in enumerate(range(0, rows, shard_rows)):
        b = min(rows, a + shard_rows)
        ids = "".join(f"row{i:010d}" for i in range(a, b)).encode()
        table = pa.table({"id": _fixed_strings(ids, 13), "status": pa.array(["ok"] * (b - a)),
                          "source_sha256": _fixed_strings(binascii.hexlify(sha[a:b].astype(">i8").tobytes()), 64),
                          "phash": pa.array(hashes[a:b], pa.int64())})
        pq.write_table(table, folder / shard_name(k), compression="zstd")
    np.save(folder.parent / "hashes.npy", hashes)
    return {"planted_exact": exact, "planted_near": near, "shards": k + 1}


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child_pass(manifest: str, max_distance: int, shards_per_task: int) -> dict:
    """The pass as the annotator runs it: stages as Ray tasks; this process is the driver."""
    from manifests.duplicates import write_duplicates
    from pipeline import dispatch, ray_runtime

    ray_runtime.connect(None)
    before = peak_rss_mb()
    t = time.perf_counter()
    summary = write_duplicates(manifest, max_distance, run_tasks=dispatch.run_tasks, shards_per_task=shards_per_task)
    seconds = time.perf_counter() - t
    ray_runtime.shutdown()
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "rss_after_imports_mb": before, **summary}


def child_memory(manifest: str, max_distance: int, out: str) -> dict:
    """The baseline: the in-memory pass the driver used to run over every row's columns at once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from manifests.duplicates import COLUMNS, counts, find_duplicates_in_memory
    from manifests.io import list_shards

    before = peak_rss_mb()
    t = time.perf_counter()
    rows = pa.concat_tables([pq.read_table(s, columns=list(COLUMNS)) for s in list_shards(manifest)])
    rows = rows.filter(pa.compute.equal(rows["status"], "ok"))
    found = find_duplicates_in_memory(rows["id"], rows["source_sha256"], rows["phash"], max_distance)
    pq.write_table(found, out, compression="zstd")
    return {"seconds": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb(), "rss_after_imports_mb": before,
            **counts(found)}


def brute_pairs(hashes, max_distance: int):
    """Every pair (i < j) within ``max_distance`` bits: the all-pairs loop, vectorised per row block."""
    import numpy as np

    from manifests.duplicates import _popcount

    h = hashes.view(np.uint64)
    found = []
    block = 256
    for a in range(0, len(h), block):
        rows = h[a:a + block]
        close = _popcount(rows[:, None] ^ h[None, a:]) <= max_distance  # only j >= a
        i, j = np.nonzero(close)
        i, j = i + a, j + a
        keep = i < j
        found.append(np.stack([i[keep], j[keep]], 1))
    return np.concatenate(found)


def child_brute(sample: int, max_distance: int, near_share: float, exact_share: float) -> dict:
    import numpy as np

    from manifests.duplicates import near_pairs

    # Rows generated like the full set's (same planted shares), so the sample holds planted pairs to find.
    _, part, _, _ = synthetic(sample, near_share, exact_share, max_distance, seed=1)
    t = time.perf_counter()
    brute = brute_pairs(part, max_distance)
    brute_s = time.perf_counter() - t
    distinct, inverse = np.unique(part.view(np.uint64), return_inverse=True)
    t = time.perf_counter()
    i, j = near_pairs(distinct, max_distance)
    bands_s = time.perf_counter() - t
    # same pairs? compare as pairs of distinct values (the pass handles equal values apart)
    ours = {(min(a, b), max(a, b)) for a, b in zip(distinct[i].tolist(), distinct[j].tolist())}
    theirs = {(min(a, b), max(a, b)) for a, b in zip(part.view(np.uint64)[brute[:, 0]].tolist(),
                                                       part.view(np.uint64)[brute[:, 1]].tolist()) if a != b}
    return {"sample": sample, "brute_s": brute_s, "bands_s": bands_s, "pairs": len(theirs), "same": ours == theirs,
            "peak_rss_mb": peak_rss_mb()}


def child_sweep(hashes_path: str, max_distance: int) -> dict:
    import numpy as np

    from manifests.duplicates import near_pairs

    hashes = np.unique(np.load(hashes_path).view(np.uint64))
    t = time.perf_counter()
    i, _ = near_pairs(hashes, max_distance)
    return {"max_distance": max_distance, "seconds": time.perf_counter() - t, "pairs": len(i),
            "peak_rss_mb": peak_rss_mb()}


def run_child(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(rows: int, args: argparse.Namespace, tmp: Path) -> dict:
    """Both passes (and the optional baselines) on one synthetic manifest of ``rows`` rows."""
    d = args.max_distance
    manifest = tmp / f"manifest-{rows}"
    manifest.mkdir()
    t = time.perf_counter()
    planted = write_manifest(manifest, rows, args.shard_rows, args.near_share, args.exact_share, d)
    print(f"\nsynthetic manifest: {rows:,} ok rows in {planted['shards']:,} shards (id, status, source_sha256, "
          f"phash), {planted['planted_exact']:,} planted exact copies, {planted['planted_near']:,} planted "
          f"near copies (1..{d} bits), written in {time.perf_counter() - t:.1f} s")
    per_task = str(max(1, args.rows_per_task // args.shard_rows))
    staged = run_child("pass", str(manifest), str(d), per_task)
    memory = run_child("memory", str(manifest), str(d), str(tmp / "memory.parquet"))
    import pyarrow.parquet as pq

    from manifests.duplicates import DUPLICATES_FILE
    same = pq.read_table(manifest / DUPLICATES_FILE).replace_schema_metadata(None).equals(
        pq.read_table(tmp / "memory.parquet").replace_schema_metadata(None))
    print(f"  staged pass (Ray tasks, {args.rows_per_task:,} rows a task): {staged['seconds']:.1f} s, driver peak RSS "
          f"{staged['peak_rss_mb']:.0f} MB (after imports and Ray start {staged['rss_after_imports_mb']:.0f} MB); "
          f"exact {staged['exact']:,}, near {staged['near']:,}")
    print(f"  in-memory pass (baseline):     {memory['seconds']:.1f} s, peak RSS {memory['peak_rss_mb']:.0f} MB "
          f"(after imports {memory['rss_after_imports_mb']:.0f} MB); driver memory staged / in-memory "
          f"{staged['peak_rss_mb'] / memory['peak_rss_mb']:.2f}x, time {staged['seconds'] / memory['seconds']:.2f}x; "
          f"same table: {same}")
    result = {"rows": rows, "staged": staged, "memory": memory, "same": same}
    if not args.skip_brute:
        brute = run_child("brute", str(args.sample), str(d), str(args.near_share), str(args.exact_share))
        extrapolated = brute["brute_s"] * (rows / args.sample) ** 2
        print(f"  all-pairs baseline on {brute['sample']:,} sampled rows: {brute['brute_s']:.2f} s "
              f"(band search on the same rows {brute['bands_s']:.3f} s, {brute['brute_s'] / brute['bands_s']:.0f}x); "
              f"same pairs: {brute['same']} ({brute['pairs']} pairs); extrapolated to {rows:,} rows: "
              f"{extrapolated:,.0f} s ({extrapolated / 3600:.1f} h) = {extrapolated / memory['seconds']:,.0f}x "
              "the in-memory pass")
        result["same"] &= brute["same"]
    for sweep in [run_child("sweep", str(tmp / "hashes.npy"), x) for x in args.sweep.split(",") if x.strip()]:
        print(f"  band search alone, {rows:,} hashes, max distance {sweep['max_distance']}: "
              f"{sweep['seconds']:.1f} s, peak RSS {sweep['peak_rss_mb']:.0f} MB, {sweep['pairs']:,} pairs")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000], help="manifest sizes to measure")
    p.add_argument("--shard-rows", type=int, default=10_000, help="rows per synthetic shard")
    p.add_argument("--rows-per-task", type=int, default=250_000, help="rows each task of the staged pass reads")
    p.add_argument("--max-distance", type=int, default=4)
    p.add_argument("--near-share", type=float, default=0.05, help="share of rows planted as near copies")
    p.add_argument("--exact-share", type=float, default=0.01, help="share of rows planted as exact copies")
    p.add_argument("--sample", type=int, default=20_000, help="rows of the all-pairs baseline")
    p.add_argument("--skip-brute", action="store_true", help="leave out the all-pairs baseline")
    p.add_argument("--sweep", default="", help="also time the band search alone at these distances, e.g. 3,4,5")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "pass":
            result = child_pass(rest[0], int(rest[1]), int(rest[2]))
        elif kind == "memory":
            result = child_memory(rest[0], int(rest[1]), rest[2])
        elif kind == "brute":
            result = child_brute(int(rest[0]), int(rest[1]), float(rest[2]), float(rest[3]))
        else:
            result = child_sweep(rest[0], int(rest[1]))
        print(json.dumps(result))
        return 0

    results = []
    for rows in args.rows:
        with tempfile.TemporaryDirectory(prefix="dupbench-") as tmp:
            results.append(measure(rows, args, Path(tmp)))
    print("\ntargets:")
    ok = True
    for r in results:
        staged = r["staged"]
        time_ok = staged["seconds"] < TIME_TARGET_S or r["rows"] > 1_000_000
        rss_ok = staged["peak_rss_mb"] < RSS_TARGET_MB
        ok &= time_ok and rss_ok and r["same"]
        print(f"  {r['rows']:,} rows: driver peak RSS {staged['peak_rss_mb']:.0f} MB < {RSS_TARGET_MB:.0f} MB "
              f"{'MET' if rss_ok else 'MISSED'} (in-memory {r['memory']['peak_rss_mb']:.0f} MB)"
              + (f"; under {TIME_TARGET_S:.0f} s {'MET' if time_ok else 'MISSED'} ({staged['seconds']:.1f} s)"
                 if r["rows"] <= 1_000_000 else f"; {staged['seconds']:.1f} s")
              + f"; same table as the in-memory pass{' and all-pairs' if not args.skip_brute else ''}: "
              + ("YES" if r["same"] else "NO"))
    if len(results) > 1:
        a, b = results[0], results[-1]
        print(f"  driver peak from {a['rows']:,} to {b['rows']:,} rows: {a['staged']['peak_rss_mb']:.0f} -> "
              f"{b['staged']['peak_rss_mb']:.0f} MB ({b['staged']['peak_rss_mb'] / a['staged']['peak_rss_mb']:.2f}x); "
              f"in-memory {a['memory']['peak_rss_mb']:.0f} -> {b['memory']['peak_rss_mb']:.0f} MB")
    print("note: uniform hashes; real pHashes are less uniform (the DC bit is always 1, low frequencies "
          "correlate), so same-band buckets are larger and the band search slower than here.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

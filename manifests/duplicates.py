"""Exact and near duplicates of a manifest, kept in a side table; the shards stay as written.

Every ok row carries a 64-bit perceptual hash (``phash``: int64 holding the 64 bits, two's complement).
After all shards are written, one pass over three small columns (``id``, ``source_sha256``, ``phash``
of the ok rows) finds

- exact duplicates: the same ``source_sha256`` (byte-identical raw files), and
- near duplicates: ``phash`` within ``max_distance`` bits (Hamming distance), the same picture
  resized, re-encoded, slightly recoloured.

and writes ``_duplicates/duplicates.parquet`` (``DUPLICATES_FILE``) in the manifest folder: one row per
duplicate, ``(id, duplicate_of, distance, exact)``. Readers (``manifests.read``, the trainer) leave those ids out unless asked to keep
them; a manifest without the table (older manifests) reads as before.

Groups and the kept row. Rows linked by an exact or near match form one group, transitively (union-find):
if a~b and b~c, then a, b and c are one group even when a and c are more than ``max_distance`` apart. The
kept row of a group is its first in manifest order (shard order, then row order); every other member
names it in ``duplicate_of``. Transitive groups are the choice because a pairwise rule has no stable
answer for chains (keeping a and c but dropping b depends on the order rows are looked at), and because
a chain of small edits of one picture is still one picture. ``exact`` is true when the member has the
kept row's ``source_sha256`` (its ``distance`` is then 0); otherwise ``distance`` is the member's Hamming
distance to the kept row (so it can exceed ``max_distance`` in a chain), null where either hash is
missing (a shard written before ``phash``). Only ok rows take part.

Near matches without an all-pairs loop (pigeonhole / multi-index hashing). Split the 64 bits into
``max_distance + 1`` bands: two hashes that differ in at most ``max_distance`` bits leave at least one
band identical, so every match shares a band value with its partner. For each band the unique hashes
are sorted by that band's value and only neighbours within a run of equal values are compared (one
XOR and popcount each, vectorised). The search is exact: it finds what an all-pairs loop finds. Its
cost is the number of same-band pairs, about ``n**2 / 2**(64 / (max_distance + 1))`` per band for
uniform hashes, which is why large distances do not scale (see ``DEFAULT_MAX_DISTANCE``).

At collection scale (``write_duplicates``) the same pass runs in stages of small independent tasks over
scratch files (``DistributedPass``), which the annotator runs as Ray tasks: no process holds every row's
hash, and the table is identical to ``find_duplicates_in_memory`` over all rows (the in-memory reference).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import uuid
import zlib
from pathlib import PurePosixPath
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from manifests.io import Location, delete_quietly, join, list_shards, resolve
from manifests.schema import STATUS_OK

#: The side table's folder and file: a leading underscore, so pandas/pyarrow and ``datasets`` reading the
#: folder as Parquet skip it, as they skip ``_stats``; in a sub-folder, so a ``*.parquet`` glob of the
#: manifest (``datasets.load_dataset("parquet", data_files=".../*.parquet")``) matches shards only.
DUPLICATES_DIR = "_duplicates"
DUPLICATES_FILE = f"{DUPLICATES_DIR}/duplicates.parquet"

#: Hamming distance (of 64 bits) up to which two images count as near duplicates. Measured on 42 photos
#: (scikit-image's and the demo's): 0.5x resizes, JPEG q70/q50/q30, 0.5x + JPEG q70, blur and contrast
#: changes moved the hash by 0-4 bits, mostly 0-2 (the exceptions: one 0.25x resize 8, one brightness
#: shift 6); 23 distinct scikit-image photos were 20 bits apart or more, 200 LFW faces (one layout,
#: 25x25 px) 8 or more (1 pair at 8, 13 of 19,900 at 12 or less). Crops of 5% or more, rotations and
#: flips are mostly not found (up to 26, 12 and ~31 bits). 4 is the largest distance that keeps well
#: clear of different pictures and keeps the band search fast: 1M uniform hashes took 0.9 s at 3,
#: 3.8 s at 4, 16.5 s at 5, 57 s at 6 (bench/duplicates_scale.py, 2 shared cores).
DEFAULT_MAX_DISTANCE = 4

#: Columns the pass reads from each shard (``phash`` may be missing: older manifests).
COLUMNS = ("id", "status", "source_sha256", "phash")

SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("duplicate_of", pa.string(), nullable=False),
    pa.field("distance", pa.int32()),
    pa.field("exact", pa.bool_(), nullable=False),
])

# Key of the side table's key-value metadata: max_distance, counts, when it was made.
METADATA_KEY = b"controlforge_duplicates"

_HASH_SIDE = 32  # pHash: the grayscale image at 32x32, its 8x8 lowest DCT frequencies
_LOW = 8


def _dct_rows(n: int, k: int) -> np.ndarray:
    """The first ``k`` rows of the unnormalised DCT-II matrix of size ``n`` (scipy.fftpack.dct's default,
    ``2 * sum x[j] cos(pi * i * (2j + 1) / 2n)``): imagehash uses it, and the per-frequency scale matters
    because the bits compare coefficients to their median."""
    i = np.arange(k)[:, None]
    j = np.arange(n)[None, :]
    return 2.0 * np.cos(np.pi * i * (2 * j + 1) / (2 * n))


_DCT = _dct_rows(_HASH_SIDE, _LOW)


def phash(image: np.ndarray) -> int:
    """The 64-bit DCT perceptual hash of an image, as a signed int64-compatible int.

    ``image``: uint8 HxW (grayscale), HxWx3 (RGB, the manifest's prepared image) or HxWx4 (alpha ignored).
    The standard pHash (hackerfactor's, as ``imagehash.phash``): grayscale, resize to 32x32, 2-D DCT,
    keep the 8x8 lowest frequencies (DC included), one bit per coefficient: above their median. The first
    coefficient (row-major) is the most significant bit, so ``phash(x) & (2**64 - 1)`` printed as 16 hex
    digits equals ``str(imagehash.phash(...))`` wherever the two agree bit for bit (they resize with
    different filters: cv2's area average here, Pillow's Lanczos there).
    """
    import cv2

    a = np.asarray(image)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        raise TypeError(f"phash needs a uint8 image, not {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 3:
        if a.shape[2] not in (3, 4):
            raise ValueError(f"phash needs HxW, HxWx3 or HxWx4, not shape {a.shape}")
        a = cv2.cvtColor(np.ascontiguousarray(a[..., :3]), cv2.COLOR_RGB2GRAY)
    elif a.ndim != 2:
        raise ValueError(f"phash needs HxW, HxWx3 or HxWx4, not shape {a.shape}")
    if a.size == 0:
        raise ValueError("phash of an empty image")
    small = cv2.resize(a, (_HASH_SIDE, _HASH_SIDE), interpolation=cv2.INTER_AREA).astype(np.float64)
    low = _DCT @ small @ _DCT.T  # rows then columns, as dct(dct(x, axis=0), axis=1), cut to 8x8
    # Coefficients that are zero in exact arithmetic (flat or symmetric images) come out as +-1e-13 noise;
    # made exactly zero, such images hash the same on every machine (the pixels are integers, so a true
    # coefficient this small does not occur in practice).
    low[np.abs(low) < 1e-6] = 0.0
    bits = (low > np.median(low)).ravel()
    return int(np.packbits(bits).view(">i8")[0])


def hamming(a: int, b: int) -> int:
    """Bits that differ between two 64-bit hashes (signed or unsigned ints)."""
    return ((a ^ b) & 0xFFFF_FFFF_FFFF_FFFF).bit_count()


def _bands(max_distance: int) -> list[tuple[int, int]]:
    """``max_distance + 1`` (shift, width) bands covering the 64 bits, widths differing by at most one."""
    count = max_distance + 1
    widths = [64 // count + (1 if k < 64 % count else 0) for k in range(count)]
    shifts = np.cumsum([0, *widths[:-1]]).tolist()
    return list(zip(shifts, widths))


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (x * np.uint64(0x0101010101010101)) >> np.uint64(56)


def near_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j), i != j, of ``hashes`` (distinct uint64 values) within ``max_distance`` bits.

    Exact (no pair missed, none too far), by band buckets; a pair found in several bands appears
    several times. Memory: a few arrays of ``len(hashes)`` plus the pairs found."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    found = [hit for shift, width in _bands(max_distance) for hit in _band_pairs(hashes, shift, width, max_distance)]
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return (np.concatenate([i for i, _ in found]).astype(np.int64),
            np.concatenate([j for _, j in found]).astype(np.int64))


def _band_pairs(hashes: np.ndarray, shift: int, width: int, max_distance: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Index pairs of ``hashes`` within ``max_distance`` bits that share the band ``(shift, width)``,
    in chunks (one per comparison distance ``k`` below)."""
    n = len(hashes)
    if n < 2:
        return
    index = np.int32 if n < 2**31 else np.int64  # half the memory traffic where it fits
    key = (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
    order = np.argsort(key, kind="stable").astype(index)
    key = key[order]
    h = hashes[order]
    # Runs of equal keys: compare each element with the one k places on, for k = 1, 2, ... while
    # that one is still in its run. ``active`` (with its hash and its run's end, carried along so
    # that only the partner is gathered) shrinks to the elements of the longer runs.
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    del key
    ends = np.r_[starts[1:], n].astype(index)
    run_end = np.repeat(ends, np.diff(np.r_[starts, n]))
    active = np.flatnonzero(run_end - np.arange(n, dtype=index) > 1).astype(index)
    active_hash, active_end = h[active], run_end[active]
    del run_end
    k = 1
    while active.size:
        partner = active + k
        hit = _popcount(active_hash ^ h[partner]) <= max_distance
        if hit.any():
            yield order[active[hit]], order[partner[hit]]
        k += 1
        more = partner + 1 < active_end
        active, active_hash, active_end = active[more], active_hash[more], active_end[more]


def _components(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """For each of ``n`` nodes, the smallest node of its connected component (edges ``left``-``right``).

    Union-find done on whole arrays: hook every edge's larger root under the smaller, then halve paths by
    pointer jumping, until no edge joins two roots. A root only ever moves to a smaller node, so each
    component ends rooted at its smallest member: its first row in manifest order."""
    parent = np.arange(n, dtype=np.int64)
    if left.size == 0:
        return parent
    left, right = left.astype(np.int64), right.astype(np.int64)
    while True:
        while True:  # pointer jumping: every node to its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        a, b = parent[left], parent[right]
        apart = a != b
        if not apart.any():
            return parent
        a, b = a[apart], b[apart]
        np.minimum.at(parent, np.maximum(a, b), np.minimum(a, b))
        # keep only edges still between two components (the others cannot change anything again)
        left, right = left[apart], right[apart]


def _as_hashes(phashes: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 values, valid mask) from a list with Nones, a numpy array or a pyarrow (chunked) array."""
    if phashes is None:
        return np.zeros(n, np.uint64), np.zeros(n, bool)
    if isinstance(phashes, np.ndarray) and phashes.dtype != object:
        return phashes.astype(np.int64).view(np.uint64), np.ones(n, bool)
    arr = phashes if isinstance(phashes, (pa.Array, pa.ChunkedArray)) else pa.array(phashes, pa.int64())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], pa.int64())
    arr = arr.cast(pa.int64())
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    values = arr.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64).view(np.uint64)
    return values, valid


# Odd 64-bit constants mixing a 64-byte sha256 hex digest (8 words) into one 64-bit key.
_MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x94D049BB133111EB, 0xBF58476D1CE4E5B9], np.uint64)


def _codes(values: Any, n: int) -> np.ndarray:
    """An integer code per value, equal values equal codes, -1 for null.

    sha256 hex digests (64 characters each) are mixed into 64-bit keys in numpy, chunk by chunk, and
    grouped by key; every row grouped with another is then compared in full with its group's first, so
    the codes are exact (on a collision, or for values that are not 64 characters, Arrow's dictionary
    encoding does it: the same codes, about three times the memory for a million digests)."""
    if values is None:
        return np.full(n, -1, np.int64)
    arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values)
    keys = np.zeros(n, np.uint64)
    valid = np.zeros(n, bool)
    pos = 0
    try:
        for chunk in arr.chunks if isinstance(arr, pa.ChunkedArray) else [arr]:
            fixed = chunk.cast(pa.binary(64))
            m = len(fixed)
            if m and fixed.null_count < m:
                keys[pos:pos + m] = _digest_keys(fixed)
                valid[pos:pos + m] = fixed.is_valid().to_numpy(zero_copy_only=False)
            pos += m
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return _dictionary_codes(arr)
    codes = np.full(n, -1, np.int64)
    rows = np.flatnonzero(valid)
    if rows.size:
        _, first, inverse = np.unique(keys[rows], return_index=True, return_inverse=True)
        codes[rows] = inverse
        target = rows[first][inverse]
        later = target != rows
        if later.any():
            same = pc.equal(arr.take(pa.array(rows[later])), arr.take(pa.array(target[later])))
            if not pc.all(same).as_py():  # two digests with one 64-bit key: never seen, handled anyway
                return _dictionary_codes(arr)
    return codes


def _dictionary_codes(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Codes by Arrow's dictionary encoding (one dictionary for all chunks), -1 for null."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], arr.type)
    encoded = pc.dictionary_encode(arr)
    return encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def _first_of_equal(codes: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges (row, first row with the same code) for every valid row that is not the first of its code."""
    rows = np.flatnonzero(valid)
    if rows.size < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    _, first, inverse = np.unique(codes[rows], return_index=True, return_inverse=True)
    target = rows[first][inverse]
    later = rows != target
    return rows[later], target[later]


def find_duplicates_in_memory(ids: Sequence[str] | pa.Array, sha256s: Sequence[str | None] | pa.Array | None,
                    phashes: Sequence[int | None] | np.ndarray | pa.Array | None,
                    max_distance: int | None = DEFAULT_MAX_DISTANCE) -> pa.Table:
    """The duplicates among rows given in manifest order: a table ``(id, duplicate_of, distance, exact)``,
    one row per duplicate (never for a kept row), in manifest order.

    ``sha256s`` and ``phashes`` may hold nulls (that row is then matched only by the other), or be None.
    ``max_distance`` None: exact duplicates only (``phashes`` are then used for ``distance`` alone); 0:
    also equal hashes. See the module docstring for groups, the kept row and ``distance``.
    """
    check_max_distance(max_distance)
    ids = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(ids, pa.string())
    n = len(ids)
    sha = _codes(sha256s, n)
    hashes, valid = _as_hashes(phashes, n)
    if len(sha) != n or len(hashes) != n:
        raise ValueError(f"ids, sha256s and phashes differ in length ({n}, {len(sha)}, {len(hashes)})")

    edges = [_first_of_equal(sha, sha >= 0)]  # exact: same raw bytes
    # Equal hashes first (one representative per value), then near pairs among the distinct values only:
    # copies of one image (and flat images, which all hash alike) would otherwise make huge buckets.
    rows = np.flatnonzero(valid)
    if rows.size and max_distance is not None:
        distinct, first, inverse = np.unique(hashes[rows], return_index=True, return_inverse=True)
        representative = rows[first]
        same = rows != representative[inverse]
        edges.append((rows[same], representative[inverse][same]))
        if max_distance > 0:
            i, j = near_pairs(distinct, max_distance)
            edges.append((representative[i], representative[j]))
    left = np.concatenate([e[0] for e in edges])
    right = np.concatenate([e[1] for e in edges])
    root = _components(n, left, right)

    members = np.flatnonzero(root != np.arange(n))  # in manifest order
    kept = root[members]
    exact = (sha[members] >= 0) & (sha[members] == sha[kept])
    both = valid[members] & valid[kept]
    distance = _popcount(hashes[members] ^ hashes[kept]).astype(np.int32)
    distance = np.where(exact, 0, distance)
    id_array = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    return pa.table({
        "id": id_array.take(pa.array(members)).cast(pa.string()),
        "duplicate_of": id_array.take(pa.array(kept)).cast(pa.string()),
        "distance": pa.array(distance, pa.int32(), mask=~(exact | both)),
        "exact": pa.array(exact, pa.bool_()),
    }, schema=SCHEMA)


def check_max_distance(max_distance: int | None) -> None:
    """ValueError unless ``max_distance`` is None (exact duplicates only) or within 0..63."""
    if max_distance is not None and not (isinstance(max_distance, (int, np.integer)) and 0 <= max_distance <= 63):
        raise ValueError(f"max_distance must be None (exact duplicates only) or 0..63 bits, not {max_distance!r}")


def counts(table: pa.Table) -> dict[str, int]:
    """``{"exact": n, "near": m}`` of a duplicates table."""
    exact = int(pc.sum(table["exact"]).as_py() or 0) if table.num_rows else 0
    return {"exact": exact, "near": table.num_rows - exact}


#: Runs ``fn(*args)`` for each ``args`` of a list, possibly in parallel elsewhere, and returns the results
#: in order: ``pipeline.dispatch.run_tasks`` runs them as Ray tasks; the default runs them here, one by one.
RunTasks = Callable[[Callable[..., Any], list[tuple]], list[Any]]

#: Shards read by one task of the pass (the annotator passes about 250,000 rows' worth).
SHARDS_PER_TASK = 256


def run_here(fn: Callable[..., Any], calls: list[tuple]) -> list[Any]:
    """``RunTasks`` in this process, one call after the other."""
    return [fn(*args) for args in calls]


def write_duplicates(manifest_path: str | Location, max_distance: int | None = DEFAULT_MAX_DISTANCE,
                     computed_from: str | None = None, run_tasks: RunTasks = run_here,
                     shards_per_task: int = SHARDS_PER_TASK, partitions: int | None = None) -> dict[str, Any]:
    """Find the duplicates among the ok rows of the manifest's shards and write ``DUPLICATES_FILE``
    (atomically: a temp file moved into place); returns ``{"exact": n, "near": m, "max_distance": d}``.

    The same table as ``find_duplicates_in_memory`` over all ok rows in manifest order, made in stages of small
    tasks that ``run_tasks`` runs (Ray tasks in the annotator), so the caller never holds every row's
    hash: each task reads or writes a slice through scratch files under ``_duplicates/``
    (``DistributedPass``). Reads only ``id``, ``status``, ``source_sha256`` and ``phash`` of each shard;
    shards without ``phash`` (written before it existed) take part through ``source_sha256`` only. Needs
    no ``_manifest.json``. Rows that are not ok never count: a failed copy must not be what a good one
    is a duplicate of. ``max_distance`` None finds exact duplicates only (``near`` is then 0).
    ``computed_from`` (what the caller made the table from, e.g. a digest of the shards' stats) is kept
    in the table's metadata, so a rerun can tell whether the table is still current."""
    check_max_distance(max_distance)
    names = [PurePosixPath(p).name for p in list_shards(manifest_path)]
    work = DistributedPass(_uri(manifest_path), names, max_distance, max(1, shards_per_task), partitions)
    fs, base = resolve(work.root)
    try:
        ok_rows, found = work.run(run_tasks)
        summary = {**found, "max_distance": max_distance}
        metadata = {**summary, "ok_rows": ok_rows, "computed_from": computed_from,
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        run_tasks(_concat_parts, [(work.work, len(work.groups), join(work.root, DUPLICATES_FILE),
                                   json.dumps(metadata, sort_keys=True))])
    finally:
        try:
            fs.delete_dir(resolve(work.work)[1])
        except (FileNotFoundError, OSError):
            pass
    return summary


def _uri(path: str | Location) -> str | Location:
    """An absolute path or URI that resolves the same in any process (tasks run in other folders), or the
    resolved location itself (tasks receive its filesystem)."""
    if isinstance(path, Location):
        return path
    return path.rstrip("/") if "://" in path else resolve(path)[1]


@dataclasses.dataclass
class DistributedPass:
    """The duplicates pass in stages of independent tasks; nothing but file names passes through the caller.

    Positions: row ``r`` of the ``k``-th shard (in ``list_shards`` order) is ``k << 32 | r``, so sorting
    positions is manifest order, and the first of a group is its smallest position.

    1. ``_scatter`` (a task per group of shards): each ok row's (position, sha256) to a partition by
       sha256, (position, phash) to a partition by phash.
    2. ``_reduce`` (a task per partition): equal sha256s and equal hashes meet in one partition; each
       row points to the first of its equals (edges). Each distinct hash, once, with its first row, goes
       on to a bucket of each band (by the band's value).
    3. ``_near`` (a task per band and bucket): the band search over that bucket's distinct hashes; its
       pairs are reduced to a spanning forest as they come, so a bucket of near-identical hashes yields
       fewer edges than hashes, never all its pairs.
    4. ``_union`` (one task): union-find over the edges only (rows in no edge are in no group); each
       member and its group's first row, filed under the first row's group of shards.
    5. ``_lookup`` (a task per group): the kept rows' id, sha256 and hash, filed under the member's group.
    6. ``_explain`` (a task per group): each member's table row (exact, distance), in manifest order.
    7. ``_concat_parts`` (one task): the groups' parts, in order, into ``DUPLICATES_FILE``.

    Equal hashes are collapsed before the band search (steps 2-3), so copies of one picture cost one
    hash there, however many there are. Exact: the same edges as ``find_duplicates_in_memory`` up to connectivity
    (a forest has the components of the pairs it replaces), and the same kept row and fields.
    """

    root: str | Location
    names: list[str]
    max_distance: int | None
    shards_per_task: int
    partitions: int | None = None
    """Partitions of the sha256/hash shuffle and buckets per band (default: one per group of shards)."""
    work: str | Location = ""
    """Scratch folder (default: a fresh one under ``_duplicates/``, removed by ``write_duplicates``)."""
    groups: list[tuple[int, list[str]]] = dataclasses.field(init=False)
    """(first shard's position, shard names) of each task's group of shards."""

    def __post_init__(self) -> None:
        self.groups = [(k, self.names[k:k + self.shards_per_task])
                       for k in range(0, len(self.names), self.shards_per_task)]
        if self.partitions is None:  # a reduce task about as big as a scatter task
            self.partitions = max(1, len(self.groups))
        self.work = self.work or join(self.root, DUPLICATES_DIR, f".tmp-work-{uuid.uuid4().hex}")

    def run(self, run_tasks: RunTasks) -> tuple[int, dict[str, int]]:
        """Stages 1-6; returns (ok rows, ``{"exact": n, "near": m}``)."""
        w, parts, d, starts = self.work, self.partitions, self.max_distance, [k for k, _ in self.groups]
        ok_rows = run_tasks(_scatter, [(self.root, names, k, g, w, parts) for g, (k, names) in enumerate(self.groups)])
        run_tasks(_reduce, [(w, p, parts, d) for p in range(parts)])
        if d:
            run_tasks(_near, [(w, b, q, d) for b in range(d + 1) for q in range(parts)])
        run_tasks(_union, [(w, starts)])
        run_tasks(_lookup, [(self.root, names, k, g, w, starts) for g, (k, names) in enumerate(self.groups)])
        found = run_tasks(_explain, [(self.root, names, k, g, w) for g, (k, names) in enumerate(self.groups)])
        return sum(ok_rows), {key: sum(f[key] for f in found) for key in ("exact", "near")}


# Scratch tables of the pass (one schema per kind of file).
_SHA = pa.schema([("pos", pa.int64()), ("sha", pa.string())])
_HASH = pa.schema([("pos", pa.int64()), ("phash", pa.int64())])
_EDGES = pa.schema([("left", pa.int64()), ("right", pa.int64())])
_ROOTS = pa.schema([("member", pa.int64()), ("root", pa.int64()), ("root_id", pa.string()),
                    ("root_sha", pa.string()), ("root_phash", pa.int64())])


def _write(path: str | Location, table: pa.Table) -> None:
    """One scratch file (overwritten when a retried task writes it again)."""
    fs, local = resolve(path)
    fs.create_dir(local.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(local) as stream:
        pq.write_table(table, stream)


def _read_all(folder: str | Location, schema: pa.Schema) -> pa.Table:
    """Every scratch file in ``folder`` as one table (empty when there is none)."""
    fs, local = resolve(folder)
    infos = fs.get_file_info(pafs.FileSelector(local, allow_not_found=True))
    tables = [pq.read_table(i.path, filesystem=fs, schema=schema) for i in sorted(infos, key=lambda i: i.path)
              if i.type == pafs.FileType.File]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _bucket(keys: np.ndarray, parts: int) -> np.ndarray:
    """A partition in ``range(parts)`` per uint64 key (multiply-shift: similar keys spread out)."""
    return ((keys.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(33)) % np.uint64(parts)


def _digest_keys(fixed: pa.FixedSizeBinaryArray) -> np.ndarray:
    """A 64-bit key per 64-byte value (sha256 hex digest): its 8 words mixed; null slots give garbage."""
    m = len(fixed)
    words = np.frombuffer(fixed.buffers()[1], np.uint64, count=(fixed.offset + m) * 8)
    return (words[fixed.offset * 8:].reshape(m, 8) * _MIX).sum(1, dtype=np.uint64)


def _string_keys(values: pa.Array) -> np.ndarray:
    """A deterministic 64-bit key per non-null string, the same in every task (equal strings, equal
    keys), for partitioning: 64-byte values (sha256 hex digests) by their words, any other by CRC-32."""
    keys = np.zeros(len(values), np.uint64)
    digest = pc.equal(pc.binary_length(values), 64).to_numpy(zero_copy_only=False)
    if digest.any():
        keys[digest] = _digest_keys(values.filter(pa.array(digest)).cast(pa.binary(64)))
    others = np.flatnonzero(~digest)
    if others.size:
        keys[others] = [zlib.crc32(v.encode("utf-8", "surrogatepass"))
                        for v in values.take(pa.array(others)).to_pylist()]
    return keys


def _shard_rows(root: str | Location, names: list[str], first: int, ok_only: bool) -> pa.Table:
    """(pos, id, sha, phash) of the rows of a group of shards, in manifest order (ok rows only, or all)."""
    parts = []
    for k, name in enumerate(names):
        fs, path = resolve(join(root, name))
        columns = set(pq.read_schema(path, filesystem=fs).names)
        table = pq.read_table(path, columns=[c for c in COLUMNS if c in columns], filesystem=fs)
        pos = ((first + k) << 32) + np.arange(table.num_rows, dtype=np.int64)
        part = pa.table({
            "pos": pos, "id": table["id"].cast(pa.string()),
            "sha": table["source_sha256"].cast(pa.string()) if "source_sha256" in columns
            else pa.nulls(table.num_rows, pa.string()),
            "phash": table["phash"].cast(pa.int64()) if "phash" in columns else pa.nulls(table.num_rows, pa.int64()),
        })
        parts.append(part.filter(pc.equal(table["status"], STATUS_OK)) if ok_only else part)
    return pa.concat_tables(parts).combine_chunks() if parts else pa.table({
        "pos": pa.array([], pa.int64()), "id": pa.array([], pa.string()), "sha": pa.array([], pa.string()),
        "phash": pa.array([], pa.int64())})


def _scatter(root: str | Location, names: list[str], first: int, group: int, work: str | Location, parts: int) -> int:
    """Stage 1: the group's ok rows, (pos, sha) by sha256 partition and (pos, phash) by hash partition."""
    rows = _shard_rows(root, names, first, ok_only=True)
    for column, schema, keys in (("sha", _SHA, _string_keys), ("phash", _HASH, lambda a: a.to_numpy().view(np.uint64))):
        valid = rows.filter(rows[column].is_valid())
        bucket = _bucket(keys(valid[column].combine_chunks()), parts)
        for p in np.unique(bucket).tolist():
            _write(join(work, column, str(p), f"{group}.parquet"),
                   valid.select(["pos", column]).filter(pa.array(bucket == p)).cast(schema))
    return rows.num_rows


def _edges(left: np.ndarray, right: np.ndarray) -> pa.Table:
    return pa.table({"left": pa.array(left, pa.int64()), "right": pa.array(right, pa.int64())}, schema=_EDGES)


def _reduce(work: str | Location, part: int, parts: int, max_distance: int | None) -> None:
    """Stage 2: edges from each row to the first row with its sha256 and to the first with its hash; the
    distinct hashes (with their first row) to each band's buckets."""
    sha = _read_all(join(work, "sha", str(part)), _SHA).sort_by("pos")
    pos = sha["pos"].to_numpy()
    codes = _codes(sha["sha"], sha.num_rows)
    later, first = _first_of_equal(codes, codes >= 0)
    _write(join(work, "edges", f"sha-{part}.parquet"), _edges(pos[later], pos[first]))
    if max_distance is None:
        return
    hashed = _read_all(join(work, "phash", str(part)), _HASH).sort_by("pos")
    pos, hashes = hashed["pos"].to_numpy(), hashed["phash"].to_numpy().view(np.uint64)
    distinct, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    representative = pos[first]
    same = pos != representative[inverse]
    _write(join(work, "edges", f"phash-{part}.parquet"), _edges(pos[same], representative[inverse][same]))
    for band, (shift, width) in enumerate(_bands(max_distance) if max_distance else []):
        bucket = _bucket((distinct >> np.uint64(shift)) & np.uint64((1 << width) - 1), parts)
        for q in np.unique(bucket).tolist():
            keep = bucket == q
            _write(join(work, f"band-{band}", str(q), f"{part}.parquet"),
                   pa.table({"pos": representative[keep], "phash": distinct[keep].view(np.int64)}, schema=_HASH))


def _near(work: str | Location, band: int, bucket: int, max_distance: int) -> None:
    """Stage 3: near pairs among one band bucket's distinct hashes, as a spanning forest (fewer edges than
    hashes): pairs are folded into it whenever they outnumber the hashes, so memory stays linear."""
    table = _read_all(join(work, f"band-{band}", str(bucket)), _HASH)
    pos, hashes = table["pos"].to_numpy(), table["phash"].to_numpy().view(np.uint64)
    shift, width = _bands(max_distance)[band]
    left: list[np.ndarray] = []
    right: list[np.ndarray] = []
    held = 0
    for i, j in _band_pairs(hashes, shift, width, max_distance):
        left.append(i)
        right.append(j)
        held += len(i)
        if held > 2 * len(hashes):
            left, right = _forest(len(hashes), left, right)
            held = len(left[0])
    if left:
        left, right = _forest(len(hashes), left, right)
        _write(join(work, "edges", f"near-{band}-{bucket}.parquet"), _edges(pos[left[0]], pos[right[0]]))


def _forest(n: int, left: list[np.ndarray], right: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Edges with the same components as ``left``-``right`` over ``n`` nodes: each node to its component's first."""
    root = _components(n, np.concatenate(left), np.concatenate(right))
    members = np.flatnonzero(root != np.arange(n))
    return [members], [root[members]]


def _group_of(positions: np.ndarray, starts: list[int]) -> np.ndarray:
    """The group (of shards starting at ``starts``) of each position."""
    return np.searchsorted(np.asarray(starts, np.int64), positions >> 32, side="right") - 1


def _union(work: str | Location, starts: list[int]) -> None:
    """Stage 4: connected components of the edges; each member row with its group's first row (the
    smallest position), filed under the group of shards holding that first row."""
    edges = _read_all(join(work, "edges"), _EDGES)
    left, right = edges["left"].to_numpy(), edges["right"].to_numpy()
    del edges
    nodes = np.unique(np.concatenate([left, right]))
    root = _components(len(nodes), np.searchsorted(nodes, left), np.searchsorted(nodes, right))
    del left, right
    members = np.flatnonzero(root != np.arange(len(nodes)))
    member, first = nodes[members], nodes[root[members]]
    where = _group_of(first, starts)
    for g in np.unique(where).tolist():
        keep = where == g
        _write(join(work, "members", str(g), "all.parquet"), _edges(member[keep], first[keep]))


def _lookup(root: str | Location, names: list[str], first: int, group: int, work: str | Location,
            starts: list[int]) -> None:
    """Stage 5: the id, sha256 and hash of the kept rows in this group, filed under their members' groups."""
    pairs = _read_all(join(work, "members", str(group)), _EDGES)
    if not pairs.num_rows:
        return
    rows = _shard_rows(root, names, first, ok_only=False)
    at = pa.array(np.searchsorted(rows["pos"].to_numpy(), pairs["right"].to_numpy()))
    found = pa.table({"member": pairs["left"], "root": pairs["right"], "root_id": rows["id"].take(at),
                      "root_sha": rows["sha"].take(at), "root_phash": rows["phash"].take(at)}, schema=_ROOTS)
    where = _group_of(pairs["left"].to_numpy(), starts)
    for g in np.unique(where).tolist():
        _write(join(work, "roots", str(g), f"{group}.parquet"), found.filter(pa.array(where == g)))


def _explain(root: str | Location, names: list[str], first: int, group: int, work: str | Location) -> dict[str, int]:
    """Stage 6: the table rows of this group's members, in manifest order (as ``find_duplicates_in_memory``)."""
    found = _read_all(join(work, "roots", str(group)), _ROOTS).sort_by("member")
    if found.num_rows:
        rows = _shard_rows(root, names, first, ok_only=False)
        at = pa.array(np.searchsorted(rows["pos"].to_numpy(), found["member"].to_numpy()))
        sha, phash = rows["sha"].take(at), rows["phash"].take(at)
        exact = _numpy(pc.fill_null(pc.equal(sha, found["root_sha"]), False))
        both = _numpy(phash.is_valid()) & _numpy(found["root_phash"].is_valid())
        distance = _popcount(_numpy(phash.fill_null(0)).view(np.uint64)
                             ^ _numpy(found["root_phash"].fill_null(0)).view(np.uint64)).astype(np.int32)
        table = pa.table({
            "id": rows["id"].take(at), "duplicate_of": found["root_id"],
            "distance": pa.array(np.where(exact, 0, distance), pa.int32(), mask=~(exact | both)),
            "exact": pa.array(exact, pa.bool_()),
        }, schema=SCHEMA)
    else:
        table = SCHEMA.empty_table()
    _write(join(work, "parts", f"{group}.parquet"), table)
    return counts(table)


def _numpy(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return values.to_numpy(zero_copy_only=False) if isinstance(values, pa.Array) else values.to_numpy()


def _concat_parts(work: str | Location, groups: int, final: str | Location, metadata: str) -> None:
    """Stage 7: the parts in group order into the side table (a temp file moved into place)."""
    fs, local = resolve(final)
    folder = local.rsplit("/", 1)[0]
    fs.create_dir(folder, recursive=True)
    tmp = f"{folder}/.tmp-{uuid.uuid4().hex}-duplicates.parquet"
    schema = SCHEMA.with_metadata({METADATA_KEY: metadata})
    try:
        with fs.open_output_stream(tmp) as stream, pq.ParquetWriter(stream, schema, compression="zstd") as writer:
            for g in range(groups):
                writer.write_table(pq.read_table(resolve(join(work, "parts", f"{g}.parquet"))[1],
                                                 filesystem=fs).cast(schema))
            if not groups:
                writer.write_table(schema.empty_table())
        fs.move(tmp, local)
    except BaseException:
        delete_quietly(fs, tmp)
        raise


def read_table(manifest_path: str | Location) -> pa.Table | None:
    """The manifest's duplicates table, or None when it has none (older manifests)."""
    fs, base = resolve(manifest_path)
    try:
        return pq.read_table(join(base, DUPLICATES_FILE), filesystem=fs)
    except FileNotFoundError:
        return None


def read_summary(manifest_path: str | Location) -> dict[str, Any] | None:
    """The counts written with the table (``exact``, ``near``, ``max_distance``, ...), None without a table."""
    fs, base = resolve(manifest_path)
    try:
        schema = pq.read_schema(join(base, DUPLICATES_FILE), filesystem=fs)
    except FileNotFoundError:
        return None
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else None


def duplicate_ids(manifest_path: str) -> pa.Array | None:
    """The ids to skip as an Arrow array (for ``pc.is_in``), or None when the manifest has no table."""
    fs, base = resolve(manifest_path)
    try:
        return pq.read_table(join(base, DUPLICATES_FILE), columns=["id"], filesystem=fs)["id"].combine_chunks()
    except FileNotFoundError:
        return None


def read_duplicates(manifest_path: str) -> set[str]:
    """The ids of the manifest's duplicates (rows to skip); empty when it has no duplicates table."""
    found = duplicate_ids(manifest_path)
    return set() if found is None else set(found.to_pylist())

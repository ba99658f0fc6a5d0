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
"""

from __future__ import annotations

import datetime
import json
import uuid
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from manifests.io import delete_quietly, join, list_shards, resolve
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
    n = len(hashes)
    found_i: list[np.ndarray] = []
    found_j: list[np.ndarray] = []
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    index = np.int32 if n < 2**31 else np.int64  # half the memory traffic where it fits
    for shift, width in _bands(max_distance):
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
                found_i.append(order[active[hit]])
                found_j.append(order[partner[hit]])
            k += 1
            more = partner + 1 < active_end
            active, active_hash, active_end = active[more], active_hash[more], active_end[more]
    if not found_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(found_i).astype(np.int64), np.concatenate(found_j).astype(np.int64)


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
                words = np.frombuffer(fixed.buffers()[1], np.uint64, count=(fixed.offset + m) * 8)
                keys[pos:pos + m] = (words[fixed.offset * 8:].reshape(m, 8) * _MIX).sum(1, dtype=np.uint64)
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


def find_duplicates(ids: Sequence[str] | pa.Array, sha256s: Sequence[str | None] | pa.Array | None,
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


def write_duplicates(manifest_path: str, max_distance: int | None = DEFAULT_MAX_DISTANCE) -> dict[str, Any]:
    """Find the duplicates among the ok rows of the manifest's shards and write ``DUPLICATES_FILE``
    (atomically: a temp file moved into place); returns ``{"exact": n, "near": m, "max_distance": d}``.

    Reads only ``id``, ``status``, ``source_sha256`` and ``phash`` of each shard; shards without ``phash``
    (written before it existed) take part through ``source_sha256`` only. Needs no ``_manifest.json``
    (the pass runs after the shards, before the summary is written). Rows that are not ok never count:
    a failed copy must not be what a good one is a duplicate of. ``max_distance`` None finds exact
    duplicates only (``near`` is then 0)."""
    check_max_distance(max_distance)
    fs, base = resolve(manifest_path)
    parts = []
    for shard in list_shards(manifest_path):
        names = set(pq.read_schema(shard, filesystem=fs).names)
        table = pq.read_table(shard, columns=[c for c in COLUMNS if c in names], filesystem=fs)
        table = table.filter(pc.equal(table["status"], STATUS_OK))
        parts.append(pa.table({
            "id": table["id"],
            "source_sha256": table["source_sha256"] if "source_sha256" in names
            else pa.nulls(table.num_rows, pa.string()),
            "phash": table["phash"].cast(pa.int64()) if "phash" in names else pa.nulls(table.num_rows, pa.int64()),
        }))
    rows = pa.concat_tables(parts) if parts else pa.table({"id": pa.array([], pa.string()),
                                                          "source_sha256": pa.array([], pa.string()),
                                                          "phash": pa.array([], pa.int64())})
    found = find_duplicates(rows["id"], rows["source_sha256"], rows["phash"], max_distance)
    summary = {**counts(found), "max_distance": max_distance}
    metadata = {**summary, "ok_rows": rows.num_rows,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    found = found.replace_schema_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    fs.create_dir(join(base, DUPLICATES_DIR), recursive=True)
    final = join(base, DUPLICATES_FILE)
    tmp = join(base, DUPLICATES_DIR, f".tmp-{uuid.uuid4().hex}-duplicates.parquet")
    try:
        with fs.open_output_stream(tmp) as stream:
            pq.write_table(found, stream, compression="zstd")
        fs.move(tmp, final)
    except BaseException:
        delete_quietly(fs, tmp)
        raise
    return summary


def read_table(manifest_path: str) -> pa.Table | None:
    """The manifest's duplicates table, or None when it has none (older manifests)."""
    fs, base = resolve(manifest_path)
    try:
        return pq.read_table(join(base, DUPLICATES_FILE), filesystem=fs)
    except FileNotFoundError:
        return None


def read_summary(manifest_path: str) -> dict[str, Any] | None:
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


def keep_mask(ids: pa.Array | pa.ChunkedArray, skip: pa.Array | None) -> np.ndarray:
    """True for each of ``ids`` that is not in ``skip`` (all True when ``skip`` is None)."""
    if skip is None or len(skip) == 0:
        return np.ones(len(ids), bool)
    return ~pc.is_in(ids, value_set=skip).to_numpy(zero_copy_only=False)


def duplicates_option(duplicates: str | bool) -> bool:
    """True when ``duplicates`` asks to skip them: ``"skip"`` or False skip, ``"keep"`` or True keep."""
    if isinstance(duplicates, bool):
        return not duplicates
    if duplicates not in ("skip", "keep"):
        raise ValueError(f"duplicates must be 'skip', 'keep' or a bool (True keeps them), not {duplicates!r}")
    return duplicates == "skip"


def hf_dataset(manifest_path: str, duplicates: str | bool = "skip", status: str | None = "ok", **load_kwargs: Any):
    """The manifest as a Hugging Face ``datasets.Dataset`` (image columns decode to PIL images), with
    ``manifests.read``'s defaults: ok rows only, duplicates left out (``duplicates="keep"`` or True keeps
    them; ``status=None`` keeps every status). ``load_kwargs`` go to ``datasets.load_dataset`` (e.g.
    ``cache_dir``). The rows are selected by index on top of the shards, nothing is copied.

    ``datasets.load_dataset("parquet", data_files="<manifest>/*.parquet")`` alone reads every row."""
    import datasets

    skip = duplicate_ids(manifest_path) if duplicates_option(duplicates) else None
    fs, base = resolve(manifest_path)
    shards = list_shards(manifest_path)
    scheme = manifest_path.split("://", 1)[0] + "://" if "://" in manifest_path else ""
    ds = datasets.load_dataset("parquet", data_files=[scheme + s for s in shards], split="train", **load_kwargs)
    if status is None and (skip is None or len(skip) == 0):
        return ds
    keys = pa.concat_tables([pq.read_table(s, columns=["id", "status"], filesystem=fs) for s in shards])
    if keys.num_rows != len(ds):
        raise RuntimeError(f"datasets read {len(ds)} rows from {manifest_path}, its shards hold {keys.num_rows}")
    keep = keep_mask(keys["id"], skip)
    if status is not None:
        keep &= pc.equal(keys["status"], status).to_numpy(zero_copy_only=False)
    return ds.select(np.flatnonzero(keep))

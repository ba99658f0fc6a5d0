"""Duplicates: the perceptual hash, the band search against all-pairs, the side table, and every reader
(``manifests.read``, the ``datasets`` view, the trainer's rows, ``inspect``) skipping what it lists."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import manifests
from manifests import duplicates as dup
from manifests import io as mio
from manifests.rows import empty_row
from manifests.schema import SCHEMA_VERSION, manifest_schema, shard_name

D = dup.DEFAULT_MAX_DISTANCE
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "immunohistochemistry")


def photo(name: str) -> np.ndarray:
    from skimage import data

    a = getattr(data, name)()
    return np.ascontiguousarray(np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3])


def jpeg(a: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


# --- the hash -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PHOTOS)
def test_a_resized_reencoded_copy_is_within_the_default_distance(name):
    a = photo(name)
    half = np.asarray(Image.fromarray(a).resize((a.shape[1] // 2, a.shape[0] // 2), Image.Resampling.BICUBIC))
    copy = jpeg(half, 70)
    assert dup.hamming(dup.phash(a), dup.phash(copy)) <= D


def test_different_photos_are_far_apart():
    hashes = {n: dup.phash(photo(n)) for n in PHOTOS}
    distances = {(a, b): dup.hamming(hashes[a], hashes[b]) for a, b in itertools.combinations(PHOTOS, 2)}
    assert min(distances.values()) > 2 * D, distances  # measured: 20 bits or more


def test_the_hash_is_a_signed_64_bit_value_in_imagehash_bit_order():
    h = dup.phash(photo("astronaut"))
    assert -2**63 <= h < 2**63 and isinstance(h, int)
    pa.array([h], pa.int64())  # fits the phash column
    # A flat image has only its DC coefficient above the median: the first (most significant) bit.
    assert dup.phash(np.full((40, 60, 3), 200, np.uint8)) == -2**63
    # RGB and its grayscale, RGBA and a bool mask: all accepted, same layout gives the same bits
    gray = np.asarray(Image.fromarray(photo("coffee")).convert("L"))
    assert dup.hamming(dup.phash(np.stack([gray] * 3, -1)), dup.phash(gray)) == 0
    assert dup.phash(np.dstack([photo("coffee"), np.zeros(gray.shape, np.uint8)])) == dup.phash(photo("coffee"))
    with pytest.raises(TypeError):
        dup.phash(np.zeros((8, 8), np.float32))


def test_the_dct_is_the_one_imagehash_uses():
    x = np.random.default_rng(0).random((32, 32))
    scipy_fftpack = pytest.importorskip("scipy.fftpack")
    expected = scipy_fftpack.dct(scipy_fftpack.dct(x, axis=0), axis=1)[:8, :8]
    np.testing.assert_allclose(dup._DCT @ x @ dup._DCT.T, expected, rtol=1e-10, atol=1e-9)


# --- finding duplicates -------------------------------------------------------------------------


def planted(n: int, max_distance: int, seed: int = 0) -> np.ndarray:
    """Random hashes plus copies of some at every distance 0..max_distance + 1 (the last just outside)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(-2**63, 2**63 - 1, n, dtype=np.int64, endpoint=True).view(np.uint64)
    copies = []
    for k, src in enumerate(rng.choice(n, n // 5, replace=False)):
        flips = k % (max_distance + 2)
        mask = 0
        for bit in rng.choice(64, flips, replace=False):
            mask |= 1 << int(bit)
        copies.append(int(base[src]) ^ mask)
    return np.concatenate([base, np.array(copies, np.uint64)]).view(np.int64)


def brute_force_pairs(hashes: np.ndarray, max_distance: int) -> set[tuple[int, int]]:
    h = hashes.view(np.uint64)
    close = dup._popcount(h[:, None] ^ h[None, :]) <= max_distance
    i, j = np.nonzero(np.triu(close, 1))
    return set(zip(i.tolist(), j.tolist()))


@pytest.mark.parametrize("max_distance", [1, 3, D, 6])
def test_bands_find_exactly_what_all_pairs_finds(max_distance):
    hashes = np.unique(planted(3000, max_distance, seed=max_distance).view(np.uint64))
    i, j = dup.near_pairs(hashes, max_distance)
    found = {(min(a, b), max(a, b)) for a, b in zip(i.tolist(), j.tolist())}
    expected = brute_force_pairs(hashes.view(np.int64), max_distance)
    distance = lambda pairs: {dup.hamming(int(hashes[a]), int(hashes[b])) for a, b in pairs}  # noqa: E731
    assert distance(expected) == set(range(1, max_distance + 1))  # planted pairs at every distance
    assert max_distance + 1 in distance(brute_force_pairs(hashes.view(np.int64), max_distance + 1))  # and just outside
    assert found == expected


def groups(n: int, pairs) -> list[int]:
    """The first member of each row's group (plain union-find), the reference for find_duplicates_in_memory."""
    parent = list(range(n))

    def root(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = root(a), root(b)
        parent[max(ra, rb)] = min(ra, rb)
    return [root(x) for x in range(n)]


def test_find_duplicates_in_memory_points_each_member_to_the_first_of_its_group_like_all_pairs_union_find():
    hashes = planted(2000, D, seed=7)
    rng = np.random.default_rng(7)
    order = rng.permutation(len(hashes))  # copies anywhere in manifest order, before or after their source
    hashes = hashes[order]
    ids = [f"r{k:05d}" for k in range(len(hashes))]
    table = dup.find_duplicates_in_memory(ids, None, hashes, D)
    first = groups(len(hashes), brute_force_pairs(hashes, D))
    expected = [(ids[k], ids[first[k]]) for k in range(len(hashes)) if first[k] != k]
    assert list(zip(table["id"].to_pylist(), table["duplicate_of"].to_pylist())) == expected  # manifest order
    got = dict(zip(table["id"].to_pylist(), table["distance"].to_pylist()))
    for k in range(len(hashes)):
        if first[k] != k:
            assert got[ids[k]] == dup.hamming(int(hashes[k]), int(hashes[first[k]]))
    assert table.num_rows > 200 and not any(table["exact"].to_pylist())


def test_exact_copies_are_found_with_distance_0_and_the_first_is_kept():
    ids = ["a", "b", "c", "d", "e"]
    sha = ["s1", "s2", "s1", None, "s1"]
    hashes = [11, 0x0123456789ABCDEF, 11, 0x0123456789ABCDEE, None]  # e: no hash (an older shard): matched by sha256 alone
    table = dup.find_duplicates_in_memory(ids, sha, hashes, D).to_pylist()
    assert table == [
        {"id": "c", "duplicate_of": "a", "distance": 0, "exact": True},
        {"id": "d", "duplicate_of": "b", "distance": 1, "exact": False},
        {"id": "e", "duplicate_of": "a", "distance": 0, "exact": True},
    ]
    assert dup.counts(dup.find_duplicates_in_memory(ids, sha, hashes, D)) == {"exact": 2, "near": 1}
    # exact duplicates only: hashes give distances but match nothing
    assert dup.find_duplicates_in_memory(ids, sha, hashes, None)["id"].to_pylist() == ["c", "e"]


def test_chains_form_one_group_even_when_their_ends_are_far_apart():
    a = 0
    b = a ^ 0b1111  # 4 bits from a
    c = b ^ (0b1111 << 8)  # 4 bits from b, 8 from a
    table = dup.find_duplicates_in_memory(["a", "b", "c"], None, [a, b, c], 4).to_pylist()
    assert [(r["id"], r["duplicate_of"], r["distance"]) for r in table] == [("b", "a", 4), ("c", "a", 8)]


def test_bad_distances_are_refused():
    for bad in (-1, 64, 2.5):
        with pytest.raises(ValueError):
            dup.find_duplicates_in_memory(["a"], None, [1], bad)


# --- a manifest with a duplicates table ---------------------------------------------------------


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 24, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


FAR = 0x0123456789ABCDEF


def row(i: int, sha: str, phash: int | None, status: str = "ok") -> dict:
    r = empty_row(f"id{i}", f"img_{i}.png", ["canny"])
    r.update(caption=f"a picture number {i}", image={"bytes": png(i), "path": None},
             cond_canny={"bytes": png(255 - i), "path": None}, width=24, height=16,
             source_sha256=sha, orig_width=48, orig_height=32, phash=phash)
    if status != "ok":
        r.update(status=status, error="decode: broken" if status == "error" else "min_side: too small",
                 image=None, cond_canny=None, width=None, height=None, phash=None)
    return r


def schema(with_phash: bool = True) -> pa.Schema:
    s = manifest_schema(["canny"], {"job": "test"})
    if "phash" not in s.names:  # before the v1.1 columns existed
        s = s.append(pa.field("phash", pa.int64()))
    if not with_phash:  # a shard written before the hash existed
        s = s.remove(s.get_field_index("phash"))
    return s


def write(out, shards, with_phash: bool = True):
    for k, rows in enumerate(shards):
        rows = [r if with_phash else {c: v for c, v in r.items() if c != "phash"} for r in rows]
        mio.write_shard(rows, schema(with_phash), str(out), shard_name(k))
    rows = [r for s in shards for r in s]
    counts = {"rows": len(rows), **{s: sum(r["status"] == s for r in rows) for s in ("ok", "error", "filtered")}}
    mio.write_manifest_json(str(out), {
        "schema_version": SCHEMA_VERSION, "counts": counts, "columns": ["image", "cond_canny"],
        "input": {"uri": "photos/", "images": len(rows), "ignored_files": 0},
        "shards": [{"name": shard_name(k), "rows": len(s)} for k, s in enumerate(shards)]})


H0, H2 = -0x0F0F_0F0F_0F0F_0F0F, 0x1234_5678_9ABC_DEF0


@pytest.fixture
def manifest(tmp_path):
    """Two shards: id3 a near copy of id0 (1 bit), id4 an exact copy of id0 (next shard), id2 the same
    file as an error row (not a duplicate: failed rows never count), id5 5 bits from id2 (outside)."""
    out = tmp_path / "m"
    write(out, [[row(0, "A", H0), row(1, "B", None, "error"), row(2, "B", H2), row(3, "C", H0 ^ 1)],
                [row(4, "A", H0), row(5, "D", H2 ^ 0b11111), row(6, "E", FAR), row(7, "F", None, "filtered")]])
    return out


def test_write_duplicates_writes_the_side_table_and_returns_counts(manifest):
    assert dup.read_duplicates(str(manifest)) == set()  # none yet: an older manifest reads as before
    assert dup.write_duplicates(str(manifest)) == {"exact": 1, "near": 1, "max_distance": D}
    assert dup.read_table(str(manifest)).to_pylist() == [
        {"id": "id3", "duplicate_of": "id0", "distance": 1, "exact": False},
        {"id": "id4", "duplicate_of": "id0", "distance": 0, "exact": True},
    ]
    assert dup.read_duplicates(str(manifest)) == {"id3", "id4"}
    assert dup.read_summary(str(manifest))["ok_rows"] == 6
    assert not [p for p in (manifest / dup.DUPLICATES_DIR).iterdir() if p.name.startswith(".tmp")]
    assert sorted(p.name for p in manifest.glob("*.parquet")) == [shard_name(0), shard_name(1)]  # shards only


def test_read_skips_duplicates_by_default_and_keeps_them_when_asked(manifest):
    everything = ["id0", "id2", "id3", "id4", "id5", "id6"]
    assert manifests.read(str(manifest))["id"].tolist() == everything  # no table: as before
    dup.write_duplicates(str(manifest))
    kept = ["id0", "id2", "id5", "id6"]
    assert manifests.read(str(manifest))["id"].tolist() == kept
    assert manifests.read(str(manifest), duplicates=False)["id"].tolist() == kept
    assert manifests.read(str(manifest), duplicates="keep")["id"].tolist() == everything
    assert manifests.read(str(manifest), duplicates=True)["id"].tolist() == everything
    frame = manifests.read(str(manifest), columns=["caption"])  # id read for the filter, not returned
    assert frame.columns.tolist() == ["caption"] and len(frame) == 4
    assert manifests.read(str(manifest), status=None)["id"].tolist() == ["id0", "id1", "id2", "id5", "id6", "id7"]
    with pytest.raises(ValueError):
        manifests.read(str(manifest), duplicates="drop")


def test_shards_without_a_hash_get_exact_duplicates_only(tmp_path):
    out = tmp_path / "old"
    write(out, [[row(0, "A", H0), row(1, "B", H0 ^ 1)], [row(2, "A", H0)]], with_phash=False)
    assert dup.write_duplicates(str(out)) == {"exact": 1, "near": 0, "max_distance": D}
    assert dup.read_table(str(out)).to_pylist() == [{"id": "id2", "duplicate_of": "id0", "distance": 0, "exact": True}]


def test_a_manifest_mixing_v1_0_and_v1_1_shards_reads_with_nulls_for_the_new_columns(tmp_path):
    out = tmp_path / "mixed"
    write(out, [[row(0, "A", H0), row(1, "B", None)], [row(2, "A", H0), row(3, "C", H0 ^ 1)]])
    old = out / shard_name(0)  # shard 0 as a v1.0 writer left it: neither caption_source nor phash
    pq.write_table(pq.read_table(old).drop_columns(["caption_source", "phash"]), old)
    assert dup.write_duplicates(str(out)) == {"exact": 1, "near": 1, "max_distance": D}  # id3 through id2
    frame = manifests.read(str(out), duplicates="keep")
    assert frame["id"].tolist() == ["id0", "id1", "id2", "id3"]
    assert frame["phash"].isna().tolist() == [True, True, False, False] and frame["phash"][3] == H0 ^ 1
    assert manifests.read(str(out), columns=["id", "phash"])["id"].tolist() == ["id0", "id1"]


def test_the_datasets_view_skips_duplicates_too(manifest, tmp_path):
    pytest.importorskip("datasets")
    dup.write_duplicates(str(manifest))
    view = manifests.hf_dataset(str(manifest), cache_dir=str(tmp_path / "hf"))
    assert view["id"] == ["id0", "id2", "id5", "id6"]
    assert isinstance(view[0]["image"], Image.Image)
    assert manifests.hf_dataset(str(manifest), "keep", cache_dir=str(tmp_path / "hf"))["id"] == \
        ["id0", "id2", "id3", "id4", "id5", "id6"]


def test_the_trainers_rows_skip_duplicates_unless_keep_duplicates(manifest, tmp_path):
    from train.data import load_rows

    cache = str(tmp_path / "cache")
    dup.write_duplicates(str(manifest))
    train, held = load_rows(str(manifest), ["canny"], 1, cache_dir=cache)
    assert [r["id"] for r in held] + [r["id"] for r in train] == ["id0", "id2", "id5", "id6"]
    train, held = load_rows(str(manifest), ["canny"], 1, cache_dir=cache, keep_duplicates=True)
    assert [r["id"] for r in held] + [r["id"] for r in train] == ["id0", "id2", "id3", "id4", "id5", "id6"]


def test_keep_duplicates_flag_reaches_the_rows_the_loop_trains_on(manifest, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from train import loop
    from train.train import parse_args

    dup.write_duplicates(str(manifest))
    flags = ["--manifest", str(manifest), "--condition", "canny", "--pretrained_model_name_or_path", "unused",
             "--output_dir", str(tmp_path / "run"), "--report_to", "none", "--data_cache_dir", str(tmp_path / "c")]
    assert parse_args(flags).keep_duplicates is False

    class Stop(Exception):
        pass

    base = SimpleNamespace(place=lambda *a: None, family=SimpleNamespace(name="sd"), transformer=None)  # a UNet base
    monkeypatch.setattr(loop, "load_base", lambda *a, **k: base)
    loaded = []
    real = loop.load_rows
    monkeypatch.setattr(loop, "load_rows", lambda *a: loaded.append(real(*a)) or loaded[-1])
    monkeypatch.setattr(loop, "make_controlnet", lambda *a, **k: (_ for _ in ()).throw(Stop()))
    for extra, expected in (([], 4), (["--keep_duplicates"], 6)):
        with pytest.raises(Stop):
            loop.set_up(parse_args(flags + extra))
        train, held = loaded[-1]
        assert len(train) + len(held) == expected


def test_inspect_prints_duplicate_counts_caption_lengths_and_filters(manifest, capsys):
    from manifests.__main__ import main

    assert main(["inspect", str(manifest)]) == 0
    assert "duplicates not computed" in capsys.readouterr().out
    dup.write_duplicates(str(manifest))
    assert main(["inspect", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert f"duplicates exact 1, near 1 (near: within {D} bits of 64), in 1 group; 4 of 6 ok rows kept" in out
    assert "captions  words per ok row: empty 0, 1-4 6, 5-9 0" in out
    assert "filtered  min_side 1 (of 1 filtered rows)" in out


def test_sha256_digests_group_like_dictionary_encoding():
    import hashlib

    rng = np.random.default_rng(3)
    digests = [hashlib.sha256(str(int(k)).encode()).hexdigest() for k in rng.integers(0, 300, 1000)]
    values = pa.chunked_array([pa.array(digests[:400] + [None]), pa.array(digests[400:])])
    codes = dup._codes(values, len(values))  # 64-byte keys in numpy
    reference = pa.array(digests[:400] + [None] + digests[400:]).dictionary_encode().indices.to_pylist()
    pairs = {(a, b) for a, b in zip(codes.tolist(), reference)}
    assert codes[400] == -1 and (-1, None) in pairs
    assert len({a for a, _ in pairs}) == len({b for _, b in pairs}) == len(pairs)  # one code per digest
    short = dup._codes(["ab", None, "ab", "c"], 4)  # not digests: the general path
    assert short[0] == short[2] != short[3] and short[1] == -1


def test_a_64_bit_key_collision_between_digests_still_gives_exact_codes(monkeypatch):
    monkeypatch.setattr(dup, "_MIX", np.zeros(8, np.uint64))  # every digest gets the same key
    digests = ["a" * 64, "b" * 64, "a" * 64, None]
    codes = dup._codes(digests, 4)
    assert codes[0] == codes[2] != codes[1] and codes[3] == -1


def test_caption_histogram_counts_words_not_separators():
    import pyarrow as pa

    from manifests.inspect import _caption_lines, _word_counts

    captions = pa.array(["", "   ", None, "a red circle", " two  spaced\twords ", "word " * 60])
    assert _word_counts(captions).tolist() == [0, 0, 0, 3, 3, 60]
    assert _caption_lines(_word_counts(captions)) == [
        "captions  words per ok row: empty 3, 1-4 2, 5-9 0, 10-19 0, 20-39 0, 40-59 0, 60+ 1; median 1, longest 60"]

"""The listing streams: sorted order folder by folder, metadata per subtree, symlink rules,
--input-list files (Parquet, CSV, text), SourceReader, and memory that does not grow with the input."""

from __future__ import annotations

import itertools
import json
import logging
import os
import pickle
import random
import threading
import time
import tracemalloc
from pathlib import Path

import fsspec
import pandas as pd
import pytest

from pipeline.reader import (
    InputItem,
    ListingStats,
    SourceReader,
    iter_input_list,
    iter_inputs,
    list_inputs,
    row_id,
)

PNG = b"\x89PNG\r\n\x1a\n not really a png"


def touch(root: Path, *names: str, data: bytes = PNG) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def sources(items) -> list[str]:
    return [i.source for i in items]


def stream(root) -> tuple[list[InputItem], ListingStats]:
    stats = ListingStats()
    return list(iter_inputs(str(root), stats)), stats


# --- order ----------------------------------------------------------------------------------------

TRICKY = [
    "a.png", "a!.png", "a.b.png", "a.b/z.png", "a/x.png", "a/b.png", "a/b/c/d.png", "a/b-c/x.png",
    "a-b/y.png", "a0.png", "a0/q.png", "a b.png", "a b/c.png", "a+/p.png", "Z/x.png", "z.png",
    "é.png", "éa/x.png", "日本/写真.png", "with space/and more.png", "a.txt/inside.png",
]


def test_depth_first_order_equals_sorted_full_paths_on_tricky_names(tmp_path):
    touch(tmp_path, *TRICKY)
    touch(tmp_path, "a.txt/readme.md", "a1", "a-b.txt", data=b"x")  # non-images between them
    items, stats = stream(tmp_path)
    assert sources(items) == sorted(TRICKY)
    assert stats.images == len(TRICKY) and stats.ignored == 2
    # The folder key matters: sorting a folder's names without the "/" gives another order.
    naive = sorted(TRICKY, key=lambda p: p.split("/"))
    assert naive != sorted(TRICKY)


def test_depth_first_order_equals_sorted_full_paths_on_random_trees(tmp_path):
    alphabet = [" ", "!", "-", ".", "0", "a", "b", "A", "é", "~"]
    rng = random.Random(7)
    for trial in range(3):
        root = tmp_path / f"t{trial}"
        paths = set()
        while len(paths) < 150:
            depth = rng.randint(1, 4)
            parts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3))) for _ in range(depth)]
            if any(p in (".", "..") for p in parts):
                continue
            paths.add("/".join(parts) + ".png")
        made = []
        for rel in sorted(paths):
            try:  # a name may already be a folder (or a file where a folder is wanted): skip those
                touch(root, rel)
                made.append(rel)
            except (IsADirectoryError, NotADirectoryError, FileExistsError):
                pass
        # As before, a name that is all dots and an extension ("...png") has no extension: not an image.
        made = [rel for rel in made if os.path.splitext(rel)[1] == ".png"]
        on_disk = sorted(str(p.relative_to(root)) for p in root.rglob("*.png")
                         if p.is_file() and os.path.splitext(p.name)[1] == ".png")
        assert sources(stream(root)[0]) == on_disk == sorted(made)


def test_streaming_equals_list_inputs(tmp_path):
    touch(tmp_path, *TRICKY)
    (tmp_path / "a" / "x.txt").write_text("sidecar")
    (tmp_path / "a0" / "metadata.jsonl").write_text(json.dumps({"file_name": "q.png", "text": "q"}) + "\n")
    (tmp_path / "notes.md").write_text("x")
    items, stats = stream(tmp_path)
    listing = list_inputs(str(tmp_path))
    assert items == listing.items
    assert (stats.ignored, stats.skipped_links) == (listing.ignored, listing.skipped_links) == (1, [])
    assert not hasattr(listing, "root")
    by_source = {i.source: i for i in items}
    assert by_source["a/x.png"].sidecar == "a/x.txt"
    assert by_source["a0/q.png"].caption == "q"
    assert all(i.id == row_id(i.source) for i in items)


def test_a_missing_root_fails_at_the_call_not_at_the_first_item(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        iter_inputs(str(tmp_path / "nope"), ListingStats())


def test_the_stamp_holds_size_mtimes_sidecar_and_caption_hash(tmp_path):
    touch(tmp_path, "a.png", "b.png")
    (tmp_path / "a.TXT").write_text("cap")
    (tmp_path / "metadata.csv").write_text("file_name,text\nb.png,bee\n")
    items = {i.source: i for i in stream(tmp_path)[0]}
    a, b = (tmp_path / "a.png").stat(), (tmp_path / "b.png").stat()
    side = (tmp_path / "a.TXT").stat()
    assert items["a.png"].stamp == f"{a.st_size};{a.st_mtime_ns};a.TXT;{side.st_size};{side.st_mtime_ns};"
    import hashlib
    assert items["b.png"].stamp == f"{b.st_size};{b.st_mtime_ns};{hashlib.sha256(b'bee').hexdigest()[:16]}"


# --- metadata per subtree -------------------------------------------------------------------------

def test_metadata_in_a_subfolder_captions_its_subtree_only(tmp_path, caplog):
    touch(tmp_path, "x.png", "sub/x.png", "sub/deeper/y.png", "sub2/x.png", "subway/x.png", "zz/x.png")
    (tmp_path / "sub" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"file_name": "x.png", "text": "sub x"},
        {"file_name": "deeper/y.png", "text": "deep y"},
        {"file_name": "../x.png", "text": "escapes"},      # outside its folder: ignored, with a warning
        {"file_name": "../sub2/x.png", "text": "escapes"},
    ]))
    with caplog.at_level(logging.WARNING, logger="annotate"):
        items = {i.source: i.caption for i in stream(tmp_path)[0]}
    assert items == {"x.png": None, "sub/x.png": "sub x", "sub/deeper/y.png": "deep y", "sub2/x.png": None,
                     "subway/x.png": None, "zz/x.png": None}
    assert "2 file_name entries point outside its folder" in caplog.text


def test_metadata_of_parent_and_child_both_apply_and_the_last_sorted_file_wins(tmp_path):
    touch(tmp_path, "a/x.png", "a/y.png", "t/x.png", "t/y.png")
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"file_name": "a/x.png", "text": "root a/x"}, {"file_name": "a/y.png", "text": "root a/y"},
        {"file_name": "t/x.png", "text": "root t/x"}, {"file_name": "t/y.png", "text": "root t/y"}]))
    (tmp_path / "a" / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "a's x"}) + "\n")
    (tmp_path / "t" / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "t's x"}) + "\n")
    captions = {i.source: i.caption for i in stream(tmp_path)[0]}
    # As the whole-tree reader did: of the metadata files naming a file, the one whose path sorts
    # last wins ("a/metadata.jsonl" < "metadata.jsonl" < "t/metadata.jsonl").
    assert captions == {"a/x.png": "root a/x", "a/y.png": "root a/y", "t/x.png": "t's x", "t/y.png": "root t/y"}


def test_a_broken_metadata_file_in_a_subfolder_raises_naming_file_and_line(tmp_path):
    touch(tmp_path, "a.png", "sub/b.png")
    (tmp_path / "sub" / "metadata.jsonl").write_text('{"file_name": "b.png", "text": "ok"}\n{"file_na')
    it = iter_inputs(str(tmp_path), ListingStats())
    assert next(it).source == "a.png"  # streamed: the error comes when its folder is reached
    with pytest.raises(ValueError, match="sub/metadata.jsonl line 2"):
        next(it)


# --- links ----------------------------------------------------------------------------------------

def test_a_symlink_loop_and_links_into_the_input_are_skipped(tmp_path):
    root = tmp_path / "photos"
    touch(root, "a.png", "b.png", "sub/c.png", "sub/deep/d.png")
    (root / "sub" / "up").symlink_to("..")
    (root / "again").symlink_to("sub")
    (root / "deep").symlink_to(root / "sub" / "deep")  # absolute, still inside
    (root / "self").symlink_to(".")
    items, stats = stream(root)
    assert sources(items) == ["a.png", "b.png", "sub/c.png", "sub/deep/d.png"]
    assert stats.skipped_links == ["again", "deep", "self", "sub/up"]  # in sorted (stream) order


def test_a_link_to_an_outside_folder_is_entered_at_its_sorted_position(tmp_path):
    outside = tmp_path / "elsewhere"
    touch(outside, "o.png", "inner/i.png")
    root = tmp_path / "photos"
    touch(root, "a.png", "n.png", "z.png")
    (root / "m").symlink_to(outside)
    (root / "y").symlink_to(outside)                # a second link to it: skipped
    (root / "x").symlink_to(outside / "inner")      # inside a folder already listed through a link
    (outside / "inner" / "back").symlink_to(outside)  # a loop inside the linked folder
    items, stats = stream(root)
    assert sources(items) == ["a.png", "m/inner/i.png", "m/o.png", "n.png", "z.png"]
    assert stats.skipped_links == ["m/inner/back", "x", "y"]


def test_a_link_to_a_part_of_an_outside_folder_then_the_folder_lists_each_file_once(tmp_path):
    outside = tmp_path / "elsewhere"
    touch(outside, "o.png", "inner/i.png")
    root = tmp_path / "photos"
    (root).mkdir()
    (root / "a").symlink_to(outside / "inner")   # entered first
    (root / "b").symlink_to(outside)             # entered; its "inner" was listed through "a"
    items, stats = stream(root)
    assert sources(items) == ["a/i.png", "b/o.png"]
    assert stats.skipped_links == ["b/inner"]


def test_a_link_to_a_folder_above_the_input_does_not_list_the_input_again(tmp_path):
    root = tmp_path / "photos"
    touch(root, "a.png")
    touch(tmp_path, "elsewhere/o.png")
    (root / "top").symlink_to(tmp_path)
    items, stats = stream(root)
    assert sources(items) == ["a.png", "top/elsewhere/o.png"]
    assert stats.skipped_links == ["top/photos"]


def test_fifos_broken_links_and_non_utf8_names_become_problem_items(tmp_path):
    touch(tmp_path, "a.png")
    os.mkfifo(tmp_path / "f.png")
    os.mkfifo(tmp_path / "a.txt")            # a FIFO sidecar is never read
    os.mkfifo(tmp_path / "metadata.jsonl")   # nor a FIFO metadata file
    (tmp_path / "gone.png").symlink_to(tmp_path / "nothing.png")
    raw = os.fsencode(str(tmp_path)) + b"/caf\xe9.png"
    Path(os.fsdecode(raw)).write_bytes(PNG)
    items = {i.source: i for i in stream(tmp_path)[0]}
    assert items["a.png"].problem is None and items["a.png"].sidecar is None
    assert items["f.png"].problem == "not a regular file (a FIFO)"
    assert items["gone.png"].problem.startswith("not a regular file (a broken link")
    assert "not valid UTF-8" in items["caf\\xe9.png"].problem


def test_an_unreadable_subfolder_is_logged_and_skipped(tmp_path, monkeypatch, caplog):
    touch(tmp_path, "a.png", "locked/b.png", "z.png")
    real_scandir = os.scandir

    def scandir(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level(logging.WARNING, logger="annotate"):
        assert sources(stream(tmp_path)[0]) == ["a.png", "z.png"]
    assert "cannot list" in caplog.text and "locked" in caplog.text


def test_a_tree_on_another_filesystem_streams_in_the_same_order():
    memory = fsspec.filesystem("memory")
    base = "/streaming-test-tree"
    for rel in TRICKY:
        memory.pipe(f"{base}/{rel}", PNG)
    memory.pipe(f"{base}/a/x.TXT", b"sidecar")
    memory.pipe(f"{base}/a0/metadata.jsonl", json.dumps({"file_name": "q.png", "text": "q"}).encode() + b"\n")
    memory.pipe(f"{base}/notes.md", b"x")
    try:
        items, stats = stream(f"memory://{base}")
        assert sources(items) == sorted(TRICKY)
        by_source = {i.source: i for i in items}
        assert by_source["a/x.png"].sidecar == "a/x.TXT" and by_source["a0/q.png"].caption == "q"
        assert stats.ignored == 1
        reader = SourceReader(f"memory://{base}")
        assert reader.read("a/x.png") == PNG and reader.read_sidecar("a/x.TXT") == ("sidecar", None)
    finally:
        memory.rm(base, recursive=True)


# --- --input-list ---------------------------------------------------------------------------------

def write_list(path: Path, kind: str, rows: list[dict]) -> Path:
    frame = pd.DataFrame(rows)
    if kind == "parquet":
        frame.to_parquet(path)
    elif kind == "csv":
        frame.to_csv(path, index=False)
    else:
        path.write_text("\n".join(frame.iloc[:, 0]) + "\n")
    return path


@pytest.mark.parametrize("kind", ["parquet", "csv", "txt"])
@pytest.mark.parametrize("with_root", [True, False])
def test_an_input_list_streams_in_file_order(tmp_path, kind, with_root):
    touch(tmp_path, "b.png", "a/c.jpg", "d.webp")
    names = ["b.png", "a/c.jpg", "d.webp"]  # not sorted: the file's order is kept
    paths = names if with_root else [str(tmp_path / n) for n in names]
    rows = [{"path": p, "caption": f"cap {i}"} for i, p in enumerate(paths)]
    list_file = write_list(tmp_path / f"list.{kind}", kind, rows)
    stats = ListingStats()
    items = list(iter_input_list(str(list_file), str(tmp_path) if with_root else None, stats))
    assert sources(items) == paths and stats.images == 3
    assert all(i.id == row_id(i.source) and i.sidecar is None and i.problem is None for i in items)
    if kind == "txt":
        assert [i.caption for i in items] == [None] * 3 and {i.stamp for i in items} == {""}
    else:
        assert [i.caption for i in items] == ["cap 0", "cap 1", "cap 2"]
        import hashlib
        assert items[0].stamp == hashlib.sha256(b"cap 0").hexdigest()[:16]
    reader = SourceReader(str(tmp_path) if with_root else None)
    assert all(reader.read(i.source) == PNG for i in items)


@pytest.mark.parametrize("kind", ["parquet", "csv"])
def test_list_columns_are_chosen_by_name_else_the_first(tmp_path, kind):
    rows = [{"label": 3, "file_name": "x.png", "text": "from text"}]
    items = list(iter_input_list(str(write_list(tmp_path / f"l.{kind}", kind, rows)), str(tmp_path), ListingStats()))
    assert (items[0].source, items[0].caption) == ("x.png", "from text")
    rows = [{"where": "y.png", "other": "z"}]
    items = list(iter_input_list(str(write_list(tmp_path / f"m.{kind}", kind, rows)), str(tmp_path), ListingStats()))
    assert (items[0].source, items[0].caption) == ("y.png", None)


def test_a_csv_list_without_a_header_is_refused(tmp_path):
    (tmp_path / "l.csv").write_text("a.png,cap\nb.png,cap\n")
    with pytest.raises(ValueError, match="looks like a path, not a header"):
        iter_input_list(str(tmp_path / "l.csv"), str(tmp_path), ListingStats())


def test_a_csv_list_reads_numbers_as_text_and_strips_its_bom(tmp_path):
    lines = ["path,caption"] + [f"{i}.png,{i}" for i in range(3)] + ["9.png,a caption"]
    (tmp_path / "l.csv").write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    items = list(iter_input_list(str(tmp_path / "l.csv"), str(tmp_path), ListingStats()))
    assert [(i.source, i.caption) for i in items] == [("0.png", "0"), ("1.png", "1"), ("2.png", "2"),
                                                     ("9.png", "a caption")]


def test_a_text_list_skips_blank_and_comment_lines_strips_bom_and_whitespace(tmp_path):
    (tmp_path / "l.lst").write_bytes(b"\xef\xbb\xbfa.png\r\n\n# a comment\n  b.png  \n\t\nc.png")
    items = list(iter_input_list(str(tmp_path / "l.lst"), str(tmp_path), ListingStats()))
    assert sources(items) == ["a.png", "b.png", "c.png"]


def test_a_list_of_uris_reads_through_file_and_memory_schemes(tmp_path):
    touch(tmp_path, "a b.png")
    memory = fsspec.filesystem("memory")
    memory.pipe("/streaming-test-bucket/p/1.png", b"one")
    memory.pipe("/streaming-test-bucket/p/2.png", b"two")
    memory.pipe("/streaming-test-bucket/p/2.txt", b"a sidecar")
    uris = [f"file://{tmp_path}/a%20b.png", "memory://streaming-test-bucket/p/1.png",
            "memory://streaming-test-bucket/p/2.png"]
    memory.pipe("/streaming-test-lists/list.txt", "\n".join(uris).encode())
    try:
        items = list(iter_input_list("memory://streaming-test-lists/list.txt", None, ListingStats()))
        assert sources(items) == uris and all(i.problem is None for i in items)
        reader = SourceReader(None)
        assert [reader.read(i.source) for i in items] == [PNG, b"one", b"two"]
        assert reader.read_sidecar("memory://streaming-test-bucket/p/2.txt") == ("a sidecar", None)
        assert len(reader._filesystems) == 2  # one per scheme + bucket
        copy = pickle.loads(pickle.dumps(reader))
        assert copy.read(uris[1]) == b"one"
    finally:
        memory.rm("/streaming-test-bucket", recursive=True)
        memory.rm("/streaming-test-lists", recursive=True)


def test_source_reader_reads_relative_and_absolute_sources_and_sidecars(tmp_path):
    touch(tmp_path, "sub/a.png")
    (tmp_path / "sub" / "a.json").write_text(json.dumps({"caption": " hi "}))
    (tmp_path / "sub" / "b.txt").write_bytes("caf\xe9".encode("cp1252"))
    relative = SourceReader(str(tmp_path))
    assert relative.read("sub/a.png") == PNG
    assert relative.read_sidecar("sub/a.json") == ("hi", None)
    assert relative.read_sidecar("sub/b.txt") == ("café", "cp1252")
    absolute = SourceReader(None)
    assert absolute.read(str(tmp_path / "sub" / "a.png")) == PNG
    assert absolute.read_sidecar(str(tmp_path / "sub" / "b.txt")) == ("café", "cp1252")
    with pytest.raises(ValueError, match="relative"):
        absolute.read("sub/a.png")
    with pytest.raises(FileNotFoundError):
        relative.read("sub/nope.png")


@pytest.mark.parametrize("kind", ["parquet", "csv", "txt"])
def test_a_relative_entry_without_a_root_names_its_row_and_the_fix(tmp_path, kind):
    list_file = write_list(tmp_path / f"l.{kind}", kind, [{"path": str(tmp_path / "a.png")}, {"path": "b.png"}])
    unit = "line" if kind == "txt" else "row"
    with pytest.raises(ValueError, match=rf"{unit} 2: 'b.png' is a relative path.*as --input"):
        list(iter_input_list(str(list_file), None, ListingStats()))


@pytest.mark.parametrize("entry", ["/abs/a.png", "s3://bucket/a.png", "../up.png"])
def test_an_absolute_uri_or_escaping_entry_with_a_root_names_its_row(tmp_path, entry):
    list_file = write_list(tmp_path / "l.csv", "csv", [{"path": "a.png"}, {"path": entry}])
    with pytest.raises(ValueError, match="row 2: "):
        list(iter_input_list(str(list_file), str(tmp_path), ListingStats()))


def test_a_missing_list_file_or_root_fails_at_the_call(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt does not exist"):
        iter_input_list(str(tmp_path / "nope.txt"), None, ListingStats())
    (tmp_path / "l.txt").write_text("a.png\n")
    with pytest.raises(FileNotFoundError, match="--input .*missing does not exist"):
        iter_input_list(str(tmp_path / "l.txt"), str(tmp_path / "missing"), ListingStats())


def test_non_images_and_adjacent_repeats_become_problem_items(tmp_path):
    (tmp_path / "l.txt").write_text("a.png\nnotes.pdf\nb.png\nb.png\nb.png\nc\na.png\n")
    stats = ListingStats()
    items = list(iter_input_list(str(tmp_path / "l.txt"), str(tmp_path), stats))
    assert sources(items) == ["a.png", "notes.pdf", "b.png", "b.png", "b.png", "c", "a.png"]
    problems = [i.problem for i in items]
    assert problems[0] is None and problems[2] is None
    assert problems[1].startswith("not an image file extension (.pdf")
    assert problems[5].startswith("not an image file extension (none")
    assert problems[3] == problems[4] == "listed twice (first at line 3)"
    assert problems[6] is None  # not adjacent: not noticed (documented)
    assert len({i.id for i in items[:6]}) == 6  # a repeat gets an id of its own
    assert stats.images == 7 and stats.ignored == 0


# --- streaming: lazy and bounded ------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["parquet", "csv", "txt"])
def test_the_list_is_read_lazily(tmp_path, kind):
    """The first items come without reading the rest: a bad row far down is not reached."""
    rows = [{"path": f"{i:06d}.png"} for i in range(100_000)] + [{"path": "/absolute/with/a/root.png"}]
    list_file = write_list(tmp_path / f"l.{kind}", kind, rows)
    first = list(itertools.islice(iter_input_list(str(list_file), str(tmp_path), ListingStats()), 10))
    assert sources(first) == [f"{i:06d}.png" for i in range(10)]
    with pytest.raises(ValueError, match="100001"):
        for _ in iter_input_list(str(list_file), str(tmp_path), ListingStats()):
            pass


def test_a_text_list_from_a_pipe_yields_before_the_writer_finishes(tmp_path):
    """``--input-list <(find ...)``: items come while the pipe is still being written."""
    pipe = tmp_path / "pipe.txt"
    os.mkfifo(pipe)
    release = threading.Event()

    def writer():
        with open(pipe, "w") as f:
            f.write("".join(f"{i}.png\n" for i in range(20)))
            f.flush()
            release.wait(30)
            f.write("last.png\n")

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        items = iter_input_list(str(pipe), str(tmp_path), ListingStats())
        assert sources(itertools.islice(items, 10)) == [f"{i}.png" for i in range(10)]
        release.set()
        assert sources(items)[-1] == "last.png"
    finally:
        release.set()
        thread.join(30)


def test_streaming_a_200k_line_list_keeps_memory_small(tmp_path):
    list_file = tmp_path / "big.txt"
    with open(list_file, "w") as f:
        for i in range(200_000):
            f.write(f"folder{i // 1000:03d}/image_{i:07d}.jpg\n")
    stats = ListingStats()
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_input_list(str(list_file), str(tmp_path), stats))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == stats.images == 200_000
    assert peak < 4 * 2**20, f"peak {peak / 2**20:.1f} MiB"  # the 200k items in a list: about 50 MiB


def test_streaming_a_tree_holds_one_folder_at_a_time(tmp_path):
    """20,000 files in 200 folders: the stream's peak is a small fraction of the materialised list's."""
    root = tmp_path / "tree"
    for folder in range(200):
        path = root / f"f{folder:03d}"
        path.mkdir(parents=True)
        for i in range(100):
            (path / f"{i:03d}.png").touch()
    stats = ListingStats()
    tracemalloc.start()
    try:
        started = time.perf_counter()
        count = sum(1 for _ in iter_inputs(str(root), stats))
        _, streamed = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        listing = list_inputs(str(root))
        _, materialised = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == stats.images == len(listing.items) == 20_000
    assert streamed < 1 * 2**20, f"peak {streamed / 2**20:.1f} MiB while streaming"  # measured: ~0.04 MiB
    assert streamed * 20 < materialised, (streamed, materialised)  # measured: ~6 MiB
    assert time.perf_counter() - started < 120

"""Messy collections: links, odd names, broken metadata, edits between runs, two runs at once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import manifests
from manifests.validate import validate
from pipeline import output_lock
from pipeline.annotate import main
from pipeline.reader import list_inputs

ROOT = Path(__file__).resolve().parents[1]


def write_image(path: Path, value: int = 128, size: int = 64) -> Path:
    """A small RGB image with a square in it (so Canny finds edges)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size, size, 3), value, np.uint8)
    pixels[16:48, 16:48] = 255 - value
    Image.fromarray(pixels).save(path)
    return path


def args(collection: Path, out: Path, *extra: str) -> list[str]:
    return ["--input", str(collection), "--output", str(out), "--shard-size", "2", "--resolution", "64", *extra]


def rows_by_source(out: Path):
    frame = manifests.read(str(out), status=None, duplicates="keep")
    return {row["source"]: row for _, row in frame.iterrows()}


# --- listing -------------------------------------------------------------------------------------

def test_a_symlink_loop_lists_each_real_folder_once_and_counts_the_skips(tmp_path):
    root = tmp_path / "photos"
    for name in ("a.png", "b.png", "sub/c.png", "sub/d.png"):
        write_image(root / name)
    (root / "sub" / "up").symlink_to("..")           # a loop: sub/up/sub/up/...
    (root / "again").symlink_to("sub")               # a second path to one folder
    (root / "self").symlink_to(".")
    listing = list_inputs(str(root))
    assert [i.source for i in listing.items] == ["a.png", "b.png", "sub/c.png", "sub/d.png"]
    assert sorted(listing.skipped_links) == ["again", "self", "sub/up"]


def test_links_to_files_are_followed_and_a_broken_link_becomes_an_error_row(tmp_path, local_ray):
    root = tmp_path / "photos"
    target = write_image(tmp_path / "elsewhere" / "real.png")
    write_image(root / "a.png")
    (root / "linked.png").symlink_to(target)
    (root / "broken.png").symlink_to(tmp_path / "gone.png")
    out = tmp_path / "out"
    assert main(args(root, out)) == 0
    rows = rows_by_source(out)
    assert rows["linked.png"]["status"] == "ok" and rows["a.png"]["status"] == "ok"
    assert rows["broken.png"]["status"] == "error" and rows["broken.png"]["error"].startswith("read:")


def test_a_symlink_loop_does_not_multiply_rows_in_the_manifest(tmp_path, local_ray, capsys):
    root = tmp_path / "photos"
    for name in ("a.png", "b.png", "sub/c.png", "sub/d.png"):
        write_image(root / name)
    (root / "sub" / "up").symlink_to("..")
    out = tmp_path / "out"
    assert main(args(root, out)) == 0
    summary = manifests.read_manifest_json(str(out))
    assert summary["counts"]["rows"] == 4
    assert summary["input"]["skipped_links"] == ["sub/up"]
    assert "1 symlinked folders skipped" in capsys.readouterr().out


def non_utf8_name(folder: Path) -> Path:
    """An image whose file name is Latin-1 bytes (not valid UTF-8)."""
    raw = os.fsencode(str(folder)) + b"/caf\xe9.png"
    return write_image(Path(os.fsdecode(raw)))


def test_a_file_name_that_is_not_utf8_becomes_an_error_row_naming_it(tmp_path, local_ray):
    root = tmp_path / "photos"
    write_image(root / "a.png")
    non_utf8_name(root)
    out = tmp_path / "out"
    assert main(args(root, out)) == 0
    rows = rows_by_source(out)
    assert set(rows) == {"a.png", "caf\\xe9.png"}
    bad = rows["caf\\xe9.png"]
    assert bad["status"] == "error" and "not valid UTF-8" in bad["error"] and "rename" in bad["error"]
    assert rows["a.png"]["status"] == "ok"
    assert validate(str(out), progress=False) == []


def test_a_truncated_metadata_jsonl_stops_before_any_work_naming_file_and_line(tmp_path, capsys):
    root = tmp_path / "photos"
    write_image(root / "a.png")
    write_image(root / "b.png")
    (root / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a cat"}\n{"file_name": "b.png", "te')
    out = tmp_path / "out"
    assert main(args(root, out)) == 2
    err = capsys.readouterr().err
    assert "metadata.jsonl line 2" in err and "truncated" in err
    assert not out.exists()


def test_a_csv_metadata_that_does_not_parse_is_named(tmp_path, capsys):
    root = tmp_path / "photos"
    write_image(root / "a.png")
    (root / "metadata.csv").write_bytes(b"file_name,text\na.png,\"unclosed\n")
    assert main(args(root, tmp_path / "out")) == 2
    assert "metadata.csv: cannot read this metadata file" in capsys.readouterr().err


def test_a_legacy_encoded_sidecar_keeps_its_image_and_is_reported(tmp_path, local_ray, capsys):
    root = tmp_path / "photos"
    write_image(root / "a.png")
    (root / "a.txt").write_bytes("un caf\xe9 cr\xe8me".encode("cp1252"))
    out = tmp_path / "out"
    assert main(args(root, out)) == 0
    row = rows_by_source(out)["a.png"]
    assert row["status"] == "ok" and row["caption"] == "un café crème"
    summary = manifests.read_manifest_json(str(out))
    assert summary["run"]["captions_not_utf8"] == ["a.txt (cp1252)"]
    assert "1 caption files were not UTF-8" in capsys.readouterr().out


def test_a_sidecar_matches_its_image_whatever_the_case_of_its_extension(tmp_path):
    root = tmp_path / "photos"
    write_image(root / "IMG_0001.PNG")
    (root / "IMG_0001.TXT").write_text("upper case")
    write_image(root / "img_0002.png")
    (root / "img_0002.Caption").write_text("mixed case")
    items = {i.source: i.sidecar for i in list_inputs(str(root)).items}
    assert items == {"IMG_0001.PNG": "IMG_0001.TXT", "img_0002.png": "img_0002.Caption"}


def test_error_reasons_carry_no_memory_addresses(tmp_path, local_ray):
    root = tmp_path / "photos"
    write_image(root / "a.png")
    (root / "b.png").write_bytes(b"not an image at all")
    reasons = []
    for run in range(2):
        out = tmp_path / f"out{run}"
        assert main(args(root, out)) == 0
        reasons.append(rows_by_source(out)["b.png"]["error"])
    assert reasons[0] == reasons[1] and "0x" not in reasons[0], reasons


# --- resume notices changes ----------------------------------------------------------------------

def test_resume_redoes_the_shard_of_an_overwritten_image_or_an_edited_caption(tmp_path, local_ray):
    root = tmp_path / "photos"
    for i in range(6):
        write_image(root / f"{i}.png", value=40 * i)
    (root / "4.txt").write_text("old caption")
    out = tmp_path / "out"
    assert main(args(root, out)) == 0
    before = rows_by_source(out)
    shards_before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}

    time.sleep(0.01)  # a new modification time even on coarse clocks
    write_image(root / "0.png", value=250)
    (root / "4.txt").write_text("new caption")
    assert main(args(root, out)) == 0
    after = rows_by_source(out)
    assert after["0.png"]["source_sha256"] != before["0.png"]["source_sha256"]
    assert after["4.png"]["caption"] == "new caption"
    summary = manifests.read_manifest_json(str(out))
    assert summary["run"]["shards_written"] == 2 and summary["run"]["shards_kept"] == 1
    shards_after = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert shards_after["part-000001.parquet"] == shards_before["part-000001.parquet"]  # untouched


# --- one run per output --------------------------------------------------------------------------

def test_a_second_run_on_a_locked_output_is_refused_naming_the_first(tmp_path, local_ray, capsys):
    root = tmp_path / "photos"
    write_image(root / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    holder = output_lock.acquire(str(out))  # a live run: this very process
    try:
        assert main(args(root, out)) == 2
        err = capsys.readouterr().err
        assert f"host {socket.gethostname()}, pid {os.getpid()}" in err and "nothing was changed" in err
        assert not list(out.glob("part-*"))
    finally:
        holder.release()
    assert main(args(root, out)) == 0
    assert not (out / output_lock.LOCK_NAME).exists()  # released at the end


def test_a_stale_lock_of_a_killed_run_is_taken_over_with_a_message(tmp_path, local_ray, caplog):
    root = tmp_path / "photos"
    write_image(root / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / output_lock.LOCK_NAME).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": dead.pid, "started": "earlier", "started_unix": time.time() - 60,
         "heartbeat": time.time(), "token": "dead"}))
    (out / ".tmp-0123-part-000000.parquet").write_bytes(b"half a shard")  # left by the killed write
    with caplog.at_level("WARNING", logger="annotate"):
        assert main(args(root, out)) == 0
    assert "took over the lock" in caplog.text and f"pid {dead.pid}" in caplog.text
    assert not list(out.glob(".tmp-*"))  # its temp files are cleaned up
    assert manifests.read_manifest_json(str(out))["counts"]["ok"] == 1


def test_a_lock_from_another_host_is_stale_only_without_a_recent_heartbeat():
    other = {"host": "elsewhere", "pid": 1, "heartbeat": time.time() - 30}
    assert output_lock.stale_reason(other) is None
    other["heartbeat"] = time.time() - output_lock.STALE_S - 5
    assert "no heartbeat" in output_lock.stale_reason(other)


@pytest.mark.slow
def test_two_concurrent_runs_on_one_output_do_not_both_succeed(tmp_path, demo_collection):
    """Two processes started together: exactly one writes the manifest, the other is refused."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "pipeline" / "annotate.py"), "--input", str(demo_collection / "scenes"),
           "--output", str(out), "--shard-size", "2", "--num-cpus", "1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    refused = next(err for rc, err in results if rc == 2)
    assert "is being written by another run" in refused
    assert validate(str(out), progress=False) == []


# --- a shard that keeps failing -------------------------------------------------------------------

@pytest.mark.slow
def test_a_shard_that_kills_its_worker_fails_alone_and_a_rerun_completes(tmp_path, local_ray, capsys):
    """Retried by Ray, then reported by name; the other shards are written, ``_manifest.json`` is
    not (the manifest is incomplete); the same command again redoes only that shard."""
    root = tmp_path / "photos"
    for i in range(6):
        write_image(root / f"{i}.png", value=30 * i)
    Image.new("RGB", (64, 64), (255, 0, 255)).save(root / "2.png")  # shard 1 (files 2 and 3)
    flag = tmp_path / "crash"
    flag.touch()
    out = tmp_path / "out"
    command = args(root, out, "--annotators", "canny,tests.plugins:CrashesWorkerOnMagenta", "-p", f"tests.plugins:CrashesWorkerOnMagenta.flag={flag}")
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "1 of 3 shards failed" in err and "part-000001.parquet" in err and "run the same command again" in err
    assert sorted(p.name for p in out.glob("part-*")) == ["part-000000.parquet", "part-000002.parquet"]
    assert not (out / "_manifest.json").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}

    flag.unlink()
    assert main(command) == 0
    summary = manifests.read_manifest_json(str(out))
    assert summary["counts"]["ok"] == 6 and summary["run"]["shards_written"] == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-00000[02].parquet")} == kept
    assert validate(str(out), progress=False) == []


PROBE = "tests.plugins:ActorProbe"


@pytest.mark.slow
def test_a_poison_shard_crashing_its_model_actor_fails_alone_after_its_retries(tmp_path, local_ray, capsys):
    root = tmp_path / "photos"
    for i in range(6):
        write_image(root / f"{i}.png", value=30 * i)
    Image.new("RGB", (64, 64), (255, 0, 255)).save(root / "4.png")  # shard 2
    flag = tmp_path / "crash"
    flag.touch()
    out = tmp_path / "out"
    command = args(root, out, "--annotators", PROBE, "-p", f"{PROBE}.flag={flag}", "--concurrency", "2",
                   "--max-shard-retries", "1")
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "1 of 3 shards failed" in err and "part-000002.parquet (failed 2 times)" in err
    assert sorted(p.name for p in out.glob("part-*")) == ["part-000000.parquet", "part-000001.parquet"]
    flag.unlink()
    assert main(command) == 0
    assert manifests.read_manifest_json(str(out))["counts"]["ok"] == 6


@pytest.mark.slow
def test_shards_go_to_the_free_actor_not_round_robin(tmp_path, local_ray):
    """Two actors; the first shard is heavy. The other actor takes every other shard meanwhile
    (round-robin would queue half of them behind the heavy one)."""
    root = tmp_path / "photos"
    for i in range(14):
        write_image(root / f"{i:02d}.png", value=10 * i)
    Image.new("RGB", (64, 64), (0, 255, 255)).save(root / "00.png")  # shard 0: heavy
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    out = tmp_path / "out"
    assert main(args(root, out, "--annotators", PROBE, "-p", f"{PROBE}.log_dir={log_dir}",
                     "-p", f"{PROBE}.slow_s=8", "--concurrency", "2")) == 0
    frame = manifests.read(str(out), columns=["id", "source"], duplicates="keep")
    pid_of = {row.source: (log_dir / row.id).read_text() for row in frame.itertuples()}
    heavy_actor = pid_of["00.png"]
    assert [s for s, pid in sorted(pid_of.items()) if pid == heavy_actor] == ["00.png", "01.png"]
    assert len(set(pid_of.values())) == 2


# --- resume on metadata edits; the lock belongs to one run, checked before any change -------------

def test_resume_redoes_the_shard_of_an_edited_metadata_caption(tmp_path, local_ray):
    """A caption edited in metadata.jsonl (image and sidecars untouched) redoes its shard only."""
    root = tmp_path / "photos"
    for i in range(4):
        write_image(root / f"{i}.png", value=50 * i)
    metadata = root / "metadata.jsonl"

    def write_metadata(last: str) -> None:
        captions = [f"caption {i}" for i in range(3)] + [last]
        metadata.write_text("".join(json.dumps({"file_name": f"{i}.png", "text": c}) + "\n"
                                    for i, c in enumerate(captions)))

    write_metadata("caption 3")
    out = tmp_path / "out"
    assert main(args(root, out)) == 0
    kept = (out / "part-000000.parquet").stat().st_mtime_ns
    write_metadata("edited")
    assert main(args(root, out)) == 0
    rows = rows_by_source(out)
    assert rows["3.png"]["caption"] == "edited" and rows["2.png"]["caption"] == "caption 2"
    summary = manifests.read_manifest_json(str(out))
    assert summary["run"]["shards_written"] == 1 and summary["run"]["shards_kept"] == 1
    assert (out / "part-000000.parquet").stat().st_mtime_ns == kept


def test_a_lock_whose_pid_now_belongs_to_a_later_process_is_stale():
    """A dead run's pid reused by a process started after the lock was taken does not keep it."""
    import psutil

    lock = {"host": socket.gethostname(), "pid": os.getpid(),
            "started_unix": psutil.Process().create_time() - 3600}  # taken before this process existed
    assert "no longer runs" in (output_lock.stale_reason(lock) or "")
    lock["started_unix"] = time.time()  # taken by this process: alive
    assert output_lock.stale_reason(lock) is None


def test_releasing_a_lock_another_run_took_over_leaves_that_runs_lock(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    first = output_lock.acquire(str(out))
    taken = {"host": "elsewhere", "pid": 1, "token": "other", "started": "now", "started_unix": time.time(),
             "heartbeat": time.time()}
    try:
        (out / output_lock.LOCK_NAME).write_text(json.dumps(taken))  # taken over meanwhile
    finally:
        first.release()
    assert output_lock.read_lock(str(out)) == taken


def test_a_run_refused_by_the_lock_leaves_the_live_runs_files_alone(tmp_path, capsys):
    """The lock is taken before planning: a refused run deletes neither the temp file the live run
    is writing nor ``_manifest.json``."""
    root = tmp_path / "photos"
    write_image(root / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "_manifest.json").write_text("{}")
    writing = out / ".tmp-0123-part-000000.parquet"
    writing.write_bytes(b"a shard being written")
    holder = output_lock.acquire(str(out))
    try:
        assert main(args(root, out)) == 2
        assert "is being written by another run" in capsys.readouterr().err
        assert writing.read_bytes() == b"a shard being written"
        assert (out / "_manifest.json").read_text() == "{}"
    finally:
        holder.release()


def test_two_links_to_one_folder_outside_the_input_list_it_once(tmp_path):
    """A folder outside the input reached through two links is listed once, under the first link."""
    outside = tmp_path / "elsewhere"
    write_image(outside / "o.png")
    root = tmp_path / "photos"
    write_image(root / "a.png")
    (root / "x").symlink_to(outside)
    (root / "y").symlink_to(outside)
    listing = list_inputs(str(root))
    assert [i.source for i in listing.items] == ["a.png", "x/o.png"]
    assert listing.skipped_links == ["y"]


# --- files that are not what their names say ------------------------------------------------------

def test_a_fifo_named_like_an_image_or_a_sidecar_is_an_error_row_not_a_hang(tmp_path, local_ray):
    root = tmp_path / "photos"
    write_image(root / "a.png")
    write_image(root / "b.png")
    os.mkfifo(root / "x.png")          # opening it would wait for a writer forever
    os.mkfifo(root / "b.txt")          # a sidecar that is a FIFO is not read
    os.mkfifo(root / "metadata.jsonl")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "pipeline" / "annotate.py"), *args(root, out), "--num-cpus", "1"],
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = rows_by_source(out)
    assert rows["x.png"]["status"] == "error" and rows["x.png"]["error"] == "read: not a regular file (a FIFO)"
    assert rows["b.png"]["status"] == "ok" and rows["b.png"]["caption"] == ""


def test_metadata_in_a_folder_whose_name_is_not_utf8_does_not_stop_the_job(tmp_path, local_ray):
    root = tmp_path / "photos"
    write_image(root / "ok.png")
    folder = Path(os.fsdecode(os.fsencode(str(root)) + b"/caf\xe9"))
    write_image(folder / "x.png")
    (folder / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "x"}\n')
    out = tmp_path / "out"
    assert main(args(root, out)) == 0
    rows = rows_by_source(out)
    assert rows["ok.png"]["status"] == "ok"
    assert rows["caf\\xe9/x.png"]["status"] == "error" and "not valid UTF-8" in rows["caf\\xe9/x.png"]["error"]


def test_sidecars_in_upper_case_json_or_utf16_and_metadata_with_a_bom_are_read(tmp_path, local_ray):
    root = tmp_path / "photos"
    for name in ("a.png", "b.png", "c.png"):
        write_image(root / name)
    (root / "a.JSON").write_text('{"caption": "a red square"}')
    (root / "b.txt").write_bytes("a cat in a café".encode("utf-16"))  # with its byte-order mark
    (root / "metadata.jsonl").write_bytes(b'\xef\xbb\xbf{"file_name": "c.png", "text": "from metadata"}\n')
    out = tmp_path / "out"
    assert main(args(root, out)) == 0
    rows = rows_by_source(out)
    assert [rows[n]["caption"] for n in ("a.png", "b.png", "c.png")] == ["a red square", "a cat in a café",
                                                                        "from metadata"]
    assert manifests.read_manifest_json(str(out))["run"]["captions_not_utf8"] == ["b.txt (utf-16)"]


# --- the lock under races ---------------------------------------------------------------------------

RACE = """
import os, sys, time
sys.path.insert(0, {root!r})
from pipeline import output_lock
time.sleep(max(0.0, {start} - time.time()))
try:
    lock = output_lock.acquire({out!r})
except output_lock.OutputLocked:
    said = "refused"
    lock = None
else:
    said = "held"
open(os.path.join({votes!r}, str(os.getpid())), "w").write(said)
deadline = time.time() + 60
while lock is not None and len(os.listdir({votes!r})) < 4 and time.time() < deadline:
    time.sleep(0.05)  # the holder keeps the lock until every racer has tried
if lock is not None:
    lock.release()
print(said)
"""


@pytest.mark.parametrize("stale", [False, True])
def test_runs_starting_at_once_get_one_lock(tmp_path, stale):
    """Four processes race for a fresh output (or one a killed run left locked): one holds it."""
    for trial in range(3):
        out = tmp_path / f"out{trial}"
        out.mkdir()
        if stale:
            (out / output_lock.LOCK_NAME).write_text(json.dumps(
                {"host": socket.gethostname(), "pid": 2 ** 22 + 17, "started_unix": 0, "heartbeat": 0,
                 "token": "dead"}))
        votes = tmp_path / f"votes{trial}"
        votes.mkdir()
        code = RACE.format(root=str(ROOT), start=time.time() + 3, out=str(out), votes=str(votes))
        procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(4)]
        said = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
        assert said == ["held", "refused", "refused", "refused"], (trial, said)
        assert not (out / output_lock.LOCK_NAME).exists() and not list(out.glob(".tmp-*"))


def test_a_run_whose_lock_was_taken_over_does_not_mark_the_manifest_complete(tmp_path, local_ray, monkeypatch,
                                                                             capsys):
    """Thought dead (a long stall), its lock taken by another run: it must not write _manifest.json."""
    from manifests.sink import ManifestSink

    root = tmp_path / "photos"
    write_image(root / "a.png")
    out = tmp_path / "out"
    real_summary = ManifestSink.summary

    def summarize_then_lose_the_lock(*a, **k):
        (out / output_lock.LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 7, "token": "theirs"}))
        return real_summary(*a, **k)

    monkeypatch.setattr(ManifestSink, "summary", summarize_then_lose_the_lock)
    assert main(args(root, out)) == 2
    assert "took over the lock" in capsys.readouterr().err
    assert not (out / "_manifest.json").exists()
    assert json.loads((out / output_lock.LOCK_NAME).read_text())["token"] == "theirs"  # theirs left alone

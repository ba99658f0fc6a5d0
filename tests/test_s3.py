"""The S3 path end to end, against a real S3-compatible server (moto's server mode) on 127.0.0.1.

Input from a bucket (sidecars, odd keys: spaces, '%', unicode, folder markers, a '//' key), a manifest
written to a bucket, reruns and the stats-file fallback, validate, read, and training from s3://.
The endpoint is in the environment (``AWS_ENDPOINT_URL``, set by the ``s3_server`` fixture) and, for
the main run, also in the URIs (``?endpoint_override=``), so query strings go through every join.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

import manifests
from manifests.io import join, resolve
from manifests.schema import shard_name
from pipeline.annotate import main

ROOT = Path(__file__).resolve().parents[1]

#: key under the input prefix -> caption expected in its row ("" without a sidecar)
IMAGES = {
    "a.jpg": "a caption from a txt sidecar",
    "b.png": "a caption from a json sidecar",
    "sp ace.jpg": "",
    "pct%41.jpg": "",  # a literal '%41': decoding it as a URI would look for pctA.jpg
    "ünï/ç.png": "",
    "q?h#+.jpg": "",  # URI syntax in a key: it is never parsed as a URI
    "dir/c.jpg": "",  # under a folder marker object "dir/"
    "odd/e.jpg": "",
}
DOUBLE_SLASH = "odd//double.jpg"
OTHER_KEYS = {"a.txt": b"a caption from a txt sidecar", "b.json": b'{"caption": "a caption from a json sidecar"}',
              "notes.md": b"not an image", "dir/": b"", "empty/": b"",
              "marker.jpg/": b""}  # a folder marker named like an image is a folder, not a row
SHARD_SIZE = 3


def _image(seed: int, fmt: str) -> bytes:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (96, 64), tuple(int(x) for x in rng.integers(0, 80, 3)))
    x, y = (int(v) for v in rng.integers(5, 40, 2))
    ImageDraw.Draw(im).rectangle([x, y, x + 40, y + 20], fill=(255, 255, 255))  # edges for Canny
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def new_bucket() -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    fs, _ = pafs.FileSystem.from_uri(f"s3://{name}?allow_bucket_creation=true")  # from_uri reads AWS_ENDPOINT_URL
    fs.create_dir(name)
    return name


def with_endpoint(uri: str, endpoint: str) -> str:
    return f"{uri}?endpoint_override={endpoint}"


def args(input_uri: str, output_uri: str, *extra: str) -> list[str]:
    return ["--input", input_uri, "--output", output_uri, "--shard-size", str(SHARD_SIZE), "--resolution", "64",
            *extra]


def copy_prefix(src: str, dst: str) -> None:
    """Copy every object under URI ``src`` to the same keys under URI ``dst`` (same server)."""
    fs, base = resolve(src)
    _, target = resolve(dst)
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if info.type == pafs.FileType.File:
            fs.copy_file(info.path, target + info.path[len(base):])


def listing(uri: str) -> dict[str, bytes]:
    """Every object under ``uri``: path below it -> bytes (what "left as it was" compares)."""
    fs, base = resolve(uri)
    out = {}
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                out[info.path[len(base) + 1:]] = f.read()
    return out


@pytest.fixture(scope="module")
def s3_input(s3_server) -> str:
    """A bucket prefix of images with sidecars and odd keys, as a URI with the endpoint in its query."""
    import boto3

    bucket = new_bucket()
    client = boto3.client("s3")  # pyarrow cannot write a key with '//': put every object as given
    for i, key in enumerate([*IMAGES, DOUBLE_SLASH]):
        client.put_object(Bucket=bucket, Key=f"photos/{key}", Body=_image(i, "PNG" if key.endswith(".png") else "JPEG"))
    for key, body in OTHER_KEYS.items():
        client.put_object(Bucket=bucket, Key=f"photos/{key}", Body=body)
    return with_endpoint(f"s3://{bucket}/photos", s3_server)


@pytest.fixture(scope="module")
def s3_manifest(s3_server, s3_input) -> str:
    """The collection annotated into a bucket (the output URI carries the endpoint too); read-only."""
    out = with_endpoint(f"s3://{new_bucket()}/manifest", s3_server)
    assert main(args(s3_input, out)) == 0
    return out


@pytest.fixture
def s3_manifest_copy(s3_server, s3_manifest) -> str:
    """A copy of the S3 manifest that a test may change (plain s3:// URI: endpoint from the environment)."""
    out = f"s3://{new_bucket()}/manifest"
    copy_prefix(s3_manifest, out)
    return out


def summary_run(manifest: str) -> dict:
    return manifests.read_manifest_json(manifest)["run"]


# ---------------------------------------------------------------------------------------------- joins

def test_join_keeps_a_uri_query_at_the_end():
    uri = "s3://bucket/out?endpoint_override=http://127.0.0.1:5055&region=us-east-1"
    assert join(uri, "_plan", "abc") == "s3://bucket/out/_plan/abc?endpoint_override=http://127.0.0.1:5055&region=us-east-1"
    assert join("s3://bucket/out/", "x.json") == "s3://bucket/out/x.json"
    assert join("/tmp/what?/out/", "x.json") == "/tmp/what?/out/x.json"  # a local path: '?' is a character
    assert join("local:///tmp/out", "x.json") == "local:///tmp/out/x.json"  # an empty authority is kept
    assert join("file:///tmp/out?a=1", "_s", "x") == "file:///tmp/out/_s/x?a=1"


def test_plan_files_round_trip_under_an_endpoint_in_the_uri(s3_server):
    from pipeline.plan import read_plan, run_plan_dir, write_plan
    from pipeline.reader import InputItem

    output = with_endpoint(f"s3://{new_bucket()}/out", s3_server)
    plan_dir = run_plan_dir(output)
    assert plan_dir.endswith(f"?endpoint_override={s3_server}") and "/out/_plan/" in plan_dir
    items = [InputItem("i1", "a.jpg", "a.txt", None, "1;2"), InputItem("i2", "odd//b.jpg", problem="p")]
    assert read_plan(write_plan(plan_dir, 0, items)) == items


def test_a_query_parameter_pyarrow_does_not_take_is_refused(s3_server, s3_input, capsys):
    with pytest.raises(ValueError, match="bogus"):
        resolve("s3://bucket/out?bogus=1")
    assert main(args(s3_input, "s3://bucket/out?bogus=1")) == 2
    assert "bogus" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- annotate

def test_every_listed_object_becomes_a_row(s3_manifest):
    frame = manifests.read(s3_manifest, columns=["source", "caption", "status", "error"], status=None,
                           duplicates="keep")
    rows = {r.source: r for r in frame.itertuples()}
    assert set(rows) == {*IMAGES, DOUBLE_SLASH}
    for key, caption in IMAGES.items():
        assert rows[key].status == "ok", (key, rows[key].error)
        assert rows[key].caption == caption, key
    # pyarrow cannot open a key with an empty segment: an error row that says so, not a silent drop
    assert rows[DOUBLE_SLASH].status == "error" and "'//'" in rows[DOUBLE_SLASH].error
    counts = manifests.read_manifest_json(s3_manifest)["counts"]
    assert counts["rows"] == len(IMAGES) + 1 and counts["ok"] == len(IMAGES) and counts["error"] == 1
    assert not any(key.startswith("_plan/") for key in listing(s3_manifest))  # plan files are scratch


def test_rerun_with_nothing_to_do_keeps_every_shard(s3_input, s3_manifest_copy):
    before = listing(s3_manifest_copy)
    assert main(args(s3_input, s3_manifest_copy)) == 0
    run = summary_run(s3_manifest_copy)
    assert (run["shards_written"], run["shards_kept"]) == (0, 3)
    after = listing(s3_manifest_copy)
    assert {k: v for k, v in after.items() if k != "_manifest.json"} == \
        {k: v for k, v in before.items() if k != "_manifest.json"}


def test_rerun_after_deleting_a_shard_redoes_only_it(s3_input, s3_manifest_copy):
    fs, base = resolve(s3_manifest_copy)
    fs.delete_file(join(base, shard_name(1)))
    assert main(args(s3_input, s3_manifest_copy)) == 0
    run = summary_run(s3_manifest_copy)
    assert (run["shards_written"], run["shards_kept"]) == (1, 2)
    assert len(manifests.read(s3_manifest_copy, columns=["id"], status=None, duplicates="keep")) == len(IMAGES) + 1


@pytest.mark.parametrize("overwrite", [False, True], ids=["resume", "overwrite"])
def test_a_missing_or_cut_short_stats_file_falls_back_to_the_shard(s3_input, s3_manifest_copy, overwrite):
    """The fallback reads the shard through the bucket's filesystem (it once opened it as a local file)."""
    fs, base = resolve(s3_manifest_copy)
    stats = join(base, "_stats", "part-000000.json")
    cut = join(base, "_stats", "part-000001.json")
    fs.delete_file(stats)
    with fs.open_input_stream(cut) as f:
        whole = f.read()
    with fs.open_output_stream(cut) as f:
        f.write(whole[: len(whole) // 2])
    assert main(args(s3_input, s3_manifest_copy, *(["--overwrite"] if overwrite else []))) == 0
    run = summary_run(s3_manifest_copy)
    assert (run["shards_written"], run["shards_kept"]) == ((3, 0) if overwrite else (0, 3))
    assert json.loads(listing(s3_manifest_copy)["_stats/part-000001.json"])["rows"] == SHARD_SIZE  # written again
    assert manifests.read_manifest_json(s3_manifest_copy)["counts"]["rows"] == len(IMAGES) + 1


def test_an_unreadable_shard_is_refused_and_overwrite_starts_over(s3_input, s3_manifest_copy, capsys):
    fs, base = resolve(s3_manifest_copy)
    fs.delete_file(join(base, "_stats", "part-000002.json"))
    with fs.open_output_stream(join(base, shard_name(2))) as f:
        f.write(b"PAR1 cut short")
    before = listing(s3_manifest_copy)
    assert main(args(s3_input, s3_manifest_copy)) == 2
    err = capsys.readouterr().err
    assert "part-000002.parquet" in err and "--overwrite" in err and "Traceback" not in err
    assert listing(s3_manifest_copy) == before  # refused: nothing changed
    assert main(args(s3_input, s3_manifest_copy, "--overwrite")) == 0
    assert summary_run(s3_manifest_copy)["shards_written"] == 3
    assert manifests.read_manifest_json(s3_manifest_copy)["counts"]["rows"] == len(IMAGES) + 1


# ---------------------------------------------------------------------------------------------- use

def test_validate_cli_on_an_s3_manifest(s3_manifest):
    done = subprocess.run([sys.executable, "-m", "manifests", "validate", s3_manifest], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == f"{s3_manifest}: valid"


def test_inspect_and_preview_an_s3_manifest(s3_manifest, tmp_path):
    from PIL import Image

    from manifests.inspect import inspect
    from manifests.preview import preview

    assert str(len(IMAGES) + 1) in inspect(s3_manifest)
    sheet = preview(s3_manifest, str(tmp_path / "grid.png"), 4, 64, "ok")
    Image.open(sheet.path).verify()
    assert len(sheet.rows) == 4 and all(row.status == "ok" for row in sheet.rows)


def test_read_with_manifests_and_with_pandas(s3_manifest):
    import pandas as pd

    frame = manifests.read(s3_manifest, columns=["id", "source", "image", "cond_canny"], duplicates="keep")
    assert sorted(frame["source"]) == sorted(IMAGES)
    assert all(isinstance(v["bytes"], bytes) and v["bytes"] for v in frame["cond_canny"])
    plain = pd.read_parquet(s3_manifest, columns=["id", "status"])  # pandas opens the URI through pyarrow
    assert len(plain) == len(IMAGES) + 1 and (plain["status"] == "ok").sum() == len(IMAGES)


@pytest.mark.slow
def test_train_a_few_steps_from_an_s3_manifest(s3_manifest, tiny_sd, tmp_path):
    from train.train import main as train_main

    out = tmp_path / "run"
    assert train_main(["--manifest", s3_manifest, "--condition", "canny", "--pretrained_model_name_or_path",
                       str(tiny_sd), "--output_dir", str(out), "--resolution", "64", "--train_batch_size", "2",
                       "--max_train_steps", "2", "--checkpointing_steps", "10", "--validation_steps", "1000",
                       "--report_to", "none", "--keep_duplicates", "--seed", "7"]) == 0
    assert json.loads((out / "train_summary.json").read_text())["figures"]["global_step"] == 2
    assert (out / "controlnet" / "diffusion_pytorch_model.safetensors").exists()

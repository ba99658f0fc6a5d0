"""Crashes during training: a run killed while it writes or deletes a checkpoint resumes from the last
complete one, and a manifest shard that went missing or bad between runs is named in one clear line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fake_accelerator import FakeAccelerator
from tests.test_train import ROOT, train_args

# Runs train/train.py as `python train/train.py` does, and stops it (sleeping, so the test can SIGKILL it
# there) at one exact point of a checkpoint's life, so the kill never depends on timing luck.
CRASH_WRAPPER = """
import os, runpy, shutil, sys, time
from pathlib import Path

sentinel, where = Path(os.environ["CRASH_SENTINEL"]), os.environ["CRASH_IN"]


def wait_for_the_kill():
    sentinel.write_text(str(os.getpid()))
    time.sleep(600)


if where == "save_state":  # inside checkpoints.save: every file of the checkpoint written, not yet complete
    import accelerate

    real_save, calls = accelerate.Accelerator.save_state, []

    def save_state(self, *args, **kwargs):
        real_save(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == int(os.environ["CRASH_AT_SAVE"]):
            wait_for_the_kill()

    accelerate.Accelerator.save_state = save_state
elif where == "rmtree":  # deleting a checkpoint folder: its weights gone, the rest (marker included) not yet
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        weights = Path(path) / "model.safetensors"
        if "checkpoint-" in Path(path).name and weights.is_file():
            weights.unlink()
            wait_for_the_kill()
        return real_rmtree(path, *args, **kwargs)

    shutil.rmtree = rmtree
sys.argv = [os.environ["TRAIN_PY"], *sys.argv[1:]]
runpy.run_path(os.environ["TRAIN_PY"], run_name="__main__")
"""


def kill_inside(where: str, args: list[str], tmp_path: Path, **env) -> None:
    """Run training in a subprocess until it reaches ``where`` (see CRASH_WRAPPER), then SIGKILL it."""
    wrapper, sentinel, log = tmp_path / "crash_run.py", tmp_path / "reached", tmp_path / "killed_run.log"
    wrapper.write_text(CRASH_WRAPPER)
    sentinel.unlink(missing_ok=True)
    env = {**os.environ, "CRASH_IN": where, "CRASH_SENTINEL": str(sentinel),
           "TRAIN_PY": str(ROOT / "train" / "train.py"), **env}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, str(wrapper), *args], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not sentinel.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                pytest.fail(f"the run never reached {where} (exit {proc.returncode}):\n{log.read_text()[-4000:]}")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL


def complete(out: Path) -> list[str]:
    from train import checkpoints

    return sorted(p.name for p in checkpoints.complete_checkpoints(str(out)))


def leftovers(out: Path) -> list[str]:
    """Checkpoint-like folders that are not complete checkpoints."""
    return sorted(p.name for p in out.iterdir() if p.is_dir() and "checkpoint" in p.name
                  and p.name not in complete(out))


def figures(out: Path) -> dict:
    return json.loads((out / "train_summary.json").read_text())["figures"]


@pytest.mark.slow
def test_killed_while_writing_a_checkpoint_resumes_from_the_last_complete_one(demo_manifest, tiny_sd, tmp_path,
                                                                               caplog):
    from train.train import main

    out = tmp_path / "run"
    schedule = ["--checkpointing_steps", "2", "--lr_scheduler", "constant"]
    kill_inside("save_state", train_args(demo_manifest, tiny_sd, out, "--max_train_steps", "4", *schedule),
                tmp_path, CRASH_AT_SAVE="2")
    assert complete(out) == ["checkpoint-2"]
    [partial] = leftovers(out)  # the step-4 checkpoint, killed mid-write: its files are there, it is not complete
    assert (out / partial / "model.safetensors").is_file()

    with caplog.at_level("INFO"):
        assert main(train_args(demo_manifest, tiny_sd, out, "--max_train_steps", "3", *schedule,
                               "--resume_from_checkpoint", "latest")) == 0
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in caplog.text
    assert partial in caplog.text and "interrupted" in caplog.text  # says what it removed, and why
    assert not (out / partial).exists()
    assert complete(out) == ["checkpoint-2", "checkpoint-3"] and leftovers(out) == []
    done = figures(out)
    assert done["global_step"] == 3 and len(done["ranks"][0]["rows"]) == 2  # only step 3 trained: 1 batch of 2


@pytest.mark.slow
def test_killed_while_writing_the_first_checkpoint_latest_starts_over(demo_manifest, tiny_sd, tmp_path, caplog):
    from train.train import main

    out = tmp_path / "run"
    args = train_args(demo_manifest, tiny_sd, out, "--max_train_steps", "2", "--checkpointing_steps", "2")
    kill_inside("save_state", args, tmp_path, CRASH_AT_SAVE="1")
    assert complete(out) == [] and len(leftovers(out)) == 1

    with caplog.at_level("INFO"):
        assert main([*args, "--resume_from_checkpoint", "latest"]) == 0
    assert "no complete checkpoint" in caplog.text
    assert complete(out) == ["checkpoint-2"] and leftovers(out) == []
    assert figures(out)["global_step"] == 2 and len(figures(out)["ranks"][0]["rows"]) == 4  # both steps trained


@pytest.mark.slow
def test_killed_while_replacing_a_checkpoint_never_leaves_a_half_deleted_one_to_resume(demo_manifest, tiny_sd,
                                                                                        tmp_path, caplog):
    """Resumed from step 2 of a run that reached step 4: the new checkpoint-4 replaces the abandoned one.
    Killed while the abandoned one is deleted, ``latest`` must still find a whole checkpoint."""
    from train.train import main

    out = tmp_path / "run"
    schedule = ["--checkpointing_steps", "2", "--lr_scheduler", "constant"]
    assert main(train_args(demo_manifest, tiny_sd, out, "--max_train_steps", "4", *schedule)) == 0
    assert complete(out) == ["checkpoint-2", "checkpoint-4"]
    kill_inside("rmtree", train_args(demo_manifest, tiny_sd, out, "--max_train_steps", "6", *schedule,
                                     "--resume_from_checkpoint", "checkpoint-2"), tmp_path)
    for name in complete(out):  # whatever is offered for resuming is whole
        assert (out / name / "model.safetensors").is_file(), name

    with caplog.at_level("INFO"):
        assert main(train_args(demo_manifest, tiny_sd, out, "--max_train_steps", "6", *schedule,
                               "--resume_from_checkpoint", "latest")) == 0
    assert f"resumed from {out / 'checkpoint-4'} at step 4" in caplog.text  # the new, complete checkpoint-4
    assert leftovers(out) == []
    assert figures(out)["global_step"] == 6 and len(figures(out)["ranks"][0]["rows"]) == 4


class Crash(BaseException):
    pass


def test_a_crash_while_pruning_leaves_every_visible_checkpoint_whole(tmp_path, monkeypatch):
    """``--checkpoints_total_limit``: a run that dies while deleting the oldest checkpoint leaves no
    half-deleted folder that still looks complete (its marker outliving its weights)."""
    import shutil

    from train import checkpoints

    accelerator = FakeAccelerator()
    checkpoints.save(accelerator, str(tmp_path), 2, 2)
    time.sleep(0.01)
    checkpoints.save(accelerator, str(tmp_path), 4, 2)
    real_rmtree = shutil.rmtree

    def dies_midway(path, *args, **kwargs):
        (Path(path) / "model.safetensors").unlink()
        raise Crash

    monkeypatch.setattr(shutil, "rmtree", dies_midway)
    time.sleep(0.01)
    with pytest.raises(Crash):
        checkpoints.save(accelerator, str(tmp_path), 6, 2)  # complete, then prunes checkpoint-2
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert complete(tmp_path) == ["checkpoint-4", "checkpoint-6"]
    for name in complete(tmp_path):
        assert (tmp_path / name / "model.safetensors").is_file(), name
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoints.resolve(str(tmp_path), "checkpoint-2")
    checkpoints.remove_leftovers(str(tmp_path))
    assert leftovers(tmp_path) == []


def test_a_checkpoint_written_whole_but_not_yet_renamed_is_kept(tmp_path):
    """Killed between the marker and the rename: the checkpoint was complete, so it is put in place."""
    from train import checkpoints

    checkpoints.save(FakeAccelerator(), str(tmp_path), 2, None)
    time.sleep(0.01)
    checkpoints.save(FakeAccelerator(), str(tmp_path), 4, None)
    (tmp_path / "checkpoint-4").rename(tmp_path / ".tmp-checkpoint-4")
    assert checkpoints.resolve(str(tmp_path), "latest") == tmp_path / "checkpoint-2"
    checkpoints.remove_leftovers(str(tmp_path))
    assert checkpoints.resolve(str(tmp_path), "latest") == tmp_path / "checkpoint-4"


# --- manifest shards that changed between runs ------------------------------------------------------------


def error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a copy cut short


def delete(path: Path) -> None:
    path.unlink()


@pytest.mark.slow
@pytest.mark.parametrize(("change", "shard", "says"), [
    (delete, "part-000001.parquet", "is missing"),
    (truncate, "part-000002.parquet", "truncated or corrupt"),
])
def test_a_shard_gone_bad_after_a_run_is_named_on_a_fresh_run_and_on_resume(manifest_copy, tiny_sd, tmp_path,
                                                                           capsys, change, shard, says):
    from train.train import main

    out = tmp_path / "run"
    args = train_args(manifest_copy, tiny_sd, out, "--max_train_steps", "1", "--checkpointing_steps", "1")
    assert main(args) == 0  # builds the row cache of the manifest as it was
    capsys.readouterr()
    change(manifest_copy / shard)

    for again in (train_args(manifest_copy, tiny_sd, tmp_path / "fresh", "--max_train_steps", "2"),
                  [*args, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"]):
        assert main(again) == 2
        [line] = error_lines(capsys)
        assert str(manifest_copy / shard) in line and says in line
        assert "annotate.py" in line and "restore" in line  # what to do about it
    assert not (tmp_path / "fresh").exists()


def test_a_shard_with_a_whole_footer_but_bad_pages_is_named_when_the_rows_are_read(manifest_copy):
    """The footer reads (so the start-up check passes), the pages do not: the cache build names the shard."""
    import pyarrow.parquet as pq

    from train.data import check_conditions, load_rows

    shard = manifest_copy / "part-000001.parquet"
    data = bytearray(shard.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little") + 8
    data[4:len(data) - footer] = bytes(len(data) - footer - 4)  # every page zeroed, the footer kept
    shard.write_bytes(bytes(data))
    assert pq.ParquetFile(shard).metadata.num_rows == 8
    check_conditions(str(manifest_copy), ["canny"])
    with pytest.raises(RuntimeError) as caught:
        load_rows(str(manifest_copy), ["canny"], 0)
    message = str(caught.value)
    assert str(shard) in message and "corrupt" in message and "annotate.py" in message and "\n" not in message


def zero_pages(path: Path) -> None:
    """Every data page zeroed, the footer kept: only reading the rows finds it."""
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little") + 8
    data[4:len(data) - footer] = bytes(len(data) - footer - 4)
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_the_trainer_exits_with_one_line_naming_a_shard_whose_pages_are_bad(manifest_copy, tiny_sd, tmp_path, capsys):
    from train.train import main

    zero_pages(manifest_copy / "part-000001.parquet")
    assert main(train_args(manifest_copy, tiny_sd, tmp_path / "run", "--max_train_steps", "1")) == 2
    [line] = error_lines(capsys)
    assert str(manifest_copy / "part-000001.parquet") in line and "corrupt" in line


def test_a_shard_replaced_by_one_with_other_rows_is_named(manifest_copy):
    from train.data import check_conditions

    (manifest_copy / "part-000002.parquet").write_bytes((manifest_copy / "part-000000.parquet").read_bytes())
    with pytest.raises(ValueError, match=r"part-000002\.parquet holds 8 rows where _manifest\.json lists 4"):
        check_conditions(str(manifest_copy), ["canny"])

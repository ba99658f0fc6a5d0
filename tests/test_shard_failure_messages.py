"""A shard that fails after its retries is reported in one plain line: the shard, the underlying error
(type and message, not Ray's wrapper), the input file when known; the full traceback goes to the log."""

from __future__ import annotations

import logging

import pytest
import ray

import manifests
from pipeline import shard as shard_module
from pipeline.dispatch import failure_reason
from tests.test_annotate_hostile_inputs import args, write_image
from pipeline.annotate import main

SETUP_FAILS = "tests.plugins:SetupFails"


def test_a_shard_failing_inside_its_ray_task_names_the_shard_and_the_cause_in_one_plain_line(
        tmp_path, local_ray, capsys, caplog):
    root = tmp_path / "photos"
    for i in range(4):
        write_image(root / f"{i}.png", value=40 * i)
    flag = tmp_path / "fail"
    flag.touch()
    out = tmp_path / "out"
    command = args(root, out, "--annotators", SETUP_FAILS, "-p", f"{SETUP_FAILS}.flag={flag}",
                   "--max-shard-retries", "1")
    with caplog.at_level(logging.ERROR, logger="annotate"):
        assert main(command) == 2
    err = capsys.readouterr().err
    lines = sorted(line.strip() for line in err.splitlines() if "part-" in line)  # in the order they end
    assert lines == [
        "part-000000.parquet (failed 2 times): RuntimeError: cannot load the model: cuda out of memory",
        "part-000001.parquet (failed 2 times): RuntimeError: cannot load the model: cuda out of memory",
    ]
    assert "\x1b" not in err and "RayTaskError" not in err and "pid=" not in err
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert 'File "' in logged and "in setup" in logged and "\x1b" not in logged  # the traceback, plain
    flag.unlink()
    assert main(command) == 0
    assert manifests.read_manifest_json(str(out))["counts"]["ok"] == 4


def _raises_with_a_note() -> None:
    exc = UnicodeEncodeError("utf-8", "a cat \ud800", 6, 7, "surrogates not allowed")
    exc.add_note(f"{shard_module.INPUT_NOTE}cats/a.png")
    raise exc


def test_the_input_file_noted_inside_a_ray_task_reaches_the_reason(local_ray):
    with pytest.raises(ray.exceptions.RayTaskError) as caught:
        ray.get(ray.remote(_raises_with_a_note).remote())
    assert "\x1b" in str(caught.value) or "ray::" in str(caught.value)  # what users saw before
    assert failure_reason(caught.value) == ("UnicodeEncodeError: 'utf-8' codec can't encode character '\\ud800' "
                                            "in position 6: surrogates not allowed (input file: cats/a.png)")


def test_a_failure_escaping_one_file_names_that_file(tmp_path, monkeypatch):
    """Whatever escapes a file's own error handling (a bug, a BaseException) fails the shard naming the file."""
    from pipeline.annotate import make_job
    from pipeline.config import AnnotateConfig
    from pipeline.plan import plan_shards
    from pipeline.reader import list_inputs

    root = tmp_path / "photos"
    write_image(root / "a.png", value=10)
    write_image(root / "b.png", value=200)
    config = AnnotateConfig(input=str(root), output=str(tmp_path / "out"), resolution=64)
    plan = plan_shards(list_inputs(str(root)).items, 8, "fp", lambda i, fp: False, str(tmp_path / "plan"))
    real = shard_module.phash

    def phash(image):
        if image.mean() > 150:
            raise ValueError("hash overflow")
        return real(image)

    monkeypatch.setattr(shard_module, "phash", phash)
    with pytest.raises(ValueError) as caught:
        shard_module.ShardWorker(make_job(config)).prepare(plan.todo[0])
    assert failure_reason(caught.value) == "ValueError: hash overflow (input file: b.png)"


class _UnprintableError(Exception):
    """An exception whose own ``__str__`` fails (a third-party bug): the shard's line must still come out."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken")


def test_an_exception_whose_str_raises_still_gives_the_shard_its_line():
    """What reaches the driver (Ray substitutes its own error when a task's exception does not format, so
    this comes from stages run without Ray) must still become one line, not a traceback of the reporting."""
    reason = failure_reason(_UnprintableError("x"))
    assert reason.startswith("_UnprintableError: ") and "str() raised RuntimeError" in reason
    assert "\n" not in reason


def test_a_very_long_message_is_cut_but_the_input_file_stays_in_the_line():
    exc = ValueError("caf\u00e9 \u2615 " + "x" * 5000 + "\nsecond line")
    exc.add_note(f"{shard_module.INPUT_NOTE}cats/\u00e9t\u00e9.png")
    reason = failure_reason(exc)
    assert reason.startswith("ValueError: caf\u00e9 \u2615 xxx")
    assert reason.endswith("(input file: cats/\u00e9t\u00e9.png)")
    assert len(reason) < 1000 and "second line" not in reason and "\n" not in reason

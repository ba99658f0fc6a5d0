"""Numbers and paths no run can use are refused in one line, exit 2, before any work; and no NaN
reaches a JSON file the project writes (strict parsers reject it)."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from tests.clis import CLIS, all_actions, parser_of

NONFINITE = ("nan", "NaN", "inf", "-inf", "+Infinity", "1e999")


def float_flags(name: str) -> list[tuple[argparse.ArgumentParser, argparse.Action]]:
    """The flags of a CLI that take a float (those that read "1.5" as 1.5)."""
    found = []
    for parser, action in all_actions(parser_of(name)):
        if not action.option_strings or action.nargs == 0 or not callable(action.type):
            continue
        try:
            value = action.type("1.5")
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            continue
        if isinstance(value, float):
            found.append((parser, action))
    return found


def strict_loads(text: str):
    """json.loads as strict parsers read JSON: NaN and Infinity are not JSON."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def test_the_float_flags_are_found():
    """The discovery below sees the float flags there are (so an empty loop cannot pass silently)."""
    names = {n: {a.option_strings[0] for _, a in float_flags(n)} for n in ("annotate", "train", "evaluate")}
    assert {"--max-aspect", "--min-aspect", "--gpus-per-worker"} <= names["annotate"]
    assert {"--learning_rate", "--max_grad_norm", "--proportion_empty_prompts", "--guidance_scale"} <= names["train"]
    assert "--guidance_scale" in names["evaluate"]


@pytest.mark.parametrize("cli", sorted(CLIS))
@pytest.mark.parametrize("text", NONFINITE)
def test_every_float_flag_refuses_non_finite_numbers(cli, text, capsys):
    entry, base = CLIS[cli]
    top = parser_of(cli)
    for parser, action in float_flags(cli):
        flag = action.option_strings[0]
        if parser is not top:  # a sub-command's flag: argparse turns the type's refusal into exit 2
            with pytest.raises(argparse.ArgumentTypeError, match="finite"):
                action.type(text)
            continue
        with pytest.raises(SystemExit) as exc:
            entry([*base, f"{flag}={text}"])
        assert exc.value.code == 2, (cli, flag, text)
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert flag in error and "finite" in error, error


@pytest.mark.parametrize("field", ["max_aspect", "min_aspect", "gpus_per_worker"])
def test_annotate_config_refuses_non_finite_numbers(field):
    """Built in code (not through flags), the config refuses them too: ``nan < 1`` is False, so range
    checks alone let NaN through."""
    from pipeline.config import AnnotateConfig

    with pytest.raises(ValueError, match=f"--{field.replace('_', '-')} nan.*finite"):
        AnnotateConfig(input="in", output="out", **{field: math.nan})


@pytest.mark.parametrize("field", ["learning_rate", "max_grad_norm", "proportion_empty_prompts"])
def test_train_config_refuses_non_finite_numbers(field):
    from train.config import TrainConfig

    with pytest.raises(ValueError, match=f"--{field} (nan|inf).*finite"):
        TrainConfig(manifest="m", condition=("canny",), pretrained_model_name_or_path="sd",
                    **{field: math.inf if field == "max_grad_norm" else math.nan})


def test_manifest_json_never_holds_nan(tmp_path):
    """A non-finite figure in the summary becomes null: the file stays standard JSON."""
    from manifests.io import read_manifest_json, write_manifest_json
    from manifests.schema import SCHEMA_VERSION

    write_manifest_json(str(tmp_path), {"schema_version": SCHEMA_VERSION, "counts": {"rows": 3},
                                        "timing": {"seconds": math.nan, "rate": math.inf},
                                        "settings": {"max_aspect": 4.0}, "list": [1.5, -math.inf]})
    text = (tmp_path / "_manifest.json").read_text()
    assert strict_loads(text) == {"schema_version": SCHEMA_VERSION, "counts": {"rows": 3},
                                  "timing": {"seconds": None, "rate": None},
                                  "settings": {"max_aspect": 4.0}, "list": [1.5, None]}
    assert read_manifest_json(str(tmp_path))["counts"] == {"rows": 3}


def test_train_summary_json_is_written_strictly():
    """train_summary.json is written with the same strict writer (a NaN loss becomes null)."""
    import numpy as np

    from manifests.io import strict_json

    text = strict_json({"figures": {"loss": float("nan"), "last": np.float64("inf"), "lr": 1e-4}}, indent=2,
                       default=str)
    assert strict_loads(text) == {"figures": {"loss": None, "last": None, "lr": 1e-4}}


@pytest.mark.parametrize("where", ["file", "inside_file"])
def test_train_output_dir_that_is_a_file_fails_in_one_line_before_any_model_loads(where, tmp_path, capsys,
                                                                                   monkeypatch):
    import train.loop
    from train.train import main

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(train.loop, "train", no_training)
    blocker = tmp_path / "runs"
    blocker.write_text("not a folder")
    output = blocker if where == "file" else blocker / "canny"
    with pytest.raises(SystemExit) as exc:
        main(["--manifest", str(tmp_path / "m"), "--condition", "canny", "--pretrained_model_name_or_path",
              str(tmp_path / "sd"), "--output_dir", str(output)])
    assert exc.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--output_dir {output}" in error and "file" in error and "Traceback" not in error
    assert blocker.read_text() == "not a folder"


def test_annotate_output_inside_a_file_fails_in_one_line(tmp_path, capsys):
    """The annotate equivalent: an --output below a file is refused before Ray starts, nothing written."""
    from pipeline.annotate import main

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"")
    blocker = tmp_path / "out"
    blocker.write_text("x")
    assert main(["--input", str(tmp_path / "in"), "--output", str(blocker / "sub")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--output" in error[0]
    assert blocker.read_text() == "x"


def annotator_float_params() -> list[tuple[str, str]]:
    import typing

    from annotators import registry

    found = []
    for name in registry.available():
        for key, hint in typing.get_type_hints(registry.get(name).Params).items():
            if hint is float or float in typing.get_args(hint):
                found.append((name, key))
    return found


@pytest.mark.parametrize(("name", "key"), annotator_float_params())
def test_every_float_annotator_parameter_refuses_non_finite_numbers(name, key, capsys):
    """-p NAME.KEY=nan is a float on the command line too: refused in one line before any work."""
    entry, base = CLIS["annotate"]
    for text in ("nan", "inf"):
        with pytest.raises(SystemExit) as exc:
            entry([*base, "--annotators", name, "-p", f"{name}.{key}={text}"])
        assert exc.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"{name}.{key}" in error and "finite" in error, error



@pytest.mark.parametrize(("field", "value", "says"), [
    ("learning_rate", "-1e-4", "0 or more"),  # AdamW would refuse it with a traceback, after the models load
    ("max_grad_norm", "0", "above 0"),  # every gradient clipped to nothing: a run that trains nothing
    ("max_grad_norm", "1e-400", "above 0"),  # underflows to 0.0
    ("max_grad_norm", "-1", "above 0"),  # torch's clip would flip every gradient's sign
])
def test_train_refuses_a_step_size_or_clip_no_run_can_use(field, value, says, capsys):
    from train.train import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(["--manifest", "m", "--condition", "canny", "--pretrained_model_name_or_path", "sd",
                    f"--{field}={value}"])
    assert exc.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--{field}" in error and says in error, error

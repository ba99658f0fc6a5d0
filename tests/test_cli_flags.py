"""Every flag of every CLI explains itself; the annotate and train flags are their configs' documented
fields, defined once, with the configs' defaults (shown in --help)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from tests.clis import CLIS, all_actions, parser_of

#: The annotate flags users and scripts already type (README's flag table): none may go or change type.
ANNOTATE_FLAGS = {
    "--input": str, "--input-list": str, "--output": str, "--annotators": tuple, "--param": list, "-p": list,
    "--captioner": str, "--caption-policy": str, "--caption-prefix": str, "--resolution": int, "--center-crop": bool,
    "--min-side": int, "--max-pixels": int, "--max-aspect": float, "--min-aspect": float, "--image-format": str,
    "--jpeg-quality": int, "--shard-size": int, "--batch-size": int, "--limit": int, "--overwrite": bool,
    "--weights-dir": str, "--require-detection": bool, "--concurrency": int, "--gpus-per-worker": float,
    "--cpus-per-worker": int, "--near-duplicate-distance": int, "--max-shard-retries": int, "--address": str,
    "--num-cpus": int, "--max-caption-chars": int,
}


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_every_flag_has_help(cli):
    """Each argument of each CLI (sub-commands included) says what it does in a few words."""
    silent = [f"{parser.prog} {action.option_strings or action.dest}" for parser, action in all_actions(parser_of(cli))
              if len((action.help or "").split()) < 3 or action.help == argparse.SUPPRESS]
    assert not silent


def annotate_config(*flags: str):
    from pipeline.annotate import parse_args

    return parse_args(["--input", "in", "--output", "out", *flags])


def test_annotate_parsed_defaults_are_the_config_defaults():
    from pipeline.config import AnnotateConfig

    assert annotate_config() == AnnotateConfig(input="in", output="out")


def test_annotate_flags_are_the_config_fields_with_their_old_names_and_types():
    """One flag per AnnotateConfig field (its parameters dicts come from -p), named as before."""
    from pipeline.config import AnnotateConfig

    parser = parser_of("annotate")
    flags = {s for a in parser._actions for s in a.option_strings} - {"-h", "--help"}
    fields = {f.name for f in dataclasses.fields(AnnotateConfig)} - {"annotator_params", "captioner_params"}
    assert flags == set(ANNOTATE_FLAGS)
    assert {"--" + f.replace("_", "-") for f in fields} == flags - {"--param", "-p"}
    values = {"--input-list": "l.txt", "--annotators": "canny", "--param": "canny.low=5", "-p": "canny.low=5",
              "--captioner": "blip", "--caption-policy": "always", "--caption-prefix": "a",
              "--image-format": "png", "--address": "auto", "--weights-dir": "w", "--input": "in", "--output": "o",
              "--max-aspect": "2.5", "--min-aspect": "0.5", "--gpus-per-worker": "0.5"}
    for flag, kind in ANNOTATE_FLAGS.items():
        base = ["--input", "in", "--output", "out"]
        argv = [*base, flag] if kind is bool else [*base, flag, values.get(flag, "3")]
        args = parser.parse_args(argv)
        dest = next(a.dest for a in parser._actions if flag in a.option_strings)
        assert isinstance(getattr(args, dest), kind), (flag, getattr(args, dest))


def test_annotate_values_reach_the_config():
    config = annotate_config("--annotators", "canny", "-p", "canny.low=50", "--max-aspect", "2.5",
                             "--gpus-per-worker", "0.5", "--center-crop", "--jpeg-quality", "80",
                             "--input-list", "list.txt", "--address", "auto", "--num-cpus", "2")
    assert config.annotators == ("canny",) and config.annotator_params == {"canny": {"low": "50"}}
    assert (config.max_aspect, config.gpus_per_worker, config.center_crop, config.jpeg_quality) == (2.5, 0.5, True, 80)
    assert (config.input_list, config.address, config.num_cpus) == ("list.txt", "auto", 2)


def test_annotate_help_shows_each_default_and_documents_every_flag(capsys):
    """--help lists every default a user would otherwise have to look up, jpeg-quality's included."""
    from pipeline.config import AnnotateConfig

    with pytest.raises(SystemExit) as exc:
        annotate_config("--help")
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    config = AnnotateConfig(input="in", output="out")
    for name in ("resolution", "min_side", "max_pixels", "max_aspect", "jpeg_quality", "shard_size", "batch_size",
                 "cpus_per_worker", "near_duplicate_distance", "max_shard_retries", "image_format",
                 "caption_policy"):
        assert f"(default: {getattr(config, name)})" in text, name
    assert "(default: canny)" in text  # a tuple default shown as the flag takes it
    assert "JPEG quality" in text


def test_train_help_shows_defaults(capsys):
    from train.train import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "(default: 5e-06)" in text and "(default: runs/controlnet)" in text and "(default: 0.5)" in text


def test_a_docstring_percent_sign_does_not_break_help():
    """Help text goes through %-formatting: a field documented with '%' must still print."""
    from manifests.flags import add_dataclass_flags

    @dataclasses.dataclass
    class Settings:
        share: float = 0.5
        """Share of rows kept, in % of the input."""

    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataclass_flags(parser, Settings, dashes=True)
    assert "in % of the input" in parser.format_help()

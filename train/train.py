#!/usr/bin/env python
"""Train a ControlNet on a manifest.

    accelerate launch train/train.py --manifest data/manifests/photos --condition canny \\
        --pretrained_model_name_or_path <sd-1.5 folder or hub id> --output_dir runs/canny

Flags follow diffusers' examples/controlnet/train_controlnet.py where the meaning is the same.
Bad flags, a missing manifest or condition fail here, before any model loads.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run by path (accelerate launch train/train.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import importlib.util
import json
import logging
from typing import Sequence

from manifests.flags import DefaultsHelpFormatter, add_dataclass_flags, parsed_fields
from train.config import TrainConfig, differences_from_diffusers, validation_image_files
from train.errors import SetupError


def build_parser() -> argparse.ArgumentParser:
    """One flag per ``TrainConfig`` field, its help text the field's docstring (defined once)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=DefaultsHelpFormatter)
    add_dataclass_flags(p, TrainConfig)
    p.add_argument("--no_random_flip", action="store_true", help="no flips: the default; kept for old command lines")
    return p


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Flags -> a checked ``TrainConfig``; a bad flag exits with a message saying what to do."""
    p = build_parser()
    args = p.parse_args(argv)
    values = parsed_fields(args, TrainConfig)
    if args.no_random_flip:
        values["random_flip"] = False
    try:
        config = TrainConfig(**values)
    except ValueError as exc:
        p.error(str(exc))
    if config.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        p.error("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (CUDA GPUs only), or drop the flag")
    return config


def missing_validation_images(config: TrainConfig) -> list[str]:
    """The ``--validation_image`` files that do not exist (each entry of a stacked run is a comma-separated
    file per condition; otherwise an entry is one path, commas and all)."""
    if not config.validation_enabled:
        return []
    stacked = len(config.condition) > 1 and not config.union
    files = [f for entry in config.validation_image for f in validation_image_files(entry, stacked)]
    return [f for f in files if not Path(f).is_file()]


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    from train.data import check_conditions

    try:
        summary = check_conditions(config.manifest, config.condition)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from train.sharding import flag_problem, requested_mode

    sharding_problem = flag_problem(config, requested_mode())  # the launch's FSDP/ZeRO-3 config: known now
    if sharding_problem:
        print(f"error: {sharding_problem}", file=sys.stderr)
        return 2
    missing = missing_validation_images(config)
    if missing:  # found now, not at the first validation hours into training
        print(f"error: --validation_image: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    for line in differences_from_diffusers(config):
        logging.getLogger("train").info("differs from diffusers: %s", line)
    from train.loop import train
    from train.data import TooManyUnreadableRows
    from train.row_cache import BadShard

    try:
        result = train(config, summary)
    # SetupError: the base, the ControlNet or a flag only loading shows wrong, before the first step;
    # BadShard: a shard broken past its footer is found only when its rows are read;
    # TooManyUnreadableRows: more rows than --max_bad_rows_fraction allows do not decode
    except (SetupError, BadShard, TooManyUnreadableRows) as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    if "exported" in result:
        print("\n".join(short_summary(result, config.output_dir)))
    return 0


def final_validation_scores(output_dir: Path) -> dict[str, float]:
    """The scores of the validation on the exported weights (``step: "final"`` in validation/metrics.jsonl)."""
    path = output_dir / "validation" / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return {k: v for r in records if r.get("step") == "final" for k, v in r.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def short_summary(result: dict, output_dir: str) -> list[str]:
    """A few lines for the terminal; the full figures (every rank's rows, ...) stay in train_summary.json."""
    figures = result.get("figures", {})
    loss = figures.get("final_loss")
    seconds = figures.get("train_seconds")
    lines = [f"trained {figures.get('global_step', '?')} steps"
             + (f" ({figures['epochs']:g} epochs over {figures['train_rows']} rows)" if "epochs" in figures else "")
             + (f" in {seconds:.0f} s" if isinstance(seconds, (int, float)) else "")
             + (f", final loss {loss:.4f}" if isinstance(loss, (int, float)) else "")]
    scores = final_validation_scores(Path(output_dir))
    if scores:
        lines.append("final validation: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    exported = result["exported"]
    # what was written depends on the control method (a ControlNet folder and single file, a LoRA, ...)
    lines.append("exported: " + ", ".join(f"{kind} {path}" for kind, path in exported.items()))
    lines.append(f"all figures: {Path(output_dir) / 'train_summary.json'}")
    return lines


if __name__ == "__main__":
    sys.exit(main())

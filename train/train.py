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
import dataclasses
import importlib.util
import json
import logging
import typing
from typing import Sequence

from train.config import SetupError, TrainConfig, differences_from_diffusers, field_docs, validation_image_files


def build_parser() -> argparse.ArgumentParser:
    """One flag per ``TrainConfig`` field, its help text the field's docstring (defined once)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    docs = field_docs(TrainConfig)
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        flag, kind = f"--{field.name}", hints[field.name]
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        default = None if required else (field.default if field.default is not dataclasses.MISSING
                                         else field.default_factory())
        extra: dict = {"help": docs[field.name]}
        if kind is bool:
            extra["action"] = argparse.BooleanOptionalAction if default else "store_true"
        elif typing.get_origin(kind) is tuple:
            if "separator" in field.metadata:  # one value, e.g. --condition canny,depth
                extra["type"] = _splitter(field.metadata["separator"])
            else:
                extra.update(nargs="*", type=str)
        else:
            extra["type"] = next(a for a in typing.get_args(kind) or (kind,) if a is not type(None))
        p.add_argument(flag, required=required, default=default, **extra)
    p.add_argument("--no_random_flip", action="store_true", help="no flips: the default; kept for old command lines")
    return p


def _splitter(separator: str):
    def split(value: str) -> tuple[str, ...]:
        return tuple(v.strip() for v in value.split(separator) if v.strip())
    return split


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Flags -> a checked ``TrainConfig``; a bad flag exits with a message saying what to do."""
    p = build_parser()
    args = vars(p.parse_args(argv))
    if args.pop("no_random_flip"):
        args["random_flip"] = False
    try:
        config = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
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
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

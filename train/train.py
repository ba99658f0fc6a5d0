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

from train.config import TrainConfig


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--manifest", required=True, help="manifest folder from pipeline/annotate.py")
    p.add_argument("--condition", required=True, help="annotator name(s), comma-separated to stack, e.g. canny,depth")
    p.add_argument("--pretrained_model_name_or_path", required=True)
    p.add_argument("--output_dir", default="runs/controlnet")
    p.add_argument("--controlnet_model_name_or_path", default=None)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--train_batch_size", type=int, default=4)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=5e-6)
    p.add_argument("--lr_scheduler", default="constant")
    p.add_argument("--lr_warmup_steps", type=int, default=500)
    p.add_argument("--max_train_steps", type=int, default=None)
    p.add_argument("--num_train_epochs", type=int, default=1)
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--checkpoints_total_limit", type=int, default=None)
    p.add_argument("--resume_from_checkpoint", default=None, help="checkpoint folder or 'latest'")
    p.add_argument("--mixed_precision", default="no", help="no, fp16 or bf16")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--use_8bit_adam", action="store_true")
    p.add_argument("--set_grads_to_none", action="store_true")
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--proportion_empty_prompts", type=float, default=0.5)
    p.add_argument("--validation_steps", type=int, default=100)
    p.add_argument("--validation_prompt", nargs="*", default=[])
    p.add_argument("--validation_image", nargs="*", default=[])
    p.add_argument("--num_validation_images", type=int, default=2)
    p.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, or none")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dataloader_num_workers", type=int, default=0)
    p.add_argument("--data_cache_dir", default=None,
                   help="folder of the row cache built once per manifest; default: $CONTROLFORGE_CACHE "
                        "or ~/.cache/controlforge")
    p.add_argument("--center_crop", action="store_true")
    p.add_argument("--no_random_flip", action="store_true")
    p.add_argument("--use_ema", action="store_true")
    p.add_argument("--max_nonfinite_steps", type=int, default=10)
    p.add_argument("--cache_latents", action="store_true")
    args = p.parse_args(argv)
    try:
        config = TrainConfig(
            manifest=args.manifest, condition=tuple(c.strip() for c in args.condition.split(",") if c.strip()),
            pretrained_model_name_or_path=args.pretrained_model_name_or_path, output_dir=args.output_dir,
            controlnet_model_name_or_path=args.controlnet_model_name_or_path, resolution=args.resolution,
            train_batch_size=args.train_batch_size, gradient_accumulation_steps=args.gradient_accumulation_steps,
            learning_rate=args.learning_rate, lr_scheduler=args.lr_scheduler, lr_warmup_steps=args.lr_warmup_steps,
            max_train_steps=args.max_train_steps, num_train_epochs=args.num_train_epochs,
            checkpointing_steps=args.checkpointing_steps, checkpoints_total_limit=args.checkpoints_total_limit,
            resume_from_checkpoint=args.resume_from_checkpoint, mixed_precision=args.mixed_precision,
            gradient_checkpointing=args.gradient_checkpointing, use_8bit_adam=args.use_8bit_adam,
            set_grads_to_none=args.set_grads_to_none, max_grad_norm=args.max_grad_norm,
            proportion_empty_prompts=args.proportion_empty_prompts, validation_steps=args.validation_steps,
            validation_prompt=tuple(args.validation_prompt), validation_image=tuple(args.validation_image),
            num_validation_images=args.num_validation_images, report_to=args.report_to, seed=args.seed,
            dataloader_num_workers=args.dataloader_num_workers, random_flip=not args.no_random_flip,
            center_crop=args.center_crop, use_ema=args.use_ema, max_nonfinite_steps=args.max_nonfinite_steps,
            cache_latents=args.cache_latents,
            data_cache_dir=args.data_cache_dir,
        )
    except ValueError as exc:
        p.error(str(exc))
    if config.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        p.error("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (CUDA GPUs only), or drop the flag")
    return config


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    from train.data import check_conditions

    try:
        summary = check_conditions(config.manifest, config.condition)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from train.loop import train

    result = train(config, summary)
    if "exported" in result:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

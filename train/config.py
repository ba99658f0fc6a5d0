"""Training settings: one dataclass, flags named as in diffusers' train_controlnet.py."""

from __future__ import annotations

import dataclasses
from typing import Any

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclasses.dataclass
class TrainConfig:
    """Everything a ControlNet training run needs; checked before any model loads."""

    manifest: str
    """Manifest folder written by ``pipeline/annotate.py``."""
    condition: tuple[str, ...]
    """Annotator name(s) whose ``cond_<name>`` maps condition the ControlNet; several stack as channels."""
    pretrained_model_name_or_path: str
    """Stable Diffusion base: local diffusers folder or hub id."""
    output_dir: str = "runs/controlnet"
    controlnet_model_name_or_path: str | None = None
    """Continue from this ControlNet instead of initialising one from the UNet."""
    resolution: int = 512
    """Training crop size in pixels; a multiple of 8."""
    train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-6
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 500
    max_train_steps: int | None = None
    """Total optimiser steps; overrides ``num_train_epochs`` when given."""
    num_train_epochs: int = 1
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    """A ``checkpoint-<step>`` folder, or ``latest``."""
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    set_grads_to_none: bool = False
    max_grad_norm: float = 1.0
    proportion_empty_prompts: float = 0.5
    """Fraction of captions replaced by "" (the paper uses 0.5, so the model learns from conditions)."""
    validation_steps: int = 100
    validation_prompt: tuple[str, ...] = ()
    validation_image: tuple[str, ...] = ()
    num_validation_images: int = 2
    num_validation_rows: int = 4
    """Held-out manifest rows used for validation when no ``validation_image`` is given."""
    report_to: str = "tensorboard"
    seed: int | None = None
    dataloader_num_workers: int = 0
    data_cache_dir: str | None = None
    """Folder of the memory-mapped row cache built once per manifest; default ``$CONTROLFORGE_CACHE``,
    else ``~/.cache/controlforge``."""
    random_flip: bool = True
    """Flip image and condition together half of the time."""
    center_crop: bool = False
    """Crop the centre instead of a random crop."""
    use_ema: bool = False
    max_nonfinite_steps: int = 10
    """Stop after this many optimiser steps in a row with a non-finite loss."""
    cache_latents: bool = False
    """Encode images and prompts once; needs fixed crops (``center_crop`` and no flip) and no
    empty-prompt dropout randomness per step (drop decisions are fixed per row)."""

    def __post_init__(self) -> None:
        self.condition = tuple(self.condition)
        if not self.condition:
            raise ValueError("--condition: name at least one annotator column, e.g. --condition canny")
        if self.resolution % 8 or self.resolution < 8:
            raise ValueError(f"--resolution {self.resolution} is not divisible by 8; use e.g. 512 or 768")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"--lr_scheduler {self.lr_scheduler!r}: choose one of {', '.join(LR_SCHEDULERS)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"--mixed_precision {self.mixed_precision!r}: choose one of {MIXED_PRECISION}")
        if not 0.0 <= self.proportion_empty_prompts <= 1.0:
            raise ValueError("--proportion_empty_prompts must be within 0..1")
        for key in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps",
                    "validation_steps", "num_train_epochs", "max_nonfinite_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key} must be at least 1")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise ValueError("--max_train_steps must be at least 1")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError("--checkpoints_total_limit must be at least 1")
        if self.validation_image and len(self.validation_prompt) not in (1, len(self.validation_image)):
            raise ValueError("--validation_prompt: give one prompt, or one per --validation_image")
        if self.validation_prompt and not self.validation_image:
            raise ValueError("--validation_prompt needs --validation_image (or leave both out to use held-out rows)")
        if self.cache_latents and (self.random_flip or not self.center_crop):
            raise ValueError("--cache_latents needs fixed crops: add --center_crop and --no_random_flip")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

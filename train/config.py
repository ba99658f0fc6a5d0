"""Training settings: one dataclass, flags named as in diffusers' train_controlnet.py."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from manifests.flags import nonfinite_problem

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISION = ("no", "fp16", "bf16")

# Where our defaults differ from diffusers' examples/controlnet/train_controlnet.py, and why.
DIFFUSERS_DIFFERENCES = {
    "proportion_empty_prompts": (0.0, "the ControlNet paper drops half the captions so the model learns from "
                                      "the condition alone"),
    "center_crop": (True, "a random crop (diffusers always crops the centre) sees more of each image"),
    "num_validation_images": (4, "fewer samples per validation, which runs on held-out rows too"),
    "output_dir": ("controlnet-model", "runs are collected under runs/"),
}
FAMILY_NAMES = {"sd": "SD 1.x/2.x", "sdxl": "SDXL", "sd3": "SD3/3.5", "flux": "Flux.1"}
UNION_FAMILIES = ("sdxl", "flux")
"""Families with a union ControlNet in diffusers: ControlNetUnionModel (SDXL), FluxControlNetModel(num_mode)."""
SDXL_CONTROL_TYPES = 6  # ControlNetUnionModel.from_unet builds num_control_type=6 slots
FLOW_FAMILIES = ("sd3", "flux")
VAE_SCALE = 8
"""Pixels per latent side of the SD3/Flux VAEs."""
DEFAULT_GUIDANCE = 3.5
"""Flux.1-dev's distilled guidance during training when ``--guidance_scale`` is not given."""
BASE_FOLDERS = {
    "sd": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
    "sd3": ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
            "tokenizer_3", "scheduler"),
    "flux": ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
}
"""The subfolders each family's base loads from."""
FOLDER_HINT = {
    "sd": "an SD 1.x/2.x base needs unet/, vae/, text_encoder/, tokenizer/, scheduler/",
    "sdxl": "an SDXL base needs unet/, vae/, text_encoder*/, tokenizer*/, scheduler/",
    "sd3": "a Flux/SD3 base needs transformer/, vae/, text_encoder*/, tokenizer*/, scheduler/",
    "flux": "a Flux/SD3 base needs transformer/, vae/, text_encoder*/, tokenizer*/, scheduler/",
}
HANDED_CONDITIONS = ("openpose", "mediapipe_pose", "mediapipe_face")
"""Conditions whose maps tell left from right by colour (OpenPose limb colours, face-mesh eyes)."""


def validation_image_files(entry: str, stacked: bool) -> list[str]:
    """The files one ``--validation_image`` value names: a comma-separated file per condition for conditions
    stacked as channels, else one path (commas and all)."""
    return [f.strip() for f in entry.split(",") if f.strip()] if stacked else [entry]


def validation_image_problem(images: tuple[str, ...], conditions: tuple[str, ...], union: bool) -> str | None:
    """Conditions stacked as channels need one map per condition for each sample: each ``--validation_image``
    is then a comma-separated list of files in ``--condition`` order (``canny.png,depth.png``); a single
    condition or a union run takes one file per sample (a union run uses it as each condition's map)."""
    if not images or union or len(conditions) < 2:
        return None
    for entry in images:
        files = validation_image_files(entry, stacked=True)
        if len(files) != len(conditions):
            example = ",".join(f"{c}.png" for c in conditions)
            return (f"--validation_image {entry}: the run stacks {len(conditions)} conditions ({','.join(conditions)}) "
                    f"as channels, so each sample needs one map per condition, comma-separated in --condition "
                    f"order (e.g. --validation_image {example}); got {len(files)}")
    return None


class SetupError(ValueError):
    """A run cannot be set up (base, ControlNet or flags that only loading shows wrong): ``train.py`` prints
    the message as one line and exits with 2. Raised before the first training step, never inside one."""


@dataclasses.dataclass
class TrainConfig:
    """Everything a ControlNet training run needs; checked before any model loads.

    Each field is a flag of ``train/train.py`` (``--<field name>``) whose help text is the
    field's docstring; ``metadata={"separator": ","}`` makes a tuple field one comma-separated value.
    """

    manifest: str
    """Manifest folder written by ``pipeline/annotate.py`` (only its status=ok rows are read)."""
    condition: tuple[str, ...] = dataclasses.field(metadata={"separator": ","})
    """Annotator name(s) whose ``cond_<name>`` maps condition the ControlNet, e.g. ``canny``; a
    comma-separated list (``canny,depth``) stacks them as channels, in that order (SD 1.x/2.x, SDXL), or
    with ``--union`` trains one ControlNet that accepts any of them."""
    pretrained_model_name_or_path: str
    """Base model (SD 1.x/2.x, SDXL, SD3/3.5 or Flux.1; the family is read from its model_index.json or
    subfolders): a local diffusers folder or a hub id."""
    output_dir: str = "runs/controlnet"
    """Where checkpoints, validation grids, logs and the exported ControlNet are written."""
    controlnet_model_name_or_path: str | None = None
    """Continue from this ControlNet (diffusers folder of the base's family) instead of initialising one from
    the base; its size is its own (leave ``controlnet_num_layers``/``controlnet_num_single_layers`` out)."""
    resolution: int = 512
    """Training crop size in pixels; a multiple of 8 (SD3/Flux: of 16, and SD3 at most its position
    embedding's reach, 8 x patch size x pos_embed_max_size)."""
    train_batch_size: int = 4
    """Examples per process per micro-batch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches whose gradients add up to one optimiser step."""
    learning_rate: float = 5e-6
    """AdamW learning rate after warm-up."""
    lr_scheduler: str = "constant"
    """Learning-rate schedule: constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial."""
    lr_warmup_steps: int = 500
    """Optimiser steps of linear warm-up (for the schedules that warm up)."""
    max_train_steps: int | None = None
    """Total optimiser steps; overrides ``num_train_epochs`` when given."""
    num_train_epochs: int = 1
    """Passes over the training rows, when ``max_train_steps`` is not given."""
    checkpointing_steps: int = 500
    """Save a resumable checkpoint every N optimiser steps (and at the last step)."""
    checkpoints_total_limit: int | None = None
    """Keep at most this many checkpoints, deleting the oldest written (never the one just written)."""
    resume_from_checkpoint: str | None = None
    """A ``checkpoint-<step>`` folder, or ``latest`` (the newest written in ``output_dir``)."""
    mixed_precision: str | None = None
    """``no``, ``fp16`` or ``bf16`` for the locked base; None takes accelerate's setting (``accelerate
    config``, ``accelerate launch --mixed_precision``, ``ACCELERATE_MIXED_PRECISION``), default ``no``."""
    gradient_checkpointing: bool = False
    """Recompute the ControlNet's activations in the backward pass: less memory, slower steps."""
    use_8bit_adam: bool = False
    """bitsandbytes' 8-bit AdamW (CUDA only): optimiser state in a quarter of the memory."""
    set_grads_to_none: bool = False
    """Free gradients after each step instead of zeroing them (a little less memory)."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this before each optimiser step."""
    proportion_empty_prompts: float = 0.5
    """Fraction of captions replaced by "" (the paper uses 0.5, so the model learns from conditions)."""
    validation_steps: int = 100
    """Generate validation samples every N optimiser steps, and once more on the exported model; 0: never."""
    validation_prompt: tuple[str, ...] = ()
    """Prompts for ``validation_image``: one for all images, or one per image."""
    validation_image: tuple[str, ...] = ()
    """Condition images to validate with, instead of held-out manifest rows."""
    num_validation_images: int = 2
    """Samples generated per validation condition."""
    validation_task: str | None = None
    """``circle``: also score validation samples by circle IoU and caption colour accuracy (the fill task)."""
    num_validation_rows: int = 4
    """Manifest rows held out of training to validate on; none are held out when ``validation_image``
    is given or validation is off. A union run samples each held-out row once per condition, that
    condition alone; conditions stacked without ``union`` are sampled once from all the row's maps and
    scored against each (``validation_image``: one comma-separated file per condition, in order)."""
    report_to: str = "tensorboard"
    """Where to log: tensorboard, wandb, or none."""
    seed: int | None = None
    """Seed of every random choice (data order, crops, noise); None means 0."""
    dataloader_num_workers: int = 0
    """DataLoader worker processes decoding examples (0: in the training process)."""
    keep_duplicates: bool = False
    """Also train on the rows the manifest's ``_duplicates/duplicates.parquet`` lists as exact or near copies of an
    earlier row (by default they are left out; a manifest without that table has none)."""
    data_cache_dir: str | None = None
    """Folder of the memory-mapped row cache built once per manifest; default ``$CONTROLFORGE_CACHE``,
    else ``~/.cache/controlforge``."""
    max_bad_rows_fraction: float = 0.01
    """Rows whose image or condition map does not decode are skipped (each logged, all listed in
    train_summary.json, a nearby row used in their place); more than this share of the training rows stops the
    run naming them (0: stop at the first)."""
    random_flip: bool = False
    """Flip image and condition together half of the time. Off by default, as in diffusers and the
    original ControlNet: pose and face maps colour left and right differently, so a flip would teach
    the wrong side (refused for those conditions)."""
    center_crop: bool = False
    """Crop the centre instead of a random crop."""
    use_ema: bool = False
    """Keep an exponential moving average of the weights; it is what is validated and exported."""
    max_nonfinite_steps: int = 10
    """Stop after this many optimiser steps in a row with a non-finite loss."""
    union: bool = False
    """Train one union ControlNet accepting any of the ``--condition`` maps (SDXL: diffusers'
    ControlNetUnionModel, a random subset of conditions per micro-batch; Flux: ``num_mode`` modes, one
    condition per example); the condition -> index mapping is written to the model card."""
    controlnet_num_layers: int | None = None
    """Transformer blocks in an SD3/Flux ControlNet (copied from the base's first blocks); None: diffusers'
    default (SD3 12, Flux 4), capped (with a log line) at the base's depth (SD3: depth - 1, its last block
    being context-only)."""
    controlnet_num_single_layers: int | None = None
    """Flux only: single-stream blocks in the ControlNet; None: diffusers' default 10, capped (with a log
    line) at the base's."""
    guidance_scale: float | None = None
    """Flux.1-dev's distilled guidance input during training; only for bases whose transformer config has
    ``guidance_embeds`` (refused on others); None: 3.5 on such a base."""
    max_sequence_length: int | None = None
    """T5 tokens per prompt (SD3/Flux); None: the pipeline's default (SD3 256, Flux 512)."""
    cache_latents: bool = False
    """Encode images and prompts once; needs fixed crops (``center_crop`` and no flip) and no
    empty-prompt dropout randomness per step (drop decisions are fixed per row)."""
    fp8_base: bool = False
    """Store the locked base's Linear/Conv2d weights (denoiser and text encoders; not the VAE) in float8 with a
    scale per output channel, upcast to the base's dtype layer by layer in the forward and again in the
    backward (train/float8_base.py): about half the memory of those weights in bf16, a quarter of fp32. Lossy
    (3 mantissa bits per weight); the ControlNet still copies, and trains in, full precision."""
    controlnet_lora_rank: int | None = None
    """ControlNet-LoRA: keep the ControlNet's copied blocks frozen at the base's weights and train only LoRA
    adapters of this rank on their Linear/Conv2d layers, plus the parts that are new (condition embedding,
    zero convolutions / controlnet blocks, a union's routing); every family. Exports the merged ControlNet, the
    adapter alone (peft) and, for SD 1.x/SDXL, a Control-LoRA file for ComfyUI. None: train the full copy."""
    controlnet_lora_alpha: float | None = None
    """LoRA alpha (the adapters' scale is alpha / rank); None: the rank (scale 1)."""
    controlnet_lora_dropout: float = 0.0
    """Dropout on the LoRA adapters' input during training, within 0..1 (0: none)."""

    def __post_init__(self) -> None:
        problem = nonfinite_problem(self, lambda name: f"--{name}")
        if problem:
            raise ValueError(problem)
        problem = output_dir_problem(self.output_dir)
        if problem:
            raise ValueError(problem)
        self.condition = tuple(self.condition)
        if not self.condition:
            raise ValueError("--condition: name at least one annotator column, e.g. --condition canny")
        repeated = sorted({c for c in self.condition if self.condition.count(c) > 1})
        if repeated:
            raise ValueError(f"--condition names {', '.join(repeated)} more than once; name each condition once")
        if self.resolution % 8 or self.resolution < 8:
            raise ValueError(f"--resolution {self.resolution} is not divisible by 8; use e.g. 512 or 768")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"--lr_scheduler {self.lr_scheduler!r}: choose one of {', '.join(LR_SCHEDULERS)}")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"--mixed_precision {self.mixed_precision!r}: choose one of {MIXED_PRECISION}")
        if not 0.0 <= self.proportion_empty_prompts <= 1.0:
            raise ValueError("--proportion_empty_prompts must be within 0..1")
        if self.learning_rate < 0:  # AdamW would refuse it with a traceback after the models load (0 is a no-op run)
            raise ValueError(f"--learning_rate {self.learning_rate}: give 0 or more (e.g. 1e-5)")
        if self.max_grad_norm <= 0:  # clipping to 0 trains nothing; below 0 flips every gradient's sign
            raise ValueError(f"--max_grad_norm {self.max_grad_norm}: give a norm above 0 (the default is 1.0)")
        if not 0.0 <= self.max_bad_rows_fraction <= 1.0:
            raise ValueError(f"--max_bad_rows_fraction {self.max_bad_rows_fraction}: give a share within 0..1 "
                             "(0.01 skips up to 1% of rows that do not decode)")
        for key in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps",
                    "num_train_epochs", "max_nonfinite_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key} must be at least 1")
        for key in ("validation_steps", "num_validation_rows"):
            if getattr(self, key) < 0:
                raise ValueError(f"--{key} must be 0 or more")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise ValueError("--max_train_steps must be at least 1")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError("--checkpoints_total_limit must be at least 1")
        if self.validation_image and len(self.validation_prompt) not in (1, len(self.validation_image)):
            raise ValueError("--validation_prompt: give one prompt, or one per --validation_image")
        if self.validation_prompt and not self.validation_image:
            raise ValueError("--validation_prompt needs --validation_image (or leave both out to use held-out rows)")
        problem = validation_image_problem(self.validation_image, self.condition, self.union)
        if problem:
            raise ValueError(problem)
        if self.cache_latents and (self.random_flip or not self.center_crop):
            raise ValueError("--cache_latents needs fixed crops: add --center_crop and leave --random_flip out")
        if self.fp8_base:
            problem = fp8_problem()
            if problem:
                raise ValueError(problem)
        if self.union and len(self.condition) < 2:
            raise ValueError("--union trains one ControlNet for several conditions: name two or more, e.g. "
                             "--condition canny,depth (or drop --union)")
        for key in ("controlnet_num_layers", "controlnet_num_single_layers", "max_sequence_length"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"--{key} must be at least 1")
        if self.controlnet_model_name_or_path:
            sized = [k for k in ("controlnet_num_layers", "controlnet_num_single_layers") if getattr(self, k)]
            if sized:
                raise ValueError(f"--{sized[0]} sizes a new ControlNet; --controlnet_model_name_or_path loads one "
                                 f"with its own size: drop --{sized[0]}")
        if self.guidance_scale is not None and not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            raise ValueError(f"--guidance_scale {self.guidance_scale}: give a finite value of 0 or more (Flux.1-dev "
                             "trains at 3.5), or leave it out")
        path = self.pretrained_model_name_or_path
        family = local_family(path)  # a hub id's is checked once it loads
        problem = family and (family_flag_problem(self, family, _base_json(path, "transformer/config.json"))
                              or controlnet_family_problem(self.controlnet_model_name_or_path, family, self.union))
        if problem:
            raise ValueError(problem)
        problem = controlnet_lora_problem(self)
        if problem:
            raise ValueError(problem)
        handed = [c for c in self.condition if c in HANDED_CONDITIONS]
        if self.random_flip and handed:
            raise ValueError(f"--random_flip with {', '.join(handed)}: these maps colour left and right limbs (or "
                             "eyes) differently, so a flipped pair teaches the wrong side; leave --random_flip out")

    @property
    def validation_enabled(self) -> bool:
        return self.validation_steps > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def controlnet_lora_problem(config: TrainConfig) -> str | None:
    """What makes the ControlNet-LoRA flags unusable, before any weights load (None: nothing)."""
    rank = config.controlnet_lora_rank
    if rank is None:
        tuned = [k for k in ("controlnet_lora_alpha", "controlnet_lora_dropout") if getattr(config, k)]
        return f"--{tuned[0]} shapes LoRA adapters: add --controlnet_lora_rank (e.g. 16)" if tuned else None
    if rank < 1:
        return f"--controlnet_lora_rank {rank}: give a rank of 1 or more (e.g. 16), or leave it out (full copy)"
    if config.controlnet_lora_alpha is not None and config.controlnet_lora_alpha <= 0:
        return f"--controlnet_lora_alpha {config.controlnet_lora_alpha}: give an alpha above 0 (default: the rank)"
    if not 0.0 <= config.controlnet_lora_dropout < 1.0:
        return f"--controlnet_lora_dropout {config.controlnet_lora_dropout}: give a probability within 0..1 (e.g. 0.1)"
    if config.controlnet_model_name_or_path:
        return ("--controlnet_lora_rank adapts a ControlNet copied from the base (its frozen weights are the "
                "base's); it does not continue a full ControlNet given by --controlnet_model_name_or_path: drop one "
                "of them (a LoRA run continues with --resume_from_checkpoint)")
    return None


def output_dir_problem(output_dir: str) -> str | None:
    """Why ``output_dir`` cannot be a folder (None when it can): it, or a folder above it, is an existing file."""
    path = os.path.abspath(os.path.expanduser(output_dir))
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if os.path.isdir(path):
        return None
    what = "is a file" if path == os.path.abspath(os.path.expanduser(output_dir)) else f"is inside {path}, a file"
    return (f"--output_dir {output_dir} {what}; give a folder (new, or a run to continue with "
            "--resume_from_checkpoint)")


def fp8_problem() -> str | None:
    """Why ``--fp8_base`` cannot work with this PyTorch (None when it can)."""
    import torch

    if getattr(torch, "float8_e4m3fn", None) is None:
        return (f"--fp8_base stores the base in float8, which this PyTorch ({torch.__version__}) lacks: upgrade "
                "torch to 2.1 or newer, or drop --fp8_base")
    return None


def family_flag_problem(config: TrainConfig, family: str, transformer: dict | None = None) -> str | None:
    """What is wrong with the flags for this model family (a message saying what to do), or None;
    ``transformer``: the base's transformer config (SD3/Flux), for the checks that need it."""
    label = FAMILY_NAMES[family]
    problem = resolution_problem(config.resolution, family, transformer) or guidance_problem(config, family,
                                                                                             transformer)
    if problem:
        return problem
    if config.union and family not in UNION_FAMILIES:
        return (f"--union: diffusers has no union ControlNet for {label} (only SDXL and Flux.1); drop --union to "
                + ("stack the conditions as channels" if family in ("sd", "sdxl") else "train one condition"))
    if config.union and family == "sdxl" and len(config.condition) > SDXL_CONTROL_TYPES:
        return f"--union on SDXL: ControlNetUnionModel has {SDXL_CONTROL_TYPES} control types; name at most that many"
    if config.controlnet_num_single_layers is not None and family != "flux":
        return f"--controlnet_num_single_layers sizes Flux's single-stream blocks; {label} has none: drop it"
    if config.controlnet_num_layers is not None and family in ("sd", "sdxl"):
        return (f"--controlnet_num_layers sizes SD3/Flux transformer ControlNets; a {label} ControlNet copies the "
                "UNet's whole encoder: drop it")
    if config.max_sequence_length is not None and family in ("sd", "sdxl"):
        return f"--max_sequence_length sets T5's prompt length (SD3, Flux); {label} has no T5: drop it"
    if family in ("sd3", "flux") and len(config.condition) > 1 and not config.union:
        return (f"{label} ControlNets read one VAE-encoded condition image (as their pipelines pass it), so "
                "conditions cannot be stacked as channels: name one condition"
                + (", or add --union" if family in UNION_FAMILIES else ""))
    return None


def resolution_problem(resolution: int, family: str, transformer: dict | None) -> str | None:
    """Why ``resolution`` does not fit an SD3/Flux base (None when it does): Flux packs 2x2 latent patches and
    SD3 patches latents by ``patch_size``, within a position embedding of ``pos_embed_max_size`` patches."""
    if family not in FLOW_FAMILIES:
        return None
    patch = int((transformer or {}).get("patch_size") or 2) if family == "sd3" else 2
    step = VAE_SCALE * patch
    if resolution % step:
        return (f"--resolution {resolution}: {FAMILY_NAMES[family]} needs a multiple of {step} (latents of /8 in "
                f"{patch}x{patch} patches); use e.g. {max(step, resolution // step * step)}")
    reach = (transformer or {}).get("pos_embed_max_size") if family == "sd3" else None
    if reach and resolution // step > reach:
        return (f"--resolution {resolution}: this SD3 base's position embedding reaches {reach} patches "
                f"({reach * step} px); use --resolution {reach * step} or less")
    return None


def guidance_problem(config: TrainConfig, family: str, transformer: dict | None) -> str | None:
    """Why ``--guidance_scale`` does not apply (None when it does, or was not given): only Flux bases with
    ``guidance_embeds`` (Flux.1-dev) read a guidance input."""
    if config.guidance_scale is None:
        return None
    if family != "flux":
        return f"--guidance_scale is Flux.1-dev's guidance input; {FAMILY_NAMES[family]} has none: drop it"
    if transformer is not None and not transformer.get("guidance_embeds"):
        return ("--guidance_scale: this Flux base has no guidance_embeds (a Flux.1-schnell-like model reads no "
                "guidance input): drop it")
    return None


CONTROLNET_FAMILIES = {"ControlNetModel": ("sd", "sdxl"), "ControlNetUnionModel": ("sdxl",),
                       "SD3ControlNetModel": ("sd3",), "FluxControlNetModel": ("flux",)}
"""ControlNet class (config.json ``_class_name``) -> the families whose bases it steers."""


def controlnet_family_problem(path: str | None, family: str, union: bool) -> str | None:
    """Why the ControlNet folder at ``path`` cannot continue on this base (None when it can, or when its
    config cannot be read here: a hub id offline is left to the loader). Read before any weights load."""
    if not path:
        return None
    config = controlnet_json(path)
    if config is None:
        return None
    kind = config.get("_class_name", "")
    own = "sdxl" if config.get("addition_embed_type") == "text_time" else "sd"
    families = (own,) if kind == "ControlNetModel" else CONTROLNET_FAMILIES.get(kind, ())
    what = ", ".join(FAMILY_NAMES[f] for f in families) or "no family this trainer knows"
    wanted = {"sd": "ControlNetModel", "sdxl": "ControlNetUnionModel" if union else "ControlNetModel",
              "sd3": "SD3ControlNetModel", "flux": "FluxControlNetModel"}[family]
    if family in families and kind == wanted:  # a Flux ControlNet's num_mode is checked when it loads
        return None
    return (f"{path} is a {kind or 'ControlNet of unknown class'} ({what} ControlNet); this "
            f"{'--union ' if union else ''}run's base is {FAMILY_NAMES[family]}: pass a {wanted} folder "
            "or leave --controlnet_model_name_or_path out")


def controlnet_json(path: str) -> dict | None:
    """The config.json of a ControlNet folder (or of its controlnet/ subfolder), None when not local."""
    for name in ("config.json", "controlnet/config.json"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file) as f:
                return json.load(f)
    return None


def base_folder_problem(path: str, family: str) -> str | None:
    """A local base folder's missing subfolders (a message saying what it needs), or None."""
    if not os.path.isdir(path):
        return None
    missing = [d for d in BASE_FOLDERS[family] if not os.path.isdir(os.path.join(path, d))]
    if not missing:
        return None
    folders = "folder" if len(missing) == 1 else "folders"
    return f"{path}: no {', '.join(d + '/' for d in missing)} {folders} ({FOLDER_HINT[family]})"


def local_family(path: str) -> str | None:
    """The family of a local base folder; None for a hub id or a folder that is not a diffusers base
    (loading it reports that, with the rest of the run's set-up)."""
    if not os.path.isdir(path):
        return None
    try:
        return detect_family(path)
    except (ValueError, OSError):
        return None


def detect_family(path: str) -> str:
    """``sd``, ``sdxl``, ``sd3`` or ``flux`` for a diffusers base (local folder or hub id): from its
    denoiser's config (transformer/ or unet/), else its model_index.json pipeline class."""
    transformer = _base_json(path, "transformer/config.json")
    if transformer:
        kind = transformer.get("_class_name", "")
        for prefix, name in (("SD3", "sd3"), ("Flux", "flux")):
            if kind.startswith(prefix):
                return name
        raise SetupError(f"{path}: transformer {kind!r} is not a supported family (SD3/3.5 or Flux.1)")
    unet = _base_json(path, "unet/config.json")
    if unet:
        return "sdxl" if unet.get("addition_embed_type") == "text_time" else "sd"
    pipeline = (_base_json(path, "model_index.json") or {}).get("_class_name", "")
    for prefix, name in (("StableDiffusion3", "sd3"), ("Flux", "flux"), ("StableDiffusionXL", "sdxl"),
                         ("StableDiffusion", "sd")):
        if pipeline.startswith(prefix):
            return name
    if not os.path.isdir(path):
        raise SetupError(f"{path}: no such folder, and no diffusers base of that hub id could be read; pass a "
                         "local diffusers folder of SD 1.x/2.x, SDXL, SD3/3.5 or Flux.1 (or a reachable hub id)")
    raise SetupError(f"{path}: no unet/ or transformer/ config and no known model_index.json pipeline; "
                     "expected a diffusers folder of SD 1.x/2.x, SDXL, SD3/3.5 or Flux.1")


def _base_json(path: str, name: str) -> dict | None:
    """A JSON file of the base: read locally, else fetched from the hub (None when absent)."""
    if os.path.isdir(path) or looks_local(path):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return None
    else:
        try:
            from huggingface_hub import hf_hub_download

            folder, _, filename = name.rpartition("/")
            file = hf_hub_download(path, filename, subfolder=folder or None)
        except Exception:
            return None
    with open(file) as f:
        return json.load(f)


def looks_local(path: str) -> bool:
    """A filesystem path rather than a hub id (``name`` or ``owner/name``): absolute, relative with ``.``/``~``,
    or with more than one ``/``; such a path that does not exist is never looked up on the hub."""
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1


def differences_from_diffusers(config: TrainConfig) -> list[str]:
    """One line per setting of this run that differs from diffusers' train_controlnet.py default."""
    lines = []
    for name, (theirs, why) in DIFFUSERS_DIFFERENCES.items():
        ours = getattr(config, name)
        if ours != theirs:
            lines.append(f"--{name} {ours} (diffusers' train_controlnet.py: {theirs}): {why}")
    return lines

"""Training settings: the ``TrainConfig`` dataclass (flags named as in diffusers' train_controlnet.py, built
from its field docstrings by train/train.py) and the checks it runs when built, before any model loads.
What is checked per model family lives in train/family_checks.py."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from manifests.flags import nonfinite_problem
from train.family_checks import (base_json, control_method_base_problem, controlnet_family_problem,
                                 family_flag_problem, local_family)
from train.family_specs import XS_SIZE_RATIO

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISION = ("no", "fp16", "bf16")
CONTROL_METHODS = ("controlnet", "controlnet_xs", "channel_concat")
"""``--control_method`` choices, the default first: ``controlnet`` (a copy of the base's encoder, every family),
``controlnet_xs`` (diffusers' ControlNet-XS adapter, SD 1.x/2.x and SDXL), ``channel_concat`` (the condition's
latents as extra input channels of a LoRA-tuned transformer, Flux.1); which family takes which:
``FamilySpec.control_methods``."""
METHOD_SETTINGS = {
    "controlnet_xs_size_ratio": ("controlnet_xs", "sizes a ControlNet-XS adapter"),
    "control_lora_rank": ("channel_concat", "sets the LoRA of --control_method channel_concat"),
}
"""Flags that belong to one control method -> (that method, what the flag does), for the refusal elsewhere."""
NO_CONTROLNET = {
    "union": "a union needs a ControlNet's mode input",
    "controlnet_num_layers": "it sizes a ControlNet's copied blocks, and this method has none",
    "controlnet_num_single_layers": "it sizes a Flux ControlNet's single-stream blocks, and this method has none",
    "control_layers_places": "it places ControlNet blocks, and this method has none",
    "controlnet_lora_rank": "it puts LoRA on a ControlNet's copied layers, and this method copies none",
}
"""Flags that only mean something with a ControlNet (``--control_method controlnet``), and why."""
METHOD_REFUSED: dict[str, dict[str, str]] = {
    "controlnet_xs": {**NO_CONTROLNET,
                      "fp8_base": "float8 storage of the base is built for a ControlNet (stored after the copy), and "
                                  "the XS adapter fuses with the UNet's own modules"},
    "channel_concat": {**NO_CONTROLNET,
                       "controlnet_model_name_or_path": "it continues a ControlNet, and channel-concat control has none",
                       "fp8_base": "the transformer is what trains here (its LoRA or all of it), so it cannot be "
                                   "stored in float8"},
}
"""Control method -> the flags that make no sense with it, and why."""

# Where our defaults differ from diffusers' examples/controlnet/train_controlnet.py, and why.
DIFFUSERS_DIFFERENCES = {
    "proportion_empty_prompts": (0.0, "the ControlNet paper drops half the captions so the model learns from "
                                      "the condition alone"),
    "center_crop": (True, "a random crop (diffusers always crops the centre) sees more of each image"),
    "num_validation_images": (4, "fewer samples per validation, which runs on held-out rows too"),
    "output_dir": ("controlnet-model", "runs are collected under runs/"),
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
    control_layers_places: tuple[int, ...] = dataclasses.field(default=(), metadata={"separator": ","})
    """Z-Image only: the base layers whose output each control block adds to, comma-separated, starting at 0
    and increasing (``0,5,10,15,20,25``, as in alibaba-pai's Z-Image-Turbo-Fun-Controlnet-Union); each block
    starts as a copy of the base layer it feeds. Empty: every 5th layer of the base from 0 (on Z-Image's 30
    layers exactly the Fun Union places)."""
    guidance_scale: float | None = None
    """Flux.1-dev's distilled guidance input during training; only for bases whose transformer config has
    ``guidance_embeds`` (refused on others); None: 3.5 on such a base."""
    max_sequence_length: int | None = None
    """T5 or LLM tokens per prompt (SD3, Flux, Z-Image's Qwen3, Qwen-Image's Qwen2.5-VL); None: the pipeline's
    default (SD3 256, Flux, Z-Image and Qwen-Image 512; Qwen-Image at most 1024)."""
    cache_latents: bool = False
    """Encode images and prompts once; needs fixed crops (``center_crop`` and no flip) and no
    empty-prompt dropout randomness per step (drop decisions are fixed per row)."""
    fp8_base: bool = False
    """Store the locked base's Linear/Conv2d weights (denoiser and text encoders; not the VAE) in float8 with a
    scale per output channel, upcast to the base's dtype layer by layer in the forward and again in the
    backward (train/float8_base.py): about half the memory of those weights in bf16, a quarter of fp32. Lossy
    (3 mantissa bits per weight); the ControlNet still copies, and trains in, full precision."""
    control_method: str = "controlnet"
    """How the condition steers the base: ``controlnet`` (a ControlNet beside the locked base, every family),
    ``controlnet_xs`` (SD 1.x/2.x, SDXL: diffusers' ``ControlNetXSAdapter``, a narrow network that exchanges
    features with the UNet at every block; exported for ``StableDiffusion(XL)ControlNetXSPipeline``) or
    ``channel_concat`` (Flux.1 only, diffusers' FluxControlPipeline: the condition's latents concatenated to the
    input channels, the input projection widened with zero-initialised columns, LoRA on the transformer)."""
    controlnet_xs_size_ratio: float | None = None
    """``controlnet_xs`` only: the adapter's block widths as a fraction of the UNet's (above 0, at most 1;
    diffusers' ``ControlNetXSAdapter.from_unet(size_ratio=...)``); None: 0.1, as the published XS models."""
    control_lora_rank: int | None = None
    """``channel_concat`` only: rank of the transformer's LoRA; None: 4 (diffusers' train_control_lora_flux.py);
    0: fine-tune the whole transformer instead (exported as a transformer folder, not a LoRA)."""
    reward_weight: float = 0.0
    """Weight of the ControlNet++-style reward loss (train/reward.py): from the training forward itself, the
    examples noised to at most ``reward_max_timestep`` get their clean image predicted in one step, decoded and
    scored with the condition's own annotator against the input condition; 0: off (training exactly as without
    it)."""
    reward_max_timestep: int = 200
    """The reward scores the examples whose training timestep is at most this (of the scheduler's 1000; SD3/Flux:
    sigma up to this / 1000, which their shifted sigmas rarely draw: give more); ControlNet++ uses 200, where a
    one-step prediction is sharp; 999 scores every example."""
    reward_distance: tuple[str, ...] = dataclasses.field(default=(), metadata={"separator": ","})
    """Distance per condition of the reward, ``condition=distance`` comma-separated (e.g. ``canny=bce``); a
    condition left out takes its first: canny soft_f1|bce|circle (circle: the fill task's fill/edge
    consistency), hed ssim|l2, depth ssi (scale/shift-invariant), segmentation ce."""
    reward_weights_dir: str | None = None
    """Folder of the annotators' weights for the reward models (as ``pipeline/annotate.py --weights-dir``);
    default ``$CONTROLFORGE_WEIGHTS``. Canny needs none (a differentiable stand-in)."""
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
        self.condition = tuple(self.condition)
        self.control_layers_places = layer_places(self.control_layers_places)
        self.reward_distance = tuple(self.reward_distance)
        for check in CONFIG_CHECKS:
            problem = check(self)
            if problem:
                raise ValueError(problem)

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


def layer_places(values) -> tuple[int, ...]:
    """``--control_layers_places`` as layer numbers (the flag gives them as text); a ValueError naming the flag
    for anything else."""
    try:
        return tuple(int(v) for v in values)
    except (TypeError, ValueError):
        shown = ",".join(str(v) for v in values)
        raise ValueError(f"--control_layers_places {shown}: give base layer numbers, comma-separated, "
                         "e.g. 0,5,10,15,20,25") from None


REWARD_DISTANCES = {"canny": ("soft_f1", "bce", "circle"), "hed": ("ssim", "l2"), "depth": ("ssi",),
                    "segmentation": ("ce",)}
"""Condition -> the distances its reward model offers, the default first (train/reward.py implements them)."""


def reward_distances(config: TrainConfig) -> dict[str, str]:
    """Condition -> the reward distance this run uses (``--reward_distance``, else the condition's default)."""
    chosen = dict(entry.split("=", 1) for entry in config.reward_distance)
    return {c: chosen.get(c, REWARD_DISTANCES[c][0]) for c in config.condition if c in REWARD_DISTANCES}


def reward_problem(config: TrainConfig) -> str | None:
    """Why the reward flags cannot work (a message saying what to do), or None."""
    if config.reward_weight < 0:
        return f"--reward_weight {config.reward_weight}: give 0 (off) or more (ControlNet++ uses 0.5 to 1)"
    if not 0 <= config.reward_max_timestep < 1000:
        return f"--reward_max_timestep {config.reward_max_timestep}: give a timestep within 0..999 (e.g. 200)"
    if config.reward_weight == 0:
        return ("--reward_distance has no effect with the reward off: add --reward_weight (e.g. 0.5) or drop it"
                if config.reward_distance else None)
    missing = [c for c in config.condition if c not in REWARD_DISTANCES]
    if missing:
        return (f"--reward_weight: no reward model for {', '.join(missing)} (rewards exist for "
                f"{', '.join(REWARD_DISTANCES)}); drop --reward_weight")
    if config.union:
        return "--reward_weight with --union: a union step routes conditions at random; train without --union"
    for entry in config.reward_distance:
        condition, _, distance = entry.partition("=")
        if condition not in config.condition:
            return (f"--reward_distance {entry}: {condition!r} is not a --condition of this run "
                    f"({','.join(config.condition)})")
        if distance not in REWARD_DISTANCES[condition]:
            return (f"--reward_distance {entry}: {condition} offers {', '.join(REWARD_DISTANCES[condition])}; "
                    f"write e.g. {condition}={REWARD_DISTANCES[condition][0]}")
    return None


def fp8_problem() -> str | None:
    """Why ``--fp8_base`` cannot work with this PyTorch (None when it can)."""
    import torch

    if getattr(torch, "float8_e4m3fn", None) is None:
        return (f"--fp8_base stores the base in float8, which this PyTorch ({torch.__version__}) lacks: upgrade "
                "torch to 2.1 or newer, or drop --fp8_base")
    return None



# --- the checks a TrainConfig runs when built, in order: each returns what is wrong (a message saying what
# to do) or None -----------------------------------------------------------------------------------------


def condition_problem(config: TrainConfig) -> str | None:
    """No condition, or one named twice."""
    if not config.condition:
        return "--condition: name at least one annotator column, e.g. --condition canny"
    repeated = sorted({c for c in config.condition if config.condition.count(c) > 1})
    if repeated:
        return f"--condition names {', '.join(repeated)} more than once; name each condition once"
    return None


def choice_problem(config: TrainConfig) -> str | None:
    """A resolution, scheduler or precision the trainer does not take."""
    if config.resolution % 8 or config.resolution < 8:
        return f"--resolution {config.resolution} is not divisible by 8; use e.g. 512 or 768"
    if config.lr_scheduler not in LR_SCHEDULERS:
        return f"--lr_scheduler {config.lr_scheduler!r}: choose one of {', '.join(LR_SCHEDULERS)}"
    if config.mixed_precision is not None and config.mixed_precision not in MIXED_PRECISION:
        return f"--mixed_precision {config.mixed_precision!r}: choose one of {MIXED_PRECISION}"
    return None


def range_problem(config: TrainConfig) -> str | None:
    """A share, rate or count outside the range it can take."""
    if not 0.0 <= config.proportion_empty_prompts <= 1.0:
        return "--proportion_empty_prompts must be within 0..1"
    if config.learning_rate < 0:  # AdamW would refuse it with a traceback after the models load (0 is a no-op run)
        return f"--learning_rate {config.learning_rate}: give 0 or more (e.g. 1e-5)"
    if config.max_grad_norm <= 0:  # clipping to 0 trains nothing; below 0 flips every gradient's sign
        return f"--max_grad_norm {config.max_grad_norm}: give a norm above 0 (the default is 1.0)"
    if not 0.0 <= config.max_bad_rows_fraction <= 1.0:
        return (f"--max_bad_rows_fraction {config.max_bad_rows_fraction}: give a share within 0..1 "
                "(0.01 skips up to 1% of rows that do not decode)")
    least = {**dict.fromkeys(("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps",
                              "num_train_epochs", "max_nonfinite_steps"), 1),
             **dict.fromkeys(("validation_steps", "num_validation_rows"), 0)}
    for key, lowest in least.items():
        if getattr(config, key) < lowest:
            return f"--{key} must be {'at least 1' if lowest else '0 or more'}"
    for key in ("max_train_steps", "checkpoints_total_limit", "controlnet_num_layers",
                "controlnet_num_single_layers", "max_sequence_length"):
        if getattr(config, key) is not None and getattr(config, key) < 1:
            return f"--{key} must be at least 1"
    return None


def validation_problem(config: TrainConfig) -> str | None:
    """Validation prompts and images that do not pair up."""
    if config.validation_image and len(config.validation_prompt) not in (1, len(config.validation_image)):
        return "--validation_prompt: give one prompt, or one per --validation_image"
    if config.validation_prompt and not config.validation_image:
        return "--validation_prompt needs --validation_image (or leave both out to use held-out rows)"
    return validation_image_problem(config.validation_image, config.condition, config.union)


def data_problem(config: TrainConfig) -> str | None:
    """Data settings that contradict each other or the conditions."""
    if config.cache_latents and (config.random_flip or not config.center_crop):
        return "--cache_latents needs fixed crops: add --center_crop and leave --random_flip out"
    handed = [c for c in config.condition if c in HANDED_CONDITIONS]
    if config.random_flip and handed:
        return (f"--random_flip with {', '.join(handed)}: these maps colour left and right limbs (or eyes) "
                "differently, so a flipped pair teaches the wrong side; leave --random_flip out")
    return None


def model_problem(config: TrainConfig) -> str | None:
    """ControlNet and base settings that cannot work together (the family's own checks: family_checks.py)."""
    if config.fp8_base and fp8_problem():
        return fp8_problem()
    if config.union and len(config.condition) < 2:
        return ("--union trains one ControlNet for several conditions: name two or more, e.g. "
                "--condition canny,depth (or drop --union)")
    if config.controlnet_model_name_or_path:
        sized = [k for k in ("controlnet_num_layers", "controlnet_num_single_layers", "control_layers_places")
                 if getattr(config, k)]
        if sized:
            return (f"--{sized[0]} sizes a new ControlNet; --controlnet_model_name_or_path loads one with its own "
                    f"size: drop --{sized[0]}")
    if config.guidance_scale is not None and not (math.isfinite(config.guidance_scale) and config.guidance_scale >= 0):
        return (f"--guidance_scale {config.guidance_scale}: give a finite value of 0 or more (Flux.1-dev trains at "
                "3.5), or leave it out")
    path = config.pretrained_model_name_or_path
    family = local_family(path)  # a hub id's is checked once it loads
    return family and (family_flag_problem(config, family, base_json(path, "transformer/config.json"))
                       or control_method_base_problem(config.control_method, base_json(path, "unet/config.json"))
                       or controlnet_family_problem(config.controlnet_model_name_or_path, family, config.union,
                                                    config.control_method))


def control_method_problem(config: TrainConfig) -> str | None:
    """An unknown ``--control_method``, a setting of another method, a value out of range, or flags the method has
    no use for (the family's own check, whether its pipelines take the method, is train/family_checks.py's)."""
    method = config.control_method
    if method not in CONTROL_METHODS:
        return f"--control_method {method!r}: choose one of {', '.join(CONTROL_METHODS)}"
    for flag, (owner, what) in METHOD_SETTINGS.items():
        if getattr(config, flag) is not None and method != owner:
            return f"--{flag} {what}: add --control_method {owner} or drop --{flag}"
    for flag, why in METHOD_REFUSED.get(method, {}).items():
        if getattr(config, flag) not in (None, False, ()):
            return f"--{flag} with --control_method {method}: {why}; drop --{flag}"
    return method_setting_problem(config)


def method_setting_problem(config: TrainConfig) -> str | None:
    """A control method's own setting out of range (each is refused above unless its method is chosen)."""
    rank, ratio = config.control_lora_rank, config.controlnet_xs_size_ratio
    if rank is not None and rank < 0:
        return f"--control_lora_rank {rank}: give a rank of 1 or more (e.g. 4), or 0 to fine-tune the whole transformer"
    if ratio is not None and not 0 < ratio <= 1:
        return (f"--controlnet_xs_size_ratio {ratio}: give the adapter's width as a fraction of the UNet's, above 0 "
                f"and at most 1 (default {XS_SIZE_RATIO})")
    if ratio is not None and config.controlnet_model_name_or_path:
        return ("--controlnet_xs_size_ratio sizes a new adapter; --controlnet_model_name_or_path loads one with its "
                "own size: drop --controlnet_xs_size_ratio")
    return None


CONFIG_CHECKS = (lambda config: nonfinite_problem(config, lambda name: f"--{name}"),
                 lambda config: output_dir_problem(config.output_dir),
                 condition_problem, choice_problem, range_problem, validation_problem, data_problem,
                 control_method_problem, model_problem, reward_problem, controlnet_lora_problem)
"""Run in this order when a ``TrainConfig`` is built; the first problem found is raised as a ValueError."""

def differences_from_diffusers(config: TrainConfig) -> list[str]:
    """One line per setting of this run that differs from diffusers' train_controlnet.py default."""
    lines = []
    for name, (theirs, why) in DIFFUSERS_DIFFERENCES.items():
        ours = getattr(config, name)
        if ours != theirs:
            lines.append(f"--{name} {ours} (diffusers' train_controlnet.py: {theirs}): {why}")
    return lines

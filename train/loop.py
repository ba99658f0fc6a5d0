"""The training loop, readable top to bottom.

    train():  set_up (accelerate, the locked base, the ControlNet, data, optimiser, resume)
              -> run_steps: for each batch, micro_step (encode, the family adapter's ``loss``:
                 train/step.py for UNets, train/flow.py for SD3/Flux; backward, the optimiser step
                 at the end of an accumulation) -> after_step (EMA, log, checkpoint, validate)
              -> finish (final validation on exactly the exported weights, export)

Validation (views, sampling, scoring) is train/validation.py, called with the ``Run``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from manifests.io import strict_json
from train import checkpoints, sharding
from train.adapter import BaseModels, FamilyOptions
from train.cache import EncodedCache
from train.config import TrainConfig
from train.errors import SetupError
from train.family_checks import family_flag_problem
from train.family_specs import DEFAULT_GUIDANCE
from train.controlnet_lora import is_lora, register_checkpoint_hooks, settings_of, trained_parameters
from train.data import (ManifestDataset, RankSampler, SkippedRows, TooManyUnreadableRows, cap_caption,
                        caption_char_limit, collate, drop_unreadable, load_rows)
from train.export import export
from train.models import load_base, make_controlnet, with_control_method
from train.reward import make_reward
from train.validation import ValidationScorer, holdout_count, run_validation

log = logging.getLogger("train")

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteLossError(RuntimeError):
    """Too many optimiser steps in a row had a non-finite loss."""


@dataclasses.dataclass(kw_only=True)
class Run:
    """One training run's state: built (with keywords) by ``set_up``, advanced by ``micro_step``/``after_step``;
    validation reads it as a ``train.validation.ValidationRun``."""

    config: TrainConfig
    accelerator: Any
    base: BaseModels
    controlnet: torch.nn.Module
    """The trained ControlNet, wrapped by accelerate (``accelerator.unwrap_model`` for the module)."""
    optimizer: Any
    lr_scheduler: Any
    ema: Any
    """diffusers' EMAModel of the ControlNet's weights, or None."""
    dataset: ManifestDataset
    sampler: RankSampler
    loader: torch.utils.data.DataLoader
    cache: Any
    """``EncodedCache`` with ``--cache_latents``, else None."""
    held_out: list[dict]
    """Manifest rows kept out of training, to validate on."""
    scorer: Any
    """Scores validation samples against their conditions (``ValidationScorer``), or None."""
    seed: int
    weight_dtype: torch.dtype
    """dtype of the locked base (the ControlNet trains in fp32)."""
    steps_per_epoch: int
    max_steps: int
    epochs: int
    skipped: SkippedRows | None = None
    """Rows that did not decode, counted as examples report them (this process's share)."""
    global_step: int = 0
    """Optimiser steps done (counting those before a resume)."""
    reward: Any = None
    """The reward term (train/reward.py ``RewardLoss``) with ``--reward_weight`` above 0, else None."""


@dataclasses.dataclass
class Meter:
    """What the loop counts for its logs and final figures."""

    first_step: int
    losses: list[float] = dataclasses.field(default_factory=list)
    last_loss: float | None = None
    last_parts: dict[str, float] = dataclasses.field(default_factory=dict)
    """The last step's diffusion and reward losses (with the reward on)."""
    samples: int = 0
    """Samples trained on after the first (warm-up) step, all ranks."""
    skipped_total: int = 0
    skipped_in_a_row: int = 0
    seen_rows: list[int] = dataclasses.field(default_factory=list)
    start: float = dataclasses.field(default_factory=time.perf_counter)
    paused: float = 0.0
    """Seconds spent checkpointing and validating: not training throughput."""

    def samples_per_s(self) -> float:
        return self.samples / max(1e-9, time.perf_counter() - self.start - self.paused)


def train(config: TrainConfig, summary: dict[str, Any]) -> dict[str, Any]:
    """Train and export; returns the final figures. ``summary`` is the manifest's _manifest.json."""
    run = set_up(config)
    if run.global_step >= run.max_steps:
        log.info("the checkpoint is at step %d and --max_train_steps is %d: nothing left to train; the export in "
                 "%s is left as it is (raise --max_train_steps to train on)", run.global_step, run.max_steps,
                 config.output_dir)
        run.accelerator.end_training()
        return {"figures": {"global_step": run.global_step}, "already_finished": True}
    figures = run_steps(run)
    return finish(run, figures, summary)


# --- set-up ----------------------------------------------------------------------------------


def set_up(config: TrainConfig) -> Run:
    """Accelerate, the locked base, the ControlNet (and EMA), data, optimiser and schedule; resume."""
    accelerator, seed, weight_dtype = start(config)
    base = load_locked_base(config, accelerator.device, weight_dtype)
    with accelerator.local_main_process_first():  # one process per machine builds the row cache
        train_rows, held_out = load_rows(config.manifest, config.condition, holdout_count(config),
                                         config.data_cache_dir, config.keep_duplicates)
    controlnet = make_controlnet(base, 3 * len(config.condition), config.controlnet_model_name_or_path,
                                 config.controlnet_num_layers, config.controlnet_num_single_layers, settings_of(config))
    if is_lora(controlnet):  # checkpoints hold only what trains
        register_checkpoint_hooks(accelerator)
    if config.fp8_base:  # only now: the ControlNet has copied the base's full-precision weights
        from train.float8_base import store_base_in_float8

        log.info("fp8 base: %s", store_base_in_float8(base, weight_dtype).line())
    if config.gradient_checkpointing:
        base.family.enable_gradient_checkpointing(controlnet)
    ema = make_ema(accelerator, controlnet) if config.use_ema else None

    dataset, sampler, held_out, skipped = make_data(config, accelerator, base, train_rows, held_out, seed)
    cache = make_cache(config, accelerator, base, dataset, weight_dtype) if config.cache_latents else None
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.train_batch_size, sampler=sampler,
                                         collate_fn=collate, num_workers=config.dataloader_num_workers)
    steps_per_epoch = sampler.batches_per_epoch() // config.gradient_accumulation_steps
    max_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch

    optimizer, lr_scheduler = make_optimizer_and_schedule(config, accelerator, controlnet, max_steps)
    sharding.before_prepare(accelerator, controlnet, base.family.name, config)  # only the ControlNet is sharded
    controlnet, optimizer, lr_scheduler = accelerator.prepare(controlnet, optimizer, lr_scheduler)
    if accelerator.is_main_process and config.report_to != "none":
        accelerator.init_trackers("controlnet", config={k: str(v) for k, v in config.to_dict().items()})
    scorer = ValidationScorer(config) if config.validation_enabled and accelerator.is_main_process else None
    run = Run(config=config, accelerator=accelerator, base=base, controlnet=controlnet, optimizer=optimizer,
              lr_scheduler=lr_scheduler, ema=ema, dataset=dataset, sampler=sampler, loader=loader, cache=cache,
              held_out=held_out, scorer=scorer, seed=seed, weight_dtype=weight_dtype, steps_per_epoch=steps_per_epoch,
              max_steps=max_steps, epochs=math.ceil(max_steps / steps_per_epoch), skipped=skipped,
              reward=make_reward(config, base, accelerator.device, weight_dtype))
    if config.resume_from_checkpoint:
        resume(run)
    return run


def start(config: TrainConfig) -> tuple[Any, int, torch.dtype]:
    """(accelerator, seed, the locked base's dtype), the seed set for every library."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(config)
    sharding.check_launch(accelerator, sharding.requested_mode())  # a sharding config accelerate did not honour
    if accelerator.device.type == "cpu":
        # Denormal floats take a slow path on CPUs (a bf16 validation here ran 45x slower); GPUs flush them.
        torch.set_flush_denormal(True)
    seed = config.seed if config.seed is not None else 0
    set_seed(seed)
    # accelerate resolved the precision: the flag, else `accelerate config` / launch / environment
    weight_dtype = weight_dtype_of(accelerator.mixed_precision)
    log.info("mixed precision: %s (locked base in %s, ControlNet in float32)", accelerator.mixed_precision,
             weight_dtype)
    return accelerator, seed, weight_dtype


def weight_dtype_of(mixed_precision: str) -> torch.dtype:
    """The locked base's dtype for accelerate's resolved ``mixed_precision``."""
    if mixed_precision not in WEIGHT_DTYPES:
        raise ValueError(f"mixed precision {mixed_precision!r} is not supported; use no, fp16 or bf16")
    return WEIGHT_DTYPES[mixed_precision]


def load_locked_base(config: TrainConfig, device: torch.device, weight_dtype: torch.dtype) -> BaseModels:
    """The locked base, its family checked against the flags and given its options, on ``device``."""
    base = with_control_method(load_base(config.pretrained_model_name_or_path, config.resolution),
                               config.control_method)
    check_family_flags(config, base)
    guidance = config.guidance_scale if config.guidance_scale is not None else DEFAULT_GUIDANCE
    base.options = FamilyOptions(config.condition, config.union, config.max_sequence_length, guidance,
                                 control_layers_places=config.control_layers_places,
                                 control_lora_rank=config.control_lora_rank,
                                 controlnet_xs_size_ratio=config.controlnet_xs_size_ratio)
    base.place(device, weight_dtype)
    return base


def make_data(config: TrainConfig, accelerator, base: BaseModels, train_rows: list[dict], held_out: list[dict],
              seed: int) -> tuple[ManifestDataset, RankSampler, list[dict], SkippedRows]:
    """(training dataset, this rank's sampler, the held-out rows that decode, the skipped-row count): held-out
    rows that do not decode are counted now, training ones as examples meet them."""
    skipped = SkippedRows(config.manifest, max(1, len(train_rows) // accelerator.num_processes),
                          config.max_bad_rows_fraction)
    held_out, unreadable_held_out = drop_unreadable(held_out, config.condition)
    skipped.add(unreadable_held_out, held_out=True)
    dataset = ManifestDataset(train_rows, config.condition, config.resolution, seed, config.center_crop,
                              config.random_flip, config.proportion_empty_prompts,
                              max_caption_chars=caption_char_limit(base.tokenizers, config.max_sequence_length))
    sampler = RankSampler(len(dataset), accelerator.process_index, accelerator.num_processes, seed,
                          config.train_batch_size, config.gradient_accumulation_steps)
    if sampler.batches_per_epoch() == 0:
        raise SetupError(f"{len(dataset)} training rows cannot fill {config.gradient_accumulation_steps} batch(es) "
                         f"of {config.train_batch_size} on each of {accelerator.num_processes} processes; lower "
                         "--train_batch_size or --gradient_accumulation_steps")
    return dataset, sampler, held_out, skipped


def check_family_flags(config: TrainConfig, base: BaseModels) -> None:
    """The family checks ``TrainConfig`` makes for a local base, again once the base is loaded (a hub id's
    family, transformer config and so resolution and guidance limits are known only now)."""
    transformer = dict(base.transformer.config) if base.transformer is not None else None
    problem = family_flag_problem(config, base.family.name, transformer)
    if problem:
        raise SetupError(problem)


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    return Accelerator(
        # Without a GPU, say so: accelerate then joins torchrun's ranks over gloo (multi-CPU); DeepSpeed: gloo too
        **sharding.accelerator_kwargs(sharding.requested_mode()),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,  # None: accelerate's own setting
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=f"{config.output_dir}/logs"),
    )


def make_ema(accelerator, controlnet: torch.nn.Module):
    """An EMA of the ControlNet's weights, saved and loaded with every checkpoint."""
    from diffusers.training_utils import EMAModel

    ema = EMAModel(trained_parameters(controlnet))
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)
    return ema


def make_cache(config: TrainConfig, accelerator, base: BaseModels, dataset: ManifestDataset, weight_dtype):
    """``--cache_latents``: encode every image and caption once; the dataset then skips images."""
    cache = EncodedCache(base, dataset, accelerator.device, weight_dtype, config.train_batch_size,
                         show_progress=accelerator.is_local_main_process)
    dataset.decode_images = False
    dataset.decode_conditions = cache.condition_moments is None  # SD3/Flux: the condition latents are cached too
    return cache


def make_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise RuntimeError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (CUDA only)") from exc
        return bnb.optim.AdamW8bit(params, lr=config.learning_rate)
    return torch.optim.AdamW(params, lr=config.learning_rate)


def make_optimizer_and_schedule(config: TrainConfig, accelerator, controlnet: torch.nn.Module, max_steps: int):
    from diffusers.optimization import get_scheduler

    optimizer = make_optimizer(config, trained_parameters(controlnet))  # a LoRA run: adapters and new parts
    # accelerate steps a prepared scheduler once per process per optimiser step
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)
    return optimizer, lr_scheduler


def resume(run: Run) -> None:
    """Load a checkpoint's full state (model, optimiser, schedule, EMA, RNG) and its step.

    Folders a killed run left half-written (or half-deleted) are removed first, with a message; ``latest``
    only ever picks a complete checkpoint, and with none (killed while writing the first) starts over."""
    if run.accelerator.is_main_process:
        checkpoints.remove_leftovers(run.config.output_dir)
    run.accelerator.wait_for_everyone()
    path = checkpoints.resolve(run.config.output_dir, run.config.resume_from_checkpoint)
    if path is None:
        log.warning("--resume_from_checkpoint latest: no complete checkpoint in %s; starting from step 0",
                    run.config.output_dir)
        return
    run.accelerator.load_state(str(path))
    run.global_step = checkpoints.step_of(path)
    if run.ema is not None:  # its shadow weights load on the CPU
        run.ema.to(run.accelerator.device)
    log.info("resumed from %s at step %d", path, run.global_step)


# --- the loop --------------------------------------------------------------------------------


def run_steps(run: Run) -> dict[str, Any]:
    """Optimiser steps from ``run.global_step`` to ``run.max_steps``; returns the figures."""
    config, accelerator = run.config, run.accelerator
    first_epoch = run.global_step // run.steps_per_epoch
    skip_batches = (run.global_step % run.steps_per_epoch) * config.gradient_accumulation_steps
    meter = Meter(first_step=run.global_step)
    bar = tqdm(total=run.max_steps, initial=run.global_step, desc="train", unit="step",
               disable=not accelerator.is_local_main_process)
    micro, step_finite = 0, True
    for epoch in range(first_epoch, run.epochs):
        run.dataset.set_epoch(epoch)
        run.sampler.set_epoch(epoch, skip_batches if epoch == first_epoch else 0)
        for batch in run.loader:
            count_skipped(run, batch, bar)
            step_finite = micro_step(run, batch, micro, step_finite, meter) and step_finite
            micro += 1
            if not accelerator.sync_gradients:
                continue  # mid-accumulation: no optimiser step yet
            micro = 0
            after_step(run, meter, step_finite)
            step_finite = True
            bar.update(1)
            bar.set_postfix(loss=f"{meter.last_loss:.4f}", refresh=False)
            if run.global_step >= run.max_steps:
                break
        if run.global_step >= run.max_steps:
            break
    bar.close()
    elapsed = time.perf_counter() - meter.start - meter.paused
    skipped_rows = skipped_row_report(run)
    if skipped_rows:
        log.warning("skipped %d rows whose image or condition map does not decode (listed in train_summary.json)",
                    len(skipped_rows))
    return {"global_step": run.global_step, "final_loss": meter.last_loss, "lr": run.lr_scheduler.get_last_lr()[0],
            **{f"final_{k}": v for k, v in meter.last_parts.items()},
            "skipped_steps": meter.skipped_total, "skipped_rows": len(skipped_rows), "unreadable_rows": skipped_rows,
            "samples_per_s": round(meter.samples / elapsed, 3) if elapsed else None,
            "train_seconds": round(time.perf_counter() - meter.start, 1),  # wall time, validations included
            "ranks": rank_report(accelerator, run.controlnet, meter.seen_rows)}


def count_skipped(run: Run, batch: dict[str, Any], bar: tqdm) -> None:
    """Count the rows the batch's examples stood in for; past the allowed share, stop (the bar closed first,
    so the one-line error starts its own line)."""
    try:
        run.skipped.add(batch["skipped_rows"], batch["unusable"])
    except TooManyUnreadableRows:
        bar.close()
        raise


def micro_step(run: Run, batch: dict[str, Any], micro: int, step_finite: bool, meter: Meter) -> bool:
    """Forward and backward on one micro-batch; the optimiser steps at the end of an accumulation
    unless one of its micro-batches had a non-finite loss on any rank. Returns this batch's finiteness."""
    accelerator, config = run.accelerator, run.config
    with accelerator.accumulate(run.controlnet):
        # Randomness per (step, micro-batch, rank): a resumed run draws what a straight one would.
        generator = torch.Generator().manual_seed(
            hash((run.seed, run.global_step, micro, accelerator.process_index)) % 2**63)
        latents, hidden, added = encode_batch(run, batch, generator)
        condition = batch_conditions(run, batch)
        if run.reward is None:
            loss = family_loss(run.base, run.controlnet, latents, hidden, added, condition, generator)
        else:  # ControlNet++'s reward on the same forward's one-step prediction (train/reward.py)
            loss = run.reward.loss(run.base, run.controlnet, latents, hidden, added, condition, generator)
        finite = bool(accelerator.gather(torch.isfinite(loss).float()[None].to(accelerator.device)).min() > 0)
        if finite:
            accelerator.backward(loss)
            meter.losses.append(loss.detach().item())
        if accelerator.sync_gradients:
            if step_finite and finite:
                accelerator.clip_grad_norm_(run.controlnet.parameters(), config.max_grad_norm)
                run.optimizer.step()
                run.lr_scheduler.step()
            run.optimizer.zero_grad(set_to_none=config.set_grads_to_none)
    if run.global_step > meter.first_step:  # throughput after the first (warm-up) step
        meter.samples += len(batch["captions"]) * accelerator.num_processes
    meter.seen_rows.extend(batch["indices"])
    return finite


def family_loss(base: BaseModels, controlnet: torch.nn.Module, latents: torch.Tensor, hidden: torch.Tensor,
                added: dict, condition: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A batch's loss as its family computes it: epsilon/v on a UNet (train/step.py) or flow matching on a
    transformer (train/flow.py); noise and timesteps come from ``generator``."""
    return base.family.loss(controlnet, base, latents, hidden, added, condition, generator)


def batch_conditions(run: Run, batch: dict[str, Any]):
    """The batch's condition pixels, or their cached latent distributions (``--cache_latents`` on SD3/Flux)."""
    cached = run.cache.conditions(batch["indices"]) if run.cache is not None else None
    return cached if cached is not None else batch["conditioning_pixel_values"].to(run.accelerator.device)


def encode_batch(run: Run, batch: dict[str, Any], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(latents, prompt embeddings, added conditioning) of a batch, from the cache or the frozen encoders."""
    base, device = run.base, run.accelerator.device
    with torch.no_grad():
        if run.cache is not None:
            latents = run.cache.latents(batch["indices"], generator).to(run.weight_dtype)
            hidden, added = run.cache.prompts_for(batch["captions"])
            return latents, hidden, base.family.with_sizes(added, batch, device)
        pixels = batch["pixel_values"].to(device, base.vae.dtype)
        # a CPU generator on any device: diffusers draws on the CPU and moves the sample, so GPU
        # runs get the numbers a CPU or a cached run gets
        latents = base.family.encode_latents(base, pixels, generator)
        latents = base.family.scale_latents(base, latents).to(run.weight_dtype)
        hidden, added = base.family.encode_prompts(base, batch["captions"], device)
    return latents, hidden, base.family.with_sizes(added, batch, device)


def after_step(run: Run, meter: Meter, step_finite: bool) -> None:
    """After an optimiser step: count it, update the EMA, log, checkpoint, validate."""
    config, accelerator = run.config, run.accelerator
    if step_finite:
        meter.skipped_in_a_row = 0
    else:
        meter.skipped_total += 1
        meter.skipped_in_a_row += 1
        if meter.skipped_in_a_row >= config.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{meter.skipped_in_a_row} steps in a row had a non-finite loss (at step {run.global_step}); "
                "lower --learning_rate, try --mixed_precision bf16 or no, or check the data")
    run.global_step += 1
    if run.global_step == meter.first_step + 1:
        meter.start = time.perf_counter()  # timing starts after the warm-up step
    if run.ema is not None:
        run.ema.step(trained_parameters(run.controlnet))
    logs = {"loss": sum(meter.losses) / max(1, len(meter.losses)), "lr": run.lr_scheduler.get_last_lr()[0],
            "samples_per_s": meter.samples_per_s(), "skipped_steps": meter.skipped_total,
            **(run.reward.pop_logs() if run.reward is not None else {})}
    meter.last_parts = {k: v for k, v in logs.items() if k.endswith("_loss")}
    meter.losses, meter.last_loss = [], logs["loss"]
    accelerator.log(logs, step=run.global_step)

    pause_start = time.perf_counter()  # checkpoints and samples are not training throughput
    if run.global_step % config.checkpointing_steps == 0 or run.global_step == run.max_steps:
        checkpoints.save(accelerator, config.output_dir, run.global_step, config.checkpoints_total_limit)
    if config.validation_enabled and run.global_step % config.validation_steps == 0 and accelerator.is_main_process:
        run_validation(run, accelerator.unwrap_model(run.controlnet), run.ema, f"{run.global_step:06d}",
                       accelerator.trackers, run.global_step)
    meter.paused += time.perf_counter() - pause_start


# --- the end ---------------------------------------------------------------------------------


def finish(run: Run, figures: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """Copy the EMA weights in, validate exactly what ships, export with a model card."""
    config, accelerator = run.config, run.accelerator
    figures["mixed_precision"] = accelerator.mixed_precision
    # What was trained, not the --num_train_epochs flag (which --max_train_steps overrides)
    figures["train_rows"] = len(run.dataset)
    figures["epochs"] = epochs_trained(run.global_step, config.train_batch_size, accelerator.num_processes,
                                       config.gradient_accumulation_steps, len(run.dataset))
    if config.fp8_base:
        from train.float8_base import base_float8_report

        figures["fp8_base"] = base_float8_report(run.base).line()
    accelerator.wait_for_everyone()
    unreadable = figures.pop("unreadable_rows", [])
    result: dict[str, Any] = {"figures": figures, "unreadable_rows": unreadable}
    final = sharding.exported_controlnet(accelerator, run.controlnet)  # all ranks: FSDP/ZeRO-3 gather it
    if accelerator.is_main_process:
        if run.ema is not None:
            run.ema.copy_to(trained_parameters(final))
        if config.validation_enabled:  # exactly the weights about to ship
            run_validation(run, final, None, "final")
        shipped = run.base.family.exported(final)  # what the export writes (an XS run: the adapter alone)
        card = {
            "base_model": config.pretrained_model_name_or_path, "manifest": config.manifest,
            "controlnet_class": type(shipped).__name__, "pipeline_class": run.base.family.card_pipeline_class(run.base),
            **run.base.family.card_extra(run.base),
            "manifest_fingerprint": manifest_fingerprint(summary), "conditions": list(config.condition),
            "provenance": summary.get("annotators", []), "figures": figures,
            "args": {**config.to_dict(), "num_train_epochs": figures["epochs"]},
        }
        example = example_row(run)
        # cut as training cuts it: a caption that is really a log file must not land whole in README.md
        card["example_prompt"] = cap_caption(example["caption"], run.dataset.max_caption_chars) if example else ""
        result["exported"] = export(shipped, config.output_dir, card, example_condition(run, example))
        result["conditions"] = list(config.condition)  # channel order, which evaluate.py checks
        result["args"] = config.to_dict()  # what the report reads the run's settings from
        result["run"] = run_record(config, run.held_out)  # what evaluate.py defaults to
        result.update(run.base.family.card_extra(run.base))  # a union's condition -> slot/mode mapping
        (Path(config.output_dir) / "train_summary.json").write_text(strict_json(result, indent=2, default=str))
    accelerator.end_training()
    return result


def epochs_trained(steps: int, batch: int, processes: int, accumulation: int, rows: int) -> float:
    """Passes over ``rows`` training rows that ``steps`` optimiser steps made (each takes batch x processes x
    accumulation examples), to two decimals."""
    return round(steps * batch * processes * accumulation / max(1, rows), 2)


def example_row(run: Run) -> dict[str, Any] | None:
    """The row the model card's snippet generates from: the first held out (each checked whole at set-up), else
    the first training row that decodes; None when no row near the start does (the card then has no example)."""
    if run.held_out:
        return run.held_out[0]
    try:  # the first training row may be one that was skipped: an export must never fail on it
        return run.dataset.rows[run.dataset.readable_position(0)]
    except TooManyUnreadableRows:
        return None


def example_condition(run: Run, row: dict[str, Any] | None) -> Any:
    """``row``'s first condition map (PIL), as stored in the manifest; None without a row."""
    from manifests.schema import cond_column
    from train.data import decode_rgb

    return None if row is None else decode_rgb(row[cond_column(run.config.condition[0])])


def run_record(config: TrainConfig, held_out: list[dict]) -> dict[str, Any]:
    """How the run read its data, for ``train/evaluate.py`` to default to: base, manifest (local paths made
    absolute, so it works from any folder), conditions, resolution, duplicates policy, validation task and
    the ids of the held-out rows (never trained on)."""
    def located(path: str) -> str:
        return str(Path(path).resolve()) if Path(path).exists() else path  # a hub id or URI stays as given

    return {"pretrained_model_name_or_path": located(config.pretrained_model_name_or_path),
            "manifest": located(config.manifest), "conditions": list(config.condition), "union": config.union,
            "resolution": config.resolution, "keep_duplicates": config.keep_duplicates,
            "task": config.validation_task, "seed": config.seed,
            "held_out_ids": [row["id"] for row in held_out]}


def manifest_fingerprint(summary: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(summary.get("shards", []), sort_keys=True).encode()).hexdigest()[:16]


def skipped_row_report(run: Run) -> list[dict[str, str]]:
    """Every rank's rows that did not decode, once each: {id, source, column, reason}."""
    from accelerate.utils import gather_object

    merged = {r["id"]: r for r in gather_object(run.skipped.summary())}
    return [merged[k] for k in sorted(merged)]


def rank_report(accelerator, controlnet, seen_rows: list[int]) -> list[dict[str, Any]]:
    """Per rank: rows trained on (this run) and a weight checksum, to show ranks stayed in sync."""
    from accelerate.utils import gather_object

    with torch.no_grad():
        checksum = float(sum(p.double().sum() for p in accelerator.unwrap_model(controlnet).parameters()))
    return gather_object([{"rank": accelerator.process_index, "rows": sorted(seen_rows), "checksum": checksum}])

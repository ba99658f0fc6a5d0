"""The training loop, readable top to bottom.

    train():  set_up (accelerate, the locked base, the ControlNet, data, optimiser, resume)
              -> run_steps: for each batch, micro_step (encode, loss in train/step.py, backward,
                 the optimiser step at the end of an accumulation) -> after_step (EMA, log,
                 checkpoint, validate)
              -> finish (final validation on exactly the exported weights, export)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

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
from train.data import (ManifestDataset, RankSampler, SkippedRows, TooManyUnreadableRows, cap_caption,
                        caption_char_limit, collate, drop_unreadable, load_rows)
from train.export import export
from train.latents import latents_from_sample
from train.models import load_base, make_controlnet
from train.reward import make_reward

log = logging.getLogger("train")

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteLossError(RuntimeError):
    """Too many optimiser steps in a row had a non-finite loss."""


@dataclasses.dataclass
class Run:
    """One training run's state: built by ``set_up``, advanced by ``micro_step``/``after_step``."""

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
    from accelerate.utils import set_seed

    accelerator = make_accelerator(config)
    problem = sharding.launch_problem(accelerator, sharding.requested_mode())
    if problem:
        raise SetupError(problem)
    if accelerator.device.type == "cpu":
        # Denormal floats take a slow path on CPUs (a bf16 validation here ran 45x slower); GPUs flush them.
        torch.set_flush_denormal(True)
    seed = config.seed if config.seed is not None else 0
    set_seed(seed)
    # accelerate resolved the precision: the flag, else `accelerate config` / launch / environment
    device, weight_dtype = accelerator.device, weight_dtype_of(accelerator.mixed_precision)
    log.info("mixed precision: %s (locked base in %s, ControlNet in float32)", accelerator.mixed_precision,
             weight_dtype)

    base = load_base(config.pretrained_model_name_or_path, config.resolution)
    check_family_flags(config, base)
    guidance = config.guidance_scale if config.guidance_scale is not None else DEFAULT_GUIDANCE
    base.options = FamilyOptions(config.condition, config.union, config.max_sequence_length, guidance)
    base.place(device, weight_dtype)
    with accelerator.local_main_process_first():  # one process per machine builds the row cache
        train_rows, held_out = load_rows(config.manifest, config.condition, holdout_count(config),
                                         config.data_cache_dir, config.keep_duplicates)
    controlnet = make_controlnet(base, 3 * len(config.condition), config.controlnet_model_name_or_path,
                                 config.controlnet_num_layers, config.controlnet_num_single_layers)
    if config.fp8_base:  # only now: the ControlNet has copied the base's full-precision weights
        from train.float8_base import store_base_in_float8

        log.info("fp8 base: %s", store_base_in_float8(base, weight_dtype).line())
    if config.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
    ema = make_ema(accelerator, controlnet) if config.use_ema else None

    # rows that do not decode: skipped and counted (held-out ones now, training ones as examples meet them)
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
    run = Run(config, accelerator, base, controlnet, optimizer, lr_scheduler, ema, dataset, sampler, loader, cache,
              held_out, scorer, seed, weight_dtype, steps_per_epoch, max_steps, math.ceil(max_steps / steps_per_epoch),
              skipped, reward=make_reward(config, base, device, weight_dtype, accelerator.num_processes))
    if config.resume_from_checkpoint:
        resume(run)
    return run


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

    ema = EMAModel(controlnet.parameters())
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

    optimizer = make_optimizer(config, controlnet.parameters())
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
        loss = controlnet_loss(run.base, run.controlnet, latents, hidden, added, condition, generator)
        if run.reward is not None:  # ControlNet++'s reward on a one-step prediction (train/reward.py)
            loss = run.reward.added_to(loss, run.base, run.controlnet, latents, hidden, added, condition, generator)
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


def controlnet_loss(base: BaseModels, controlnet: torch.nn.Module, latents: torch.Tensor, hidden: torch.Tensor,
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
        latents = base.vae.encode(pixels).latent_dist.sample(generator=generator)
        latents = latents_from_sample(base.vae.config, latents).to(run.weight_dtype)
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
        run.ema.step(run.controlnet.parameters())
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
        run_validation(config, run.base, accelerator.unwrap_model(run.controlnet), run.ema, run.held_out,
                       f"{run.global_step:06d}", run.seed, run.weight_dtype, accelerator.trackers, run.global_step,
                       run.scorer)
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
            run.ema.copy_to(final.parameters())
        if config.validation_enabled:  # exactly the weights about to ship
            run_validation(config, run.base, final, None, run.held_out, "final", run.seed, run.weight_dtype,
                           scorer=run.scorer)
        card = {
            "base_model": config.pretrained_model_name_or_path, "manifest": config.manifest,
            "controlnet_class": type(final).__name__, "pipeline_class": run.base.family.card_pipeline_class(run.base),
            **run.base.family.card_extra(run.base),
            "manifest_fingerprint": manifest_fingerprint(summary), "conditions": list(config.condition),
            "provenance": summary.get("annotators", []), "figures": figures,
            "args": {**config.to_dict(), "num_train_epochs": figures["epochs"]},
        }
        example = example_row(run)
        # cut as training cuts it: a caption that is really a log file must not land whole in README.md
        card["example_prompt"] = cap_caption(example["caption"], run.dataset.max_caption_chars) if example else ""
        result["exported"] = export(final, config.output_dir, card, example_condition(run, example))
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


def weight_dtype_of(mixed_precision: str) -> torch.dtype:
    """The locked base's dtype for accelerate's resolved ``mixed_precision``."""
    if mixed_precision not in WEIGHT_DTYPES:
        raise ValueError(f"mixed precision {mixed_precision!r} is not supported; use no, fp16 or bf16")
    return WEIGHT_DTYPES[mixed_precision]


def holdout_count(config: TrainConfig) -> int:
    """Rows to hold out for validation: none when they would never be used."""
    if not config.validation_enabled or config.validation_image:
        return 0
    return config.num_validation_rows


@dataclasses.dataclass(frozen=True)
class ValidationView:
    """One condition a validation scores: the only one of a single-condition run; one slot (SDXL control
    type, Flux mode) of a union run, sampled alone; or one of the maps stacked as channels, whose samples
    (made once, from the whole stack) it scores against its own 3 channels."""

    condition: str
    mode: int | None = None
    """The union slot/mode the pipeline is given alone; None: the pipeline is given the whole input."""
    slot: int | None = None
    """Where its 3 channels sit in the stacked condition tensor (union and stacked runs); None: a single
    condition, all the input."""

    @property
    def suffix(self) -> str:
        """Grid file name suffix: a union run writes one grid per condition, a stacked run one for all."""
        return "" if self.mode is None else f"-{self.condition}"

    def key(self, metric: str) -> str:
        """A metric's name in metrics.jsonl and trackers: runs of several conditions name the condition
        (``canny/edge_f1``)."""
        return metric if self.slot is None else f"{self.condition}/{metric}"


def validation_views(config: TrainConfig) -> list[ValidationView]:
    """What each validation scores: every condition of a union run in turn (slot/mode = its position in
    --condition, as the model card maps them), every condition of a stacked run (its channels' position),
    else the run's one condition."""
    if config.union:
        return [ValidationView(name, i, i) for i, name in enumerate(config.condition)]
    if len(config.condition) > 1:
        return [ValidationView(name, None, i) for i, name in enumerate(config.condition)]
    return [ValidationView(config.condition[0])]


def validation_groups(config: TrainConfig) -> list[list[ValidationView]]:
    """Views that share one set of samples: a stacked run samples once, from the whole stack, for all its
    conditions; each union condition is sampled alone; a single condition is its own group."""
    views = validation_views(config)
    return [views] if not config.union and len(views) > 1 else [[view] for view in views]


def view_inputs(inputs: list, view: ValidationView, given_images: bool) -> list:
    """The inputs with only ``view``'s condition: its 3 channels of each stacked tensor (a --validation_image
    given to a union run is one 3-channel map, taken as each condition's map in turn)."""
    if view.slot is None or (given_images and view.mode is not None):
        return inputs
    channels = slice(3 * view.slot, 3 * view.slot + 3)
    return [(cond[:, channels], prompt) for cond, prompt in inputs]


def sampled_inputs(inputs: list, view: ValidationView, given_images: bool) -> list:
    """What the pipeline is given for ``view``'s group: a union slot's own channels, else the whole input."""
    return inputs if view.mode is None else view_inputs(inputs, view, given_images)


def validation_model(trained: torch.nn.Module, ema, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of the ControlNet to sample with: the EMA weights when there are any, in the base's dtype.

    A copy, not the trained module: accelerate's autocast wrapper on the trained module returns fp32
    residuals, which would promote a half-precision UNet's activations (and crash its group norms).
    Only for small ControlNets (SD 1.x/2.x); the others sample in place (``samples_in_place``).
    """
    clone = type(trained).from_config(trained.config)
    clone.load_state_dict(trained.state_dict())
    if ema is not None:
        ema.copy_to(clone.parameters())
    return clone.to(trained.device, dtype).eval()


Sampler = Callable[[list, int, int, "int | None"], list]
"""(inputs, samples per input, seed, union mode) -> PIL images per input."""


def make_sampler(base, controlnet: torch.nn.Module, ema, weight_dtype: torch.dtype) -> Sampler:
    """How this validation samples: with the trained module itself (EMA swapped in and back) when the family
    says so, else with one copy in the base's dtype, made once for all conditions."""
    from train import validation

    if base.family.samples_in_place:
        return lambda inputs, per_input, seed, mode: validation.generate_in_place(
            base, controlnet, ema, inputs, per_input, seed, mode=mode)
    model = validation_model(controlnet, ema, weight_dtype)
    return lambda inputs, per_input, seed, mode: validation.generate(base, model, inputs, per_input, seed, mode=mode)


class ValidationScorer:
    """Controllability of validation samples (train/metrics.py): each sample re-annotated with the
    condition's own annotator and compared with its condition; logged per validation (and per condition
    of a union or stacked run) so the ControlNet's "sudden convergence" shows as a curve (TensorBoard and
    validation/metrics.jsonl). A condition without a metric, or whose annotator cannot load here, is
    recorded as unscored with the reason (logged once); its grid is still made."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.annotators: dict[str, Any] = {}
        self.unscored: dict[str, str] = {}
        """condition -> why its samples are not scored."""

    def __call__(self, inputs: list, samples: list, label: str, global_step: int | None, trackers=(),
                 stored_maps: list | None = None, view: ValidationView | None = None) -> dict | None:
        """Score ``samples`` of ``view``'s condition; against ``stored_maps`` (each held-out row's map at its
        own resolution) when given, else against the condition tensors the model was given."""
        from train import metrics

        view = view or validation_views(self.config)[0]
        record: dict[str, Any] = {"step": global_step if global_step is not None else label,
                                  "condition": view.condition}
        reason = self.unscored_reason(view.condition)
        if reason is not None:
            self._write({**record, "unscored": reason})
            return None
        images, maps, captions = paired(inputs, samples, stored_maps)
        scores = metrics.metrics_for(view.condition, images, maps, captions, task=self.config.validation_task,
                                     annotator=self.annotators.get(view.condition))
        named = {view.key(k): v for k, v in scores.items()}
        self._write({**record, **named})
        for tracker in trackers:
            tracker.log({f"validation/{k}": v for k, v in named.items()}, step=global_step)
        log.info("validation %s: %s", label, ", ".join(f"{k} {v:.3f}" for k, v in named.items()))
        return named

    def unscored_reason(self, condition: str) -> str | None:
        """Why ``condition``'s samples cannot be scored here (None: they can); loads its annotator once."""
        from train import metrics

        if condition in self.unscored or condition in self.annotators:
            return self.unscored.get(condition)
        reason = None
        if not metrics.metric_names(condition, self.config.validation_task):
            reason = f"no controllability metric for the {condition} annotator (train/metrics.py)"
        elif condition in metrics.CONDITION_METRICS:  # task metrics alone read no annotator
            try:
                self.annotators[condition] = metrics.load_annotator(condition, self._params(condition))
            except Exception as exc:  # e.g. no weights here: samples are still made, just not scored
                reason = f"cannot load the {condition} annotator ({exc})"
        else:
            self.annotators[condition] = None
        if reason is not None:
            log.warning("validation metrics off for %s: %s", condition, reason)
            self.unscored[condition] = reason
        return reason

    def _write(self, record: dict) -> None:
        path = Path(self.config.output_dir) / "validation" / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _params(self, condition: str) -> dict:
        """The annotator's parameters recorded in the manifest, so samples are annotated as the data was."""
        import manifests

        for entry in manifests.read_manifest_json(self.config.manifest).get("annotators", []):
            if entry.get("name") == condition:
                params = dict(entry.get("params", {}))
                params.pop("require_detection", None)  # a sample without a person scores zero, not a skip
                return params
        return {}


def paired(inputs: list, samples: list, stored_maps: list | None) -> tuple[list, list, list]:
    """(generated image, its condition map, its prompt) as three lists, one entry per sample."""
    import numpy as np

    from train import metrics

    images, maps, captions = [], [], []
    for i, ((cond, prompt), generated) in enumerate(zip(inputs, samples)):
        as_map = (cond[0, :3].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        if stored_maps is not None:
            as_map = metrics.centre_square(stored_maps[i])
        # one-channel maps (edges, depth, masks) reach the ControlNet as three equal channels
        grey = bool((as_map == as_map[:, :, :1]).all())
        for image in generated:
            images.append(image)
            maps.append(as_map[:, :, 0] if grey else as_map)
            captions.append(prompt)
    return images, maps, captions


def run_validation(config, base, controlnet, ema, held_out, label: str, seed: int, weight_dtype: torch.dtype,
                   trackers=(), global_step: int | None = None, scorer: ValidationScorer | None = None) -> list[Path]:
    """Generate from held-out conditions (or the given images): once from the whole input (a single
    condition, or every map of a stacked run), or for each condition of a union run given alone; write a
    PNG grid per sampling, send it to TensorBoard, and score the samples' controllability per condition."""
    from train.validation import validation_inputs

    inputs = validation_inputs(held_out, config.condition, config.validation_image, config.validation_prompt,
                               config.resolution, stacked=len(config.condition) > 1 and not config.union)
    if not inputs:
        return []
    sample = make_sampler(base, controlnet, ema, weight_dtype)
    return [validate_views(config, views, sample, inputs, held_out, label, seed, trackers, global_step, scorer)
            for views in validation_groups(config)]


def validate_views(config, views: list[ValidationView], sample: Sampler, inputs: list, held_out: list, label: str,
                   seed: int, trackers, global_step: int | None, scorer: ValidationScorer | None) -> Path:
    """One sampling's samples (made once), grid and TensorBoard image; each of ``views`` scores them
    against its own condition."""
    from train.validation import grid

    given_images, first = bool(config.validation_image), views[0]
    given = sampled_inputs(inputs, first, given_images)
    samples = sample(given, config.num_validation_images, seed, first.mode)
    path = grid(given, samples, Path(config.output_dir) / "validation" / f"step-{label}{first.suffix}.png")
    if scorer is not None:
        for view in views:
            scorer(view_inputs(inputs, view, given_images), samples, label, global_step, trackers,
                   stored_maps(config, held_out, view.condition), view)
    for tracker in trackers:
        if tracker.name == "tensorboard":
            import numpy as np
            from PIL import Image

            tag = "validation" if first.mode is None else f"validation/{first.condition}"
            tracker.writer.add_image(tag, np.asarray(Image.open(path)), global_step, dataformats="HWC")
    return path


def stored_maps(config, held_out: list, condition: str) -> list | None:
    """Each held-out row's ``condition`` map at its stored resolution (None with --validation_image)."""
    if config.validation_image:
        return None
    import numpy as np

    from manifests.schema import cond_column
    from train.data import decode_rgb

    return [np.asarray(decode_rgb(row[cond_column(condition)])) for row in held_out]

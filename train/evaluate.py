#!/usr/bin/env python
"""Measure how well a ControlNet obeys its condition, against the base model alone.

    python train/evaluate.py --controlnet runs/canny          # everything else: what the run trained with

Base, manifest, condition, resolution, duplicates policy, validation task and the held-out rows default to
what train.py recorded in the run's ``train_summary.json``; a flag given overrides its default, with a
warning when it differs from the run's (and when rows the run trained on are scored). An existing
evaluation in ``--output_dir`` is never replaced without ``--overwrite``.

Takes the run's held-out rows (else the first N ok rows of the manifest by id), generates each
caption twice with the same seed (with the ControlNet on the row's condition, and with the base
alone), re-annotates both with the condition's annotator (its parameters as the manifest recorded
them) and compares with the condition (train/metrics.py). Writes ``metrics.json`` and ``grid.png``
(condition | with ControlNet | base alone, one row per sample) to ``--output_dir``. Generation runs
in fp32, on the CPU by default, and is deterministic for a seed. Bad flags or missing folders fail
here with exit code 2, before any model loads.

A ControlNet trained on conditions stacked as channels (``train.py --condition canny,depth``) is
evaluated with the same ``--condition canny,depth`` (training order): each sample is generated once
from the row's maps stacked, then scored against each condition with that condition's metrics, named
``canny/edge_f1``, ``depth/depth_rmse`` as the trainer's validations name them; a condition without a
metric is listed under ``unscored``; the grid shows every map, then the two samples.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run by path (python train/evaluate.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import dataclasses
import io
import inspect
import json
import os
import re
import time
from typing import Any, Sequence

import numpy as np
from PIL import Image

from manifests.flags import finite_float
from train import metrics
from train.grids import contact_sheet

# Colour-coded maps (a colour is a class or a keypoint): resized with nearest neighbour, so the
# ControlNet and the metric see the same exact colours. Other maps resize bicubic, as in training.
LABEL_MAPS = frozenset({"segmentation", "openpose", "mediapipe_pose"})
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class UsageError(Exception):
    """A flag or input the user must fix; main prints it and exits with code 2."""


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    controlnet: str
    pretrained_model_name_or_path: str | None
    manifest: str | None
    condition: str | None
    num_samples: int | None
    """Rows to evaluate, the first N ok rows by id; None: the run's held-out rows (else 8)."""
    output_dir: str
    task: str | None = None
    seed: int = 0
    num_inference_steps: int = 20
    resolution: int | None = None
    guidance_scale: float = 7.5
    weights_dir: str | None = None
    device: str = "cpu"
    keep_duplicates: bool | None = None
    """Evaluate on rows the manifest lists as duplicates too; None: as the run was trained (False without a
    record), so the rows evaluated are the ones it held out."""
    overwrite: bool = False
    """Replace an evaluation already in ``output_dir`` (refused otherwise)."""
    held_out_ids: tuple[str, ...] | None = None
    """The run's held-out rows (train_summary.json); None: no record."""
    run_manifest: str | None = None
    """The manifest the run trained on (train_summary.json), to tell which rows of another manifest it saw."""

    @property
    def conditions(self) -> tuple[str, ...]:
        """``condition`` split at commas: several for a ControlNet trained on stacked conditions."""
        return tuple(c.strip() for c in self.condition.split(",") if c.strip())

    @property
    def stacked(self) -> bool:
        return len(self.conditions) > 1


def parse_args(argv: Sequence[str] | None = None) -> EvalConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--controlnet", required=True, help="ControlNet folder (train.py's --output_dir, or its controlnet/)")
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="the base it was trained on (diffusers folder); default: the run's (train_summary.json)")
    p.add_argument("--manifest", default=None,
                   help="manifest folder with the condition column; default: the run's (train_summary.json)")
    p.add_argument("--condition", default=None,
                   help="annotator name, e.g. canny, depth, mediapipe_pose; for a ControlNet trained on stacked "
                        "conditions, all of them comma-separated in training order (canny,depth); default: the run's")
    p.add_argument("--num_samples", type=int, default=None,
                   help="rows to evaluate: the first N ok rows by id; default: the run's held-out rows (else 8)")
    p.add_argument("--output_dir", default=None, help="where metrics.json and grid.png go (default: <controlnet>/eval)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an evaluation already in --output_dir (without it, an existing one is kept and "
                        "the run stops)")
    p.add_argument("--task", default=None, choices=sorted(metrics.TASK_METRICS),
                   help="add a task's metrics; default: the run's --validation_task")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i, for both pipelines")
    p.add_argument("--num_inference_steps", type=int, default=20,
                   help="denoising steps per sample, for both pipelines (default: 20; more: slower, finer)")
    p.add_argument("--resolution", type=int, default=None,
                   help="square side to generate at (short side scaled, centre crop); default: the run's "
                        "--resolution, else each map's own size")
    p.add_argument("--guidance_scale", type=finite_float, default=7.5,
                   help="classifier-free guidance scale, for both pipelines (default: 7.5; 1 turns it off)")
    p.add_argument("--weights_dir", default=None, help="annotator weights (default: CONTROLFORGE_WEIGHTS)")
    p.add_argument("--device", default="cpu", help="torch device for generation (cpu keeps results reproducible)")
    p.add_argument("--keep_duplicates", action=argparse.BooleanOptionalAction, default=None,
                   help="include rows listed as duplicates (as the trainer's --keep_duplicates does); default: "
                        "as the run was trained")
    a = p.parse_args(argv)
    if a.num_samples is not None and a.num_samples < 1:
        p.error("--num_samples must be at least 1")
    if a.num_inference_steps < 1:
        p.error("--num_inference_steps must be at least 1")
    if a.resolution is not None and (a.resolution < 8 or a.resolution % 8):
        p.error("--resolution must be a positive multiple of 8 (the VAE works on multiples of 8)")
    names = [c.strip() for c in (a.condition or "given").split(",")]
    if not all(names) or len(set(names)) != len(names):
        p.error(f"--condition {a.condition}: name each condition once, comma-separated (e.g. canny,depth)")
    return EvalConfig(
        controlnet=a.controlnet, pretrained_model_name_or_path=a.pretrained_model_name_or_path,
        manifest=a.manifest, condition=a.condition, num_samples=a.num_samples,
        output_dir=a.output_dir or str(Path(a.controlnet) / "eval"), task=a.task, seed=a.seed,
        num_inference_steps=a.num_inference_steps, resolution=a.resolution, guidance_scale=a.guidance_scale,
        weights_dir=a.weights_dir, device=a.device, keep_duplicates=a.keep_duplicates, overwrite=a.overwrite,
    )


# ------------------------------------------------------------------------ checks, before loading

def controlnet_folder(path: str) -> str:
    """The folder holding the ControlNet's config.json: ``path`` itself or ``path/controlnet``."""
    for folder in (Path(path), Path(path) / "controlnet"):
        if (folder / "config.json").is_file():
            return str(folder)
    raise UsageError(f"--controlnet {path}: no ControlNet there (expected config.json in it or in "
                     f"{Path(path) / 'controlnet'}); pass train.py's --output_dir or its controlnet/ folder")


def check_base(path: str) -> None:
    """A local base folder must be a diffusers pipeline; a hub id is left to diffusers."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise UsageError(f"--pretrained_model_name_or_path {path}: not a diffusers pipeline folder "
                             "(no model_index.json); pass the base model the ControlNet was trained on")
    elif not HUB_ID.match(path) or os.path.isdir(path.split("/")[0]):
        raise UsageError(f"--pretrained_model_name_or_path {path}: no such folder")


def annotator_params(summary: dict[str, Any], condition: str) -> dict[str, Any]:
    """The condition's annotator parameters as the manifest recorded them (re-annotate alike)."""
    for entry in summary.get("annotators", []):
        if entry.get("name") == condition:
            params = dict(entry.get("params") or {})
            params.pop("require_detection", None)  # a generated image without a person scores, not skips
            return params
    return {}


def train_summary(folder: str) -> dict[str, Any]:
    """``train_summary.json`` of the run whose ControlNet is in ``folder`` (its own folder or the one above);
    {} when there is none or it does not read (a ControlNet from elsewhere)."""
    for candidate in (Path(folder) / "train_summary.json", Path(folder).parent / "train_summary.json"):
        if candidate.is_file():
            try:
                summary = json.loads(candidate.read_text())
            except (OSError, ValueError):
                return {}
            return summary if isinstance(summary, dict) else {}
    return {}


def trained_conditions(folder: str) -> list[str] | None:
    """The conditions, in channel order, that train.py recorded in ``train_summary.json`` next to the
    ControlNet folder (None: no record, e.g. a ControlNet from elsewhere or an older run)."""
    conditions = train_summary(folder).get("conditions")
    return list(conditions) if isinstance(conditions, list) else None


RUN_DEFAULTS = ("pretrained_model_name_or_path", "manifest", "condition", "resolution", "keep_duplicates", "task")
"""EvalConfig fields that default to the run's (train_summary.json's ``run`` record)."""
NEEDED = ("pretrained_model_name_or_path", "manifest", "condition")
RECORDED_TYPES = {"pretrained_model_name_or_path": str, "manifest": str, "resolution": int, "keep_duplicates": bool,
                  "task": str}
"""The type each recorded setting must have to be used (a hand-edited or damaged record's other values are
treated as not recorded)."""


def _strings(value: Any) -> list[str] | None:
    return list(value) if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def run_settings(summary: dict[str, Any]) -> dict[str, Any]:
    """The run's value of each of ``RUN_DEFAULTS`` (absent ones, and ones of the wrong type, left out; older
    runs recorded only the conditions), and its held-out ids under ``held_out_ids``."""
    run = summary.get("run") if isinstance(summary.get("run"), dict) else {}
    conditions = _strings(run.get("conditions")) or _strings(summary.get("conditions"))
    found = {}
    for key, kind in RECORDED_TYPES.items():
        value = run.get(key)
        if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):  # True is an int too
            found[key] = value
    if conditions:
        found["condition"] = ",".join(conditions)
    if _strings(run.get("held_out_ids")) is not None:
        found["held_out_ids"] = tuple(run["held_out_ids"])
    return found


def moved_paths(recorded: dict[str, Any], defaulted: Sequence[str]) -> list[str]:
    """The run's local paths (base, manifest) taken as defaults that are no longer there."""
    return [name for name in ("pretrained_model_name_or_path", "manifest") if name in defaulted
            and isinstance(recorded.get(name), str) and os.path.isabs(recorded[name])
            and not os.path.exists(recorded[name])]


def same_setting(name: str, given: Any, recorded: Any) -> bool:
    """Whether a flag's value is the run's (paths compared as the folders they name)."""
    if name in ("pretrained_model_name_or_path", "manifest") and os.path.exists(given) and os.path.exists(recorded):
        return os.path.samefile(given, recorded)
    return given == recorded


def with_run_defaults(config: EvalConfig) -> tuple[EvalConfig, list[str]]:
    """``config`` with every setting not given taken from the run's train_summary.json, and a warning for
    each given one that differs from the run's; UsageError when base, manifest or condition is neither given
    nor recorded."""
    folder = controlnet_folder(config.controlnet)
    recorded = run_settings(train_summary(folder))
    changes: dict[str, Any] = {"held_out_ids": recorded.get("held_out_ids"), "run_manifest": recorded.get("manifest")}
    warnings = []
    for name in RUN_DEFAULTS:
        given = getattr(config, name)
        if given is None:
            changes[name] = recorded.get(name)
        elif name in recorded and recorded[name] is not None and not same_setting(name, given, recorded[name]):
            warnings.append(f"--{name} {given} differs from the run's {recorded[name]} (train_summary.json): the "
                            "figures will not compare with the run's validation")
    moved = moved_paths(recorded, [name for name in RUN_DEFAULTS if getattr(config, name) is None])
    if moved:
        gone = "; ".join(f"the run's --{name} {recorded[name]} (train_summary.json) is not there any more"
                         for name in moved)
        raise UsageError(f"{gone}: pass {' '.join('--' + m for m in moved)} with where it is now")
    missing = [name for name in NEEDED if changes.get(name, getattr(config, name)) is None]
    if missing:
        raise UsageError(f"{folder} has no train_summary.json recording {', '.join(missing)} (a ControlNet from "
                         f"elsewhere, or an older run): pass {' '.join('--' + m for m in missing)}")
    if changes.get("keep_duplicates", config.keep_duplicates) is None:
        changes["keep_duplicates"] = False
    return dataclasses.replace(config, **changes), warnings


def trained_rows(config: EvalConfig, ids: Sequence[str]) -> list[str]:
    """The ``ids`` evaluated that the run trained on: rows of its manifest it did not hold out ([] without a
    record). On another manifest those are only the ids the run's manifest has too (the same files re-annotated);
    fresh rows are held out whatever their ids, and a run's manifest that cannot be read claims none."""
    if config.held_out_ids is None:
        return []
    held_out = set(config.held_out_ids)
    candidates = [i for i in ids if i not in held_out]
    run_manifest = config.run_manifest
    if not candidates or run_manifest is None or same_setting("manifest", config.manifest, run_manifest):
        return candidates
    seen = manifest_ids(run_manifest)
    return [i for i in candidates if i in seen]


def manifest_ids(manifest: str) -> set[str]:
    """The ids of ``manifest``'s ok rows; none when it cannot be read (moved or deleted since the run)."""
    import manifests

    try:
        return set(manifests.read(manifest, columns=["id"], status="ok", duplicates="keep")["id"])
    except (OSError, ValueError):
        return set()


def check(config: EvalConfig) -> dict[str, Any]:
    """Every check that needs no model; returns the manifest's summary."""
    import manifests
    from annotators import registry
    from manifests.schema import cond_column

    folder = controlnet_folder(config.controlnet)
    existing = [name for name in ("metrics.json", "grid.png") if (Path(config.output_dir) / name).exists()]
    if existing and not config.overwrite:
        raise UsageError(f"{config.output_dir} already holds an evaluation ({', '.join(existing)}); it is kept: "
                         "pass --overwrite to replace it, or --output_dir for another folder")
    check_base(config.pretrained_model_name_or_path)
    try:
        summary = manifests.read_manifest_json(config.manifest)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--manifest: {exc}") from exc
    columns = summary.get("columns", [])
    for condition in config.conditions:
        if cond_column(condition) not in columns:
            have = ", ".join(c.removeprefix("cond_") for c in columns if c.startswith("cond_")) or "none"
            raise UsageError(f"--condition {condition}: the manifest has no column "
                             f"{cond_column(condition)}; its conditions: {have}")
        if config.stacked and condition not in metrics.CONDITION_METRICS:
            continue  # a stacked map nothing re-annotates (e.g. a plugin's) needs only its column
        try:
            registry.get(condition)
        except (registry.UnknownAnnotatorError, TypeError) as exc:
            raise UsageError(f"--condition {condition}: {exc}") from exc
    if not any(metrics.metric_names(c, config.task) for c in config.conditions):
        which = f"the condition {config.condition!r}" if not config.stacked else f"any of {config.condition!r}"
        raise UsageError(f"no controllability metric knows {which}; metrics exist "
                         f"for {', '.join(metrics.CONDITION_METRICS)} and --task {', '.join(metrics.TASK_METRICS)}")
    controlnet_config = json.loads((Path(folder) / "config.json").read_text())
    kind = controlnet_config.get("_class_name", "ControlNetModel")
    if kind not in PIPELINE_LOADERS:
        raise UsageError(f"{folder} holds a {kind}; evaluate takes SD 1.x/2.x and SDXL ControlNets: "
                         f"{' or '.join(PIPELINE_LOADERS)} (one condition or conditions stacked as channels), not "
                         "union or SD3/Flux ones")
    recorded = trained_conditions(folder)
    if recorded is not None and (config.stacked or len(recorded) > 1) and recorded != list(config.conditions):
        raise UsageError(f"{folder} was trained on --condition {','.join(recorded)} (train_summary.json); "
                         f"--condition {config.condition} would give it its maps in other channels: name the "
                         "same conditions in the same order")
    channels = controlnet_config.get("conditioning_channels", 3)
    if channels != 3 * len(config.conditions):
        trained = f" ({channels // 3} conditions stacked as channels)" if channels % 3 == 0 and channels > 3 else ""
        raise UsageError(f"{folder} takes {channels} condition channels{trained}; --condition {config.condition} "
                         f"gives {3 * len(config.conditions)}: name every condition it was trained on, "
                         "comma-separated in training order (e.g. --condition canny,depth)")
    if summary.get("counts", {}).get("ok", 0) < 1:
        raise UsageError(f"--manifest {config.manifest} has no ok rows")
    return summary


# ---------------------------------------------------------------------------------- the work

def load_rows(manifest: str, condition: str | Sequence[str], count: int | None,
              keep_duplicates: bool = False, ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The rows ``ids`` names (the run's held-out rows) when ``count`` is None, else the first ``count`` ok rows
    by id (the trainer's held-out rows when the run held that many out), with id, caption, image and the
    condition column(s); duplicates left out unless ``keep_duplicates``, as the trainer does."""
    import manifests
    from manifests.schema import cond_column

    names = [condition] if isinstance(condition, str) else list(condition)
    by_id = count is None and ids is not None
    frame = manifests.read(manifest, columns=["id", "caption", "image", *map(cond_column, names)], status="ok",
                           duplicates="keep" if keep_duplicates or by_id else "skip")
    frame = frame.sort_values("id", kind="stable")
    if by_id:
        return frame[frame["id"].isin(set(ids))].to_dict("records")
    return frame.head(count if count is not None else DEFAULT_SAMPLES).to_dict("records")


DEFAULT_SAMPLES = 8
"""Rows evaluated when neither --num_samples nor the run's held-out rows say how many."""


def prepare_condition(cell: dict[str, Any], resolution: int | None, nearest: bool) -> np.ndarray:
    """A condition map cell as uint8 HxWx3: as stored, or short side scaled to ``resolution`` and
    centre-cropped to a square (the trainer's validation crop)."""
    im = Image.open(io.BytesIO(cell["bytes"])).convert("RGB")
    if resolution is not None:
        scale = resolution / min(im.size)
        w, h = round(im.width * scale), round(im.height * scale)
        resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BICUBIC
        im = im.resize((w, h), resample) if (w, h) != im.size else im
        left, top = (w - resolution) // 2, (h - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
    return np.asarray(im)


def load_pipelines(config: EvalConfig) -> tuple[Any, Any]:
    """(pipeline with the ControlNet, the same base without it), fp32, quiet; which pipeline depends on what the
    folder holds (``PIPELINE_LOADERS``)."""
    import torch
    from diffusers import UniPCMultistepScheduler

    base = config.pretrained_model_name_or_path
    extra: dict[str, Any] = {}
    index = Path(base) / "model_index.json"
    if index.is_file() and "safety_checker" in json.loads(index.read_text()):
        # A safety checker blanks images it flags; measured obedience must not depend on it.
        extra = {"safety_checker": None, "requires_safety_checker": False}
    folder = controlnet_folder(config.controlnet)
    kind = json.loads((Path(folder) / "config.json").read_text()).get("_class_name", "ControlNetModel")
    try:
        pipe, alone = PIPELINE_LOADERS[kind](base, folder, extra)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load the models: {exc}") from exc
    for p in (pipe, alone):
        # UniPC, as the trainer's validation samples use: good images in ~20 steps.
        p.scheduler = UniPCMultistepScheduler.from_config(p.scheduler.config)
        p.to(config.device, torch.float32)  # fp32 whatever was saved (``dtype`` kwargs differ by version)
        p.set_progress_bar_config(disable=True)
    return pipe, alone


def controlnet_pipelines(base: str, folder: str, extra: dict[str, Any]) -> tuple[Any, Any]:
    """A ControlNetModel in the base's ControlNet pipeline, and the base alone sharing every module."""
    from diffusers import AutoPipelineForText2Image, ControlNetModel

    pipe = AutoPipelineForText2Image.from_pretrained(base, controlnet=ControlNetModel.from_pretrained(folder), **extra)
    return pipe, AutoPipelineForText2Image.from_pipe(pipe, controlnet=None)


def xs_pipelines(base: str, folder: str, extra: dict[str, Any]) -> tuple[Any, Any]:
    """A ControlNet-XS adapter in ``StableDiffusion(XL)ControlNetXSPipeline`` (which fuses the base's UNet with
    it, as a user's pipeline does), and the base alone sharing the VAE and text encoders."""
    import diffusers

    alone = diffusers.AutoPipelineForText2Image.from_pretrained(base, **extra)
    xl = "text_encoder_2" in alone.components
    cls = diffusers.StableDiffusionXLControlNetXSPipeline if xl else diffusers.StableDiffusionControlNetXSPipeline
    takes = inspect.signature(cls.__init__).parameters
    modules = {name: module for name, module in alone.components.items() if name in takes}
    settings = {"add_watermarker": False} if xl else {"safety_checker": None, "feature_extractor": None,
                                                      "requires_safety_checker": False}
    pipe = cls(**{**settings, **modules}, controlnet=diffusers.ControlNetXSAdapter.from_pretrained(folder))
    return pipe, alone


PIPELINE_LOADERS = {"ControlNetModel": controlnet_pipelines, "ControlNetXSAdapter": xs_pipelines}
"""The class in a ControlNet folder's config.json -> the loader of (its pipeline, the base alone)."""


def generate(pipe: Any, prompt: str, seed: int, size: tuple[int, int], config: EvalConfig,
             condition: np.ndarray | None = None) -> np.ndarray:
    """One image as uint8 HxWx3; the same seed gives the same starting noise in both pipelines."""
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)  # CPU noise: identical on any device
    extra = {} if condition is None else {"image": control_image(condition)}
    out = pipe(prompt=prompt, height=size[0], width=size[1], num_inference_steps=config.num_inference_steps,
               guidance_scale=config.guidance_scale, generator=generator, output_type="np", **extra)
    return (np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8)


def control_image(condition: np.ndarray) -> Any:
    """The pipeline's ``image``: a PIL image for one 3-channel map; stacked maps (3k channels, never the
    VAE's 4 latent channels) as a 1x3kxHxW tensor in [0, 1], which the pipeline's control image processor
    passes on unchanged (it does not normalise control images)."""
    import torch

    if condition.shape[2] == 3:
        return Image.fromarray(condition)
    return torch.from_numpy(np.ascontiguousarray(condition)).permute(2, 0, 1)[None].float() / 255


def stack_maps(maps: Sequence[np.ndarray], nearest: Sequence[bool]) -> np.ndarray:
    """One row's maps stacked as channels, in order, each at the first map's size (they normally share it)."""
    height, width = maps[0].shape[:2]
    same = [m if m.shape[:2] == (height, width) else np.asarray(Image.fromarray(m).resize(
        (width, height), Image.Resampling.NEAREST if n else Image.Resampling.BICUBIC)) for m, n in zip(maps, nearest)]
    return np.concatenate(same, axis=2)


def evaluate(config: EvalConfig, summary: dict[str, Any]) -> dict[str, Any]:
    """Generate, re-annotate, score; write metrics.json and grid.png; return what metrics.json holds."""
    started = time.perf_counter()
    conditions = config.conditions
    overrides = {c: annotator_params(summary, c) for c in conditions}
    annotators = load_annotators(config, overrides)
    rows, trained = rows_to_evaluate(config)
    maps, score_maps = condition_maps(config, rows, list(annotators))
    given = stacked_inputs(config, maps, len(rows))
    captions, ids = [r["caption"] or "" for r in rows], [r["id"] for r in rows]
    pipe, alone = load_pipelines(config)
    controlled, base = generate_pairs(config, pipe, alone, given, captions)
    scoring = Scoring(config, annotators, score_maps, captions, ids)
    score = {name: scoring.score(images) for name, images in (("controlnet", controlled), ("base", base))}
    grid_path = write_grid(config, maps, controlled, base, captions)
    result = {
        "condition": config.condition,
        "task": config.task,
        "num_samples": len(rows),
        "controlnet": metrics.summarise(score["controlnet"]),
        "base": metrics.summarise(score["base"]),
        "lower_is_better": sorted(k for k in score["base"] if k.rsplit("/", 1)[-1] in metrics.LOWER_IS_BETTER),
        "samples": [{"id": id_, "caption": caption,
                     "controlnet": {k: v[i] for k, v in score["controlnet"].items()},
                     "base": {k: v[i] for k, v in score["base"].items()}}
                    for i, (id_, caption) in enumerate(zip(ids, captions))],
        "rows_trained_on": len(trained) if config.held_out_ids is not None else None,
        "settings": settings(config, type(pipe.scheduler).__name__, overrides),
        "controlnet_path": config.controlnet,
        "pretrained_model_name_or_path": config.pretrained_model_name_or_path,
        "manifest": config.manifest,
        "grid": grid_path.name,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if config.stacked:
        unscored = {c: f"no controllability metric for the {c} annotator (train/metrics.py)"
                    for c in conditions if c not in annotators}
        result.update(conditions=list(conditions), unscored=unscored)
    (Path(config.output_dir) / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def load_annotators(config: EvalConfig, overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each condition with a metric -> the annotator that re-annotates samples (None for task metrics alone),
    with the parameters the manifest recorded; a missing weight file fails here, before the diffusion models
    load."""
    annotators: dict[str, Any] = {}
    for c in config.conditions:
        if not metrics.metric_names(c, config.task):
            continue
        try:
            annotators[c] = metrics.load_annotator(c, overrides[c], config.weights_dir) \
                if c in metrics.CONDITION_METRICS else None
        except (OSError, ValueError) as exc:
            raise UsageError(f"annotator {c}: {exc}") from exc
    return annotators


def rows_to_evaluate(config: EvalConfig) -> tuple[list[dict[str, Any]], list[str]]:
    """(the rows to evaluate, the ids among them the run trained on), warning when there are such ids."""
    rows = load_rows(config.manifest, config.conditions, config.num_samples if config.held_out_ids else
                     config.num_samples or DEFAULT_SAMPLES, config.keep_duplicates, config.held_out_ids)
    if not rows:
        raise UsageError(f"--manifest {config.manifest}: none of the rows to evaluate is there (the run's held-out "
                         "rows are gone?); pass --num_samples to take the first N ok rows by id")
    trained = trained_rows(config, [r["id"] for r in rows])
    if trained:
        print(f"warning: {len(trained)} of the {len(rows)} rows evaluated were trained on by the run (not held "
              "out): their scores are not held-out scores", file=sys.stderr)
    return rows, trained


def condition_maps(config: EvalConfig, rows: list[dict[str, Any]], scored: Sequence[str]) \
        -> tuple[dict[str, list[np.ndarray]], dict[str, list[np.ndarray]]]:
    """(each condition's maps as the model is given them, each scored condition's maps to score against)."""
    from manifests.schema import cond_column

    nearest = {c: c in LABEL_MAPS for c in config.conditions}
    maps = {c: [prepare_condition(r[cond_column(c)], config.resolution, nearest[c]) for r in rows]
            for c in config.conditions}
    # Scored against the stored map (the region the sample covers, at its own resolution), not the
    # resized copy the model was given: a thin edge map shrunk fades and would cap every score.
    score_maps = {c: [metrics.centre_square(prepare_condition(r[cond_column(c)], None, nearest[c]))
                      if config.resolution is not None else m for r, m in zip(rows, maps[c])] for c in scored}
    return maps, score_maps


def stacked_inputs(config: EvalConfig, maps: dict[str, list[np.ndarray]], count: int) -> list[np.ndarray]:
    """Each of ``count`` rows' maps stacked as channels in --condition order: what the ControlNet is given."""
    nearest = [c in LABEL_MAPS for c in config.conditions]
    return [stack_maps([maps[c][i] for c in config.conditions], nearest) for i in range(count)]


def generate_pairs(config: EvalConfig, pipe: Any, alone: Any, given: list[np.ndarray],
                   captions: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(with the ControlNet, the base alone): each caption twice, from the same seed."""
    from tqdm import tqdm

    controlled, base = [], []
    progress = tqdm(list(zip(given, captions)), desc="evaluate", unit="sample", file=sys.stderr)
    for i, (cond, caption) in enumerate(progress):
        controlled.append(generate(pipe, caption, config.seed + i, cond.shape[:2], config, cond))
        base.append(generate(alone, caption, config.seed + i, cond.shape[:2], config))
    return controlled, base


@dataclasses.dataclass
class Scoring:
    """How samples are scored: each scored condition's annotator and maps, the rows' captions and ids."""

    config: EvalConfig
    annotators: dict[str, Any]
    """Scored condition -> its annotator (None: task metrics alone)."""
    maps: dict[str, list[np.ndarray]]
    captions: list[str]
    ids: list[str]

    def score(self, images: list[np.ndarray]) -> dict[str, list[float]]:
        """Each scored condition's metrics per image, named ``condition/metric`` for a stacked ControlNet."""
        out: dict[str, list[float]] = {}
        for c, annotator in self.annotators.items():
            for name, values in metrics.score_images(c, images, self.maps[c], self.captions, task=self.config.task,
                                                     annotator=annotator, ids=self.ids).items():
                out[f"{c}/{name}" if self.config.stacked else name] = values
        return out


def write_grid(config: EvalConfig, maps: dict[str, list[np.ndarray]], controlled: list[np.ndarray],
               base: list[np.ndarray], captions: list[str]) -> Path:
    """grid.png: each sample's maps | with ControlNet | base alone, its caption underneath."""
    conditions = config.conditions
    tiles = [[*(maps[c][i] for c in conditions), a, b] for i, (a, b) in enumerate(zip(controlled, base))]
    labels = [*(conditions if config.stacked else ["condition"]), "with ControlNet", "base alone"]
    return contact_sheet(tiles, captions, labels, Path(config.output_dir) / "grid.png")


def settings(config: EvalConfig, scheduler: str, overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What the figures depend on besides the models and rows."""
    return {"seed": config.seed, "num_inference_steps": config.num_inference_steps,
            "resolution": config.resolution, "keep_duplicates": config.keep_duplicates,
            "guidance_scale": config.guidance_scale, "scheduler": scheduler, "device": config.device,
            "dtype": "float32", "annotator_params": overrides if config.stacked else overrides[config.conditions[0]]}


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        config, warnings = with_run_defaults(config)
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
        summary = check(config)
        result = evaluate(config, summary)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    width = max(len(k) for k in result["base"]) if result["base"] else 0
    print(f"{result['num_samples']} samples, condition {config.condition}"
          + (f", task {config.task}" if config.task else ""))
    print(f"  {'metric':<{width}}  controlnet      base")
    for name in result["base"]:
        arrow = " (lower is better)" if name in result["lower_is_better"] else ""
        print(f"  {name:<{width}}  {result['controlnet'][name]:10.4f}  {result['base'][name]:8.4f}{arrow}")
    for condition, reason in result.get("unscored", {}).items():
        print(f"  {condition}: unscored, {reason}")
    print(f"wrote {Path(config.output_dir) / 'metrics.json'} and {Path(config.output_dir) / result['grid']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

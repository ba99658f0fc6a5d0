"""Validation: what each validation scores, sampling with the modules in memory, scoring, and the pass
the loop runs every ``--validation_steps`` and once on exactly the exported weights.

    run_validation(run, controlnet, ema, label):
        inputs (held-out rows, else --validation_image files)
        -> for each group of views (``validation_groups``): sample once
        -> grid PNG (train/grids.py) and TensorBoard image -> each view scored (validation/metrics.jsonl)
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
from PIL import Image

import manifests
from manifests.schema import cond_column
from train.adapter import BaseModels
from train.config import TrainConfig, validation_image_files
from train.data import ManifestDataset, decode_rgb
from train.grids import validation_grid

log = logging.getLogger("train")


class ValidationRun(Protocol):
    """What a validation reads from the run (train/loop.py ``Run`` has all of it)."""

    config: TrainConfig
    base: BaseModels
    held_out: list[dict]
    """Manifest rows kept out of training, to validate on."""
    seed: int
    weight_dtype: torch.dtype
    """dtype of the locked base (the ControlNet trains in fp32)."""
    scorer: ValidationScorer | None
    """None: samples and grids only (validation off, or not the main process)."""


def holdout_count(config: TrainConfig) -> int:
    """Rows to hold out for validation: none when they would never be used."""
    if not config.validation_enabled or config.validation_image:
        return 0
    return config.num_validation_rows


# --- views: which condition each validation scores -------------------------------------------------


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


# --- sampling: the family's pipeline over the modules already in memory -----------------------------
from train.controlnet_lora import is_lora, trained_parameters, validation_copy


def validation_inputs(rows: Sequence[dict], conditions: Sequence[str], images: Sequence[str],
                      prompts: Sequence[str], resolution: int, stacked: bool = False) -> list[tuple[torch.Tensor, str]]:
    """(condition tensor 1xCxHxW in [0, 1], prompt) pairs: given files, else held-out rows (every condition,
    3 channels each, in order). ``stacked``: each given entry is a comma-separated file per condition, stacked
    as channels as in training (see ``config.validation_image_problem``)."""
    if images:
        prompts = list(prompts) * len(images) if len(prompts) == 1 else list(prompts)
        out = []
        for entry, prompt in zip(images, prompts):
            files = validation_image_files(entry, stacked)
            maps = [np.asarray(Image.open(f).convert("RGB").resize((resolution, resolution)), np.float32) / 255
                    for f in files]
            out.append((torch.from_numpy(np.concatenate(maps, axis=2)).permute(2, 0, 1)[None], prompt))
        return out
    dataset = ManifestDataset(list(rows), conditions, resolution, seed=0, center_crop=True, random_flip=False,
                              proportion_empty_prompts=0.0)
    return [(ex["conditioning_pixel_values"][None], ex["caption"]) for ex in (dataset[i] for i in range(len(dataset)))]


@torch.no_grad()
def generate(base: Any, controlnet: torch.nn.Module, inputs: list[tuple[torch.Tensor, str]], per_input: int,
             seed: int, steps: int = 20, mode: int | None = None) -> list[list[Image.Image]]:
    """Images for each input, from the family's pipeline assembled from the in-memory modules (no second
    copy of the base); ``mode``: the union slot/mode of the one condition the inputs give."""
    return sample_inputs(base, controlnet, inputs, per_input, seed, steps, mode)


@torch.no_grad()
def generate_in_place(base: Any, controlnet: torch.nn.Module, ema: Any, inputs: list[tuple[torch.Tensor, str]],
                      per_input: int, seed: int, steps: int = 20, mode: int | None = None) -> list[list[Image.Image]]:
    """Families with large ControlNets (SDXL, SD3, Flux): sample with the trained ControlNet itself, not a
    copy: the EMA weights are swapped in and back, and the family's ``sampling`` hooks cast its inputs and
    residuals between fp32 and the base's dtype."""
    params = trained_parameters(controlnet)  # what the EMA holds
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    try:
        with base.family.sampling(base, controlnet):
            return sample_inputs(base, controlnet, inputs, per_input, seed, steps, mode)
    finally:
        if ema is not None:
            ema.restore(params)


def sample_inputs(base: Any, controlnet: torch.nn.Module, inputs: list[tuple[torch.Tensor, str]], per_input: int,
                  seed: int, steps: int, mode: int | None) -> list[list[Image.Image]]:
    """Each input's images, from one pipeline assembled for the whole validation."""
    pipe = base.family.validation_pipeline(base, controlnet)
    device = base.denoiser.device
    results = []
    for cond, prompt in inputs:
        generator = torch.Generator(device=device).manual_seed(seed)  # each input from the same noise
        results.append(base.family.sample(pipe, base, cond.to(device), prompt, per_input, generator, steps, mode))
    return results


def validation_model(trained: torch.nn.Module, ema, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of the ControlNet to sample with: the EMA weights when there are any, in the base's dtype.

    A copy, not the trained module: accelerate's autocast wrapper on the trained module returns fp32
    residuals, which would promote a half-precision UNet's activations (and crash its group norms).
    Only for small ControlNets (SD 1.x/2.x); the others sample in place (``samples_in_place``).
    """
    if is_lora(trained):  # the adapters merged into a plain ControlNet
        return validation_copy(trained, ema).to(trained.device, dtype).eval()
    clone = type(trained).from_config(trained.config)
    clone.load_state_dict(trained.state_dict())
    if ema is not None:
        ema.copy_to(clone.parameters())
    return clone.to(trained.device, dtype).eval()


Sampler = Callable[[list, int, int, "int | None"], list]
"""(inputs, samples per input, seed, union mode) -> PIL images per input."""


def make_sampler(base: BaseModels, controlnet: torch.nn.Module, ema, weight_dtype: torch.dtype) -> Sampler:
    """How this validation samples: with the trained module itself (EMA swapped in and back) when the family
    says so, else with one copy in the base's dtype, made once for all conditions."""
    if base.family.samples_in_place:
        return lambda inputs, per_input, seed, mode: generate_in_place(
            base, controlnet, ema, inputs, per_input, seed, mode=mode)
    model = validation_model(controlnet, ema, weight_dtype)
    return lambda inputs, per_input, seed, mode: generate(base, model, inputs, per_input, seed, mode=mode)


# --- scoring: controllability of the samples (train/metrics.py) ------------------------------------


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
        from train import metrics  # cv2 and the annotators load only when samples are scored

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
        for entry in manifests.read_manifest_json(self.config.manifest).get("annotators", []):
            if entry.get("name") == condition:
                params = dict(entry.get("params", {}))
                params.pop("require_detection", None)  # a sample without a person scores zero, not a skip
                return params
        return {}


def paired(inputs: list, samples: list, stored_maps: list | None) -> tuple[list, list, list]:
    """(generated image, its condition map, its prompt) as three lists, one entry per sample."""
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


def stored_maps(config: TrainConfig, held_out: list, condition: str) -> list | None:
    """Each held-out row's ``condition`` map at its stored resolution (None with --validation_image)."""
    if config.validation_image:
        return None
    return [np.asarray(decode_rgb(row[cond_column(condition)])) for row in held_out]


# --- the pass ----------------------------------------------------------------------------------


def run_validation(run: ValidationRun, controlnet: torch.nn.Module, ema: Any, label: str, trackers: Sequence = (),
                   global_step: int | None = None) -> list[Path]:
    """Generate from held-out conditions (or the given images) with ``controlnet`` (``ema``'s weights when
    given): once from the whole input (a single condition, or every map of a stacked run), or for each
    condition of a union run given alone; write a PNG grid per sampling (``step-<label>[-<condition>].png``),
    send it to TensorBoard, and score the samples' controllability per condition."""
    config = run.config
    inputs = validation_inputs(run.held_out, config.condition, config.validation_image, config.validation_prompt,
                               config.resolution, stacked=len(config.condition) > 1 and not config.union)
    if not inputs:
        return []
    sample = make_sampler(run.base, controlnet, ema, run.weight_dtype)
    return [validate_views(run, views, sample, inputs, label, trackers, global_step)
            for views in validation_groups(config)]


def validate_views(run: ValidationRun, views: list[ValidationView], sample: Sampler, inputs: list, label: str,
                   trackers: Sequence = (), global_step: int | None = None) -> Path:
    """One sampling's samples (made once), grid and TensorBoard image; each of ``views`` scores them
    against its own condition."""
    config = run.config
    given_images, first = bool(config.validation_image), views[0]
    given = sampled_inputs(inputs, first, given_images)
    samples = sample(given, config.num_validation_images, run.seed, first.mode)
    path = validation_grid(given, samples, Path(config.output_dir) / "validation" / f"step-{label}{first.suffix}.png")
    if run.scorer is not None:
        for view in views:
            run.scorer(view_inputs(inputs, view, given_images), samples, label, global_step, trackers,
                       stored_maps(config, run.held_out, view.condition), view)
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tag = "validation" if first.mode is None else f"validation/{first.condition}"
            tracker.writer.add_image(tag, np.asarray(Image.open(path)), global_step, dataformats="HWC")
    return path

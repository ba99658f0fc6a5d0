"""``bench/gpu_check.py``'s annotation sections: model annotators' images/s, and a whole annotation job.

Weights are random, in the real layouts (``tests/fake_weights.py``: HED, MiDaS DPT-hybrid and OpenPose at full
size); in a full run the segmentation model (UperNet ConvNeXt-small) and the BLIP captioner (BLIP-large) are
built at their published sizes too, in ``--tiny`` at the test suite's tiny sizes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from annotators.hed import HedAnnotator, HedParams
from bench.gpu_check import Context, ratio, synchronize

ANNOTATORS = ("hed", "depth", "openpose", "segmentation")
TINY_PARAMS = {"depth": {"detect_resolution": 64}}
"""``--tiny`` overrides: MiDaS sees 64 px instead of 384 (the network is the same)."""
NO_BASELINE = {"segmentation": "controlnet-aux has no ADE20K segmentation detector",
               "blip": "controlnet-aux has no captioner"}

SIMULATED_HED = {"images": 4096, "busy": 0.853, "steady_busy": 0.939, "makespan_x_ideal": 1.18}
"""``bench/gpu_pipeline_sim.py --profile hed --images 4096`` (its docstring, 2026-11-26): the staged design's
simulated GPU busy share over the makespan, and between the first and last forward."""


# --- weights at the real architectures ----------------------------------------------------------------


def weights_folder(ctx: Context) -> Path:
    """An ``lllyasviel/Annotators``-style folder of random weights; full runs get real-size UperNet and BLIP."""
    from tests.fake_weights import write_random_weights
    from tests.tiny_captioners import LAYOUT, write_tiny_blip

    root = write_random_weights(ctx.work / "weights")
    if ctx.tiny:
        write_tiny_blip(root / LAYOUT["blip"])
    else:
        write_upernet_convnext_small(root / "upernet-convnext-small")
        write_blip_large(root / LAYOUT["blip"])
    return root


def write_upernet_convnext_small(folder: Path) -> None:
    """``openmmlab/upernet-convnext-small``'s architecture (its config.json), random weights, 512 px processor."""
    from transformers import ConvNextConfig, SegformerImageProcessor, UperNetConfig, UperNetForSemanticSegmentation

    shutil.rmtree(folder, ignore_errors=True)
    backbone = ConvNextConfig(depths=[3, 3, 27, 3], hidden_sizes=[96, 192, 384, 768], drop_path_rate=0.3,
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    config = UperNetConfig(backbone_config=backbone, hidden_size=512, auxiliary_in_channels=384,
                           auxiliary_channels=256, num_labels=150)
    UperNetForSemanticSegmentation(config).save_pretrained(folder)
    SegformerImageProcessor(size={"height": 512, "width": 512}).save_pretrained(folder)


def write_blip_large(folder: Path) -> None:
    """``Salesforce/blip-image-captioning-large``'s architecture (ViT-L/16 at 384 px, 12-layer BERT decoder),
    random weights; the test suite's small tokenizer (its vocabulary only sizes the output layer)."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    from tests.tiny_captioners import _bert_tokenizer, _save

    tok = _bert_tokenizer()
    config = BlipConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=768, encoder_hidden_size=1024, intermediate_size=3072,
                         num_hidden_layers=12, num_attention_heads=12, bos_token_id=tok.bos_token_id,
                         sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=384, patch_size=16),
        projection_dim=512)
    torch.manual_seed(0)
    _save(BlipForConditionalGeneration(config), folder, tok)
    BlipProcessor(BlipImageProcessor(size={"height": 384, "width": 384}), tok).save_pretrained(folder)


# --- section: annotators' images/s -----------------------------------------------------------------


def annotator_speed(ctx: Context) -> dict[str, Any]:
    """Per model annotator: ours at each batch size, controlnet-aux's per-image loop, images/s and ratios."""
    from bench.annotator_speed import photos

    weights = str(ctx.once("weights", lambda: weights_folder(ctx)))
    images = photos(ctx.sizes.annotator_images, ctx.sizes.image_px)
    estimate = 3.0 if ctx.tiny else 8.0
    out = {name: ctx.part(name, estimate, lambda name=name: one_annotator(ctx, name, weights, images))
           for name in ANNOTATORS}
    out["blip"] = ctx.part("blip", estimate, lambda: captioner_speed(ctx, weights, images))
    return out


def one_annotator(ctx: Context, name: str, weights: str, images: list[np.ndarray]) -> dict[str, Any]:
    from annotators import registry
    from bench.annotator_speed import BASELINES, time_per_image

    ours = registry.create(name, TINY_PARAMS.get(name, {}) if ctx.tiny else {}, weights)
    ours.requested_device = ctx.device
    ours.setup()
    ids = [f"img{i}" for i in range(len(images))]
    calls = [lambda b=b: [ours.annotate(images[i:i + b], ids[i:i + b]) for i in range(0, len(images), b)]
             for b in ctx.sizes.batch_sizes]
    if name in BASELINES:
        call = BASELINES[name](weights, ctx.device)
        calls.append(lambda: [call(img) for img in images])
    timed = [lambda fn=fn: (fn(), synchronize(ctx.device)) for fn in calls]
    ms = time_per_image(timed, len(images), repeats=1 if ctx.tiny else 2)
    out = rates(ctx, [1000 / m for m in ms], name)
    if ctx.tiny and name in TINY_PARAMS and name in BASELINES:
        out["note"] = f"--tiny: ours with {TINY_PARAMS[name]}, controlnet-aux at its own settings: not comparable"
    return out


def rates(ctx: Context, per_s: list[float], name: str) -> dict[str, Any]:
    """{ours_bN_images_per_s ..., controlnet_aux_images_per_s or the reason there is none, ratios}."""
    small, large = ctx.sizes.batch_sizes
    out: dict[str, Any] = {f"ours_b{b}_images_per_s": r for b, r in zip((small, large), per_s)}
    out[f"b{large}_vs_b{small}"] = ratio(per_s[1], per_s[0])
    if len(per_s) > 2:
        out["controlnet_aux_images_per_s"] = per_s[2]
        out[f"ours_b{large}_vs_controlnet_aux"] = ratio(per_s[1], per_s[2])
    else:
        out["controlnet_aux"] = NO_BASELINE[name]
    return out


def captioner_speed(ctx: Context, weights: str, images: list[np.ndarray]) -> dict[str, Any]:
    """BLIP's ``forward`` (the model actor's work) in captions/s at each batch size."""
    from bench.caption_speed import speed
    from captioners import registry

    captioner = registry.create("blip", {"max_new_tokens": 20}, weights)
    captioner.requested_device = ctx.device
    captioner.setup()

    def timed(batch: int) -> float:
        rate = speed(captioner, images, batch)
        synchronize(ctx.device)  # generate ends on the host (tokens to text), so the rate includes the GPU's work
        return rate

    return rates(ctx, [timed(b) for b in ctx.sizes.batch_sizes], "blip")


# --- section: a whole annotation job -------------------------------------------------------------------


@dataclasses.dataclass
class TimedHedParams(HedParams):
    log_dir: str = ""
    """Folder for the forward-interval logs ("" logs nothing)."""


class TimedHed(HedAnnotator):
    """HED whose ``forward`` logs its wall interval, the device synchronised at both ends, so the interval is
    the model's busy time (with the batch's host-device copies) inside the model actor."""

    Params = TimedHedParams
    params: TimedHedParams

    def forward(self, inputs: list[Any]) -> list[Any]:
        synchronize(self.device)
        start = time.time()
        out = super().forward(inputs)
        synchronize(self.device)
        if self.params.log_dir:  # the format bench/gpu_pipeline_sim.py's read_logs reads
            with open(os.path.join(self.params.log_dir, f"forward-{os.getpid()}.log"), "a") as f:
                f.write(f"forward {start:.6f} {time.time():.6f} {len(inputs)} -\n")
        return out


TIMED_HED = f"{__name__}:TimedHed"


def make_collection(folder: Path, count: int, distinct: int = 32) -> None:
    """``count`` 768x1024 JPEG names: ``distinct`` real-photo crops, the rest hard links to them (each file
    is still read and decoded; making thousands of distinct JPEGs would take longer than the job)."""
    from bench.annotate_throughput import make_photos

    sources = make_photos(folder / "_sources", min(distinct, count))
    for i in range(count):
        os.link(sources[i % len(sources)], folder / f"job_{i:05d}.jpg")
    shutil.rmtree(folder / "_sources")


class UtilisationSampler:
    """The GPU's utilisation (NVML, through ``torch.cuda.utilization``) every ``period`` s on a thread."""

    def __init__(self, period: float = 0.1) -> None:
        self.period, self.samples = period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def unavailable(device: str) -> str | None:
        """Why sampling cannot work here, or None."""
        if device != "cuda":
            return "no GPU"
        try:
            import torch

            torch.cuda.utilization(0)
        except Exception as exc:  # ModuleNotFoundError (pynvml) or an NVML error
            return f"torch.cuda.utilization: {type(exc).__name__}: {exc} (pip install nvidia-ml-py)"
        return None

    def _run(self) -> None:
        import torch

        while not self._stop.wait(self.period):
            self.samples.append(torch.cuda.utilization(0))

    def __enter__(self) -> "UtilisationSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def annotate_job(ctx: Context) -> dict[str, Any]:
    """``pipeline.annotate.run`` with HED: images/s and the model's busy share of the job's wall time."""
    from bench.gpu_pipeline_sim import read_logs, union_length
    from pipeline import ray_runtime
    from pipeline.annotate import run
    from pipeline.config import AnnotateConfig

    sizes = ctx.sizes
    weights = str(ctx.once("weights", lambda: weights_folder(ctx)))
    collection, output, logs = ctx.work / "job_images", ctx.work / "job_manifest", ctx.work / "job_logs"
    ctx.need(5 if ctx.tiny else 40, "annotate_job")
    make_collection(collection, sizes.job_images)
    logs.mkdir(parents=True)
    config = AnnotateConfig(input=str(collection), output=str(output), annotators=(TIMED_HED,),
                            annotator_params={TIMED_HED: {"log_dir": str(logs)}}, weights_dir=weights,
                            resolution=sizes.image_px, center_crop=True, shard_size=sizes.job_shard_size,
                            gpus_per_worker=None if ctx.cuda else 0)
    ray_runtime.connect(config.address, config.num_cpus)  # Ray's start is not the job's (the simulation's neither)
    no_sampling = UtilisationSampler.unavailable(ctx.device)
    sampler = UtilisationSampler()
    start = time.time()
    with contextlib.nullcontext() if no_sampling else sampler:
        summary = run(config)
    end = time.time()
    forwards = [(s, e) for s, e, _ in read_logs(logs)["forward"]]
    if not forwards:
        raise RuntimeError("the model actor logged no forward call")
    first, last = min(s for s, _ in forwards), max(e for _, e in forwards)
    return {
        "images": sizes.job_images, "rows_ok": summary["counts"]["ok"], "job_seconds": end - start,
        "images_per_s": sizes.job_images / (end - start),
        "model_busy": union_length(forwards, start, end) / (end - start),
        "model_busy_steady": union_length(forwards, first, last) / max(1e-9, last - first),
        "forward_calls": len(forwards),
        "first_forward_after_s": first - start, "after_last_forward_s": end - last,  # actor start-up; the tail
        "gpu_utilisation_sampled": (float(np.mean(sampler.samples)) / 100 if sampler.samples else None),
        "gpu_utilisation_note": no_sampling or f"{len(sampler.samples)} samples",
        "simulated_busy": SIMULATED_HED["busy"], "simulated_steady_busy": SIMULATED_HED["steady_busy"],
        "simulated_images": SIMULATED_HED["images"],
    }

"""Every GPU figure the README claims, measured in one run (at most 8 minutes on one H100).

    python bench/gpu_check.py                         # full sizes on the GPU; writes runs/gpu_check/
    python bench/gpu_check.py --tiny                  # the same code paths at tiny sizes on the CPU (< 1 min)
    python bench/gpu_check.py --only train_flux       # one section
    python bench/gpu_check.py --out DIR --budget 480  # where to write the report; seconds for the whole run

Sections (``sections()``, the registry; each has its own time budget, is skipped with the reason recorded when the run's
time is short, and fails alone: its error goes in the JSON and the next section runs):

- ``annotators``: HED, depth (MiDaS DPT-hybrid), OpenPose, segmentation (UperNet ConvNeXt) and the BLIP
  captioner at their real architectures with random weights: images/s at batch 1 and 16 (512 px), ours
  against controlnet-aux's per-image loop (``bench/annotator_speed.py``'s baselines);
- ``annotate_job``: ``pipeline.annotate.run`` with HED on a few thousand generated images: images/s and
  how busy the model was (the model actor's forward intervals, and sampled GPU utilisation where
  pynvml is installed), against ``bench/gpu_pipeline_sim.py``'s simulated figure;
- ``train_sd15``: an SD 1.5-size ControlNet step against fine-tuning the base, bf16, time and peak memory
  (the paper: 1.34x time, 1.23x memory on an A100);
- ``cache_latents``: the trainer with and without ``--cache_latents``;
- ``resume_exact``: a bf16 run resumed from a checkpoint against the straight run, weight for weight;
- ``train_sdxl``: SDXL at 1024 px, batch 1, gradient checkpointing and 8-bit Adam, with validation;
- ``train_flux``: Flux at real width and reduced depth, base in bf16 against ``--fp8_base``, with validation.

Writes ``gpu_check.json`` (every figure, skip and error) and ``gpu_check.md`` (a device line, then a table).
Models are built from their published configs with random weights (nothing is downloaded).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import tempfile
import time
import traceback
from typing import Any, Callable

GIB = 2**30
DEFAULT_OUT = "runs/gpu_check"
FULL_BUDGET_S = 480.0
"""The whole full run's time: 8 minutes on one H100."""


class Skipped(Exception):
    """A section or part that would exceed its time budget, or lacks something it needs (the reason)."""


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big each measurement is: ``FULL`` on a GPU, ``TINY`` for the CPU test (same code paths)."""

    image_px: int
    """Side of the square images the annotators see."""
    annotator_images: int
    """Images per annotator timing pass."""
    batch_sizes: tuple[int, int]
    """Our batch sizes (the first against the second)."""
    job_images: int
    """Images of the annotation job."""
    job_shard_size: int
    sd_resolution: int
    """SD 1.5 steps, the cached-latents and resume runs."""
    sd_batch: int
    sdxl_resolution: int
    flux_resolution: int
    train_steps: int
    """Timed steps per training measurement (after one warm-up step)."""
    train_rows: int
    """Rows of each training manifest."""


FULL = Sizes(image_px=512, annotator_images=32, batch_sizes=(1, 16), job_images=3072, job_shard_size=128,
             sd_resolution=512, sd_batch=4, sdxl_resolution=1024, flux_resolution=1024, train_steps=5,
             train_rows=48)
TINY = Sizes(image_px=64, annotator_images=2, batch_sizes=(1, 2), job_images=32, job_shard_size=16,
             sd_resolution=64, sd_batch=2, sdxl_resolution=64, flux_resolution=64, train_steps=2,
             train_rows=16)


@dataclasses.dataclass
class Context:
    """What a section gets: sizes, device, a work folder, and its time budget."""

    tiny: bool
    sizes: Sizes
    device: str
    work: Path
    deadline: float = math.inf
    """``time.monotonic()`` by which the current section must end."""
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Built once, shared by sections: model folders, manifests, weights folders."""

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def need(self, estimate_s: float, what: str) -> None:
        """Raise ``Skipped`` (with the reason) unless about ``estimate_s`` seconds remain in the budget."""
        if self.left() < estimate_s:
            raise Skipped(f"{what}: needs about {estimate_s:.0f} s, {max(0.0, self.left()):.0f} s of the "
                          "section's budget left")

    def part(self, name: str, estimate_s: float, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``fn()`` when about ``estimate_s`` seconds remain in the section's budget, else a skip with the
        reason; an error is recorded (one line, with the traceback's last frame) instead of raised."""
        try:
            self.need(estimate_s, name)
            return fn()
        except Skipped as exc:
            return {"skipped": str(exc)}
        except Exception as exc:  # isolation: one part's failure is a figure, not the end of the run
            traceback.print_exc()
            return {"error": error_line(exc)}
        finally:
            free_memory()

    def once(self, key: str, build: Callable[[], Any]) -> Any:
        """``build()`` the first time ``key`` is asked for; the same value afterwards."""
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]


@dataclasses.dataclass(frozen=True)
class Section:
    """One measured section: its function, its time budget in a full run, what it claims to measure."""

    run: Callable[[Context], dict[str, Any]]
    budget_s: float
    title: str


def error_line(exc: BaseException) -> str:
    """``Type: message (file:line)`` of the innermost frame: enough to find it, one line."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}{where}"


# --- measuring helpers shared by the sections ------------------------------------------------------


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so a wall-clock interval covers it."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def free_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def reset_peak(device: str) -> int:
    """Start a peak-memory window; returns the bytes in use now (GPU allocated, else process RSS)."""
    free_memory()
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    import psutil

    from bench.train_family_memory import reset_peak_rss

    reset_peak_rss()
    return psutil.Process().memory_info().rss


def peak_gib(device: str, start: int) -> float:
    """GiB of peak memory growth since ``reset_peak`` returned ``start`` (GPU allocator, else peak RSS)."""
    if device == "cuda":
        import torch

        return (torch.cuda.max_memory_allocated() - start) / GIB
    from bench.train_family_memory import peak_rss

    return (peak_rss() - start) / GIB


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None where either is missing or b is 0."""
    return a / b if a is not None and b else None


def device_info(device: str) -> dict[str, Any]:
    """Card, versions, date: the line every table starts with."""
    import torch

    info: dict[str, Any] = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
                            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                            "python": platform.python_version(), "cpu_threads": torch.get_num_threads()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(card=props.name, gpu_memory_gib=round(props.total_memory / GIB, 1))
    else:
        info["card"] = f"CPU ({platform.processor() or platform.machine()})"
    for package in ("diffusers", "transformers", "accelerate", "ray", "bitsandbytes", "pynvml", "controlnet_aux"):
        from annotators.base import package_version

        info[package] = package_version(package.replace("_", "-"))
    return info


# --- the sections, the run, the report ---------------------------------------------------------------


def sections() -> dict[str, Section]:
    """The registry, in running order (imports here: the section modules import this one's helpers)."""
    from bench import gpu_check_annotate as annotate
    from bench import gpu_check_train as train

    return {
        "annotators": Section(annotate.annotator_speed, 85, "model annotators: images/s, ours vs controlnet-aux"),
        "annotate_job": Section(annotate.annotate_job, 80, "annotation job with HED: images/s, model busy"),
        "train_sd15": Section(train.sd15_overhead, 50, "SD 1.5 ControlNet step vs base fine-tune (bf16)"),
        "cache_latents": Section(train.cache_latents, 50, "trainer samples/s with and without --cache_latents"),
        "resume_exact": Section(train.resume_exact, 50, "bf16 run resumed from a checkpoint = straight run"),
        "train_sdxl": Section(train.sdxl, 80, "SDXL 1024 px, gradient checkpointing, 8-bit Adam, validation"),
        "train_flux": Section(train.flux, 80, "Flux real width, reduced depth: bf16 vs fp8 base, validation"),
    }


def run_sections(ctx: Context, names: list[str], budget_s: float,
                 done: Callable[[dict[str, Any]], None] = lambda results: None) -> dict[str, Any]:
    """Each named section within its budget (scaled to ``budget_s`` for the whole run), isolated; ``done`` is
    called with the results so far after each section (so a run cut short still leaves its figures)."""
    registry = sections()
    total = sum(registry[n].budget_s for n in names)
    scale = budget_s / total if total else 1.0
    end = time.monotonic() + budget_s
    results: dict[str, Any] = {}
    for name in names:
        section = registry[name]
        budget = section.budget_s * scale
        start = time.monotonic()
        if end - start < 0.5 * budget:
            reason = f"{max(0.0, end - start):.0f} s of the run's budget left, the section's budget is {budget:.0f} s"
            results[name] = {"title": section.title, "skipped": reason, "budget_s": round(budget, 1)}
            done(results)
            continue
        ctx.deadline = min(start + budget, end)
        print(f"[gpu_check] {name}: {section.title} (budget {budget:.0f} s)", flush=True)
        try:
            result = section.run(ctx)
        except Skipped as exc:
            result = {"skipped": str(exc)}
        except Exception as exc:  # one section's failure is recorded; the others still run
            traceback.print_exc()
            result = {"error": error_line(exc)}
        finally:
            free_memory()
        seconds = time.monotonic() - start
        results[name] = {"title": section.title, **result, "seconds": round(seconds, 1),
                         "budget_s": round(budget, 1), "over_budget": seconds > budget}
        done(results)
    return results


def markdown(report: dict[str, Any]) -> str:
    """The device line, then one table row per figure (section, figure, value)."""
    d = report["device"]
    lines = [f"Device: {d['card']}, torch {d['torch']}, CUDA {d['cuda']}, {d['date']}"
             f"{' (--tiny: CPU stand-in sizes)' if report['tiny'] else ''}", "",
             "| section | figure | value |", "|---|---|---|"]
    for name, result in report["sections"].items():
        for key, value in flatten(result):
            if key not in ("title",):
                lines.append(f"| {name} | {key} | {fmt(value)} |")
    return "\n".join(lines) + "\n"


def flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, leaf) pairs of nested dicts."""
    if isinstance(value, dict):
        return [pair for k, v in value.items() for pair in flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    return [(prefix, value)]


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "/")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = list(sections())
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU: the same code paths in under a minute")
    p.add_argument("--only", action="append", choices=names, metavar="SECTION",
                   help=f"run only this section (repeatable): {', '.join(names)}")
    p.add_argument("--out", default=DEFAULT_OUT, help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--work", default=None,
                   help="folder for the generated models, images and runs, deleted at the end (default: the system's "
                        "temp folder; a full run needs about 40 GB)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds for the whole run (default {FULL_BUDGET_S:.0f}; --tiny: unlimited)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="default: cuda when there is one (--tiny: cpu)")
    args = p.parse_args(argv)
    if args.budget is not None and args.budget <= 0:
        p.error("--budget must be positive (seconds for the whole run)")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here; use --tiny for the CPU check")
    if args.device is None:
        args.device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Not under --out: that folder may be copied back from a GPU machine, and a full run's models take tens of GB.
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_work_", dir=args.work))
    ctx = Context(tiny=args.tiny, sizes=TINY if args.tiny else FULL, device=args.device, work=work)
    if args.device == "cpu":  # the trainer's accelerate would take a GPU that is there
        os.environ["ACCELERATE_USE_CPU"] = "true"
    if not args.tiny and args.device == "cpu":
        print("[gpu_check] no GPU: full sizes on the CPU take hours; use --tiny for the CPU check", flush=True)
    names = [name for name in sections() if not args.only or name in args.only]  # running order, once each
    budget = args.budget or (FULL_BUDGET_S if not args.tiny else 3600.0)
    started = time.monotonic()
    report: dict[str, Any] = {"tiny": args.tiny, "device": device_info(args.device), "budget_s": budget,
                              "sections": {}}

    def write(results: dict[str, Any]) -> None:
        report.update(seconds=round(time.monotonic() - started, 1), sections=results)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
        (out / "gpu_check.md").write_text(markdown(report))

    try:
        run_sections(ctx, names, budget, write)
    finally:
        from pipeline import ray_runtime

        ray_runtime.shutdown()
        shutil.rmtree(work, ignore_errors=True)  # model folders and manifests: tens of GB in a full run
    print(markdown(report))
    print(f"[gpu_check] wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    failed = [key for key, _ in flatten(report["sections"]) if key.endswith("error")]
    if failed:
        print(f"[gpu_check] {len(failed)} failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    # The sections import ``bench.gpu_check``: run that module, not a second copy named __main__.
    from bench.gpu_check import main as _main

    sys.exit(_main())

"""Control methods side by side: full ControlNet, ControlNet-LoRA, ControlNet-XS (and channel-concat at real sizes).

    python bench/control_methods.py --sizes_only            # real family sizes on the meta device (seconds)
    python bench/control_methods.py                         # + the fill task on a tiny 2-layer base (about an hour)
    python bench/control_methods.py --ranks 4,64 --xs_ratios 0.5 --steps 200 --held_out 16   # a shorter look

1. Real sizes (``--sizes_only`` stops here): parameters trained and export sizes of each method at the
   published sizes of SD 1.5, SDXL and Flux.1-dev, built on the meta device (nothing allocated) from
   bench/train_family_memory.py's configs with the trainer's own builders (train/controlnet_lora.py ``add_lora``,
   ``ControlNetXSAdapter.from_unet`` as train/families/unet_xs.py calls it, train/channel_concat.py
   ``widen_input``/``add_lora``). Export sizes are the bytes of the tensors each export writes, in the dtype it
   writes them: the ControlNet folder fp32 (``save_pretrained``) and the single file fp16 (train/export.py), a
   LoRA run's merged ControlNet (the same two), its adapter alone (peft, fp32) and Control-LoRA file (fp16, SD/SDXL
   only), an XS adapter (fp32 folder, fp16 single file), a channel-concat LoRA (``save_lora_weights``, fp32) or
   fine-tuned transformer (fp32 as trained; bf16 as most users would store it). "Memory of what trains": fp32
   weights of the trained module (a LoRA ControlNet's frozen copy included) with gradients and AdamW's two moments
   (16 bytes per trained parameter, 4 per frozen copied one); the locked base and activations are not counted.
2. The fill task (the demo's: circles' Canny outlines condition a tiny SD base). ControlNet-XS needs a UNet with
   two layers per block and the shipped models/tiny-circles has one, so the bench builds (once, cached in
   ``--base``) a base with ``demo/tiny_base.py``'s recipe and ``--unet_layers_per_block 2``; every method trains on
   it. Channel-concat needs a Flux base, which the fill task has none of: it is in the real-size table only.
   Each method trains in this one process (bench/arms.py: the trainer's own ``set_up``/``micro_step``/
   ``after_step``) on the same 800 circles, batches, noise and timesteps (same seed), resolution 32, batch 16,
   50 warm-up steps; lr 1e-3 (the demo's) for the full ControlNet, 3e-3 for LoRA and XS (``--lr``, ``--lora_lr``,
   ``--xs_lr``). The arms take turns up to a shared deadline on their own clocks, ``--segment_seconds`` later each
   round, the full ControlNet first, so a slow or fast spell of the shared machine falls on all of them. Each is scored twice on fresh
   outlines no run saw (another seed and file prefix): at ``--steps`` steps (equal steps) and when its own clock
   reaches the time the full ControlNet took for those steps (equal wall time). Scores: circle IoU and colour
   accuracy of samples from the trainer's validation sampler (UniPC 20 steps) on the same noise; the first arm's
   samples before training are the base alone (every method starts exactly at the base). Also: parameters
   trained, the files its export writes (train/export.py) at equal steps, peak memory (a fresh process's peak
   RSS over ``--calibration_steps`` steps, and its growth over the RSS once the trainer is imported) and time per
   step (the arm's clock, data loading included).
3. Printed: both tables with ratios against the full ControlNet of the same run / family; written to
   ``--out``: control_methods.json (updated after every figure, so a cut-short run keeps what it had) and
   control_methods.png (IoU at equal steps and equal time; export size and trained parameters).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import math
import os
import time
from typing import Any, Callable

import torch

from bench.arms import FOREVER, ROOT, Arm, annotate, peak_memory
from bench.train_family_memory import FLUX_DEV, SD15_UNET, SDXL_UNET, count

GIB, MB = 2 ** 30, 1e6
REFERENCE = "full ControlNet"
"""The method every ratio is taken against (first in every table, first in every round)."""


# ------------------------------------------------------------------------------- real sizes (meta device)

def trained_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def numel(tensors) -> int:
    """Elements of the tensors of a state dict (``.values()``)."""
    return sum(t.numel() for t in tensors)


def size_row(family: str, method: str, trained: int, frozen_copy: int, files: dict[str, int]) -> dict[str, Any]:
    """One real-size row: parameters trained, export files (bytes), memory of what trains (GiB)."""
    return {"family": family, "method": method, "trained": trained, "files": files,
            "train_state_gib": (16 * trained + 4 * frozen_copy) / GIB}


def controlnet_rows(family: str, build: Callable[[], torch.nn.Module], ranks: list[int]) -> list[dict]:
    """A family's full ControlNet (``build()``) and its ControlNet-LoRA at each rank (train/controlnet_lora.py)."""
    from train.control_lora_file import control_lora_state
    from train.controlnet_lora import LoraSettings, add_lora

    full = build()
    size = count(full)
    rows = [size_row(family, REFERENCE, size, 0, {"ControlNet folder fp32": 4 * size, "single file fp16": 2 * size})]
    for rank in ranks:
        lora = add_lora(build(), LoraSettings(rank))
        trained = trained_count(lora)
        files = {"merged folder fp32": 4 * size, "merged single fp16": 2 * size, "adapter alone fp32": 4 * trained}
        if type(lora).__name__ == "ControlNetModel":  # the Control-LoRA layout is SD 1.x/SDXL's
            files["Control-LoRA fp16"] = 2 * numel(control_lora_state(lora).values())
        rows.append(size_row(family, f"ControlNet-LoRA r{rank}", trained, size - trained, files))
    return rows


def xs_row(family: str, unet: torch.nn.Module, ratio: float, hint_channels: tuple[int, ...]) -> dict:
    """A ControlNet-XS adapter at ``ratio`` of the UNet's width, as train/families/unet_xs.py builds it."""
    from diffusers import ControlNetXSAdapter

    from train.families.unet_xs import quiet_build

    with quiet_build():
        adapter = ControlNetXSAdapter.from_unet(unet, size_ratio=ratio, conditioning_channels=3,
                                                conditioning_embedding_out_channels=hint_channels)
    size = count(adapter)
    return size_row(family, f"ControlNet-XS {ratio:g}", size, 0,
                    {"XS adapter folder fp32": 4 * size, "single file fp16": 2 * size})


def unet_rows(family: str, unet_config: dict, ranks: list[int], xs_ratios: list[float],
              hint_channels: tuple[int, ...] = (16, 32, 96, 256)) -> list[dict]:
    """Full ControlNet, LoRA ranks and XS ratios of an SD-style UNet ``unet_config`` on the meta device
    (``hint_channels``: the condition encoder's, train/families/unet.py ``condition_encoder_channels``)."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel, UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
        build = lambda: ControlNetModel.from_unet(  # noqa: E731
            unet, conditioning_channels=3, conditioning_embedding_out_channels=hint_channels,
            load_weights_from_unet=False)
        rows = controlnet_rows(family, build, ranks)
        rows += [xs_row(family, unet, ratio, hint_channels) for ratio in xs_ratios]
    return rows


def concat_rows(family: str, transformer_config: dict, rank: int) -> list[dict]:
    """Channel-concat control on a Flux transformer (train/channel_concat.py): LoRA of ``rank`` over the widened
    input projection, and the full fine-tune (rank 0)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from peft.utils import get_peft_model_state_dict

    from train.channel_concat import add_lora, widen_input

    rows = []
    with init_empty_weights():
        for lora in (True, False):
            transformer = FluxTransformer2DModel.from_config(transformer_config).requires_grad_(not lora)  # locked
            before = transformer.x_embedder.weight.numel()
            widen_input(transformer)
            widened = transformer.x_embedder.weight.numel() - before
            if lora:
                add_lora(transformer, rank)
                trained = trained_count(transformer)
                files = {"LoRA file fp32": 4 * numel(get_peft_model_state_dict(transformer).values())}
                rows.append({**size_row(family, f"channel-concat LoRA r{rank}", trained, 0, files),
                             "widened_input_columns": widened})
            else:
                size = count(transformer)
                rows.append({**size_row(family, "channel-concat full fine-tune", size, 0,
                                        {"transformer fp32": 4 * size, "transformer bf16": 2 * size}),
                             "widened_input_columns": widened})
    return rows


def flux_controlnet(config: dict, layers: int, single_layers: int) -> torch.nn.Module:
    """The Flux ControlNet the trainer builds by default (train/families/flow.py), as train_family_memory counts it."""
    from diffusers import FluxControlNetModel

    return FluxControlNetModel.from_config({**config, "num_layers": layers, "num_single_layers": single_layers})


def real_sizes(ranks: list[int], xs_ratio: float, concat_rank: int) -> list[dict]:
    """Every real-size row: SD 1.5 and SDXL (full, LoRA ranks, XS), Flux.1-dev (full at the trainer's default
    depth, LoRA ranks, channel-concat LoRA and full fine-tune)."""
    from accelerate import init_empty_weights

    from train.channel_concat import DEFAULT_RANK
    from train.families.flow import FluxAdapter

    rows = unet_rows("SD 1.5", SD15_UNET, ranks, [xs_ratio]) + unet_rows("SDXL", SDXL_UNET, ranks, [xs_ratio])
    depth = (FluxAdapter.default_layers, FluxAdapter.default_single_layers)
    with init_empty_weights():
        rows += controlnet_rows("Flux.1-dev", lambda: flux_controlnet(FLUX_DEV, *depth), ranks)
    rows += concat_rows("Flux.1-dev", FLUX_DEV, concat_rank or DEFAULT_RANK)
    for row in rows:
        reference = next(r for r in rows if r["family"] == row["family"] and r["method"] == REFERENCE)
        row["trained_ratio"] = row["trained"] / reference["trained"]
        row["smallest_file"] = min(row["files"].values())
        row["smallest_file_ratio"] = row["smallest_file"] / min(reference["files"].values())
    return rows


def print_real(rows: list[dict]) -> None:
    print("\nreal sizes (meta device; ratios against the family's full ControlNet at the trainer's defaults)")
    print(f"{'family':12}{'method':32}{'trained':>15}{'ratio':>8}{'train GiB':>11}{'smallest file':>15}{'ratio':>8}"
          "  files")
    for r in rows:
        files = ", ".join(f"{k} {v / MB:,.1f} MB" for k, v in r["files"].items())
        print(f"{r['family']:12}{r['method']:32}{r['trained']:15,}{r['trained_ratio']:8.3f}{r['train_state_gib']:11.2f}"
              f"{r['smallest_file'] / MB:13,.1f}MB{r['smallest_file_ratio']:8.3f}  {files}")
    widened = sorted({r["widened_input_columns"] for r in rows if "widened_input_columns" in r})
    print(f"channel-concat: the widened input projection adds {', '.join(f'{w:,}' for w in widened)} "
          "zero-initialised weights to the base's transformer (trained only by the full fine-tune; a LoRA file "
          "holds none of them: the loader widens the base's)")


# ------------------------------------------------------------------------------------ the fill task

def smallest_xs_ratio(base: str) -> float:
    """The least ``--controlnet_xs_size_ratio`` that leaves each of the base UNet's attention heads a channel
    (train/families/unet_xs.py ``new_adapter``'s rule)."""
    config = json.loads((Path(base) / "unet" / "config.json").read_text())
    widths, heads = config["block_out_channels"], config["attention_head_dim"]
    heads = heads if isinstance(heads, list) else [heads] * len(widths)
    return max(h / w for h, w in zip(heads, widths))


def fill_methods(ranks: list[int], xs_ratios: list[float]) -> dict[str, list[str]]:
    """Method name -> the trainer flags that select it (the full ControlNet first: the reference)."""
    methods = {REFERENCE: []}
    methods.update({f"ControlNet-LoRA r{r}": ["--controlnet_lora_rank", str(r)] for r in ranks})
    methods.update({f"ControlNet-XS {f:g}": ["--control_method", "controlnet_xs", "--controlnet_xs_size_ratio", str(f)]
                    for f in xs_ratios})
    return methods


def ensure_base(folder: Path, threads: int, recipe: tuple[str, ...] = ()) -> dict[str, Any]:
    """The 2-layer tiny base in ``folder``: built with demo/tiny_base.py's recipe (only ``--unet_layers_per_block
    2`` differs from models/tiny-circles; ``recipe``: more of its flags) unless already there; returns how long
    building took (0: cached)."""
    if (folder / "model_index.json").is_file():
        return {"base": str(folder), "built_s": 0.0, **base_report(folder)}
    from demo import tiny_base

    began = time.perf_counter()
    print(f"building the 2-layer tiny base in {folder} (demo/tiny_base.py's recipe; about 20-30 minutes)", flush=True)
    flags = ["--output", str(folder), "--unet_layers_per_block", "2", "--threads", str(threads), *recipe]
    if tiny_base.main(flags) != 0:
        raise SystemExit(f"building the base in {folder} failed")
    return {"base": str(folder), "built_s": time.perf_counter() - began, **base_report(folder)}


def base_report(folder: Path) -> dict[str, Any]:
    """What demo/tiny_base.py measured of the base (its colour accuracy, circles drawn, training minutes)."""
    report = json.loads((folder / "tiny_base.json").read_text()) if (folder / "tiny_base.json").is_file() else {}
    metrics, seconds = report.get("metrics", {}), report.get("training", {}).get("seconds", {})
    return {"colour_accuracy": metrics.get("colour_accuracy"), "circle_drawn": metrics.get("circle_drawn"),
            "training_min": sum(seconds.values()) / 60 if seconds else None,
            "threads": report.get("training", {}).get("threads")}


def train_flags(base: str, manifest: str, out: Path, method: list[str], lr: float, steps: int, args) -> list[str]:
    """One method's trainer flags: the demo's recipe (resolution, batch, lr, warm-up), ``steps`` steps."""
    return ["--manifest", manifest, "--condition", "canny", "--pretrained_model_name_or_path", base,
            "--output_dir", str(out), "--resolution", str(args.resolution), "--train_batch_size", str(args.batch),
            "--learning_rate", str(lr), "--lr_warmup_steps", str(args.warmup), "--max_train_steps", str(steps),
            "--checkpointing_steps", str(steps), "--validation_steps", "0", "--seed", "0", "--report_to", "none",
            "--keep_duplicates", *method]


def method_lr(name: str, args) -> float:
    """The learning rate of a method: ``--lr`` unless ``--lora_lr``/``--xs_lr`` set its kind's."""
    own = args.lora_lr if "LoRA" in name else args.xs_lr if "XS" in name else None
    return own if own is not None else args.lr


def held_out_rows(manifest: str, count: int) -> list[dict]:
    """The first ``count`` ok rows of the fresh outlines' manifest."""
    from train.data import load_rows

    rows, _ = load_rows(manifest, ["canny"], 0, keep_duplicates=True)
    return list(rows)[:count]


def score(arm: Arm, rows: list[dict]) -> dict[str, float]:
    """Circle IoU and colour accuracy (and edge F1) of the arm's samples on ``rows``' outlines, drawn by the
    trainer's validation sampler with the run's seed (the same noise for every method)."""
    from train import metrics
    from train.validation import make_sampler, paired, stored_maps, validation_inputs

    run, config = arm.run, arm.run.config
    inputs = validation_inputs(rows, config.condition, (), (), config.resolution)
    samples = make_sampler(run.base, arm.module, None, run.weight_dtype)(inputs, 1, run.seed, None)
    images, maps, captions = paired(inputs, samples, stored_maps(config, rows, "canny"))
    arm.module.train()
    return metrics.metrics_for("canny", images, maps, captions, task="circle",
                               annotator=metrics.load_annotator("canny", {}))


def disk_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def export_sizes(arm: Arm, folder: Path) -> dict[str, int]:
    """Export the arm as the trainer does (train/export.py: the merged ControlNet and, for LoRA, the adapter alone
    and the Control-LoRA file; for XS the adapter) and return each written file's (or folder's) bytes."""
    from train.export import export

    run = arm.run
    shipped = run.base.family.exported(arm.module)
    card = {"base_model": run.config.pretrained_model_name_or_path, "manifest": run.config.manifest,
            "controlnet_class": type(shipped).__name__, "pipeline_class": run.base.family.card_pipeline_class(run.base),
            **run.base.family.card_extra(run.base), "manifest_fingerprint": "bench", "provenance": [],
            "conditions": list(run.config.condition), "figures": {}, "args": run.config.to_dict()}
    written = export(shipped, str(folder), card)
    return {label: disk_bytes(Path(path)) for label, path in written.items() if label != "card"}


class Race:
    """The arms take turns of ``segment`` seconds of their own clocks, the reference first in every round; each is
    scored at ``steps`` steps and when its clock reaches the reference's time for those steps (``wall``, known
    once the reference gets there). An arm may pass ``wall`` before it is known by at most one step."""

    def __init__(self, arms: dict[str, Arm], steps: int, segment: float, mark: Callable[[str, Arm, str], None]):
        self.arms, self.steps, self.segment, self.mark = arms, steps, segment, mark
        self.wall: float | None = None
        self.round_end = 0.0
        """Every arm's clock target in this round: ``segment`` more per round."""
        self.marked: dict[str, set[str]] = {name: set() for name in arms}

    def finished(self, arm: Arm) -> bool:
        return arm.steps >= self.steps and self.wall is not None and arm.seconds >= self.wall

    def turn(self, name: str, arm: Arm) -> None:
        """``arm``'s clock up to the round's end (a shared deadline, so a step's overshoot never accumulates),
        pausing at its marks to score it."""
        self.check_marks(name, arm)  # the reference's time may have become known since its last turn
        while arm.seconds < self.round_end and not self.finished(arm):
            stop = min(self.round_end, self.wall) if self.wall is not None and arm.seconds < self.wall \
                else self.round_end
            arm.advance(stop - arm.seconds, until_step=self.steps if arm.steps < self.steps else None)
            self.check_marks(name, arm)

    def check_marks(self, name: str, arm: Arm) -> None:
        if arm.steps >= self.steps and "equal steps" not in self.marked[name]:
            if self.wall is None and name == REFERENCE:
                self.wall = arm.seconds
            self.marked[name].add("equal steps")
            self.mark(name, arm, "equal steps")
        if self.wall is not None and arm.seconds >= self.wall and "equal time" not in self.marked[name]:
            self.marked[name].add("equal time")
            self.mark(name, arm, "equal time")

    def run(self) -> None:
        while not all(self.finished(arm) for arm in self.arms.values()):
            behind = min(arm.seconds for arm in self.arms.values() if not self.finished(arm))
            self.round_end = max(self.round_end, behind) + self.segment  # no empty rounds
            for name, arm in self.arms.items():
                if not self.finished(arm):
                    self.turn(name, arm)
            print(" | ".join(f"{n} {a.steps} steps {a.seconds / 60:.1f} min" for n, a in self.arms.items()),
                  flush=True)


def compare(base: str, manifest: str, fresh: str, work: Path, methods: dict[str, list[str]], args,
            result: dict[str, Any], save: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Every method on the fill task: memory in fresh processes, then the race; the figures go into ``result``
    as they come in (``save`` writes them)."""
    rows = held_out_rows(fresh, args.held_out)
    result["layers_per_block"] = json.loads((Path(base) / "unet" / "config.json").read_text())["layers_per_block"]
    result["methods"] = {name: {"lr": method_lr(name, args)} for name in methods}
    for name, flags in methods.items():
        out = work / slug(name)
        if args.calibration_steps:
            result["methods"][name]["memory"] = peak_memory(train_flags(
                base, manifest, out / "calibrate", flags, method_lr(name, args), args.calibration_steps, args))
            save()
    arms = {name: Arm(train_flags(base, manifest, work / slug(name), flags, method_lr(name, args), FOREVER, args),
                      work / slug(name)) for name, flags in methods.items()}
    for name, arm in arms.items():
        result["methods"][name]["trained"] = trained_count(arm.module)
    result["base_alone"] = score(arms[REFERENCE], rows)  # before any step: every method is still the base
    save()

    def mark(name: str, arm: Arm, label: str) -> None:
        figures = {"steps": arm.steps, "seconds": arm.seconds, "step_s": arm.seconds / arm.steps, **score(arm, rows)}
        if label == "equal steps":
            result["methods"][name]["files"] = export_sizes(arm, work / slug(name) / "export")
        result["methods"][name][label] = figures
        print(f"{name} at {label}: {arm.steps} steps, {arm.seconds:.0f} s, IoU {figures['circle_iou']:.3f}, "
              f"colour {figures['colour_accuracy']:.3f}", flush=True)
        save()

    race = Race(arms, args.steps, args.segment_seconds, mark)
    race.run()
    result["wall_s"] = race.wall
    return result


def slug(name: str) -> str:
    return name.lower().replace(" ", "_").replace("-", "_").replace(".", "")


def growth_ratio(memory: dict, ref: dict) -> float:
    """A method's peak memory growth over the full ControlNet's (nan when not measured)."""
    if "growth_mb" not in memory or "growth_mb" not in ref.get("memory", {}):
        return math.nan
    return memory["growth_mb"] / ref["memory"]["growth_mb"]


EXPORT_COLUMNS = {"diffusers": "folder", "single_file": "single", "adapter": "adapter", "control_lora": "C-LoRA"}
"""train/export.py's written files -> column: the ``controlnet/`` folder (fp32; an XS run's is the adapter), the
single file (fp16), a LoRA run's adapter alone (peft, fp32) and its Control-LoRA file (fp16)."""


def print_fill(fill: dict[str, Any], args) -> None:
    methods = fill["methods"]
    ref = methods[REFERENCE]
    ref_step, ref_ship = ref["equal steps"]["step_s"], min(ref["files"].values())
    print(f"\nfill task: tiny SD base ({fill['layers_per_block']} layers per UNet block) on the CPU, {args.count} "
          f"circles, resolution {args.resolution}, batch {args.batch}; scored on {args.held_out} fresh outlines; "
          f"equal steps {args.steps}, equal time {fill['wall_s']:.0f} s (the full ControlNet's time for them); "
          "ratios against the full ControlNet; export sizes in MB")
    print(f"{'method':20}{'lr':>6}{'trained':>10}{'ratio':>6}"
          + "".join(f"{c:>8}" for c in EXPORT_COLUMNS.values())
          + f"{'ratio':>6}{'peak MB':>8}{'growth':>7}{'ratio':>6}{'s/step':>7}{'ratio':>6}{'IoU@steps':>10}{'colour':>7}"
          f"{'steps@time':>11}{'IoU@time':>9}{'colour':>7}")
    base = fill["base_alone"]
    print(f"{'base alone':20}{'':>6}{'':>10}{'':>6}{'':>32}{'':>6}{'':>8}{'':>7}{'':>6}{'':>7}{'':>6}"
          f"{base['circle_iou']:10.3f}{base['colour_accuracy']:7.3f}")
    for name, m in methods.items():
        steps, timed, memory = m["equal steps"], m["equal time"], m.get("memory", {})
        files = "".join(f"{m['files'][k] / MB:8.2f}" if k in m["files"] else f"{'-':>8}" for k in EXPORT_COLUMNS)
        print(f"{name:20}{m['lr']:6.0e}{m['trained']:10,}{m['trained'] / ref['trained']:6.3f}{files}"
              f"{min(m['files'].values()) / ref_ship:6.3f}{memory.get('peak_mb', math.nan):8.0f}"
              f"{memory.get('growth_mb', math.nan):7.0f}{growth_ratio(memory, ref):6.2f}{steps['step_s']:7.3f}{steps['step_s'] / ref_step:6.2f}"
              f"{steps['circle_iou']:10.3f}{steps['colour_accuracy']:7.3f}{timed['steps']:11d}"
              f"{timed['circle_iou']:9.3f}{timed['colour_accuracy']:7.3f}")


# ------------------------------------------------------------------------------------------ outputs

def plot(figures: dict[str, Any], path: Path) -> Path:
    """Bars: circle IoU at equal steps and equal time (fill task), export size of the real sizes (log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fill = figures.get("fill", {}).get("methods", {})
    done = {n: m for n, m in fill.items() if "equal steps" in m and "equal time" in m}
    panels = 1 + bool(done)
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 5), squeeze=False)
    if done:
        ax, names = axes[0][0], list(done)
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [done[n]["equal steps"]["circle_iou"] for n in names], 0.4, label="equal steps")
        ax.bar([i + 0.2 for i in x], [done[n]["equal time"]["circle_iou"] for n in names], 0.4, label="equal time")
        if "base_alone" in figures["fill"]:
            ax.axhline(figures["fill"]["base_alone"]["circle_iou"], color="grey", ls="--", label="base alone")
        ax.set_xticks(list(x), names, rotation=30, ha="right")
        ax.set_ylabel("circle IoU (fresh outlines)")
        ax.set_title("fill task, tiny CPU base")
        ax.legend()
    ax, rows = axes[0][-1], figures.get("real_sizes", [])
    ax.barh([f"{r['family']}: {r['method']}" for r in rows], [r["smallest_file"] / MB for r in rows])
    ax.set_xscale("log")
    ax.set_xlabel("smallest export file, MB (log)")
    ax.set_title("real sizes")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    floats = lambda s: [float(v) for v in s.split(",") if v]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes_only", action="store_true", help="only the real-size table (meta device, seconds)")
    p.add_argument("--base", default=str(ROOT / "models" / "tiny-circles-2l"),
                   help="the 2-layer tiny base folder: used if there, else built there first (20-30 min)")
    p.add_argument("--ranks", type=ints, default=[2, 8, 32],
                   help="ControlNet-LoRA ranks on the tiny base (comma-separated; 2, 8, 32 train 0.08, 0.21, 0.70 of "
                        "its ControlNet's parameters)")
    p.add_argument("--real_ranks", type=ints, default=[4, 16, 64], help="ControlNet-LoRA ranks at real sizes")
    p.add_argument("--xs_ratios", type=floats, default=None,
                   help="ControlNet-XS size ratios on the tiny base (default: the smallest it allows, and 0.5; '': none)")
    p.add_argument("--real_xs_ratio", type=float, default=0.1, help="XS ratio at real sizes (the published 0.1)")
    p.add_argument("--concat_rank", type=int, default=0, help="channel-concat LoRA rank (0: the trainer's default)")
    p.add_argument("--steps", type=int, default=800, help="equal steps (the demo's 800)")
    p.add_argument("--count", type=int, default=800, help="training circles (the demo's 800)")
    p.add_argument("--held_out", type=int, default=64, help="fresh circle outlines to score on")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="the full ControlNet's learning rate (the demo's)")
    p.add_argument("--lora_lr", type=float, default=3e-3,
                   help="ControlNet-LoRA's (3e-3: better than 1e-3 for it on the fill task, worse for the full "
                        "ControlNet; README's lighter-control section has the check)")
    p.add_argument("--xs_lr", type=float, default=3e-3, help="ControlNet-XS's (as LoRA's: a small network trained "
                                                            "from zero outputs)")
    p.add_argument("--warmup", type=int, default=50, help="warm-up steps (the demo's 50)")
    p.add_argument("--segment_seconds", type=float, default=30.0, help="each arm's turn before the next's")
    p.add_argument("--calibration_steps", type=int, default=4, help="steps of each memory measurement (0: none)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the arms (one beats two fighting ones "
                                                          "on a shared machine)")
    p.add_argument("--base_threads", type=int, default=1, help="torch threads building the base (the recipe's 1)")
    p.add_argument("--out", default=str(ROOT / "runs" / "control_methods"), help="runs, figures, JSON, PNG")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {"args": vars(args)}

    def save() -> None:
        (work / "control_methods.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")

    figures["real_sizes"] = real_sizes(args.real_ranks, args.real_xs_ratio, args.concat_rank)
    print_real(figures["real_sizes"])
    save()
    if not args.sizes_only:
        figures["base"] = ensure_base(Path(args.base), args.base_threads)
        torch.set_num_threads(args.threads)
        print(f"base: {figures['base']}", flush=True)
        save()
        ratios = sorted({smallest_xs_ratio(args.base), 0.5}) if args.xs_ratios is None else args.xs_ratios
        manifest = annotate(work, "circles", args.count, seed=0)
        fresh = annotate(work, "fresh", args.held_out, seed=12345)  # outlines no run trained on, ids of their own
        figures["fill"] = {}
        compare(args.base, manifest, fresh, work, fill_methods(args.ranks, ratios), args, figures["fill"], save)
        save()
        print_real(figures["real_sizes"])
        print_fill(figures["fill"], args)
        print("channel-concat control needs a Flux base: the fill task has none, so it is in the real-size table only")
    print(f"figures: {work / 'control_methods.json'}, chart: {plot(figures, work / 'control_methods.png')}")
    return figures


if __name__ == "__main__":
    main()

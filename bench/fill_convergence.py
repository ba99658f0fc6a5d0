"""The fill task's convergence curve: circle IoU and colour accuracy against ControlNet training steps.

    python bench/fill_convergence.py [--steps 3000] [--every 250] [--count 2000] [--batch 16] [--lr 1e-3]

Raw circles -> Canny manifest (local Ray) -> a ControlNet on the shipped tiny base
(models/tiny-circles), validated on held-out circles every ``--every`` steps; then the final
ControlNet and the base alone are evaluated on the same rows with the same seeds. Prints the curve,
the base alone's figures and the ratio, and writes the curve as a PNG (about 20 minutes on 2 cores
with the defaults). Target from the issue: IoU >= 0.8 with colour accuracy at the base's level.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import os
import tempfile
import time

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "models" / "tiny-circles"


def make_manifest(work: Path, count: int) -> str:
    from pipeline import ray_runtime
    from pipeline.annotate import run
    from pipeline.config import AnnotateConfig
    from demo.circles import write_circles

    write_circles(work / "circles", count, size=64, seed=0)
    run(AnnotateConfig(input=str(work / "circles"), output=str(work / "manifest"), resolution=64, shard_size=500))
    ray_runtime.shutdown()
    return str(work / "manifest")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--every", type=int, default=250, help="validate (and score) every N steps")
    p.add_argument("--count", type=int, default=2000, help="circle images to annotate")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr_scheduler", default="constant", help="the trainer's --lr_scheduler (cosine decays to 0)")
    p.add_argument("--held_out", type=int, default=32)
    p.add_argument("--out", default=None, help="where to keep the run (default: a temp folder)")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread beats two fighting ones
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    work = Path(args.out or tempfile.mkdtemp(prefix="fill"))
    manifest = make_manifest(work, args.count)
    run = work / "run"
    from train.train import main as train_main

    start = time.perf_counter()
    train_main(["--manifest", manifest, "--condition", "canny", "--pretrained_model_name_or_path", str(BASE),
                "--output_dir", str(run), "--resolution", "32", "--train_batch_size", str(args.batch),
                "--learning_rate", str(args.lr), "--lr_scheduler", args.lr_scheduler, "--lr_warmup_steps", "50", "--max_train_steps", str(args.steps),
                "--checkpointing_steps", str(args.steps), "--validation_steps", str(args.every),
                "--validation_task", "circle", "--num_validation_rows", str(args.held_out),
                "--num_validation_images", "1", "--seed", "0", "--report_to", "none"])
    train_s = time.perf_counter() - start
    from train.evaluate import main as evaluate_main

    evaluate_main(["--controlnet", str(run), "--pretrained_model_name_or_path", str(BASE), "--manifest", manifest,
                   "--condition", "canny", "--task", "circle", "--num_samples", str(args.held_out),
                   "--resolution", "32", "--output_dir", str(run / "eval")])
    from demo.report import plot_curve, read_curve

    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    curve = [c for c in read_curve(run) if isinstance(c["step"], int)]
    base = metrics["base"]
    print(f"\nfill task, tiny base, {args.count} circles, batch {args.batch}, lr {args.lr} ({args.lr_scheduler}), "
          f"{args.held_out} held-out rows; training {train_s / 60:.1f} min")
    print(f"{'step':>6}{'circle IoU':>12}{'colour acc':>12}{'edge F1':>10}")
    for c in curve:
        print(f"{c['step']:6d}{c['circle_iou']:12.3f}{c['colour_accuracy']:12.3f}{c['edge_f1']:10.3f}")
    print(f"{'base':>6}{base['circle_iou']:12.3f}{base['colour_accuracy']:12.3f}{base['edge_f1']:10.3f}   (alone)")
    final = metrics["controlnet"]
    print(f"final ControlNet: IoU {final['circle_iou']:.3f}, colour accuracy {final['colour_accuracy']:.3f}; "
          f"IoU ratio against the base alone {final['circle_iou'] / max(base['circle_iou'], 1e-9):.2f}x; "
          f"target IoU >= 0.8: {'met' if final['circle_iou'] >= 0.8 else 'not met'}")
    chart = plot_curve(read_curve(run), base, work / "fill_convergence.png")
    print(f"curve: {chart}")


if __name__ == "__main__":
    main()

"""Reward fine-tuning (ControlNet++-style) against plain training, on the fill task, in equal extra wall time.

    python bench/reward_finetune.py --start runs/demo --minutes 2     # short check
    python bench/reward_finetune.py --minutes 20                      # the issue's figure (trains a start first)

From one starting ControlNet (``--start``: a run folder such as ``make demo``'s runs/demo, or none: one is
trained first with the demo's recipe), two arms train on for the same extra wall time: (a) plain training,
(b) the same plus ``--reward_weight`` with the fill task's circle distance. Each arm's step count comes from
a short calibration of both (which also gives the cost per step: time, and peak memory of the process). The
start and both arms are then evaluated on fresh circle outlines no run saw (circle IoU, colour accuracy);
printed: the figures, each arm's gain and the reward arm's IoU ratio over the plain arm's.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import os
import subprocess
import tempfile
import time

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "models" / "tiny-circles"
DEMO_RECIPE = ["--resolution", "32", "--train_batch_size", "16", "--learning_rate", "1e-3", "--lr_warmup_steps", "50",
               "--max_train_steps", "800"]
"""The Makefile's ``demo`` training (less its validation flags): how a start is trained without ``--start``."""

CALIBRATE = """
import json, resource, sys
from train.train import main
assert main(json.loads(sys.argv[1])) == 0
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def annotate(work: Path, name: str, count: int, seed: int) -> str:
    """``count`` 64 px circles drawn with ``seed``, annotated with Canny into a manifest (local Ray)."""
    from pipeline import ray_runtime
    from pipeline.annotate import run
    from pipeline.config import AnnotateConfig
    from demo.circles import write_circles

    write_circles(work / name, count, size=64, seed=seed)
    run(AnnotateConfig(input=str(work / name), output=str(work / f"{name}_manifest"), resolution=64, shard_size=500))
    ray_runtime.shutdown()
    return str(work / f"{name}_manifest")


def train_args(manifest: str, out: Path, start: str | None, steps: int, args, reward: bool) -> list[str]:
    """One arm's trainer flags: continue ``start`` for ``steps`` steps, with or without the reward."""
    flags = ["--manifest", manifest, "--condition", "canny", "--pretrained_model_name_or_path", str(BASE),
             "--output_dir", str(out), "--resolution", "32", "--train_batch_size", str(args.batch),
             "--learning_rate", str(args.lr), "--lr_warmup_steps", "0", "--max_train_steps", str(steps),
             "--checkpointing_steps", str(steps), "--validation_steps", "0", "--seed", "1", "--report_to", "none",
             "--keep_duplicates", "--controlnet_model_name_or_path", start]
    if reward:
        flags += ["--reward_weight", str(args.reward_weight), "--reward_max_timestep", str(args.reward_max_timestep),
                  "--reward_distance", "canny=circle"]
    return flags


def calibrate(manifest: str, work: Path, start: str, args, reward: bool) -> dict[str, float]:
    """Seconds per optimiser step (after the warm-up step) and the process's peak memory, in a fresh process."""
    out = work / f"calibrate_{'reward' if reward else 'plain'}"
    flags = train_args(manifest, out, start, args.calibration_steps, args, reward)
    done = subprocess.run([sys.executable, "-c", CALIBRATE, json.dumps(flags)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    figures = json.loads((out / "train_summary.json").read_text())["figures"]
    rss = next(int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("MAXRSS_KB"))
    return {"s_per_step": args.batch / figures["samples_per_s"], "peak_mb": rss / 1024}


def train_arm(manifest: str, out: Path, start: str, steps: int, args, reward: bool) -> float:
    """Train one arm in this process; returns its wall seconds."""
    from train.train import main

    began = time.perf_counter()
    if main(train_args(manifest, out, start, steps, args, reward)) != 0:
        raise SystemExit(f"training {out} failed")
    return time.perf_counter() - began


def evaluate(controlnet: str, manifest: str, out: Path, samples: int) -> dict[str, float]:
    """Circle IoU and colour accuracy of ``controlnet`` (and the base alone) on ``manifest``'s first rows."""
    from train.evaluate import main

    main(["--controlnet", controlnet, "--pretrained_model_name_or_path", str(BASE), "--manifest", manifest,
          "--condition", "canny", "--task", "circle", "--num_samples", str(samples), "--resolution", "32",
          "--output_dir", str(out), "--keep_duplicates", "--overwrite"])
    return json.loads((out / "metrics.json").read_text())


def start_controlnet(args, work: Path, manifest: str) -> str:
    """The starting ControlNet folder: ``--start``'s, else one trained now with the demo's recipe."""
    if args.start:
        folder = Path(args.start)
        return str(folder / "controlnet" if (folder / "controlnet").is_dir() else folder)
    from train.train import main

    out = work / "start"
    flags = ["--manifest", manifest, "--condition", "canny", "--pretrained_model_name_or_path", str(BASE),
             "--output_dir", str(out), *DEMO_RECIPE, "--checkpointing_steps", "800", "--validation_steps", "0",
             "--seed", "0", "--report_to", "none", "--keep_duplicates"]
    if main(flags) != 0:
        raise SystemExit("training the starting ControlNet failed")
    return str(out / "controlnet")


def canny_agreement(circles: Path) -> str:
    """F1 (1 and 2 px tolerance) of the soft Canny stand-in, thresholded at 0.5, against cv2.Canny(100, 200):
    on scikit-image's photos and on the circles in ``circles``."""
    import cv2
    import numpy as np
    import torch
    from PIL import Image
    from skimage import data

    from train.metrics import edge_f1
    from train.reward import SoftCanny

    def f1(image: np.ndarray, tolerance: int) -> float:
        soft = SoftCanny()(torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255)[0, 0].numpy()
        return edge_f1(cv2.Canny(image, 100, 200), (soft > 0.5).astype(np.uint8) * 255, tolerance=tolerance)

    sets = {"photos": [getattr(data, n)() for n in ("astronaut", "chelsea", "coffee", "rocket")],
            "circles": [np.asarray(Image.open(p).convert("RGB")) for p in sorted(circles.glob("*.png"))]}
    return "; ".join(f"{name} F1 {np.mean([f1(i, 1) for i in images]):.3f} (1 px), "
                     f"{np.mean([f1(i, 2) for i in images]):.3f} (2 px)" for name, images in sets.items())


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=20.0, help="extra training wall time of each arm")
    p.add_argument("--start", default=None, help="run (or controlnet) folder to start from; default: train one")
    p.add_argument("--count", type=int, default=800, help="training circles (the demo's 800)")
    p.add_argument("--held_out", type=int, default=64, help="fresh circle outlines to evaluate on")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--reward_weight", type=float, default=1.0)
    p.add_argument("--reward_max_timestep", type=int, default=200)
    p.add_argument("--calibration_steps", type=int, default=8)
    p.add_argument("--out", default=None, help="where to keep the runs (default: a temp folder)")
    return p.parse_args()


def report(before: dict, arms: dict[str, dict], costs: dict[str, dict], args) -> None:
    plain, reward = costs["plain"], costs["reward"]
    print(f"\nreward fine-tuning on the fill task: {args.minutes:g} extra minutes per arm, batch {args.batch}, "
          f"lr {args.lr}, reward weight {args.reward_weight}, t <= {args.reward_max_timestep}, "
          f"{args.held_out} fresh outlines")
    print(f"cost per step: plain {plain['s_per_step']:.3f} s, reward {reward['s_per_step']:.3f} s "
          f"({reward['s_per_step'] / plain['s_per_step']:.2f}x); peak process memory plain {plain['peak_mb']:.0f} MB, "
          f"reward {reward['peak_mb']:.0f} MB ({reward['peak_mb'] / plain['peak_mb']:.2f}x)")
    print(f"{'':16}{'steps':>7}{'minutes':>9}{'circle IoU':>12}{'colour acc':>12}")
    base = before["base"]
    print(f"{'base alone':16}{'':>7}{'':>9}{base['circle_iou']:12.3f}{base['colour_accuracy']:12.3f}")
    print(f"{'start':16}{'':>7}{'':>9}{before['controlnet']['circle_iou']:12.3f}"
          f"{before['controlnet']['colour_accuracy']:12.3f}")
    for name, arm in arms.items():
        m = arm["metrics"]["controlnet"]
        print(f"{name:16}{arm['steps']:7d}{arm['seconds'] / 60:9.1f}{m['circle_iou']:12.3f}"
              f"{m['colour_accuracy']:12.3f}")
    start_iou = before["controlnet"]["circle_iou"]
    a, b = (arms[k]["metrics"]["controlnet"]["circle_iou"] for k in ("(a) plain", "(b) reward"))
    print(f"IoU gain over the start: plain {a - start_iou:+.3f}, reward {b - start_iou:+.3f}; "
          f"reward / plain IoU ratio {b / max(a, 1e-9):.3f}; target IoU >= 0.85: {'met' if b >= 0.85 else 'not met'}")


def main() -> None:
    args = parse()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread beats two fighting ones
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    work = Path(args.out or tempfile.mkdtemp(prefix="reward"))
    manifest = annotate(work, "circles", args.count, seed=0)
    fresh = annotate(work, "fresh", args.held_out, seed=12345)  # outlines no run trained on
    start = start_controlnet(args, work, manifest)
    costs = {name: calibrate(manifest, work, start, args, reward=name == "reward") for name in ("plain", "reward")}
    before = evaluate(start, fresh, work / "eval_start", args.held_out)
    arms = {}
    for name, reward in (("(a) plain", False), ("(b) reward", True)):
        steps = max(1, int(args.minutes * 60 / costs["reward" if reward else "plain"]["s_per_step"]))
        out = work / ("reward" if reward else "plain")
        seconds = train_arm(manifest, out, start, steps, args, reward)
        arms[name] = {"steps": steps, "seconds": seconds,
                      "metrics": evaluate(str(out / "controlnet"), fresh, work / f"eval_{out.name}", args.held_out)}
    report(before, arms, costs, args)
    print(f"soft Canny stand-in vs cv2.Canny: {canny_agreement(work / 'fresh')}")
    (work / "reward_finetune.json").write_text(json.dumps({"before": before, "arms": arms, "costs": costs}, indent=2))
    print(f"runs and figures: {work}")


if __name__ == "__main__":
    main()

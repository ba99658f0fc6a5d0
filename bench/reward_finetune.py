"""Reward fine-tuning (ControlNet++-style) against plain training, on the fill task, in equal extra wall time.

    python bench/reward_finetune.py --start runs/demo --minutes 3     # short check
    python bench/reward_finetune.py --start runs/demo --minutes 20    # the issue's figure
    python bench/reward_finetune.py --minutes 20                      # trains a start first (the demo's recipe)

From one starting ControlNet (``--start``: a run folder such as ``make demo``'s runs/demo, or none: one is
trained first with the demo's recipe), two arms train on in this one process for the same extra wall time:
(a) plain training, (b) the same flags plus ``--reward_weight`` (the fill task's circle distance by default).
The arms alternate in segments of ``--segment_seconds`` (a, b, a, b, ...) until each has trained ``--minutes``,
so a slow or fast spell of a shared machine falls on both; each arm's clock counts its own steps only (data
loading included). Each arm's ControlNet is also saved as its clock passes each of ``--eval_at``'s minutes, and
every snapshot is evaluated after training (the IoU curves, printed and drawn in reward_curve.png). Both see the same batches, noise and timesteps step for step (same seed). The start and
both arms are then evaluated on fresh circle outlines no run saw (circle IoU, colour accuracy). Printed: the
cost per step (time from the arms themselves; peak memory from a few calibration steps of each in a fresh
process), the figures, each arm's gain, the reward arm's IoU ratio over the plain arm's and the verdict
against the issue's target (reward above plain, IoU >= 0.85, colour accuracy kept).
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

from bench.arms import FOREVER, ROOT, Arm, alternate, annotate, peak_memory

BASE = ROOT / "models" / "tiny-circles"
DEMO_RECIPE = ["--resolution", "32", "--train_batch_size", "16", "--learning_rate", "1e-3", "--lr_warmup_steps", "50",
               "--max_train_steps", "800"]
"""The Makefile's ``demo`` training (less its validation flags): how a start is trained without ``--start``."""

def train_args(manifest: str, out: Path, start: str | None, steps: int, args, reward: bool) -> list[str]:
    """One arm's trainer flags: continue ``start`` for ``steps`` steps, with or without the reward."""
    flags = ["--manifest", manifest, "--condition", "canny", "--pretrained_model_name_or_path", str(BASE),
             "--output_dir", str(out), "--resolution", "32", "--train_batch_size", str(args.batch),
             "--learning_rate", str(args.lr), "--lr_warmup_steps", "0", "--max_train_steps", str(steps),
             "--checkpointing_steps", str(steps), "--validation_steps", "0", "--seed", "1", "--report_to", "none",
             "--keep_duplicates", "--controlnet_model_name_or_path", start]
    if reward:
        flags += ["--reward_weight", str(args.reward_weight), "--reward_max_timestep", str(args.reward_max_timestep),
                  "--reward_distance", f"canny={args.reward_distance}"]
    return flags


def calibrate(manifest: str, work: Path, start: str, args, reward: bool) -> float:
    """Peak memory (MB) of a fresh process training a few steps of one arm."""
    out = work / f"calibrate_{'reward' if reward else 'plain'}"
    return peak_memory(train_args(manifest, out, start, args.calibration_steps, args, reward))["peak_mb"]


def train_arms(manifest: str, work: Path, start: str, args) -> dict[str, Arm]:
    """Both arms, alternating segments until each has trained ``--minutes``; each arm's ControlNet is saved as
    its clock passes each of ``--eval_at``'s minutes (``arm.snapshots``; evaluated after training, off the clock)."""
    arms = {"(a) plain": Arm(train_args(manifest, work / "plain", start, FOREVER, args, False), work / "plain"),
            "(b) reward": Arm(train_args(manifest, work / "reward", start, FOREVER, args, True), work / "reward")}
    for arm in arms.values():
        arm.snapshots = {}

    def snapshot(name: str, arm: Arm, mark: float) -> None:
        arm.snapshots[mark] = {"steps": arm.steps, "seconds": arm.seconds,
                               "controlnet": arm.export(f"at_{mark / 60:g}min")}

    alternate(arms, args.minutes * 60, args.segment_seconds, [m * 60 for m in eval_marks(args)], snapshot)
    return arms


def eval_marks(args) -> list[float]:
    """The minutes each arm is evaluated at: ``--eval_at``'s within ``--minutes``, and ``--minutes`` itself."""
    marks = {float(m) for m in args.eval_at.split(",") if m.strip() and 0 < float(m) < args.minutes}
    return sorted(marks | {float(args.minutes)})


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
    p.add_argument("--lr", type=float, default=1e-3, help="both arms' learning rate (the demo's)")
    p.add_argument("--reward_weight", type=float, default=1.0)
    p.add_argument("--reward_max_timestep", type=int, default=200)
    p.add_argument("--reward_distance", default="circle", help="the Canny reward's distance: circle, soft_f1, bce")
    p.add_argument("--segment_seconds", type=float, default=30.0, help="each arm's turn before the other's")
    p.add_argument("--eval_at", default="2.5,5,10",
                   help="also evaluate both arms after these minutes of their training (comma-separated)")
    p.add_argument("--calibration_steps", type=int, default=4, help="steps of each arm's memory measurement")
    p.add_argument("--out", default=None, help="where to keep the runs (default: a temp folder)")
    return p.parse_args()


def report(before: dict, arms: dict[str, dict], memory: dict[str, float], args) -> None:
    plain, reward = (arms[k]["seconds"] / arms[k]["steps"] for k in ("(a) plain", "(b) reward"))
    print(f"\nreward fine-tuning on the fill task: {args.minutes:g} extra minutes per arm (alternating "
          f"{args.segment_seconds:g} s turns), batch {args.batch}, lr {args.lr}, reward weight {args.reward_weight}, "
          f"t <= {args.reward_max_timestep}, distance {args.reward_distance}, {args.held_out} fresh outlines")
    print(f"cost per step: plain {plain:.3f} s, reward {reward:.3f} s ({reward / plain:.2f}x); peak process memory "
          f"plain {memory['plain']:.0f} MB, reward {memory['reward']:.0f} MB ({memory['reward'] / memory['plain']:.2f}x)")
    print(f"{'':16}{'steps':>7}{'minutes':>9}{'circle IoU':>12}{'colour acc':>12}")
    base = before["base"]
    print(f"{'base alone':16}{'':>7}{'':>9}{base['circle_iou']:12.3f}{base['colour_accuracy']:12.3f}")
    print(f"{'start':16}{'':>7}{'':>9}{before['controlnet']['circle_iou']:12.3f}"
          f"{before['controlnet']['colour_accuracy']:12.3f}")
    for name, arm in arms.items():
        m = arm["metrics"]["controlnet"]
        print(f"{name:16}{arm['steps']:7d}{arm['seconds'] / 60:9.1f}{m['circle_iou']:12.3f}"
              f"{m['colour_accuracy']:12.3f}")
    print(curve(before, arms))
    print(verdict(before, arms))


def curve(before: dict, arms: dict[str, dict]) -> str:
    """Circle IoU of both arms at each evaluated minute (the start at 0), with their steps."""
    rows = [f"{'minutes':>8}" + "".join(f"{name + ' IoU (steps)':>24}" for name in arms)]
    rows.append(f"{0:8g}" + "".join(f"{before['controlnet']['circle_iou']:>16.3f} {'(0)':>7}" for _ in arms))
    marks = sorted({m for arm in arms.values() for m in arm["curve"]}, key=float)
    for mark in marks:
        cells = [arm["curve"].get(mark) for arm in arms.values()]
        rows.append(f"{float(mark) / 60:8g}" + "".join(
            f"{c['metrics']['controlnet']['circle_iou']:>16.3f} {'(' + str(c['steps']) + ')':>7}" if c else f"{'':>24}"
            for c in cells))
    return "\n".join(rows)


def plot_curve(before: dict, arms: dict[str, dict], path: Path) -> None:
    """The IoU curves as a PNG: minutes of each arm's own training against circle IoU on the fresh outlines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for name, arm in arms.items():
        marks = sorted(arm["curve"], key=float)
        ax.plot([0] + [float(m) / 60 for m in marks], [before["controlnet"]["circle_iou"]]
                + [arm["curve"][m]["metrics"]["controlnet"]["circle_iou"] for m in marks], marker="o", label=name)
    ax.axhline(0.85, color="grey", linestyle=":", label="target 0.85")
    ax.set_xlabel("extra training (minutes of each arm)")
    ax.set_ylabel("circle IoU, fresh outlines")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def verdict(before: dict, arms: dict[str, dict]) -> str:
    """Each arm's gain, the IoU ratio and the issue's target: reward above plain, IoU >= 0.85, colour kept."""
    start = before["controlnet"]
    a, b = (arms[k]["metrics"]["controlnet"] for k in ("(a) plain", "(b) reward"))
    checks = {"reward beats plain": b["circle_iou"] > a["circle_iou"], "IoU >= 0.85": b["circle_iou"] >= 0.85,
              "colour kept": b["colour_accuracy"] >= min(start["colour_accuracy"], a["colour_accuracy"]) - 0.01}
    return (f"IoU gain over the start: plain {a['circle_iou'] - start['circle_iou']:+.3f}, reward "
            f"{b['circle_iou'] - start['circle_iou']:+.3f}; reward / plain IoU ratio "
            f"{b['circle_iou'] / max(a['circle_iou'], 1e-9):.3f}; target: "
            + ", ".join(f"{k} {'yes' if ok else 'NO'}" for k, ok in checks.items())
            + f" -> {'met' if all(checks.values()) else 'not met'}")


def main() -> None:
    args = parse()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread beats two fighting ones
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    work = Path(args.out or tempfile.mkdtemp(prefix="reward"))
    manifest = annotate(work, "circles", args.count, seed=0)
    fresh = annotate(work, "fresh", args.held_out, seed=12345)  # outlines no run trained on
    start = start_controlnet(args, work, manifest)
    memory = {name: calibrate(manifest, work, start, args, reward=name == "reward") for name in ("plain", "reward")}
    before = evaluate(start, fresh, work / "eval_start", args.held_out)
    arms = {name: {"steps": arm.steps, "seconds": arm.seconds,
                   "curve": {str(mark): {**snap, "metrics": evaluate(snap["controlnet"], fresh, work /
                                                                      f"eval_{arm.out.name}_{mark / 60:g}min",
                                                                      args.held_out)}
                             for mark, snap in arm.snapshots.items()}}
            for name, arm in train_arms(manifest, work, start, args).items()}
    for arm in arms.values():
        arm["metrics"] = arm["curve"][max(arm["curve"], key=float)]["metrics"]  # at --minutes
    report(before, arms, memory, args)
    plot_curve(before, arms, work / "reward_curve.png")
    print(f"soft Canny stand-in vs cv2.Canny: {canny_agreement(work / 'fresh')}")
    (work / "reward_finetune.json").write_text(json.dumps({"before": before, "arms": arms, "memory_mb": memory,
                                                           "args": vars(args)}, indent=2))
    print(f"runs and figures: {work} (IoU curves: {work / 'reward_curve.png'})")


if __name__ == "__main__":
    main()

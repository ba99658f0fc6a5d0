#!/usr/bin/env python
"""A run's report: controllability of the ControlNet against the base alone, and its curve.

    python -m demo.report runs/demo [--eval runs/demo/eval]

Reads ``<eval>/metrics.json`` (train/evaluate.py) and ``<run>/validation/metrics.jsonl`` (the
trainer's validations) and writes ``<run>/metrics_curve.png`` and ``<run>/report.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run by path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
from typing import Any, Sequence


# What each metric measures (train/metrics.py); a stacked run's names carry the condition ("canny/edge_f1").
DEFINITIONS = {
    "circle_iou": "overlap (intersection over union, 0-1) of the circle drawn in the sample with the filled circle "
                  "of the condition's outline: does the circle land where the condition says",
    "colour_accuracy": "share of samples whose circle and background both have the colours the caption names",
    "edge_f1": "F1 (0-1) of the sample's Canny edges against the condition's edges, within 2 px",
    "ssim": "structural similarity (0-1) of the sample's HED map with the condition",
    "depth_rmse": "RMSE of the sample's depth map against the condition's, after a least-squares scale and shift "
                  "(lower is better)",
    "miou": "mean IoU of the sample's segmentation against the condition's classes",
    "pck": "share of the condition's pose keypoints found in the sample within a tolerance",
    "mask_iou": "IoU of the sample's person mask with the condition's",
}


def definition_lines(names: list[str]) -> list[str]:
    """One bullet per metric in the table that has a known definition."""
    return [f"- `{name}`: {DEFINITIONS[name.rsplit('/', 1)[-1]]}" for name in names
            if name.rsplit("/", 1)[-1] in DEFINITIONS]


def saturated_lines(controlnet: dict[str, float], base: dict[str, float], lower: set[str]) -> list[str]:
    """A sentence per metric that both score perfectly on: it shows what the base already knows, not control."""
    best = [name for name, ours in controlnet.items() if name in base and name not in lower
            and round(ours, 3) == round(base[name], 3) == 1.0]
    return [f"`{name}` is {controlnet[name]:.3f} for both: the base alone already gets this right (for the circles, "
            "it already knows the colours the caption asks for), so it measures nothing the ControlNet adds."
            for name in best]


def why_table_and_curve_differ(metrics: dict[str, Any], args: dict[str, Any]) -> str:
    """Why the table (train/evaluate.py at the end) and the curve's last point (the trainer's validation)
    differ, from what each one used."""
    seed = args.get("seed")
    seed = 0 if seed is None else seed
    eval_seed = metrics.get("settings", {}).get("seed", 0)
    rows = args.get("num_validation_rows")
    which = ("the given --validation_image files" if args.get("validation_image") else
             f"the first {rows} ok rows by id (held out from training)")
    return (f"The table comes from `train/evaluate.py` after training: {metrics['num_samples']} rows (the first ok "
            f"rows by id), row i sampled from seed {eval_seed} + i. The curve comes from the trainer's validations: "
            f"{which}, every row sampled from the same seed {seed} (`--seed`). Even on the same rows and weights, "
            "other starting noise draws other samples, so the two means differ by a few hundredths; neither is "
            "the better estimate, and more rows narrow both.")


def read_curve(run: Path) -> list[dict[str, Any]]:
    """The trainer's validation scores, step by step (the final one last)."""
    path = run / "validation" / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curve(curve: list[dict[str, Any]], base: dict[str, float], path: Path) -> Path | None:
    """Each metric against training steps, with the base alone's value as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [c for c in curve if isinstance(c["step"], int)]
    # every metric of every record (a union run's records alternate conditions; unscored ones have none)
    names = list(dict.fromkeys(k for c in steps for k, v in c.items()
                               if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)))
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for k, name in enumerate(names):
        colour = f"C{k}"
        points = [(c["step"], c[name]) for c in steps if name in c]
        ax.plot([x for x, _ in points], [y for _, y in points], "o-", color=colour, label=name)
        if name in base:
            ax.axhline(base[name], color=colour, linestyle="--", linewidth=1, label=f"{name}, base alone")
    ax.set_xlabel("training step")
    ax.set_ylim(0, 1.05)
    ax.set_title("controllability on held-out rows during training")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(run: Path, evaluation: Path) -> Path:
    metrics = json.loads((evaluation / "metrics.json").read_text())
    curve = read_curve(run)
    chart = plot_curve(curve, metrics["base"], run / "metrics_curve.png")
    lower = set(metrics.get("lower_is_better", []))
    rows = ["| metric | ControlNet | base alone | better |", "|---|---|---|---|"]
    for name, ours in metrics["controlnet"].items():
        theirs = metrics["base"].get(name)
        if theirs is None or round(ours, 3) == round(theirs, 3):
            better = "-"
        else:
            better = "ControlNet" if (ours < theirs if name in lower else ours > theirs) else "base"
        rows.append(f"| {name} | {ours:.3f} | {'-' if theirs is None else f'{theirs:.3f}'} | {better} |")
    summary = json.loads((run / "train_summary.json").read_text()) if (run / "train_summary.json").is_file() else {}
    figures = summary.get("figures", {})
    loss = figures.get("final_loss")
    loss_text = f"{loss:.4f}" if isinstance(loss, (int, float)) else "?"
    grid = Path(metrics.get("grid", "grid.png"))
    if not grid.is_absolute() and not grid.exists():  # recorded relative to the evaluation folder
        grid = evaluation / grid
    saturated = saturated_lines(metrics["controlnet"], metrics["base"], lower)
    lines = [
        f"# ControlNet report: {run}",
        "",
        f"{metrics['num_samples']} held-out rows, condition `{metrics['condition']}`"
        + (f", task `{metrics['task']}`" if metrics.get("task") else "")
        + f"; trained {figures.get('global_step', '?')} steps (final loss {loss_text}).",
        "",
        *rows,
        "",
        *definition_lines(list(metrics["controlnet"])),
        "",
        *saturated,
        *([""] if saturated else []),
        *[f"`{condition}`: unscored, {reason}" for condition, reason in metrics.get("unscored", {}).items()],
        *([""] if metrics.get("unscored") else []),
        f"![condition | with ControlNet | base alone]({relative(grid, run)})",
        "",
    ]
    if chart is not None:
        lines += [f"![metrics during training]({relative(chart, run)})", "",
                  why_table_and_curve_differ(metrics, summary.get("args", {})), ""]
    lines += [
        "## Where everything is",
        "",
        f"- ControlNet (diffusers): `{run / 'controlnet'}`; single file: `{run / 'controlnet.safetensors'}`",
        f"- evaluation: `{evaluation / 'metrics.json'}`, grid `{grid}`",
        f"- validation grids and scores: `{run / 'validation'}` (`metrics.jsonl`)",
        f"- TensorBoard: `tensorboard --logdir {run / 'logs'}`",
    ]
    path = run / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def relative(path: Path, start: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(start.resolve()))
    except ValueError:
        return str(path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="the trainer's --output_dir")
    p.add_argument("--eval", default=None, help="train/evaluate.py's --output_dir (default: RUN/eval)")
    args = p.parse_args(argv)
    run = Path(args.run)
    evaluation = Path(args.eval) if args.eval else run / "eval"
    if not (evaluation / "metrics.json").is_file():
        print(f"error: {evaluation / 'metrics.json'} is missing: run train/evaluate.py first", file=sys.stderr)
        return 2
    print(write_report(run, evaluation))
    return 0


if __name__ == "__main__":
    sys.exit(main())

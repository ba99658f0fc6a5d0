#!/usr/bin/env python
"""A run's report: controllability of the ControlNet against the base alone, and its curve.

    python train/report.py runs/demo [--eval runs/demo/eval]

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
    grid = Path(metrics.get("grid", "grid.png"))
    if not grid.is_absolute() and not grid.exists():  # recorded relative to the evaluation folder
        grid = evaluation / grid
    lines = [
        f"# ControlNet report: {run}",
        "",
        f"{metrics['num_samples']} held-out rows, condition `{metrics['condition']}`"
        + (f", task `{metrics['task']}`" if metrics.get("task") else "")
        + f"; trained {figures.get('global_step', '?')} steps (final loss {figures.get('final_loss', '?')}).",
        "",
        *rows,
        "",
        *[f"`{condition}`: unscored, {reason}" for condition, reason in metrics.get("unscored", {}).items()],
        *([""] if metrics.get("unscored") else []),
        f"![condition | with ControlNet | base alone]({relative(grid, run)})",
        "",
    ]
    if chart is not None:
        lines += [f"![metrics during training]({relative(chart, run)})", ""]
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

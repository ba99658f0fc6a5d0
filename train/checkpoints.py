"""Checkpoints that are either complete or invisible, and ``latest`` that finds the newest.

"Newest" is by when a checkpoint was written, not by its step: after resuming from an older
checkpoint, the new run's checkpoints have smaller steps than an abandoned run's, and must win.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

PATTERN = re.compile(r"^checkpoint-(\d+)$")
MARKER = "checkpoint.json"  # written last inside the folder: its presence means complete


def complete_checkpoints(output_dir: str) -> list[Path]:
    """Complete ``checkpoint-<step>`` folders, oldest written first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and PATTERN.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: (written_at(p), int(PATTERN.match(p.name).group(1))))


def written_at(path: Path) -> float:
    """When a complete checkpoint was written (older markers: the marker file's time)."""
    try:
        return float(json.loads((path / MARKER).read_text())["written_at"])
    except (KeyError, ValueError, TypeError):
        return (path / MARKER).stat().st_mtime


def resolve(output_dir: str, wanted: str) -> Path:
    """The checkpoint folder for ``--resume_from_checkpoint`` (a path, a name, or ``latest``)."""
    if wanted == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}")
        return found[-1]
    path = Path(wanted) if os.path.isdir(wanted) else Path(output_dir) / wanted
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {wanted}: {path} is not a complete checkpoint")
    return path


def step_of(path: Path) -> int:
    return int(json.loads((path / MARKER).read_text())["global_step"])


def save(accelerator, output_dir: str, global_step: int, limit: int | None) -> Path:
    """``accelerator.save_state`` into a temporary folder, renamed when complete; then prune."""
    final = Path(output_dir) / f"checkpoint-{global_step}"
    tmp = Path(output_dir) / f".tmp-checkpoint-{global_step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / MARKER).write_text(json.dumps({"global_step": global_step, "written_at": time.time()}))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if limit is not None:  # only now that the new one is complete; by age, and never the new one
            others = [p for p in complete_checkpoints(output_dir) if p != final]  # oldest written first
            for old in others[: max(0, len(others) + 1 - limit)]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final

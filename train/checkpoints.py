"""Checkpoints that are either complete or invisible, and ``latest`` that finds the newest.

A checkpoint is written into ``.tmp-checkpoint-<step>``, flushed to disk, given its marker file
(``checkpoint.json``) last, and only then renamed to ``checkpoint-<step>``. A checkpoint is removed
(pruned, or replaced by a newer one of the same step) by first renaming it to
``.deleting-checkpoint-<step>``, so a crash at any moment leaves every ``checkpoint-<step>`` folder
complete; the ``.tmp-``/``.deleting-`` leftovers of a killed run are removed, with a message, by the
next run that resumes or saves in the folder.

"Newest" is by when a checkpoint was written, not by its step: after resuming from an older
checkpoint, the new run's checkpoints have smaller steps than an abandoned run's, and must win.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

PATTERN = re.compile(r"^checkpoint-(\d+)$")
MARKER = "checkpoint.json"  # written last inside the folder: its presence means complete
TMP_PREFIX = ".tmp-checkpoint-"  # being written; renamed to checkpoint-<step> once complete
DELETING_PREFIX = ".deleting-checkpoint-"  # taken out of sight, being deleted

log = logging.getLogger("train")


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


def resolve(output_dir: str, wanted: str) -> Path | None:
    """The checkpoint folder for ``--resume_from_checkpoint`` (a path, a name, or ``latest``).

    ``latest`` with no complete checkpoint (say the first one was being written when the run was
    killed) is None: the run starts from the beginning, as diffusers' script does. A folder named
    explicitly must be complete.
    """
    if wanted == "latest":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(wanted) if os.path.isdir(wanted) else Path(output_dir) / wanted
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {wanted}: {path} is not a complete checkpoint "
                                f"(complete ones in {output_dir}: "
                                f"{', '.join(p.name for p in complete_checkpoints(output_dir)) or 'none'})")
    return path


def step_of(path: Path) -> int:
    return int(json.loads((path / MARKER).read_text())["global_step"])


def remove_leftovers(output_dir: str) -> list[str]:
    """Remove what killed runs left in ``output_dir``: checkpoints interrupted while being written or
    deleted. Call on the main process only, while no rank is writing a checkpoint. Returns their names.

    A ``.tmp-`` folder that already has its marker was complete when the run died between writing the
    marker and renaming: it is renamed into place, unless a checkpoint of that step exists.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    removed = []
    for path in sorted(root.iterdir()):
        if not path.is_dir():
            continue
        if path.name.startswith(TMP_PREFIX):
            final = root / f"checkpoint-{path.name[len(TMP_PREFIX):]}"
            if PATTERN.match(final.name) and (path / MARKER).is_file() and not final.exists():
                log.warning("%s was written completely before its run stopped: renamed to %s", path, final.name)
                path.rename(final)
                _fsync_dir(root)
                continue
            log.warning("removing %s: a checkpoint whose writing was interrupted (incomplete, never resumed from)",
                        path)
        elif path.name.startswith(DELETING_PREFIX):
            log.warning("removing %s: a checkpoint whose deletion was interrupted", path)
        else:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


def save(accelerator, output_dir: str, global_step: int, limit: int | None) -> Path:
    """``accelerator.save_state`` into a temporary folder, renamed when complete; then prune."""
    root = Path(output_dir)
    final = root / f"checkpoint-{global_step}"
    tmp = root / f"{TMP_PREFIX}{global_step}"
    if accelerator.is_main_process:
        remove_leftovers(output_dir)  # a killed run's; ranks wait below before writing anything
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_tree(tmp)  # the contents are on disk before the marker says they are complete ...
        _write_synced(tmp / MARKER, json.dumps({"global_step": global_step, "written_at": time.time()}))
        if final.exists():  # a checkpoint of this step from an abandoned run: replaced, never half-deleted
            old = _take_out_of_sight(final)
            tmp.rename(final)
            _fsync_dir(root)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
            _fsync_dir(root)  # ... and the rename is on disk before older checkpoints go
        if limit is not None:  # only now that the new one is complete; by age, and never the new one
            others = [p for p in complete_checkpoints(output_dir) if p != final]  # oldest written first
            for old in others[: max(0, len(others) + 1 - limit)]:
                shutil.rmtree(_take_out_of_sight(old))
    accelerator.wait_for_everyone()
    return final


def _take_out_of_sight(path: Path) -> Path:
    """Rename a checkpoint so nothing resumes from it any more (one atomic step); returns the new path."""
    hidden = path.with_name(f"{DELETING_PREFIX}{path.name.removeprefix('checkpoint-')}")
    if hidden.exists():
        shutil.rmtree(hidden)
    path.rename(hidden)
    _fsync_dir(path.parent)
    return hidden


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` (and the folders) to disk: a machine that loses power after the
    rename must not come back with a ``checkpoint-<step>`` holding empty or short files."""
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot sync a directory
        pass
    finally:
        os.close(fd)

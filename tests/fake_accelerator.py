"""A stand-in for ``accelerate.Accelerator`` with just what ``train.checkpoints.save`` uses."""

from __future__ import annotations

from pathlib import Path


class FakeAccelerator:
    """One process, no distributed state; ``save_state`` writes a one-file checkpoint."""

    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, path: str) -> None:
        Path(path).mkdir(parents=True)
        (Path(path) / "model.safetensors").write_bytes(b"weights")

"""Array helpers shared by annotators (no file decoding here: that is pipeline/decode.py)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def check_batch(images: Sequence[np.ndarray], ids: Sequence[str]) -> None:
    """Fail clearly on a batch that breaks the protocol (uint8 HxWx3, one id per image)."""
    if len(images) != len(ids):
        raise ValueError(f"{len(images)} images but {len(ids)} ids")
    for img in images:
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"annotators take uint8 HxWx3 RGB arrays, got {img.dtype} {img.shape}")


def check_map(cond: np.ndarray, image: np.ndarray, name: str) -> np.ndarray:
    """Return ``cond`` if it is a uint8 map with ``image``'s HxW (1 or 3 channels), else raise."""
    if cond.dtype != np.uint8:
        raise ValueError(f"{name}: condition map must be uint8, got {cond.dtype}")
    if cond.ndim == 3 and cond.shape[2] == 1:
        cond = cond[:, :, 0]
    if cond.shape[:2] != image.shape[:2] or cond.ndim not in (2, 3) or (cond.ndim == 3 and cond.shape[2] != 3):
        raise ValueError(f"{name}: map of shape {cond.shape} does not match image {image.shape[:2]}")
    return cond

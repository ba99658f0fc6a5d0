"""What an annotator does when it finds nothing (no person, no face) in an image."""

from __future__ import annotations

import numpy as np

from annotators.base import AnnotationSkipped


def empty_or_skip(empty_map: np.ndarray, found: bool, require: bool, reason: str) -> np.ndarray | AnnotationSkipped:
    """The map when something was found or detection is optional; else a skip with ``reason``.

    With ``require_detection`` the row becomes ``filtered`` (e.g. ``no person``): a pose
    ControlNet learns nothing from an empty skeleton.
    """
    if found or not require:
        return empty_map
    return AnnotationSkipped(reason)

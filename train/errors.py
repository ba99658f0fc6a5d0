"""The trainer's set-up error: a leaf every train/ module may raise it from."""

from __future__ import annotations


class SetupError(ValueError):
    """A run cannot be set up (base, ControlNet or flags that only loading shows wrong): ``train.py`` prints
    the message as one line and exits with 2. Raised before the first training step, never inside one."""

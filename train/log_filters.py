"""Narrow filters for library log lines that tell the user nothing they can act on.

Each filter drops one known message and nothing else, so real warnings of the same logger still show.
"""

from __future__ import annotations

import logging

# diffusers warns on every ``ModelMixin.to(dtype)`` even when the list of modules to keep in float32 is
# empty (``fp32_modules = self._keep_in_fp32_modules or []`` is never None), i.e. when nothing is wrong.
EMPTY_FP32_MODULES = ("diffusers.models.modeling_utils", "that should be kept in float32: []")


class DropMessage(logging.Filter):
    """Drops records whose message contains ``text``."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def install() -> None:
    """Attach the filters to the loggers that emit the known messages (once per process)."""
    name, text = EMPTY_FP32_MODULES
    logger = logging.getLogger(name)
    if not any(isinstance(f, DropMessage) and f.text == text for f in logger.filters):
        logger.addFilter(DropMessage(text))

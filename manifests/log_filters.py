"""Narrow filters for library log lines that tell the user nothing they can act on.

Each filter drops one known message of one logger and nothing else, so real warnings of the same logger
still show. Used by train/ (diffusers) and pipeline/ (Ray), which both import this package.
"""

from __future__ import annotations

import logging

# diffusers warns on every ``ModelMixin.to(dtype)`` even when the list of modules to keep in float32 is
# empty (``fp32_modules = self._keep_in_fp32_modules or []`` is never None), i.e. when nothing is wrong.
EMPTY_FP32_MODULES = ("diffusers.models.modeling_utils", "that should be kept in float32: []")

# Ray 2.60 turns token authentication on for every new local Ray and says so on every run
# (authentication_token_setup.enable_token_auth_by_default). The protection is what we want; the line is
# not actionable. Setting RAY_AUTH_MODE=token ourselves would also silence it, but a process that imported
# Ray earlier has its config cached as "disabled" and then cannot talk to the GCS it starts.
RAY_TOKEN_AUTH_ENABLED = ("ray._private.authentication.authentication_token_setup",
                          "Token authentication is enabled for this Ray cluster")


class DropMessage(logging.Filter):
    """Drops records whose message contains ``text``."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def drop(known: tuple[str, str]) -> None:
    """Attach the filter for one known (logger, message) pair, once per process."""
    name, text = known
    logger = logging.getLogger(name)
    if not any(isinstance(f, DropMessage) and f.text == text for f in logger.filters):
        logger.addFilter(DropMessage(text))

"""Library messages that are not actionable are silenced at their source; real warnings still show."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_casting_a_controlnet_does_not_warn_about_an_empty_list_of_float32_modules_but_real_warnings_show(caplog):
    import torch
    from diffusers import ControlNetModel

    import train  # noqa: F401  (the package installs its filters)

    controlnet = ControlNetModel(block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 layers_per_block=1, cross_attention_dim=8, norm_num_groups=4,
                                 conditioning_embedding_out_channels=(4, 8), attention_head_dim=2)
    logger = logging.getLogger("diffusers.models.modeling_utils")
    logger.addHandler(caplog.handler)  # diffusers' loggers do not propagate to the root
    try:
        with caplog.at_level(logging.WARNING, logger="diffusers.models.modeling_utils"):
            controlnet.to(torch.float16)
            logger.warning("a real problem")
    finally:
        logger.removeHandler(caplog.handler)
    messages = [r.getMessage() for r in caplog.records]
    assert not any("should be kept in float32" in m for m in messages), messages
    assert "a real problem" in messages


@pytest.mark.parametrize("ray_imported_first", [False, True], ids=["fresh", "ray_imported_first"])
def test_a_local_ray_starts_without_the_token_authentication_warning(tmp_path, ray_imported_first):
    """Also when Ray was imported before (as in a test session or a notebook): its cached config must
    agree with the GCS it starts, or the GCS refuses the driver (InvalidAuthToken)."""
    script = (("import ray\n" if ray_imported_first else "") +
              "from pipeline import ray_runtime\n"
              "ray_runtime.connect(None, num_cpus=1)\n"
              "import os, ray\n"
              "print('auth', os.environ.get('RAY_AUTH_MODE'))\n"
              "ray_runtime.shutdown()\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_AUTH_MODE"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Token authentication is" not in done.stdout + done.stderr, done.stderr[-2000:]
    assert "auth token" in done.stdout  # the protection Ray turns on by default is kept

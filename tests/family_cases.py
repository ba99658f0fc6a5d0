"""What tests/test_train_new_families.py needs to know about each new family: one ``FamilyCase`` each.

A family's tiny base is written by tests/tiny_<family>.py and served by the ``tiny_<family>`` fixture in
conftest.py; its case says how to call diffusers' own transformer without a ControlNet (the reference a fresh
ControlNet must leave unchanged), which classes its export and pipeline are, and which flags it refuses.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch


@dataclasses.dataclass(frozen=True)
class FamilyCase:
    controlnet: str
    """diffusers class of the exported ControlNet."""
    pipeline: str
    """diffusers ControlNet pipeline the export loads in."""
    noisy: Callable[[Any], torch.Tensor]
    """base -> noisy latents of 2 examples at 64 px, in the layout the adapter's ``predict`` takes."""
    plain: Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor]
    """(base, noisy, sigmas, hidden, added) -> the base transformer's prediction with no ControlNet, called as
    the family's pipeline calls it (not through the adapter)."""
    zero_outputs: str = "controlnet_blocks"
    """State-dict prefix of the ControlNet's zero-initialised outputs (must move in training)."""
    size: tuple[str, ...] = ()
    """Flags that keep the ControlNet tiny in training runs."""
    layers: tuple[int | None, int | None] = (None, None)
    """``make_controlnet``'s (num_layers, num_single_layers) matching ``size``."""
    max_sequence_length: int | None = None
    pipeline_kwargs: dict = dataclasses.field(default_factory=dict)
    """Extra arguments of a pipeline call (e.g. max_sequence_length)."""
    control_argument: str = "control_image"
    """The pipeline argument that takes the condition image."""
    refused: tuple[tuple[tuple[str, ...], str], ...] = ()
    """(extra flags, a phrase of the message) pairs the family refuses before weights load."""


CASES: dict[str, FamilyCase] = {}
"""Family name -> its case; each new family's tests add one entry (in family-name order)."""


def _zimage_noisy(base) -> torch.Tensor:
    return torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3))


def _zimage_plain(base, noisy, sigmas, hidden, added) -> torch.Tensor:
    from tests.tiny_zimage import plain_prediction

    return plain_prediction(base, noisy, sigmas, hidden, added)


CASES["zimage"] = FamilyCase(
    controlnet="ZImageControlNetModel", pipeline="ZImageControlNetPipeline", noisy=_zimage_noisy, plain=_zimage_plain,
    zero_outputs="control_layers", size=("--control_layers_places", "0,5", "--max_sequence_length", "32"),
    max_sequence_length=32, pipeline_kwargs={"max_sequence_length": 32},
    refused=((("--union", "--condition", "canny,depth"), "no union ControlNet for Z-Image"),
             (("--condition", "canny,depth"), "cannot be stacked"),
             (("--controlnet_num_layers", "2"), "sized by --control_layers_places"),
             (("--control_layers_places", "0,6"), "this Z-Image base has 6 layers"),
             (("--control_layers_places", "2,4"), "start at 0"),
             (("--control_layers_places", "0,x"), "give base layer numbers"),
             (("--guidance_scale", "3.5"), "Z-Image has none"),
             (("--resolution", "72"), "multiple of 16")))


def _qwenimage() -> FamilyCase:
    from tests import tiny_qwenimage

    return FamilyCase(
        "QwenImageControlNetModel", "QwenImageControlNetPipeline", tiny_qwenimage.noisy_latents,
        tiny_qwenimage.plain_prediction, size=("--controlnet_num_layers", "1"), layers=(1, None),
        pipeline_kwargs={"true_cfg_scale": 1.0},
        refused=((("--resolution", "72"), "multiple of 16"),
                 (("--controlnet_num_single_layers", "1"), "has no such blocks"),
                 (("--guidance_scale", "4"), "has none"),
                 (("--max_sequence_length", "2048"), "at most 1024")))


CASES["qwenimage"] = _qwenimage()


def _hunyuandit() -> FamilyCase:
    from tests import tiny_hunyuandit

    return FamilyCase(
        "HunyuanDiT2DControlNetModel", "HunyuanDiTControlNetPipeline", tiny_hunyuandit.noisy, tiny_hunyuandit.plain,
        pipeline_kwargs={"use_resolution_binning": False},  # else the pipeline samples at 1024 px
        refused=((("--controlnet_num_layers", "1"), "one block per skip connection"),
                 (("--max_sequence_length", "64"), "prompt lengths are fixed by its transformer"),
                 (("--union", "--condition", "canny,depth"), "no union ControlNet for HunyuanDiT"),
                 (("--guidance_scale", "3.5"), "HunyuanDiT has none"),
                 (("--resolution", "72"), "needs a multiple of 16")))


CASES["hunyuandit"] = _hunyuandit()

"""Load the frozen base and make the trainable ControlNet, through the family registry (train/families/).

What differs between families lives in their adapters; this module only picks the adapter for a base
folder and turns loading failures into one-line ``SetupError``s.
"""

from __future__ import annotations

import torch

from train.adapter import BaseModels, FamilyAdapter
from train.channel_concat import FluxConcatAdapter
from train.errors import SetupError
from train.family_checks import base_folder_problem, controlnet_family_problem, detect_family
from train.family_specs import FAMILY_NAMES
from train.controlnet_lora import LoraSettings, add_lora
from train.families import FAMILIES
from train.families.unet_xs import SDXLXSAdapter, SDXSAdapter


def load_base(path: str, resolution: int) -> BaseModels:
    """The frozen base of whichever family ``path`` holds (read from its model_index.json / subfolders);
    a folder missing a part, or one that does not load, is a ``SetupError`` saying what is wrong."""
    family = detect_family(path)
    problem = base_folder_problem(path, family)
    if problem:
        raise SetupError(problem)
    try:
        return FAMILIES[family](resolution).load(path)
    except (OSError, ValueError) as exc:
        raise SetupError(f"{path}: cannot load it as a {FAMILY_NAMES[family]} base: {exc}") from exc


METHOD_ADAPTERS: dict[tuple[str, str], type[FamilyAdapter]] = {
    ("flux", "channel_concat"): FluxConcatAdapter, ("sd", "controlnet_xs"): SDXSAdapter,
    ("sdxl", "controlnet_xs"): SDXLXSAdapter}
"""(family, ``--control_method``) -> the adapter that trains that control method on that family, where it is
not the family's own (a ControlNet); which families take which methods is ``FamilySpec.control_methods``."""


def with_control_method(base: BaseModels, method: str) -> BaseModels:
    """``base`` with the adapter that trains ``method`` on its family (the family's own for ``controlnet``)."""
    adapter = METHOD_ADAPTERS.get((base.family.name, method))
    if adapter is not None:
        base.family = adapter(base.family.resolution)
    return base


def make_controlnet(base: BaseModels, conditioning_channels: int, path: str | None = None,
                    num_layers: int | None = None, num_single_layers: int | None = None,
                    lora: LoraSettings | None = None) -> torch.nn.Module:
    """The family's ControlNet: initialised from the base (zero-initialised outputs), or loaded to continue
    (a folder of another family, or one that does not load, is a ``SetupError``); with ``lora``, its copied
    layers frozen under LoRA adapters (train/controlnet_lora.py)."""
    problem = controlnet_family_problem(path, base.family.name, base.options.union, base.family.method)
    if problem:
        raise SetupError(problem)
    try:
        controlnet = base.family.make_controlnet(base, conditioning_channels, path, num_layers, num_single_layers)
    except OSError as exc:  # from_pretrained: no such folder or hub id, no weights
        raise SetupError(f"--controlnet_model_name_or_path {path}: cannot load it: {exc}") from exc
    if lora is not None:
        controlnet = add_lora(controlnet, lora)
    controlnet.train()
    return controlnet

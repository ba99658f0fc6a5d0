"""The Control-LoRA single file (Stability AI's layout, which ComfyUI's "Load ControlNet Model" loads) of an SD
1.x/SDXL ControlNet-LoRA.

Read in ComfyUI's comfy/controlnet.py (``load_controlnet``, class ``ControlLora``) and comfy/cldm/cldm.py at
comfyanonymous/ComfyUI 005e370254d42fcc07904b607b2354dc091f814f (cldm.py 01312a55a43596dd0077a1d4c0c97856c5610167):

- a file is a Control-LoRA when it has a ``lora_controlnet`` key (its value is never read);
- ComfyUI builds an ldm ``cldm.ControlNet`` from the loaded base's UNet config, with
  ``hint_channels = input_hint_block.0.weight.shape[1]``, copies every base UNet weight whose ldm name it has
  (``time_embed``, ``label_emb``, ``input_blocks``, ``middle_block``), then sets every other key of the file
  as a parameter by its ldm name;
- every Linear/Conv2d there is a ``ControlLoraOps`` layer: with ``<layer>.up`` and ``<layer>.down`` set its
  weight is ``weight + (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)`` (no alpha: the scale is
  folded into ``up`` here); a layer of the base without them is the base's;
- the parts not in the base must be given in full: ``input_hint_block.{0,2,...,14}`` (the condition
  encoder), ``zero_convs.<i>.0`` and ``middle_block_out.0``.

The ldm names are those of diffusers' single-file conversion (``DIFFUSERS_TO_LDM_MAPPING`` for the fixed
layers; the block layout of its ``convert_controlnet_checkpoint``, which a test runs on our names).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

CONTROL_LORA_FILE = "control-lora.safetensors"
DETECTION_KEY = "lora_controlnet"
"""ComfyUI's ``load_controlnet`` takes a file with this key as a Control-LoRA."""
RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
"""diffusers ResnetBlock2D layer -> ldm ResBlock layer."""


def fixed_names() -> dict[str, str]:
    """diffusers -> ldm module names of the layers outside the blocks (time and label embeddings, conv_in),
    from diffusers' own single-file table."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    table = DIFFUSERS_TO_LDM_MAPPING["controlnet"]
    pairs = {**table["layers"], **table["addition_embed_type"]}
    return {k.rsplit(".", 1)[0]: v.rsplit(".", 1)[0] for k, v in pairs.items()
            if not k.startswith("controlnet_cond_embedding")}


def ldm_name(name: str, layers_per_block: int, hint_blocks: int) -> str:
    """The ldm (cldm.ControlNet) name of a diffusers ControlNetModel module; ``hint_blocks``: how many
    ``controlnet_cond_embedding.blocks`` there are (6 in SD's layout)."""
    fixed = fixed_names()
    if name in fixed:
        return fixed[name]
    step = layers_per_block + 1  # each down block: its layers, then a downsampler
    rules = [
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)(.*)",
         lambda b, j, layer, rest: f"input_blocks.{1 + int(b) * step + int(j)}.0.{RESNET_NAMES[layer]}{rest}"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)",
         lambda b, j, rest: f"input_blocks.{1 + int(b) * step + int(j)}.1.{rest}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv(.*)",
         lambda b, rest: f"input_blocks.{1 + int(b) * step + layers_per_block}.0.op{rest}"),
        (r"mid_block\.resnets\.(\d+)\.(\w+)(.*)", lambda k, layer, rest: f"middle_block.{2 * int(k)}.{RESNET_NAMES[layer]}{rest}"),
        (r"mid_block\.attentions\.0\.(.*)", lambda rest: f"middle_block.1.{rest}"),
        (r"controlnet_down_blocks\.(\d+)(.*)", lambda i, rest: f"zero_convs.{i}.0{rest}"),
        (r"controlnet_mid_block(.*)", lambda rest: f"middle_block_out.0{rest}"),
        (r"controlnet_cond_embedding\.conv_in(.*)", lambda rest: f"input_hint_block.0{rest}"),
        (r"controlnet_cond_embedding\.blocks\.(\d+)(.*)", lambda i, rest: f"input_hint_block.{2 * (int(i) + 1)}{rest}"),
        (r"controlnet_cond_embedding\.conv_out(.*)", lambda rest: f"input_hint_block.{2 * (hint_blocks + 1)}{rest}"),
    ]
    for pattern, rename in rules:
        found = re.fullmatch(pattern, name)
        if found:
            return rename(*found.groups())
    raise KeyError(f"{name}: no ldm name for it in a ControlNet's layout")


def control_lora_state(controlnet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The Control-LoRA tensors of a LoRA ``ControlNetModel``: ``<ldm layer>.up``/``.down`` of each adapter
    (its alpha / rank scale folded into ``up``) and the new parts in full, by ldm name."""
    from peft.tuners.lora import LoraLayer

    from train.controlnet_lora import NEW_PARTS, is_new

    config = controlnet.config
    hints = len(controlnet.controlnet_cond_embedding.blocks)

    def rename(name: str) -> str:
        return ldm_name(name, config.layers_per_block, hints)

    state: dict[str, torch.Tensor] = {DETECTION_KEY: torch.zeros(1)}
    for name, module in controlnet.named_modules():
        if isinstance(module, LoraLayer):
            up, down = module.lora_B["default"].weight, module.lora_A["default"].weight
            state[f"{rename(name)}.up"] = up * module.scaling["default"]
            state[f"{rename(name)}.down"] = down
    for name, p in controlnet.named_parameters():
        if is_new(name, NEW_PARTS["ControlNetModel"]):
            module, _, leaf = name.rpartition(".")
            state[f"{rename(module)}.{leaf}"] = p
    return state


def write_control_lora(controlnet: torch.nn.Module, path: Path, provenance: list | None = None) -> Path:
    """``control_lora_state`` in fp16 as one safetensors file (for ComfyUI, over an SD 1.x/SDXL base)."""
    from safetensors.torch import save_file

    from train.controlnet_lora import cpu_contiguous

    metadata = {"format": "pt", "controlforge": json.dumps(provenance or [])}
    save_file(cpu_contiguous(control_lora_state(controlnet), torch.float16), str(path), metadata=metadata)
    return path

"""The Control-LoRA file (train/control_lora_file.py) against ComfyUI's loader, as recorded here from its code.

Recorded from comfyanonymous/ComfyUI comfy/controlnet.py at 005e370254d42fcc07904b607b2354dc091f814f
(``load_controlnet``, ``ControlLora``, ``ControlLoraOps``) and comfy/cldm/cldm.py at
01312a55a43596dd0077a1d4c0c97856c5610167 (``ControlNet.__init__``):

- detection: ``"lora_controlnet" in state_dict`` makes the file a Control-LoRA;
- ``ControlLora.pre_run`` builds ``cldm.ControlNet`` from the base UNet's config with
  ``hint_channels = sd["input_hint_block.0.weight"].shape[1]``, sets every base UNet weight it has a name for,
  then every file key but ``lora_controlnet`` as a parameter by name;
- ``ControlLoraOps`` Linear/Conv2d: ``weight + (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)``;
- ``input_hint_block``: convs at 0, 2, ..., 14, 3x3, channels hint->16->16->32->32->96->96->256->model_channels;
  ``zero_convs.<i>.0``: a 1x1 conv per input block; ``middle_block_out.0``: a 1x1 conv. These are not in the
  base UNet, so the file must hold them in full.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.test_controlnet_lora import family_base, new_controlnet, train_steps
from train.control_lora_file import ldm_name, write_control_lora
from train.controlnet_lora import LoraSettings, merged

DETECTION_KEY = "lora_controlnet"
HINT_CHANNELS = [(16, "hint"), (16, 16), (32, 16), (32, 32), (96, 32), (96, 96), (256, 96), ("model", 256)]
"""(out, in) of input_hint_block.{0,2,...,14}, as cldm.ControlNet builds it."""
FULL_PREFIXES = ("input_hint_block.", "zero_convs.", "middle_block_out.")
"""What ComfyUI cannot take from the base UNet."""


def ldm_state(controlnet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A plain ControlNetModel's state dict under its ldm (cldm) names."""
    hints = len(controlnet.controlnet_cond_embedding.blocks)
    out = {}
    for key, value in controlnet.state_dict().items():
        module, _, leaf = key.rpartition(".")
        out[f"{ldm_name(module, controlnet.config.layers_per_block, hints)}.{leaf}"] = value
    return out


def comfy_load(base_ldm: dict[str, torch.Tensor], control_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What ControlLora.pre_run ends with, by the recorded rules: the base's weights, the file's full weights
    set by name, and each ``up``/``down`` pair added to its layer's weight."""
    assert DETECTION_KEY in control_weights  # load_controlnet's detection
    state = dict(base_ldm)
    for key, value in control_weights.items():
        if key != DETECTION_KEY and not key.endswith((".up", ".down")):
            state[key] = value.float()
    for key in [k for k in control_weights if k.endswith(".up")]:
        layer = key[: -len(".up")]
        up, down = control_weights[key].float(), control_weights[f"{layer}.down"].float()
        weight = state[f"{layer}.weight"]
        state[f"{layer}.weight"] = weight + (up.flatten(start_dim=1) @ down.flatten(start_dim=1)).reshape(weight.shape)
    return state


@pytest.fixture(params=["sd", "sdxl"])
def trained(request, tmp_path):
    """(base, fresh plain ControlNet = the base's copy, trained LoRA ControlNet, its Control-LoRA file)."""
    base = family_base(request, request.param)
    fresh = new_controlnet(base, None)
    controlnet = new_controlnet(base, LoraSettings(4, alpha=8))
    train_steps(base, controlnet, steps=3)
    path = write_control_lora(controlnet, tmp_path / "control-lora.safetensors")
    return base, fresh, controlnet, load_file(str(path))


def test_the_file_is_a_control_lora_with_every_key_comfyui_needs_in_its_shape(trained):
    base, fresh, controlnet, weights = trained
    assert DETECTION_KEY in weights
    model_channels = base.unet.config.block_out_channels[0]
    for i, (out_ch, in_ch) in enumerate(HINT_CHANNELS):
        shape = weights[f"input_hint_block.{2 * i}.weight"].shape
        assert shape == (model_channels if out_ch == "model" else out_ch, 3 if in_ch == "hint" else in_ch, 3, 3)
    inputs = len(controlnet.controlnet_down_blocks)  # one zero conv per ldm input block
    for i in range(inputs):
        assert weights[f"zero_convs.{i}.0.weight"].shape[2:] == (1, 1)
    assert f"zero_convs.{inputs}.0.weight" not in weights and "middle_block_out.0.weight" in weights
    base_ldm = ldm_state(fresh)
    pairs = [k[: -len(".up")] for k in weights if k.endswith(".up")]
    assert pairs and all(f"{layer}.down" in weights for layer in pairs)
    for layer in pairs:  # each pair lands on a base layer of that shape (rank 4)
        up, down, weight = weights[f"{layer}.up"], weights[f"{layer}.down"], base_ldm[f"{layer}.weight"]
        assert up.shape[0] == weight.shape[0] and up.shape[1] == down.shape[0] == 4
        assert up.flatten(1).shape[1] == 4 and down.flatten(1).shape[1] == weight[0].numel()
    full = [k for k in weights if k != DETECTION_KEY and not k.endswith((".up", ".down"))]
    assert full and all(k.startswith(FULL_PREFIXES) for k in full)
    assert all(k in base_ldm for k in full)


def test_comfyuis_rules_over_the_base_rebuild_the_trained_controlnet(trained):
    """The ldm names are diffusers' own: its single-file conversion maps them back to the trained weights."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint

    base, fresh, controlnet, weights = trained
    base_ldm = {k: v for k, v in ldm_state(fresh).items() if not k.startswith(FULL_PREFIXES)}  # the UNet's part
    loaded = comfy_load(base_ldm, weights)
    assert set(loaded) == set(ldm_state(fresh))  # every parameter cldm.ControlNet has gets a value
    want = merged(controlnet).state_dict()
    got = convert_controlnet_checkpoint(loaded, dict(fresh.config))
    if fresh.config.addition_embed_type:  # SDXL's label_emb: diffusers maps it apart, by this table
        table = DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"]
        got.update({name: loaded[ldm] for name, ldm in table.items()})
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=2e-3, atol=2e-3)  # the file is fp16

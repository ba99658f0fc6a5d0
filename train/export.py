"""Export: diffusers folder, one ``.safetensors`` file for the loaders that take one, and a model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from train.controlnet_lora import ADAPTER_FOLDER, is_lora, merged, save_adapter

SINGLE_FILE = "controlnet.safetensors"
EXAMPLE_CONDITION = "example_condition.png"

# Which tools load ``controlnet.safetensors``, per exported class. Checked with each tool's own loading code on
# real-width random exports (ComfyUI's ``load_controlnet``, sd-webui-controlnet, Forge); union key names
# checked against ComfyUI's detection in comfy/controlnet.py and comfy/cldm/cldm.py (Comfy-Org/ComfyUI
# 03b1ca67). ComfyUI's detection assumes the real widths, so exports of tiny test models never load there.
LOADERS = {
    "ControlNetModel": (
        "ComfyUI (Load ControlNet Model) and A1111/Forge (sd-webui-controlnet) load it for SD 1.x and SDXL bases; "
        "diffusers: `ControlNetModel.from_single_file(path, config=<output_dir>/controlnet)` (offline it needs "
        "`config=`)."),
    "ControlNetUnionModel": (
        "ComfyUI loads it as a union ControlNet (SDXL width: it finds `control_add_embedding.*` and "
        "`task_embedding`); pick the control type whose index is the slot below (its type names follow xinsir's "
        "union model, not these conditions). A1111/Forge: not checked. diffusers: no `from_single_file`; use "
        "`ControlNetUnionModel.from_pretrained(<output_dir>/controlnet)`."),
    "SD3ControlNetModel": (
        "ComfyUI only (SD3 diffusers layout); A1111/Forge have no SD3 ControlNet support. diffusers: no "
        "`from_single_file`; use `SD3ControlNetModel.from_pretrained(<output_dir>/controlnet)`."),
    "FluxControlNetModel": (
        "ComfyUI only (the InstantX/diffusers Flux layout; a union's `controlnet_mode_embedder` gives its mode "
        "count); A1111/Forge have no Flux ControlNet support. diffusers: no `from_single_file`; use "
        "`FluxControlNetModel.from_pretrained(<output_dir>/controlnet)`."),
    "HunyuanDiT2DControlNetModel": (
        "Not checked with ComfyUI or A1111/Forge. diffusers: no `from_single_file`; use "
        "`HunyuanDiT2DControlNetModel.from_pretrained(<output_dir>/controlnet)` in `HunyuanDiTControlNetPipeline`."),
}

# The pipeline keyword that takes the condition image, per pipeline class the card names.
CONDITION_KWARG = {
    "StableDiffusionControlNetPipeline": "image",
    "StableDiffusionXLControlNetPipeline": "image",
    "StableDiffusionControlNetXSPipeline": "image",
    "StableDiffusionXLControlNetXSPipeline": "image",
    "StableDiffusionXLControlNetUnionPipeline": "control_image",
    "StableDiffusion3ControlNetPipeline": "control_image",
    "FluxControlNetPipeline": "control_image",
    "HunyuanDiTControlNetPipeline": "control_image",
}


def export(controlnet: torch.nn.Module, output_dir: str, card: dict[str, Any],
           example: Any | None = None) -> dict[str, str]:
    """Write ``controlnet/`` (save_pretrained, safetensors), the single file and ``README.md``; ``example``
    (a PIL condition map) is saved next to them for the card's snippet.

    The single file holds the diffusers state dict in fp16; which tools load it is in ``LOADERS``. A LoRA
    ControlNet is exported merged (a plain ControlNet), plus its adapter alone and, where there is one, its
    Control-LoRA file (``export_lora``).
    """
    from safetensors.torch import save_file

    own = getattr(controlnet, "export_to", None)
    if own is not None:  # a trained module that is not a ControlNet (channel-concat control) writes its own
        return own(output_dir, card, example)
    out = Path(output_dir)
    written: dict[str, str] = {}
    if is_lora(controlnet):
        written = export_lora(controlnet, out, card)
        card = {**card, "lora_files": written}
        controlnet = merged(controlnet)
    folder = out / "controlnet"
    controlnet.save_pretrained(folder, safe_serialization=True)
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in controlnet.state_dict().items()}
    save_file(state, out / SINGLE_FILE, metadata={"format": "pt", "controlforge": json.dumps(card["provenance"])})
    card = {**card, "output_dir": str(out.resolve())}
    if example is not None:
        example.save(out / EXAMPLE_CONDITION)
        card["example_condition"] = str((out / EXAMPLE_CONDITION).resolve())
    (out / "README.md").write_text(model_card(card))
    return {"diffusers": str(folder), "single_file": str(out / SINGLE_FILE), "card": str(out / "README.md"), **written}


def export_lora(controlnet: torch.nn.Module, out: Path, card: dict[str, Any]) -> dict[str, str]:
    """A LoRA ControlNet's own files: the adapter alone (peft's format; peft is what trains it, and its
    ``modules_to_save`` carries the new parts, which diffusers' LoRA format has no place for) and, for SD
    1.x/SDXL (``ControlNetModel``), the Control-LoRA file ComfyUI loads."""
    from train.control_lora_file import CONTROL_LORA_FILE, write_control_lora

    written = {"adapter": str(save_adapter(controlnet, out / ADAPTER_FOLDER, card.get("base_model")))}
    if type(controlnet).__name__ == "ControlNetModel":
        written["control_lora"] = str(write_control_lora(controlnet, out / CONTROL_LORA_FILE, card["provenance"]))
    return written


def resolved_base(name: str) -> str:
    """A base given as a local folder, absolute (the card's snippet runs from anywhere); a hub id as given."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def usage_snippet(card: dict[str, Any]) -> str:
    """Python that loads the export and the base and, with an example condition, generates one image."""
    controlnet_class = card.get("controlnet_class", "ControlNetModel")
    pipeline_class = card.get("pipeline_class", "StableDiffusionControlNetPipeline")
    lines = [f"from diffusers import {controlnet_class}, {pipeline_class}",
             f"controlnet = {controlnet_class}.from_pretrained({str(Path(card['output_dir']) / 'controlnet')!r})",
             f"pipe = {pipeline_class}.from_pretrained({resolved_base(card['base_model'])!r}, controlnet=controlnet)"]
    kwarg = CONDITION_KWARG.get(pipeline_class)
    stacked = len(card["conditions"]) > 1 and not ("control_type_index" in card or "controlnet_mode" in card)
    if "example_condition" not in card or kwarg is None or stacked:
        return "\n".join(lines)  # a stacked run takes a 3k-channel tensor: no one file shows it
    condition = f"load_image({card['example_condition']!r})"
    given = f"{kwarg}={condition}"
    if "control_type_index" in card:  # SDXL union: a list of images and their slots
        given = f"{kwarg}=[{condition}], control_mode=[{card['control_type_index'][card['conditions'][0]]}]"
    elif "controlnet_mode" in card:
        given += f", control_mode={card['controlnet_mode'][card['conditions'][0]]}"
    size = card.get("args", {}).get("resolution")
    sized = f", height={size}, width={size}" if size else ""
    lines[:1] = [lines[0], "from diffusers.utils import load_image"]
    lines.append(f"image = pipe({card.get('example_prompt', '')!r}, {given}{sized}, num_inference_steps=20).images[0]")
    lines.append('image.save("sample.png")')
    return "\n".join(lines)


def lora_section(card: dict[str, Any]) -> str:
    """What a ControlNet-LoRA run exports besides the merged ControlNet ("" for a full ControlNet)."""
    files = card.get("lora_files")
    if not files:
        return ""
    text = (f"\n## ControlNet-LoRA\nThe files above hold the adapters merged in. The adapter alone (peft): "
            f"`{files['adapter']}` (`PeftModel.from_pretrained(<this family's ControlNet made from the base>, "
            "path).merge_and_unload()`).")
    if "control_lora" in files:
        text += f" Control-LoRA for ComfyUI (Load ControlNet Model, over this base): `{files['control_lora']}`."
    return text + "\n"


def model_card(card: dict[str, Any]) -> str:
    """Markdown model card: base, data, conditions, usage, loaders, arguments, final figures."""
    args = json.dumps(card["args"], indent=2, sort_keys=True, default=str)
    prov = json.dumps(card["provenance"], indent=2, sort_keys=True, default=str)
    figures = "\n".join(f"- {k}: {v}" for k, v in card["figures"].items() if k != "ranks")
    controlnet_class = card.get("controlnet_class", "ControlNetModel")
    routing = ""
    for key, what in (("control_type_index", "`control_mode` (ControlNetUnionModel control type) per condition"),
                      ("controlnet_mode", "`control_mode` (FluxControlNetModel mode) per condition")):
        if key in card:
            routing = f"\n## Union conditions\n{what}: `{json.dumps(card[key])}`\n"
    return f"""---
library_name: diffusers
base_model: {card['base_model']}
tags: [controlnet, stable-diffusion, controlforge]
---

# ControlNet ({', '.join(card['conditions'])}) for {card['base_model']}

Trained with controlforge on the manifest `{card['manifest']}` (fingerprint `{card['manifest_fingerprint']}`).

```python
{usage_snippet(card)}
```

## One file: `{SINGLE_FILE}`
{LOADERS.get(controlnet_class, "Not checked with any loader.")}
{lora_section(card)}{routing}
## Final figures
{figures}

## Data provenance (annotators)
```json
{prov}
```

## Training arguments
```json
{args}
```
"""

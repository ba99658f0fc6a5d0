"""Export: diffusers folder, one ``.safetensors`` file for ComfyUI/A1111, and a model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

SINGLE_FILE = "controlnet.safetensors"


def export(controlnet: torch.nn.Module, output_dir: str, card: dict[str, Any]) -> dict[str, str]:
    """Write ``controlnet/`` (save_pretrained, safetensors), the single file and ``README.md``.

    The single file holds the diffusers state dict in fp16: ComfyUI's ControlNet loader and A1111's
    sd-webui-controlnet both recognise diffusers keys (``controlnet_cond_embedding.*``) and convert.
    """
    from safetensors.torch import save_file

    out = Path(output_dir)
    folder = out / "controlnet"
    controlnet.save_pretrained(folder, safe_serialization=True)
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in controlnet.state_dict().items()}
    save_file(state, out / SINGLE_FILE, metadata={"format": "pt", "controlforge": json.dumps(card["provenance"])})
    (out / "README.md").write_text(model_card(card))
    return {"diffusers": str(folder), "single_file": str(out / SINGLE_FILE), "card": str(out / "README.md")}


def model_card(card: dict[str, Any]) -> str:
    """Markdown model card: base, data, conditions, arguments, final figures."""
    args = json.dumps(card["args"], indent=2, sort_keys=True, default=str)
    prov = json.dumps(card["provenance"], indent=2, sort_keys=True, default=str)
    figures = "\n".join(f"- {k}: {v}" for k, v in card["figures"].items() if k != "ranks")
    controlnet_class = card.get("controlnet_class", "ControlNetModel")
    pipeline_class = card.get("pipeline_class", "StableDiffusionControlNetPipeline")
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
from diffusers import {controlnet_class}, {pipeline_class}
controlnet = {controlnet_class}.from_pretrained("controlnet")
pipe = {pipeline_class}.from_pretrained("{card['base_model']}", controlnet=controlnet)
```

For ComfyUI or A1111, use `{SINGLE_FILE}`.
{routing}
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

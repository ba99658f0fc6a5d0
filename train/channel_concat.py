"""Channel-concat control for Flux.1 (``--control_method channel_concat``), as diffusers' ``FluxControlPipeline``
reads it and its examples/flux-control scripts train it.

No ControlNet: the condition image goes through the VAE, is packed into tokens like the latents, and is
concatenated to the noisy latent tokens along the channels, so the transformer's input projection
(``x_embedder``) reads twice its channels. The new input columns start at zero, so the first step predicts
exactly what the base does; then LoRA adapters (peft, rank ``--control_lora_rank``, default 4 as the example)
on the transformer learn to use them, or, with rank 0, the whole transformer trains.

The loop trains "the ControlNet": here that is ``ConcatControl``, a small module whose parameters are only the
ones that train (the LoRA weights, or the whole transformer), whose forward is the transformer's, and which
exports itself (a LoRA file ``FluxControlPipeline.load_lora_weights`` loads, or a transformer folder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from train.adapter import BaseModels
from train.families.flow import FluxAdapter, pack

DEFAULT_RANK = 4
"""LoRA rank when ``--control_lora_rank`` is not given: diffusers' train_control_lora_flux.py ``--rank`` default."""

LORA_TARGETS = ("x_embedder", "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                "ff_context.net.0.proj", "ff_context.net.2", "norm1_context.linear", "norm1.linear", "norm.linear",
                "proj_mlp", "proj_out")
"""Modules the LoRA adapts: train_control_lora_flux.py's default ``--lora_layers`` (x_embedder included, so the
adapter reads the condition's new input columns)."""

LORA_FILE = "pytorch_lora_weights.safetensors"
"""The file name ``save_lora_weights`` writes and ``load_lora_weights(folder)`` looks for."""


def widen_input(transformer: torch.nn.Module) -> None:
    """Double ``x_embedder``'s input channels; the new columns are zero, so the output is the base's for any
    condition (as the example and ``FluxLoraLoaderMixin``'s expansion of a loaded LoRA's ``x_embedder``)."""
    old = transformer.x_embedder
    channels = old.in_features
    new = torch.nn.Linear(2 * channels, old.out_features, bias=old.bias is not None, device=old.weight.device,
                          dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :channels].copy_(old.weight)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    new.requires_grad_(old.weight.requires_grad)
    transformer.x_embedder = new
    # out_channels stays: the prediction is still a velocity of the latents alone
    transformer.register_to_config(in_channels=2 * channels, out_channels=transformer.config.out_channels or channels)


def add_lora(transformer: torch.nn.Module, rank: int) -> None:
    """peft LoRA adapters of ``rank`` on ``LORA_TARGETS`` (their B starts at zero: the base's output)."""
    from peft import LoraConfig

    from diffusers.training_utils import cast_training_params

    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                       target_modules=list(LORA_TARGETS)))
    # the adapters train in fp32 beside a bf16/fp16 base, as a ControlNet does (peft casts their inputs)
    cast_training_params(transformer, dtype=torch.float32)


def frozen_dtype(transformer: torch.nn.Module) -> torch.dtype:
    """The base weights' dtype (bf16 beside fp32 LoRA weights: diffusers' ``transformer.dtype`` may name either)."""
    layer = transformer.x_embedder
    return getattr(layer, "base_layer", layer).weight.dtype


def cast_input_to_base(transformer: torch.nn.Module) -> None:
    """Cast what enters ``x_embedder`` to the base's dtype: the condition latents of an fp32 (upcast) VAE meet
    bf16 image latents in FluxControlPipeline's concatenation, which would reach the bf16 layer as fp32."""
    transformer.x_embedder.register_forward_pre_hook(
        lambda _, args: tuple(a.to(frozen_dtype(transformer)) if torch.is_tensor(a) else a for a in args))


class ConcatControl(torch.nn.Module):
    """What a channel-concat run trains, as the loop's "ControlNet": its parameters (so the optimiser, EMA,
    gradient clipping and checkpoints) are only the transformer's trainable ones, shared, not copied; its
    forward is the transformer's."""

    def __init__(self, transformer: torch.nn.Module, rank: int):
        super().__init__()
        # not a submodule: the frozen base weights are not this module's to save or optimise
        object.__setattr__(self, "transformer", transformer)
        self.rank = rank
        self.trained = torch.nn.ParameterDict(
            {name.replace(".", "/"): p for name, p in transformer.named_parameters() if p.requires_grad})

    def forward(self, **kwargs):
        return self.transformer(**kwargs)

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()

    def export_to(self, output_dir: str, card: dict[str, Any], example: Any | None = None) -> dict[str, str]:
        """The LoRA file (or, rank 0, the transformer folder) and a model card saying how to load it."""
        return export_concat(self, output_dir, card, example)


class FluxConcatAdapter(FluxAdapter):
    """Flux.1 with the condition's packed latents concatenated to the input tokens (``FluxControlPipeline``):
    the flow-matching loss, encoding and validation of ``FluxAdapter``; the control module and prediction differ."""

    method = "channel_concat"
    pipeline_class = "FluxControlPipeline"
    union_class = None

    def make_controlnet(self, base: BaseModels, conditioning_channels: int, path: str | None,
                        num_layers: int | None = None, num_single_layers: int | None = None) -> torch.nn.Module:
        """Widen the base transformer's input and add the LoRA (or unfreeze it all, rank 0), in place."""
        rank = base.options.control_lora_rank
        rank = DEFAULT_RANK if rank is None else rank
        transformer = base.transformer
        widen_input(transformer)
        if rank:
            add_lora(transformer, rank)
            cast_input_to_base(transformer)
        else:  # a full fine-tune trains in fp32, as a ControlNet does beside a half-precision base
            transformer.to(torch.float32).requires_grad_(True)
        return ConcatControl(transformer, rank)

    def control_inputs(self, base: BaseModels, controlnet, condition, generator) -> dict:
        """The condition's VAE latents, shifted, scaled and packed as ``FluxControlPipeline`` makes them."""
        return {"control": pack(self.condition_latents(base, controlnet, condition, generator))}

    def predict(self, controlnet, base: BaseModels, noisy, sigmas, hidden, added, control: dict) -> torch.Tensor:
        from diffusers import FluxPipeline

        batch, _, height, width = noisy.shape
        device, dtype = noisy.device, frozen_dtype(base.transformer)
        img_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype)
        txt_ids = torch.zeros(hidden.shape[1], 3, device=device, dtype=dtype)
        tokens = torch.cat([pack(noisy), control["control"].to(noisy.dtype)], dim=2).to(dtype)
        guidance = (torch.full((batch,), base.options.guidance_scale, device=device)
                    if base.transformer.config.guidance_embeds else None)
        return controlnet(hidden_states=tokens, timestep=sigmas.to(dtype), guidance=guidance,
                          pooled_projections=added["pooled_projections"].to(dtype),
                          encoder_hidden_states=hidden.to(dtype), txt_ids=txt_ids, img_ids=img_ids,
                          return_dict=False)[0]

    def validation_pipeline(self, base: BaseModels, controlnet: torch.nn.Module):
        """``FluxControlPipeline`` over the in-memory (widened, adapted) transformer and the base's modules."""
        from diffusers import FluxControlPipeline

        modules = self.pipeline_modules(base)
        modules["scheduler"] = type(base.scheduler).from_config(base.scheduler.config)  # its own step state
        pipe = FluxControlPipeline(**modules)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def control_kwargs(self, condition: torch.Tensor, mode: int | None) -> dict:
        # FluxControlPipeline takes a tensor condition as is: [-1, 1], as the VAE reads it in training
        return {"control_image": condition * 2.0 - 1.0}

    def card_extra(self, base: BaseModels) -> dict:
        return {"control_method": "channel_concat"}


def export_concat(control: ConcatControl, output_dir: str, card: dict[str, Any],
                  example: Any | None = None) -> dict[str, str]:
    """Write the LoRA (``save_lora_weights``, the widened ``x_embedder``'s adapter included: the loader widens
    the base's to match) or, rank 0, the whole ``transformer/`` folder; and the model card."""
    from diffusers import FluxControlPipeline

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if control.rank:
        from peft.utils import get_peft_model_state_dict

        layers = {k: v.detach().to("cpu").contiguous()
                  for k, v in get_peft_model_state_dict(control.transformer).items()}
        FluxControlPipeline.save_lora_weights(out, transformer_lora_layers=layers, weight_name=LORA_FILE)
        written = {"lora": str(out / LORA_FILE)}
    else:
        control.transformer.save_pretrained(out / "transformer", safe_serialization=True)
        written = {"diffusers": str(out / "transformer")}
    card = {**card, "output_dir": str(out.resolve()), "controlnet_class": type(control).__name__}
    if example is not None:
        from train.export import EXAMPLE_CONDITION

        example.save(out / EXAMPLE_CONDITION)
        card["example_condition"] = str((out / EXAMPLE_CONDITION).resolve())
    (out / "README.md").write_text(concat_card(card, lora=bool(control.rank)))
    return {**written, "card": str(out / "README.md")}


def concat_usage(card: dict[str, Any], lora: bool) -> str:
    """Python that loads the export over the base in ``FluxControlPipeline`` and generates one image."""
    from train.export import resolved_base

    base, out = resolved_base(card["base_model"]), card["output_dir"]
    if lora:
        lines = ["from diffusers import FluxControlPipeline",
                 f"pipe = FluxControlPipeline.from_pretrained({base!r})",
                 f"pipe.load_lora_weights({out!r})  # widens the transformer's x_embedder to read the condition"]
    else:
        lines = ["from diffusers import FluxControlPipeline, FluxTransformer2DModel",
                 f"transformer = FluxTransformer2DModel.from_pretrained({out!r}, subfolder='transformer')",
                 f"pipe = FluxControlPipeline.from_pretrained({base!r}, transformer=transformer)"]
    if "example_condition" in card:
        size = card.get("args", {}).get("resolution")
        sized = f", height={size}, width={size}" if size else ""
        lines.insert(1, "from diffusers.utils import load_image")
        lines.append(f"image = pipe({card.get('example_prompt', '')!r}, "
                     f"control_image=load_image({card['example_condition']!r}){sized}, "
                     "num_inference_steps=20).images[0]")
        lines.append('image.save("sample.png")')
    return "\n".join(lines)


def concat_card(card: dict[str, Any], lora: bool) -> str:
    """Markdown model card of a channel-concat export: how to load it, figures, arguments."""
    args = json.dumps(card["args"], indent=2, sort_keys=True, default=str)
    figures = "\n".join(f"- {k}: {v}" for k, v in card["figures"].items() if k != "ranks")
    what = (f"a LoRA (`{LORA_FILE}`) for" if lora else "a fine-tuned transformer (`transformer/`) of")
    return f"""---
library_name: diffusers
base_model: {card['base_model']}
tags: [flux, flux-control, lora, controlforge]
---

# Channel-concat control ({', '.join(card['conditions'])}): {what} {card['base_model']}

The condition image's latents are concatenated to the input channels (diffusers' `FluxControlPipeline`).
Trained with controlforge on the manifest `{card['manifest']}` (fingerprint `{card['manifest_fingerprint']}`).

```python
{concat_usage(card, lora)}
```

## Final figures
{figures}

## Training arguments
```json
{args}
```
"""

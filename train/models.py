"""Load the frozen Stable Diffusion base and the trainable ControlNet.

Model families differ only in how prompts become conditioning (``FamilyAdapter``): SD 1.x/2.x use
one CLIP text encoder; SDXL adds a second one, pooled embeddings and size/crop time ids.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch


@dataclasses.dataclass
class BaseModels:
    """The locked base (never trained) and its noise schedule."""

    tokenizers: list[Any]
    text_encoders: list[torch.nn.Module]
    vae: torch.nn.Module
    unet: torch.nn.Module
    scheduler: Any
    family: "FamilyAdapter"

    def place(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move the base to ``device`` in ``dtype``; a VAE whose config says ``force_upcast`` (SDXL's
        gives NaNs in fp16) stays fp32: encode in fp32, then cast the latents."""
        for module in (*self.text_encoders, self.unet):
            module.to(device, dtype=dtype)
        upcast = getattr(self.vae.config, "force_upcast", False)
        self.vae.to(device, dtype=torch.float32 if upcast else dtype)


class FamilyAdapter:
    """SD 1.x / 2.x: one CLIP text encoder's last hidden state."""

    name = "sd"

    def encode_prompts(self, base: BaseModels, captions: list[str], device: torch.device) -> tuple[torch.Tensor, dict]:
        """(encoder_hidden_states, added_cond_kwargs for the UNet and ControlNet)."""
        tokenizer, encoder = base.tokenizers[0], base.text_encoders[0]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        return encoder(ids)[0], {}

    def with_sizes(self, added: dict, batch: dict, device: torch.device) -> dict:
        """Added conditioning for a batch whose examples' sizes and crops are known (SDXL only)."""
        return added


class SDXLAdapter(FamilyAdapter):
    """SDXL: both text encoders' penultimate states concatenated, pooled text embeds, time ids."""

    name = "sdxl"

    def __init__(self, resolution: int):
        self.resolution = resolution

    def encode_prompts(self, base: BaseModels, captions: list[str], device: torch.device) -> tuple[torch.Tensor, dict]:
        states, pooled = [], None
        for tokenizer, encoder in zip(base.tokenizers, base.text_encoders):
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(device)
            out = encoder(ids, output_hidden_states=True)
            pooled = out[0]  # the last encoder (with projection) gives the pooled embedding
            states.append(out.hidden_states[-2])
        # Without per-example sizes: as if each image were a square of the resolution, uncropped.
        r = self.resolution
        time_ids = torch.tensor([[r, r, 0, 0, r, r]], device=device, dtype=states[0].dtype).repeat(len(captions), 1)
        return torch.cat(states, dim=-1), {"text_embeds": pooled, "time_ids": time_ids}

    def with_sizes(self, added: dict, batch: dict, device: torch.device) -> dict:
        """SDXL's size conditioning as it was trained: each image's original (height, width), the
        top-left of its crop (in the image scaled to the training resolution) and the target size."""
        if "original_sizes" not in batch:
            return added
        r = self.resolution
        target = torch.tensor([[r, r]]).repeat(len(batch["original_sizes"]), 1)
        time_ids = torch.cat([batch["original_sizes"], batch["crop_top_lefts"], target], dim=1)
        return {**added, "time_ids": time_ids.to(device, added["time_ids"].dtype)}


def load_base(path: str, resolution: int) -> BaseModels:
    """Tokenizer(s), text encoder(s), VAE, UNet and noise scheduler, all frozen."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    sdxl = unet.config.addition_embed_type == "text_time"
    tokenizers = [AutoTokenizer.from_pretrained(path, subfolder="tokenizer", use_fast=False)]
    encoders: list[torch.nn.Module] = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder")]
    if sdxl:
        tokenizers.append(AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", use_fast=False))
        encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2"))
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    for module in (*encoders, vae, unet):
        module.requires_grad_(False)
        module.eval()
    family = SDXLAdapter(resolution) if sdxl else FamilyAdapter()
    return BaseModels(tokenizers, encoders, vae, unet, scheduler, family)


def make_controlnet(base: BaseModels, conditioning_channels: int, path: str | None = None) -> torch.nn.Module:
    """A ControlNet initialised from the UNet's encoder (zero convolutions), or loaded to continue."""
    from diffusers import ControlNetModel

    if path:
        controlnet = ControlNetModel.from_pretrained(path, subfolder="controlnet" if os.path.isdir(
            os.path.join(path, "controlnet")) else None)
        if controlnet.config.conditioning_channels != conditioning_channels:
            raise ValueError(f"{path} takes {controlnet.config.conditioning_channels} condition channels; "
                             f"the chosen conditions have {conditioning_channels}")
    else:
        controlnet = ControlNetModel.from_unet(base.unet, conditioning_channels=conditioning_channels,
                                               conditioning_embedding_out_channels=condition_encoder_channels(base))
    controlnet.train()
    return controlnet


def vae_scale_factor(base: BaseModels) -> int:
    """How much the VAE down-samples: 2 per block after the first (8 for SD's VAE)."""
    return 2 ** (len(base.vae.config.block_out_channels) - 1)


def condition_encoder_channels(base: BaseModels) -> tuple[int, ...]:
    """The ControlNet condition encoder's channels: one stride-2 stage per factor 2 of the VAE, so the
    condition reaches latent resolution on any diffusers base (SD's default is 16, 32, 96, 256)."""
    factor = vae_scale_factor(base)
    stages = factor.bit_length()  # log2(factor) + 1
    if 1 << (stages - 1) != factor:
        raise ValueError(f"the base's VAE down-samples by {factor}, not a power of 2")
    default = (16, 32, 96, 256)
    return default[:stages] if stages <= len(default) else default + (256,) * (stages - len(default))

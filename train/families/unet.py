"""The UNet families: SD 1.x/2.x (one CLIP) and SDXL (two CLIPs, pooled embeds, size/crop time ids).

Epsilon/v-prediction on a UNet (train/step.py); the ControlNet is a copy of the UNet's encoder
(``ControlNetModel.from_unet``), or for SDXL optionally a union ControlNet (``ControlNetUnionModel``).
"""

from __future__ import annotations

import torch

from train.adapter import (BaseModels, Denoised, FamilyAdapter, controlnet_config, controlnet_subfolder, freeze,
                           load_text_encoders)
from train.errors import SetupError
from train.latents import images_from_latents
from train.step import ddpm_denoised, steered_prediction


class SDAdapter(FamilyAdapter):
    """SD 1.x / 2.x: one CLIP text encoder's last hidden state, epsilon/v loss on a UNet."""

    name = "sd"
    controlnet_class = "ControlNetModel"
    pipeline_class = "StableDiffusionControlNetPipeline"
    text_encoder_classes: tuple[str, ...] = ("CLIPTextModel",)
    """The ``transformers`` classes of the base's text_encoder, text_encoder_2 ... subfolders."""

    # --- loading ---------------------------------------------------------------------------

    def load(self, path: str) -> BaseModels:
        """Tokenizer(s), text encoder(s), VAE, UNet and noise scheduler, all frozen."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
        tokenizers, encoders = load_text_encoders(path, self.text_encoder_classes, use_fast=False)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        freeze(*encoders, vae, unet)
        return BaseModels(tokenizers, encoders, vae, unet, scheduler, self)

    # --- encoding --------------------------------------------------------------------------

    def encode_prompts(self, base: BaseModels, captions: list[str], device: torch.device) -> tuple[torch.Tensor, dict]:
        """(encoder_hidden_states, added_cond_kwargs for the UNet and ControlNet)."""
        tokenizer, encoder = base.tokenizers[0], base.text_encoders[0]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        return encoder(ids)[0], {}

    # --- the ControlNet and its loss ---------------------------------------------------------

    def make_controlnet(self, base: BaseModels, conditioning_channels: int, path: str | None,
                        num_layers: int | None = None, num_single_layers: int | None = None) -> torch.nn.Module:
        """A ControlNet initialised from the UNet's encoder (zero convolutions), or loaded to continue."""
        from diffusers import ControlNetModel, ControlNetUnionModel

        union = base.options.union
        if path:
            cls = ControlNetUnionModel if union else ControlNetModel
            controlnet = cls.from_pretrained(path, subfolder=controlnet_subfolder(path))
            if not union and controlnet.config.conditioning_channels != conditioning_channels:
                raise SetupError(f"{path} takes {controlnet.config.conditioning_channels} condition channels; "
                                 f"the chosen conditions have {conditioning_channels}")
            return controlnet
        if union:  # one 3-channel condition per slot; the control-type mask says which slots are given
            return union_from_unet(base.unet, condition_encoder_channels(base))
        return ControlNetModel.from_unet(base.unet, conditioning_channels=conditioning_channels,
                                         conditioning_embedding_out_channels=condition_encoder_channels(base))

    def loss(self, controlnet: torch.nn.Module, base: BaseModels, latents: torch.Tensor, hidden: torch.Tensor,
             added: dict, condition: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Epsilon/v loss at a random timestep (train/step.py); union ControlNets get their slots routed."""
        return self.denoise(controlnet, base, latents, hidden, added, condition, generator).loss

    def denoise(self, controlnet: torch.nn.Module, base: BaseModels, latents: torch.Tensor, hidden: torch.Tensor,
                added: dict, condition: torch.Tensor, generator: torch.Generator) -> Denoised:
        """The DDPM forward of the steered UNet (train/step.py ``ddpm_denoised``); a union ControlNet's slots are
        drawn after the noise and timesteps."""
        def steered(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            routed, extra = condition, None
            if base.options.union:
                routed, extra = union_slots(condition, len(base.options.conditions), generator,
                                            controlnet_config(controlnet).num_control_type)
            return self.steered(controlnet, base, noisy, timesteps, hidden, routed, added, extra)

        return ddpm_denoised(base.scheduler, latents, generator, steered)

    def steered(self, controlnet: torch.nn.Module, base: BaseModels, noisy: torch.Tensor, timesteps: torch.Tensor,
                hidden: torch.Tensor, condition: torch.Tensor, added: dict, extra: dict | None = None) -> torch.Tensor:
        """The steered UNet's prediction (epsilon or v) on ``noisy``: the locked UNet plus the ControlNet's
        residuals (``extra``: a union ControlNet's slot arguments); a control method trained otherwise
        (ControlNet-XS) overrides this alone."""
        return steered_prediction(controlnet, base.unet, noisy, timesteps, hidden, condition, added, extra)

    def card_extra(self, base: BaseModels) -> dict:
        """A union ControlNet's condition -> control-type slot mapping."""
        if not base.options.union:
            return {}
        return {"control_type_index": {c: i for i, c in enumerate(base.options.conditions)}}

    # --- validation --------------------------------------------------------------------------

    def validation_pipeline(self, base: BaseModels, controlnet: torch.nn.Module):
        """The family's ControlNet pipeline over the in-memory modules (no second copy of the base)."""
        from diffusers import StableDiffusionControlNetPipeline

        pipe = StableDiffusionControlNetPipeline(
            vae=base.vae, text_encoder=base.text_encoders[0], tokenizer=base.tokenizers[0], unet=base.unet,
            controlnet=controlnet, scheduler=sampling_scheduler(base), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def control_kwargs(self, condition: torch.Tensor, mode: int | None) -> dict:
        """Conditions stacked as channels come as one Nx(3k)xHxW tensor: the pipeline's control image
        processor passes a tensor on as it is (no normalisation; resized only to another size, and 3k is
        never the 4 channels it would take for latents), so the ControlNet sees exactly the trained
        channel layout."""
        return {"image": condition}

    def sample(self, pipe, base: BaseModels, condition: torch.Tensor, prompt: str, count: int,
               generator: torch.Generator, steps: int, mode: int | None = None) -> list:
        """``count`` PIL images for one [0, 1] condition image (1xCxHxW) and prompt."""
        height, width = condition.shape[-2:]
        latents = pipe(prompt=[prompt] * count, height=height, width=width, num_inference_steps=steps,
                       generator=generator, output_type="latent",
                       **self.control_kwargs(condition.repeat(count, 1, 1, 1), mode)).images
        return images_from_latents(pipe.vae, pipe.image_processor, latents)


class SDXLAdapter(SDAdapter):
    """SDXL: both text encoders' penultimate states concatenated, pooled text embeds, time ids."""

    name = "sdxl"
    pipeline_class = "StableDiffusionXLControlNetPipeline"
    union_class = "ControlNetUnionModel"
    union_pipeline_class = "StableDiffusionXLControlNetUnionPipeline"
    text_encoder_classes = ("CLIPTextModel", "CLIPTextModelWithProjection")
    samples_in_place = True  # an SDXL ControlNet is about 1.2B weights: validation does not copy it

    def card_pipeline_class(self, base: BaseModels) -> str:
        return self.union_pipeline_class if base.options.union else self.pipeline_class

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

    def validation_pipeline(self, base: BaseModels, controlnet: torch.nn.Module):
        """StableDiffusionXLControlNet(Union)Pipeline over the in-memory modules (no second copy)."""
        import diffusers

        cls = diffusers.StableDiffusionXLControlNetUnionPipeline if base.options.union else \
            diffusers.StableDiffusionXLControlNetPipeline
        pipe = cls(vae=base.vae, text_encoder=base.text_encoders[0], text_encoder_2=base.text_encoders[1],
                   tokenizer=base.tokenizers[0], tokenizer_2=base.tokenizers[1], unet=base.unet, controlnet=controlnet,
                   scheduler=sampling_scheduler(base), add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def control_kwargs(self, condition: torch.Tensor, mode: int | None) -> dict:
        if mode is None:
            return {"image": condition}
        # the union pipeline marks only this slot in the control-type mask and routes the image to it
        return {"control_image": [condition], "control_mode": [mode]}


def union_from_unet(unet: torch.nn.Module, encoder_channels: tuple[int, ...]) -> torch.nn.Module:
    """``ControlNetUnionModel.from_unet``, with its condition transformer as wide as the UNet's first block.

    diffusers' ``from_unet`` leaves ``num_trans_channel``/``num_proj_channel`` at SDXL's 320, so any other
    UNet width fails in the forward; the layout is taken from ``from_unet`` on the meta device (nothing
    allocated), the widths set, and the UNet's encoder weights copied as ``from_unet`` copies them.
    """
    from accelerate import init_empty_weights
    from diffusers import ControlNetUnionModel

    with init_empty_weights():
        layout = ControlNetUnionModel.from_unet(unet, conditioning_embedding_out_channels=encoder_channels,
                                                load_weights_from_unet=False)
    width = unet.config.block_out_channels[0]
    # without "_use_default_values" (the keys from_unet left at their defaults), or from_config resets them
    config = {k: v for k, v in layout.config.items() if k != "_use_default_values"}
    controlnet = ControlNetUnionModel.from_config({**config, "num_trans_channel": width, "num_proj_channel": width})
    for name in ("conv_in", "time_proj", "time_embedding", "class_embedding", "add_time_proj", "add_embedding"):
        if getattr(controlnet, name, None) is not None and getattr(unet, name, None) is not None:
            getattr(controlnet, name).load_state_dict(getattr(unet, name).state_dict())
    controlnet.down_blocks.load_state_dict(unet.down_blocks.state_dict(), strict=False)
    controlnet.mid_block.load_state_dict(unet.mid_block.state_dict(), strict=False)
    return controlnet


def union_slots(condition: torch.Tensor, count: int, generator: torch.Generator,
                num_control_type: int) -> tuple[list[torch.Tensor], dict]:
    """SDXL union routing: a random non-empty subset of the ``count`` stacked 3-channel conditions.

    ``ControlNetUnionModel`` shares ``control_type_idx`` across the batch, so the subset is drawn per
    micro-batch (per example at batch size 1): each condition is kept with probability 1/2, and one is
    drawn uniformly when none was. Returns (the kept conditions, the forward's extra kwargs).
    """
    keep = (torch.rand(count, generator=generator) < 0.5).nonzero().flatten().tolist()
    if not keep:
        keep = [int(torch.randint(0, count, (1,), generator=generator))]
    chunks = condition.split(3, dim=1)
    control_type = torch.zeros(condition.shape[0], num_control_type, device=condition.device)
    control_type[:, keep] = 1
    return [chunks[i] for i in keep], {"control_type": control_type, "control_type_idx": keep,
                                       "conditioning_scale": [1.0] * len(keep)}


def sampling_scheduler(base: BaseModels):
    """UniPC for the UNet families' validation samples (good in 20 steps), with its own step state."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler.from_config(base.scheduler.config)


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

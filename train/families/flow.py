"""The flow-matching transformer families: SD3/3.5 (MMDiT) and Flux.1.

Shared with the UNet families: data, loop, checkpoints, EMA, validation and export. Different here:
a 16-channel VAE whose latents are shifted then scaled, T5 + CLIP prompts (encoded by the family's
own diffusers pipeline, assembled from the in-memory modules), a ControlNet that reads the condition
image through the same VAE (as StableDiffusion3ControlNetPipeline / FluxControlNetPipeline pass it),
and the flow-matching loss of train/flow.py. Flux also packs 2x2 latent patches into tokens, needs
image/text position ids and (Flux.1-dev) a guidance input.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from train.adapter import BaseModels, cast_floats, controlnet_config, controlnet_subfolder
from train.errors import SetupError
from train.families_shared import FlowAdapter, one_condition_each, pack, unpack
from train.flow import flux_shift


class SD3Adapter(FlowAdapter):
    """SD3/3.5: MMDiT transformer, CLIP-L + CLIP-G (pooled, projected) + T5, fixed scheduler shift."""

    name = "sd3"
    controlnet_class = "SD3ControlNetModel"
    pipeline_class = "StableDiffusion3ControlNetPipeline"
    denoiser_class = "SD3Transformer2DModel"
    encode_pipeline_class = "StableDiffusion3Pipeline"
    text_encoder_classes = ("CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel")
    default_layers = 12  # SD3ControlNetModel.from_transformer's default

    def encode_prompts(self, base: BaseModels, captions: list[str], device: torch.device) -> tuple[torch.Tensor, dict]:
        """(CLIP-L|G penultimate states padded to T5's width, then T5's, along the sequence; pooled CLIPs)."""
        hidden, _, pooled, _ = self.encoder_pipeline(base).encode_prompt(
            prompt=list(captions), prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False,
            **self.sequence_kwargs(base))
        return hidden, {"pooled_projections": pooled}

    def make_controlnet(self, base: BaseModels, conditioning_channels: int, path: str | None,
                        num_layers: int | None = None, num_single_layers: int | None = None) -> torch.nn.Module:
        from diffusers import SD3ControlNetModel

        if path:
            loaded = SD3ControlNetModel.from_pretrained(path, subfolder=controlnet_subfolder(path))
            return freeze_dead_text_stream(loaded)
        # the base's last block is context_pre_only (it outputs no text stream): a ControlNet cannot copy it
        # SD3Transformer2DModel adds residual int(i / (blocks / count)) after each block i but its last
        blocks = base.transformer.config.num_layers
        readers = [i for i, b in enumerate(base.transformer.transformer_blocks) if b.context_pre_only is False]
        layers = self.capped_layers(num_layers, self.default_layers, blocks - 1,
                                    reads=lambda count: {int(i / (blocks / count)) for i in readers})
        # from_transformer writes num_layers into the config it is given: hand it a copy, not the base's
        view = TransformerView(base.transformer, {})
        return freeze_dead_text_stream(
            SD3ControlNetModel.from_transformer(view, num_layers=layers, num_extra_conditioning_channels=0))

    def condition_shift(self, base: BaseModels, controlnet) -> float:
        # StableDiffusion3ControlNetPipeline: ControlNets with force_zeros_for_pooled_projection (the
        # default, InstantX's convention) get unshifted condition latents and zero pooled projections
        return 0.0 if controlnet_config(controlnet).force_zeros_for_pooled_projection else base.vae.config.shift_factor

    def shift(self, base: BaseModels, latents: torch.Tensor) -> float:
        return float(base.scheduler.config.shift)  # 3.0 for SD3/3.5

    def predict(self, controlnet, base: BaseModels, noisy, sigmas, hidden, added, control: dict) -> torch.Tensor:
        config = controlnet_config(controlnet)
        pooled = added["pooled_projections"]
        timestep = sigmas * base.scheduler.config.num_train_timesteps  # the pipeline passes t = 1000 sigma
        blocks = controlnet(
            hidden_states=noisy, timestep=timestep,
            encoder_hidden_states=hidden if config.joint_attention_dim is not None else None,
            pooled_projections=torch.zeros_like(pooled) if config.force_zeros_for_pooled_projection else pooled,
            return_dict=False, **control,
        )[0]
        dtype = base.transformer.dtype  # residuals come from the fp32 ControlNet; the locked base may be bf16
        return base.transformer(
            hidden_states=noisy.to(dtype), timestep=timestep.to(dtype), encoder_hidden_states=hidden.to(dtype),
            pooled_projections=pooled.to(dtype), block_controlnet_hidden_states=[b.to(dtype) for b in blocks],
            return_dict=False,
        )[0]


class FluxAdapter(FlowAdapter):
    """Flux.1: double- and single-stream blocks over 2x2-packed latents, CLIP pooled + T5, guidance input."""

    name = "flux"
    controlnet_class = "FluxControlNetModel"
    pipeline_class = "FluxControlNetPipeline"
    union_class = "FluxControlNetModel"
    denoiser_class = "FluxTransformer2DModel"
    encode_pipeline_class = "FluxPipeline"
    text_encoder_classes = ("CLIPTextModel", "T5EncoderModel")
    default_layers = 4  # FluxControlNetModel.from_transformer's defaults
    default_single_layers = 10

    def encode_prompts(self, base: BaseModels, captions: list[str], device: torch.device) -> tuple[torch.Tensor, dict]:
        """(T5 states, CLIP's pooled output); the text position ids are zeros, made in the loss."""
        hidden, pooled, _ = self.encoder_pipeline(base).encode_prompt(
            prompt=list(captions), prompt_2=None, device=device, **self.sequence_kwargs(base))
        return hidden, {"pooled_projections": pooled}

    def make_controlnet(self, base: BaseModels, conditioning_channels: int, path: str | None,
                        num_layers: int | None = None, num_single_layers: int | None = None) -> torch.nn.Module:
        from diffusers import FluxControlNetModel

        modes = len(base.options.conditions) if base.options.union else None
        if path:
            controlnet = FluxControlNetModel.from_pretrained(path, subfolder=controlnet_subfolder(path))
            if controlnet.config.num_mode != modes:
                raise SetupError(f"{path} has num_mode {controlnet.config.num_mode}; this run needs {modes} "
                                 "(the number of --condition names with --union, else none)")
            return freeze_dead_text_stream(controlnet)
        config = base.transformer.config
        # a union ControlNet (num_mode) is the same model plus a mode embedding prepended to the text tokens
        extra = {"num_mode": modes} if modes else {}
        layers = self.capped_layers(num_layers, self.default_layers, config.num_layers,
                                    reads=flux_reads(config.num_layers))
        singles = self.capped_layers(num_single_layers, self.default_single_layers, config.num_single_layers,
                                     "controlnet_num_single_layers", reads=flux_reads(config.num_single_layers))
        return freeze_dead_text_stream(FluxControlNetModel.from_transformer(
            TransformerView(base.transformer, extra), num_layers=layers, num_single_layers=singles,
            attention_head_dim=config.attention_head_dim, num_attention_heads=config.num_attention_heads))

    def shift(self, base: BaseModels, latents: torch.Tensor) -> float:
        tokens = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)  # image_seq_len of the packed latents
        return flux_shift(tokens, base.scheduler.config)

    def layout(self, latents: torch.Tensor) -> torch.Tensor:
        return pack(latents)

    def unpacked(self, pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)

    def unlayout(self, prediction: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return unpack(prediction, latents.shape)

    def guidance_kwargs(self, base: BaseModels) -> dict:
        # validation samples with the distilled guidance the run trains at (the pipeline's default is 7.0)
        return {"guidance_scale": base.options.guidance_scale} if base.transformer.config.guidance_embeds else {}

    def control_kwargs(self, condition: torch.Tensor, mode: int | None) -> dict:
        # a union ControlNet reads only this condition, through its mode embedding
        return {**super().control_kwargs(condition, mode), **({} if mode is None else {"control_mode": mode})}

    def control_inputs(self, base: BaseModels, controlnet, condition: torch.Tensor, generator) -> dict:
        """The packed condition latents; for a union ControlNet one condition per example and its mode."""
        out = {}
        if base.options.union:
            condition, modes = one_condition_each(base, condition, generator)
            out["controlnet_mode"] = modes[:, None].to(base.transformer.device)
        out["controlnet_cond"] = pack(self.condition_latents(base, controlnet, condition, generator))
        return out

    def predict(self, controlnet, base: BaseModels, noisy, sigmas, hidden, added, control: dict) -> torch.Tensor:
        from diffusers import FluxPipeline

        batch, _, height, width = noisy.shape
        device, dtype = noisy.device, base.transformer.dtype
        img_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype)
        txt_ids = torch.zeros(hidden.shape[1], 3, device=device, dtype=dtype)
        packed, pooled = pack(noisy), added["pooled_projections"]

        def guidance(config) -> torch.Tensor | None:
            return torch.full((batch,), base.options.guidance_scale, device=device) if config.guidance_embeds else None

        blocks, singles = controlnet(
            hidden_states=packed, timestep=sigmas, guidance=guidance(controlnet_config(controlnet)),
            pooled_projections=pooled, encoder_hidden_states=hidden, txt_ids=txt_ids, img_ids=img_ids,
            return_dict=False, **control,
        )
        return base.transformer(
            hidden_states=packed.to(dtype), timestep=sigmas.to(dtype), guidance=guidance(base.transformer.config),
            pooled_projections=pooled.to(dtype), encoder_hidden_states=hidden.to(dtype), txt_ids=txt_ids,
            img_ids=img_ids, controlnet_block_samples=cast_floats(blocks, dtype),
            controlnet_single_block_samples=cast_floats(singles, dtype),  # None with no such blocks
            return_dict=False, controlnet_blocks_repeat=False,
        )[0]

    def card_extra(self, base: BaseModels) -> dict:
        if not base.options.union:
            return {}
        return {"controlnet_mode": {c: i for i, c in enumerate(base.options.conditions)}}


def flux_reads(blocks: int) -> Callable[[int], set[int]]:
    """FluxTransformer2DModel adds residual ``i // ceil(blocks / count)`` after each of its ``blocks`` blocks."""
    return lambda count: {i // math.ceil(blocks / count) for i in range(blocks)}


def freeze_dead_text_stream(controlnet: torch.nn.Module) -> torch.nn.Module:
    """Freeze the last joint block's text-stream output layers when nothing reads the text tokens after it.

    SD3's ControlNet emits residuals of the image tokens only, so its last block's ``attn.to_add_out`` and
    ``ff_context`` reach no output; the same holds for a Flux ControlNet without single-stream blocks (e.g.
    a loaded one with ``num_single_layers`` 0). They never get a gradient, so they never trained anyway
    (AdamW skips them); but DDP waits for a gradient of every trainable parameter and fails at the second
    step ("Expected to have finished reduction in the prior iteration"). Frozen, DDP does not wait for them.
    """
    blocks = getattr(controlnet, "transformer_blocks", None)
    if not blocks or len(getattr(controlnet, "single_transformer_blocks", None) or ()) > 0:
        return controlnet
    last = blocks[-1]
    for module in (getattr(getattr(last, "attn", None), "to_add_out", None), getattr(last, "ff_context", None)):
        if module is not None:
            module.requires_grad_(False)
    return controlnet


class TransformerView:
    """What ``from_transformer`` reads of a transformer: its modules, and a config copy (with ``extra``)
    that the classmethod may rewrite without touching the base's own config."""

    def __init__(self, transformer: torch.nn.Module, extra: dict):
        self._transformer = transformer
        self.config = _AttrDict({**transformer.config, **extra})

    def __getattr__(self, name: str):
        return getattr(self._transformer, name)


class _AttrDict(dict):
    """A plain dict whose keys read as attributes too (``config.num_layers``), like diffusers' FrozenDict."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc

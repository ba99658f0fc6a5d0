"""Qwen-Image: ``QwenImageTransformer2DModel`` (double-stream MMDiT over 2x2-packed latents), the video VAE
``AutoencoderKLQwenImage`` (one frame, latents normalised per channel), a Qwen2.5-VL text encoder, and
``QwenImageControlNetModel`` trained as ``QwenImageControlNetPipeline`` runs it.

Everything follows diffusers 0.42.1's pipelines/qwenimage/pipeline_qwenimage_controlnet.py:

- prompts: ``QwenImagePipeline.encode_prompt`` (the chat template, its 34-token system prefix dropped, the
  last hidden state, padded to the batch's longest prompt with an attention mask), at the pipeline call's
  ``max_sequence_length`` (512) unless ``--max_sequence_length`` says otherwise;
- condition: ``__call__`` step 3: the [-1, 1] image with a frame axis through the VAE, a posterior sample,
  ``(x - latents_mean) * (1 / latents_std)``, packed into 2x2 tokens;
- the call: ControlNet and transformer at ``timestep / 1000`` (the sigma), ``img_shapes`` of the packed
  latents, the prompt mask; the transformer adds ControlNet residual ``i // ceil(blocks / count)`` after block i;
- the loss: flow matching (train/flow.py) at the scheduler's dynamic shift: ``calculate_shift`` (Qwen-Image's
  scheduler config: base_shift 0.5, max_shift 0.9, 256 -> 8192 tokens) through its ``time_shift_type``.

Union: ``QwenImageControlNetModel`` takes no control mode (no ``num_mode``, no mode input), and
``QwenImageControlNetPipeline`` passes none; InstantX's Qwen-Image-ControlNet-Union is this class trained on
several condition types, which it tells apart from the image itself (several at once at inference:
``QwenImageMultiControlNetModel([net])`` sums its residuals per image). ``--union`` trains it that way: each
example reads one of the named conditions, drawn at random, and no mode.
"""

from __future__ import annotations

import math

import torch

from train.adapter import BaseModels, cast_floats, controlnet_subfolder
from train.families_shared import FlowAdapter, one_condition_each, pack, unpack
from train.flow import flux_shift

PIPELINE_SEQUENCE_LENGTH = 512
"""``QwenImageControlNetPipeline.__call__``'s default ``max_sequence_length``."""


class QwenImageAdapter(FlowAdapter):
    """Qwen-Image (Qwen/Qwen-Image and bases of its layout)."""

    name = "qwenimage"
    controlnet_class = "QwenImageControlNetModel"
    pipeline_class = "QwenImageControlNetPipeline"
    union_class = "QwenImageControlNetModel"  # mode-free union, as InstantX's (module docstring)
    denoiser_class = "QwenImageTransformer2DModel"
    encode_pipeline_class = "QwenImagePipeline"
    text_encoder_classes = ("Qwen2_5_VLForConditionalGeneration",)
    vae_class = "AutoencoderKLQwenImage"
    default_layers = 5  # QwenImageControlNetModel.from_transformer's default (InstantX's union has 5 blocks)

    # --- prompts and latents ------------------------------------------------------------------

    def sequence_kwargs(self, base: BaseModels) -> dict:
        return {"max_sequence_length": base.options.max_sequence_length or PIPELINE_SEQUENCE_LENGTH}

    def encode_prompts(self, base: BaseModels, captions: list[str], device: torch.device) -> tuple[torch.Tensor, dict]:
        """(Qwen2.5-VL's last hidden states after the template prefix, {its attention mask}); the mask is kept
        when every token is valid too (the pipeline then passes None: the same attention), so batches and
        cached prompts all carry one."""
        hidden, mask = self.encoder_pipeline(base).encode_prompt(prompt=list(captions), device=device,
                                                                 **self.sequence_kwargs(base))
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        return hidden, {"encoder_hidden_states_mask": mask}

    def latent_moments(self, base: BaseModels, pixels: torch.Tensor) -> torch.Tensor:
        """The video VAE's posterior moments of images as one-frame videos, its frame axis dropped."""
        return base.vae.encode(pixels.unsqueeze(2)).latent_dist.parameters[:, :, 0]

    def scale_latents(self, base: BaseModels, sample: torch.Tensor) -> torch.Tensor:
        """``(x - latents_mean) * (1 / latents_std)`` per channel, as the pipeline normalises the control image."""
        mean, inverse_std = latent_stats(base.vae, sample)
        return (sample - mean) * inverse_std

    def scaled_condition(self, base: BaseModels, controlnet, sample: torch.Tensor) -> torch.Tensor:
        return self.scale_latents(base, sample)

    def decode(self, base: BaseModels, pipe, latents: torch.Tensor) -> list:
        """``__call__``'s last step: un-normalise the (B, C, 1, h, w) latents, decode, keep the frame."""
        mean, inverse_std = latent_stats(base.vae, latents)
        images = base.vae.decode((latents / inverse_std + mean).to(base.vae.dtype), return_dict=False)[0][:, :, 0]
        return pipe.image_processor.postprocess(images.float(), output_type="pil")

    def unpacked(self, pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)

    def unlayout(self, prediction: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return unpack(prediction, latents.shape)

    def layout(self, latents: torch.Tensor) -> torch.Tensor:
        return pack(latents)

    # --- the ControlNet and its loss -----------------------------------------------------------

    def make_controlnet(self, base: BaseModels, conditioning_channels: int, path: str | None,
                        num_layers: int | None = None, num_single_layers: int | None = None) -> torch.nn.Module:
        """``QwenImageControlNetModel.from_transformer``: the base's embedders and first blocks, zero output
        layers and condition embedder; ``extra_condition_channels`` 0 (the inpainting ControlNet's mask
        channels; this ControlNet reads the condition image alone)."""
        from diffusers import QwenImageControlNetModel

        if path:
            return freeze_unread_text_stream(
                QwenImageControlNetModel.from_pretrained(path, subfolder=controlnet_subfolder(path)))
        config = base.transformer.config
        blocks = config.num_layers
        layers = self.capped_layers(num_layers, self.default_layers, blocks,
                                    reads=lambda count: {i // math.ceil(blocks / count) for i in range(blocks)})
        return freeze_unread_text_stream(QwenImageControlNetModel.from_transformer(
            base.transformer, num_layers=layers, attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads, extra_condition_channels=0))

    def shift(self, base: BaseModels, latents: torch.Tensor) -> float:
        """The scheduler's shift at this many packed tokens (``calculate_shift``'s mu, used as its
        ``time_shift_type`` uses it); its static ``shift`` without dynamic shifting. ``shift_terminal`` only
        stretches the inference schedule's end: no training sigma depends on it."""
        config = base.scheduler.config
        if not config.get("use_dynamic_shifting"):
            return float(config.shift)
        growth = flux_shift((latents.shape[-2] // 2) * (latents.shape[-1] // 2), config)  # exp(mu)
        # exponential: sigma' = e^mu u / (1 + (e^mu - 1) u); linear: the same with mu itself
        return growth if config.get("time_shift_type", "exponential") == "exponential" else math.log(growth)

    def control_inputs(self, base: BaseModels, controlnet, condition, generator) -> dict:
        """The packed condition latents (a union run: one of the conditions per example, no mode)."""
        if base.options.union:
            condition, _ = one_condition_each(base, condition, generator)
        return {"controlnet_cond": pack(self.condition_latents(base, controlnet, condition, generator))}

    def predict(self, controlnet, base: BaseModels, noisy, sigmas, hidden, added, control: dict) -> torch.Tensor:
        """ControlNet then transformer, called as ``QwenImageControlNetPipeline.__call__`` calls them."""
        batch, _, height, width = noisy.shape
        dtype, packed = base.transformer.dtype, pack(noisy)
        shapes = [(1, height // 2, width // 2)] * batch
        mask = added["encoder_hidden_states_mask"]
        blocks = controlnet(hidden_states=packed, timestep=sigmas, encoder_hidden_states=hidden,
                            encoder_hidden_states_mask=mask, img_shapes=shapes, return_dict=False, **control)
        return base.transformer(
            hidden_states=packed.to(dtype), timestep=sigmas.to(dtype), encoder_hidden_states=hidden.to(dtype),
            encoder_hidden_states_mask=mask, img_shapes=shapes, controlnet_block_samples=cast_floats(blocks, dtype),
            return_dict=False,
        )[0]

    # --- validation ---------------------------------------------------------------------------

    def guidance_kwargs(self, base: BaseModels) -> dict:
        # no negative prompt: no true CFG either way; 1.0 says so instead of the pipeline warning about its 4.0
        return {"true_cfg_scale": 1.0}

    def control_kwargs(self, condition: torch.Tensor, mode: int | None) -> dict:
        # a mode-free union reads the condition type from the image: ``mode`` is not passed on
        return super().control_kwargs(condition, None)


def latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE config's per-channel ``latents_mean`` and ``1 / latents_std``, shaped to broadcast over ``like``
    (channels on axis 1), as the pipeline builds them."""
    shape = (1, vae.config.z_dim) + (1,) * (like.ndim - 2)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
    inverse_std = (1.0 / torch.tensor(vae.config.latents_std).view(shape)).to(like.device, like.dtype)
    return mean, inverse_std


def freeze_unread_text_stream(controlnet: torch.nn.Module) -> torch.nn.Module:
    """Freeze the last block's text-stream output layers (``attn.to_add_out``, ``txt_mlp``): the ControlNet
    emits image-token residuals only, so they reach no output and get no gradient; DDP would wait for one
    and fail at the second step."""
    if len(controlnet.transformer_blocks):
        last = controlnet.transformer_blocks[-1]
        last.attn.to_add_out.requires_grad_(False)
        last.txt_mlp.requires_grad_(False)
    return controlnet

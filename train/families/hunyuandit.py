"""HunyuanDiT (v1.1/v1.2): a DiT with long skip connections, trained with DDPM epsilon/v prediction.

Not a flow-matching family: noise, timesteps and the loss target come from the base's DDPMScheduler as for the
UNets (train/step.py). Different from the UNets: two text encoders (a Chinese BERT, 77 tokens, and mT5, 256
tokens, each with its attention mask), image meta sizes and a style id, 2D rotary embeddings, a 4-channel
SDXL-like VAE, and ``HunyuanDiT2DControlNetModel``: a copy of the base's first half (one block per skip
connection) that reads the VAE-encoded condition and adds one residual to each skip the base's second half
reads. Everything is done as diffusers' ``HunyuanDiTControlNetPipeline.__call__`` does it
(diffusers/pipelines/controlnet_hunyuandit/pipeline_hunyuandit_controlnet.py): prompt encoding
(``encode_prompt``), condition encoding (step 4), rotary embedding, style and size ids (step 8) and the
ControlNet/transformer calls (step 9), whose output's first half of channels is the prediction.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from train.adapter import BaseModels, Denoised, cast_floats, controlnet_subfolder
from train.errors import SetupError
from train.families_shared import TransformerAdapter
from train.latents import CachedConditions
from train.step import ddpm_denoised


class HunyuanDiTAdapter(TransformerAdapter):
    """HunyuanDiT: BERT + mT5 prompts, DDPM loss on HunyuanDiT2DModel, HunyuanDiT2DControlNetModel."""

    name = "hunyuandit"
    controlnet_class = "HunyuanDiT2DControlNetModel"
    pipeline_class = "HunyuanDiTControlNetPipeline"
    denoiser_class = "HunyuanDiT2DModel"
    text_encoder_classes = ("BertModel", "T5EncoderModel")
    scheduler_class = "DDPMScheduler"

    # --- loading ---------------------------------------------------------------------------

    def check_denoiser(self, path: str, denoiser: torch.nn.Module) -> None:
        if not denoiser.config.learn_sigma:  # the pipeline keeps the first half of the output channels
            raise SetupError(f"{path}: its HunyuanDiT transformer has learn_sigma false; HunyuanDiTControlNetPipeline "
                             "splits the output into prediction and variance, so it cannot sample with this base")

    def prompt_pipeline(self, base: BaseModels):
        """HunyuanDiTControlNetPipeline without a ControlNet, for its ``encode_prompt``."""
        return self.controlnet_pipeline(base, None, base.scheduler)

    def pipeline_extras(self) -> dict[str, Any]:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    # --- encoding --------------------------------------------------------------------------

    def encode_prompts(self, base: BaseModels, captions: list[str], device: torch.device) -> tuple[torch.Tensor, dict]:
        """(BERT states; their mask, mT5 states and mask, image meta sizes, style ids) by the pipeline's
        ``encode_prompt`` at the transformer's text lengths (77 and 256, as ``__call__`` passes them)."""
        config, pipe = base.transformer.config, self.encoder_pipeline(base)
        (bert, _, bert_mask, _), (t5, _, t5_mask, _) = (
            pipe.encode_prompt(prompt=list(captions), device=device, dtype=base.transformer.dtype,
                               do_classifier_free_guidance=False, max_sequence_length=length, text_encoder_index=index)
            for index, length in enumerate((config.text_len, config.text_len_t5)))
        r, count = self.resolution, len(captions)
        sizes = torch.tensor([[r, r]] * count)
        return bert, {"text_embedding_mask": bert_mask, "encoder_hidden_states_t5": t5,
                      "text_embedding_mask_t5": t5_mask, "style": torch.zeros(count, dtype=torch.long, device=device),
                      "image_meta_size": image_meta_size(sizes, sizes, torch.zeros_like(sizes), r, bert.dtype, device)}

    def with_sizes(self, added: dict, batch: dict, device: torch.device) -> dict:
        """Each example's original (height, width) and crop's top-left as its image meta size (as the pipeline's
        ``original_size``, ``target_size`` and ``crops_coords_top_left``)."""
        if "original_sizes" not in batch:
            return added
        meta = image_meta_size(batch["original_sizes"], None, batch["crop_top_lefts"], self.resolution,
                               added["image_meta_size"].dtype, device)
        return {**added, "image_meta_size": meta}

    def control_inputs(self, base: BaseModels, controlnet, condition: "torch.Tensor | CachedConditions",
                       generator: torch.Generator) -> dict:
        """The condition through the VAE, scaled and not shifted (the pipeline's step 4)."""
        return {"controlnet_cond": self.condition_sample(base, condition, generator) * base.vae.config.scaling_factor}

    # --- the ControlNet and its loss ---------------------------------------------------------

    def make_controlnet(self, base: BaseModels, conditioning_channels: int, path: str | None,
                        num_layers: int | None = None, num_single_layers: int | None = None) -> torch.nn.Module:
        """A copy of the base's first half with zero-initialised outputs, or a loaded one that fits the base."""
        from diffusers import HunyuanDiT2DControlNetModel

        layers = base.transformer.config.num_layers
        if not path:
            return controlnet_from_transformer(base.transformer, conditioning_channels)
        controlnet = HunyuanDiT2DControlNetModel.from_pretrained(path, subfolder=controlnet_subfolder(path))
        if len(controlnet.blocks) != layers // 2 - 1:
            raise SetupError(f"{path} has {len(controlnet.blocks)} blocks; this base's {layers} layers read "
                             f"{layers // 2 - 1} (one per skip connection): pass a ControlNet made for this base")
        return controlnet

    def enable_gradient_checkpointing(self, controlnet: torch.nn.Module) -> None:
        """HunyuanDiT2DControlNetModel has no gradient checkpointing of its own: its blocks recompute their
        activations in the backward pass through ``torch.utils.checkpoint`` (same modules, same state dict)."""
        for block in controlnet.blocks:
            block.__class__ = checkpointed(type(block))

    def denoise(self, controlnet: torch.nn.Module, base: BaseModels, latents: torch.Tensor, hidden: torch.Tensor,
                added: dict, condition: torch.Tensor, generator: torch.Generator) -> Denoised:
        """Epsilon/v MSE (the scheduler's ``prediction_type``) at a uniform DDPM timestep (train/step.py), and the
        noisy latents, prediction and alpha-bar the reward reads."""
        def steered(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                control = self.control_inputs(base, controlnet, condition, generator)
            return self.predict(controlnet, base, noisy, timesteps, hidden, added, control)

        return ddpm_denoised(base.scheduler, latents, generator, steered)

    def predict(self, controlnet, base: BaseModels, noisy: torch.Tensor, timesteps: torch.Tensor,
                hidden: torch.Tensor, added: dict, control: dict) -> torch.Tensor:
        """The base's epsilon/v with the ControlNet's residuals, called as the pipeline's step 9 calls both: the
        same inputs (timesteps in the base's dtype, as ``t_expand``), the first half of the output channels."""
        dtype = base.transformer.dtype
        inputs = cast_floats({"hidden_states": noisy, "timestep": timesteps.to(dtype), "encoder_hidden_states": hidden,
                              **added}, dtype)
        rotary = rotary_embedding(base.transformer, *noisy.shape[-2:], noisy.device)
        own = next(controlnet.parameters()).dtype  # the fp32 ControlNet beside a half-precision base
        blocks = controlnet(**cast_floats({**inputs, **control}, own), image_rotary_emb=rotary, return_dict=False)[0]
        output = base.transformer(**inputs, image_rotary_emb=rotary,
                                  controlnet_block_samples=cast_floats(blocks, dtype), return_dict=False)[0]
        return output.chunk(2, dim=1)[0]  # learn_sigma: the predicted variance is the second half

    # --- validation --------------------------------------------------------------------------

    def call_kwargs(self, base: BaseModels) -> dict:
        return {"use_resolution_binning": False}  # sample at the condition's size, not a binned one


def controlnet_from_transformer(transformer: torch.nn.Module, conditioning_channels: int) -> torch.nn.Module:
    """``HunyuanDiT2DControlNetModel.from_transformer`` for any HunyuanDiT base: the same copy (every config field
    the two classes share, the base's weights loaded non-strictly: embeddings and the first blocks), its zero
    ``input_block`` and ``controlnet_blocks`` untouched. diffusers' own reads ``config.transformer_num_layers``,
    which HunyuanDiT2DModel calls ``num_layers``, and leaves out ``pooled_projection_dim`` and
    ``use_style_cond_and_image_meta_size``, so a v1.2 base (no style or size embedding) fails to load into it."""
    from diffusers import HunyuanDiT2DControlNetModel

    config = transformer.config
    shared = set(inspect.signature(HunyuanDiT2DControlNetModel.__init__).parameters) & set(config)
    controlnet = HunyuanDiT2DControlNetModel(conditioning_channels=conditioning_channels,
                                             transformer_num_layers=config.num_layers,
                                             **{k: config[k] for k in shared})
    controlnet.load_state_dict(transformer.state_dict(), strict=False)
    return controlnet


def image_meta_size(original: torch.Tensor, target: torch.Tensor | None, crop_top_left: torch.Tensor,
                    resolution: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(batch, 6): original (height, width), target size (None: the training square) and crop top-left, in the
    pipeline's ``add_time_ids`` order (``original_size + target_size + crops_coords_top_left``)."""
    if target is None:
        target = torch.tensor([[resolution, resolution]]).repeat(len(original), 1)
    return torch.cat([original, target, crop_top_left], dim=1).to(device, dtype)


def rotary_embedding(transformer: torch.nn.Module, height: int, width: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The 2D rotary embedding of a ``height`` x ``width`` latent grid as the pipeline builds it (step 8): the
    patch grid placed, resized and centred, in the 512 px grid the base was trained on."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    from diffusers.pipelines.controlnet_hunyuandit.pipeline_hunyuandit_controlnet import \
        get_resize_crop_region_for_grid

    patch = transformer.config.patch_size
    grid = (height // patch, width // patch)
    crops = get_resize_crop_region_for_grid(grid, 512 // 8 // patch)
    return get_2d_rotary_pos_embed(transformer.inner_dim // transformer.num_heads, crops, grid, device=device,
                                   output_type="pt")


@functools.cache
def checkpointed(cls: type) -> type:
    """A subclass of the block class ``cls`` whose forward is recomputed in the backward pass while grads are on."""
    from torch.utils.checkpoint import checkpoint

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(cls.forward, self, *args, use_reentrant=False, **kwargs)
        return cls.forward(self, *args, **kwargs)

    return type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward})

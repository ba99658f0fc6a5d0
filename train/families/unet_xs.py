"""ControlNet-XS (Zavadski et al., arXiv 2312.06573) for the UNet families: ``--control_method controlnet_xs``.

diffusers' ``ControlNetXSAdapter`` is a narrow network beside the locked UNet (``--controlnet_xs_size_ratio`` of
its width) that reads the condition and trades features with the UNet before and after every block through zero
convolutions: training starts from exactly the base, and the prediction comes from one fused UNet
(``UNetControlNetXSModel``), not from residuals added to the UNet's.

Why subclasses of the SD/SDXL adapters (picked by ``adapter_class(family, method)`` in train/families/): XS
changes what is built and trained, the forward of the loss and the validation pipeline, while prompts, latents,
size conditioning and the noise schedule stay the family's; so the loop, data, checkpoints, EMA and export are
the shared ones and ``train/loop.py`` never asks which method runs.

What trains is ``ControlNetXS``: the adapter is its only submodule (so the optimiser, EMA, checkpoints and export
hold the adapter alone), and its forward runs a ``UNetControlNetXSModel`` whose base half *is* the locked UNet's
modules and whose control half is the adapter's (``fuse``: shared, nothing copied, the base stays frozen).
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from train.adapter import BaseModels, controlnet_subfolder
from train.errors import SetupError
from train.families.unet import SDAdapter, SDXLAdapter, condition_encoder_channels, sampling_scheduler
from train.family_checks import control_method_base_problem
from train.family_specs import XS_SIZE_RATIO

# fused UNet's module -> the locked UNet's module it is (top level; diffusers' UNetControlNetXSModel.from_unet)
BASE_PARTS = {"base_time_embedding": "time_embedding", "base_conv_in": "conv_in", "base_conv_norm_out": "conv_norm_out",
              "base_conv_out": "conv_out", "base_add_embedding": "add_embedding"}
# fused UNet's module -> the adapter's module it is
CONTROL_PARTS = {"controlnet_cond_embedding": "controlnet_cond_embedding", "ctrl_conv_in": "conv_in",
                 "ctrl_time_embedding": "time_embedding", "control_to_base_for_conv_in": "control_to_base_for_conv_in"}


class ControlNetXS(torch.nn.Module):
    """The trained module of a ControlNet-XS run: the adapter (its only parameters) and, for the forward, the
    locked UNet fused with it. Its forward is the fused UNet's prediction (epsilon or v)."""

    def __init__(self, unet: torch.nn.Module, adapter: torch.nn.Module):
        super().__init__()
        self.adapter = adapter
        # not a submodule: its base half is the locked UNet, which must stay out of parameters() and state_dict()
        self.__dict__["fused"] = fuse(unet, adapter)

    @property
    def config(self):
        return self.adapter.config

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor, added_cond_kwargs: dict | None = None) -> torch.Tensor:
        return self.fused(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                          controlnet_cond=controlnet_cond, added_cond_kwargs=added_cond_kwargs or None,
                          return_dict=False)[0]

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the fused blocks' activations in the backward pass (``--gradient_checkpointing``)."""
        self.fused.enable_gradient_checkpointing()


@contextlib.contextmanager
def quiet_build():
    """Building on the meta device: diffusers' notes about dtypes and torch's about copies into meta tensors
    (no-ops by design here) are not the user's concern."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        diffusers_logging.set_verbosity(level)


def fuse(unet: torch.nn.Module, adapter: torch.nn.Module) -> torch.nn.Module:
    """diffusers' ``UNetControlNetXSModel`` of ``unet`` and ``adapter`` built on the meta device, then given the
    UNet's and the adapter's own modules in place of the copies ``from_unet`` makes: no second base in memory,
    gradients reach the adapter itself, and the base half computes exactly as the UNet does (``from_unet``'s
    copies are rebuilt with other norm epsilons, so they differ from the UNet by float rounding)."""
    from accelerate import init_empty_weights
    from diffusers import UNetControlNetXSModel

    with init_empty_weights(), quiet_build():
        fused = UNetControlNetXSModel.from_unet(unet, adapter)
    for parts, source in ((BASE_PARTS, unet), (CONTROL_PARTS, adapter)):
        for ours, theirs in parts.items():
            if getattr(source, theirs, None) is not None:
                setattr(fused, ours, getattr(source, theirs))
    share_blocks(fused, unet, adapter)
    check_shared(fused, unet, adapter)
    return fused


def share_blocks(fused: torch.nn.Module, unet: torch.nn.Module, adapter: torch.nn.Module) -> None:
    """The fused down, mid and up blocks given the UNet's and the adapter's modules (``from_modules`` copies)."""
    for block, base, ctrl in zip(fused.down_blocks, unet.down_blocks, adapter.down_blocks):
        block.base_resnets, block.ctrl_resnets = base.resnets, ctrl.resnets
        if getattr(base, "attentions", None) is not None:
            block.base_attentions, block.ctrl_attentions = base.attentions, ctrl.attentions
        if base.downsamplers is not None:
            block.base_downsamplers, block.ctrl_downsamplers = base.downsamplers[0], ctrl.downsamplers
        block.base_to_ctrl, block.ctrl_to_base = ctrl.base_to_ctrl, ctrl.ctrl_to_base
    mid = fused.mid_block
    mid.base_midblock, mid.ctrl_midblock = unet.mid_block, adapter.mid_block.midblock
    mid.base_to_ctrl, mid.ctrl_to_base = adapter.mid_block.base_to_ctrl, adapter.mid_block.ctrl_to_base
    for block, base, ctrl in zip(fused.up_blocks, unet.up_blocks, adapter.up_connections):
        block.resnets, block.ctrl_to_base = base.resnets, ctrl.ctrl_to_base
        if getattr(base, "attentions", None) is not None:
            block.attentions = base.attentions
        if base.upsamplers is not None:
            block.upsamplers = base.upsamplers[0]


def check_shared(fused: torch.nn.Module, unet: torch.nn.Module, adapter: torch.nn.Module) -> None:
    """Every tensor of the fused UNet is the UNet's or the adapter's, and every adapter weight is used: a diffusers
    whose ``UNetControlNetXSModel`` is laid out otherwise stops here rather than training meta tensors."""
    known = {id(p) for p in unet.parameters()} | {id(p) for p in adapter.parameters()}
    stray = [n for n, p in fused.named_parameters() if id(p) not in known]
    stray += [n for n, b in fused.named_buffers() if b.is_meta]
    unused = {id(p) for p in adapter.parameters()} - {id(p) for p in fused.parameters()}
    if stray or unused:
        raise RuntimeError(f"diffusers' UNetControlNetXSModel is not laid out as train/families/unet_xs.py expects "
                           f"({len(stray)} tensors not shared, e.g. {stray[:3]}; {len(unused)} adapter weights "
                           "unused): train with a diffusers release it knows (0.42)")


def new_adapter(base: BaseModels, conditioning_channels: int, size_ratio: float) -> torch.nn.Module:
    """``ControlNetXSAdapter.from_unet`` at ``size_ratio`` of the UNet's width, its condition encoder reaching
    the latent resolution of this VAE; widths that leave an attention head no channel are refused."""
    from diffusers import ControlNetXSAdapter

    config = base.unet.config
    widths = [int(w * size_ratio) for w in config.block_out_channels]
    heads = config.attention_head_dim  # what diffusers' XS reads as the head count (its from_unet says why)
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(widths)
    if any(w < h for w, h in zip(widths, heads)):
        least = max(h / w for h, w in zip(heads, config.block_out_channels))
        raise SetupError(f"--controlnet_xs_size_ratio {size_ratio}: the adapter's blocks would be {widths} channels "
                         f"wide, fewer than the UNet's {heads} attention heads; give at least {least:.3g}")
    with quiet_build():
        return ControlNetXSAdapter.from_unet(base.unet, size_ratio=size_ratio,
                                             conditioning_channels=conditioning_channels,
                                             conditioning_embedding_out_channels=condition_encoder_channels(base))


def saved_adapter(base: BaseModels, conditioning_channels: int, path: str) -> torch.nn.Module:
    """A ``ControlNetXSAdapter`` folder to continue from, checked against this base and the conditions."""
    from diffusers import ControlNetXSAdapter

    adapter = ControlNetXSAdapter.from_pretrained(path, subfolder=controlnet_subfolder(path))
    unet, config = base.unet.config, adapter.config
    if (list(config.base_block_out_channels) != list(unet.block_out_channels)
            or config.cross_attention_dim != unet.cross_attention_dim):
        raise SetupError(f"{path}: this ControlNet-XS adapter was made for a UNet of widths "
                         f"{list(config.base_block_out_channels)} and text width {config.cross_attention_dim}; this "
                         f"base's are {list(unet.block_out_channels)} and {unet.cross_attention_dim}")
    if config.conditioning_channels != conditioning_channels:
        raise SetupError(f"{path} takes {config.conditioning_channels} condition channels; the chosen conditions "
                         f"have {conditioning_channels}")
    return adapter


class ControlNetXSMethod:
    """What ControlNet-XS changes in a UNet family's adapter (mixed in before ``SDAdapter``/``SDXLAdapter``)."""

    method = "controlnet_xs"
    controlnet_class = "ControlNetXSAdapter"
    samples_in_place = True  # validation samples with the fused UNet itself: no second base, no adapter copy

    def make_controlnet(self, base: BaseModels, conditioning_channels: int, path: str | None,
                        num_layers: int | None = None, num_single_layers: int | None = None) -> torch.nn.Module:
        """A new adapter (zero convolutions: the fused UNet starts as the base), or one loaded to continue, in
        fp32 beside the locked UNet (``from_unet`` gives it the UNet's dtype)."""
        problem = control_method_base_problem(self.method, dict(base.unet.config))
        if problem:
            raise SetupError(problem)
        ratio = base.options.controlnet_xs_size_ratio or XS_SIZE_RATIO
        adapter = (saved_adapter(base, conditioning_channels, path) if path
                   else new_adapter(base, conditioning_channels, ratio))
        return ControlNetXS(base.unet, adapter.to(torch.float32))

    def steered(self, controlnet: torch.nn.Module, base: BaseModels, noisy: torch.Tensor, timesteps: torch.Tensor,
                hidden: torch.Tensor, condition: torch.Tensor, added: dict, extra: dict | None = None) -> torch.Tensor:
        """The fused UNet's prediction (through the trained module, so accelerate's wrappers apply); the family's
        ``denoise`` (loss and reward) reads it. ``extra`` is a union's, and XS trains no union."""
        return controlnet(noisy, timesteps, hidden, condition, added)

    def exported(self, controlnet: torch.nn.Module) -> torch.nn.Module:
        """The adapter alone: ``ControlNetXSAdapter.from_pretrained`` loads it into the XS pipelines."""
        return controlnet.adapter

    @contextlib.contextmanager
    def sampling(self, base: BaseModels, controlnet: torch.nn.Module):
        """The fp32 adapter sampling inside a half-precision base: the fused UNet's forward runs under autocast
        to the base's dtype (as accelerate runs the training forward), removed afterwards."""
        fused, dtype = controlnet.fused, base.unet.dtype
        was_training = controlnet.training
        controlnet.eval()
        if next(controlnet.parameters()).dtype != dtype:
            fused.forward = torch.autocast(base.unet.device.type, dtype=dtype)(type(fused).forward.__get__(fused))
        try:
            yield
        finally:
            fused.__dict__.pop("forward", None)
            controlnet.train(was_training)


class SDXSAdapter(ControlNetXSMethod, SDAdapter):
    """SD 1.x/2.x with a ControlNet-XS adapter, sampled by ``StableDiffusionControlNetXSPipeline``."""

    pipeline_class = "StableDiffusionControlNetXSPipeline"

    def validation_pipeline(self, base: BaseModels, controlnet: torch.nn.Module):
        """The XS pipeline over the fused UNet in memory (given a plain UNet it would fuse a copy)."""
        from diffusers import StableDiffusionControlNetXSPipeline

        pipe = StableDiffusionControlNetXSPipeline(
            vae=base.vae, text_encoder=base.text_encoders[0], tokenizer=base.tokenizers[0], unet=controlnet.fused,
            controlnet=controlnet.adapter, scheduler=sampling_scheduler(base), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe


class SDXLXSAdapter(ControlNetXSMethod, SDXLAdapter):
    """SDXL with a ControlNet-XS adapter, sampled by ``StableDiffusionXLControlNetXSPipeline``."""

    pipeline_class = "StableDiffusionXLControlNetXSPipeline"

    def validation_pipeline(self, base: BaseModels, controlnet: torch.nn.Module):
        """The XS pipeline over the fused UNet in memory (given a plain UNet it would fuse a copy)."""
        from diffusers import StableDiffusionXLControlNetXSPipeline

        pipe = StableDiffusionXLControlNetXSPipeline(
            vae=base.vae, text_encoder=base.text_encoders[0], text_encoder_2=base.text_encoders[1],
            tokenizer=base.tokenizers[0], tokenizer_2=base.tokenizers[1], unet=controlnet.fused,
            controlnet=controlnet.adapter, scheduler=sampling_scheduler(base), add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

"""Z-Image (Tongyi-MAI/Z-Image, Z-Image-Turbo): a single-stream transformer over image and caption tokens, the
Flux-like 16-channel VAE, a Qwen3 text encoder, and ``ZImageControlNetModel``.

Everything here follows diffusers' own code (0.42.1): prompts as ``ZImagePipeline.encode_prompt`` makes them
(pipelines/z_image/pipeline_z_image.py: Qwen3's chat template, the second-to-last hidden state, each prompt's
padding dropped), the condition as ``ZImageControlNetPipeline.__call__`` encodes it (pipeline_z_image_controlnet.py:
the VAE's mode, shifted and scaled, with a frame axis), and the ControlNet and transformer called as its
denoising loop calls them: one (C, 1, H, W) latent per example, timestep ``1 - sigma``, and the transformer's
output negated to give the flow's velocity. The loss is train/flow.py's flow matching with the scheduler's shift.

``ZImageControlNetModel`` holds control blocks only; ``from_transformer`` lends it the base's embedders and
refiners, which it runs in its own forward. Here they are lent without becoming the ControlNet's parameters,
so training, EMA, checkpoints and the export hold the control weights alone, as the published ones do.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from train.adapter import BaseModels, cast_floats, controlnet_config, controlnet_subfolder
from train.errors import SetupError
from train.families_shared import FlowAdapter
from train.family_checks import layer_places_problem
from train.family_specs import SPECS
from train.flow import flux_shift
from train.latents import CachedConditions

log = logging.getLogger("train")

PLACE_EVERY = 5
"""Default spacing of the control blocks: alibaba-pai's Z-Image-Turbo-Fun-Controlnet-Union places its 6 blocks at
layers 0, 5, ..., 25 of Z-Image's 30 (``control_layers_places``; VideoX-Fun config/z_image/z_image_control.yaml)."""


class ZImageAdapter(FlowAdapter):
    """Z-Image: ZImageTransformer2DModel, Qwen3 prompts, a ControlNet whose blocks sit at chosen base layers."""

    name = "zimage"
    controlnet_class = "ZImageControlNetModel"
    pipeline_class = "ZImageControlNetPipeline"
    denoiser_class = "ZImageTransformer2DModel"
    encode_pipeline_class = "ZImagePipeline"
    text_encoder_classes = ("Qwen3Model",)

    # --- prompts and conditions ------------------------------------------------------------------

    def encode_prompts(self, base: BaseModels, captions: list[str], device: torch.device) -> tuple[torch.Tensor, dict]:
        """ZImagePipeline.encode_prompt's per-prompt embeddings, padded to the prompt length so a batch (and the
        ``--cache_latents`` cache) holds one tensor; ``prompt_mask`` marks each prompt's own tokens."""
        length = base.options.max_sequence_length or 512  # the pipeline's default
        embeds, _ = self.encoder_pipeline(base).encode_prompt(list(captions), device=device,
                                                              do_classifier_free_guidance=False,
                                                              max_sequence_length=length)  # it rewrites its list
        hidden = embeds[0].new_zeros(len(embeds), length, embeds[0].shape[-1])
        mask = torch.zeros(len(embeds), length, dtype=torch.bool, device=hidden.device)
        for k, e in enumerate(embeds):
            hidden[k, :len(e)], mask[k, :len(e)] = e, True
        return hidden, {"prompt_mask": mask}

    def condition_sample(self, base: BaseModels, condition: "torch.Tensor | CachedConditions",
                         generator: torch.Generator) -> torch.Tensor:
        """The [0, 1] condition image through the VAE at its mode (``sample_mode="argmax"``), or its cached
        distribution's mean (shifted and scaled by ``condition_latents``: (B, 16, H/8, W/8))."""
        if isinstance(condition, CachedConditions):
            return condition.mode().to(base.vae.device, base.vae.dtype)
        pixels = (condition * 2.0 - 1.0).to(base.vae.device, base.vae.dtype)
        return base.vae.encode(pixels).latent_dist.mode()

    def control_inputs(self, base: BaseModels, controlnet, condition: "torch.Tensor | CachedConditions",
                       generator: torch.Generator) -> dict:
        """``control_context``: one (control_in_dim, 1, h, w) tensor per example; channels past the latents' are
        zeros, as the pipeline pads them for the Fun 2.x ControlNets (control_in_dim 33)."""
        latents = self.condition_latents(base, controlnet, condition, generator)
        extra = controlnet_config(controlnet).control_in_dim - latents.shape[1]
        if extra > 0:
            latents = torch.cat([latents, latents.new_zeros(latents.shape[0], extra, *latents.shape[2:])], dim=1)
        return {"control_context": list(latents.unsqueeze(2).unbind(0))}

    # --- the ControlNet and its loss -------------------------------------------------------------

    def make_controlnet(self, base: BaseModels, conditioning_channels: int, path: str | None,
                        num_layers: int | None = None, num_single_layers: int | None = None) -> torch.nn.Module:
        from diffusers import ZImageControlNetModel

        if path:
            controlnet = ZImageControlNetModel.from_pretrained(path, subfolder=controlnet_subfolder(path))
        else:
            controlnet = initial_controlnet(base.transformer, self.places(base))
        return lend_base_parts(controlnet, base.transformer)

    def places(self, base: BaseModels) -> tuple[int, ...]:
        """``--control_layers_places``, else every ``PLACE_EVERY``-th layer; checked against this base's depth."""
        depth = base.transformer.config.n_layers
        places = tuple(base.options.control_layers_places) or tuple(range(0, depth, PLACE_EVERY))
        problem = layer_places_problem(places, SPECS[self.name], dict(base.transformer.config))
        if problem:
            raise SetupError(problem)
        log.info("Z-Image ControlNet: %d control blocks at base layers %s", len(places), ",".join(map(str, places)))
        return places

    def shift(self, base: BaseModels, latents: torch.Tensor) -> float:
        """The scheduler's shift: fixed (Z-Image-Turbo: 3.0), or exp(mu) of the pipeline's ``calculate_shift``
        when the scheduler shifts dynamically."""
        config = base.scheduler.config
        if config.get("use_dynamic_shifting"):
            return flux_shift((latents.shape[-2] // 2) * (latents.shape[-1] // 2), config)
        return float(config.shift)

    def predict(self, controlnet, base: BaseModels, noisy: torch.Tensor, sigmas: torch.Tensor, hidden: torch.Tensor,
                added: dict, control: dict) -> torch.Tensor:
        """The velocity (B, C, H, W) as ZImageControlNetPipeline's loop computes it: the ControlNet's residuals
        by base layer, the transformer with them, its output negated. The ControlNet runs the base's (possibly
        half-precision) embedders and refiners beside its fp32 blocks, so it runs under autocast to the base's
        dtype when the two differ."""
        dtype = base.transformer.dtype
        x = list(noisy.to(dtype).unsqueeze(2).unbind(0))
        t = 1 - sigmas  # the pipeline's (1000 - timestep) / 1000
        embeds = [h[m].to(dtype) for h, m in zip(hidden, added["prompt_mask"])]
        with base_precision(controlnet, dtype, noisy.device):
            residuals = controlnet(x, t, embeds, **control)
        out = base.transformer(x, t, embeds, controlnet_block_samples=cast_floats(residuals, dtype),
                               return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)

    # --- validation ------------------------------------------------------------------------------

    def validation_pipeline(self, base: BaseModels, controlnet: torch.nn.Module):
        """ZImageControlNetPipeline over the in-memory modules (its own scheduler state)."""
        pipe = super().validation_pipeline(base, controlnet)
        hide_base_parts(controlnet)  # the pipeline's from_transformer made them the ControlNet's
        return pipe

    @contextlib.contextmanager
    def sampling(self, base: BaseModels, controlnet: torch.nn.Module):
        """The shared hooks (train/adapter.py), with the ControlNet's forward under autocast to the base's dtype:
        its inputs arrive in fp32 and it runs the base's half-precision parts."""
        with super().sampling(base, controlnet), base_precision(controlnet, base.transformer.dtype,
                                                                base.transformer.device):
            yield


def initial_controlnet(transformer: torch.nn.Module, places: tuple[int, ...]) -> torch.nn.Module:
    """A ZImageControlNetModel shaped like ``transformer`` whose control blocks start as copies of the base layers
    they feed, its condition embedder and refiners as copies of the base's (a trainable copy, as the ControlNet
    paper makes it); ``before_proj``/``after_proj`` stay zero, so it starts by adding nothing."""
    from diffusers import ZImageControlNetModel

    config = transformer.config
    controlnet = ZImageControlNetModel(
        control_layers_places=list(places), control_in_dim=config.in_channels, all_patch_size=config.all_patch_size,
        all_f_patch_size=config.all_f_patch_size, dim=config.dim, n_refiner_layers=config.n_refiner_layers,
        n_heads=config.n_heads, n_kv_heads=config.n_kv_heads, norm_eps=config.norm_eps, qk_norm=config.qk_norm)
    pairs = [(block, transformer.layers[p]) for block, p in zip(controlnet.control_layers, places)]
    pairs += [(controlnet.control_noise_refiner, transformer.noise_refiner),
              (controlnet.control_all_x_embedder, transformer.all_x_embedder)]
    for own, source in pairs:
        missing, unexpected = own.load_state_dict(source.state_dict(), strict=False)
        if unexpected or any(not k.startswith(("before_proj", "after_proj")) for k in missing):
            raise SetupError(f"cannot copy the base's {type(source).__name__} into the ControlNet: "
                             f"missing {missing}, unexpected {unexpected}")
    return controlnet


LENT = ("t_embedder", "all_x_embedder", "cap_embedder", "noise_refiner", "context_refiner", "x_pad_token",
        "cap_pad_token")
"""The modules and parameters ZImageControlNetModel.from_transformer takes from the base (diffusers 0.42.1;
``t_scale`` and ``rope_embedder`` are plain attributes already)."""


def lend_base_parts(controlnet: torch.nn.Module, transformer: torch.nn.Module) -> torch.nn.Module:
    """``ZImageControlNetModel.from_transformer``, with the lent parts kept out of the ControlNet's parameters."""
    from diffusers import ZImageControlNetModel

    # diffusers 0.42.1's ZImageControlNetModel reads self.gradient_checkpointing in a forward with gradients but
    # only enable_gradient_checkpointing sets it: without it the first training step fails
    if "gradient_checkpointing" not in vars(controlnet):
        controlnet.gradient_checkpointing = False
    return hide_base_parts(ZImageControlNetModel.from_transformer(controlnet, transformer))


def hide_base_parts(controlnet: torch.nn.Module) -> torch.nn.Module:
    """The base's parts ``from_transformer`` registered on the ControlNet as plain attributes: its forward still
    reads them, but they are not its parameters, state dict, EMA, optimizer state, DDP buckets or export, and
    moving the ControlNet to a device or dtype leaves the base's parts as they are."""
    for name in LENT:
        if name in controlnet._modules or name in controlnet._parameters:
            value = getattr(controlnet, name)
            controlnet._modules.pop(name, None)
            controlnet._parameters.pop(name, None)
            object.__setattr__(controlnet, name, value)
    return controlnet


@contextlib.contextmanager
def base_precision(controlnet: torch.nn.Module, dtype: torch.dtype, device: torch.device):
    """Autocast to the base's dtype while the ControlNet's own weights are in another (fp32 beside a bf16 base)."""
    own = next(controlnet.parameters()).dtype
    with torch.autocast(device.type, dtype=dtype, enabled=own != dtype):
        yield

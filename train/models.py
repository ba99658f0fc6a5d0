"""Load the frozen base and the trainable ControlNet; each model family is one adapter object.

A ``FamilyAdapter`` knows how its family loads, encodes prompts, latents and conditions, builds the
ControlNet, computes the loss and assembles its validation pipeline; the loop, data, checkpoints,
EMA and export are shared. ``FAMILIES`` maps the family ``detect_family`` reads from the base folder
to its adapter: SD 1.x/2.x (one CLIP), SDXL (two CLIPs, pooled embeds, size/crop time ids), and the
flow-matching transformers SD3/3.5 and Flux.1 (train/transformer_families.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

import torch

from train.config import FAMILY_NAMES, SetupError, base_folder_problem, detect_family


@dataclasses.dataclass
class FamilyOptions:
    """Run settings the adapters read (set by the loop from the ``TrainConfig``)."""

    conditions: tuple[str, ...] = ()
    union: bool = False
    max_sequence_length: int | None = None
    guidance_scale: float = 3.5
    """Flux.1-dev's guidance input (``--guidance_scale``, else ``DEFAULT_GUIDANCE``)."""


@dataclasses.dataclass
class BaseModels:
    """The locked base (never trained) and its noise schedule."""

    tokenizers: list[Any]
    text_encoders: list[torch.nn.Module]
    vae: torch.nn.Module
    unet: torch.nn.Module | None
    """The denoiser of the UNet families (None for the transformer families)."""
    scheduler: Any
    family: "FamilyAdapter"
    transformer: torch.nn.Module | None = None
    """The denoiser of the transformer families (SD3, Flux)."""
    options: FamilyOptions = dataclasses.field(default_factory=FamilyOptions)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet if self.unet is not None else self.transformer

    def place(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move the base to ``device`` in ``dtype``; a VAE whose config says ``force_upcast`` (SDXL's
        gives NaNs in fp16) stays fp32: encode in fp32, then cast the latents."""
        for module in (*self.text_encoders, self.denoiser):
            module.to(device, dtype=dtype)
        upcast = getattr(self.vae.config, "force_upcast", False)
        self.vae.to(device, dtype=torch.float32 if upcast else dtype)


class FamilyAdapter:
    """SD 1.x / 2.x: one CLIP text encoder's last hidden state, epsilon/v loss on a UNet."""

    name = "sd"
    controlnet_class = "ControlNetModel"
    pipeline_class = "StableDiffusionControlNetPipeline"
    union_class: str | None = None
    """The diffusers class of this family's union ControlNet, None when it has none."""
    samples_in_place = False
    """Validation samples with the trained ControlNet itself (EMA weights swapped in and back, ``sampling``
    casting between dtypes) rather than with a copy in the base's dtype: large ControlNets are not copied."""
    encodes_conditions = False
    """The ControlNet reads its condition through the VAE (SD3, Flux): ``--cache_latents`` caches those too."""

    def __init__(self, resolution: int = 512):
        self.resolution = resolution

    # --- loading ---------------------------------------------------------------------------

    def load(self, path: str) -> BaseModels:
        """Tokenizer(s), text encoder(s), VAE, UNet and noise scheduler, all frozen."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
        tokenizers = [AutoTokenizer.from_pretrained(path, subfolder="tokenizer", use_fast=False)]
        encoders: list[torch.nn.Module] = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder")]
        if self.name == "sdxl":
            tokenizers.append(AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", use_fast=False))
            encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2"))
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

    def with_sizes(self, added: dict, batch: dict, device: torch.device) -> dict:
        """Added conditioning for a batch whose examples' sizes and crops are known (SDXL only)."""
        return added

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
        from train.step import controlnet_loss, sample_noise

        noise, timesteps = sample_noise(latents, base.scheduler.config.num_train_timesteps, generator)
        extra = None
        if base.options.union:
            condition, extra = union_slots(condition, len(base.options.conditions), generator,
                                           controlnet_config(controlnet).num_control_type)
        return controlnet_loss(controlnet, base.unet, base.scheduler, latents, hidden, condition, noise, timesteps,
                               added, extra)

    def card_pipeline_class(self, base: BaseModels) -> str:
        """The diffusers pipeline the model card tells users to load the ControlNet in."""
        return self.pipeline_class

    def card_extra(self, base: BaseModels) -> dict:
        """What the model card records beyond the shared fields (union slot mapping)."""
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
        """The pipeline's control arguments for a batch of [0, 1] condition images; ``mode``: the union
        slot they fill (the only one given), None for a single-condition ControlNet. Conditions stacked as
        channels come as one Nx(3k)xHxW tensor: the pipeline's control image processor passes a tensor on
        as it is (no normalisation; resized only to another size, and 3k is never the 4 channels it would
        take for latents), so the ControlNet sees exactly the trained channel layout."""
        return {"image": condition}

    def sample(self, pipe, base: BaseModels, condition: torch.Tensor, prompt: str, count: int,
               generator: torch.Generator, steps: int, mode: int | None = None) -> list:
        """``count`` PIL images for one [0, 1] condition image (1xCxHxW) and prompt."""
        from train.validation import decode

        height, width = condition.shape[-2:]
        latents = pipe(prompt=[prompt] * count, height=height, width=width, num_inference_steps=steps,
                       generator=generator, output_type="latent",
                       **self.control_kwargs(condition.repeat(count, 1, 1, 1), mode)).images
        return decode(pipe, latents)

    @contextlib.contextmanager
    def sampling(self, base: BaseModels, controlnet: torch.nn.Module):
        """The trained fp32 ControlNet sampling beside a half-precision base without a copy: its float
        inputs are cast to its dtype and its residuals to the base's, by hooks removed afterwards (and
        the images StableDiffusion3ControlNetPipeline encodes in the transformer's dtype reach an fp32
        VAE, kept so by ``force_upcast``, in the VAE's)."""
        own, theirs = next(controlnet.parameters()).dtype, base.denoiser.dtype

        def to(dtype: torch.dtype):
            return lambda _, args, kwargs: (cast_floats(args, dtype), cast_floats(kwargs, dtype))

        handles = [controlnet.register_forward_pre_hook(to(own), with_kwargs=True),
                   controlnet.register_forward_hook(lambda _, __, out: cast_floats(out, theirs)),
                   base.vae.encoder.register_forward_pre_hook(to(base.vae.dtype), with_kwargs=True)]
        was_training = controlnet.training
        controlnet.eval()
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            controlnet.train(was_training)


class SDXLAdapter(FamilyAdapter):
    """SDXL: both text encoders' penultimate states concatenated, pooled text embeds, time ids."""

    name = "sdxl"
    pipeline_class = "StableDiffusionXLControlNetPipeline"
    union_class = "ControlNetUnionModel"
    union_pipeline_class = "StableDiffusionXLControlNetUnionPipeline"
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


def cast_floats(value, dtype: torch.dtype):
    """``value`` with every floating-point tensor in it (nested in tuples, lists, dicts) cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(cast_floats(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: cast_floats(v, dtype) for k, v in value.items()}
    return value


def latents_from_sample(vae_config: Any, sample: torch.Tensor) -> torch.Tensor:
    """A VAE latent sample as the denoiser reads it: shifted (SD3/Flux's 16-channel VAEs have a
    ``shift_factor``; SD's is None), then scaled."""
    shift = getattr(vae_config, "shift_factor", None)
    return (sample - shift if shift else sample) * vae_config.scaling_factor


def freeze(*modules: torch.nn.Module) -> None:
    for module in modules:
        module.requires_grad_(False)
        module.eval()


def controlnet_config(controlnet: torch.nn.Module):
    """The config of a ControlNet, through accelerate's wrappers."""
    return getattr(controlnet, "module", controlnet).config


def controlnet_subfolder(path: str) -> str | None:
    return "controlnet" if os.path.isdir(os.path.join(path, "controlnet")) else None


def _transformer_family(name: str):
    def make(resolution: int) -> FamilyAdapter:
        from train import transformer_families

        return transformer_families.ADAPTERS[name](resolution)
    return make


FAMILIES: dict[str, Any] = {
    "sd": FamilyAdapter,
    "sdxl": SDXLAdapter,
    "sd3": _transformer_family("sd3"),
    "flux": _transformer_family("flux"),
}
"""Family name (``detect_family``) -> adapter factory taking the training resolution."""


def load_base(path: str, resolution: int) -> BaseModels:
    """The frozen base of whichever family ``path`` holds (read from its model_index.json / subfolders);
    a folder missing a part, or one that does not load, is a ``SetupError`` saying what is wrong."""
    family = detect_family(path)
    problem = base_folder_problem(path, family)
    if problem:
        raise SetupError(problem)
    try:
        return FAMILIES[family](resolution).load(path)
    except (OSError, ValueError) as exc:
        raise SetupError(f"{path}: cannot load it as a {FAMILY_NAMES[family]} base: {exc}") from exc


def make_controlnet(base: BaseModels, conditioning_channels: int, path: str | None = None,
                    num_layers: int | None = None, num_single_layers: int | None = None) -> torch.nn.Module:
    """The family's ControlNet: initialised from the base (zero-initialised outputs), or loaded to continue
    (a folder of another family, or one that does not load, is a ``SetupError``)."""
    from train.config import controlnet_family_problem

    problem = controlnet_family_problem(path, base.family.name, base.options.union)
    if problem:
        raise SetupError(problem)
    try:
        controlnet = base.family.make_controlnet(base, conditioning_channels, path, num_layers, num_single_layers)
    except OSError as exc:  # from_pretrained: no such folder or hub id, no weights
        raise SetupError(f"--controlnet_model_name_or_path {path}: cannot load it: {exc}") from exc
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

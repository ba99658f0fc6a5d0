"""What every model family provides and shares: the abstract ``FamilyAdapter``, the locked base it loads
(``BaseModels``), the run options it reads (``FamilyOptions``) and the module helpers all families use.

A leaf of the families package (train/families/): it imports nothing of the families, so each family
file imports it and the registry imports the families without a cycle.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import os
from typing import Any, Sequence

import torch

from train.latents import latents_from_sample

@dataclasses.dataclass
class FamilyOptions:
    """Run settings the adapters read (set by the loop from the ``TrainConfig``)."""

    conditions: tuple[str, ...] = ()
    union: bool = False
    max_sequence_length: int | None = None
    guidance_scale: float = 3.5
    """Flux.1-dev's guidance input (``--guidance_scale``, else ``DEFAULT_GUIDANCE``)."""
    control_layers_places: tuple[int, ...] = ()
    """Z-Image: the base layers a new ControlNet's blocks feed (``--control_layers_places``; empty: the default)."""
    control_lora_rank: int | None = None
    """Channel-concat control: the transformer's LoRA rank (``--control_lora_rank``; 0: full fine-tune; None: 4)."""
    controlnet_xs_size_ratio: float | None = None
    """A new ControlNet-XS adapter's width / the UNet's (``--controlnet_xs_size_ratio``); None: the default."""


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


@dataclasses.dataclass
class Denoised:
    """One training forward of a family: its loss, and what the one-step clean prediction needs (per example)."""

    loss: torch.Tensor
    """The batch's diffusion loss, exactly as ``FamilyAdapter.loss`` returns it."""
    noisy: torch.Tensor
    """The noised latents the denoiser read, in the latents' shape."""
    prediction: torch.Tensor
    """The ControlNet-steered denoiser's output (epsilon, v or velocity), in the latents' shape."""
    parameterisation: str
    """What ``prediction`` is: a key of train/reward.py ``CLEAN_FROM`` (epsilon, v_prediction, flow)."""
    level: torch.Tensor
    """Each example's noise level as its x0 formula takes it: alpha-bar (epsilon, v), sigma (flow)."""
    timesteps: torch.Tensor
    """Each example's noise level on the scheduler's training scale (0..num_train_timesteps; flow: sigma x it)."""


class FamilyAdapter(abc.ABC):
    """One model family: how it loads, encodes prompts, latents and conditions, builds the ControlNet,
    computes the loss and assembles its validation pipeline. The loop, data, checkpoints, EMA and export
    are shared; a family subclasses this, fills in the abstract methods and registers in train/families."""

    name: str
    """The family's key in ``FAMILY_NAMES`` (what ``detect_family`` reads from a base folder)."""
    controlnet_class: str
    """The diffusers class of this family's ControlNet."""
    pipeline_class: str
    """The diffusers ControlNet pipeline its validation samples with and its model card names."""
    union_class: str | None = None
    """The diffusers class of this family's union ControlNet, None when it has none."""
    samples_in_place = False
    """Validation samples with the trained ControlNet itself (EMA weights swapped in and back, ``sampling``
    casting between dtypes) rather than with a copy in the base's dtype: large ControlNets are not copied."""
    encodes_conditions = False
    """The ControlNet reads its condition through the VAE (SD3, Flux): ``--cache_latents`` caches those too."""
    method = "controlnet"
    """The ``--control_method`` it trains (train/families/__init__.py ``adapter_class`` picks the adapter)."""

    def __init__(self, resolution: int = 512):
        self.resolution = resolution

    @abc.abstractmethod
    def load(self, path: str) -> BaseModels:
        """The frozen base from a local diffusers folder or hub id: tokenizers, text encoders, VAE, denoiser
        and noise scheduler, with this adapter as its ``family``."""

    @abc.abstractmethod
    def encode_prompts(self, base: BaseModels, captions: list[str], device: torch.device) -> tuple[torch.Tensor, dict]:
        """(encoder_hidden_states, added conditioning for the denoiser and the ControlNet) of ``captions``."""

    def scale_latents(self, base: BaseModels, sample: torch.Tensor) -> torch.Tensor:
        """A draw of ``encode_latents`` as the denoiser reads it (shifted and scaled by default)."""
        return latents_from_sample(base.vae.config, sample)

    def with_sizes(self, added: dict, batch: dict, device: torch.device) -> dict:
        """Added conditioning for a batch whose examples' sizes and crops are known (SDXL only)."""
        return added

    @abc.abstractmethod
    def make_controlnet(self, base: BaseModels, conditioning_channels: int, path: str | None,
                        num_layers: int | None = None, num_single_layers: int | None = None) -> torch.nn.Module:
        """A ControlNet initialised from the base's denoiser (outputs zero at the start), or loaded from
        ``path`` to continue; ``num_layers``/``num_single_layers``: how many blocks a transformer's copies."""

    @abc.abstractmethod
    def loss(self, controlnet: torch.nn.Module, base: BaseModels, latents: torch.Tensor, hidden: torch.Tensor,
             added: dict, condition: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The training loss of one batch at random noise and timesteps drawn from ``generator``."""

    def denoise(self, controlnet: torch.nn.Module, base: BaseModels, latents: torch.Tensor, hidden: torch.Tensor,
                added: dict, condition: torch.Tensor, generator: torch.Generator) -> "Denoised":
        """``loss``'s forward with what it predicted kept (reward fine-tuning reads the one-step clean prediction
        of the same forward, train/reward.py); ``loss`` returns this ``.loss``. A family without it trains, but
        without ``--reward_weight``."""
        raise NotImplementedError(f"the {self.name} family offers no one-step prediction for --reward_weight")

    def enable_gradient_checkpointing(self, controlnet: torch.nn.Module) -> None:
        """``--gradient_checkpointing``: recompute the ControlNet's activations in the backward pass."""
        controlnet.enable_gradient_checkpointing()

    def latent_moments(self, base: BaseModels, pixels: torch.Tensor) -> torch.Tensor:
        """What ``--cache_latents`` keeps of [-1, 1] pixels: the VAE's latent distribution (mean and log-variance
        along the channels; a family whose VAE encodes deterministically keeps its latents)."""
        return base.vae.encode(pixels).latent_dist.parameters

    def latents_from_moments(self, moments: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A draw (unscaled) from ``latent_moments``, from ``generator`` on the moments' device: exactly what an
        uncached step's ``latent_dist.sample`` draws."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        return DiagonalGaussianDistribution(moments).sample(generator=generator)

    def encode_latents(self, base: BaseModels, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The VAE's (unscaled) latents of [-1, 1] pixels, drawn from ``generator`` where the encoder samples."""
        return self.latents_from_moments(self.latent_moments(base, pixels), generator)

    def exported(self, controlnet: torch.nn.Module) -> torch.nn.Module:
        """The module the export writes and the model card names, of the trained (unwrapped) one: itself."""
        return controlnet

    def card_pipeline_class(self, base: BaseModels) -> str:
        """The diffusers pipeline the model card tells users to load the ControlNet in."""
        return self.pipeline_class

    def card_extra(self, base: BaseModels) -> dict:
        """What the model card records beyond the shared fields (a union's condition -> slot/mode mapping)."""
        return {}

    @abc.abstractmethod
    def validation_pipeline(self, base: BaseModels, controlnet: torch.nn.Module):
        """The family's ControlNet pipeline over the in-memory modules (no second copy of the base)."""

    @abc.abstractmethod
    def control_kwargs(self, condition: torch.Tensor, mode: int | None) -> dict:
        """The pipeline's control arguments for a batch of [0, 1] condition images; ``mode``: the union
        slot/mode they fill (the only one given), None for a single-condition ControlNet."""

    @abc.abstractmethod
    def sample(self, pipe, base: BaseModels, condition: torch.Tensor, prompt: str, count: int,
               generator: torch.Generator, steps: int, mode: int | None = None) -> list:
        """``count`` PIL images for one [0, 1] condition image (1xCxHxW) and prompt."""

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


def load_text_encoders(path: str, classes: Sequence[str],
                       **tokenizer_kwargs) -> tuple[list[Any], list[torch.nn.Module]]:
    """Tokenizers and text encoders (``transformers`` class names, in order) from a diffusers folder's
    ``tokenizer``/``text_encoder``, ``tokenizer_2``/``text_encoder_2`` ... subfolders."""
    import transformers

    suffixes = [""] + [f"_{i}" for i in range(2, len(classes) + 1)]
    tokenizers = [transformers.AutoTokenizer.from_pretrained(path, subfolder=f"tokenizer{s}", **tokenizer_kwargs)
                  for s in suffixes]
    encoders = [getattr(transformers, cls).from_pretrained(path, subfolder=f"text_encoder{s}")
                for cls, s in zip(classes, suffixes)]
    return tokenizers, encoders


def cast_floats(value, dtype: torch.dtype):
    """``value`` with every floating-point tensor in it (nested in tuples, lists, dicts) cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(cast_floats(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: cast_floats(v, dtype) for k, v in value.items()}
    return value


def freeze(*modules: torch.nn.Module) -> None:
    for module in modules:
        module.requires_grad_(False)
        module.eval()


def controlnet_config(controlnet: torch.nn.Module):
    """The config of a ControlNet, through accelerate's wrappers."""
    return getattr(controlnet, "module", controlnet).config


def controlnet_subfolder(path: str) -> str | None:
    return "controlnet" if os.path.isdir(os.path.join(path, "controlnet")) else None

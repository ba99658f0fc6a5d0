"""What the flow-matching transformer families share: ``FlowAdapter``, the abstract adapter of SD3, Flux,
Qwen-Image and the later transformer families (loading, VAE and prompt encoding through the family's own
diffusers pipeline, the flow-matching loss of train/flow.py, validation in the family's ControlNet pipeline).

A leaf beside train/adapter.py: family files import it, never each other (tests/test_train_family_registry.py).
"""

from __future__ import annotations

import abc
import logging
from typing import Any, Callable

import torch

from train.adapter import BaseModels, FamilyAdapter, freeze, load_text_encoders
from train.errors import SetupError
from train.family_specs import FAMILY_NAMES
from train.flow import flow_loss, noisy_latents, shifted_sigmas
from train.latents import CachedConditions, images_from_latents
from train.reward import clean_prediction

log = logging.getLogger("train")

class FlowAdapter(FamilyAdapter):
    """What SD3 and Flux share: loading, VAE encoding, the flow-matching loss, validation; each family adds
    its prompt encoding, ControlNet, time shift, control inputs and transformer call."""

    denoiser_class: str
    encode_pipeline_class: str
    """The diffusers pipeline whose ``encode_prompt`` turns captions into embeddings."""
    text_encoder_classes: tuple[str, ...]
    vae_class = "AutoencoderKL"
    """The diffusers class of the family's VAE."""
    default_layers: int
    samples_in_place = True  # a Flux ControlNet is billions of weights: validation does not copy it
    encodes_conditions = True

    def __init__(self, resolution: int = 512):
        super().__init__(resolution)
        self._encoder: tuple[int, Any] | None = None

    # --- loading ---------------------------------------------------------------------------

    def load(self, path: str) -> BaseModels:
        import diffusers

        denoiser = getattr(diffusers, self.denoiser_class).from_pretrained(path, subfolder="transformer")
        tokenizers, encoders = load_text_encoders(path, self.text_encoder_classes)
        vae = getattr(diffusers, self.vae_class).from_pretrained(path, subfolder="vae")
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        freeze(*encoders, vae, denoiser)
        return BaseModels(tokenizers, encoders, vae, None, scheduler, self, transformer=denoiser)

    # --- encoding --------------------------------------------------------------------------

    def encoder_pipeline(self, base: BaseModels):
        """The family's text-to-image pipeline over the base's modules (references, no copies)."""
        if self._encoder is None or self._encoder[0] != id(base):
            import diffusers

            self._encoder = (id(base), getattr(diffusers, self.encode_pipeline_class)(**self.pipeline_modules(base)))
        return self._encoder[1]

    def pipeline_modules(self, base: BaseModels) -> dict[str, Any]:
        modules = {"transformer": base.transformer, "scheduler": base.scheduler, "vae": base.vae}
        for i, (tok, enc) in enumerate(zip(base.tokenizers, base.text_encoders)):
            suffix = "" if i == 0 else f"_{i + 1}"
            modules[f"tokenizer{suffix}"], modules[f"text_encoder{suffix}"] = tok, enc
        return modules

    def sequence_kwargs(self, base: BaseModels) -> dict:
        n = base.options.max_sequence_length
        return {} if n is None else {"max_sequence_length": n}

    def condition_latents(self, base: BaseModels, controlnet, condition: "torch.Tensor | CachedConditions",
                          generator: torch.Generator) -> torch.Tensor:
        """The [0, 1] condition image through the VAE (or a draw from its cached distribution), shifted
        and scaled as the family's pipeline does."""
        if isinstance(condition, CachedConditions):
            sample = condition.sample(generator).to(base.vae.device, base.vae.dtype)
        else:
            pixels = (condition * 2.0 - 1.0).to(base.vae.device, base.vae.dtype)
            sample = self.latent_distribution(base, pixels).sample(generator=generator)
        return self.scaled_condition(base, controlnet, sample)

    def scaled_condition(self, base: BaseModels, controlnet, sample: torch.Tensor) -> torch.Tensor:
        """A condition's VAE sample as the family's ControlNet pipeline hands it to the ControlNet."""
        return (sample - self.condition_shift(base, controlnet)) * base.vae.config.scaling_factor

    def condition_shift(self, base: BaseModels, controlnet) -> float:
        return base.vae.config.shift_factor

    # --- the ControlNet and its loss ---------------------------------------------------------

    def layers(self, wanted: int | None, default: int, available: int, what: str = "controlnet_num_layers",
               reads: "Callable[[int], set[int]] | None" = None) -> int:
        """``wanted`` blocks (None: ``default``), capped at the ``available`` ones with a log line saying so,
        and at the most whose residuals the base all reads (``reads``: count -> residual indices the base adds):
        a residual it never adds gets no gradient (DDP then fails at the second step) and steers nothing."""
        chosen = wanted if wanted is not None else default
        if available < 1:
            raise SetupError(f"--{what}: this {FAMILY_NAMES[self.name]} base has no block a ControlNet can copy")
        if chosen > available:
            log.info("--%s %d capped at %d: the most this %s base allows", what, chosen, available,
                     FAMILY_NAMES[self.name])
        count = min(chosen, available)
        read = count
        while reads is not None and read > 1 and reads(read) != set(range(read)):
            read -= 1
        if read < count:
            log.info("--%s %d capped at %d: this %s base adds no residual of a ControlNet block past that", what,
                     count, read, FAMILY_NAMES[self.name])
        return read

    def loss(self, controlnet: torch.nn.Module, base: BaseModels, latents: torch.Tensor, hidden: torch.Tensor,
             added: dict, condition: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Velocity MSE at a logit-normal, family-shifted sigma (train/flow.py)."""
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
        sigmas = shifted_sigmas(latents.shape[0], generator, self.shift(base, latents)).to(latents.device)
        noisy = noisy_latents(latents, noise, sigmas)
        with torch.no_grad():
            control = self.control_inputs(base, controlnet, condition, generator)
        prediction = self.predict(controlnet, base, noisy, sigmas, hidden, added, control)
        return flow_loss(prediction, self.layout(latents), self.layout(noise))

    def denoise_once(self, controlnet: torch.nn.Module, base: BaseModels, latents: torch.Tensor, hidden: torch.Tensor,
                     added: dict, condition: torch.Tensor, generator: torch.Generator,
                     max_timestep: int) -> torch.Tensor:
        """x0 = x_t - sigma v at a sigma uniform in 0..``max_timestep`` / the scheduler's timesteps (unshifted:
        the reward wants lightly noised images, where the one-step prediction is sharp)."""
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
        top = max_timestep / base.scheduler.config.num_train_timesteps
        sigmas = (torch.rand(latents.shape[0], generator=generator) * top).to(latents.device)
        noisy = noisy_latents(latents, noise, sigmas)
        with torch.no_grad():
            control = self.control_inputs(base, controlnet, condition, generator)
        prediction = self.unlayout(self.predict(controlnet, base, noisy, sigmas, hidden, added, control), latents)
        return clean_prediction("flow", noisy, prediction, sigmas)

    def layout(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents in the layout the transformer predicts in."""
        return latents

    def unlayout(self, prediction: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """A prediction in ``layout`` back in the shape of ``latents``."""
        return prediction

    @abc.abstractmethod
    def shift(self, base: BaseModels, latents: torch.Tensor) -> float:
        """The time shift of the sigmas drawn for ``latents``."""

    @abc.abstractmethod
    def control_inputs(self, base: BaseModels, controlnet, condition: "torch.Tensor | CachedConditions",
                       generator: torch.Generator) -> dict:
        """The ControlNet's condition arguments (``controlnet_cond``, a union's mode) for a batch."""

    @abc.abstractmethod
    def predict(self, controlnet, base: BaseModels, noisy: torch.Tensor, sigmas: torch.Tensor, hidden: torch.Tensor,
                added: dict, control: dict) -> torch.Tensor:
        """The base's velocity prediction with the ControlNet's residuals, in ``layout``."""

    # --- validation --------------------------------------------------------------------------

    def validation_pipeline(self, base: BaseModels, controlnet: torch.nn.Module):
        """The family's ControlNet pipeline over the in-memory modules (no second copy)."""
        import diffusers

        modules = self.pipeline_modules(base)
        modules["scheduler"] = type(base.scheduler).from_config(base.scheduler.config)  # its own step state
        pipe = getattr(diffusers, self.pipeline_class)(**modules, controlnet=controlnet)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def control_kwargs(self, condition: torch.Tensor, mode: int | None) -> dict:
        # these pipelines take a tensor condition as is: [-1, 1], as the VAE reads it in training
        return {"control_image": condition * 2.0 - 1.0}

    def sample(self, pipe, base: BaseModels, condition: torch.Tensor, prompt: str, count: int,
               generator: torch.Generator, steps: int, mode: int | None = None) -> list:
        """``count`` PIL images for one [0, 1] condition image (1xCxHxW) and prompt."""
        height, width = condition.shape[-2:]
        latents = pipe(prompt=[prompt] * count, height=height, width=width, num_inference_steps=steps,
                       generator=generator, output_type="latent", **self.sequence_kwargs(base),
                       **self.guidance_kwargs(base),
                       **self.control_kwargs(condition.repeat(count, 1, 1, 1), mode)).images
        return self.decode(base, pipe, self.unpacked(pipe, latents, height, width))

    def unpacked(self, pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The pipeline's ``output_type="latent"`` result as (B, C, H, W) VAE latents."""
        return latents

    def decode(self, base: BaseModels, pipe, latents: torch.Tensor) -> list:
        """Denoised VAE latents -> PIL images, as the family's pipeline decodes them."""
        return images_from_latents(base.vae, pipe.image_processor, latents)

    def guidance_kwargs(self, base: BaseModels) -> dict:
        """Sampling arguments for the guidance the base was trained with (none: the pipeline's default)."""
        return {}


def one_condition_each(base: BaseModels, condition: "torch.Tensor | CachedConditions",
                       generator: torch.Generator) -> "tuple[torch.Tensor | CachedConditions, torch.Tensor]":
    """A union run's batch reduced to one of its conditions per example, drawn from ``generator``, and which
    (the position of each pick in ``--condition``)."""
    count = len(base.options.conditions)
    modes = torch.randint(0, count, (condition.shape[0],), generator=generator)
    if isinstance(condition, CachedConditions):
        return condition.pick(modes), modes
    stacked = condition.view(condition.shape[0], count, -1, *condition.shape[-2:])
    return stacked[torch.arange(condition.shape[0]), modes], modes


def unpack(tokens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(B, H/2 * W/2, 4C) -> (B, C, H, W) of ``shape``: the 2x2-patch packing of Flux and Qwen-Image undone."""
    b, c, h, w = shape
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

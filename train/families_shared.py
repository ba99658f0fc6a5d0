"""What the transformer families share: ``TransformerAdapter``, the abstract adapter of every family whose
denoiser is a diffusers transformer (loading its folder, prompt encoding through the family's own diffusers
pipeline, the condition's VAE latents, validation in the family's ControlNet pipeline), and ``FlowAdapter`` on
it, what the flow-matching ones (SD3, Flux, Qwen-Image, Z-Image, Sana) add: the flow-matching loss of
train/flow.py and the ControlNet's depth. HunyuanDiT (DDPM) is a ``TransformerAdapter`` with the UNets' loss.

A leaf beside train/adapter.py: family files import it, never each other (tests/test_train_family_registry.py).
"""

from __future__ import annotations

import abc
import logging
from typing import Any, Callable

import torch

from train.adapter import BaseModels, Denoised, FamilyAdapter, freeze, load_text_encoders
from train.errors import SetupError
from train.family_specs import FAMILY_NAMES
from train.flow import flow_loss, noisy_latents, shifted_sigmas
from train.latents import CachedConditions, images_from_latents

log = logging.getLogger("train")

class TransformerAdapter(FamilyAdapter):
    """A family whose denoiser is a diffusers transformer: it loads from the folder's ``transformer``, text
    encoder, ``vae`` and ``scheduler`` subfolders, encodes prompts with a diffusers pipeline over the base's own
    modules, reads its condition through the VAE, and samples in its ControlNet pipeline without copying the
    ControlNet. Each family adds its prompt encoding, ControlNet, training forward (``denoise``) and call."""

    denoiser_class: str
    """The diffusers class of the family's transformer."""
    encode_pipeline_class: str
    """The diffusers pipeline whose ``encode_prompt`` turns captions into embeddings."""
    text_encoder_classes: tuple[str, ...]
    vae_class = "AutoencoderKL"
    """The diffusers class of the family's VAE."""
    scheduler_class = "FlowMatchEulerDiscreteScheduler"
    """The diffusers class of the family's noise scheduler."""
    samples_in_place = True  # 0.7B (HunyuanDiT) to billions of weights: validation does not copy the ControlNet
    encodes_conditions = True

    def __init__(self, resolution: int = 512):
        super().__init__(resolution)
        self._encoder: tuple[int, Any] | None = None

    # --- loading ---------------------------------------------------------------------------

    def load(self, path: str) -> BaseModels:
        import diffusers

        denoiser = getattr(diffusers, self.denoiser_class).from_pretrained(path, subfolder="transformer")
        self.check_denoiser(path, denoiser)
        tokenizers, encoders = load_text_encoders(path, self.text_encoder_classes)
        vae = getattr(diffusers, self.vae_class).from_pretrained(path, subfolder="vae")
        scheduler = self.load_scheduler(path)
        freeze(*encoders, vae, denoiser)
        return BaseModels(tokenizers, encoders, vae, None, scheduler, self, transformer=denoiser)

    def check_denoiser(self, path: str, denoiser: torch.nn.Module) -> None:
        """Refuse, before the rest loads, a transformer the family's pipeline cannot sample with (none here)."""

    def load_scheduler(self, path: str) -> Any:
        import diffusers

        return getattr(diffusers, self.scheduler_class).from_pretrained(path, subfolder="scheduler")

    # --- encoding --------------------------------------------------------------------------

    def encoder_pipeline(self, base: BaseModels):
        """``prompt_pipeline`` of ``base``, made once per base (its modules are references: nothing is copied)."""
        if self._encoder is None or self._encoder[0] != id(base):
            self._encoder = (id(base), self.prompt_pipeline(base))
        return self._encoder[1]

    def prompt_pipeline(self, base: BaseModels):
        """The family's text-to-image pipeline over the base's modules, for its ``encode_prompt``."""
        import diffusers

        return getattr(diffusers, self.encode_pipeline_class)(**self.pipeline_modules(base))

    def pipeline_modules(self, base: BaseModels) -> dict[str, Any]:
        modules = {"transformer": base.transformer, "scheduler": base.scheduler, "vae": base.vae}
        for i, (tok, enc) in enumerate(zip(base.tokenizers, base.text_encoders)):
            suffix = "" if i == 0 else f"_{i + 1}"
            modules[f"tokenizer{suffix}"], modules[f"text_encoder{suffix}"] = tok, enc
        return modules

    def condition_sample(self, base: BaseModels, condition: "torch.Tensor | CachedConditions",
                         generator: torch.Generator) -> torch.Tensor:
        """The VAE's (unscaled) latents of a batch of [0, 1] condition images, drawn from ``generator`` where the
        encoder samples (or drawn from their cached ``latent_moments``, ``--cache_latents``), on the VAE's device
        in its dtype: what a ControlNet reading its condition through the VAE starts from."""
        if isinstance(condition, CachedConditions):
            return self.latents_from_moments(condition.one(), generator).to(base.vae.device, base.vae.dtype)
        return self.encode_latents(base, (condition * 2.0 - 1.0).to(base.vae.device, base.vae.dtype), generator)

    # --- the loss ------------------------------------------------------------------------------

    def loss(self, controlnet: torch.nn.Module, base: BaseModels, latents: torch.Tensor, hidden: torch.Tensor,
             added: dict, condition: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The loss of the family's training forward (``denoise``)."""
        return self.denoise(controlnet, base, latents, hidden, added, condition, generator).loss

    # --- validation --------------------------------------------------------------------------

    def validation_pipeline(self, base: BaseModels, controlnet: torch.nn.Module):
        """The family's ControlNet pipeline over the in-memory modules (no second copy), its own scheduler state."""
        return self.controlnet_pipeline(base, controlnet, type(base.scheduler).from_config(base.scheduler.config))

    def controlnet_pipeline(self, base: BaseModels, controlnet: torch.nn.Module | None, scheduler: Any):
        """``pipeline_class`` over the base's modules (references, no copies) with ``controlnet`` and ``scheduler``."""
        import diffusers

        modules = {**self.pipeline_modules(base), "scheduler": scheduler, **self.pipeline_extras()}
        pipe = getattr(diffusers, self.pipeline_class)(**modules, controlnet=controlnet)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline_extras(self) -> dict[str, Any]:
        """Constructor arguments of ``pipeline_class`` beyond the base's modules (none by default)."""
        return {}

    def control_kwargs(self, condition: torch.Tensor, mode: int | None) -> dict:
        # these pipelines take a tensor condition as is: [-1, 1], as the VAE reads it in training
        return {"control_image": condition * 2.0 - 1.0}

    def sample(self, pipe, base: BaseModels, condition: torch.Tensor, prompt: str, count: int,
               generator: torch.Generator, steps: int, mode: int | None = None) -> list:
        """``count`` PIL images for one [0, 1] condition image (1xCxHxW) and prompt."""
        height, width = condition.shape[-2:]
        latents = self.pipeline_images(pipe, base, condition, prompt, count, generator, steps, mode, "latent")
        return self.decode(base, pipe, self.unpacked(pipe, latents, height, width))

    def pipeline_images(self, pipe, base: BaseModels, condition: torch.Tensor, prompt: str, count: int,
                        generator: torch.Generator, steps: int, mode: int | None, output_type: str):
        """The pipeline's ``images`` of ``count`` samples of one condition image and prompt, at the condition's
        size, as ``output_type``."""
        height, width = condition.shape[-2:]
        return pipe(prompt=[prompt] * count, height=height, width=width, num_inference_steps=steps,
                    generator=generator, output_type=output_type, **self.call_kwargs(base),
                    **self.control_kwargs(condition.repeat(count, 1, 1, 1), mode)).images

    def call_kwargs(self, base: BaseModels) -> dict:
        """The pipeline call's arguments beyond prompt, size, steps, generator and control (none by default)."""
        return {}

    def unpacked(self, pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The pipeline's ``output_type="latent"`` result as (B, C, H, W) VAE latents."""
        return latents

    def decode(self, base: BaseModels, pipe, latents: torch.Tensor) -> list:
        """Denoised VAE latents -> PIL images, as the family's pipeline decodes them."""
        return images_from_latents(base.vae, pipe.image_processor, latents)


class FlowAdapter(TransformerAdapter):
    """What the flow-matching transformer families share: the flow-matching loss (train/flow.py), the
    condition's latents shifted and scaled, the ControlNet's depth capped at what the base reads; each family
    adds its prompt encoding, ControlNet, time shift, control inputs and transformer call."""

    default_layers: int

    def sequence_kwargs(self, base: BaseModels) -> dict:
        n = base.options.max_sequence_length
        return {} if n is None else {"max_sequence_length": n}

    def condition_latents(self, base: BaseModels, controlnet, condition: "torch.Tensor | CachedConditions",
                          generator: torch.Generator) -> torch.Tensor:
        """The [0, 1] condition image through the VAE (or its cached latents, ``condition_sample``), shifted
        and scaled as the family's pipeline does."""
        return self.scaled_condition(base, controlnet, self.condition_sample(base, condition, generator))

    def scaled_condition(self, base: BaseModels, controlnet, sample: torch.Tensor) -> torch.Tensor:
        """A condition's VAE sample as the family's ControlNet pipeline hands it to the ControlNet."""
        return (sample - self.condition_shift(base, controlnet)) * base.vae.config.scaling_factor

    def condition_shift(self, base: BaseModels, controlnet) -> float:
        return base.vae.config.shift_factor

    # --- the ControlNet and its loss ---------------------------------------------------------

    def capped_layers(self, wanted: int | None, default: int, available: int, what: str = "controlnet_num_layers",
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

    def denoise(self, controlnet: torch.nn.Module, base: BaseModels, latents: torch.Tensor, hidden: torch.Tensor,
                added: dict, condition: torch.Tensor, generator: torch.Generator) -> Denoised:
        """Velocity MSE at a logit-normal, family-shifted sigma (train/flow.py), and the noisy latents, velocity
        and sigma the reward reads."""
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
        sigmas = shifted_sigmas(latents.shape[0], generator, self.shift(base, latents)).to(latents.device)
        noisy = noisy_latents(latents, noise, sigmas)
        with torch.no_grad():
            control = self.control_inputs(base, controlnet, condition, generator)
        prediction = self.predict(controlnet, base, noisy, sigmas, hidden, added, control)
        loss = flow_loss(prediction, self.layout(latents), self.layout(noise))
        return Denoised(loss, noisy, self.unlayout(prediction, latents), "flow", sigmas,
                        sigmas * base.scheduler.config.num_train_timesteps)

    def layout(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents in the layout the transformer predicts in."""
        return latents

    def unlayout(self, prediction: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """A prediction in ``layout`` back in the shape of ``latents``."""
        return prediction

    @abc.abstractmethod
    def shift(self, base: BaseModels, latents: torch.Tensor) -> float:
        """The time shift of the sigmas drawn for ``latents``."""

    def control_inputs(self, base: BaseModels, controlnet, condition: "torch.Tensor | CachedConditions",
                       generator: torch.Generator) -> dict:
        """The ControlNet's condition arguments (``controlnet_cond``, a union's mode) for a batch."""
        return {"controlnet_cond": self.condition_latents(base, controlnet, condition, generator)}

    @abc.abstractmethod
    def predict(self, controlnet, base: BaseModels, noisy: torch.Tensor, sigmas: torch.Tensor, hidden: torch.Tensor,
                added: dict, control: dict) -> torch.Tensor:
        """The base's velocity prediction with the ControlNet's residuals, in ``layout``."""

    # --- validation --------------------------------------------------------------------------

    def call_kwargs(self, base: BaseModels) -> dict:
        return {**self.sequence_kwargs(base), **self.guidance_kwargs(base)}

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


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): 2x2 latent patches as tokens, as Flux and Qwen-Image pack them
    (``FluxPipeline._pack_latents``; ``QwenImagePipeline._pack_latents`` is the same code)."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack(tokens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(B, H/2 * W/2, 4C) -> (B, C, H, W) of ``shape``: the 2x2-patch packing of Flux and Qwen-Image undone."""
    b, c, h, w = shape
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

"""Sana (``SanaTransformer2DModel``): a linear-attention DiT over DC-AE latents, prompted by Gemma2.

Done as diffusers 0.42.1's ``SanaControlNetPipeline`` (pipelines/sana/pipeline_sana_controlnet.py) does it:

- prompts: ``encode_prompt`` (shared with ``SanaPipeline``) with the pipeline's default complex human
  instruction prepended, ``max_sequence_length`` 300 (``--max_sequence_length``), keeping the first token and
  the last ``max_sequence_length - 1``; the transformer and the ControlNet read the Gemma2 states and their
  attention mask (``encoder_attention_mask``);
- latents: DC-AE (``AutoencoderDC``) down-samples by 32 and encodes deterministically (``.latent``, no
  ``latent_dist``), scaled by ``scaling_factor`` (no shift); the condition image goes through it the same way
  (``__call__`` step 4: ``vae.encode(control_image).latent * scaling_factor``);
- the call (``__call__`` step 8): ``timestep`` = sigma x ``num_train_timesteps``, the ControlNet's
  ``controlnet_block_samples`` handed to the transformer, which adds residual ``i`` after its block ``i + 1``;
- the loss: flow matching (train/flow.py) shifted by the scheduler's ``flow_shift`` (the published
  DPM-Solver ``use_flow_sigmas`` schedule; ``shift`` for a FlowMatchEuler scheduler).

``SanaControlNetModel`` has no ``from_transformer``: its config is the base's (the fields the class takes)
with ``num_layers`` blocks, and it copies the base's patch, time and caption embeddings and first
``num_layers`` blocks; its ``input_block`` and ``controlnet_blocks`` stay zero. It reads one condition and no
control mode, and the pipeline passes none: Sana has no union ControlNet.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

import torch

from train.adapter import BaseModels, Denoised, FamilyAdapter, controlnet_subfolder, freeze, load_text_encoders
from train.errors import SetupError
from train.flow import flow_loss, noisy_latents, shifted_sigmas
from train.latents import CachedConditions

log = logging.getLogger("train")

SHIFT_KEYS = ("flow_shift", "shift")
"""Scheduler config keys of the time shift: DPMSolverMultistepScheduler's, FlowMatchEulerDiscreteScheduler's."""

ZERO_OUTPUTS = ("input_block.", "controlnet_blocks.")
"""SanaControlNetModel's zero-initialised layers: the only ones not copied from the base."""


def pipeline_default(argument: str) -> Any:
    """A default of ``SanaControlNetPipeline.__call__`` (what users get when they load the export)."""
    from diffusers import SanaControlNetPipeline

    return inspect.signature(SanaControlNetPipeline.__call__).parameters[argument].default


class SanaAdapter(FamilyAdapter):
    """Sana 1.0 bases: Gemma2 prompts, DC-AE latents, ``SanaControlNetModel`` copying the first blocks."""

    name = "sana"
    controlnet_class = "SanaControlNetModel"
    pipeline_class = "SanaControlNetPipeline"
    default_layers = 7  # SanaControlNetModel's default num_layers, as the published Sana ControlNets have
    samples_in_place = True
    encodes_conditions = True

    def __init__(self, resolution: int = 512):
        super().__init__(resolution)
        self._encoder: tuple[int, Any] | None = None

    def load(self, path: str) -> BaseModels:
        import diffusers

        transformer = diffusers.SanaTransformer2DModel.from_pretrained(path, subfolder="transformer")
        tokenizers, encoders = load_text_encoders(path, ("Gemma2Model",))
        vae = diffusers.AutoencoderDC.from_pretrained(path, subfolder="vae")
        # the scheduler class the folder names (published: DPMSolverMultistepScheduler with flow sigmas)
        config = diffusers.DPMSolverMultistepScheduler.load_config(path, subfolder="scheduler")
        scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
        freeze(*encoders, vae, transformer)
        return BaseModels(tokenizers, encoders, vae, None, scheduler, self, transformer=transformer)

    # --- encoding ----------------------------------------------------------------------------

    def encoder_pipeline(self, base: BaseModels):
        """``SanaPipeline`` over the base's modules (references, no copies), for its ``encode_prompt``."""
        if self._encoder is None or self._encoder[0] != id(base):
            from diffusers import SanaPipeline

            self._encoder = (id(base), SanaPipeline(**self.pipeline_modules(base)))
        return self._encoder[1]

    def pipeline_modules(self, base: BaseModels) -> dict[str, Any]:
        return {"tokenizer": base.tokenizers[0], "text_encoder": base.text_encoders[0], "vae": base.vae,
                "transformer": base.transformer, "scheduler": base.scheduler}

    def sequence_length(self, base: BaseModels) -> int:
        n = base.options.max_sequence_length
        return pipeline_default("max_sequence_length") if n is None else n

    def encode_prompts(self, base: BaseModels, captions: list[str], device: torch.device) -> tuple[torch.Tensor, dict]:
        """(Gemma2 states, {their attention mask}) as SanaControlNetPipeline encodes its prompts."""
        hidden, mask, _, _ = self.encoder_pipeline(base).encode_prompt(
            list(captions), do_classifier_free_guidance=False, device=device,
            max_sequence_length=self.sequence_length(base),
            complex_human_instruction=pipeline_default("complex_human_instruction"))
        return hidden, {"encoder_attention_mask": mask}

    def latent_moments(self, base: BaseModels, pixels: torch.Tensor) -> torch.Tensor:
        return base.vae.encode(pixels).latent  # DC-AE: deterministic, no latent_dist

    def latents_from_moments(self, moments: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return moments

    def condition_latents(self, base: BaseModels, condition: "torch.Tensor | CachedConditions",
                          generator: torch.Generator) -> torch.Tensor:
        """The [0, 1] condition image through DC-AE (or its cached latents), scaled as the pipeline does."""
        if isinstance(condition, CachedConditions):  # one condition per example: Sana stacks none
            sample = self.latents_from_moments(condition.moments[:, 0], generator).to(base.vae.device, base.vae.dtype)
        else:
            sample = self.encode_latents(base, (condition * 2.0 - 1.0).to(base.vae.device, base.vae.dtype),
                                         generator)
        return sample * base.vae.config.scaling_factor

    # --- the ControlNet and its loss ---------------------------------------------------------

    def make_controlnet(self, base: BaseModels, conditioning_channels: int, path: str | None,
                        num_layers: int | None = None, num_single_layers: int | None = None) -> torch.nn.Module:
        from diffusers import SanaControlNetModel

        if path:
            return SanaControlNetModel.from_pretrained(path, subfolder=controlnet_subfolder(path))
        layers = self.layers(num_layers, base.transformer.config.num_layers)
        fields = inspect.signature(SanaControlNetModel.__init__).parameters
        config = {k: v for k, v in base.transformer.config.items() if k in fields}
        controlnet = SanaControlNetModel.from_config({**config, "num_layers": layers})
        copy_base(controlnet, base.transformer)
        return controlnet

    def layers(self, wanted: int | None, blocks: int) -> int:
        """``wanted`` blocks (None: 7), capped at ``blocks - 1``: the base adds residual ``i`` after its block
        ``i + 1``, so a residual past that is never read (no gradient: DDP fails at the second step)."""
        chosen = self.default_layers if wanted is None else wanted
        if blocks < 2:
            raise SetupError("--controlnet_num_layers: this Sana base has fewer than 2 blocks, so it reads no "
                             "ControlNet residual")
        if chosen > blocks - 1:
            log.info("--controlnet_num_layers %d capped at %d: this Sana base adds no residual past that", chosen,
                     blocks - 1)
        return min(chosen, blocks - 1)

    def shift(self, base: BaseModels) -> float:
        config = base.scheduler.config
        return float(next((config[k] for k in SHIFT_KEYS if k in config), 1.0))

    def loss(self, controlnet: torch.nn.Module, base: BaseModels, latents: torch.Tensor, hidden: torch.Tensor,
             added: dict, condition: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Velocity MSE at a logit-normal, shifted sigma (train/flow.py)."""
        return self.denoise(controlnet, base, latents, hidden, added, condition, generator).loss

    def denoise(self, controlnet: torch.nn.Module, base: BaseModels, latents: torch.Tensor, hidden: torch.Tensor,
                added: dict, condition: torch.Tensor, generator: torch.Generator) -> Denoised:
        """The training forward: its loss, and the noisy latents, velocity and sigma the reward reads."""
        noisy, noise, sigmas, prediction = self.noised_prediction(
            controlnet, base, latents, hidden, added, condition, generator,
            lambda: shifted_sigmas(latents.shape[0], generator, self.shift(base)))
        return Denoised(flow_loss(prediction, latents, noise), noisy, prediction, "flow", sigmas,
                        sigmas * base.scheduler.config.num_train_timesteps)

    def noised_prediction(self, controlnet, base: BaseModels, latents: torch.Tensor, hidden: torch.Tensor,
                          added: dict, condition, generator: torch.Generator, sigmas: Callable[[], torch.Tensor]):
        """(noisy latents, noise, sigmas, velocity) for noise then ``sigmas()`` drawn from ``generator``."""
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
        drawn = sigmas().to(latents.device)
        noisy = noisy_latents(latents, noise, drawn)
        with torch.no_grad():
            control = self.control_inputs(base, controlnet, condition, generator)
        return noisy, noise, drawn, self.predict(controlnet, base, noisy, drawn, hidden, added, control)

    def control_inputs(self, base: BaseModels, controlnet, condition: "torch.Tensor | CachedConditions",
                       generator: torch.Generator) -> dict:
        return {"controlnet_cond": self.condition_latents(base, condition, generator)}

    def predict(self, controlnet, base: BaseModels, noisy: torch.Tensor, sigmas: torch.Tensor, hidden: torch.Tensor,
                added: dict, control: dict) -> torch.Tensor:
        """The velocity with the ControlNet's residuals, both called as SanaControlNetPipeline.__call__ does."""
        timestep = sigmas * base.scheduler.config.num_train_timesteps  # the flow sigmas' timesteps
        mask = added["encoder_attention_mask"]
        blocks = controlnet(noisy, encoder_hidden_states=hidden, encoder_attention_mask=mask, timestep=timestep,
                            return_dict=False, **control)[0]
        dtype = base.transformer.dtype  # residuals of the fp32 ControlNet; the locked base may be bf16
        return base.transformer(noisy.to(dtype), encoder_hidden_states=hidden.to(dtype), encoder_attention_mask=mask,
                                timestep=timestep.to(dtype), controlnet_block_samples=tuple(b.to(dtype) for b in blocks),
                                return_dict=False)[0]

    # --- validation --------------------------------------------------------------------------

    def validation_pipeline(self, base: BaseModels, controlnet: torch.nn.Module):
        from diffusers import SanaControlNetPipeline

        modules = self.pipeline_modules(base)
        modules["scheduler"] = type(base.scheduler).from_config(base.scheduler.config)  # its own step state
        pipe = SanaControlNetPipeline(**modules, controlnet=controlnet)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def control_kwargs(self, condition: torch.Tensor, mode: int | None) -> dict:
        # the pipeline takes a tensor condition as is: [-1, 1], as DC-AE reads it in training
        return {"control_image": condition * 2.0 - 1.0}

    def sample(self, pipe, base: BaseModels, condition: torch.Tensor, prompt: str, count: int,
               generator: torch.Generator, steps: int, mode: int | None = None) -> list:
        """``count`` PIL images at the condition's own size (no aspect-ratio binning)."""
        height, width = condition.shape[-2:]
        return pipe(prompt=[prompt] * count, height=height, width=width, num_inference_steps=steps,
                    generator=generator, max_sequence_length=self.sequence_length(base),
                    use_resolution_binning=False, **self.control_kwargs(condition.repeat(count, 1, 1, 1), mode)).images


def copy_base(controlnet: torch.nn.Module, transformer: torch.nn.Module) -> None:
    """Load the base's weights into the ControlNet's matching modules (embeddings and first blocks). Where the
    classes disagree (a copied module the base lacks, or a base weight inside a module the ControlNet copies,
    e.g. Sana 1.5's qk-norms), the copy would not be the base: refuse rather than train from it."""
    loaded = controlnet.load_state_dict(transformer.state_dict(), strict=False)
    modules = dict(controlnet.named_modules())
    uncopied = [k for k in loaded.missing_keys if not k.startswith(ZERO_OUTPUTS)]
    uncopied += [k for k in loaded.unexpected_keys if inside_copied(k, modules)]
    if uncopied:
        raise SetupError(f"SanaControlNetModel cannot copy this base's blocks ({', '.join(uncopied[:3])} differ): "
                         "use a Sana base its class matches (no qk_norm, no guidance_embeds)")


def inside_copied(key: str, modules: dict[str, torch.nn.Module]) -> bool:
    """A base weight whose nearest enclosing module the ControlNet has is a copied module, not a list of blocks
    it copies fewer of (``transformer_blocks.9.*``) nor the base's own output layers (``proj_out``)."""
    parts = key.split(".")[:-1]
    for end in range(len(parts), 0, -1):
        owner = modules.get(".".join(parts[:end]))
        if owner is not None:
            return not isinstance(owner, torch.nn.ModuleList)
    return False

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
from typing import Any

import torch

from train.adapter import BaseModels, controlnet_subfolder
from train.errors import SetupError
from train.families_shared import FlowAdapter

SHIFT_KEYS = ("flow_shift", "shift")
"""Scheduler config keys of the time shift: DPMSolverMultistepScheduler's, FlowMatchEulerDiscreteScheduler's."""

ZERO_OUTPUTS = ("input_block.", "controlnet_blocks.")
"""SanaControlNetModel's zero-initialised layers: the only ones not copied from the base."""


def pipeline_default(argument: str) -> Any:
    """A default of ``SanaControlNetPipeline.__call__`` (what users get when they load the export)."""
    from diffusers import SanaControlNetPipeline

    return inspect.signature(SanaControlNetPipeline.__call__).parameters[argument].default


class SanaAdapter(FlowAdapter):
    """Sana 1.0 bases: Gemma2 prompts, DC-AE latents, ``SanaControlNetModel`` copying the first blocks."""

    name = "sana"
    controlnet_class = "SanaControlNetModel"
    pipeline_class = "SanaControlNetPipeline"
    denoiser_class = "SanaTransformer2DModel"
    encode_pipeline_class = "SanaPipeline"
    text_encoder_classes = ("Gemma2Model",)
    vae_class = "AutoencoderDC"
    default_layers = 7  # SanaControlNetModel's default num_layers, as the published Sana ControlNets have

    def load_scheduler(self, path: str) -> Any:
        """The scheduler class the folder names (published: DPMSolverMultistepScheduler with flow sigmas)."""
        import diffusers

        config = diffusers.DPMSolverMultistepScheduler.load_config(path, subfolder="scheduler")
        return getattr(diffusers, config["_class_name"]).from_config(config)

    # --- encoding ----------------------------------------------------------------------------

    def sequence_kwargs(self, base: BaseModels) -> dict:
        n = base.options.max_sequence_length
        return {"max_sequence_length": pipeline_default("max_sequence_length") if n is None else n}

    def encode_prompts(self, base: BaseModels, captions: list[str], device: torch.device) -> tuple[torch.Tensor, dict]:
        """(Gemma2 states, {their attention mask}) as SanaControlNetPipeline encodes its prompts."""
        hidden, mask, _, _ = self.encoder_pipeline(base).encode_prompt(
            list(captions), do_classifier_free_guidance=False, device=device, **self.sequence_kwargs(base),
            complex_human_instruction=pipeline_default("complex_human_instruction"))
        return hidden, {"encoder_attention_mask": mask}

    def latent_moments(self, base: BaseModels, pixels: torch.Tensor) -> torch.Tensor:
        return base.vae.encode(pixels).latent  # DC-AE: deterministic, no latent_dist

    def latents_from_moments(self, moments: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return moments

    def scaled_condition(self, base: BaseModels, controlnet, sample: torch.Tensor) -> torch.Tensor:
        """DC-AE's condition latents scaled, not shifted (``__call__`` step 4)."""
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
        if blocks < 2:
            raise SetupError("--controlnet_num_layers: this Sana base has fewer than 2 blocks, so it reads no "
                             "ControlNet residual")
        return self.capped_layers(wanted, self.default_layers, blocks - 1)

    def shift(self, base: BaseModels, latents: torch.Tensor) -> float:
        config = base.scheduler.config
        return float(next((config[k] for k in SHIFT_KEYS if k in config), 1.0))

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

    def call_kwargs(self, base: BaseModels) -> dict:
        return {**self.sequence_kwargs(base), "use_resolution_binning": False}  # at the condition's own size

    def sample(self, pipe, base: BaseModels, condition: torch.Tensor, prompt: str, count: int,
               generator: torch.Generator, steps: int, mode: int | None = None) -> list:
        """``count`` PIL images at the condition's own size, decoded by the pipeline itself (DC-AE)."""
        return self.pipeline_images(pipe, base, condition, prompt, count, generator, steps, mode, "pil")


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

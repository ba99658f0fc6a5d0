"""What the trainer knows about each model family before any model is imported: one ``FamilySpec`` each.

A leaf (no torch, no diffusers): flags are checked against these facts when the ``TrainConfig`` is built
(train/family_checks.py), before any weights load. The family's code (how it loads, encodes and computes
its loss) is its adapter in train/families/; adding a family is one adapter file, one entry in
``FAMILIES`` there and one ``FamilySpec`` here.
"""

from __future__ import annotations

import dataclasses

DEFAULT_GUIDANCE = 3.5
"""Flux.1-dev's distilled guidance during training when ``--guidance_scale`` is not given."""


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """The facts of one family that flags, base folders and ControlNet folders are checked against."""

    name: str
    """Registry key (``sd``, ``sdxl``, ...): what ``detect_family`` returns."""
    label: str
    """How messages name it (``SD 1.x/2.x``)."""
    folders: tuple[str, ...]
    """Subfolders of a diffusers base folder its adapter loads from."""
    controlnet_class: str
    """diffusers ControlNet class of a single-condition (or channel-stacked) run: config.json ``_class_name``."""
    union_class: str | None = None
    """ControlNet class of a ``--union`` run; None: diffusers has no union ControlNet for the family."""
    max_union_types: int | None = None
    """How many control types its union ControlNet holds (None: as many as the run names)."""
    stacks_conditions: bool = False
    """Several conditions can be stacked as channels of one condition image (UNet ControlNets read raw pixels;
    transformer ControlNets read one VAE-encoded image)."""
    transformer_prefixes: tuple[str, ...] = ()
    """``transformer/config.json`` ``_class_name`` prefixes that mark it (transformer families)."""
    unet_embedding: str | None = None
    """``unet/config.json`` ``addition_embed_type`` that marks it among the UNet families ("" = none)."""
    pipeline_prefixes: tuple[str, ...] = ()
    """``model_index.json`` pipeline class prefixes that mark it (a base whose denoiser config is unreadable)."""
    vae_scale: int = 8
    """Pixels per latent side."""
    patch: int | None = None
    """Latent patch side of a transformer family (resolution must be a multiple of ``vae_scale * patch``);
    None: no patching (UNets)."""
    patch_from_config: bool = False
    """Read the patch side from the transformer config's ``patch_size`` (SD3 bases differ)."""
    position_reach: bool = False
    """The transformer's ``pos_embed_max_size`` caps the resolution (SD3)."""
    layer_flags: tuple[str, ...] = ()
    """The ControlNet-size flags the family takes (``controlnet_num_layers``, ``controlnet_num_single_layers``,
    ``control_layers_places``)."""
    depth_key: str | None = None
    """``transformer/config.json`` key of the base's block count that ``--control_layers_places`` must stay under."""
    sequence_length: bool = False
    """``--max_sequence_length`` sets its long text encoder's prompt length."""
    max_sequence_length: int | None = None
    """The longest ``--max_sequence_length`` its pipeline accepts (None: not checked here)."""
    guidance: bool = False
    """Its (distilled) bases may read a guidance input: ``--guidance_scale`` applies when the transformer
    config has ``guidance_embeds``."""
    fixed_flags: tuple[tuple[str, str], ...] = ()
    """(flag, why its base fixes that setting) pairs: flags refused with that reason although the family has
    such blocks or encoders (HunyuanDiT's ControlNet depth and prompt lengths)."""
    unmirrored: tuple[str, ...] = ()
    """Transformer config settings its ControlNet class has no parameter for: a base that sets one (truthy) has
    blocks the ControlNet cannot copy, and is refused (Sana's ``qk_norm``, ``guidance_embeds``)."""
    control_methods: tuple[str, ...] = ("controlnet",)
    """The ``--control_method`` values it takes: ``controlnet`` (the family's ControlNet, every family);
    ``controlnet_xs`` (diffusers' ControlNet-XS adapter: SD 1.x/2.x and SDXL, the UNets its
    ``UNetControlNetXSModel`` fuses with); ``channel_concat`` where diffusers has a pipeline that reads the
    condition's latents as extra input channels (Flux.1: FluxControlPipeline; diffusers 0.42.1 has none for
    SD3, Z-Image, Qwen-Image, Sana or HunyuanDiT, only ControlNet pipelines)."""

    @property
    def hint(self) -> str:
        """What a base folder of this family needs, for messages about a folder missing parts."""
        stems = [folder.rstrip("_0123456789") for folder in self.folders]
        groups: list[str] = []
        for stem in stems:  # text_encoder, text_encoder_2 -> text_encoder*/
            shown = f"{stem}*/" if stems.count(stem) > 1 else f"{stem}/"
            if shown not in groups:
                groups.append(shown)
        article = "an" if self.label.startswith(("SD", "A", "E", "I", "O", "U")) else "a"  # "an SDXL base"
        return f"{article} {self.label} base needs {', '.join(groups)}"

    @property
    def flow(self) -> bool:
        """A transformer (flow-matching) family."""
        return bool(self.transformer_prefixes)


SPECS: dict[str, FamilySpec] = {spec.name: spec for spec in (
    FamilySpec("sd", "SD 1.x/2.x", ("unet", "vae", "text_encoder", "tokenizer", "scheduler"), "ControlNetModel",
               stacks_conditions=True, unet_embedding="", pipeline_prefixes=("StableDiffusion",),
               control_methods=("controlnet", "controlnet_xs")),
    FamilySpec("sdxl", "SDXL", ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                                "scheduler"), "ControlNetModel", union_class="ControlNetUnionModel",
               max_union_types=6,  # ControlNetUnionModel.from_unet builds num_control_type=6 slots
               stacks_conditions=True, unet_embedding="text_time", pipeline_prefixes=("StableDiffusionXL",),
               control_methods=("controlnet", "controlnet_xs")),
    FamilySpec("sd3", "SD3/3.5", ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
                                  "tokenizer", "tokenizer_2", "tokenizer_3", "scheduler"), "SD3ControlNetModel",
               transformer_prefixes=("SD3",), pipeline_prefixes=("StableDiffusion3",), patch=2,
               patch_from_config=True, position_reach=True, layer_flags=("controlnet_num_layers",),
               sequence_length=True),
    FamilySpec("flux", "Flux.1", ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                                  "scheduler"), "FluxControlNetModel", union_class="FluxControlNetModel",
               transformer_prefixes=("Flux",), pipeline_prefixes=("Flux",), patch=2,
               layer_flags=("controlnet_num_layers", "controlnet_num_single_layers"), sequence_length=True,
               guidance=True, control_methods=("controlnet", "channel_concat")),
    # ZImageControlNetModel reads one VAE-encoded condition image and has no control-type or mode input (its
    # forward takes latents, timestep, caption features and control_context only), so there is no union in our
    # sense: alibaba-pai's "Z-Image-Turbo-Fun-Controlnet-Union" is one such ControlNet trained on several kinds
    # of map (Canny, HED, depth, pose, MLSD) given alike, telling them apart from the image itself.
    FamilySpec("zimage", "Z-Image", ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
               "ZImageControlNetModel", transformer_prefixes=("ZImage",), pipeline_prefixes=("ZImage",), patch=2,
               layer_flags=("control_layers_places",), depth_key="n_layers", sequence_length=True),
    # Qwen-Image: QwenImageControlNetModel has no control mode; InstantX's union is this class trained on several
    # condition types (the image says which), so --union trains it without one (train/families/qwenimage.py)
    FamilySpec("qwenimage", "Qwen-Image", ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
               "QwenImageControlNetModel", union_class="QwenImageControlNetModel",
               transformer_prefixes=("QwenImage",), pipeline_prefixes=("QwenImage",), patch=2,
               layer_flags=("controlnet_num_layers",), sequence_length=True, max_sequence_length=1024),
    # HunyuanDiT2DControlNetModel has no union mode (HunyuanDiT2DMultiControlNetModel sums separate ControlNets)
    # and reads one VAE-encoded condition through its patch embedding: no union, no stacking
    FamilySpec("hunyuandit", "HunyuanDiT", ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                                            "tokenizer_2", "scheduler"), "HunyuanDiT2DControlNetModel",
               transformer_prefixes=("HunyuanDiT",), pipeline_prefixes=("HunyuanDiT",), vae_scale=8, patch=2,
               fixed_flags=(
                   ("controlnet_num_layers", "a HunyuanDiT ControlNet has one block per skip connection of its base "
                    "(num_layers // 2 - 1: HunyuanDiT2DModel adds one residual to each)"),
                   ("max_sequence_length", "HunyuanDiT's prompt lengths are fixed by its transformer (text_len 77 "
                    "BERT and text_len_t5 256 mT5 tokens: its text padding has that many rows)"))),
    # SanaControlNetModel/SanaControlNetPipeline read one condition and no control mode: no union ControlNet.
    # DC-AE down-samples by 32; the transformer reads patch_size (1 in the published bases) latent patches.
    FamilySpec("sana", "Sana", ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
               "SanaControlNetModel", transformer_prefixes=("Sana",), pipeline_prefixes=("Sana",), vae_scale=32,
               patch=1, patch_from_config=True, layer_flags=("controlnet_num_layers",), sequence_length=True,
               unmirrored=("qk_norm", "guidance_embeds")),
)}
"""Family name -> its facts; the keys are the adapters' names in train/families/."""

XS_SIZE_RATIO = 0.1
"""A ControlNet-XS adapter's width / its UNet's when ``--controlnet_xs_size_ratio`` is not given: the published
diffusers ControlNet-XS checkpoints (SD 2.1, SDXL canny/depth) are 0.1 of their UNet's width."""

METHOD_CLASSES: dict[str, str] = {"controlnet_xs": "ControlNetXSAdapter"}
"""Control method -> the diffusers class it trains and exports, where it is not the family's ControlNet class
(what a ``--controlnet_model_name_or_path`` folder's config.json must name to continue such a run)."""

FAMILY_NAMES = {name: spec.label for name, spec in SPECS.items()}
"""Family name -> how messages name it."""

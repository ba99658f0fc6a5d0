"""ControlNet-LoRA: a ControlNet whose copied blocks stay frozen at the base's weights and learn only LoRA
adapters (peft), while the parts a ControlNet adds to the copy (condition embedding, zero convolutions /
controlnet blocks, a union's routing) train in full.

The trained module stays an instance of the family's ControlNet class, with peft's LoRA layers injected
(``peft.inject_adapter_in_model``), so the families' loss and validation code call it as they call a full
ControlNet. What trains is what has ``requires_grad``: the optimiser, the EMA and checkpoints hold only that
(``trained_parameters``, ``register_checkpoint_hooks``); the export merges the adapters into a plain ControlNet
(``merged``) and also writes the adapter alone (``save_adapter``, peft's format).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import torch

from train.errors import SetupError

ADAPTER_FOLDER = "controlnet_lora"
"""The adapter alone, in peft's format (adapter_config.json + adapter_model.safetensors)."""
ROOT_PARAMETERS = "root_parameters.safetensors"
"""Trained parameters held by the ControlNet itself, not by a submodule (the SDXL union's ``task_embedding``):
peft's ``modules_to_save`` names modules only, so they sit beside the adapter."""
PEFT_PREFIX = "base_model.model."
"""How ``PeftModel.save_pretrained`` prefixes every key of adapter_model.safetensors."""

NEW_PARTS: dict[str, tuple[str, ...]] = {
    "ControlNetModel": ("controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid_block"),
    "ControlNetUnionModel": ("controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid_block",
                             "task_embedding", "transformer_layes", "spatial_ch_projs", "control_type_proj",
                             "control_add_embedding"),
    "SD3ControlNetModel": ("pos_embed_input", "controlnet_blocks"),
    "FluxControlNetModel": ("controlnet_x_embedder", "input_hint_block", "controlnet_blocks",
                            "controlnet_single_blocks", "controlnet_mode_embedder"),
    "QwenImageControlNetModel": ("controlnet_x_embedder", "controlnet_blocks"),
    # each control layer is a copy of a base layer plus zero-initialised projections in and out
    "ZImageControlNetModel": ("control_all_x_embedder", "control_layers.*.before_proj",
                              "control_layers.*.after_proj", "control_noise_refiner.*.before_proj",
                              "control_noise_refiner.*.after_proj"),
}
"""ControlNet class -> the attributes that are new (not copied from the base): they train in full. Everything
else is a copy of the base's weights and gets LoRA adapters on its Linear/Conv2d layers. ``*`` stands for one
name segment (a block's index)."""


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """The adapters' shape (from ``--controlnet_lora_rank``/``_alpha``/``_dropout``)."""

    rank: int
    alpha: float | None = None
    """LoRA's scale is alpha / rank; None: alpha = rank (scale 1)."""
    dropout: float = 0.0

    def peft_config(self, targets: list[str], modules_to_save: list[str] | None = None):
        from peft import LoraConfig

        # a pattern peft matches whole: a list would match by suffix, and ``conv_in`` would also catch the
        # new condition encoder's ``controlnet_cond_embedding.conv_in``
        exact = "^(?:" + "|".join(re.escape(t) for t in targets) + ")$"
        # B starts at zero (peft's default init), so the adapted layers start exactly at the base's weights
        return LoraConfig(r=self.rank, lora_alpha=self.alpha if self.alpha is not None else self.rank,
                          lora_dropout=self.dropout, target_modules=exact, modules_to_save=modules_to_save,
                          init_lora_weights=True)


def new_part_names(controlnet: torch.nn.Module) -> tuple[str, ...]:
    """The new (fully trained) attributes of ``controlnet``'s class; a class not in ``NEW_PARTS`` is refused."""
    name = type(controlnet).__name__
    if name not in NEW_PARTS:
        raise ValueError(f"--controlnet_lora_rank: no LoRA layout for {name} (known: {', '.join(NEW_PARTS)})")
    return NEW_PARTS[name]


def is_new(name: str, parts: tuple[str, ...]) -> bool:
    """Whether the module or parameter ``name`` belongs to one of the new ``parts``."""
    return any(re.fullmatch(re.escape(p).replace(r"\*", r"[^.]+") + r"(?:\..*)?", name) for p in parts)


def lora_targets(controlnet: torch.nn.Module) -> list[str]:
    """The copied Linear/Conv2d layers that get adapters: every one outside the new parts whose weight would
    train (a layer the family froze, such as a dead text stream, stays without one: it gets no gradient)."""
    parts = new_part_names(controlnet)
    return [name for name, module in controlnet.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and not is_new(name, parts)
            and module.weight.requires_grad]


def add_lora(controlnet: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """``controlnet`` with LoRA adapters on its copied layers; the copied weights frozen, the adapters and the
    new parts trainable. Its outputs are unchanged (B starts at zero)."""
    from peft import inject_adapter_in_model

    parts = new_part_names(controlnet)
    trainable_new = [p for name, p in controlnet.named_parameters() if is_new(name, parts) and p.requires_grad]
    targets = lora_targets(controlnet)
    if not targets:
        raise ValueError(f"--controlnet_lora_rank: {type(controlnet).__name__} has no copied layer to adapt")
    controlnet = inject_adapter_in_model(settings.peft_config(targets), controlnet)  # freezes all but the adapters
    for p in trainable_new:
        p.requires_grad_(True)
    return controlnet


def is_lora(controlnet: torch.nn.Module) -> bool:
    """Whether ``controlnet`` (or what accelerate wrapped) carries LoRA adapters."""
    return hasattr(getattr(controlnet, "module", controlnet), "peft_config")


def trained_parameters(controlnet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What the optimiser and the EMA hold: a LoRA ControlNet's adapters and new parts; a full ControlNet's
    parameters, all of them (as before LoRA existed, so its checkpoints' EMA keeps its layout)."""
    if not is_lora(controlnet):
        return list(controlnet.parameters())
    return [p for p in controlnet.parameters() if p.requires_grad]


def trained_state(controlnet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained parameters by name (what a LoRA run's checkpoint holds of the model)."""
    return {name: p for name, p in controlnet.named_parameters() if p.requires_grad}


def merged(controlnet: torch.nn.Module) -> torch.nn.Module:
    """A plain copy of the family's ControlNet with the adapters added into the copied weights: it loads
    wherever a ControlNet does and gives the residuals the adapted one gives."""
    from peft.tuners.lora import LoraLayer

    plain = copy.deepcopy(controlnet)
    for name, module in list(plain.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            parent, _, leaf = name.rpartition(".")
            setattr(plain.get_submodule(parent) if parent else plain, leaf, module.get_base_layer())
    del plain.peft_config
    plain.requires_grad_(True)
    return plain


def save_adapter(controlnet: torch.nn.Module, folder: Path, base_model: str | None = None) -> Path:
    """The adapter alone in peft's format: adapter_config.json (LoRA targets, and the new parts as
    ``modules_to_save``) and adapter_model.safetensors with ``PeftModel.save_pretrained``'s key names, so
    ``PeftModel.from_pretrained(<the ControlNet made from the base>, folder).merge_and_unload()`` rebuilds it.
    Parameters the ControlNet holds itself (not in a module) go in ``ROOT_PARAMETERS``."""
    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import save_file

    parts = new_part_names(controlnet)
    targets = [n for n, m in controlnet.named_modules() if isinstance(m, LoraLayer)]
    leaves = saved_modules(controlnet, parts)
    config = controlnet.peft_config["default"]
    settings = LoraSettings(config.r, config.lora_alpha, config.lora_dropout)
    peft_config = settings.peft_config(targets, leaves)
    peft_config.base_model_name_or_path = base_model
    folder.mkdir(parents=True, exist_ok=True)
    peft_config.save_pretrained(str(folder))
    state = {PEFT_PREFIX + k: v for k, v in get_peft_model_state_dict(controlnet).items()}
    for leaf in leaves:
        for name, p in controlnet.get_submodule(leaf).named_parameters():
            state[f"{PEFT_PREFIX}{leaf}.{name}"] = p
    save_file(cpu_contiguous(state), folder / "adapter_model.safetensors", metadata={"format": "pt"})
    root = {n: p for n, p in controlnet.named_parameters(recurse=False) if p.requires_grad}
    if root:
        save_file(cpu_contiguous(root), folder / ROOT_PARAMETERS, metadata={"format": "pt"})
    return folder


def saved_modules(controlnet: torch.nn.Module, parts: tuple[str, ...]) -> list[str]:
    """The new parts' modules for peft's ``modules_to_save``: those holding trained parameters themselves,
    less any inside another (peft wraps each one; a wrapped module inside a wrapped one does not load)."""
    owners = [n for n, m in controlnet.named_modules()
              if n and is_new(n, parts) and any(p.requires_grad for p in m.parameters(recurse=False))]
    return [n for n in owners if not any(n.startswith(other + ".") for other in owners)]


def cpu_contiguous(state: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Tensors as safetensors stores them: detached, on the CPU, contiguous (in ``dtype`` when given)."""
    return {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}


def validation_copy(controlnet: torch.nn.Module, ema=None) -> torch.nn.Module:
    """A plain ControlNet to sample with: the EMA weights (when given) put into a copy, then merged."""
    if ema is None:
        return merged(controlnet)
    shadow = copy.deepcopy(controlnet)
    ema.copy_to(trained_parameters(shadow))
    return merged(shadow)


def register_checkpoint_hooks(accelerator) -> None:
    """Make ``accelerator.save_state``/``load_state`` keep only what trains of a LoRA ControlNet: the frozen
    copy is the base's (rebuilt from it on resume), so a checkpoint holds the adapters and new parts alone.
    A checkpoint whose model is not exactly those (say one of a full ControlNet run) is refused on load."""
    from accelerate.utils.constants import SAFE_MODEL_NAME

    def save(models, weights, output_dir) -> None:
        for i, model in enumerate(models):
            if is_lora(model):
                names = set(trained_state(accelerator.unwrap_model(model)))
                weights[i] = {k: v for k, v in weights[i].items() if k in names}

    def load(models, input_dir) -> None:
        for i, model in reversed(list(enumerate(models))):
            if is_lora(model):
                name = SAFE_MODEL_NAME + ("" if i == 0 else f"_{i}")
                load_trained_state(accelerator.unwrap_model(model), Path(input_dir) / f"{name}.safetensors")
                models.pop(i)  # loaded here: accelerate's own (strict, whole-model) load skips it

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def load_trained_state(controlnet: torch.nn.Module, path: Path) -> None:
    """Load a LoRA run's checkpointed weights into ``controlnet``; they must be exactly its trained ones."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise SetupError(f"{path.parent}: no {path.name}; not a checkpoint of a --controlnet_lora_rank run")
    state, wanted = load_file(str(path)), trained_state(controlnet)
    missing, unexpected = sorted(set(wanted) - set(state)), sorted(set(state) - set(wanted))
    if missing or unexpected:
        raise SetupError(f"{path.parent} was not written by a run of this --controlnet_lora_rank layout "
                         f"({len(missing)} trained weights missing, e.g. {missing[:1]}; {len(unexpected)} "
                         f"unexpected, e.g. {unexpected[:1]}): resume with the flags that wrote it")
    mismatched = [k for k in wanted if state[k].shape != wanted[k].shape]
    if mismatched:
        raise SetupError(f"{path.parent}: {mismatched[0]} has shape {tuple(state[mismatched[0]].shape)}, this run's "
                         f"{tuple(wanted[mismatched[0]].shape)}: resume with the --controlnet_lora_rank that wrote it")
    controlnet.load_state_dict(state, strict=False)


def settings_of(config) -> LoraSettings | None:
    """The LoRA settings a ``TrainConfig`` asks for (None: a full ControlNet)."""
    if config.controlnet_lora_rank is None:
        return None
    return LoraSettings(config.controlnet_lora_rank, config.controlnet_lora_alpha, config.controlnet_lora_dropout)

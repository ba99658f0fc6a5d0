"""Sharded training of the ControlNet (FSDP2, DeepSpeed ZeRO-2/3) for ControlNets that do not fit one GPU with DDP.

The launch picks the mode (``accelerate launch --config_file train/accelerate_configs/<mode>.yaml``); this module
reads it, refuses what a mode cannot do before any weights load, fills in what the shipped configs leave to the
run (FSDP's wrap policy, DeepSpeed's batch size and clipping), and gathers the full ControlNet for the export.
Only the ControlNet is given to ``accelerator.prepare``: the locked base is never sharded and stays whole on
every process (in bf16, or fp8 with ``--fp8_base``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping

import torch

log = logging.getLogger("train")


@dataclasses.dataclass(frozen=True)
class ShardingMode:
    """What one sharded launch splits over the processes."""

    name: str
    """How messages name it (``FSDP``, ``DeepSpeed ZeRO-3``)."""
    shards_weights: bool
    """The ControlNet's weights are split: no process holds the whole model between steps, so validation
    sampling and EMA (both read whole weights on one process) are refused, and the export gathers."""


MODES = {
    "fsdp": ShardingMode("FSDP", shards_weights=True),
    "zero2": ShardingMode("DeepSpeed ZeRO-2", shards_weights=False),
    "zero3": ShardingMode("DeepSpeed ZeRO-3", shards_weights=True),
}

# The ControlNet's repeated blocks, per family: each becomes its own FSDP unit (gathered for its forward and
# freed after), so one process never holds more than a block or two of full weights at a time.
WRAP_BLOCKS: dict[str, tuple[str, ...]] = {
    "sd": ("CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn"),
    "sdxl": ("CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn", "ResidualAttentionBlock"),
    "sd3": ("JointTransformerBlock", "SD3SingleTransformerBlock"),
    "flux": ("FluxTransformerBlock", "FluxSingleTransformerBlock"),
    "qwenimage": ("QwenImageTransformerBlock",),
    "zimage": ("ZImageTransformerBlock", "ZImageControlTransformerBlock"),
    "sana": ("SanaTransformerBlock",),
    "hunyuandit": ("HunyuanDiTBlock",),
}


def requested_mode(environ: Mapping[str, str] = os.environ) -> str | None:
    """The sharding ``accelerate launch`` set up (a key of ``MODES``; ZeRO-0/1 count as ZeRO-2: nothing of the
    weights is split), or None for DDP / one process."""
    if environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    if environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "zero3" if environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "") == "3" else "zero2"
    return None


def flag_problem(config: Any, mode: str | None) -> str | None:
    """Why ``config`` cannot run under the launch's sharding (one line saying what to do), or None."""
    if mode is None or not MODES[mode].shards_weights:
        return None
    name = MODES[mode].name
    method = getattr(config, "control_method", "controlnet")
    if method != "controlnet":  # the wrap policy, gathered export and checkpoints are built for a ControlNet
        return (f"--control_method {method} is not supported under {name}: sharding is built for a ControlNet "
                "(its wrap policy names ControlNet blocks); its trained part is small enough for DDP (channel-concat's "
                "--control_lora_rank 0 full fine-tune is not), so launch without the sharding config")
    if getattr(config, "controlnet_lora_rank", None):
        return (f"--controlnet_lora_rank is not supported under {name}: a ControlNet-LoRA trains only its adapters, "
                "small enough for DDP; launch without the sharding config")
    if config.use_ema:
        return (f"--use_ema is not supported under {name}: the EMA would need the whole ControlNet on every "
                "process, which sharding exists to avoid; drop --use_ema, or use DeepSpeed ZeRO-2 or DDP")
    if config.validation_enabled:
        return (f"validation sampling needs the whole ControlNet on one process, which {name} never holds while "
                "training: pass --validation_steps 0 and score the export with train/evaluate.py "
                "(or use DeepSpeed ZeRO-2 or DDP)")
    return None


def accelerator_kwargs(mode: str | None) -> dict[str, Any]:
    """How to build the ``Accelerator`` for the launch: on a machine with no GPU, ``cpu=True`` (torchrun's ranks
    join over gloo), except under DeepSpeed, which accelerate turns off when told ``cpu=True``: there, DeepSpeed's
    CPU accelerator, its process group over gloo (accelerate finds no backend of its own for a CPU)."""
    if torch.cuda.is_available():
        return {"cpu": False}
    if not (mode or "").startswith("zero"):
        return {"cpu": True}
    from accelerate.utils import InitProcessGroupKwargs

    return {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}


def launch_problem(accelerator: Any, mode: str | None) -> str | None:
    """A launch that asked for sharding that accelerate did not set up (FSDP on a machine with no GPU becomes
    plain DDP in accelerate 1.16): refused rather than silently training unsharded."""
    from accelerate.utils import DistributedType

    wanted = {"fsdp": DistributedType.FSDP, "zero2": DistributedType.DEEPSPEED, "zero3": DistributedType.DEEPSPEED}
    if mode is None or accelerator.distributed_type == wanted[mode]:
        return None
    return (f"the accelerate config asks for {MODES[mode].name}, but accelerate set up {accelerator.distributed_type.value} "
            f"on {accelerator.device.type} (accelerate runs FSDP only on GPUs): launch on GPUs, or without the "
            "sharding config (plain DDP)")


def check_launch(accelerator: Any, mode: str | None) -> None:
    """Refuse a launch whose sharding accelerate did not set up (``SetupError``); under ZeRO-3, keep the base's
    transformers models (text encoders) out of ZeRO-3: accelerate tells transformers about ZeRO-3, whose
    ``from_pretrained`` would then load them partitioned, though only the ControlNet is given to DeepSpeed."""
    from train.errors import SetupError

    problem = launch_problem(accelerator, mode)
    if problem:
        raise SetupError(problem)
    if mode == "zero3":
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


def before_prepare(accelerator: Any, controlnet: torch.nn.Module, family: str, config: Any) -> None:
    """Fill in what the shipped configs leave to the run, before ``accelerator.prepare``."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        set_wrap_policy(accelerator.state.fsdp_plugin, controlnet, family)
    elif accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        # train.py's flags decide; accelerate would take 1 (no prepared loader) and clip at 1.0
        if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            ds["train_micro_batch_size_per_gpu"] = config.train_batch_size
        if ds.get("gradient_clipping", "auto") == "auto":
            ds["gradient_clipping"] = config.max_grad_norm


def set_wrap_policy(plugin: Any, controlnet: torch.nn.Module, family: str) -> None:
    """TRANSFORMER_BASED_WRAP with no classes named: the family's blocks (``WRAP_BLOCKS``) found in the model,
    else whatever repeats in its ``ModuleList``s (a family this table does not know yet)."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    policy = getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy)
    if policy is not transformer_auto_wrap_policy or plugin.transformer_cls_names_to_wrap is not None:
        return  # size-based, no wrap, or classes the user named: theirs
    present = {type(m).__name__ for m in controlnet.modules()}
    names = [n for n in WRAP_BLOCKS.get(family, ()) if n in present] or repeated_blocks(controlnet)
    plugin.transformer_cls_names_to_wrap = names
    log.info("FSDP: each %s of the ControlNet is its own shard unit", ", ".join(names) or "(none found: one unit)")


def repeated_blocks(model: torch.nn.Module) -> list[str]:
    """Class names of the modules held in the model's ``ModuleList``s (its stacks of blocks)."""
    names: list[str] = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            names += [type(m).__name__ for m in module if type(m).__name__ not in names]
    return names


def own_class(module: torch.nn.Module) -> type:
    """The model's class under FSDP2's wrapper class (``FSDPFluxControlNetModel`` -> ``FluxControlNetModel``)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def exported_controlnet(accelerator: Any, model: torch.nn.Module) -> torch.nn.Module | None:
    """The whole trained ControlNet to export. Every process must call it (gathering is collective).

    Weights whole on every process (DDP, ZeRO-2): the unwrapped module. Sharded (FSDP, ZeRO-3): on the main
    process a new module of the ControlNet's own class holding the gathered full weights (FSDP's full state
    dict; ZeRO-3's gathered 16-bit weights, ``zero3_save_16bit_model``); None on the other processes."""
    module = accelerator.unwrap_model(model)
    mode = requested_mode()
    if mode is None or not MODES[mode].shards_weights:
        return module
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    full = own_class(module).from_config(module.config)
    full.load_state_dict(state)  # strict: a missing or extra key is a bug, never a silently random weight
    return full.to(next(iter(state.values())).dtype)

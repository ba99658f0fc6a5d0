"""Which family a base folder holds, and what a run's flags, base folder or ControlNet folder get wrong for it.

Reads only config files (config.json, model_index.json) and the facts in train/family_specs.py, so a
wrong flag fails before any weights load. The ``config`` these functions take is a ``TrainConfig``
(train/config.py calls them from its checks; this module does not import it).
"""

from __future__ import annotations

import json
import os
from typing import Any

from train.errors import SetupError
from train.family_specs import FAMILY_NAMES, METHOD_CLASSES, SPECS, FamilySpec

LAYER_FLAG_USE = {
    "controlnet_num_layers": "sizes a transformer ControlNet's copied blocks",
    "controlnet_num_single_layers": "sizes Flux's single-stream blocks",
    "control_layers_places": "places control blocks at chosen layers of the base (Z-Image)",
}
"""What each ControlNet-size flag sizes, for refusing it on a family without such blocks."""


def family_flag_problem(config: Any, family: str, transformer: dict | None = None) -> str | None:
    """What is wrong with the flags for this model family (a message saying what to do), or None;
    ``transformer``: the base's transformer config, for the checks that need it."""
    spec = SPECS[family]
    return (control_method_family_problem(config, spec)
            or resolution_problem(config.resolution, family, transformer)
            or unmirrored_problem(spec, transformer)
            or guidance_problem(config, family, transformer)
            or union_problem(config, spec)
            or fixed_flag_problem(config, spec)
            or layer_flag_problem(config, spec)
            or layer_places_problem(getattr(config, "control_layers_places", ()), spec, transformer)
            or sequence_length_problem(config, spec)
            or stacking_problem(config, spec))


def unmirrored_problem(spec: FamilySpec, transformer: dict | None) -> str | None:
    """A base transformer setting the family's ControlNet class cannot copy (its blocks would not match)."""
    for key in spec.unmirrored:
        value = (transformer or {}).get(key)
        if value:
            return (f"this {spec.label} base's transformer sets {key}={value!r}; {spec.controlnet_class} has no "
                    f"{key}, so it cannot copy the base's blocks: use a {spec.label} base without it")
    return None


def control_method_family_problem(config: Any, spec: FamilySpec) -> str | None:
    """A ``--control_method`` the family's diffusers pipelines cannot load (``FamilySpec.control_methods``)."""
    method = getattr(config, "control_method", "controlnet")
    if method in spec.control_methods:
        return None
    having = ", ".join(s.label for s in SPECS.values() if method in s.control_methods)
    return (f"--control_method {method}: diffusers has no {spec.label} pipeline for it (only {having or 'none'}); "
            "use --control_method controlnet")


XS_UNET_LAYOUT = {"layers_per_block": 2, "mid_block_type": "UNetMidBlock2DCrossAttn"}
"""The UNet layout diffusers' ``UNetControlNetXSModel`` fuses with (SD 1.x/2.x and SDXL): two resnets per down
block (three per up block) and a cross-attention mid block."""


def control_method_base_problem(method: str, unet: dict | None) -> str | None:
    """Why the base UNet (its config) cannot take the ``method`` (None when it can, or its config is not known)."""
    if method != "controlnet_xs" or unet is None:
        return None
    for key, wanted in XS_UNET_LAYOUT.items():
        value = unet.get(key) or wanted  # diffusers' default when the config leaves it out
        values = set(value) if isinstance(value, (list, tuple)) else {value}
        if values != {wanted}:
            return (f"--control_method controlnet_xs: diffusers' UNetControlNetXSModel fuses only UNets with "
                    f"{key}={wanted} (SD 1.x/2.x, SDXL); this base's UNet has {key}={value}: drop --control_method")
    return None


def union_problem(config: Any, spec: FamilySpec) -> str | None:
    """Why ``--union`` cannot be used on this family (None when it can, or is not asked for)."""
    if not config.union:
        return None
    if spec.union_class is None:
        having = " and ".join(s.label for s in SPECS.values() if s.union_class)
        return (f"--union: diffusers has no union ControlNet for {spec.label} (only {having}); drop --union to "
                + ("stack the conditions as channels" if spec.stacks_conditions else "train one condition"))
    if spec.max_union_types is not None and len(config.condition) > spec.max_union_types:
        return (f"--union on {spec.label}: {spec.union_class} has {spec.max_union_types} control types; name at "
                "most that many")
    return None


def fixed_flag_problem(config: Any, spec: FamilySpec) -> str | None:
    """A flag whose setting the family's base fixes (``FamilySpec.fixed_flags``), with the reason."""
    for flag, why in spec.fixed_flags:
        if getattr(config, flag) is not None:
            return f"--{flag}: {why}; drop it"
    return None


def layer_flag_problem(config: Any, spec: FamilySpec) -> str | None:
    """A ControlNet-size flag the family has no blocks for."""
    for flag, use in LAYER_FLAG_USE.items():
        if getattr(config, flag, None) not in (None, ()) and flag not in spec.layer_flags:
            what = ("copies the UNet's whole encoder" if spec.unet_embedding is not None
                    else "has no such blocks")
            takes = f" (it is sized by --{' and --'.join(spec.layer_flags)})" if spec.layer_flags else ""
            return f"--{flag} {use}; a {spec.label} ControlNet {what}: drop it{takes}"
    return None


def layer_places_problem(places: tuple[int, ...], spec: FamilySpec, transformer: dict | None) -> str | None:
    """``--control_layers_places`` that cannot place a ControlNet's blocks: the first must be 0 (the block that
    reads the condition), each later one deeper than the one before (one residual per base layer), all within
    the base's ``depth_key`` layers (when its transformer config is known)."""
    if not places or "control_layers_places" not in spec.layer_flags:
        return None
    depth = (transformer or {}).get(spec.depth_key) if spec.depth_key else None
    given = ",".join(str(p) for p in places)
    if places[0] != 0 or any(b <= a for a, b in zip(places, places[1:])):
        return (f"--control_layers_places {given}: start at 0 and list each layer once, in increasing order "
                "(e.g. 0,5,10,15,20,25 as the Fun Union ControlNets)")
    if depth is not None and places[-1] >= depth:
        return (f"--control_layers_places {given}: this {spec.label} base has {depth} layers (0..{depth - 1}); "
                "place every block within them")
    return None


def sequence_length_problem(config: Any, spec: FamilySpec) -> str | None:
    """``--max_sequence_length`` on a family whose text encoders take a fixed prompt length, or longer than its
    pipeline takes."""
    if config.max_sequence_length is None:
        return None
    if spec.sequence_length:
        if spec.max_sequence_length is None or config.max_sequence_length <= spec.max_sequence_length:
            return None
        return (f"--max_sequence_length {config.max_sequence_length}: the {spec.label} pipeline takes at most "
                f"{spec.max_sequence_length} prompt tokens; use {spec.max_sequence_length} or less")
    having = ", ".join(s.label for s in SPECS.values() if s.sequence_length)
    return (f"--max_sequence_length sets the prompt length of a T5 or LLM text encoder ({having}); {spec.label} "
            "has no T5 or LLM text encoder: drop it")


def stacking_problem(config: Any, spec: FamilySpec) -> str | None:
    """Several conditions without ``--union`` on a family whose ControlNet reads one VAE-encoded image."""
    if spec.stacks_conditions or len(config.condition) < 2 or config.union:
        return None
    return (f"{spec.label} ControlNets read one VAE-encoded condition image (as their pipelines pass it), so "
            "conditions cannot be stacked as channels: name one condition"
            + (", or add --union" if spec.union_class else ""))


def resolution_problem(resolution: int, family: str, transformer: dict | None) -> str | None:
    """Why ``resolution`` does not fit a transformer base (None when it does): latents of ``vae_scale`` in
    patches (Flux packs 2x2; SD3 reads ``patch_size``), within SD3's ``pos_embed_max_size`` patches."""
    spec = SPECS[family]
    if spec.patch is None:
        return None
    patch = int((transformer or {}).get("patch_size") or spec.patch) if spec.patch_from_config else spec.patch
    step = spec.vae_scale * patch
    if resolution % step:
        return (f"--resolution {resolution}: {spec.label} needs a multiple of {step} (latents of /{spec.vae_scale} "
                f"in {patch}x{patch} patches); use e.g. {max(step, resolution // step * step)}")
    reach = (transformer or {}).get("pos_embed_max_size") if spec.position_reach else None
    if reach and resolution // step > reach:
        return (f"--resolution {resolution}: this {spec.label} base's position embedding reaches {reach} patches "
                f"({reach * step} px); use --resolution {reach * step} or less")
    return None


def guidance_problem(config: Any, family: str, transformer: dict | None) -> str | None:
    """Why ``--guidance_scale`` does not apply (None when it does, or was not given): only bases with
    ``guidance_embeds`` (Flux.1-dev) read a guidance input."""
    if config.guidance_scale is None:
        return None
    spec = SPECS[family]
    if not spec.guidance:
        return f"--guidance_scale is Flux.1-dev's guidance input; {spec.label} has none: drop it"
    if transformer is not None and not transformer.get("guidance_embeds"):
        return (f"--guidance_scale: this {spec.label} base has no guidance_embeds (a Flux.1-schnell-like model reads "
                "no guidance input): drop it")
    return None


def controlnet_families(config: dict) -> tuple[str, ...]:
    """The families whose bases a ControlNet of this config steers (a plain ControlNetModel: SD 1.x/2.x or
    SDXL, told apart by its ``addition_embed_type`` as their UNets are)."""
    kind = config.get("_class_name", "")
    families = tuple(s.name for s in SPECS.values() if kind in (s.controlnet_class, s.union_class))
    shared = [s for s in SPECS.values() if s.name in families and s.unet_embedding is not None]
    if kind and len(shared) > 1 and kind not in {s.union_class for s in shared}:
        embedding = config.get("addition_embed_type") or ""
        return tuple(s.name for s in shared if s.unet_embedding == embedding) or families
    return families


def controlnet_family_problem(path: str | None, family: str, union: bool, method: str = "controlnet") -> str | None:
    """Why the ControlNet folder at ``path`` cannot continue on this base with this control ``method`` (None when
    it can, or when its config cannot be read here: a hub id offline is left to the loader). Read before any
    weights load; an adapter of another method (ControlNet-XS) is checked against the base's sizes when it loads."""
    if not path:
        return None
    config = controlnet_json(path)
    if config is None:
        return None
    kind = config.get("_class_name", "")
    families = controlnet_families(config)
    what = ", ".join(FAMILY_NAMES[f] for f in families) or "no family this trainer knows"
    spec = SPECS[family]
    wanted = METHOD_CLASSES.get(method) or (spec.union_class if union else spec.controlnet_class)
    if kind == wanted and (family in families or method in METHOD_CLASSES):  # Flux num_mode: checked at load
        return None
    return (f"{path} is a {kind or 'ControlNet of unknown class'} ({what} ControlNet); this "
            f"{'--union ' if union else ''}run's base is {spec.label}: pass a {wanted} folder "
            "or leave --controlnet_model_name_or_path out")


def controlnet_json(path: str) -> dict | None:
    """The config.json of a ControlNet folder (or of its controlnet/ subfolder), None when not local."""
    for name in ("config.json", "controlnet/config.json"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file) as f:
                return json.load(f)
    return None


def base_folder_problem(path: str, family: str) -> str | None:
    """A local base folder's missing subfolders (a message saying what it needs), or None."""
    if not os.path.isdir(path):
        return None
    spec = SPECS[family]
    missing = [d for d in spec.folders if not os.path.isdir(os.path.join(path, d))]
    if not missing:
        return None
    folders = "folder" if len(missing) == 1 else "folders"
    return f"{path}: no {', '.join(d + '/' for d in missing)} {folders} ({spec.hint})"


def local_family(path: str) -> str | None:
    """The family of a local base folder; None for a hub id or a folder that is not a diffusers base
    (loading it reports that, with the rest of the run's set-up)."""
    if not os.path.isdir(path):
        return None
    try:
        return detect_family(path)
    except (ValueError, OSError):
        return None


def detect_family(path: str) -> str:
    """The family of a diffusers base (local folder or hub id): from its denoiser's config (transformer/ or
    unet/), else its model_index.json pipeline class."""
    known = ", ".join(FAMILY_NAMES.values())
    transformer = base_json(path, "transformer/config.json")
    if transformer:
        kind = transformer.get("_class_name", "")
        found = _by_prefix(kind, {p: s.name for s in SPECS.values() for p in s.transformer_prefixes})
        if found:
            return found
        raise SetupError(f"{path}: transformer {kind!r} is not a supported family ({known})")
    unet = base_json(path, "unet/config.json")
    if unet:
        embedding = unet.get("addition_embed_type") or ""
        return next((s.name for s in SPECS.values() if s.unet_embedding == embedding),
                    next(s.name for s in SPECS.values() if s.unet_embedding == ""))
    pipeline = (base_json(path, "model_index.json") or {}).get("_class_name", "")
    found = _by_prefix(pipeline, {p: s.name for s in SPECS.values() for p in s.pipeline_prefixes})
    if found:
        return found
    if not os.path.isdir(path):
        raise SetupError(f"{path}: no such folder, and no diffusers base of that hub id could be read; pass a "
                         f"local diffusers folder of {known} (or a reachable hub id)")
    raise SetupError(f"{path}: no unet/ or transformer/ config and no known model_index.json pipeline; "
                     f"expected a diffusers folder of {known}")


def _by_prefix(kind: str, prefixes: dict[str, str]) -> str | None:
    """The family of the longest prefix ``kind`` starts with (``StableDiffusionXL`` before ``StableDiffusion``)."""
    for prefix in sorted(prefixes, key=len, reverse=True):
        if kind.startswith(prefix):
            return prefixes[prefix]
    return None


def base_json(path: str, name: str) -> dict | None:
    """A JSON file of the base: read locally, else fetched from the hub (None when absent)."""
    if os.path.isdir(path) or looks_local(path):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return None
    else:
        try:
            from huggingface_hub import hf_hub_download

            folder, _, filename = name.rpartition("/")
            file = hf_hub_download(path, filename, subfolder=folder or None)
        except Exception:
            return None
    with open(file) as f:
        return json.load(f)


def looks_local(path: str) -> bool:
    """A filesystem path rather than a hub id (``name`` or ``owner/name``): absolute, relative with ``.``/``~``,
    or with more than one ``/``; such a path that does not exist is never looked up on the hub."""
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1

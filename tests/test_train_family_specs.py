"""Every family's facts (train/family_specs.py) tell its base folders and ControlNet folders apart from every
other family's, and a family's flags are checked against its own facts, from config files alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train.config import CONTROL_METHODS
from train.family_checks import (base_folder_problem, controlnet_family_problem, controlnet_families, detect_family,
                                 family_flag_problem)
from train.family_specs import SPECS, FamilySpec


def write(path: Path, config: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))


def base_layouts(spec: FamilySpec, root: Path) -> list[Path]:
    """Config-only base folders of the family: one per way detect_family can read it."""
    folders = []
    for i, prefix in enumerate(spec.transformer_prefixes):
        write(root / f"t{i}" / "transformer" / "config.json", {"_class_name": f"{prefix}Transformer2DModel"})
        folders.append(root / f"t{i}")
    if spec.unet_embedding is not None:
        write(root / "u" / "unet" / "config.json", {"addition_embed_type": spec.unet_embedding or None})
        folders.append(root / "u")
    for i, prefix in enumerate(spec.pipeline_prefixes):
        write(root / f"p{i}" / "model_index.json", {"_class_name": f"{prefix}Pipeline"})
        folders.append(root / f"p{i}")
    return folders


@pytest.mark.parametrize("name", sorted(SPECS))
def test_each_family_is_detected_from_each_of_its_layouts(name, tmp_path):
    folders = base_layouts(SPECS[name], tmp_path)
    assert folders, f"{name} has no way to be detected"
    assert [detect_family(str(f)) for f in folders] == [name] * len(folders)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_a_base_missing_a_folder_names_it_and_what_the_family_needs(name, tmp_path):
    spec = SPECS[name]
    for folder in spec.folders[1:]:
        (tmp_path / folder).mkdir()
    problem = base_folder_problem(str(tmp_path), name)
    assert f"no {spec.folders[0]}/ folder" in problem and spec.label in problem
    (tmp_path / spec.folders[0]).mkdir()
    assert base_folder_problem(str(tmp_path), name) is None


@pytest.mark.parametrize("name", sorted(SPECS))
def test_a_controlnet_folder_continues_only_on_its_own_family(name, tmp_path):
    spec = SPECS[name]
    config = {"_class_name": spec.controlnet_class}
    if spec.unet_embedding:
        config["addition_embed_type"] = spec.unet_embedding
    write(tmp_path / "config.json", config)
    assert name in controlnet_families(config)
    assert controlnet_family_problem(str(tmp_path), name, union=False) is None
    others = [n for n in SPECS if n not in controlnet_families(config)]
    for other in others:
        assert SPECS[name].controlnet_class in controlnet_family_problem(str(tmp_path), other, union=False)


def test_a_plain_controlnet_is_sd_or_sdxl_by_its_embedding():
    assert controlnet_families({"_class_name": "ControlNetModel"}) == ("sd",)
    assert controlnet_families({"_class_name": "ControlNetModel", "addition_embed_type": "text_time"}) == ("sdxl",)
    assert controlnet_families({"_class_name": "ControlNetUnionModel"}) == ("sdxl",)
    assert controlnet_families({"_class_name": "NoSuchControlNet"}) == ()


class Flags:
    """The TrainConfig fields the family checks read, at their defaults."""

    resolution = 512
    guidance_scale = None
    union = False
    condition = ("canny",)
    controlnet_num_layers = None
    controlnet_num_single_layers = None
    control_layers_places = ()
    max_sequence_length = None
    control_method = "controlnet"

    def __init__(self, **changes):
        self.__dict__.update(changes)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_each_family_takes_exactly_the_flags_its_facts_allow(name):
    spec = SPECS[name]
    step = spec.vae_scale * (spec.patch or 1)
    assert family_flag_problem(Flags(resolution=64 * step), name) is None
    assert (family_flag_problem(Flags(union=True, condition=("canny", "depth")), name) is None) == bool(spec.union_class)
    assert (family_flag_problem(Flags(condition=("canny", "depth")), name) is None) == spec.stacks_conditions
    assert (family_flag_problem(Flags(max_sequence_length=64), name) is None) == spec.sequence_length
    assert (family_flag_problem(Flags(guidance_scale=3.5), name) is None) == spec.guidance
    for flag, value in (("controlnet_num_layers", 2), ("controlnet_num_single_layers", 2),
                        ("control_layers_places", (0, 1))):
        assert (family_flag_problem(Flags(**{flag: value}), name) is None) == (flag in spec.layer_flags), flag
    for method in CONTROL_METHODS:
        assert (family_flag_problem(Flags(control_method=method), name) is None) == (method in spec.control_methods)
    if spec.patch:
        assert f"multiple of {step}" in family_flag_problem(Flags(resolution=64 * step + 8), name)


def test_an_unknown_transformer_names_every_family_the_trainer_knows(tmp_path):
    write(tmp_path / "transformer" / "config.json", {"_class_name": "MysteryTransformer"})
    with pytest.raises(ValueError) as caught:
        detect_family(str(tmp_path))
    assert all(spec.label in str(caught.value) for spec in SPECS.values())


@pytest.mark.parametrize(("places", "depth", "phrase"), [
    ((1, 2), None, "start at 0"), ((0, 4, 4), None, "list each layer once"), ((0, 5, 3), None, "increasing"),
    ((0, 30), 30, "has 30 layers"), ((0, 29), 30, None), ((0, 5, 10, 15, 20, 25), None, None)])
def test_control_layers_places_start_at_0_increase_and_stay_within_the_base(places, depth, phrase):
    takes = [n for n, s in SPECS.items() if "control_layers_places" in s.layer_flags]
    assert takes, "no family takes --control_layers_places"
    spec = SPECS[takes[0]]
    transformer = {spec.depth_key: depth} if depth else None
    problem = family_flag_problem(Flags(control_layers_places=places, resolution=512), spec.name, transformer)
    assert (problem is None) if phrase is None else (phrase in problem)

"""bench/control_methods.py: its real-size counts agree with the modules the trainer builds, and its fill-task
comparison runs every method end to end (a few steps on a tiny 2-layer SD built from configs)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench import control_methods as bench


@pytest.fixture(scope="module")
def tiny_sd_2l(tmp_path_factory):
    """A tiny SD folder with two layers per UNet block (what ControlNet-XS fuses)."""
    from tests.tiny_sd import write_tiny_sd

    return write_tiny_sd(tmp_path_factory.mktemp("sd2l") / "sd", layers_per_block=2)


def trainer_base(path, method: str = "controlnet", ratio: float | None = None):
    from train.adapter import FamilyOptions
    from train.models import load_base, with_control_method

    base = with_control_method(load_base(str(path), 64), method)
    base.options = FamilyOptions(("canny",), controlnet_xs_size_ratio=ratio)
    return base


def unet_config(path) -> dict:
    return json.loads((path / "unet" / "config.json").read_text())


def row(rows: list[dict], method: str) -> dict:
    return next(r for r in rows if r["method"] == method)


def lora_count(plain: torch.nn.Module, rank: int) -> int:
    """What rank-``rank`` LoRA on every copied Linear/Conv2d adds, counted by hand: A is rank x (inputs x kernel),
    B is outputs x rank; the ControlNet's own new parts (condition encoder, zero convolutions) get none."""
    new = ("controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid_block")
    total = 0
    for name, m in plain.named_modules():
        if name.startswith(new):
            continue
        if isinstance(m, torch.nn.Linear):
            total += rank * (m.in_features + m.out_features)
        elif isinstance(m, torch.nn.Conv2d):
            total += rank * (m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels)
    return total


@pytest.mark.parametrize("rank", [1, 4])
def test_lora_counts_match_the_trainers_controlnet_lora(tiny_sd_2l, rank):
    from train.controlnet_lora import LoraSettings
    from train.families.unet import condition_encoder_channels
    from train.models import make_controlnet

    base = trainer_base(tiny_sd_2l)
    hint = condition_encoder_channels(base)
    rows = bench.unet_rows("tiny", unet_config(tiny_sd_2l), [rank], [], hint)
    plain = make_controlnet(base, 3)
    lora = make_controlnet(trainer_base(tiny_sd_2l), 3, lora=LoraSettings(rank))
    new_parts = sum(p.numel() for n, p in plain.named_parameters() if n.startswith("controlnet_"))
    assert row(rows, bench.REFERENCE)["trained"] == sum(p.numel() for p in plain.parameters())
    got = row(rows, f"ControlNet-LoRA r{rank}")["trained"]
    assert got == bench.trained_count(lora) == new_parts + lora_count(plain, rank)


@pytest.mark.parametrize("ratio", [0.125, 0.5])
def test_xs_counts_match_the_trainers_adapter(tiny_sd_2l, ratio):
    from train.families.unet import condition_encoder_channels
    from train.models import make_controlnet

    base = trainer_base(tiny_sd_2l, "controlnet_xs", ratio)
    xs = make_controlnet(base, 3)
    rows = bench.unet_rows("tiny", unet_config(tiny_sd_2l), [], [ratio], condition_encoder_channels(base))
    got = row(rows, f"ControlNet-XS {ratio:g}")
    assert got["trained"] == sum(p.numel() for p in xs.parameters() if p.requires_grad) > 0
    assert got["files"]["XS adapter folder fp32"] == 4 * got["trained"]


def test_channel_concat_counts_match_the_trainers(tiny_flux):
    from train.adapter import FamilyOptions
    from train.models import load_base, make_controlnet, with_control_method

    config = json.loads((tiny_flux / "transformer" / "config.json").read_text())
    rows = bench.concat_rows("tiny", config, 4)
    for rank, method in ((4, "channel-concat LoRA r4"), (0, "channel-concat full fine-tune")):
        base = with_control_method(load_base(str(tiny_flux), 64), "channel_concat")
        base.options = FamilyOptions(("canny",), max_sequence_length=16, control_lora_rank=rank)
        trained = sum(p.numel() for p in make_controlnet(base, 3).parameters())
        assert row(rows, method)["trained"] == trained
        assert row(rows, method)["widened_input_columns"] == config["in_channels"] * base.transformer.inner_dim


def test_the_real_size_table_covers_each_family_and_method():
    rows = bench.real_sizes([4, 64], 0.1, 0)
    methods = {(r["family"], r["method"]) for r in rows}
    for family in ("SD 1.5", "SDXL"):
        assert {(family, m) for m in (bench.REFERENCE, "ControlNet-LoRA r4", "ControlNet-LoRA r64",
                                      "ControlNet-XS 0.1")} <= methods
    assert {("Flux.1-dev", m) for m in (bench.REFERENCE, "ControlNet-LoRA r4", "channel-concat LoRA r4",
                                        "channel-concat full fine-tune")} <= methods
    sd15 = row(rows, bench.REFERENCE)
    assert sd15["family"] == "SD 1.5" and sd15["trained"] == 361_279_120  # the published SD 1.5 ControlNet
    assert sd15["files"] == {"ControlNet folder fp32": 4 * sd15["trained"], "single file fp16": 2 * sd15["trained"]}
    for family in ("SD 1.5", "SDXL", "Flux.1-dev"):
        ours = [r for r in rows if r["family"] == family]
        r4, r64 = (row(ours, f"ControlNet-LoRA r{r}") for r in (4, 64))
        assert 0 < r4["trained"] < r64["trained"] < row(ours, bench.REFERENCE)["trained"]
        assert r4["trained_ratio"] < 1 and row(ours, bench.REFERENCE)["trained_ratio"] == 1
    assert "Control-LoRA fp16" in row(rows, "ControlNet-LoRA r4")["files"]  # SD 1.x/SDXL only
    assert all("Control-LoRA fp16" not in r["files"] for r in rows if r["family"] == "Flux.1-dev")


def test_the_smallest_xs_ratio_is_the_one_the_trainer_accepts(tiny_sd_2l):
    from train.errors import SetupError
    from train.models import make_controlnet

    least = bench.smallest_xs_ratio(str(tiny_sd_2l))
    make_controlnet(trainer_base(tiny_sd_2l, "controlnet_xs", least), 3)
    with pytest.raises(SetupError, match="attention heads"):
        make_controlnet(trainer_base(tiny_sd_2l, "controlnet_xs", least * 0.9), 3)


class FakeArm:
    """An arm whose steps cost a fixed time on its clock (``Arm.advance``'s contract)."""

    def __init__(self, step_s: float):
        self.step_s, self.steps, self.seconds = step_s, 0, 0.0

    def advance(self, seconds: float, until_step: int | None = None) -> None:
        end = self.seconds + seconds
        while self.seconds < end and (until_step is None or self.steps < until_step):
            self.seconds += self.step_s
            self.steps += 1


def test_the_race_scores_each_arm_at_equal_steps_and_at_the_references_time_for_them():
    arms = {bench.REFERENCE: FakeArm(1.0), "faster": FakeArm(0.5), "slower": FakeArm(2.0)}
    marks: dict = {}
    race = bench.Race(arms, steps=10, segment=3.0, mark=lambda n, a, label: marks.setdefault((n, label),
                                                                                             (a.steps, a.seconds)))
    race.run()
    assert race.wall == 10.0
    assert marks[(bench.REFERENCE, "equal steps")] == marks[(bench.REFERENCE, "equal time")] == (10, 10.0)
    assert marks[("faster", "equal steps")] == (10, 5.0) and marks[("faster", "equal time")] == (20, 10.0)
    assert marks[("slower", "equal time")] == (5, 10.0) and marks[("slower", "equal steps")] == (10, 20.0)
    # turns of equal clock time: no arm ran far ahead of the others before the reference's time was known
    assert len(marks) == 6 and all(arm.steps >= 10 and arm.seconds >= 10.0 for arm in arms.values())


def test_the_bench_builds_a_two_layer_base_once_and_xs_trains_on_it(tmp_path):
    from diffusers import UNet2DConditionModel

    from train.models import make_controlnet

    quick = ("--vae_steps", "2", "--unet_steps", "2", "--pool_size", "16", "--batch_size", "4", "--vae_batch_size",
             "4", "--warmup_steps", "1", "--eval_samples", "2", "--num_inference_steps", "2")
    built = bench.ensure_base(tmp_path / "base", 1, quick)
    assert built["built_s"] > 0
    assert UNet2DConditionModel.from_pretrained(tmp_path / "base", subfolder="unet").config.layers_per_block == 2
    # the card's command rebuilds this base: parsed, it gives the recorded settings
    import re

    from demo import tiny_base

    command = re.search(r"`python -m demo.tiny_base ([^`]*)`", (tmp_path / "base" / "README.md").read_text())[1]
    rebuilt = vars(tiny_base.build_parser().parse_args(command.split()))
    recorded = json.loads((tmp_path / "base" / "tiny_base.json").read_text())["config"]
    assert "--unet_layers_per_block 2" in command
    assert rebuilt == {k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()}
    assert bench.ensure_base(tmp_path / "base", 1)["built_s"] == 0  # cached: never rebuilt
    ratio = bench.smallest_xs_ratio(str(tmp_path / "base"))
    from train.adapter import FamilyOptions
    from train.models import load_base, with_control_method

    base = with_control_method(load_base(str(tmp_path / "base"), 32), "controlnet_xs")
    base.options = FamilyOptions(("canny",), controlnet_xs_size_ratio=ratio)
    assert bench.trained_count(make_controlnet(base, 3)) > 0  # the shipped 1-layer base refuses XS


@pytest.fixture(scope="module")
def circle_manifests(local_ray, tmp_path_factory) -> tuple[str, str]:
    """A few training circles and fresh held-out ones (another seed and file prefix), annotated with Canny."""
    from demo.circles import write_circles
    from pipeline.annotate import run
    from pipeline.config import AnnotateConfig

    root = tmp_path_factory.mktemp("circles")
    out = []
    for name, count, seed in (("circles", 8, 0), ("fresh", 2, 12345)):
        write_circles(root / name, count, size=64, seed=seed, prefix=name)
        run(AnnotateConfig(input=str(root / name), output=str(root / f"{name}_manifest"), resolution=64))
        out.append(str(root / f"{name}_manifest"))
    return out[0], out[1]


@pytest.mark.slow
def test_the_comparison_runs_every_method_with_finite_figures(tiny_sd_2l, circle_manifests, tmp_path):
    manifest, fresh = circle_manifests
    args = bench.parse(["--steps", "2", "--held_out", "2", "--resolution", "64", "--batch", "2",
                        "--segment_seconds", "0.01", "--calibration_steps", "1", "--warmup", "0"])
    methods = bench.fill_methods([2], [0.5])
    result: dict = {}
    bench.compare(str(tiny_sd_2l), manifest, fresh, tmp_path, methods, args, result)
    assert set(result["methods"]) == {bench.REFERENCE, "ControlNet-LoRA r2", "ControlNet-XS 0.5"}
    assert math.isfinite(result["wall_s"]) and result["wall_s"] > 0
    assert all(math.isfinite(v) for v in result["base_alone"].values())
    for name, m in result["methods"].items():
        for label in ("equal steps", "equal time"):
            assert all(math.isfinite(v) for v in m[label].values()), (name, label)
        assert m["equal steps"]["steps"] == 2 and m["equal time"]["seconds"] >= result["wall_s"]
        assert m["trained"] > 0 and all(v > 0 for v in m["files"].values())
        assert m["memory"]["peak_mb"] > m["memory"]["growth_mb"] > 0
    full, lora, xs = (result["methods"][n] for n in methods)
    assert lora["trained"] < full["trained"] and xs["trained"] < full["trained"]
    assert set(lora["files"]) == {"diffusers", "single_file", "adapter", "control_lora"}
    bench.print_fill(result, args)  # the printed table takes what compare gives


def test_alternating_arms_stop_at_each_mark_of_their_own_clock():
    """bench/arms.py ``alternate`` (the reward bench's curve): each arm is handed to ``at_mark`` once per mark, at
    the first step past it, and every arm trains the whole budget."""
    from bench.arms import alternate

    arms = {"plain": FakeArm(1.0), "reward": FakeArm(1.5)}
    seen: list = []
    alternate(arms, budget=12.0, segment=5.0, marks=[3.0, 9.0, 40.0],
              at_mark=lambda name, arm, mark: seen.append((name, mark, arm.steps, arm.seconds)))
    assert [(n, m) for n, m, *_ in seen if n == "plain"] == [("plain", 3.0), ("plain", 9.0), ("plain", 12.0)]
    assert [(n, m) for n, m, *_ in seen if n == "reward"] == [("reward", 3.0), ("reward", 9.0), ("reward", 12.0)]
    assert ("plain", 3.0, 3, 3.0) in seen and ("reward", 3.0, 2, 3.0) in seen and ("reward", 9.0, 6, 9.0) in seen
    assert all(arm.seconds >= 12.0 for arm in arms.values())

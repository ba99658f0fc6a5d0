"""ControlNet-XS (``--control_method controlnet_xs``) on the tiny SD and SDXL bases (two resnets per block, as in
SD and SDXL: diffusers' XS fuses only that layout): zero start, what trains, resume, export, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.test_train_families import resumed_run, train_args, train_keeping_base

PIPELINE = {"sd": "StableDiffusionControlNetXSPipeline", "sdxl": "StableDiffusionXLControlNetXSPipeline"}
XS = ["--control_method", "controlnet_xs", "--controlnet_xs_size_ratio", "0.5"]  # 0.1 leaves tiny heads no width


@pytest.fixture(scope="module")
def xs_bases(tmp_path_factory) -> dict:
    """Tiny SD and SDXL folders whose UNets have two resnets per down block (as SD's and SDXL's)."""
    from tests.tiny_sd import write_tiny_sd, write_tiny_sdxl

    root = tmp_path_factory.mktemp("xs_bases")
    sdxl = write_tiny_sdxl(root / "sdxl", layers_per_block=2)
    # the model_index.json an SDXL folder has, so pipelines load it with from_pretrained as users do
    (sdxl / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
        "vae": ["diffusers", "AutoencoderKL"], "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"]}))
    return {"sd": write_tiny_sd(root / "sd", layers_per_block=2), "sdxl": sdxl}


def xs_base(path, ratio: float = 0.5):
    from train.adapter import FamilyOptions
    from train.models import load_base, with_control_method

    base = with_control_method(load_base(str(path), 64), "controlnet_xs")
    base.options = FamilyOptions(("canny",), controlnet_xs_size_ratio=ratio)
    return base


def denoiser_inputs(base, seed: int = 0) -> dict:
    """A batch of 2 for the UNet: noisy latents, timesteps, prompt states, SDXL's added conditioning."""
    g = torch.Generator().manual_seed(seed)
    hidden, added = base.family.encode_prompts(base, ["a red circle", ""], torch.device("cpu"))
    return {"noisy": torch.randn(2, 4, 8, 8, generator=g), "timesteps": torch.tensor([10, 700]),
            "hidden": hidden, "added": added}


def nudge_outputs(adapter: torch.nn.Module, seed: int = 0) -> None:
    """Random weights in the adapter's zero convolutions (condition encoder out, control -> base), so the
    condition reaches the UNet."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "to_base" in name or name.startswith("controlnet_cond_embedding.conv_out"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# --- zero start, what trains ----------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_a_fresh_xs_adapter_leaves_the_base_prediction_exactly_unchanged(xs_bases, family):
    from train.models import make_controlnet

    base = xs_base(xs_bases[family])
    xs = make_controlnet(base, 3)
    i = denoiser_inputs(base)
    condition = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = base.unet(i["noisy"], i["timesteps"], encoder_hidden_states=i["hidden"],
                          added_cond_kwargs=i["added"] or None).sample
        steered = xs(i["noisy"], i["timesteps"], i["hidden"], condition, i["added"])
        assert torch.equal(steered, plain)
        nudge_outputs(xs.adapter)  # once its zero convolutions have weights, the condition steers the output
        a = xs(i["noisy"], i["timesteps"], i["hidden"], condition, i["added"])
        b = xs(i["noisy"], i["timesteps"], i["hidden"], 1 - condition, i["added"])
    assert not torch.equal(a, plain) and not torch.equal(a, b)


def test_only_the_adapter_is_trainable_and_the_base_is_shared_not_copied(xs_bases):
    from train.models import make_controlnet

    base = xs_base(xs_bases["sd"])
    xs = make_controlnet(base, 3)
    assert [id(p) for p in xs.parameters()] == [id(p) for p in xs.adapter.parameters()]
    assert all(k.startswith("adapter.") for k in xs.state_dict())
    assert not any(p.requires_grad for p in base.unet.parameters())
    assert all(p.requires_grad and p.dtype == torch.float32 for p in xs.adapter.parameters())
    unet_ids = {id(p) for p in base.unet.parameters()}
    fused = list(xs.fused.parameters())
    assert len(fused) == len(unet_ids) + len(list(xs.adapter.parameters()))  # every tensor is one of the two
    assert unet_ids <= {id(p) for p in fused}
    i = denoiser_inputs(base)
    xs(i["noisy"], i["timesteps"], i["hidden"], torch.rand(2, 3, 64, 64), i["added"]).square().mean().backward()
    assert all(p.grad is None for p in base.unet.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in xs.adapter.parameters())


def test_the_optimiser_and_the_ema_hold_the_adapter_alone(demo_manifest, xs_bases, tmp_path):
    from accelerate.state import AcceleratorState

    from train import loop
    from train.train import parse_args

    config = parse_args(train_args(demo_manifest, xs_bases["sd"], tmp_path / "run", "sd", *XS, "--use_ema",
                                   "--max_train_steps", "1", "--validation_steps", "0"))
    run = loop.set_up(config)
    try:
        adapter = run.accelerator.unwrap_model(run.controlnet).adapter
        held = [p for group in run.optimizer.param_groups for p in group["params"]]
        assert [id(p) for p in held] == [id(p) for p in adapter.parameters()]
        assert [p.shape for p in run.ema.shadow_params] == [p.shape for p in adapter.parameters()]
    finally:
        run.accelerator.end_training()
        AcceleratorState._reset_state(True)


def test_a_size_ratio_leaving_attention_heads_no_width_says_what_to_give(xs_bases):
    from train.errors import SetupError
    from train.models import make_controlnet

    with pytest.raises(SetupError, match=r"--controlnet_xs_size_ratio 0.1: .* give at least 0.125"):
        make_controlnet(xs_base(xs_bases["sd"], ratio=0.1), 3)


# --- refusals, before any weights load --------------------------------------------------------------


@pytest.mark.parametrize(("fixture", "extra", "message"), [
    ("tiny_sd3", [], "--control_method controlnet_xs: diffusers has no SD3/3.5 pipeline for it (only SD 1.x/2.x, SDXL)"),
    ("tiny_flux", [], "diffusers has no Flux.1 pipeline for it"),
    ("tiny_sd", [], "fuses only UNets with layers_per_block=2 (SD 1.x/2.x, SDXL); this base's UNet has "
                    "layers_per_block=1"),
    ("xs_sd", ["--controlnet_num_layers", "2"], "--controlnet_num_layers with --control_method controlnet_xs"),
    ("xs_sdxl", ["--union"], "--union with --control_method controlnet_xs"),
    ("xs_sd", ["--fp8_base"], "--fp8_base with --control_method controlnet_xs"),
    ("xs_sd", ["--controlnet_xs_size_ratio", "0"], "above 0 and at most 1"),
    ("xs_sd", ["--controlnet_xs_size_ratio", "1.5"], "above 0 and at most 1"),
])
def test_xs_where_it_cannot_work_fails_before_any_weights_load(demo_manifest, stacked_manifest, xs_bases, tmp_path,
                                                               capsys, monkeypatch, request, fixture, extra, message):
    from train import models
    from train.train import parse_args

    base = xs_bases[fixture[3:]] if fixture.startswith("xs_") else request.getfixturevalue(fixture)
    manifest = stacked_manifest if "--union" in extra else demo_manifest
    condition = "canny,invert" if "--union" in extra else "canny"
    monkeypatch.setattr(models, "load_base", lambda *a: pytest.fail("weights loaded before the flags were checked"))
    with pytest.raises(SystemExit):
        parse_args(train_args(manifest, base, tmp_path, "", "--control_method", "controlnet_xs", *extra,
                              condition=condition))
    assert message in capsys.readouterr().err


def test_the_size_ratio_without_xs_and_an_unknown_method_are_refused(demo_manifest, tiny_sd, tmp_path, capsys):
    from train.train import parse_args

    for extra, message in [(["--controlnet_xs_size_ratio", "0.2"], "--controlnet_xs_size_ratio sizes a ControlNet-XS adapter: add --control_method controlnet_xs or drop"),
                           (["--control_method", "xs"], "choose one of controlnet, controlnet_xs, channel_concat")]:
        with pytest.raises(SystemExit):
            parse_args(train_args(demo_manifest, tiny_sd, tmp_path, "", *extra))
        assert message in capsys.readouterr().err


def test_continuing_xs_from_a_controlnet_folder_is_refused(demo_manifest, xs_bases, tmp_path, capsys):
    from train.train import parse_args

    folder = tmp_path / "cn"
    folder.mkdir()
    (folder / "config.json").write_text('{"_class_name": "ControlNetModel"}')
    with pytest.raises(SystemExit):
        parse_args(train_args(demo_manifest, xs_bases["sd"], tmp_path / "run", "", *XS[:2],
                              "--controlnet_model_name_or_path", str(folder)))
    assert "pass a ControlNetXSAdapter folder" in capsys.readouterr().err


# --- training runs: the base never changes, resume is exact, the export loads and generates -------------


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def xs_run(request, demo_manifest, xs_bases, tmp_path_factory):
    """3 XS steps (checkpoints at 2 and 3, validation samples at 3), keeping the base the loop trained beside."""
    family = request.param
    out = tmp_path_factory.mktemp(f"xs_{family}") / "run"
    args = train_args(demo_manifest, xs_bases[family], out, family, *XS, "--max_train_steps", "3",
                      "--checkpointing_steps", "2", "--validation_steps", "3", "--num_validation_rows", "2",
                      "--num_validation_images", "1")
    return train_keeping_base(family, xs_bases[family], out, args)


def load_adapter(folder):
    from diffusers import ControlNetXSAdapter

    return ControlNetXSAdapter.from_pretrained(folder)


@pytest.mark.slow
def test_training_changes_the_adapter_and_never_the_base(xs_run):
    from train.models import load_base

    trained, fresh = xs_run["base"], load_base(str(xs_run["base_dir"]), 64)
    for name, a, b in [("unet", trained.unet, fresh.unet), ("vae", trained.vae, fresh.vae)] + [
            (f"text_encoder{i}", a, b) for i, (a, b) in enumerate(zip(trained.text_encoders, fresh.text_encoders))]:
        fresh_state = b.state_dict()
        for k, v in a.state_dict().items():
            assert torch.equal(v, fresh_state[k]), f"{name}.{k} changed"
    adapter = load_adapter(xs_run["out"] / "controlnet").state_dict()
    to_base = [k for k in adapter if "to_base" in k and k.endswith("weight")]  # zero at the start
    assert to_base and all(adapter[k].abs().sum() > 0 for k in to_base)
    assert xs_run["result"]["figures"]["global_step"] == 3
    assert np.isfinite(xs_run["result"]["figures"]["final_loss"])


@pytest.mark.slow
def test_xs_resume_matches_an_uninterrupted_run(xs_run, tmp_path):
    straight, resumed = xs_run["out"], resumed_run(xs_run, "checkpoint-2", tmp_path)
    a, b = load_adapter(straight / "controlnet").state_dict(), load_adapter(resumed / "controlnet").state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_the_export_loads_in_the_xs_pipeline_and_the_condition_steers_it(xs_run):
    import diffusers
    from PIL import Image

    family, out = xs_run["family"], xs_run["out"]
    pipe = getattr(diffusers, PIPELINE[family]).from_pretrained(xs_run["base_dir"],
                                                                 controlnet=load_adapter(out / "controlnet"))
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    images = []
    for _ in range(2):
        condition = Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))
        images.append(pipe(prompt="a red circle", image=condition, height=64, width=64, num_inference_steps=2,
                           generator=torch.Generator().manual_seed(0), output_type="np").images)
    assert images[0].shape == (1, 64, 64, 3) and np.isfinite(images[0]).all()
    assert not np.array_equal(images[0], images[1])
    card = (out / "README.md").read_text()
    assert "ControlNetXSAdapter.from_pretrained" in card and f"{PIPELINE[family]}.from_pretrained" in card
    assert (out / "validation" / "step-000003.png").is_file() and (out / "validation" / "step-final.png").is_file()
    assert not list(out.glob("checkpoint-*/*unet*"))  # checkpoints hold the adapter, never a copy of the base


@pytest.mark.slow
def test_xs_continues_from_its_exported_adapter(xs_run, tmp_path):
    from train.train import main

    out = tmp_path / "continued"
    args = [a if a != str(xs_run["out"]) else str(out) for a in xs_run["args"]]
    ratio = args.index("--controlnet_xs_size_ratio")
    del args[ratio:ratio + 2]  # a loaded adapter has its own size (the flag is refused with it)
    args[args.index("--validation_steps") + 1] = "0"
    args[args.index("--max_train_steps") + 1] = "1"
    args[args.index("--learning_rate") + 1] = "0"  # a step that changes nothing: the export is the start
    assert main(args + ["--controlnet_model_name_or_path", str(xs_run["out"])]) == 0
    start, after = (load_adapter(xs_run["out"] / "controlnet").state_dict(),
                    load_adapter(out / "controlnet").state_dict())
    assert set(start) == set(after) and all(torch.equal(start[k], after[k]) for k in start)


@pytest.mark.slow
def test_evaluate_measures_an_xs_run_in_the_xs_pipeline(xs_run, demo_manifest, tmp_path):
    """train/evaluate.py takes the XS export: the adapter in its family's XS pipeline against the base alone."""
    from train.evaluate import main

    out = tmp_path / "eval"
    assert main(["--controlnet", str(xs_run["out"]), "--pretrained_model_name_or_path", str(xs_run["base_dir"]),
                 "--manifest", str(demo_manifest), "--condition", "canny", "--num_samples", "2", "--resolution", "64",
                 "--num_inference_steps", "2", "--output_dir", str(out), "--keep_duplicates"]) == 0
    figures = json.loads((out / "metrics.json").read_text())
    for model in ("controlnet", "base"):
        assert figures[model] and all(np.isfinite(v) for v in figures[model].values() if isinstance(v, float))
    assert (out / "grid.png").is_file()


def test_the_reward_gradient_reaches_the_xs_adapter_and_not_the_base(xs_bases):
    """``--reward_weight`` with XS: the reward reads the fused UNet's one-step prediction (SDAdapter.denoise through
    the XS ``steered``), and its gradient reaches the adapter only."""
    from tests.test_reward import assert_only_the_controlnet_has_gradients, reward_config, reward_gradients
    from train.models import make_controlnet
    from train.reward import RewardLoss

    base = xs_base(xs_bases["sd"])
    xs = make_controlnet(base, 3)
    nudge_outputs(xs.adapter)
    reward = RewardLoss(reward_config(xs_bases["sd"], reward_distance=("canny=soft_f1",), reward_max_timestep=999),
                        torch.device("cpu"), torch.float32)
    reward_gradients(base, xs, reward, 64)
    assert_only_the_controlnet_has_gradients(base, xs, reward)

"""Channel-concat control for Flux (``--control_method channel_concat``, train/channel_concat.py) on the tiny Flux:
a zero start, only the LoRA trains (optimiser, checkpoints), exact resume, an export that FluxControlPipeline +
load_lora_weights loads and that the condition steers, and flags refused before any weights load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_train_families import resumed_run, train_keeping_base


def concat_args(manifest, base, out, *extra) -> list[str]:
    # --keep_duplicates: the demo's edge cases are near copies by design (see tests/test_train.py)
    return ["--manifest", str(manifest), "--condition", "canny", "--pretrained_model_name_or_path", str(base),
            "--output_dir", str(out), "--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-2",
            "--seed", "7", "--report_to", "none", "--keep_duplicates", "--max_sequence_length", "16",
            "--control_method", "channel_concat", *extra]


def concat_base(path, rank: int | None = None):
    """The tiny Flux base with the channel-concat adapter, as the loop sets it up."""
    from train.adapter import FamilyOptions
    from train.models import load_base, with_control_method

    base = with_control_method(load_base(str(path), 64), "channel_concat")
    base.options = FamilyOptions(("canny",), max_sequence_length=16, control_lora_rank=rank)
    return base


def plain_prediction(transformer, noisy, sigmas, hidden, added) -> torch.Tensor:
    """The base Flux transformer's velocity, called as FluxPipeline calls it (no condition at all)."""
    from diffusers import FluxPipeline

    from train.families.flow import pack

    ids = FluxPipeline._prepare_latent_image_ids(noisy.shape[0], 4, 4, "cpu", torch.float32)
    return transformer(hidden_states=pack(noisy), timestep=sigmas, guidance=torch.full((noisy.shape[0],), 3.5),
                       pooled_projections=added["pooled_projections"], encoder_hidden_states=hidden,
                       txt_ids=torch.zeros(hidden.shape[1], 3), img_ids=ids, return_dict=False)[0]


# --- zero start ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [None, 0, 8])
def test_a_fresh_concat_control_predicts_exactly_what_the_base_does_for_any_condition(tiny_flux, rank):
    from train.models import load_base, make_controlnet

    plain = load_base(str(tiny_flux), 64).transformer
    base = concat_base(tiny_flux, rank)
    control = make_controlnet(base, 3).eval()
    assert base.transformer.x_embedder.in_features == 2 * plain.x_embedder.in_features
    assert base.transformer.config.in_channels == 2 * plain.config.in_channels
    torch.manual_seed(0)
    noisy, sigmas = torch.randn(2, 16, 8, 8), torch.tensor([0.3, 0.9])
    hidden, added = base.family.encode_prompts(base, ["a red circle", ""], torch.device("cpu"))
    with torch.no_grad():
        expected = plain_prediction(plain, noisy, sigmas, hidden, added)
        for seed in (0, 1):
            condition = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
            inputs = base.family.control_inputs(base, control, condition, torch.Generator().manual_seed(0))
            steered = base.family.predict(control, base, noisy, sigmas, hidden, added, inputs)
            assert torch.equal(steered, expected)
    assert expected.abs().sum() > 0


def test_the_trained_module_holds_only_the_lora_or_with_rank_0_the_whole_transformer(tiny_flux):
    from train.models import make_controlnet

    lora = make_controlnet(concat_base(tiny_flux), 3)
    trained = {id(p) for p in lora.parameters()}
    for name, p in lora.transformer.named_parameters():
        assert (id(p) in trained) == ("lora_" in name) == p.requires_grad, name
    assert all("lora_" in k for k in lora.state_dict())
    full = make_controlnet(concat_base(tiny_flux, 0), 3)
    assert {id(p) for p in full.parameters()} == {id(p) for p in full.transformer.parameters()}


# --- a run: only the LoRA changes, the optimiser and checkpoints hold only it, exact resume, export -----


@pytest.fixture(scope="module")
def concat_run(demo_manifest, tiny_flux, tmp_path_factory):
    """3 steps (checkpoints at 2 and 3, validation samples at 3), keeping the base the loop trained beside."""
    out = tmp_path_factory.mktemp("concat_run") / "run"
    args = concat_args(demo_manifest, tiny_flux, out, "--max_train_steps", "3", "--checkpointing_steps", "2",
                       "--validation_steps", "3", "--num_validation_rows", "2", "--num_validation_images", "1")
    return train_keeping_base("flux", tiny_flux, out, args)


@pytest.mark.slow
def test_training_changes_the_lora_only(concat_run):
    from train.models import make_controlnet

    trained = concat_run["base"]
    fresh = concat_base(concat_run["base_dir"])
    start = make_controlnet(fresh, 3).transformer.state_dict()  # the same seed's LoRA init is not needed here
    after = trained.transformer.state_dict()
    assert set(start) == set(after)
    changed = {k for k in after if not torch.equal(after[k], start[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("lora_B" in k for k in changed)  # the zero-initialised half left zero
    for a, b in [(trained.vae, fresh.vae), *zip(trained.text_encoders, fresh.text_encoders)]:
        fresh_state = b.state_dict()
        assert all(torch.equal(v, fresh_state[k]) for k, v in a.state_dict().items())
    assert concat_run["result"]["figures"]["global_step"] == 3
    assert np.isfinite(concat_run["result"]["figures"]["final_loss"])


@pytest.mark.slow
def test_checkpoints_hold_only_what_trains(concat_run):
    from safetensors.torch import load_file

    saved = load_file(concat_run["out"] / "checkpoint-2" / "model.safetensors")
    lora = {k for k in concat_run["base"].transformer.state_dict() if "lora_" in k}
    assert {k.removeprefix("trained.").replace("/", ".") for k in saved} == lora


def test_the_optimizer_holds_only_the_lora(demo_manifest, tiny_flux, tmp_path):
    from accelerate.state import AcceleratorState

    from train import loop
    from train.train import parse_args

    run = loop.set_up(parse_args(concat_args(demo_manifest, tiny_flux, tmp_path / "run", "--max_train_steps", "1",
                                             "--validation_steps", "0", "--use_ema")))
    try:
        held = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
        lora = {id(p) for n, p in run.base.transformer.named_parameters() if "lora_" in n}
        assert held == lora and lora
        assert sum(p.numel() for p in run.ema.shadow_params) == sum(
            p.numel() for n, p in run.base.transformer.named_parameters() if "lora_" in n)
        assert all(not p.requires_grad for n, p in run.base.transformer.named_parameters() if "lora_" not in n)
    finally:
        AcceleratorState._reset_state(True)


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(concat_run, tmp_path):
    from safetensors.torch import load_file

    from train.channel_concat import LORA_FILE

    straight, resumed = concat_run["out"], resumed_run(concat_run, "checkpoint-2", tmp_path)
    a, b = load_file(straight / LORA_FILE), load_file(resumed / LORA_FILE)
    assert set(a) == set(b) and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def generate(pipe, condition, seed: int = 0) -> np.ndarray:
    return pipe(prompt="a red circle", control_image=condition, height=64, width=64, num_inference_steps=2,
                max_sequence_length=16, generator=torch.Generator().manual_seed(seed), output_type="np").images


@pytest.mark.slow
def test_the_export_loads_with_flux_control_pipeline_and_the_condition_steers_it(concat_run):
    from diffusers import FluxControlPipeline
    from PIL import Image

    out = concat_run["out"]
    pipe = FluxControlPipeline.from_pretrained(concat_run["base_dir"])
    pipe.load_lora_weights(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.in_channels == 2 * 64  # the loader widened x_embedder to read the condition
    rng = np.random.default_rng(0)
    first, second = (Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)) for _ in range(2))
    a, b = generate(pipe, first), generate(pipe, second)
    assert a.shape == (1, 64, 64, 3) and np.isfinite(a).all()
    assert np.abs(a - b).max() > 1e-4  # the condition changes the output
    loaded = {k.replace(".default_0.", ".default."): v for k, v in pipe.transformer.state_dict().items()}
    for k, v in concat_run["base"].transformer.state_dict().items():  # exactly the weights trained
        assert torch.allclose(loaded[k], v, atol=1e-6), k
    card = (out / "README.md").read_text()
    assert "FluxControlPipeline.from_pretrained" in card and "load_lora_weights" in card
    assert (out / "validation" / "step-000003.png").is_file()


@pytest.mark.slow
def test_rank_0_fine_tunes_the_whole_transformer_and_exports_it(demo_manifest, tiny_flux, tmp_path):
    from diffusers import FluxControlPipeline, FluxTransformer2DModel
    from PIL import Image

    from train.train import main

    out = tmp_path / "full"
    assert main(concat_args(demo_manifest, tiny_flux, out, "--control_lora_rank", "0", "--max_train_steps", "1",
                            "--validation_steps", "0")) == 0
    transformer = FluxTransformer2DModel.from_pretrained(out, subfolder="transformer")
    assert transformer.config.in_channels == 128 and transformer.config.out_channels == 64
    pipe = FluxControlPipeline.from_pretrained(tiny_flux, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    condition = Image.fromarray(np.zeros((64, 64, 3), np.uint8))
    assert np.isfinite(generate(pipe, condition)).all()
    assert "FluxTransformer2DModel.from_pretrained" in (out / "README.md").read_text()


# --- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fixture", "extra", "message"), [
    ("tiny_sd3", [], "--control_method channel_concat: diffusers has no SD3/3.5 pipeline for it (only Flux.1)"),
    ("tiny_sd", [], "diffusers has no SD 1.x/2.x pipeline for it"),
    ("tiny_flux", ["--union", "--condition", "canny,depth"], "--union with --control_method channel_concat"),
    ("tiny_flux", ["--controlnet_num_layers", "2"], "--controlnet_num_layers with --control_method channel_concat"),
    ("tiny_flux", ["--controlnet_num_single_layers", "2"], "drop --controlnet_num_single_layers"),
    ("tiny_flux", ["--controlnet_model_name_or_path", "x"], "drop --controlnet_model_name_or_path"),
    ("tiny_flux", ["--fp8_base"], "drop --fp8_base"),
    ("tiny_flux", ["--control_lora_rank", "-1"], "--control_lora_rank -1: give a rank of 1 or more"),
    ("tiny_flux", ["--control_method", "concat"], "--control_method 'concat': choose one of controlnet, "
                                                  "controlnet_xs, channel_concat"),
])
def test_flags_that_make_no_sense_with_channel_concat_fail_before_any_weights_load(
        demo_manifest, tmp_path, capsys, monkeypatch, request, fixture, extra, message):
    from train import models
    from train.train import parse_args

    monkeypatch.setattr(models, "load_base", lambda *a: pytest.fail("weights loaded before the flags were checked"))
    with pytest.raises(SystemExit):
        parse_args(concat_args(demo_manifest, request.getfixturevalue(fixture), tmp_path, *extra))
    assert message in capsys.readouterr().err


def test_a_lora_rank_without_channel_concat_is_refused(demo_manifest, tiny_flux, tmp_path, capsys):
    from train.train import parse_args

    args = [a for a in concat_args(demo_manifest, tiny_flux, tmp_path, "--control_lora_rank", "8")
            if a not in ("--control_method", "channel_concat")]
    with pytest.raises(SystemExit):
        parse_args(args)
    assert "--control_lora_rank sets the LoRA of --control_method channel_concat" in capsys.readouterr().err


def test_controlnet_stays_the_default_method(demo_manifest, tiny_flux, tmp_path):
    from train.adapter import FamilyOptions
    from train.families.flow import FluxAdapter
    from train.models import load_base, with_control_method
    from train.train import parse_args

    args = [a for a in concat_args(demo_manifest, tiny_flux, tmp_path) if a not in ("--control_method",
                                                                                     "channel_concat")]
    assert parse_args(args).control_method == "controlnet"
    base = with_control_method(load_base(str(tiny_flux), 64), "controlnet")
    base.options = FamilyOptions(("canny",))
    assert type(base.family) is FluxAdapter


@pytest.mark.slow
def test_bf16_base_with_checkpointing_ema_and_cached_latents_trains_validates_and_exports(demo_manifest, tiny_flux,
                                                                                          tmp_path, monkeypatch):
    """The memory flags with a channel-concat run: the base in bf16, the LoRA in fp32 with gradient checkpointing
    and EMA, condition latents cached, validation sampling in place; the export still loads."""
    from diffusers import FluxControlPipeline

    from train import loop
    from train.train import main

    seen = {}
    real = loop.make_controlnet

    def keep(*args, **kwargs):
        seen["control"] = real(*args, **kwargs)
        return seen["control"]

    monkeypatch.setattr(loop, "make_controlnet", keep)
    out = tmp_path / "run"
    assert main(concat_args(demo_manifest, tiny_flux, out, "--max_train_steps", "2", "--mixed_precision", "bf16",
                            "--gradient_checkpointing", "--use_ema", "--cache_latents", "--center_crop",
                            "--validation_steps", "2", "--num_validation_rows", "1", "--num_validation_images", "1",
                            "--checkpointing_steps", "10")) == 0
    control = seen["control"]
    assert control.transformer.gradient_checkpointing
    assert {p.dtype for p in control.parameters()} == {torch.float32}
    assert control.transformer.x_embedder.base_layer.weight.dtype == torch.bfloat16  # the frozen base stays bf16
    assert (out / "validation" / "step-final.png").is_file()
    pipe = FluxControlPipeline.from_pretrained(tiny_flux)
    pipe.load_lora_weights(out)


def test_the_reward_gradient_reaches_the_concat_lora_and_not_the_frozen_weights(tiny_flux):
    """``--reward_weight`` with channel-concat: the reward reads the same forward's one-step prediction; its gradient
    reaches what trains (the LoRA) and never the transformer's own weights, the VAE, the text encoders or the reward
    model."""
    from tests.test_reward import reward_config, reward_gradients
    from train.models import make_controlnet
    from train.reward import RewardLoss

    base = concat_base(tiny_flux, 4)
    control = make_controlnet(base, 3)
    with torch.no_grad():  # a fresh LoRA's up matrices are zero, so only they would get a gradient
        for name, p in control.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 1e-2)
    reward = RewardLoss(reward_config(tiny_flux, reward_distance=("canny=soft_f1",), reward_max_timestep=999),
                        torch.device("cpu"), torch.float32)
    reward_gradients(base, control, reward, 64)
    trained = {n: p for n, p in control.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert sum(1 for p in trained.values() if p.grad is not None and p.grad.abs().sum() > 0) > len(trained) // 2
    frozen = [p for n, p in base.transformer.named_parameters() if "lora_" not in n]
    for p in [*frozen, *base.vae.parameters(), *(q for e in base.text_encoders for q in e.parameters()),
              *(q for _, model, _ in reward.terms for q in model.parameters())]:
        assert p.grad is None and not p.requires_grad

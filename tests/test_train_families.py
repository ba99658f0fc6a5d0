"""The same trainer on the flow-matching transformer families (SD3/3.5, Flux.1), tiny models from configs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

FAMILIES = ("sd3", "flux")
CONTROLNET = {"sd": "ControlNetModel", "sd3": "SD3ControlNetModel", "flux": "FluxControlNetModel"}
PIPELINE = {"sd3": "StableDiffusion3ControlNetPipeline", "flux": "FluxControlNetPipeline"}
SIZE = {"sd3": ["--controlnet_num_layers", "1"],
        "flux": ["--controlnet_num_layers", "1", "--controlnet_num_single_layers", "1"]}


def train_args(manifest, base, out, family, *extra, condition="canny") -> list[str]:
    # --keep_duplicates: the demo's edge cases are near copies by design (see tests/test_train.py)
    return ["--manifest", str(manifest), "--condition", condition, "--pretrained_model_name_or_path", str(base),
            "--output_dir", str(out), "--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-3",
            "--seed", "7", "--report_to", "none", "--keep_duplicates",
            *(["--max_sequence_length", "16"] if family in FAMILIES else []), *SIZE.get(family, []), *extra]


def load_family_base(path, family: str, conditions=("canny",), union=False):
    from train.adapter import FamilyOptions
    from train.models import load_base

    base = load_base(str(path), 64)
    assert base.family.name == family
    base.options = FamilyOptions(tuple(conditions), union, max_sequence_length=16)
    return base


def load_exported(family: str, folder):
    import diffusers

    return getattr(diffusers, CONTROLNET[family]).from_pretrained(folder)


def perturb(module: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere, so zero-initialised outputs pass signals (for routing checks)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


# --- flags ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fixture", "extra", "message"), [
    ("tiny_sd3", ["--controlnet_num_single_layers", "2"], "Flux's single-stream blocks"),
    ("tiny_sd", ["--controlnet_num_layers", "2"], "copies the UNet's whole encoder"),
    ("tiny_sd", ["--union"], "name two or more"),
    ("tiny_sdxl", ["--max_sequence_length", "16"], "has no T5"),
])
def test_family_flag_combinations_fail_before_any_model_loads(demo_manifest, tmp_path, capsys, request, fixture,
                                                              extra, message):
    from train.train import parse_args

    base = request.getfixturevalue(fixture)
    with pytest.raises(SystemExit):
        parse_args(train_args(demo_manifest, base, tmp_path, "", *extra))
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("fixture", "message"), [
    ("tiny_sd", "no union ControlNet for SD 1.x/2.x"), ("tiny_sd3", "no union ControlNet for SD3/3.5")])
def test_union_on_a_family_without_one_says_what_to_do(stacked_manifest, tmp_path, capsys, request, fixture, message):
    from train.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(train_args(stacked_manifest, request.getfixturevalue(fixture), tmp_path, "", "--union",
                              condition="canny,invert"))
    assert message in capsys.readouterr().err


def test_stacked_conditions_on_a_transformer_family_point_to_union(stacked_manifest, tiny_flux, tmp_path, capsys):
    from train.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(train_args(stacked_manifest, tiny_flux, tmp_path, "flux", condition="canny,invert"))
    err = capsys.readouterr().err
    assert "cannot be stacked" in err and "add --union" in err


def test_the_family_is_read_from_the_base_folder(tiny_sd, tiny_sd3, tiny_flux, tiny_sdxl):
    from train.family_checks import detect_family

    assert [detect_family(str(p)) for p in (tiny_sd, tiny_sdxl, tiny_sd3, tiny_flux)] == ["sd", "sdxl", "sd3", "flux"]


def test_flow_matching_loss_pieces():
    from train.flow import flow_loss, flux_shift, noisy_latents, shifted_sigmas

    g = torch.Generator().manual_seed(0)
    plain, shifted = shifted_sigmas(4000, g, 1.0), shifted_sigmas(4000, torch.Generator().manual_seed(0), 3.0)
    assert 0 < float(plain.min()) and float(plain.max()) < 1 and abs(float(plain.mean()) - 0.5) < 0.02
    assert bool((shifted >= plain).all())  # the shift moves every step towards noise
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.equal(noisy_latents(x0, noise, torch.zeros(2)), x0)
    assert torch.allclose(noisy_latents(x0, noise, torch.ones(2)), noise)
    assert float(flow_loss(noise - x0, x0, noise)) == 0.0
    config = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
    assert flux_shift(256, config) == pytest.approx(np.exp(0.5))
    assert flux_shift(4096, config) == pytest.approx(np.exp(1.15))


# --- (a) zero start ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_a_fresh_controlnet_leaves_the_base_prediction_exactly_unchanged(family, request):
    from diffusers import FluxPipeline

    from train.models import make_controlnet
    from train.families.flow import pack

    base = load_family_base(request.getfixturevalue(f"tiny_{family}"), family)
    controlnet = make_controlnet(base, 3, None, 1, 1 if family == "flux" else None).eval()
    torch.manual_seed(0)
    noisy, sigmas = torch.randn(2, 16, 8, 8), torch.tensor([0.3, 0.9])
    hidden, added = base.family.encode_prompts(base, ["a red circle", ""], torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        control = base.family.control_inputs(base, controlnet, torch.rand(2, 3, 64, 64), g)
        steered = base.family.predict(controlnet, base, noisy, sigmas, hidden, added, control)
        if family == "sd3":
            plain = base.transformer(hidden_states=noisy, timestep=sigmas * 1000, encoder_hidden_states=hidden,
                                     pooled_projections=added["pooled_projections"], return_dict=False)[0]
        else:
            ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)
            plain = base.transformer(hidden_states=pack(noisy), timestep=sigmas, guidance=torch.full((2,), 3.5),
                                     pooled_projections=added["pooled_projections"], encoder_hidden_states=hidden,
                                     txt_ids=torch.zeros(hidden.shape[1], 3), img_ids=ids, return_dict=False)[0]
    assert torch.equal(plain, steered)
    assert plain.abs().sum() > 0


# --- (b) training changes only the ControlNet, (c) resume is exact, (d) export loads -------------


def train_keeping_base(family: str, base_dir, out, args: list[str]) -> dict:
    """Train in process with ``args``, keeping the base the loop trained beside (for checks after the run)."""
    from accelerate.state import AcceleratorState

    from train import loop
    from train.data import check_conditions
    from train.models import load_base
    from train.train import parse_args

    captured = {}

    def keep(path, resolution):
        captured["base"] = load_base(path, resolution)
        return captured["base"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "load_base", keep)
        config = parse_args(args)
        result = loop.train(config, check_conditions(config.manifest, config.condition))
    AcceleratorState._reset_state(True)
    return {"family": family, "base_dir": base_dir, "out": out, "args": args, "base": captured["base"],
            "result": result}


@pytest.fixture(scope="module", params=FAMILIES)
def straight_run(request, demo_manifest, tmp_path_factory):
    """3 steps (checkpoints at 2 and 3, validation samples at 3), keeping the base the loop trained beside."""
    family = request.param
    base_dir = request.getfixturevalue(f"tiny_{family}")
    out = tmp_path_factory.mktemp(f"{family}_run") / "run"
    args = train_args(demo_manifest, base_dir, out, family, "--max_train_steps", "3", "--checkpointing_steps", "2",
                      "--validation_steps", "3", "--num_validation_rows", "2", "--num_validation_images", "1")
    return train_keeping_base(family, base_dir, out, args)


@pytest.mark.slow
def test_training_changes_the_controlnet_and_never_the_base(straight_run):
    from train.models import make_controlnet

    family, trained = straight_run["family"], straight_run["base"]
    fresh = load_family_base(straight_run["base_dir"], family)
    for name, a, b in [("transformer", trained.transformer, fresh.transformer), ("vae", trained.vae, fresh.vae)] + [
            (f"text_encoder{i}", a, b) for i, (a, b) in enumerate(zip(trained.text_encoders, fresh.text_encoders))]:
        fresh_state = b.state_dict()
        for k, v in a.state_dict().items():
            assert torch.equal(v, fresh_state[k]), f"{name}.{k} changed"
    start = make_controlnet(fresh, 3, None, 1, 1 if family == "flux" else None).state_dict()
    after = load_exported(family, straight_run["out"] / "controlnet").state_dict()
    changed = [k for k, v in after.items() if not torch.equal(v, start[k])]
    assert any(k.startswith("controlnet_blocks") for k in changed)  # the zero-initialised outputs left zero
    assert straight_run["result"]["figures"]["global_step"] == 3
    assert np.isfinite(straight_run["result"]["figures"]["final_loss"])


def resumed_run(run: dict, checkpoint: str, tmp_path) -> Path:
    """The output dir of ``run`` (a ``train_keeping_base`` result) resumed from its ``checkpoint`` folder in a new
    output dir with the same flags, trained to the end."""
    from train.train import main

    straight, resumed = run["out"], tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / checkpoint, resumed / checkpoint)
    args = [a if a != str(straight) else str(resumed) for a in run["args"]]
    assert main(args + ["--resume_from_checkpoint", "latest"]) == 0
    return resumed


def assert_resume_from_checkpoint_is_exact(run: dict, checkpoint: str, tmp_path) -> None:
    """Resumed from its ``checkpoint``, ``run``'s exported ControlNet equals the uninterrupted run's exactly."""
    straight, resumed = run["out"], resumed_run(run, checkpoint, tmp_path)
    a = load_exported(run["family"], straight / "controlnet").state_dict()
    b = load_exported(run["family"], resumed / "controlnet").state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(straight_run, tmp_path):
    assert_resume_from_checkpoint_is_exact(straight_run, "checkpoint-2", tmp_path)


@pytest.mark.slow
def test_export_loads_in_the_family_pipeline_and_generates(straight_run):
    import diffusers
    from PIL import Image

    family, out = straight_run["family"], straight_run["out"]
    controlnet = load_exported(family, out / "controlnet")
    pipe = getattr(diffusers, PIPELINE[family]).from_pretrained(straight_run["base_dir"], controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    condition = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    image = pipe(prompt="a red circle", control_image=condition, height=64, width=64, num_inference_steps=2,
                 max_sequence_length=16, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    card = (out / "README.md").read_text()
    assert f"{CONTROLNET[family]}.from_pretrained" in card and PIPELINE[family] in card
    assert (out / "validation" / "step-000003.png").is_file() and (out / "validation" / "step-final.png").is_file()


@pytest.mark.slow
def test_controlnet_model_name_or_path_continues_the_exported_controlnet(straight_run, tmp_path):
    from train.train import main

    out = tmp_path / "continued"
    args = [a if a != str(straight_run["out"]) else str(out) for a in straight_run["args"]]
    sizes = SIZE[straight_run["family"]]
    start = args.index(sizes[0])
    assert args[start:start + len(sizes)] == sizes
    del args[start:start + len(sizes)]  # a loaded ControlNet has its own size (the flags are refused with it)
    args[args.index("--validation_steps") + 1] = "0"
    args[args.index("--max_train_steps") + 1] = "1"
    args[args.index("--learning_rate") + 1] = "0"  # a step that changes nothing: the export is the start
    assert main(args + ["--controlnet_model_name_or_path", str(straight_run["out"])]) == 0
    start = load_exported(straight_run["family"], straight_run["out"] / "controlnet").state_dict()
    after = load_exported(straight_run["family"], out / "controlnet").state_dict()
    assert set(start) == set(after) and all(torch.equal(start[k], after[k]) for k in start)
    blocks = [k for k in start if k.startswith("controlnet_blocks") and k.endswith("weight")]
    assert all(start[k].abs().sum() > 0 for k in blocks)  # the trained outputs, not a fresh zero start


@pytest.mark.slow
def test_cached_latents_and_prompts_train_the_same_model_as_encoding_every_step(demo_manifest, tiny_sd3, tmp_path):
    """--cache_latents on a transformer family: VAE moments and T5/CLIP embeddings cached (shared code)."""
    from train.train import main

    uncached, cached = tmp_path / "uncached", tmp_path / "cached"
    common = ["--max_train_steps", "2", "--checkpointing_steps", "10", "--validation_steps", "0", "--center_crop",
              "--proportion_empty_prompts", "0"]
    assert main(train_args(demo_manifest, tiny_sd3, uncached, "sd3", *common)) == 0
    assert main(train_args(demo_manifest, tiny_sd3, cached, "sd3", *common, "--cache_latents")) == 0
    a = load_exported("sd3", uncached / "controlnet").state_dict()
    b = load_exported("sd3", cached / "controlnet").state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


@pytest.mark.slow
def test_cached_condition_latents_train_the_same_flux_union_without_encoding_during_steps(stacked_manifest,
                                                                                            tiny_flux, tmp_path,
                                                                                            monkeypatch):
    """--cache_latents caches each condition's VAE distribution too (one per condition of a union run):
    the same model as encoding every step, and once the cache is built no step runs the VAE encoder or
    decodes a condition map."""
    import diffusers

    from train import cache as cache_module, data, loop
    from train.train import main

    cache_built, late, finished = [False], [], []
    encode, decode, init = diffusers.AutoencoderKL.encode, data.decode_rgb, cache_module.EncodedCache.__init__
    finish = loop.finish

    def counting_encode(self, *args, **kwargs):
        if cache_built[0]:
            late.append("vae.encode")
        return encode(self, *args, **kwargs)

    def counting_decode(cell):
        if cache_built[0]:
            late.append("decode_rgb")
        return decode(cell)

    def building(self, *args, **kwargs):
        init(self, *args, **kwargs)
        cache_built[0] = True

    def finishing(*args, **kwargs):  # the steps are over: the model card's example map may be decoded
        finished.append(cache_built[0])  # the cache was built before the steps
        cache_built[0] = False
        return finish(*args, **kwargs)

    uncached, cached = tmp_path / "uncached", tmp_path / "cached"
    common = ["--union", "--max_train_steps", "2", "--checkpointing_steps", "10", "--validation_steps", "0",
              "--center_crop", "--proportion_empty_prompts", "0"]
    assert main(train_args(stacked_manifest, tiny_flux, uncached, "flux", *common, condition="canny,invert")) == 0
    monkeypatch.setattr(diffusers.AutoencoderKL, "encode", counting_encode)
    monkeypatch.setattr(data, "decode_rgb", counting_decode)
    monkeypatch.setattr(cache_module.EncodedCache, "__init__", building)
    monkeypatch.setattr(loop, "finish", finishing)
    assert main(train_args(stacked_manifest, tiny_flux, cached, "flux", *common, "--cache_latents",
                           condition="canny,invert")) == 0
    assert finished == [True] and late == []
    a = load_exported("flux", uncached / "controlnet").state_dict()
    b = load_exported("flux", cached / "controlnet").state_dict()
    # the zero-initialised outputs moved: the equality below compares trained models, not two zero starts
    assert any(a[k].abs().sum() > 0 for k in a if k.startswith("controlnet_blocks") and k.endswith("weight"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_cached_conditions_pick_each_examples_mode_and_sample_like_the_vae(tiny_flux):
    """A cached condition distribution stands in for the VAE: same draw from the same generator, and a
    union batch picks each example's condition by its mode."""
    from train.latents import CachedConditions

    base = load_family_base(tiny_flux, "flux", ("canny", "invert"), union=True)
    pixels = torch.rand(3, 6, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        moments = base.vae.encode(pixels.view(-1, 3, 64, 64) * 2 - 1).latent_dist.parameters
    cached = CachedConditions(moments.view(3, 2, *moments.shape[1:]))
    modes = torch.tensor([1, 0, 1])
    picked = cached.pick(modes)
    assert picked.shape[:2] == (3, 1)
    for i, m in enumerate(modes.tolist()):
        assert torch.equal(picked.moments[i, 0], moments.view(3, 2, *moments.shape[1:])[i, m])
    with torch.no_grad():
        direct = base.vae.encode(pixels.view(3, 2, 3, 64, 64)[torch.arange(3), modes] * 2 - 1).latent_dist
        expected = direct.sample(generator=torch.Generator().manual_seed(5))
    assert torch.allclose(picked.sample(torch.Generator().manual_seed(5)), expected, atol=1e-5)
    with pytest.raises(ValueError, match="pick one per example"):
        cached.sample(torch.Generator())


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_base_with_gradient_checkpointing_trains_and_validates(demo_manifest, family, request, tmp_path,
                                                                     monkeypatch):
    """The memory flags on a transformer family: locked base in bf16, ControlNet in fp32 with
    gradient checkpointing, and validation sampling with the trained module (no copy)."""
    from train import loop, validation
    from train.train import main

    seen = {}
    real = loop.make_controlnet

    def keep(*args, **kwargs):
        seen["controlnet"] = real(*args, **kwargs)
        return seen["controlnet"]

    monkeypatch.setattr(loop, "make_controlnet", keep)
    monkeypatch.setattr(validation, "validation_model", lambda *a: pytest.fail("a copy was made for validation"))
    out = tmp_path / "run"
    assert main(train_args(demo_manifest, request.getfixturevalue(f"tiny_{family}"), out, family, "--max_train_steps",
                           "1", "--mixed_precision",
                           "bf16", "--gradient_checkpointing", "--validation_steps", "1", "--num_validation_rows", "1",
                           "--num_validation_images", "1", "--checkpointing_steps", "10", "--use_ema")) == 0
    controlnet = seen["controlnet"]
    assert controlnet.gradient_checkpointing and next(controlnet.parameters()).dtype == torch.float32
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["figures"]["mixed_precision"] == "bf16" and np.isfinite(summary["figures"]["final_loss"])
    assert (out / "validation" / "step-final.png").is_file()
    load_exported(family, out / "controlnet")  # the EMA weights, swapped in for validation and back


# --- (e) union ControlNets --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ("sdxl", "flux"))
def test_union_trains_on_two_conditions_and_exports_the_mapping(stacked_manifest, family, request, tmp_path):
    import diffusers

    from train.train import main

    out = tmp_path / "union"
    assert main(train_args(stacked_manifest, request.getfixturevalue(f"tiny_{family}"), out, family, "--union",
                           "--max_train_steps", "2", "--checkpointing_steps", "10", "--validation_steps", "0",
                           condition="canny,invert")) == 0
    if family == "sdxl":
        controlnet = diffusers.ControlNetUnionModel.from_pretrained(out / "controlnet")
        assert controlnet.config.num_control_type == 6
        card = (out / "README.md").read_text()
        assert '"canny": 0, "invert": 1' in card
        assert "ControlNetUnionModel.from_pretrained" in card
        assert "StableDiffusionXLControlNetUnionPipeline.from_pretrained" in card
    else:
        controlnet = diffusers.FluxControlNetModel.from_pretrained(out / "controlnet")
        assert controlnet.config.num_mode == 2
        assert '"canny": 0, "invert": 1' in (out / "README.md").read_text()
    summary = json.loads((out / "train_summary.json").read_text())
    assert np.isfinite(summary["figures"]["final_loss"])
    key = "control_type_index" if family == "sdxl" else "controlnet_mode"
    assert summary[key] == {"canny": 0, "invert": 1}


def test_flux_union_routes_each_example_to_one_condition_and_its_mode(tiny_flux):
    """A condition changes an example's residuals only when its mode was drawn for that example, and a
    mode's embedding changes only the examples given that mode."""
    from train.models import make_controlnet

    base = load_family_base(tiny_flux, "flux", ("canny", "invert"), union=True)
    controlnet = make_controlnet(base, 6, None, 1, 1).eval()
    perturb(controlnet)
    torch.manual_seed(0)
    cond = torch.rand(4, 6, 64, 64)
    noisy, sigmas = torch.randn(4, 16, 8, 8), torch.full((4,), 0.5)
    hidden, added = base.family.encode_prompts(base, ["a"] * 4, torch.device("cpu"))

    def residuals(condition, seed=3):
        with torch.no_grad():
            control = base.family.control_inputs(base, controlnet, condition, torch.Generator().manual_seed(seed))
            blocks, _ = controlnet(hidden_states=base.family.layout(noisy), timestep=sigmas,
                                   guidance=torch.full((4,), 3.5), pooled_projections=added["pooled_projections"],
                                   encoder_hidden_states=hidden, txt_ids=torch.zeros(hidden.shape[1], 3),
                                   img_ids=torch.zeros(16, 3), return_dict=False, **control)
        return control["controlnet_mode"][:, 0], blocks[0]

    modes, first = residuals(cond)
    assert set(modes.tolist()) == {0, 1}, "pick a seed that draws both modes"
    for slot in (0, 1):
        changed = cond.clone()
        changed[:, 3 * slot:3 * slot + 3] = torch.rand(4, 3, 64, 64)
        _, after = residuals(changed)
        moved = (after - first).flatten(1).abs().amax(1) > 0
        assert moved.tolist() == (modes == slot).tolist(), f"slot {slot}"
    with torch.no_grad():  # a non-constant bump (a constant one is what LayerNorm removes)
        embedding = controlnet.controlnet_mode_embedder.weight
        embedding[1] += torch.randn(embedding.shape[1], generator=torch.Generator().manual_seed(11))
    _, after = residuals(cond)
    change = (after - first).flatten(1).abs().amax(1)
    # a random bump moves mode-1 residuals by ~1e-4 of their size; a constant one only by rounding (~1e-7)
    assert bool((change[modes == 1] > 1e-5 * first.abs().amax()).all()), change
    assert bool((change[modes == 0] == 0).all()), change


def test_sdxl_union_routes_the_drawn_condition_slots(tiny_sdxl):
    """The drawn slots are exactly those marked in the control-type mask; a condition's image changes
    the residuals only when its slot was drawn."""
    from train.adapter import FamilyOptions
    from train.families.unet import union_slots
    from train.models import load_base, make_controlnet

    base = load_base(str(tiny_sdxl), 64)
    base.options = FamilyOptions(("canny", "invert"), True)
    controlnet = make_controlnet(base, 6).eval()
    perturb(controlnet)
    torch.manual_seed(0)
    cond, latents = torch.rand(2, 6, 64, 64), torch.randn(2, 4, 8, 8)
    hidden, added = base.family.encode_prompts(base, ["a", "b"], torch.device("cpu"))
    drawn = {}
    for seed in range(40):  # seeds that draw {canny}, {invert} and both
        slots, extra = union_slots(cond, 2, torch.Generator().manual_seed(seed), 6)
        drawn.setdefault(tuple(extra["control_type_idx"]), seed)
        assert extra["control_type"][:, :2].tolist() == [[float(i in extra["control_type_idx"]) for i in (0, 1)]] * 2
    assert set(drawn) == {(0,), (1,), (0, 1)}

    def residual(condition, seed):
        slots, extra = union_slots(condition, 2, torch.Generator().manual_seed(seed), 6)
        with torch.no_grad():
            down, _ = controlnet(latents, torch.tensor([10, 500]), encoder_hidden_states=hidden, controlnet_cond=slots,
                                 added_cond_kwargs=added, return_dict=False, **extra)
        return down[0]

    for chosen, seed in drawn.items():
        for slot in (0, 1):
            changed = cond.clone()
            changed[:, 3 * slot:3 * slot + 3] = torch.rand(2, 3, 64, 64)
            moved = not torch.equal(residual(cond, seed), residual(changed, seed))
            assert moved == (slot in chosen), (chosen, slot)


# --- set-up checks: sizes, resolutions, guidance, other families' ControlNets, set-up errors ------


@pytest.mark.parametrize("family", FAMILIES)
def test_controlnet_num_layers_beyond_the_base_is_capped_with_a_log_line(family, request, caplog):
    """SD3's last block is context_pre_only (it cannot be copied): the cap is depth - 1; Flux's is its depth."""
    from train.models import make_controlnet

    base = load_family_base(request.getfixturevalue(f"tiny_{family}"), family)
    with caplog.at_level("INFO", logger="train"):
        controlnet = make_controlnet(base, 3, None, 9, 9 if family == "flux" else None)
    depth = base.transformer.config.num_layers - (1 if family == "sd3" else 0)
    assert controlnet.config.num_layers == depth
    assert f"--controlnet_num_layers 9 capped at {depth}" in caplog.text
    if family == "flux":
        assert controlnet.config.num_single_layers == base.transformer.config.num_single_layers
        assert "--controlnet_num_single_layers 9 capped at 1" in caplog.text


def write_config(folder, config: dict):
    """A folder holding only a config.json (the checks read it before any weights load)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(("fixture", "extra", "message"), [
    ("tiny_sd3", ["--resolution", "72"], "SD3/3.5 needs a multiple of 16"),
    ("tiny_flux", ["--resolution", "72"], "Flux.1 needs a multiple of 16"),
    ("tiny_sd3", ["--resolution", "528"], "position embedding reaches 32 patches (512 px)"),
    ("tiny_sd3", ["--guidance_scale", "2"], "SD3/3.5 has none"),
    ("tiny_sd", ["--guidance_scale", "2"], "SD 1.x/2.x has none"),
    ("tiny_flux", ["--guidance_scale", "nan"], "give a finite value"),
    ("tiny_flux", ["--guidance_scale", "-1"], "give a finite value"),
    ("tiny_sd", ["--condition", "canny,canny"], "names canny more than once"),
    ("tiny_sdxl", ["--union", "--condition", "canny,canny"], "names canny more than once"),
    ("tiny_flux", ["--controlnet_model_name_or_path", "x", "--controlnet_num_layers", "2"],
     "--controlnet_model_name_or_path loads one with its own size: drop --controlnet_num_layers"),
])
def test_flags_a_family_cannot_take_fail_before_any_model_loads(demo_manifest, tmp_path, capsys, request, fixture,
                                                                 extra, message):
    from train.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(train_args(demo_manifest, request.getfixturevalue(fixture), tmp_path, "", *extra))
    assert message in capsys.readouterr().err


def test_guidance_scale_is_refused_on_a_flux_base_without_guidance_embeds(demo_manifest, tmp_path, capsys):
    from train.train import parse_args

    schnell = tmp_path / "schnell"
    write_config(schnell / "transformer", {"_class_name": "FluxTransformer2DModel", "guidance_embeds": False})
    assert parse_args(train_args(demo_manifest, schnell, tmp_path, "")).guidance_scale is None
    with pytest.raises(SystemExit):
        parse_args(train_args(demo_manifest, schnell, tmp_path, "", "--guidance_scale", "3.5"))
    assert "no guidance_embeds" in capsys.readouterr().err


def test_resolution_and_guidance_are_checked_again_once_a_hub_base_loads(tiny_sd3):
    """A hub id's family is known only once it loads: set_up checks the loaded transformer's config."""
    from train.config import TrainConfig
    from train.errors import SetupError
    from train.loop import check_family_flags

    base = load_family_base(tiny_sd3, "sd3")
    for extra, message in (({"resolution": 528}, "position embedding"), ({"guidance_scale": 2.0}, "has none")):
        config = TrainConfig(manifest="m", condition=("canny",), pretrained_model_name_or_path="org/sd3", **extra)
        with pytest.raises(SetupError, match=message):
            check_family_flags(config, base)
    check_family_flags(TrainConfig(manifest="m", condition=("canny",), pretrained_model_name_or_path="org/sd3",
                                   resolution=512), base)


@pytest.mark.parametrize(("fixture", "config", "union", "message"), [
    ("tiny_flux", {"_class_name": "ControlNetModel"}, False,
     "is a ControlNetModel (SD 1.x/2.x ControlNet); this run's base is Flux.1: pass a FluxControlNetModel folder"),
    ("tiny_flux", {"_class_name": "SD3ControlNetModel"}, False, "(SD3/3.5 ControlNet); this run's base is Flux.1"),
    ("tiny_sd", {"_class_name": "FluxControlNetModel"}, False, "this run's base is SD 1.x/2.x: pass a ControlNetModel"),
    ("tiny_sd", {"_class_name": "ControlNetModel", "addition_embed_type": "text_time"}, False, "(SDXL ControlNet)"),
    ("tiny_sdxl", {"_class_name": "ControlNetModel", "addition_embed_type": "text_time"}, True,
     "this --union run's base is SDXL: pass a ControlNetUnionModel folder"),
    ("tiny_sd3", {"_class_name": "FluxControlNetModel"}, False, "pass a SD3ControlNetModel folder"),
])
def test_a_controlnet_of_another_family_is_refused_before_it_loads(stacked_manifest, tmp_path, capsys, request,
                                                                   fixture, config, union, message):
    from train.train import parse_args

    folder = write_config(tmp_path / "other" / "controlnet", config).parent  # a run's output folder layout
    extra = ["--union"] if union else []
    with pytest.raises(SystemExit):
        parse_args(train_args(stacked_manifest, request.getfixturevalue(fixture), tmp_path, "", *extra,
                              "--controlnet_model_name_or_path", str(folder),
                              condition="canny,invert" if union else "canny"))
    err = capsys.readouterr().err
    assert message in err and "or leave --controlnet_model_name_or_path out" in err


def test_a_controlnet_of_another_family_is_refused_after_a_hub_base_loads(tiny_flux, tmp_path):
    from train.errors import SetupError
    from train.models import make_controlnet

    base = load_family_base(tiny_flux, "flux")
    folder = write_config(tmp_path / "sd", {"_class_name": "ControlNetModel"})
    with pytest.raises(SetupError, match="is a ControlNetModel"):
        make_controlnet(base, 3, str(folder))


def run_main(args, capsys) -> tuple[int, list[str]]:
    """main's exit code and its ``error:`` lines on stderr (returning, not raising, means no traceback)."""
    from train.train import main

    code = main(args)
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_a_base_folder_without_its_transformer_is_one_line_and_exit_2(demo_manifest, tiny_flux, tmp_path, capsys):
    broken = tmp_path / "flux"
    shutil.copytree(tiny_flux, broken, ignore=shutil.ignore_patterns("transformer"))
    code, errors = run_main(train_args(demo_manifest, broken, tmp_path / "out", "flux"), capsys)
    assert code == 2
    assert errors == [f"error: {broken}: no transformer/ folder (a Flux.1 base needs transformer/, vae/, "
                      "text_encoder*/, tokenizer*/, scheduler/)"]


def test_a_missing_local_base_is_one_line_and_exit_2(demo_manifest, tmp_path, capsys):
    code, errors = run_main(train_args(demo_manifest, tmp_path / "no" / "base", tmp_path / "out", ""), capsys)
    assert code == 2 and len(errors) == 1 and "no such folder" in errors[0]


def test_a_num_mode_mismatch_is_one_line_and_exit_2(stacked_manifest, tiny_flux, tmp_path, capsys):
    from train.models import make_controlnet

    plain = make_controlnet(load_family_base(tiny_flux, "flux"), 3, None, 1, 1)  # no num_mode
    plain.save_pretrained(tmp_path / "plain")
    code, errors = run_main(train_args(stacked_manifest, tiny_flux, tmp_path / "out", "", "--union",
                                       "--controlnet_model_name_or_path", str(tmp_path / "plain"),
                                       condition="canny,invert"), capsys)
    assert code == 2 and len(errors) == 1 and "has num_mode None; this run needs 2" in errors[0]


def test_an_error_inside_a_training_step_is_not_taken_for_a_set_up_problem(demo_manifest, tiny_sd3, tmp_path,
                                                                            monkeypatch):
    from train.train import main
    from train.families.flow import SD3Adapter

    def broken(*args, **kwargs):
        raise ValueError("a bug in the loss")

    monkeypatch.setattr(SD3Adapter, "loss", broken)
    with pytest.raises(ValueError, match="a bug in the loss"):
        main(train_args(demo_manifest, tiny_sd3, tmp_path / "out", "sd3", "--max_train_steps", "1",
                        "--validation_steps", "0"))


def test_the_sdxl_union_card_names_the_union_pipeline():
    from train.export import model_card
    from train.adapter import FamilyOptions
    from train.families.unet import SDXLAdapter

    adapter = SDXLAdapter()
    union = type("Base", (), {"options": FamilyOptions(("canny", "invert"), True)})()
    plain = type("Base", (), {"options": FamilyOptions(("canny",), False)})()
    assert adapter.card_pipeline_class(union) == "StableDiffusionXLControlNetUnionPipeline"
    assert adapter.card_pipeline_class(plain) == "StableDiffusionXLControlNetPipeline"
    card = model_card({"base_model": "b", "manifest": "m", "manifest_fingerprint": "f", "conditions": ["canny"],
                       "provenance": [], "args": {}, "figures": {}, "controlnet_class": "ControlNetUnionModel",
                       "pipeline_class": adapter.card_pipeline_class(union), "output_dir": "/runs/union"})
    assert "ControlNetUnionModel.from_pretrained" in card
    assert "StableDiffusionXLControlNetUnionPipeline.from_pretrained" in card


# --- the ControlNet's inputs and outputs reach where they should -----------------------------------


def steered_prediction(family: str, base, controlnet, condition: torch.Tensor, seed: int = 3) -> torch.Tensor:
    """The base's prediction with ``controlnet``'s residuals for ``condition`` (fixed latents and prompts)."""
    torch.manual_seed(0)
    noisy, sigmas = torch.randn(2, 16, 8, 8), torch.tensor([0.3, 0.7])
    hidden, added = base.family.encode_prompts(base, ["a red circle", "a"], torch.device("cpu"))
    with torch.no_grad():
        control = base.family.control_inputs(base, controlnet, condition, torch.Generator().manual_seed(seed))
        return base.family.predict(controlnet, base, noisy, sigmas, hidden, added, control)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_controlnet_reads_the_condition(family, request):
    """With non-zero weights, another condition image gives another prediction (SD3, non-union Flux)."""
    from train.models import make_controlnet

    base = load_family_base(request.getfixturevalue(f"tiny_{family}"), family)
    controlnet = make_controlnet(base, 3, None, 1, 1 if family == "flux" else None).eval()
    perturb(controlnet)
    g = torch.Generator().manual_seed(1)
    first, second = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    a, b = steered_prediction(family, base, controlnet, first), steered_prediction(family, base, controlnet, second)
    assert torch.equal(a, steered_prediction(family, base, controlnet, first))
    assert (a - b).abs().amax() > 1e-3 * a.abs().amax()


def test_flux_single_block_residuals_reach_the_base(tiny_flux):
    from train.models import make_controlnet

    base = load_family_base(tiny_flux, "flux")
    controlnet = make_controlnet(base, 3, None, 1, 1).eval()
    perturb(controlnet)
    condition = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    before = steered_prediction("flux", base, controlnet, condition)
    perturb(controlnet.controlnet_single_blocks, seed=5)
    after = steered_prediction("flux", base, controlnet, condition)
    assert (after - before).abs().amax() > 1e-3 * before.abs().amax()


@pytest.mark.parametrize("force_zeros", (True, False))
def test_sd3_pooled_projections_are_zeros_for_controlnets_that_force_them(tiny_sd3, force_zeros):
    """As StableDiffusion3ControlNetPipeline: a ControlNet with force_zeros_for_pooled_projection gets zero
    pooled projections; the base always gets the real ones."""
    from train.models import make_controlnet

    base = load_family_base(tiny_sd3, "sd3")
    controlnet = make_controlnet(base, 3, None, 1).eval()
    controlnet.register_to_config(force_zeros_for_pooled_projection=force_zeros)
    seen = {}
    real_forward = controlnet.forward

    def spy(*args, **kwargs):
        seen["controlnet"] = kwargs["pooled_projections"].clone()
        return real_forward(*args, **kwargs)

    def base_spy(module, args, kwargs):
        seen["base"] = kwargs["pooled_projections"].clone()

    controlnet.forward = spy
    handle = base.transformer.register_forward_pre_hook(base_spy, with_kwargs=True)
    try:
        steered_prediction("sd3", base, controlnet, torch.rand(2, 3, 64, 64))
    finally:
        handle.remove()
    _, added = base.family.encode_prompts(base, ["a red circle", "a"], torch.device("cpu"))
    assert torch.equal(seen["base"], added["pooled_projections"]) and seen["base"].abs().sum() > 0
    assert torch.equal(seen["controlnet"], torch.zeros_like(seen["base"]) if force_zeros else seen["base"])


def test_with_ema_validation_samples_the_ema_weights_and_restores_the_trained_ones(demo_manifest, tiny_sd3, tmp_path,
                                                                                  monkeypatch):
    """Inside each validation the ControlNet's forward runs with the EMA's weights; after it, the trained
    weights are back (the next steps train those, not the average)."""
    from diffusers import SD3ControlNetModel

    from train import loop
    from train.train import main

    checks, inside = [], []
    real_validation, real_forward = loop.run_validation, SD3ControlNetModel.forward

    def forward(self, *args, **kwargs):
        if inside and inside[-1] is None:
            inside[-1] = [p.detach().clone() for p in self.parameters()]
        return real_forward(self, *args, **kwargs)

    def validation(run, controlnet, ema, *args, **kwargs):
        trained = [p.detach().clone() for p in controlnet.parameters()]
        shadow = [p.detach().clone() for p in ema.shadow_params] if ema is not None else trained
        inside.append(None)
        try:
            return real_validation(run, controlnet, ema, *args, **kwargs)
        finally:
            sampled, after = inside.pop(), list(controlnet.parameters())
            checks.append({"ema": ema is not None, "sampled_ema": all(map(torch.equal, sampled, shadow)),
                           "restored": all(torch.equal(a, b) for a, b in zip(after, trained)),
                           "ema_differs": any(not torch.equal(a, b) for a, b in zip(shadow, trained))})

    monkeypatch.setattr(SD3ControlNetModel, "forward", forward)
    monkeypatch.setattr(loop, "run_validation", validation)
    # validation at step 2: the EMA's first update copies the weights (decay 0), its second averages them
    assert main(train_args(demo_manifest, tiny_sd3, tmp_path / "ema", "sd3", "--use_ema", "--max_train_steps", "2",
                           "--validation_steps", "2", "--num_validation_rows", "1", "--num_validation_images", "1",
                           "--checkpointing_steps", "10")) == 0
    assert [c["ema"] for c in checks] == [True, False]  # at step 2 (EMA swapped in), then the final weights
    assert checks[0] == {"ema": True, "sampled_ema": True, "restored": True, "ema_differs": True}
    assert checks[1]["sampled_ema"] and checks[1]["restored"]


@pytest.mark.slow
def test_cached_conditions_reach_each_example_exactly_as_encoded_ones(stacked_manifest, tiny_flux, tmp_path,
                                                                      monkeypatch):
    """What the ControlNet is given, step by step, not only the weights after two AdamW steps (which move
    every weight by about the learning rate whatever the gradient's size): a cached union run with a batch
    size that divides no epoch, gradient accumulation and dropped captions hands each example the same
    condition latents and mode as an uncached one."""
    from train.train import main
    from train.families.flow import FluxAdapter

    seen, real = [], FluxAdapter.control_inputs

    def recording(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        seen.append({k: v.detach().float().clone() for k, v in out.items()})
        return out

    monkeypatch.setattr(FluxAdapter, "control_inputs", recording)
    common = ["--union", "--max_train_steps", "2", "--gradient_accumulation_steps", "2", "--checkpointing_steps",
              "10", "--validation_steps", "0", "--center_crop", "--proportion_empty_prompts", "0.5"]
    runs = []
    for extra in ([], ["--cache_latents"]):
        args = train_args(stacked_manifest, tiny_flux, tmp_path / f"run{len(runs)}", "flux", *common, *extra,
                          condition="canny,invert")
        args[args.index("--train_batch_size") + 1] = "3"
        seen.clear()
        assert main(args) == 0
        runs.append(list(seen))
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)
    uncached, cached = runs
    assert len(uncached) == len(cached) == 4  # 2 steps x 2 micro-batches
    for a, b in zip(uncached, cached):
        assert a["controlnet_cond"].shape[0] == 3 and set(a) == set(b)
        assert torch.equal(a["controlnet_mode"], b["controlnet_mode"])
        assert torch.allclose(a["controlnet_cond"], b["controlnet_cond"], atol=1e-5)


def test_the_condition_cache_encodes_no_more_maps_at_once_than_a_training_step(stacked_manifest, tiny_flux,
                                                                              monkeypatch):
    """A union run's cache holds every condition of a row, but builds it batch_size maps per VAE call (a
    training step encodes batch_size images, then batch_size conditions): no larger peak at 1024 px."""
    import diffusers

    from train.cache import EncodedCache
    from train.data import ManifestDataset, load_rows

    base = load_family_base(tiny_flux, "flux", ("canny", "invert"), union=True)
    rows, _ = load_rows(str(stacked_manifest), ("canny", "invert"), 0, keep_duplicates=True)
    dataset = ManifestDataset(rows, ("canny", "invert"), 64, 0, center_crop=True)
    sizes, encode = [], diffusers.AutoencoderKL.encode

    def counting(self, x, *args, **kwargs):
        sizes.append(x.shape[0])
        return encode(self, x, *args, **kwargs)

    monkeypatch.setattr(diffusers.AutoencoderKL, "encode", counting)
    cache = EncodedCache(base, dataset, torch.device("cpu"), torch.float32, 3, show_progress=False)
    assert max(sizes) == 3 and cache.condition_moments.shape[:2] == (len(dataset), 2)
    with torch.no_grad():
        one = base.vae.encode(dataset.condition_tensor(1)[3:][None] * 2 - 1).latent_dist.parameters[0]
    assert torch.allclose(cache.condition_moments[1, 1], one, atol=1e-5)  # row 1's second condition, in place

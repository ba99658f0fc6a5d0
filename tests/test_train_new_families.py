"""The 2025-2026 transformer families (Qwen-Image, Z-Image, Sana, HunyuanDiT), one parametrised module: each
family is one ``FamilyCase`` in ``CASES`` (tests/family_cases.py) over a tiny base built from configs and
saved locally (its ``tiny_<family>`` fixture in conftest.py).

For each: a fresh ControlNet leaves the base's prediction exactly unchanged; with non-zero weights the
condition changes the prediction; training changes only the ControlNet; resume is exact; the export loads in
the family's ControlNet pipeline, generates, and the condition changes its output; the memory flags work;
flags the family cannot take fail before any weights load.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tests.family_cases import CASES
from tests.test_train_families import assert_resume_from_checkpoint_is_exact, perturb, train_keeping_base

FAMILIES = tuple(CASES)
pytestmark = pytest.mark.skipif(not FAMILIES, reason="no new family registered yet")


def train_args(manifest, base, out, family: str, *extra, condition: str = "canny") -> list[str]:
    # --keep_duplicates: the demo's edge cases are near copies by design (see tests/test_train.py)
    return ["--manifest", str(manifest), "--condition", condition, "--pretrained_model_name_or_path", str(base),
            "--output_dir", str(out), "--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-3",
            "--seed", "7", "--report_to", "none", "--keep_duplicates", *CASES[family].size, *extra]


def load_family_base(request, family: str):
    from train.adapter import FamilyOptions
    from train.models import load_base

    base = load_base(str(request.getfixturevalue(f"tiny_{family}")), 64)
    assert base.family.name == family
    base.options = FamilyOptions(("canny",), False, CASES[family].max_sequence_length)
    return base


def fresh_controlnet(base, family: str) -> torch.nn.Module:
    from train.models import make_controlnet

    return make_controlnet(base, 3, None, *CASES[family].layers).eval()


def steered(base, controlnet, noisy, sigmas, condition: torch.Tensor) -> torch.Tensor:
    """The family's prediction with the ControlNet reading ``condition`` (two prompts, as in a batch)."""
    hidden, added = base.family.encode_prompts(base, ["a red circle", ""], torch.device("cpu"))
    with torch.no_grad():
        control = base.family.control_inputs(base, controlnet, condition, torch.Generator().manual_seed(0))
        return base.family.predict(controlnet, base, noisy, sigmas, hidden, added, control)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_fresh_controlnet_leaves_the_base_prediction_exactly_unchanged(family, request):
    case, base = CASES[family], load_family_base(request, family)
    controlnet = fresh_controlnet(base, family)
    noisy, sigmas = case.noisy(base), torch.tensor([0.3, 0.9])
    prediction = steered(base, controlnet, noisy, sigmas, torch.rand(2, 3, 64, 64))
    hidden, added = base.family.encode_prompts(base, ["a red circle", ""], torch.device("cpu"))
    with torch.no_grad():
        plain = case.plain(base, noisy, sigmas, hidden, added)  # diffusers' transformer called as its pipeline does
    assert torch.equal(plain, prediction)
    assert plain.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_the_controlnet_reads_the_condition(family, request):
    case, base = CASES[family], load_family_base(request, family)
    controlnet = fresh_controlnet(base, family)
    perturb(controlnet)
    noisy, sigmas = case.noisy(base), torch.tensor([0.3, 0.9])
    g = torch.Generator().manual_seed(1)
    first, second = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    a, b = (steered(base, controlnet, noisy, sigmas, c) for c in (first, second))
    assert torch.equal(a, steered(base, controlnet, noisy, sigmas, first))
    assert (a - b).abs().amax() > 1e-3 * a.abs().amax()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_controlnet_lora_starts_at_the_base_and_trains_only_its_adapters_and_new_parts(family, request):
    """--controlnet_lora_rank on the family: the start predicts exactly what the base does, and the
    parameters that train are the LoRA adapters and the ControlNet's new (zero-initialised) parts only."""
    from train.controlnet_lora import LoraSettings, is_new, new_part_names
    from train.models import make_controlnet

    case, base = CASES[family], load_family_base(request, family)
    controlnet = make_controlnet(base, 3, None, *case.layers, LoraSettings(rank=2)).eval()
    noisy, sigmas = case.noisy(base), torch.tensor([0.3, 0.9])
    prediction = steered(base, controlnet, noisy, sigmas, torch.rand(2, 3, 64, 64))
    hidden, added = base.family.encode_prompts(base, ["a red circle", ""], torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(case.plain(base, noisy, sigmas, hidden, added), prediction)
    parts = new_part_names(controlnet)
    trained = [n for n, p in controlnet.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trained) and any(is_new(n, parts) for n in trained)
    assert all("lora_" in n or is_new(n, parts) for n in trained), [n for n in trained if "lora_" not in n
                                                                     and not is_new(n, parts)]
    frozen_new = [n for n, p in controlnet.named_parameters() if is_new(n, parts) and not p.requires_grad]
    assert frozen_new == [] or all(n.startswith(("controlnet_blocks", "transformer_blocks")) for n in frozen_new)


@pytest.mark.parametrize(("family", "extra", "message"),
                         [(f, list(extra), message) for f in FAMILIES for extra, message in CASES[f].refused])
def test_flags_the_family_cannot_take_fail_before_any_weights_load(demo_manifest, request, tmp_path, capsys,
                                                                  monkeypatch, family, extra, message):
    from train import models
    from train.train import main

    monkeypatch.setattr(models, "load_base", lambda *a: pytest.fail("weights loaded before the flags were checked"))
    base = request.getfixturevalue(f"tiny_{family}")
    try:
        status = main(train_args(demo_manifest, base, tmp_path / "out", family, *extra))
    except SystemExit as exc:  # flags the config refuses exit through argparse (status 2) before main returns
        status = exc.code
    assert status == 2
    assert message in capsys.readouterr().err


# --- a short run per family: base untouched, resume exact, export loads and generates ---------------------


@pytest.fixture(scope="module", params=FAMILIES)
def straight_run(request, demo_manifest, tmp_path_factory):
    """3 steps (checkpoints at 2 and 3, validation samples at 3), keeping the base the loop trained beside."""
    family = request.param
    base_dir = request.getfixturevalue(f"tiny_{family}")
    out = tmp_path_factory.mktemp(f"{family}_run") / "run"
    args = train_args(demo_manifest, base_dir, out, family, "--max_train_steps", "3", "--checkpointing_steps", "2",
                      "--validation_steps", "3", "--num_validation_rows", "2", "--num_validation_images", "1")
    return train_keeping_base(family, base_dir, out, args)


def load_exported(family: str, folder) -> torch.nn.Module:
    import diffusers

    return getattr(diffusers, CASES[family].controlnet).from_pretrained(folder)


@pytest.mark.slow
def test_training_changes_the_controlnet_and_never_the_base(straight_run, request):
    family, trained = straight_run["family"], straight_run["base"]
    fresh = load_family_base(request, family)
    pairs = [("transformer", trained.transformer, fresh.transformer), ("vae", trained.vae, fresh.vae)] + [
        (f"text_encoder{i}", a, b) for i, (a, b) in enumerate(zip(trained.text_encoders, fresh.text_encoders))]
    for name, a, b in pairs:
        fresh_state = b.state_dict()
        for k, v in a.state_dict().items():
            assert torch.equal(v, fresh_state[k]), f"{name}.{k} changed"
    start = fresh_controlnet(fresh, family).state_dict()
    after = load_exported(family, straight_run["out"] / "controlnet").state_dict()
    assert set(after) == set(start)
    changed = [k for k, v in after.items() if not torch.equal(v, start[k])]
    assert any(k.startswith(CASES[family].zero_outputs) for k in changed)  # the zero-initialised outputs moved
    figures = straight_run["result"]["figures"]
    assert figures["global_step"] == 3 and np.isfinite(figures["final_loss"])


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(straight_run, tmp_path):
    import tests.test_train_families as shared

    with pytest.MonkeyPatch.context() as mp:  # the shared check loads exports by the family's class
        mp.setattr(shared, "load_exported", load_exported)
        assert_resume_from_checkpoint_is_exact(straight_run, "checkpoint-2", tmp_path)


@pytest.mark.slow
def test_export_loads_in_the_family_pipeline_and_the_condition_changes_its_output(straight_run):
    import diffusers
    from PIL import Image

    family, out = straight_run["family"], straight_run["out"]
    case = CASES[family]
    controlnet = load_exported(family, out / "controlnet")
    perturb(controlnet)  # three steps barely move the zero outputs; random weights make the condition count
    pipe = getattr(diffusers, case.pipeline).from_pretrained(straight_run["base_dir"], controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    images = []
    for _ in range(2):
        condition = Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))
        images.append(pipe(prompt="a red circle", height=64, width=64, num_inference_steps=2, output_type="np",
                           generator=torch.Generator().manual_seed(0),
                           **case.pipeline_kwargs, **{case.control_argument: condition}).images)
    assert images[0].shape == (1, 64, 64, 3) and np.isfinite(images[0]).all()
    assert np.abs(images[0] - images[1]).max() > 1e-4
    card = (out / "README.md").read_text()
    assert f"{case.controlnet}.from_pretrained" in card and case.pipeline in card
    assert (out / "validation" / "step-000003.png").is_file() and (out / "validation" / "step-final.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_memory_flags_train_and_validate(demo_manifest, family, request, tmp_path):
    """bf16 locked base, gradient checkpointing, cached latents and prompts, EMA: one step, then validation."""
    from train.train import main

    out = tmp_path / "run"
    assert main(train_args(demo_manifest, request.getfixturevalue(f"tiny_{family}"), out, family,
                           "--max_train_steps", "1", "--mixed_precision", "bf16", "--gradient_checkpointing",
                           "--cache_latents", "--center_crop", "--validation_steps", "1", "--num_validation_rows", "1",
                           "--num_validation_images", "1", "--checkpointing_steps", "10", "--use_ema")) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["figures"]["mixed_precision"] == "bf16" and np.isfinite(summary["figures"]["final_loss"])
    assert (out / "validation" / "step-final.png").is_file()
    load_exported(family, out / "controlnet")
    shutil.rmtree(out)


# --- Z-Image: control block places, the pipeline's own encodings, the base's parts lent not owned -------------


def zimage_base(request, places: tuple[int, ...] = ()):
    from train.adapter import FamilyOptions

    base = load_family_base(request, "zimage")
    base.options = FamilyOptions(("canny",), False, 32, control_layers_places=places)
    return base


@pytest.mark.skipif("zimage" not in CASES, reason="Z-Image not registered")
def test_zimage_control_blocks_sit_at_the_places_given_as_copies_of_those_layers(request):
    from train.families.zimage import LENT
    from train.models import make_controlnet

    base = zimage_base(request, (0, 3, 4))
    controlnet = make_controlnet(base, 3, None)
    assert controlnet.config.control_layers_places == [0, 3, 4]
    for block, place in zip(controlnet.control_layers, (0, 3, 4)):
        layer = base.transformer.layers[place].state_dict()
        for key, value in block.state_dict().items():
            if key.startswith(("before_proj", "after_proj")):
                assert not value.any(), key  # the zero outputs: it starts by adding nothing
            else:
                assert torch.equal(value, layer[key]), (place, key)
    # the base's embedders and refiners it runs are lent: not its parameters, so not trained, saved or exported
    assert not any(k.split(".")[0] in LENT for k in controlnet.state_dict())
    assert {id(p) for p in controlnet.parameters()}.isdisjoint(id(p) for p in base.transformer.parameters())
    noisy, sigmas = CASES["zimage"].noisy(base), torch.tensor([0.3, 0.9])
    hidden, added = base.family.encode_prompts(base, ["a red circle", ""], torch.device("cpu"))
    control = base.family.control_inputs(base, controlnet, torch.rand(2, 3, 64, 64), torch.Generator())
    with torch.no_grad():
        residuals = controlnet(list(noisy.unsqueeze(2).unbind(0)), 1 - sigmas,
                               [h[m] for h, m in zip(hidden, added["prompt_mask"])], **control)
    assert sorted(residuals) == [0, 3, 4]  # one residual per place, keyed by the base layer it is added to
    default = make_controlnet(zimage_base(request), 3, None)
    assert default.config.control_layers_places == [0, 5]  # every 5th of the tiny base's 6 layers


@pytest.mark.skipif("zimage" not in CASES, reason="Z-Image not registered")
def test_zimage_places_beyond_a_hub_bases_depth_fail_when_it_loads(request):
    from train.errors import SetupError
    from train.models import make_controlnet

    with pytest.raises(SetupError, match="this Z-Image base has 6 layers"):
        make_controlnet(zimage_base(request, (0, 6)), 3, None)


@pytest.mark.skipif("zimage" not in CASES, reason="Z-Image not registered")
def test_zimage_prompts_conditions_and_timestep_are_what_its_controlnet_pipeline_passes(request):
    """One step of ZImageControlNetPipeline without guidance: the ControlNet receives exactly the caption
    features, condition latents and timestep the adapter computes for the same prompt and image."""
    base = zimage_base(request)
    controlnet = fresh_controlnet(base, "zimage")
    pipe = base.family.validation_pipeline(base, controlnet)
    seen = {}
    handle = controlnet.register_forward_pre_hook(lambda _, args: seen.update(args=args))
    condition = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    try:
        pipe(prompt="a red circle", height=64, width=64, num_inference_steps=1, guidance_scale=0.0,
             max_sequence_length=32, output_type="latent", generator=torch.Generator().manual_seed(0),
             **base.family.control_kwargs(condition, None))
    finally:
        handle.remove()
    _, t, cap_feats, control_context = seen["args"]
    hidden, added = base.family.encode_prompts(base, ["a red circle"], torch.device("cpu"))
    assert torch.equal(cap_feats[0], hidden[0][added["prompt_mask"][0]])
    control = base.family.control_inputs(base, controlnet, condition, torch.Generator())["control_context"]
    assert torch.allclose(control_context[0], control[0], atol=1e-6)
    pipe.scheduler.set_timesteps(sigmas=[1.0], mu=0.0)  # the pipeline's one sigma, shifted by the scheduler
    assert torch.allclose(t, 1 - pipe.scheduler.sigmas[:1])
    assert not any(k.startswith("t_embedder") for k in controlnet.state_dict())  # the pipeline lent them again
# --- Qwen-Image: what QwenImageControlNetPipeline does, and its mode-free union ---------------------------


def qwenimage_base(request):
    return load_family_base(request, "qwenimage") if "qwenimage" in CASES else pytest.skip("no Qwen-Image case")


def test_qwenimage_prompt_and_condition_reach_the_controlnet_as_its_pipeline_passes_them(request):
    from diffusers import QwenImageControlNetPipeline

    base = qwenimage_base(request)
    controlnet = fresh_controlnet(base, "qwenimage")
    seen = {}
    controlnet.register_forward_pre_hook(lambda _, args, kwargs: seen.setdefault("call", kwargs) and None,
                                         with_kwargs=True)
    pipe = QwenImageControlNetPipeline(transformer=base.transformer, vae=base.vae, text_encoder=base.text_encoders[0],
                                       tokenizer=base.tokenizers[0], scheduler=base.scheduler, controlnet=controlnet)
    condition = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    pipe(prompt="a red circle", height=64, width=64, num_inference_steps=2, output_type="latent", true_cfg_scale=1.0,
         control_image=condition * 2 - 1, generator=torch.Generator().manual_seed(5))
    # the pipeline's generator first draws the control image's VAE sample, as the adapter's does
    control = base.family.control_inputs(base, controlnet, condition, torch.Generator().manual_seed(5))
    assert torch.equal(control["controlnet_cond"], seen["call"]["controlnet_cond"])
    hidden, added = base.family.encode_prompts(base, ["a red circle"], torch.device("cpu"))
    assert torch.equal(hidden, seen["call"]["encoder_hidden_states"])
    assert hidden.shape[1] == 8  # "a red circle" and the template's tail: the 34-token system prefix is dropped
    assert seen["call"]["encoder_hidden_states_mask"] is None and bool(added["encoder_hidden_states_mask"].all())


@pytest.mark.parametrize("kind", ["exponential", "linear"])
def test_qwenimage_training_shift_is_the_schedulers_dynamic_shift(kind):
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_controlnet import calculate_shift

    from tests.tiny_qwenimage import qwen_scheduler
    from train.families.qwenimage import QwenImageAdapter

    scheduler = FlowMatchEulerDiscreteScheduler.from_config({**qwen_scheduler().config, "time_shift_type": kind})
    u = torch.linspace(0.05, 0.95, 7)
    for side in (32, 64, 128):  # latents of 256, 512, 1024 px
        tokens = (side // 2) ** 2
        mu = calculate_shift(tokens, 256, 8192, 0.5, 0.9)  # Qwen/Qwen-Image's scheduler config
        shift = QwenImageAdapter(side * 8).shift(SimpleNamespace(scheduler=scheduler), torch.zeros(1, 16, side, side))
        expected = scheduler.time_shift(mu, 1.0, u)  # what inference's sigmas go through
        assert torch.allclose(shift * u / (1 + (shift - 1) * u), expected, atol=1e-6)


def test_qwenimage_union_gives_each_example_one_condition_and_no_mode(request, tmp_path):
    from train.adapter import FamilyOptions
    from train.train import parse_args

    base = qwenimage_base(request)
    controlnet = fresh_controlnet(base, "qwenimage")
    stacked = torch.rand(4, 6, 64, 64, generator=torch.Generator().manual_seed(4))  # canny | depth per example
    base.options = FamilyOptions(("canny", "depth"), True)
    control = base.family.control_inputs(base, controlnet, stacked, torch.Generator().manual_seed(9))
    assert set(control) == {"controlnet_cond"}  # QwenImageControlNetModel has no mode input
    g = torch.Generator().manual_seed(9)
    picks = torch.randint(0, 2, (4,), generator=g)
    one_each = stacked.view(4, 2, 3, 64, 64)[torch.arange(4), picks]
    base.options = FamilyOptions(("canny",), False)
    assert torch.equal(control["controlnet_cond"],
                       base.family.control_inputs(base, controlnet, one_each, g)["controlnet_cond"])
    config = parse_args(["--manifest", str(tmp_path), "--condition", "canny,depth", "--union", "--resolution", "64",
                         "--pretrained_model_name_or_path", str(request.getfixturevalue("tiny_qwenimage")),
                         "--output_dir", str(tmp_path / "out")])
    assert config.union and config.condition == ("canny", "depth")
# --- HunyuanDiT: its ControlNet copy and gradient checkpointing ----------------------------------------


def hunyuandit_base(folder):
    from train.adapter import FamilyOptions
    from train.models import load_base

    base = load_base(str(folder), 64)
    base.options = FamilyOptions(("canny",))
    return base


def test_hunyuandit_controlnet_is_what_diffusers_from_transformer_makes_where_that_works():
    """On a base with the published pooled_projection_dim (1024, which from_transformer leaves at its default)
    and v1.1's style/size embedding, the adapter's copy equals diffusers' own, weight for weight."""
    from diffusers import HunyuanDiT2DControlNetModel, HunyuanDiT2DModel

    from train.families.hunyuandit import controlnet_from_transformer

    torch.manual_seed(0)
    transformer = HunyuanDiT2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2,
                                    sample_size=8, hidden_size=16, num_layers=6, cross_attention_dim=16,
                                    cross_attention_dim_t5=32, pooled_projection_dim=1024)
    ours = controlnet_from_transformer(transformer, 3).state_dict()
    theirs = HunyuanDiT2DControlNetModel.from_transformer(transformer, transformer_num_layers=6).state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(v, theirs[k]) for k, v in ours.items())
    assert {k.split(".")[1] for k in ours if k.startswith("blocks.")} == {"0", "1"}  # one per skip connection


def test_hunyuandit_v1_2_base_without_style_or_size_embedding_gets_a_zero_start_controlnet(tmp_path):
    """diffusers' from_transformer builds the style/size embedding whatever the base has, so a v1.2 base fails
    to load into it; the adapter's copy takes the base's config and starts exactly at the base."""
    from diffusers import HunyuanDiT2DControlNetModel

    from tests.tiny_hunyuandit import noisy, plain, write_tiny_hunyuandit

    base = hunyuandit_base(write_tiny_hunyuandit(tmp_path / "v12", use_style_cond_and_image_meta_size=False))
    with pytest.raises(RuntimeError, match="size mismatch"):
        HunyuanDiT2DControlNetModel.from_transformer(base.transformer,
                                                     transformer_num_layers=base.transformer.config.num_layers)
    controlnet = fresh_controlnet(base, "hunyuandit")
    assert controlnet.config.use_style_cond_and_image_meta_size is False
    latents, timesteps = noisy(base), torch.tensor([10, 900])
    prediction = steered(base, controlnet, latents, timesteps, torch.rand(2, 3, 64, 64))
    hidden, added = base.family.encode_prompts(base, ["a red circle", ""], torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(prediction, plain(base, latents, timesteps, hidden, added))


def test_hunyuandit_gradient_checkpointing_keeps_the_loss_gradients_and_state_dict(tiny_hunyuandit):
    base = hunyuandit_base(tiny_hunyuandit)
    plain_net = fresh_controlnet(base, "hunyuandit").train()
    perturb(plain_net)
    with pytest.raises(ValueError, match="does not support gradient checkpointing"):
        plain_net.enable_gradient_checkpointing()  # diffusers' class has none: the adapter adds it
    checkpointed = fresh_controlnet(base, "hunyuandit").train()
    checkpointed.load_state_dict(plain_net.state_dict())
    base.family.enable_gradient_checkpointing(checkpointed)
    assert list(checkpointed.state_dict()) == list(plain_net.state_dict())
    hidden, added = base.family.encode_prompts(base, ["a red circle", ""], torch.device("cpu"))
    latents, condition = torch.randn(2, 4, 8, 8), torch.rand(2, 3, 64, 64)
    grads = []
    for net in (plain_net, checkpointed):
        loss = base.family.loss(net, base, latents, hidden, added, condition, torch.Generator().manual_seed(4))
        loss.backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grads[1])

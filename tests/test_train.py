"""The trainer on a tiny Stable Diffusion built from configs and the demo manifest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # trains tiny models, in process and under accelerate launch

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def train_args(manifest, tiny_sd, out, *extra) -> list[str]:
    # --keep_duplicates: the demo collection's edge cases are one picture in many encodings (near
    # duplicates by design), and these tests count rows; skipping duplicates is tested in test_duplicates.py.
    return ["--manifest", str(manifest), "--condition", "canny", "--pretrained_model_name_or_path", str(tiny_sd),
            "--output_dir", str(out), "--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-3",
            "--seed", "7", "--report_to", "none", "--validation_steps", "1000", "--keep_duplicates", *extra]


def launch(args: list[str], processes: int = 1) -> subprocess.CompletedProcess:
    # accelerate 1.15 runs `--cpu --num_processes 2` as ONE process unless MPI is set up; its
    # torchrun-based launcher (--multi_gpu) gives real gloo ranks on a machine with no GPU.
    mode = ["--cpu"] if processes == 1 else ["--multi_gpu"]
    cmd = [ACCELERATE, "launch", *mode, "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train" / "train.py"), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def load_controlnet(path):
    from diffusers import ControlNetModel

    return ControlNetModel.from_pretrained(path)


def assert_same_weights(a_dir, b_dir, atol=1e-6):
    a, b = load_controlnet(a_dir).state_dict(), load_controlnet(b_dir).state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol), k


def capture_conditions(monkeypatch) -> list[torch.Tensor]:
    """Every ``controlnet_cond`` the ControlNet is called with during training (a list, filled later)."""
    from diffusers import ControlNetModel

    seen, forward = [], ControlNetModel.forward

    def recording(self, *args, **kwargs):
        seen.append(kwargs["controlnet_cond"].detach().clone())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ControlNetModel, "forward", recording)
    return seen


def capture_exported(monkeypatch) -> list[torch.nn.Module]:
    """The model objects handed to export (a list, filled when the run exports)."""
    from train import loop

    models, export = [], loop.export

    def recording(model, *args, **kwargs):
        models.append(model)
        return export(model, *args, **kwargs)

    monkeypatch.setattr(loop, "export", recording)
    return models


BASELINE = ["--max_train_steps", "2", "--checkpointing_steps", "10"]


@pytest.fixture(scope="module")
def baseline_run(demo_manifest, tiny_sd, tmp_path_factory):
    """One plain 2-step run that other runs must reproduce (output folder)."""
    from train.train import main

    out = tmp_path_factory.mktemp("baseline") / "run"
    assert main(train_args(demo_manifest, tiny_sd, out, *BASELINE)) == 0
    return out


def test_zero_convolutions_make_the_start_exactly_the_base(tiny_sd):
    from train.models import load_base, make_controlnet

    base = load_base(str(tiny_sd), 64)
    controlnet = make_controlnet(base, 3)
    torch.manual_seed(0)
    latents, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    hidden = torch.randn(2, 77, 32)
    cond = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        plain = base.unet(latents, t, encoder_hidden_states=hidden).sample
        down, mid = controlnet(latents, t, encoder_hidden_states=hidden, controlnet_cond=cond, return_dict=False)
        steered = base.unet(latents, t, encoder_hidden_states=hidden, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid).sample
    assert all(bool((r == 0).all()) for r in down) and bool((mid == 0).all())
    assert torch.equal(plain, steered)


def test_training_changes_the_controlnet_and_never_the_base(demo_manifest, tiny_sd, tmp_path, monkeypatch):
    from train import loop
    from train.data import check_conditions
    from train.models import load_base
    from train.train import parse_args

    captured = {}

    def keep(path, resolution, *method):
        captured["base"] = load_base(path, resolution, *method)
        return captured["base"]

    monkeypatch.setattr(loop, "load_base", keep)
    config = parse_args(train_args(demo_manifest, tiny_sd, tmp_path / "run", "--max_train_steps", "3",
                                   "--checkpointing_steps", "10"))
    loop.train(config, check_conditions(config.manifest, config.condition))
    fresh = load_base(str(tiny_sd), 64)
    trained = captured["base"]
    for name in ("unet", "vae"):
        for (k, a), (_, b) in zip(getattr(trained, name).state_dict().items(), getattr(fresh, name).state_dict().items()):
            assert torch.equal(a, b), f"{name}.{k} changed"
    for (k, a), (_, b) in zip(trained.text_encoders[0].state_dict().items(), fresh.text_encoders[0].state_dict().items()):
        assert torch.equal(a, b), f"text_encoder.{k} changed"
    from diffusers import ControlNetModel

    start = ControlNetModel.from_unet(fresh.unet)
    after = load_controlnet(tmp_path / "run" / "controlnet")
    changed = [k for k, v in after.state_dict().items() if not torch.equal(v, start.state_dict()[k])]
    assert any("controlnet_down_blocks" in k for k in changed)  # the zero convolutions left zero


@pytest.mark.slow
def test_accelerate_launch_on_two_cpu_processes(demo_manifest, tiny_sd, tmp_path):
    out = tmp_path / "ddp"
    launch(train_args(demo_manifest, tiny_sd, out, "--max_train_steps", "3", "--checkpointing_steps", "10"),
           processes=2)
    ranks = json.loads((out / "train_summary.json").read_text())["figures"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert not set(ranks[0]["rows"]) & set(ranks[1]["rows"]) and ranks[0]["rows"]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(demo_manifest, tiny_sd, tmp_path):
    import shutil

    schedule = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--lr_scheduler", "linear",
                "--lr_warmup_steps", "0", "--gradient_accumulation_steps", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch(train_args(demo_manifest, tiny_sd, straight, *schedule))
    # Stop at step 2 = keep only that checkpoint; then a crash left a half-written newer folder.
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    (resumed / "checkpoint-3").mkdir()
    (resumed / "checkpoint-3" / "model.safetensors").write_bytes(b"partial")
    launch(train_args(demo_manifest, tiny_sd, resumed, *schedule, "--resume_from_checkpoint", "latest"))
    a = load_controlnet(straight / "controlnet").state_dict()
    b = load_controlnet(resumed / "controlnet").state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    fa = json.loads((straight / "train_summary.json").read_text())["figures"]
    fb = json.loads((resumed / "train_summary.json").read_text())["figures"]
    assert fa["global_step"] == fb["global_step"] == 4 and fa["lr"] == pytest.approx(fb["lr"])
    assert sorted(fb["ranks"][0]["rows"]) != sorted(fa["ranks"][0]["rows"])  # the resumed run skipped seen batches


def test_export_loads_in_the_controlnet_pipeline_and_as_one_file(demo_manifest, tiny_sd, tmp_path):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from safetensors.torch import load_file

    out = tmp_path / "run"
    from train.train import main

    assert main(train_args(demo_manifest, tiny_sd, out, "--max_train_steps", "2", "--checkpointing_steps", "10",
                           "--validation_steps", "2", "--report_to", "tensorboard")) == 0
    controlnet = ControlNetModel.from_pretrained(out / "controlnet")
    pipe = StableDiffusionControlNetPipeline.from_pretrained(str(tiny_sd), controlnet=controlnet, safety_checker=None,
                                                             requires_safety_checker=False)
    image = pipe("a red circle", image=torch.rand(1, 3, 64, 64), height=64, width=64, num_inference_steps=2,
                 output_type="pil").images[0]
    assert image.size == (64, 64)
    single = load_file(out / "controlnet.safetensors")
    assert "controlnet_cond_embedding.conv_in.weight" in single  # what ComfyUI/A1111 detect
    assert set(single) == set(controlnet.state_dict())
    card = (out / "README.md").read_text()
    assert "base_model:" in card and "canny" in card and "fingerprint" in card
    assert list((out / "validation").glob("step-*.png"))
    assert list((out / "logs").rglob("events.out.tfevents*"))


def test_two_stacked_conditions_train_and_export(stacked_manifest, tiny_sd, tmp_path, monkeypatch):
    """--condition canny,invert: the ControlNet reads 6 channels, canny's binary edges first."""
    from train.train import main

    seen = capture_conditions(monkeypatch)
    out = tmp_path / "stacked"
    # validation off: its sampling calls the ControlNet too (stacked validation: test_train_stacked_validation.py)
    args = train_args(stacked_manifest, tiny_sd, out, "--max_train_steps", "2", "--checkpointing_steps", "10",
                      "--validation_steps", "0")
    args[args.index("canny")] = "canny,invert"
    assert main(args) == 0
    assert load_controlnet(out / "controlnet").config.conditioning_channels == 6
    assert len(seen) == 2
    for cond in seen:
        edges, inverted = cond[:, 0:3], cond[:, 3:6]
        assert bool(((edges == 0) | (edges == 1)).all()) and edges.mean() < 0.3  # canny: sparse 0/1 edges
        assert ((inverted > 0.02) & (inverted < 0.98)).float().mean() > 0.5  # 1 - red: smooth gradients


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--resolution", "100"], "not divisible by 8"),
        (["--lr_scheduler", "sometimes"], "--lr_scheduler"),
        (["--mixed_precision", "fp8"], "--mixed_precision"),
        (["--proportion_empty_prompts", "2"], "within 0..1"),
        (["--validation_prompt", "a cat"], "needs --validation_image"),
        (["--no_such_flag"], "unrecognized arguments"),
    ],
)
def test_bad_flags_fail_before_any_model_loads(demo_manifest, tmp_path, capsys, extra, message):
    from train.train import main

    with pytest.raises(SystemExit) as exc:
        main(train_args(demo_manifest, tmp_path / "no-model", tmp_path / "out", *extra))
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_missing_manifest_or_condition_fails_with_what_to_do(demo_manifest, tmp_path, capsys):
    from train.train import main

    assert main(train_args(tmp_path / "nothing", tmp_path, tmp_path / "o")) == 2
    assert "has no _manifest.json" in capsys.readouterr().err
    args = train_args(demo_manifest, tmp_path, tmp_path / "o")
    args[args.index("canny")] = "depth"
    assert main(args) == 2
    assert "has no condition depth; it has: canny" in capsys.readouterr().err


def test_non_finite_losses_are_skipped_then_stop_the_run(demo_manifest, tiny_sd, tmp_path, monkeypatch):
    from train import loop
    from train.data import check_conditions
    from train.train import parse_args

    real = loop.family_loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(loop, "family_loss", sometimes_nan)
    config = parse_args(train_args(demo_manifest, tiny_sd, tmp_path / "a", "--max_train_steps", "3",
                                   "--checkpointing_steps", "10"))
    result = loop.train(config, check_conditions(config.manifest, config.condition))
    assert result["figures"]["skipped_steps"] == 1 and result["figures"]["global_step"] == 3

    monkeypatch.setattr(loop, "family_loss", lambda *a, **k: real(*a, **k) * float("inf"))
    config = parse_args(train_args(demo_manifest, tiny_sd, tmp_path / "b", "--max_train_steps", "5",
                                   "--max_nonfinite_steps", "2", "--checkpointing_steps", "10"))
    with pytest.raises(loop.NonFiniteLossError, match="2 steps in a row had a non-finite loss"):
        loop.train(config, check_conditions(config.manifest, config.condition))


def test_ema_run_exports_the_averaged_weights(demo_manifest, tiny_sd, tmp_path):
    """controlnet/ and controlnet.safetensors hold the EMA shadow weights, not the raw trained ones."""
    from safetensors.torch import load_file

    from train.train import main

    out = tmp_path / "ema"
    assert main(train_args(demo_manifest, tiny_sd, out, "--max_train_steps", "2", "--checkpointing_steps", "1",
                           "--use_ema", "--checkpoints_total_limit", "1")) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # older pruned after the new one
    final = out / "checkpoint-2"
    raw = load_file(final / "model.safetensors")  # the trained model itself, at the last step
    ema = torch.load(final / "custom_checkpoint_0.pkl", weights_only=False)  # the registered EMAModel
    exported = load_controlnet(out / "controlnet")
    assert exported.config.conditioning_channels == 3
    names = [name for name, _ in exported.named_parameters()]
    assert len(names) == len(ema["shadow_params"])
    shadow = dict(zip(names, ema["shadow_params"]))
    single = load_file(out / "controlnet.safetensors")
    for name, param in exported.named_parameters():
        assert param.shape == shadow[name].shape, name
        assert torch.allclose(param, shadow[name], atol=1e-7), f"controlnet/ {name} is not the EMA weight"
        assert torch.equal(single[name], shadow[name].half()), f"controlnet.safetensors {name} is not the EMA weight"
    apart = [n for n in names if not torch.allclose(shadow[n], raw[n], atol=1e-6)]
    assert any("controlnet_down_blocks" in n for n in apart) and len(apart) > len(names) // 2


def test_8bit_adam_without_bitsandbytes_says_how_to_get_it(demo_manifest, tmp_path, capsys):
    import importlib.util

    from train.train import main

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    with pytest.raises(SystemExit):
        main(train_args(demo_manifest, tmp_path, tmp_path / "o", "--use_8bit_adam"))
    assert "pip install bitsandbytes" in capsys.readouterr().err


def test_cached_latents_train_the_same_model_as_encoding_every_step(demo_manifest, tiny_sd, tmp_path):
    from train.train import main

    fixed = ["--max_train_steps", "3", "--checkpointing_steps", "10", "--center_crop", "--no_random_flip"]
    assert main(train_args(demo_manifest, tiny_sd, tmp_path / "plain", *fixed)) == 0
    assert main(train_args(demo_manifest, tiny_sd, tmp_path / "cached", *fixed, "--cache_latents")) == 0
    a = load_controlnet(tmp_path / "plain" / "controlnet").state_dict()
    b = load_controlnet(tmp_path / "cached" / "controlnet").state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_cache_latents_needs_fixed_crops(demo_manifest, tmp_path, capsys):
    from train.train import main

    with pytest.raises(SystemExit):
        main(train_args(demo_manifest, tmp_path, tmp_path / "o", "--cache_latents"))
    assert "--cache_latents needs fixed crops: add --center_crop" in capsys.readouterr().err


def test_sdxl_family_trains_through_its_adapter(demo_manifest, tmp_path):
    from tests.tiny_sd import write_tiny_sdxl
    from train.train import main

    sdxl = write_tiny_sdxl(tmp_path / "sdxl")
    out = tmp_path / "run"
    assert main(train_args(demo_manifest, sdxl, out, "--max_train_steps", "2", "--checkpointing_steps", "10")) == 0
    controlnet = load_controlnet(out / "controlnet")
    assert controlnet.config.addition_embed_type == "text_time"
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["figures"]["global_step"] == 2 and summary["figures"]["final_loss"] is not None


def test_gradient_checkpointing_is_enabled_and_trains_the_same_weights(demo_manifest, tiny_sd, baseline_run,
                                                                       tmp_path, monkeypatch):
    from train.train import main

    exported = capture_exported(monkeypatch)
    out = tmp_path / "checkpointed"
    assert main(train_args(demo_manifest, tiny_sd, out, *BASELINE, "--gradient_checkpointing")) == 0
    assert exported[0].is_gradient_checkpointing
    assert_same_weights(baseline_run / "controlnet", out / "controlnet")


def test_two_dataloader_workers_train_the_same_weights_as_none(demo_manifest, tiny_sd, baseline_run, tmp_path):
    from train.train import main

    out = tmp_path / "workers"
    assert main(train_args(demo_manifest, tiny_sd, out, *BASELINE, "--dataloader_num_workers", "2")) == 0
    assert_same_weights(baseline_run / "controlnet", out / "controlnet")


def test_num_train_epochs_without_max_steps_runs_that_many_epochs(demo_manifest, tiny_sd, tmp_path):
    """2 epochs of batches of 7: every training row is seen exactly twice."""
    from train.data import load_rows
    from train.train import main, parse_args

    args = train_args(demo_manifest, tiny_sd, tmp_path / "epochs", "--train_batch_size", "7",
                      "--num_train_epochs", "2", "--checkpointing_steps", "100")
    config = parse_args(args)
    rows, _ = load_rows(config.manifest, config.condition, config.num_validation_rows,
                        keep_duplicates=config.keep_duplicates)
    batches = len(rows) // 7
    assert batches >= 1
    assert main(args) == 0
    figures = json.loads((tmp_path / "epochs" / "train_summary.json").read_text())["figures"]
    assert figures["global_step"] == 2 * batches
    seen = figures["ranks"][0]["rows"]
    assert len(seen) == 2 * 7 * batches and all(seen.count(i) == 2 for i in set(seen))
    assert (tmp_path / "epochs" / f"checkpoint-{2 * batches}").is_dir()


def test_controlnet_model_name_or_path_continues_that_controlnet(demo_manifest, tiny_sd, tmp_path):
    """One Adam step at lr 1e-3 moves no weight of the given ControlNet by more than ~1e-3."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from train.train import main

    start = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # far from from_unet's init: zero convolutions included
        for param in start.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    start.save_pretrained(tmp_path / "start")
    out = tmp_path / "continued"
    assert main(train_args(demo_manifest, tiny_sd, out, "--max_train_steps", "1", "--checkpointing_steps", "10",
                           "--learning_rate", "1e-3", "--controlnet_model_name_or_path",
                           str(tmp_path / "start"))) == 0
    before, after = start.state_dict(), load_controlnet(out / "controlnet").state_dict()
    moved = {k: float((after[k] - before[k]).abs().max()) for k in before}
    assert max(moved.values()) <= 1.05e-3, max(moved.items(), key=lambda kv: kv[1])
    assert sum(m > 0 for m in moved.values()) > len(moved) // 2  # and it trained


def test_validation_image_and_prompt_make_the_grid(demo_manifest, tiny_sd, tmp_path, monkeypatch):
    """Two --validation_image files: 2 rows of [that condition | 2 samples], prompts passed through."""
    import numpy as np
    from PIL import Image, ImageDraw

    from train import validation
    from train.train import main

    paths = []
    for k in range(2):
        im = Image.new("RGB", (64, 64), (20, 20, 20))
        ImageDraw.Draw(im).rectangle((5 + 20 * k, 8, 30 + 20 * k, 50), fill=(255, 255, 255))
        paths.append(tmp_path / f"cond_{k}.png")
        im.save(paths[-1])
    prompts, generate = [], validation.generate

    def recording(base, controlnet, inputs, *args, **kwargs):
        prompts.extend(prompt for _, prompt in inputs)
        return generate(base, controlnet, inputs, *args, **kwargs)

    monkeypatch.setattr(validation, "generate", recording)
    out = tmp_path / "validated"
    assert main(train_args(demo_manifest, tiny_sd, out, "--max_train_steps", "1", "--checkpointing_steps", "10",
                           "--validation_steps", "1", "--num_validation_images", "2", "--validation_image",
                           *map(str, paths), "--validation_prompt", "a white bar")) == 0
    assert prompts == ["a white bar", "a white bar"] * 2  # at step 1, then on the exported model
    grids = sorted((out / "validation").glob("step-*.png"))
    assert [g.name for g in grids] == ["step-000001.png", "step-final.png"]
    sheet = np.asarray(Image.open(grids[0]).convert("RGB")).astype(int)
    assert sheet.shape == (2 * 64, 3 * 64, 3)  # rows: validation images; tiles: condition + 2 samples
    for k, path in enumerate(paths):
        first = sheet[64 * k:64 * (k + 1), :64]
        assert np.abs(first - np.asarray(Image.open(path).convert("RGB")).astype(int)).max() <= 1
        other = np.asarray(Image.open(paths[1 - k]).convert("RGB")).astype(int)
        assert np.abs(first - other).max() > 100


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_proportion_empty_prompts_reaches_the_text_encoder(demo_manifest, tiny_sd, tmp_path, monkeypatch, share):
    """--proportion_empty_prompts 1 encodes only empty captions; 0 encodes each trained row's own caption."""
    from train.data import load_rows
    from train.families.unet import SDAdapter
    from train.train import main, parse_args

    captions, encode = [], SDAdapter.encode_prompts

    def recording(self, base, batch_captions, device):
        captions.extend(batch_captions)
        return encode(self, base, batch_captions, device)

    monkeypatch.setattr(SDAdapter, "encode_prompts", recording)
    args = train_args(demo_manifest, tiny_sd, tmp_path / "run", "--max_train_steps", "3", "--checkpointing_steps",
                      "10", "--proportion_empty_prompts", str(share))
    assert main(args) == 0
    config = parse_args(args)
    rows, _ = load_rows(config.manifest, config.condition, config.num_validation_rows,
                        keep_duplicates=config.keep_duplicates)
    trained = json.loads((tmp_path / "run" / "train_summary.json").read_text())["figures"]["ranks"][0]["rows"]
    own = sorted(rows[i]["caption"] for i in trained)  # the summary lists rows sorted, not in batch order
    assert len(captions) == len(own) == 6 and sum(c != "" for c in own) >= 2
    assert sorted(captions) == ([""] * 6 if share == 1.0 else own)

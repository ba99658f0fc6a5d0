"""The trainer on a tiny Stable Diffusion built from configs and the demo manifest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def train_args(manifest, tiny_sd, out, *extra) -> list[str]:
    return ["--manifest", str(manifest), "--condition", "canny", "--pretrained_model_name_or_path", str(tiny_sd),
            "--output_dir", str(out), "--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-3",
            "--seed", "7", "--report_to", "none", "--validation_steps", "1000", *extra]


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

    def keep(path, resolution):
        captured["base"] = load_base(path, resolution)
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


def test_accelerate_launch_on_two_cpu_processes(demo_manifest, tiny_sd, tmp_path):
    out = tmp_path / "ddp"
    launch(train_args(demo_manifest, tiny_sd, out, "--max_train_steps", "3", "--checkpointing_steps", "10"),
           processes=2)
    ranks = json.loads((out / "train_summary.json").read_text())["figures"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert not set(ranks[0]["rows"]) & set(ranks[1]["rows"]) and ranks[0]["rows"]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]


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


def test_two_stacked_conditions_train_and_export(stacked_manifest, tiny_sd, tmp_path):
    from train.train import main

    out = tmp_path / "stacked"
    args = train_args(stacked_manifest, tiny_sd, out, "--max_train_steps", "2", "--checkpointing_steps", "10")
    args[args.index("canny")] = "canny,invert"
    assert main(args) == 0
    assert load_controlnet(out / "controlnet").config.conditioning_channels == 6


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

    real = loop.controlnet_loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(loop, "controlnet_loss", sometimes_nan)
    config = parse_args(train_args(demo_manifest, tiny_sd, tmp_path / "a", "--max_train_steps", "3",
                                   "--checkpointing_steps", "10"))
    result = loop.train(config, check_conditions(config.manifest, config.condition))
    assert result["figures"]["skipped_steps"] == 1 and result["figures"]["global_step"] == 3

    monkeypatch.setattr(loop, "controlnet_loss", lambda *a, **k: real(*a, **k) * float("inf"))
    config = parse_args(train_args(demo_manifest, tiny_sd, tmp_path / "b", "--max_train_steps", "5",
                                   "--max_nonfinite_steps", "2", "--checkpointing_steps", "10"))
    with pytest.raises(loop.NonFiniteLossError, match="2 steps in a row had a non-finite loss"):
        loop.train(config, check_conditions(config.manifest, config.condition))


def test_ema_run_exports_the_averaged_weights(demo_manifest, tiny_sd, tmp_path):
    from train.train import main

    out = tmp_path / "ema"
    assert main(train_args(demo_manifest, tiny_sd, out, "--max_train_steps", "2", "--checkpointing_steps", "1",
                           "--use_ema", "--checkpoints_total_limit", "1")) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # older pruned after the new one
    assert load_controlnet(out / "controlnet").config.conditioning_channels == 3


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

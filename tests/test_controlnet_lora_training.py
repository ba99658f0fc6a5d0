"""ControlNet-LoRA runs through the trainer (SD 1.x and Flux tiny bases, the demo manifest): checkpoints,
optimiser state and EMA hold only what trains, resume is exact, the exports load in the family pipeline."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train_families import assert_resume_from_checkpoint_is_exact, load_exported, train_args, \
    train_keeping_base

pytestmark = pytest.mark.slow  # trains tiny models in process

PIPELINE = {"sd": "StableDiffusionControlNetPipeline", "flux": "FluxControlNetPipeline"}


@pytest.fixture(scope="module", params=["sd", "flux"])
def lora_run(request, demo_manifest, tmp_path_factory):
    """3 LoRA steps with an EMA (checkpoints at 2 and 3), keeping the base the loop trained beside."""
    family = request.param
    base_dir = request.getfixturevalue(f"tiny_{family}")
    out = tmp_path_factory.mktemp(f"{family}_lora") / "run"
    args = train_args(demo_manifest, base_dir, out, family, "--max_train_steps", "3", "--checkpointing_steps", "2",
                      "--validation_steps", "3", "--num_validation_rows", "2", "--num_validation_images", "1",
                      "--controlnet_lora_rank", "4", "--use_ema")
    return train_keeping_base(family, base_dir, out, args)


def trained_names(run) -> list[str]:
    """The names a LoRA ControlNet of this run trains, in parameter order."""
    from tests.test_controlnet_lora import new_controlnet
    from tests.test_train_families import load_family_base
    from train.controlnet_lora import LoraSettings

    base = load_family_base(run["base_dir"], run["family"])
    controlnet = new_controlnet(base, LoraSettings(4))
    return [n for n, p in controlnet.named_parameters() if p.requires_grad]


def test_a_checkpoint_holds_only_what_trains(lora_run):
    checkpoint = lora_run["out"] / "checkpoint-2"
    names = trained_names(lora_run)
    assert sorted(load_file(str(checkpoint / "model.safetensors"))) == sorted(names)
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=False)
    assert len(optimizer["param_groups"][0]["params"]) == len(names)
    assert len(optimizer["state"]) <= len(names)
    ema = torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=False)  # accelerate's torch.save
    assert len(ema["shadow_params"]) == len(names)


def test_resume_matches_an_uninterrupted_lora_run(lora_run, tmp_path):
    assert_resume_from_checkpoint_is_exact(lora_run, "checkpoint-2", tmp_path)


def test_the_merged_export_loads_in_the_family_pipeline_and_the_lora_files_are_written(lora_run):
    import diffusers

    family, out = lora_run["family"], lora_run["out"]
    controlnet = load_exported(family, out / "controlnet")
    pipe = getattr(diffusers, PIPELINE[family]).from_pretrained(lora_run["base_dir"], controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    condition = {"image" if family == "sd" else "control_image": torch.rand(1, 3, 64, 64)}
    extra = {"max_sequence_length": 16} if family == "flux" else {}
    image = pipe("a red circle", height=64, width=64, num_inference_steps=2, output_type="pil", **condition,
                 **extra).images[0]
    assert image.size == (64, 64)
    assert (out / "controlnet_lora" / "adapter_config.json").is_file()
    assert (out / "controlnet_lora" / "adapter_model.safetensors").is_file()
    assert (out / "control-lora.safetensors").is_file() == (family == "sd")
    exported = lora_run["result"]["exported"]
    assert "adapter" in exported and ("control_lora" in exported) == (family == "sd")


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_gradient_checkpointing_trains_a_lora_controlnet_as_without_it(family, demo_manifest, tmp_path, request,
                                                                      monkeypatch):
    """``--gradient_checkpointing`` recomputes the peft-wrapped ControlNet's activations (its blocks go through
    torch's checkpoint): two steps with it give the weights two steps without it give."""
    import torch.utils.checkpoint

    from train.train import main

    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    base_dir = request.getfixturevalue(f"tiny_{family}")
    exported = {}
    for name, extra in (("plain", []), ("checkpointed", ["--gradient_checkpointing"])):
        out = tmp_path / name
        calls.clear()
        assert main(train_args(demo_manifest, base_dir, out, family, "--max_train_steps", "2",
                               "--controlnet_lora_rank", "4", "--validation_steps", "0", *extra)) == 0
        assert bool(calls) == (name == "checkpointed")
        exported[name] = load_file(str(out / "controlnet" / "diffusion_pytorch_model.safetensors"))
    plain, checkpointed = exported["plain"], exported["checkpointed"]
    assert set(plain) == set(checkpointed)
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)
    zero_start = [k for k in plain if "controlnet_blocks" in k or "controlnet_down_blocks" in k]
    assert zero_start and any(plain[k].abs().sum() > 0 for k in zero_start)  # it trained


def test_two_processes_train_a_lora_controlnet_in_sync(demo_manifest, tiny_sd, tmp_path):
    """DDP over a peft-wrapped ControlNet (its copied weights frozen): both ranks train their own rows, every
    trained parameter is reduced (the ranks end equal) and the merged export loads."""
    from tests.test_train import launch
    from tests.test_train_families_ddp import assert_ranks_in_sync, ddp_args, summary_of

    out = tmp_path / "ddp"
    launch(ddp_args(demo_manifest, tiny_sd, out, "sd", "--controlnet_lora_rank", "4", "--max_train_steps", "2",
                    "--checkpointing_steps", "2"), processes=2)
    assert_ranks_in_sync(out)
    assert summary_of(out)["figures"]["global_step"] == 2
    checkpoint = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    assert checkpoint and all("lora_" in k or "controlnet_" in k or "cond_embedding" in k for k in checkpoint)
    merged = load_exported("sd", out / "controlnet")
    blocks = [v for k, v in merged.state_dict().items() if k.startswith("controlnet_down_blocks")]
    assert blocks and any(v.abs().sum() > 0 for v in blocks)

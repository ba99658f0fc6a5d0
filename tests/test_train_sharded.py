"""Sharded training with the shipped accelerate configs (train/accelerate_configs/), two real gloo ranks on the
CPU: FSDP2 on the tiny Flux and tiny SD (their wrap units differ), DeepSpeed ZeRO-2/3 on the tiny Flux.

accelerate 1.16 sets up FSDP only on GPUs, so the FSDP runs start tests/fsdp_on_cpu.py (train/train.py with
accelerate's FSDP path switched on for CPU processes); a plain CPU launch of the FSDP config is refused."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_train import ACCELERATE, ROOT
from tests.test_train_families import load_exported, train_args
from tests.test_train_families_ddp import assert_export_holds_the_ema

CONFIGS = ROOT / "train" / "accelerate_configs"
TRAIN = ROOT / "train" / "train.py"
FSDP_ON_CPU = ROOT / "tests" / "fsdp_on_cpu.py"
TINY = ["--resolution", "32", "--validation_steps", "0", "--train_batch_size", "1"]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def launch_with(config: str, args: list[str], script: Path = FSDP_ON_CPU, ok: bool = True,
                processes: int = 2) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file <shipped config>`` on ``processes`` CPU ranks, full precision."""
    cmd = [ACCELERATE, "launch", "--config_file", str(CONFIGS / config), "--num_processes", str(processes),
           "--mixed_precision", "no", "--dynamo_backend", "no", str(script), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    if ok:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def summary_of(out: Path) -> dict:
    return json.loads((out / "train_summary.json").read_text())


def assert_same_state(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), k


def fsdp_checkpoint_weights(checkpoint: Path, tmp_path: Path) -> dict:
    """The full ControlNet state a sharded FSDP checkpoint holds, gathered offline from its per-rank files."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint / "pytorch_model_fsdp_0", tmp_path / "gathered.pt")
    state = torch.load(tmp_path / "gathered.pt", weights_only=True)
    return state.get("model", state)


@pytest.mark.slow
def test_fsdp_trains_flux_in_shards_exports_the_gathered_controlnet_and_resumes_exactly(demo_manifest, tiny_flux,
                                                                                        tmp_path):
    """4 steps straight vs 2 + a resume from the sharded checkpoint-2: the same export; the export is the state
    the sharded checkpoint-4 holds, gathered, and loads with FluxControlNetModel; gradient checkpointing on."""
    schedule = [*TINY, "--max_train_steps", "4", "--checkpointing_steps", "2", "--gradient_checkpointing",
                "--lr_scheduler", "linear", "--lr_warmup_steps", "0"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    done = launch_with("fsdp.yaml", train_args(demo_manifest, tiny_flux, straight, "flux", *schedule))
    assert "FluxTransformerBlock, FluxSingleTransformerBlock of the ControlNet is its own shard unit" in done.stderr
    figures = summary_of(straight)["figures"]
    assert figures["global_step"] == 4 and np.isfinite(figures["final_loss"])
    checkpoint = straight / "checkpoint-2"  # sharded: one file per rank for the weights and the AdamW state
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (checkpoint / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]

    exported = load_exported("flux", straight / "controlnet")
    state = exported.state_dict()
    assert_same_state(state, fsdp_checkpoint_weights(straight / "checkpoint-4", tmp_path), atol=0)
    blocks = [v for k, v in state.items() if k.startswith("controlnet_blocks")]
    assert any(v.abs().sum() > 0 for v in blocks)  # the zero-initialised outputs trained

    resumed.mkdir()
    shutil.copytree(checkpoint, resumed / "checkpoint-2")
    launch_with("fsdp.yaml", train_args(demo_manifest, tiny_flux, resumed, "flux", *schedule,
                                        "--resume_from_checkpoint", "latest"))
    assert_same_state(state, load_exported("flux", resumed / "controlnet").state_dict())
    assert summary_of(resumed)["figures"]["lr"] == pytest.approx(figures["lr"])


@pytest.mark.slow
def test_fsdp_trains_the_sd_controlnet_with_its_unet_blocks_as_units(demo_manifest, tiny_sd, tmp_path):
    out = tmp_path / "sd"
    done = launch_with("fsdp.yaml", train_args(demo_manifest, tiny_sd, out, "sd", "--validation_steps", "0",
                                               "--max_train_steps", "2", "--checkpointing_steps", "10"))
    assert "CrossAttnDownBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn of the ControlNet" in done.stderr
    assert np.isfinite(summary_of(out)["figures"]["final_loss"])
    exported = load_exported("sd", out / "controlnet")
    assert any(v.abs().sum() > 0 for k, v in exported.state_dict().items() if k.startswith("controlnet_down_blocks"))


@pytest.mark.slow
def test_a_plain_cpu_launch_of_the_fsdp_config_is_refused_not_run_as_ddp(demo_manifest, tiny_flux, tmp_path):
    done = launch_with("fsdp.yaml", train_args(demo_manifest, tiny_flux, tmp_path / "x", "flux", *TINY),
                       script=TRAIN, ok=False)
    assert done.returncode != 0
    assert "the accelerate config asks for FSDP, but accelerate set up MULTI_CPU" in done.stderr
    assert not (tmp_path / "x" / "controlnet").exists()


def deepspeed_or_skip(done: subprocess.CompletedProcess) -> None:
    """A DeepSpeed run that could not start on this machine: skipped, with DeepSpeed's own message as the reason."""
    errors = [line for line in done.stderr.splitlines() if "Error:" in line and "ChildFailedError" not in line]
    if done.returncode != 0 and "deepspeed" in done.stderr.lower() and errors:
        pytest.skip(f"DeepSpeed cannot run on this machine's CPU: {errors[-1].strip()}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="DeepSpeed is not installed: pip install deepspeed")
def test_deepspeed_zero3_trains_flux_exports_the_gathered_controlnet_and_resumes_exactly(demo_manifest, tiny_flux,
                                                                                         tmp_path):
    """DeepSpeed's own checkpoint layout (partitioned weights and optimiser state per rank); the export is the
    ZeRO-3 gathered weights and equals a straight run's after 2 steps + resume."""
    schedule = [*TINY, "--max_train_steps", "4", "--checkpointing_steps", "2", "--gradient_checkpointing",
                "--lr_scheduler", "linear", "--lr_warmup_steps", "0"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    deepspeed_or_skip(launch_with("deepspeed_zero3.yaml", train_args(demo_manifest, tiny_flux, straight, "flux",
                                                                     *schedule), script=TRAIN, ok=False))
    figures = summary_of(straight)["figures"]
    assert figures["global_step"] == 4 and np.isfinite(figures["final_loss"])
    files = sorted(p.name for p in (straight / "checkpoint-2" / "pytorch_model").iterdir())
    assert [f for f in files if f.endswith("optim_states.pt")] and len([f for f in files if "zero_pp_rank" in f]) >= 2
    state = load_exported("flux", straight / "controlnet").state_dict()
    assert any(v.abs().sum() > 0 for k, v in state.items() if k.startswith("controlnet_blocks"))

    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    launch_with("deepspeed_zero3.yaml", train_args(demo_manifest, tiny_flux, resumed, "flux", *schedule,
                                                   "--resume_from_checkpoint", "latest"), script=TRAIN)
    assert_same_state(state, load_exported("flux", resumed / "controlnet").state_dict())


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="DeepSpeed is not installed: pip install deepspeed")
def test_deepspeed_zero2_keeps_ema_working_and_exports_it(demo_manifest, tiny_flux, tmp_path):
    out = tmp_path / "zero2"
    deepspeed_or_skip(launch_with("deepspeed_zero2.yaml", train_args(
        demo_manifest, tiny_flux, out, "flux", *TINY, "--use_ema", "--max_train_steps", "2",
        "--checkpointing_steps", "2"), script=TRAIN, ok=False))
    assert np.isfinite(summary_of(out)["figures"]["final_loss"])
    optimizer_parts = list((out / "checkpoint-2" / "pytorch_model").glob("*zero_pp_rank_*optim_states.pt"))
    assert len(optimizer_parts) == 2  # DeepSpeed's layout: AdamW state partitioned, one file per rank
    assert_export_holds_the_ema(out, "flux", "checkpoint-2")


# --- what each launch mode refuses, before any model loads (in process, fast) -------------------------------


@pytest.mark.parametrize(("environ", "mode"), [
    ({}, None), ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "fsdp"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, "zero2"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "zero3"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}, "zero2")])
def test_the_launch_mode_is_read_from_what_accelerate_launch_sets(environ, mode):
    from train.sharding import requested_mode

    assert requested_mode(environ) == mode


@pytest.mark.parametrize("mode", ["fsdp", "zero3"])
@pytest.mark.parametrize(("flags", "message"), [
    (["--use_ema", "--validation_steps", "0"], "--use_ema is not supported under"),
    (["--validation_steps", "5"], "pass --validation_steps 0 and score the export with train/evaluate.py"),
    (["--controlnet_lora_rank", "4", "--validation_steps", "0"], "--controlnet_lora_rank is not supported under")])
def test_sharded_weights_refuse_ema_and_validation_sampling(mode, flags, message, tiny_flux, tmp_path):
    from train.sharding import MODES, flag_problem
    from train.train import parse_args

    config = parse_args(train_args(tmp_path, tiny_flux, tmp_path / "out", "flux", *flags))
    problem = flag_problem(config, mode)
    assert problem and message in problem and MODES[mode].name in problem
    assert flag_problem(config, "zero2") is None and flag_problem(config, None) is None  # whole weights: fine


@pytest.mark.parametrize("method", ["controlnet_xs", "channel_concat"])
@pytest.mark.parametrize("mode", ["fsdp", "zero3"])
def test_control_methods_other_than_a_controlnet_are_refused_under_sharded_weights(mode, method):
    """ControlNet-XS (and channel-concat) were never built for sharding: refused in one line, not left to fail
    inside the wrap policy or the gathered export."""
    from types import SimpleNamespace

    from train.sharding import MODES, flag_problem

    config = SimpleNamespace(control_method=method, controlnet_lora_rank=None, use_ema=False, validation_enabled=False)
    problem = flag_problem(config, mode)
    assert problem and f"--control_method {method} is not supported under" in problem and MODES[mode].name in problem
    assert flag_problem(config, "zero2") is None
    assert flag_problem(SimpleNamespace(**{**vars(config), "control_method": "controlnet"}), mode) is None

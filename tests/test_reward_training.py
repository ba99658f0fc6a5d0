"""Reward fine-tuning in the trainer: off is today's training bit for bit, on it trains, logs and resumes exactly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytestmark = pytest.mark.slow  # trains tiny models


def train_args(manifest, base, out, *extra) -> list[str]:
    # --keep_duplicates: the demo's edge cases are near copies by design (see tests/test_train.py)
    return ["--manifest", str(manifest), "--condition", "canny", "--pretrained_model_name_or_path", str(base),
            "--output_dir", str(out), "--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-3",
            "--seed", "7", "--report_to", "none", "--validation_steps", "0", "--keep_duplicates",
            "--max_train_steps", "3", "--checkpointing_steps", "2", *extra]


def exported(out) -> dict[str, torch.Tensor]:
    from diffusers import ControlNetModel

    return ControlNetModel.from_pretrained(out / "controlnet").state_dict()


def figures(out) -> dict:
    return json.loads((out / "train_summary.json").read_text())["figures"]


@pytest.fixture(scope="module")
def runs(demo_manifest, tiny_sd, tmp_path_factory):
    """The same 3 steps without the flag, with --reward_weight 0 and with the reward on (every example scored:
    with 2 examples a step, a lower threshold can leave all 6 unscored)."""
    from train.train import main

    root = tmp_path_factory.mktemp("reward")
    flags = {"absent": [], "zero": ["--reward_weight", "0"],
             "on": ["--reward_weight", "1", "--reward_max_timestep", "999", "--reward_distance", "canny=bce"]}
    for name, extra in flags.items():
        assert main(train_args(demo_manifest, tiny_sd, root / name, *extra)) == 0
    return {"root": root, "args": {name: train_args(demo_manifest, tiny_sd, root / name, *extra)
                                   for name, extra in flags.items()}}


def test_reward_weight_zero_trains_bit_identically_to_no_flag(runs):
    absent, zero = exported(runs["root"] / "absent"), exported(runs["root"] / "zero")
    assert set(absent) == set(zero)
    for k in absent:
        assert torch.equal(absent[k], zero[k]), k
    assert figures(runs["root"] / "absent")["final_loss"] == figures(runs["root"] / "zero")["final_loss"]
    assert "final_reward_loss" not in figures(runs["root"] / "zero")


def test_the_reward_changes_training_and_is_reported_apart_from_the_diffusion_loss(runs):
    absent, on = exported(runs["root"] / "absent"), exported(runs["root"] / "on")
    assert any(not torch.equal(absent[k], on[k]) for k in absent)
    f = figures(runs["root"] / "on")
    assert f["final_reward_loss"] > 0 and f["final_diffusion_loss"] > 0
    assert f["final_loss"] == pytest.approx(f["final_diffusion_loss"] + f["final_reward_loss"])


def test_resume_with_the_reward_on_matches_an_uninterrupted_run(runs, tmp_path):
    from train.train import main

    straight, resumed = runs["root"] / "on", tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    args = [a if a != str(straight) else str(resumed) for a in runs["args"]["on"]]
    assert main(args + ["--resume_from_checkpoint", "latest"]) == 0
    a, b = exported(straight), exported(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_the_reward_is_logged_to_the_trackers(demo_manifest, tiny_sd, tmp_path, monkeypatch):
    from accelerate import Accelerator

    from train.train import main

    logged = []
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, **kw: logged.append(dict(values)))
    assert main(train_args(demo_manifest, tiny_sd, tmp_path / "run", "--max_train_steps", "2",
                           "--reward_weight", "0.5")) == 0
    assert len(logged) == 2
    assert all({"loss", "diffusion_loss", "reward_loss"} <= set(entry) for entry in logged)
    assert all(e["loss"] == pytest.approx(e["diffusion_loss"] + 0.5 * e["reward_loss"]) for e in logged)

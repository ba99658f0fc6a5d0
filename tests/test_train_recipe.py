"""The recipe real users run: mixed precision, accelerate's settings, EMA, resume, held-out rows, flips."""

from __future__ import annotations

import json

import pytest
import torch

from tests.fake_accelerator import FakeAccelerator
from tests.test_train import load_controlnet, train_args


@pytest.fixture
def captured_base(monkeypatch):
    """The base models a run loaded, kept for inspection after it ends."""
    from train import loop
    from train.models import load_base

    captured = {}

    def keep(path, resolution):
        captured["base"] = load_base(path, resolution)
        return captured["base"]

    monkeypatch.setattr(loop, "load_base", keep)
    return captured


@pytest.fixture
def recorded_validations(monkeypatch):
    """Replace sampling with a recorder of the ControlNet weights each validation would sample with."""
    from PIL import Image

    from train import validation

    calls = []

    def record(base, controlnet, inputs, per_input, seed, steps=20, mode=None):
        calls.append({"dtype": next(controlnet.parameters()).dtype,
                      "state": {k: v.detach().float().clone() for k, v in controlnet.state_dict().items()}})
        return [[Image.new("RGB", (8, 8))] * per_input for _ in inputs]

    monkeypatch.setattr(validation, "generate", record)
    return calls


@pytest.mark.slow
def test_bf16_run_validates_in_the_weight_dtype_and_exports(demo_manifest, tiny_sd, tmp_path):
    """bf16 with validation at every step: used to die at the first validation (mixed dtypes)."""
    from train.train import main

    out = tmp_path / "bf16"
    assert main(train_args(demo_manifest, tiny_sd, out, "--mixed_precision", "bf16", "--validation_steps", "1",
                           "--max_train_steps", "2", "--checkpointing_steps", "10",
                           "--num_validation_images", "1")) == 0
    grids = sorted(p.name for p in (out / "validation").glob("step-*.png"))
    assert grids == ["step-000001.png", "step-000002.png", "step-final.png"]
    figures = json.loads((out / "train_summary.json").read_text())["figures"]
    assert figures["mixed_precision"] == "bf16" and figures["skipped_steps"] == 0
    assert load_controlnet(out / "controlnet").dtype == torch.float32  # the trained weights stay fp32


@pytest.mark.slow
def test_accelerate_settings_choose_the_precision(demo_manifest, tiny_sd, tmp_path, monkeypatch, captured_base):
    """No --mixed_precision: accelerate's (here its environment variable) decides; the VAE, whose config
    says force_upcast, stays fp32."""
    from train.train import main

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    out = tmp_path / "env"
    assert main(train_args(demo_manifest, tiny_sd, out, "--max_train_steps", "1", "--checkpointing_steps", "10")) == 0
    base = captured_base["base"]
    assert base.unet.dtype == torch.bfloat16 and base.text_encoders[0].dtype == torch.bfloat16
    assert base.vae.config.force_upcast and base.vae.dtype == torch.float32
    assert json.loads((out / "train_summary.json").read_text())["figures"]["mixed_precision"] == "bf16"


def test_vae_without_force_upcast_runs_in_the_weight_dtype(tiny_sd):
    from train.models import load_base

    base = load_base(str(tiny_sd), 64)
    base.place(torch.device("cpu"), torch.bfloat16)
    assert base.vae.dtype == torch.float32
    base.vae.register_to_config(force_upcast=False)
    base.place(torch.device("cpu"), torch.bfloat16)
    assert base.vae.dtype == torch.bfloat16 and base.unet.dtype == torch.bfloat16


@pytest.mark.slow
def test_cached_latents_under_bf16_encode_with_the_fp32_vae(demo_manifest, tiny_sd, tmp_path):
    from train.train import main

    assert main(train_args(demo_manifest, tiny_sd, tmp_path / "c", "--mixed_precision", "bf16", "--cache_latents",
                           "--center_crop", "--max_train_steps", "2", "--checkpointing_steps", "10")) == 0


@pytest.mark.slow
def test_ema_weights_are_what_is_validated_and_what_ships(demo_manifest, tiny_sd, tmp_path, recorded_validations):
    from train.train import main

    out = tmp_path / "ema"
    assert main(train_args(demo_manifest, tiny_sd, out, "--use_ema", "--max_train_steps", "2",
                           "--validation_steps", "2", "--checkpointing_steps", "10")) == 0
    shipped = load_controlnet(out / "controlnet").state_dict()
    assert len(recorded_validations) == 2  # at step 2, then the final model
    for call in recorded_validations:
        for key, value in shipped.items():
            assert torch.equal(call["state"][key], value), key
    raw = torch.load(out / "checkpoint-2" / "pytorch_model.bin", map_location="cpu") if (
        out / "checkpoint-2" / "pytorch_model.bin").exists() else None
    if raw is None:
        from safetensors.torch import load_file

        raw = load_file(out / "checkpoint-2" / "model.safetensors")
    assert any(not torch.equal(raw[k], shipped[k]) for k in shipped)  # EMA differs from the raw weights


@pytest.mark.slow
def test_resume_moves_the_ema_weights_to_the_training_device(demo_manifest, tiny_sd, tmp_path, monkeypatch):
    """Shadow weights load on the CPU; a GPU run must move them before its first step."""
    from diffusers.training_utils import EMAModel

    from train.train import main

    out = tmp_path / "ema"
    args = ["--use_ema", "--max_train_steps", "2", "--checkpointing_steps", "1"]
    assert main(train_args(demo_manifest, tiny_sd, out, *args)) == 0
    events = []
    real_load, real_to = EMAModel.load_state_dict, EMAModel.to
    monkeypatch.setattr(EMAModel, "load_state_dict", lambda self, *a, **k: (events.append("load"),
                                                                            real_load(self, *a, **k))[1])
    monkeypatch.setattr(EMAModel, "to", lambda self, *a, **k: (events.append("to"), real_to(self, *a, **k))[1])
    (out / "checkpoint-2").rename(out / "old-2")  # resume from step 1, one step left
    assert main(train_args(demo_manifest, tiny_sd, out, *args, "--resume_from_checkpoint", "latest")) == 0
    assert "load" in events and "to" in events[events.index("load"):]


@pytest.mark.slow
def test_resuming_a_finished_run_changes_nothing(demo_manifest, tiny_sd, tmp_path, caplog):
    from train.train import main

    out = tmp_path / "done"
    args = ["--max_train_steps", "2", "--checkpointing_steps", "2"]
    assert main(train_args(demo_manifest, tiny_sd, out, *args)) == 0
    exported = {p.name: p.stat().st_mtime_ns for p in (out / "controlnet").iterdir()}
    single = (out / "controlnet.safetensors").read_bytes()
    with caplog.at_level("INFO"):
        assert main(train_args(demo_manifest, tiny_sd, out, *args, "--resume_from_checkpoint", "latest")) == 0
    assert "nothing left to train" in caplog.text
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "controlnet").iterdir()} == exported
    assert (out / "controlnet.safetensors").read_bytes() == single


@pytest.mark.parametrize(
    ("extra", "held"),
    [([], 4), (["--num_validation_rows", "2"], 2), (["--validation_steps", "0"], 0),
     (["--validation_image", "x.png", "--validation_prompt", "a circle"], 0)],
)
def test_rows_are_held_out_only_for_validation_that_uses_them(demo_manifest, tiny_sd, extra, held):
    from train.validation import holdout_count
    from train.train import parse_args

    assert holdout_count(parse_args(train_args(demo_manifest, tiny_sd, "out", *extra))) == held


@pytest.mark.slow
def test_validation_images_leave_every_row_to_training(demo_manifest, tiny_sd, tmp_path, monkeypatch,
                                                       recorded_validations):
    from PIL import Image

    from train import loop
    from train.train import main

    sizes = []
    real = loop.load_rows
    monkeypatch.setattr(loop, "load_rows", lambda *a: (lambda r: (sizes.append((len(r[0]), len(r[1]))), r)[1])(real(*a)))
    Image.new("RGB", (64, 64)).save(tmp_path / "cond.png")
    assert main(train_args(demo_manifest, tiny_sd, tmp_path / "v", "--max_train_steps", "1", "--checkpointing_steps",
                           "10", "--validation_image", str(tmp_path / "cond.png"), "--validation_prompt", "x")) == 0
    assert sizes == [(18, 0)]


def test_flips_are_off_by_default_and_refused_for_handed_conditions(demo_manifest, tiny_sd, capsys):
    from train.train import parse_args

    assert parse_args(train_args(demo_manifest, tiny_sd, "out")).random_flip is False
    assert parse_args(train_args(demo_manifest, tiny_sd, "out", "--random_flip")).random_flip is True
    for condition in ("openpose", "mediapipe_pose", "mediapipe_face"):
        args = train_args(demo_manifest, tiny_sd, "out", "--random_flip")
        args[args.index("canny")] = condition
        with pytest.raises(SystemExit):
            parse_args(args)
        assert "teaches the wrong side" in capsys.readouterr().err


def test_cached_latents_draw_from_the_step_generator_on_any_device(monkeypatch):
    """The sample must come from the step's seeded generator whatever the device (it was None off the CPU)."""
    from types import SimpleNamespace

    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from train.cache import EncodedCache

    seen = []
    real = DiagonalGaussianDistribution.sample
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample",
                        lambda self, generator=None: (seen.append(generator), real(self, generator))[1])
    cache = EncodedCache.__new__(EncodedCache)
    from train.families.unet import SDAdapter

    cache.base = SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(scaling_factor=0.5)), family=SDAdapter(64))
    cache.moments = torch.randn(3, 8, 4, 4)
    cache.device = torch.device("meta")  # stands in for a GPU: anything but the CPU
    generator = torch.Generator().manual_seed(3)
    latents = cache.latents([0, 2], generator)
    assert seen == [generator] and latents.shape == (2, 4, 4, 4) and latents.device.type == "meta"
    cache.device = torch.device("cpu")
    a = cache.latents([0, 2], torch.Generator().manual_seed(3))
    b = cache.latents([0, 2], torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_pruning_after_resuming_an_older_checkpoint_keeps_the_new_one(tmp_path):
    """An abandoned run left checkpoints 10 and 12; resumed from 4, the run's checkpoint 6 is the newest."""
    import time

    from train import checkpoints

    accelerator = FakeAccelerator()
    for step in (4, 10, 12):
        checkpoints.save(accelerator, str(tmp_path), step, None)
        time.sleep(0.01)
    new = checkpoints.save(accelerator, str(tmp_path), 6, 2)
    assert new.is_dir()
    assert sorted(p.name for p in checkpoints.complete_checkpoints(str(tmp_path))) == ["checkpoint-12", "checkpoint-6"]
    assert checkpoints.resolve(str(tmp_path), "latest") == new
    time.sleep(0.01)
    checkpoints.save(accelerator, str(tmp_path), 8, 2)
    assert [p.name for p in checkpoints.complete_checkpoints(str(tmp_path))] == ["checkpoint-6", "checkpoint-8"]


def test_every_flag_is_a_documented_config_field():
    """Flags are defined once: one per TrainConfig field, with the field's docstring as help."""
    import dataclasses

    from train.config import TrainConfig
    from train.train import build_parser

    actions = {a.dest: a for a in build_parser()._actions if a.dest != "help"}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert fields <= set(actions) and set(actions) - fields == {"no_random_flip"}
    undocumented = [name for name, action in actions.items() if len((action.help or "").split()) < 3]
    assert not undocumented


def test_parsed_defaults_are_the_config_defaults(demo_manifest, tiny_sd):
    import dataclasses

    from train.config import TrainConfig
    from train.train import parse_args

    parsed = parse_args(["--manifest", "m", "--condition", "canny, depth", "--pretrained_model_name_or_path", "sd"])
    assert parsed == TrainConfig(manifest="m", condition=("canny", "depth"), pretrained_model_name_or_path="sd")
    given = parse_args(["--manifest", "m", "--condition", "canny", "--pretrained_model_name_or_path", "sd",
                        "--validation_image", "a.png", "b.png", "--validation_prompt", "a, b", "--use_ema",
                        "--max_train_steps", "7", "--learning_rate", "1e-4", "--mixed_precision", "bf16"])
    assert given.validation_image == ("a.png", "b.png") and given.validation_prompt == ("a, b",)
    assert (given.use_ema, given.max_train_steps, given.learning_rate, given.mixed_precision) == (True, 7, 1e-4, "bf16")
    assert dataclasses.asdict(given)["condition"] == ("canny",)


def test_start_up_names_the_choices_that_differ_from_diffusers(demo_manifest, tiny_sd):
    from train.config import differences_from_diffusers
    from train.train import parse_args

    lines = differences_from_diffusers(parse_args(train_args(demo_manifest, tiny_sd, "out")))
    assert any(line.startswith("--proportion_empty_prompts 0.5 (diffusers' train_controlnet.py: 0.0)") for line in lines)
    assert any(line.startswith("--center_crop False") for line in lines)
    same = parse_args(train_args(demo_manifest, tiny_sd, "out", "--proportion_empty_prompts", "0", "--center_crop"))
    assert not any("proportion_empty_prompts" in line or "center_crop" in line
                   for line in differences_from_diffusers(same))


@pytest.mark.slow
@pytest.mark.parametrize("factor", [1, 2, 4])
def test_condition_encoder_follows_the_vae_down_sampling(demo_manifest, tmp_path, factor):
    """A base whose VAE down-samples by 1, 2 or 4 (not SD's 8) trains and exports; the condition
    encoder reaches latent resolution."""
    from diffusers import ControlNetModel

    from tests.tiny_sd import write_tiny_sd
    from train.train import main

    sd = write_tiny_sd(tmp_path / "sd", vae_factor=factor)
    out = tmp_path / "run"
    args = train_args(demo_manifest, sd, out, "--max_train_steps", "1", "--checkpointing_steps", "10")
    args[args.index("--resolution") + 1] = "32"
    assert main(args) == 0
    controlnet = ControlNetModel.from_pretrained(out / "controlnet")
    assert len(controlnet.config.conditioning_embedding_out_channels) == factor.bit_length()
    with torch.no_grad():
        embedded = controlnet.controlnet_cond_embedding(torch.rand(1, 3, 32, 32))
    assert embedded.shape[-1] == 32 // factor


@pytest.mark.slow
def test_sdxl_sees_each_images_original_size_and_crop(demo_manifest, tmp_path, monkeypatch):
    """SDXL was trained with (original size, crop top-left, target size) per image: pass the real ones."""
    from diffusers import ControlNetModel

    from tests.tiny_sd import write_tiny_sdxl
    from train.data import load_rows
    from train.train import main

    seen = []
    real = ControlNetModel.forward

    def record(self, *args, added_cond_kwargs=None, **kwargs):
        seen.append(added_cond_kwargs["time_ids"].detach().clone())
        return real(self, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    monkeypatch.setattr(ControlNetModel, "forward", record)
    indices = []
    from train import data

    real_collate = data.collate
    monkeypatch.setattr("train.loop.collate", lambda ex: (indices.append([e["index"] for e in ex]), real_collate(ex))[1])
    sdxl = write_tiny_sdxl(tmp_path / "sdxl")
    # no validation: every row trains (as load_rows below reads them) and every forward is a training step
    assert main(train_args(demo_manifest, sdxl, tmp_path / "run", "--max_train_steps", "3", "--center_crop",
                           "--checkpointing_steps", "10", "--validation_steps", "0")) == 0
    rows, _ = load_rows(str(demo_manifest), ["canny"], 0, keep_duplicates=True)  # train_args keeps them
    for time_ids, batch in zip(seen, indices):
        for ids, index in zip(time_ids.tolist(), batch):
            row = rows[index]
            width, height = data.decode_rgb(row["cond_canny"]).size
            scale = 64 / min(width, height)
            top, left = (round(height * scale) - 64) // 2, (round(width * scale) - 64) // 2
            assert ids == [row["orig_height"], row["orig_width"], top, left, 64, 64]
    assert len(seen) == 3 and any(ids[0] != ids[1] for t in seen for ids in t.tolist())  # not all square


@pytest.mark.slow
def test_validation_logs_controllability_metrics(demo_manifest, tiny_sd, tmp_path):
    """Each validation scores its samples (Canny edge F1 against the condition) into metrics.jsonl
    and TensorBoard, so convergence shows as a curve."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from train.train import main

    out = tmp_path / "scored"
    assert main(train_args(demo_manifest, tiny_sd, out, "--max_train_steps", "2", "--validation_steps", "1",
                           "--checkpointing_steps", "10", "--num_validation_images", "1",
                           "--report_to", "tensorboard")) == 0
    lines = [json.loads(line) for line in (out / "validation" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, "final"]
    assert all(0.0 <= line["edge_f1"] <= 1.0 for line in lines)
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    assert [e.step for e in events.Scalars("validation/edge_f1")][:2] == [1, 2]

"""Validation and evaluation of ControlNets trained on conditions stacked as channels (``--condition
canny,invert`` without ``--union``): samples made once per validation from the whole 6-channel stack, a
grid showing every map, and the samples scored against each condition on its own."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_train_families import train_args
from tests.test_train_union_validation import assert_canny_scored_and_invert_unscored

VALIDATE_EVERY_STEP = ["--max_train_steps", "1", "--validation_steps", "1", "--num_validation_rows", "1",
                       "--num_validation_images", "1", "--checkpointing_steps", "10"]
PIPELINE = {"sd": "StableDiffusionControlNetPipeline", "sdxl": "StableDiffusionXLControlNetPipeline"}


# --- without models ------------------------------------------------------------------------------


def config_for(manifest, base, *extra, condition="canny,invert"):
    from train.train import parse_args

    return parse_args(train_args(manifest, base, "out", "sd", *extra, condition=condition))


def test_stacked_runs_validate_and_hold_rows_out(stacked_manifest, tiny_sd, tiny_sdxl):
    from train.validation import holdout_count, validation_groups, validation_views

    config = config_for(stacked_manifest, tiny_sd, "--num_validation_rows", "3")
    assert holdout_count(config) == 3  # every run the config accepts validates, stacked ones too
    views = validation_views(config)
    assert [(v.condition, v.mode, v.slot) for v in views] == [("canny", None, 0), ("invert", None, 1)]
    assert [v.key("edge_f1") for v in views] == ["canny/edge_f1", "invert/edge_f1"]
    assert {v.suffix for v in views} == {""}  # one grid for the whole stack
    assert validation_groups(config) == [views]  # sampled once for both conditions
    union = config_for(stacked_manifest, tiny_sdxl, "--union")
    assert validation_groups(union) == [[v] for v in validation_views(union)]


def test_view_inputs_give_each_condition_its_own_channels():
    from train.validation import ValidationView, sampled_inputs, view_inputs

    stack = torch.arange(6.0).view(1, 6, 1, 1).expand(1, 6, 4, 4)
    inputs = [(stack, "a prompt")]
    for slot in (0, 1):
        (own, prompt), = view_inputs(inputs, ValidationView("c", None, slot), False)
        assert prompt == "a prompt" and torch.equal(own, stack[:, 3 * slot:3 * slot + 3])
        assert sampled_inputs(inputs, ValidationView("c", None, slot), False) is inputs  # the whole stack
        # given --validation_image maps are stacked too: each condition is scored on its own channels
        (own, _), = view_inputs(inputs, ValidationView("c", None, slot), True)
        assert torch.equal(own, stack[:, 3 * slot:3 * slot + 3])


def test_grid_shows_every_stacked_map(tmp_path):
    from train.grids import validation_grid

    canny, invert = np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 200, np.uint8)
    stack = torch.from_numpy(np.concatenate([canny, invert], axis=2)).permute(2, 0, 1)[None].float() / 255
    sample = Image.new("RGB", (8, 8), (10, 20, 30))
    sheet = np.asarray(Image.open(validation_grid([(stack, "p")] * 2, [[sample, sample]] * 2, tmp_path / "g.png")))
    assert sheet.shape == (16, 4 * 8, 3)  # two rows of canny | invert | 2 samples
    assert (sheet[:, :8] == 0).all() and (sheet[:, 8:16] == 200).all() and (sheet[:, 16:] == (10, 20, 30)).all()


def test_validation_image_takes_one_map_per_condition(stacked_manifest, tiny_sd, tiny_sdxl, tmp_path, capsys):
    """A stacked run's --validation_image entries are comma-separated maps in --condition order; one file
    alone is refused when the flags are read (before any model loads), saying what to give."""
    from train.validation import holdout_count, validation_inputs

    prompt = ("--validation_prompt", "x")
    with pytest.raises(SystemExit):
        config_for(stacked_manifest, tiny_sd, "--validation_image", "a.png", *prompt)
    assert "one map per condition" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        config_for(stacked_manifest, tiny_sd, "--validation_image", "a.png,b.png,c.png", *prompt)
    err = capsys.readouterr().err
    assert "--validation_image canny.png,invert.png" in err and "got 3" in err
    config = config_for(stacked_manifest, tiny_sd, "--validation_image", "a.png,b.png", *prompt)
    assert holdout_count(config) == 0
    # a single-condition or union run still takes one file per sample
    assert holdout_count(config_for(stacked_manifest, tiny_sd, "--validation_image", "a.png", *prompt,
                                        condition="canny")) == 0
    assert holdout_count(config_for(stacked_manifest, tiny_sdxl, "--union", "--validation_image", "a.png", *prompt)) == 0

    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / "b.png")
    (cond, prompt), = validation_inputs((), ("canny", "invert"), (f"{tmp_path / 'a.png'},{tmp_path / 'b.png'}",),
                                        ("x",), 8, stacked=True)
    assert prompt == "x" and cond.shape == (1, 6, 8, 8)
    assert cond[0, :, 0, 0].tolist() == [1, 0, 0, 0, 0, 1]


# --- training runs -------------------------------------------------------------------------------


@pytest.fixture
def stacked_spy(monkeypatch):
    """Records each validation pipeline call's control image and the condition the ControlNet's forward
    received inside it; and the (train, held-out) rows the loop loaded."""
    import diffusers

    from train import loop

    seen: dict = {"calls": [], "rows": []}
    real_load_rows = loop.load_rows

    def load_rows(*args, **kwargs):
        rows = real_load_rows(*args, **kwargs)
        seen["rows"].append(rows)
        return rows

    monkeypatch.setattr(loop, "load_rows", load_rows)
    real_forward = diffusers.ControlNetModel.forward

    def forward(self, *args, **kwargs):
        calls = seen["calls"]
        if calls and "done" not in calls[-1]:
            calls[-1]["forwards"].append(tuple(kwargs["controlnet_cond"].shape))
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(diffusers.ControlNetModel, "forward", forward)

    def spy_on(family: str) -> dict:
        pipeline = getattr(diffusers, PIPELINE[family])
        real_call = pipeline.__call__

        def call(self, *args, **kwargs):
            seen["calls"].append({"image": kwargs["image"].detach().cpu().float().clone(), "forwards": []})
            try:
                return real_call(self, *args, **kwargs)
            finally:
                seen["calls"][-1]["done"] = True

        monkeypatch.setattr(pipeline, "__call__", call)
        return seen

    return spy_on


def check_stacked_validation(out, seen: dict) -> None:
    """Grids of [canny | invert | sample], canny scored under ``canny/``, invert unscored; one pipeline call
    per held-out row and validation, given the row's whole stack, which the ControlNet saw every step."""
    from train.validation import validation_inputs

    (train_rows, held), = seen["rows"]
    assert len(held) == 1 and held[0]["id"] not in {r["id"] for r in train_rows}  # held out of training
    stacked = validation_inputs(held, ("canny", "invert"), (), (), 64)[0][0]
    assert stacked.shape == (1, 6, 64, 64)

    grids = sorted(p.name for p in (out / "validation").glob("*.png"))
    assert grids == ["step-000001.png", "step-final.png"]
    for name in grids:
        sheet = np.asarray(Image.open(out / "validation" / name).convert("RGB"))
        assert sheet.shape == (64, 3 * 64, 3)  # canny | invert | one sample
        for slot in (0, 1):
            tile = sheet[:, 64 * slot:64 * (slot + 1)].astype(np.float32) / 255
            expected = stacked[0, 3 * slot:3 * slot + 3].permute(1, 2, 0).numpy()
            assert np.abs(tile - expected).max() <= 1 / 255 + 1e-6, (name, slot)

    assert_canny_scored_and_invert_unscored(out)

    # generated once per validation (2 validations x 1 held-out row), from the whole stack
    assert len(seen["calls"]) == 2
    for call in seen["calls"]:
        assert call["image"].shape[1] == 6
        assert torch.allclose(call["image"][:1], stacked, atol=1e-6)
        assert call["forwards"] and all(shape[1] == 6 for shape in call["forwards"])


@pytest.mark.slow
def test_stacked_sd_run_validates_once_and_scores_each_condition(stacked_manifest, tiny_sd, tmp_path, stacked_spy):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from train.train import main

    seen = stacked_spy("sd")
    out = tmp_path / "stacked"
    assert main(train_args(stacked_manifest, tiny_sd, out, "sd", *VALIDATE_EVERY_STEP, "--report_to", "tensorboard",
                           condition="canny,invert")) == 0
    check_stacked_validation(out, seen)
    # the channel order, recorded for train/evaluate.py to check
    assert json.loads((out / "train_summary.json").read_text())["conditions"] == ["canny", "invert"]
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    assert [e.step for e in events.Scalars("validation/canny/edge_f1")] == [1]
    assert "validation" in events.Tags()["images"]


@pytest.mark.slow
def test_stacked_sdxl_run_validates_once_and_scores_each_condition(stacked_manifest, tiny_sdxl, tmp_path,
                                                                  stacked_spy):
    from train.train import main

    seen = stacked_spy("sdxl")
    out = tmp_path / "stacked_xl"
    assert main(train_args(stacked_manifest, tiny_sdxl, out, "sdxl", *VALIDATE_EVERY_STEP, "--use_ema",
                           condition="canny,invert")) == 0
    check_stacked_validation(out, seen)


@pytest.mark.slow
def test_stacked_run_with_validation_images(stacked_manifest, tiny_sd, tmp_path, stacked_spy):
    """Each --validation_image entry gives the maps of one sample, stacked in --condition order; no rows
    are held out, and the grid shows the given maps."""
    from train.train import main

    Image.new("RGB", (64, 64), (255, 255, 255)).save(tmp_path / "white.png")
    Image.new("RGB", (64, 64), (0, 0, 0)).save(tmp_path / "black.png")
    seen = stacked_spy("sd")
    out = tmp_path / "given"
    assert main(train_args(stacked_manifest, tiny_sd, out, "sd", "--max_train_steps", "1", "--validation_steps", "5",
                           "--num_validation_images", "1", "--validation_prompt", "a scene", "--validation_image",
                           f"{tmp_path / 'white.png'},{tmp_path / 'black.png'}", condition="canny,invert")) == 0
    (train_rows, held), = seen["rows"]
    assert len(held) == 0
    (call,) = seen["calls"]  # the final validation only
    assert call["image"].shape[1] == 6
    assert call["image"][0, :3].eq(1).all() and call["image"][0, 3:].eq(0).all()
    sheet = np.asarray(Image.open(out / "validation" / "step-final.png").convert("RGB"))
    assert sheet.shape == (64, 3 * 64, 3) and (sheet[:, :64] == 255).all() and (sheet[:, 64:128] == 0).all()
    records = [json.loads(line) for line in (out / "validation" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["condition"]) for r in records] == [("final", "canny"), ("final", "invert")]
    assert "canny/edge_f1" in records[0]


def test_missing_validation_image_is_refused_before_training(stacked_manifest, tiny_sd, tmp_path, capsys):
    """A map missing from a comma list is named when the run starts (exit 2, nothing written), not by a
    traceback at the first validation; a single-condition entry is one path, commas and all."""
    from train.train import main, missing_validation_images, parse_args

    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    args = train_args(stacked_manifest, tiny_sd, tmp_path / "x", "sd", "--validation_prompt", "x",
                      "--validation_image", f"{tmp_path / 'a.png'},{tmp_path / 'gone.png'}", condition="canny,invert")
    assert main(args) == 2 and not (tmp_path / "x").exists()
    assert f"no such file: {tmp_path / 'gone.png'}" in capsys.readouterr().err
    Image.new("RGB", (64, 64)).save(tmp_path / "my,file.png")
    single = parse_args(train_args(stacked_manifest, tiny_sd, "out", "sd", "--validation_prompt", "x",
                                   "--validation_image", str(tmp_path / "my,file.png"), condition="canny"))
    assert missing_validation_images(single) == []
    assert missing_validation_images(parse_args(train_args(
        stacked_manifest, tiny_sd, "out", "sd", "--validation_prompt", "x", "--validation_image",
        str(tmp_path / "a.png"), condition="canny"))) == []


def test_stacked_validation_image_of_one_file_is_refused(stacked_manifest, tiny_sd, tmp_path, capsys):
    from train.train import main

    with pytest.raises(SystemExit) as exit_:  # argparse's error: usage, the message, exit 2
        main(train_args(stacked_manifest, tiny_sd, tmp_path / "x", "sd", "--validation_image", "a.png",
                        "--validation_prompt", "x", condition="canny,invert"))
    assert exit_.value.code == 2 and not (tmp_path / "x").exists()
    assert "one map per condition" in capsys.readouterr().err


# --- train/evaluate.py ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stacked_controlnet(tiny_sd, tmp_path_factory):
    """A 6-channel ControlNet (canny, invert) with randomised zero convolutions, as train.py exports it."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    root = tmp_path_factory.mktemp("stacked_controlnet")
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(unet, conditioning_channels=6)
    with torch.no_grad():
        for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            block.weight.normal_(0, 0.5)
    controlnet.save_pretrained(root / "controlnet")
    return root


def evaluate_argv(controlnet, sd, manifest, out, condition="canny,invert", *extra):
    return ["--controlnet", str(controlnet), "--pretrained_model_name_or_path", str(sd), "--manifest", str(manifest),
            "--condition", condition, "--output_dir", str(out), "--num_inference_steps", "2", "--num_samples", "2",
            "--keep_duplicates", *extra]


@pytest.mark.slow
def test_evaluate_scores_a_stacked_controlnet_per_condition(stacked_controlnet, tiny_sd, stacked_manifest, tmp_path,
                                                            monkeypatch):
    import diffusers

    from train import evaluate

    given = []
    real_forward = diffusers.ControlNetModel.forward

    def forward(self, *args, **kwargs):
        given.append(tuple(kwargs["controlnet_cond"].shape))
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(diffusers.ControlNetModel, "forward", forward)
    out = tmp_path / "eval"
    assert evaluate.main(evaluate_argv(stacked_controlnet, tiny_sd, stacked_manifest, out)) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["condition"] == "canny,invert" and result["conditions"] == ["canny", "invert"]
    assert set(result["controlnet"]) == set(result["base"]) == {"canny/edge_f1"}
    assert "no controllability metric" in result["unscored"]["invert"]
    assert all(set(s["controlnet"]) == {"canny/edge_f1"} for s in result["samples"]) and len(result["samples"]) == 2
    assert given and all(shape[1] == 6 for shape in given)
    first = evaluate.load_rows(str(stacked_manifest), ["canny"], 1, keep_duplicates=True)[0]["cond_canny"]
    height, width = evaluate.prepare_condition(first, None, False).shape[:2]
    sheet = np.asarray(Image.open(out / "grid.png").convert("RGB"))
    # canny | invert | with ControlNet | base alone per sample, each in a square cell of at least 128 px
    from train import grids

    where = grids.layout(2, 4, max(128, height, width), columns=4)
    assert sheet.shape == (where.size[1], where.size[0], 3) and where.per_sample == 4
    # the maps are stacked in --condition order
    canny, invert = np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 9, np.uint8)
    assert evaluate.stack_maps([canny, invert], [False, False])[0, 0].tolist() == [0, 0, 0, 9, 9, 9]
    # named the other way round (an untracked ControlNet, so allowed), canny is still scored against its own
    # maps: the base alone draws the same images either way, so its score cannot change
    # (at --resolution, which scores against the stored maps rather than the ones the model was given)
    bases = []
    for order in ("canny,invert", "invert,canny"):
        assert evaluate.main(evaluate_argv(stacked_controlnet, tiny_sd, stacked_manifest, tmp_path / order, order,
                                           "--resolution", "32")) == 0
        bases.append(json.loads((tmp_path / order / "metrics.json").read_text())["base"])
    assert bases[0] == bases[1] and set(bases[0]) == {"canny/edge_f1"}


def test_evaluate_refuses_a_stacked_controlnet_given_one_condition(stacked_controlnet, tiny_sd, stacked_manifest,
                                                                   tmp_path, capsys):
    from train import evaluate

    assert evaluate.main(evaluate_argv(stacked_controlnet, tiny_sd, stacked_manifest, tmp_path / "e", "canny")) == 2
    err = capsys.readouterr().err
    assert "6 condition channels (2 conditions stacked as channels)" in err and "training order" in err
    assert evaluate.main(evaluate_argv(stacked_controlnet, tiny_sd, stacked_manifest, tmp_path / "e", "invert")) == 2
    with pytest.raises(SystemExit):
        evaluate.main(evaluate_argv(stacked_controlnet, tiny_sd, stacked_manifest, tmp_path / "e", "canny,canny"))


def test_evaluate_refuses_conditions_in_another_order_than_trained(stacked_controlnet, tiny_sd, stacked_manifest,
                                                                  tmp_path, capsys):
    """Both orders give 6 channels; train_summary.json (written next to controlnet/) tells which is right."""
    import shutil

    from train import evaluate

    run = tmp_path / "run"
    shutil.copytree(stacked_controlnet, run)
    (run / "train_summary.json").write_text(json.dumps({"figures": {}, "conditions": ["canny", "invert"]}))
    for controlnet in (run, run / "controlnet"):
        assert evaluate.main(evaluate_argv(controlnet, tiny_sd, stacked_manifest, tmp_path / "e", "invert,canny")) == 2
        err = capsys.readouterr().err
        assert "trained on --condition canny,invert" in err and "same order" in err
    assert not (tmp_path / "e").exists()
    assert evaluate.check(evaluate.parse_args(evaluate_argv(run, tiny_sd, stacked_manifest, tmp_path / "e")))


def test_evaluate_refuses_a_union_controlnet(stacked_controlnet, tiny_sd, stacked_manifest, tmp_path, capsys):
    """A union ControlNet takes 3 channels too: it must not be loaded as a plain ControlNetModel and scored."""
    import shutil

    from train import evaluate

    run = tmp_path / "union"
    shutil.copytree(stacked_controlnet, run)
    config = json.loads((run / "controlnet" / "config.json").read_text())
    (run / "controlnet" / "config.json").write_text(json.dumps(
        {**config, "_class_name": "ControlNetUnionModel", "conditioning_channels": 3}))
    for condition in ("canny", "canny,invert"):
        assert evaluate.main(evaluate_argv(run, tiny_sd, stacked_manifest, tmp_path / "e", condition)) == 2
        assert "ControlNetUnionModel" in capsys.readouterr().err


def test_each_stacked_condition_is_scored_against_its_own_maps(tmp_path):
    """validate_views samples once and hands each view its own channels and its own stored maps (with the
    scored condition second, so taking the first condition's would show)."""
    import io

    from train.config import TrainConfig
    from train.validation import validate_views, validation_groups

    def png(value: int) -> dict:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (value,) * 3).save(buffer, "PNG")
        return {"bytes": buffer.getvalue()}

    config = TrainConfig(manifest="m", condition=("invert", "canny"), pretrained_model_name_or_path="sd",
                         output_dir=str(tmp_path), num_validation_images=1)
    held_out = [{"cond_invert": png(10), "cond_canny": png(200)}]
    stack = torch.cat([torch.full((1, 3, 8, 8), 0.25), torch.full((1, 3, 8, 8), 0.75)], dim=1)
    calls, scored = [], []

    def sample(inputs, per_input, seed, mode):
        calls.append(inputs[0][0].shape)
        return [[Image.new("RGB", (8, 8))] for _ in inputs]

    def scorer(inputs, samples, label, step, trackers, maps, view):
        scored.append((view.condition, float(inputs[0][0].mean()), int(maps[0][0, 0, 0])))

    run = types.SimpleNamespace(config=config, held_out=held_out, seed=0, scorer=scorer)
    (views,) = validation_groups(config)
    validate_views(run, views, sample, [(stack, "p")], "000001", (), 1)
    assert calls == [(1, 6, 8, 8)]
    assert scored == [("invert", 0.25, 10), ("canny", 0.75, 200)]

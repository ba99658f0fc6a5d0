"""Validation of SDXL and of union ControlNets: one grid and one metrics record per condition, each
sampled with that condition alone (tiny models from configs)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_train_families import train_args

UNION_PIPELINE = {"sdxl": "StableDiffusionXLControlNetUnionPipeline", "flux": "FluxControlNetPipeline"}
UNION_CONTROLNET = {"sdxl": "ControlNetUnionModel", "flux": "FluxControlNetModel"}
VALIDATE_EVERY_STEP = ["--max_train_steps", "1", "--validation_steps", "1", "--num_validation_rows", "1",
                       "--num_validation_images", "1", "--checkpointing_steps", "10"]


def assert_canny_scored_and_invert_unscored(out) -> None:
    """metrics.jsonl of a canny,invert run validated at step 1 and at the end: one record per condition, canny
    scored under its own key, invert (no metric) named unscored with the reason."""
    records = [json.loads(line) for line in (out / "validation" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["condition"]) for r in records] == [(1, "canny"), (1, "invert"), ("final", "canny"),
                                                             ("final", "invert")]
    for r in records[0::2]:
        assert set(r) == {"step", "condition", "canny/edge_f1"} and 0.0 <= r["canny/edge_f1"] <= 1.0
    for r in records[1::2]:
        assert set(r) == {"step", "condition", "unscored"} and "no controllability metric" in r["unscored"]


def test_sdxl_validates_in_place_and_writes_its_grid_and_scores(demo_manifest, tiny_sdxl, tmp_path, monkeypatch):
    """SDXL single-condition: StableDiffusionXLControlNetPipeline over the in-memory modules, with the
    trained fp32 ControlNet itself (no copy, EMA weights swapped in) beside a bf16 base, scored by Canny
    edge F1."""
    from PIL import Image

    from train import validation
    from train.train import main

    monkeypatch.setattr(validation, "validation_model", lambda *a: pytest.fail("the SDXL ControlNet was copied"))
    out = tmp_path / "sdxl"
    assert main(train_args(demo_manifest, tiny_sdxl, out, "sdxl", *VALIDATE_EVERY_STEP, "--use_ema",
                           "--mixed_precision", "bf16")) == 0
    grids = sorted(p.name for p in (out / "validation").glob("*.png"))
    assert grids == ["step-000001.png", "step-final.png"]
    assert Image.open(out / "validation" / "step-final.png").size == (2 * 64, 64)  # condition | sample
    records = [json.loads(line) for line in (out / "validation" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["condition"]) for r in records] == [(1, "canny"), ("final", "canny")]
    assert all(0.0 <= r["edge_f1"] <= 1.0 for r in records)


@pytest.fixture
def union_spy(monkeypatch):
    """Records, for each validation pipeline call of a union run, the control image and mode it was given
    and the control-type mask / mode the ControlNet's forward received inside it."""
    import diffusers

    calls: list[dict] = []

    def spy_on(family: str) -> list[dict]:
        pipeline = getattr(diffusers, UNION_PIPELINE[family])
        controlnet = getattr(diffusers, UNION_CONTROLNET[family])
        real_call, real_forward = pipeline.__call__, controlnet.forward

        def call(self, *args, **kwargs):
            calls.append({"control_mode": kwargs.get("control_mode"), "control_image": kwargs["control_image"],
                          "forwards": []})
            try:
                return real_call(self, *args, **kwargs)
            finally:
                calls[-1]["done"] = True

        def forward(self, *args, **kwargs):
            if calls and "done" not in calls[-1]:  # inside a validation pipeline call, not a training step
                seen = {k: kwargs.get(k) for k in ("control_type", "control_type_idx", "controlnet_mode")}
                seen["conditions"] = len(kwargs["controlnet_cond"]) if family == "sdxl" else 1
                calls[-1]["forwards"].append(seen)
            return real_forward(self, *args, **kwargs)

        monkeypatch.setattr(pipeline, "__call__", call)
        monkeypatch.setattr(controlnet, "forward", forward)
        return calls

    return spy_on


@pytest.mark.parametrize("family", ("sdxl", "flux"))
def test_union_validates_each_condition_alone(stacked_manifest, family, request, tmp_path, monkeypatch, union_spy):
    """canny has a metric, invert (a plugin) none: a grid for each, canny scored under ``canny/``, invert
    recorded as unscored; each pipeline call gives one condition (the held-out row's own channels) and
    its slot/mode, and the ControlNet sees exactly that one."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from train import loop
    from train.train import main
    from train.validation import validation_inputs

    held = []
    real_load_rows = loop.load_rows
    monkeypatch.setattr(loop, "load_rows", lambda *a: (lambda r: (held.extend(r[1]), r)[1])(real_load_rows(*a)))
    calls = union_spy(family)
    out = tmp_path / "union"
    assert main(train_args(stacked_manifest, request.getfixturevalue(f"tiny_{family}"), out, family, "--union",
                           *VALIDATE_EVERY_STEP, "--report_to", "tensorboard", condition="canny,invert")) == 0

    grids = sorted(p.name for p in (out / "validation").glob("*.png"))
    assert grids == ["step-000001-canny.png", "step-000001-invert.png", "step-final-canny.png",
                     "step-final-invert.png"]
    assert_canny_scored_and_invert_unscored(out)
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    assert [e.step for e in events.Scalars("validation/canny/edge_f1")] == [1]
    assert {"validation/canny", "validation/invert"} <= set(events.Tags()["images"])

    assert len(held) == 1
    stacked = validation_inputs(held, ("canny", "invert"), (), (), 64)[0][0]
    assert [c["control_mode"] for c in calls] == ([[0], [1]] * 2 if family == "sdxl" else [0, 1] * 2)
    for call in calls:
        slot = call["control_mode"][0] if family == "sdxl" else call["control_mode"]
        given = call["control_image"][0] if family == "sdxl" else (call["control_image"] + 1) / 2
        expected = stacked[:, 3 * slot:3 * slot + 3]
        assert given.shape[1] == 3 and torch.allclose(given.cpu().float(), expected, atol=1e-6), slot
        assert call["forwards"]  # the ControlNet ran at every sampling step, with that slot alone
        for seen in call["forwards"]:
            assert seen["conditions"] == 1
            if family == "sdxl":
                assert seen["control_type_idx"] == [slot]
                assert seen["control_type"].flatten(1).ne(0).nonzero()[:, 1].unique().tolist() == [slot]
            else:
                assert seen["controlnet_mode"].unique().tolist() == [slot]


def test_stacked_conditions_without_union_hold_rows_out(stacked_manifest, tiny_sd):
    """Stacked runs validate too (tests/test_train_stacked_validation.py), so their rows are held out."""
    from train.validation import holdout_count
    from train.train import parse_args

    args = train_args(stacked_manifest, tiny_sd, "out", "sd", condition="canny,invert")
    assert holdout_count(parse_args(args)) == parse_args(args).num_validation_rows

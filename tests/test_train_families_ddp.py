"""The flow-matching transformer families (SD3/3.5, Flux.1) under DDP: two real gloo ranks on the CPU,
started with ``accelerate launch --multi_gpu`` (see tests/test_train.py ``launch``).

DDP waits for a gradient of every trainable parameter: one that never gets one (SD3's last ControlNet block's
text-stream outputs) fails the second step; the first test checks that in process, without launching."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from tests.test_train import launch
from tests.test_train_families import load_exported, load_family_base, train_args

TINY = ["--resolution", "32", "--validation_steps", "0"]  # SD3/Flux need a multiple of 16; 32 keeps runs tiny


def ddp_args(manifest, base, out, family, *extra, condition="canny") -> list[str]:
    return train_args(manifest, base, out, family, *TINY, *extra, condition=condition)


def summary_of(out) -> dict:
    return json.loads((out / "train_summary.json").read_text())


def assert_ranks_in_sync(out, disjoint: bool = True) -> list[dict]:
    """Two ranks that trained equal, non-empty (and, within one epoch, disjoint) shares of the rows and
    ended with the same weights."""
    ranks = summary_of(out)["figures"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["rows"] and len(ranks[0]["rows"]) == len(ranks[1]["rows"])
    if disjoint:
        assert not set(ranks[0]["rows"]) & set(ranks[1]["rows"])
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    return ranks


def checksum(model: torch.nn.Module) -> float:
    """What train/loop.py ``rank_report`` sums, for an exported model."""
    with torch.no_grad():
        return float(sum(p.double().sum() for p in model.parameters()))


@pytest.mark.parametrize(("family", "union", "single_layers"), [
    ("sd3", False, None), ("flux", False, 1), ("flux", True, 1), ("flux", False, 0)])
def test_every_trainable_controlnet_parameter_gets_a_gradient(family, union, single_layers, request, tmp_path):
    """What DDP needs; the parameters that can reach no output (the last joint block's text stream, when no
    block reads the text tokens after it) are frozen instead. Flux with 0 single blocks is loaded from a
    folder, as a user's ControlNet of that shape would be (a new one gets at least 1)."""
    from train.models import make_controlnet

    conditions = ("canny", "invert") if union else ("canny",)
    base = load_family_base(request.getfixturevalue(f"tiny_{family}"), family, conditions, union)
    if single_layers == 0:
        make_controlnet(base, 3, None, 1, 0).save_pretrained(tmp_path / "no_singles")
        controlnet = make_controlnet(base, 3, str(tmp_path / "no_singles"))
        assert controlnet.config.num_single_layers == 0
    else:
        controlnet = make_controlnet(base, 3, None, 1, single_layers)
    torch.manual_seed(0)
    hidden, added = base.family.encode_prompts(base, ["a red circle", ""], torch.device("cpu"))
    condition = torch.rand(2, 3 * len(conditions), 64, 64)
    loss = base.family.loss(controlnet, base, torch.randn(2, 16, 8, 8), hidden, added, condition,
                            torch.Generator().manual_seed(0))
    loss.backward()
    params = dict(controlnet.named_parameters())
    assert not [n for n, p in params.items() if p.requires_grad and p.grad is None]
    frozen = sorted(n for n, p in params.items() if not p.requires_grad)
    if family == "flux" and single_layers:
        assert frozen == []
    else:  # the one (last) joint block's text-stream outputs, and nothing else
        assert frozen and all(n.startswith(("transformer_blocks.0.attn.to_add_out.",
                                            "transformer_blocks.0.ff_context.")) for n in frozen)


@pytest.mark.slow
@pytest.mark.parametrize("family", ("sd3", "flux"))
def test_two_processes_train_the_family_in_sync_and_export_it(family, demo_manifest, stacked_manifest, request,
                                                              tmp_path):
    """SD3 with one condition, Flux as a union ControlNet over the stacked manifest's two conditions."""
    base = request.getfixturevalue(f"tiny_{family}")
    out = tmp_path / "ddp"
    if family == "flux":
        args = ddp_args(stacked_manifest, base, out, family, "--union", "--max_train_steps", "2",
                        "--checkpointing_steps", "10", "--train_batch_size", "1", condition="canny,invert")
    else:
        args = ddp_args(demo_manifest, base, out, family, "--max_train_steps", "2", "--checkpointing_steps", "10")
    launch(args, processes=2)
    ranks = assert_ranks_in_sync(out)
    summary = summary_of(out)
    assert summary["figures"]["global_step"] == 2 and np.isfinite(summary["figures"]["final_loss"])
    controlnet = load_exported(family, out / "controlnet")  # the family's diffusers class loads it
    assert checksum(controlnet) == pytest.approx(ranks[0]["checksum"], rel=1e-12, abs=1e-9)  # rank 0's weights
    blocks = [v for k, v in controlnet.state_dict().items() if k.startswith("controlnet_blocks")]
    assert blocks and any(v.abs().sum() > 0 for v in blocks)  # the zero-initialised outputs trained
    if family == "flux":
        assert controlnet.config.num_mode == 2 and summary["controlnet_mode"] == {"canny": 0, "invert": 1}


@pytest.mark.slow
def test_a_two_process_run_resumed_from_its_checkpoint_matches_an_uninterrupted_one(stacked_manifest, tiny_flux,
                                                                                   tmp_path):
    """Flux union (per-rank random modes, noise and sigmas): stopped at checkpoint-2 and resumed, both ranks
    continue exactly where a straight run went on."""
    schedule = ["--union", "--max_train_steps", "4", "--checkpointing_steps", "2", "--train_batch_size", "1",
                "--lr_scheduler", "linear", "--lr_warmup_steps", "0"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch(ddp_args(stacked_manifest, tiny_flux, straight, "flux", *schedule, condition="canny,invert"), processes=2)
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    launch(ddp_args(stacked_manifest, tiny_flux, resumed, "flux", *schedule, "--resume_from_checkpoint", "latest",
                    condition="canny,invert"), processes=2)
    a = load_exported("flux", straight / "controlnet").state_dict()
    b = load_exported("flux", resumed / "controlnet").state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    fa, fb = summary_of(straight)["figures"], summary_of(resumed)["figures"]
    assert fa["global_step"] == fb["global_step"] == 4 and fa["lr"] == pytest.approx(fb["lr"])
    # 6 rows, 3 batches of 1 per rank and epoch: step 4 is in the second epoch (and the resumed run crosses it)
    ra, rb = assert_ranks_in_sync(straight, disjoint=False), assert_ranks_in_sync(resumed, disjoint=False)
    for rank in (0, 1):  # each rank trained only the second half of its straight share (steps 3 and 4)
        assert len(rb[rank]["rows"]) * 2 == len(ra[rank]["rows"])
        assert not Counter(rb[rank]["rows"]) - Counter(ra[rank]["rows"])
    assert ra[0]["checksum"] == pytest.approx(rb[0]["checksum"], abs=1e-4)


@pytest.mark.slow
def test_flux_with_ema_and_gradient_checkpointing_under_ddp(demo_manifest, tiny_flux, tmp_path):
    out = tmp_path / "ema"
    launch(ddp_args(demo_manifest, tiny_flux, out, "flux", "--use_ema", "--gradient_checkpointing",
                    "--max_train_steps", "2", "--checkpointing_steps", "2"), processes=2)
    assert_ranks_in_sync(out)  # the raw trained weights, before the EMA is copied in for export
    assert summary_of(out)["figures"]["global_step"] == 2
    assert_export_holds_the_ema(out, "flux", "checkpoint-2")


def assert_export_holds_the_ema(out, family: str, checkpoint: str) -> None:
    """The run's exported ControlNet holds the EMA weights its ``checkpoint`` saved (accelerate's custom object)."""
    exported = load_exported(family, out / "controlnet")
    ema = torch.load(out / checkpoint / "custom_checkpoint_0.pkl", weights_only=False)
    params = list(exported.parameters())
    assert len(params) == len(ema["shadow_params"])
    for param, shadow in zip(params, ema["shadow_params"]):
        assert torch.allclose(param, shadow, atol=1e-7)  # the export holds the EMA weights


@pytest.mark.parametrize(("family", "blocks", "wanted", "expected"), [
    ("sd3", {"num_layers": 4}, (3, None), (2, None)), ("sd3", {"num_layers": 6}, (5, None), (3, None)),
    ("flux", {"num_layers": 1, "num_single_layers": 4}, (1, 3), (1, 2)),
    ("flux", {"num_layers": 5, "num_single_layers": 1}, (4, 1), (3, 1))])
@pytest.mark.parametrize("loaded", [False, True])
def test_controlnet_blocks_whose_residuals_the_base_never_adds_are_capped(family, blocks, wanted, expected, loaded,
                                                                          request, caplog, tmp_path):
    """The base adds ControlNet residual int(i / (blocks / count)) (SD3) or i // ceil(blocks / count) (Flux)
    after its block i: past half its blocks some residuals are never added, get no gradient (DDP fails at
    the second step) and steer nothing; a new ControlNet is capped at the most the base reads, with a log line."""
    from train.models import make_controlnet

    base = load_family_base(request.getfixturevalue(f"tiny_{family}"), family)
    base.transformer = type(base.transformer).from_config({**base.transformer.config, **blocks}).requires_grad_(False)
    with caplog.at_level("INFO", logger="train"):
        controlnet = make_controlnet(base, 3, None, *wanted)
    assert (controlnet.config.num_layers, getattr(controlnet.config, "num_single_layers", None)) == expected
    assert "adds no residual" in caplog.text
    if loaded:  # a user's ControlNet of that shape, from a folder: the same parameters frozen
        controlnet.save_pretrained(tmp_path / "controlnet")
        controlnet = make_controlnet(base, 3, str(tmp_path / "controlnet"))
    with torch.no_grad():  # open the zero-initialised outputs, so every used residual passes a gradient back
        for name, p in controlnet.named_parameters():
            if name.startswith(("controlnet_blocks", "controlnet_single_blocks")):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    hidden, added = base.family.encode_prompts(base, ["a red circle", ""], torch.device("cpu"))
    loss = base.family.loss(controlnet, base, torch.randn(2, 16, 8, 8), hidden, added, torch.rand(2, 3, 64, 64),
                            torch.Generator().manual_seed(0))
    loss.backward()
    assert not [n for n, p in controlnet.named_parameters() if p.requires_grad and p.grad is None]
    frozen = {n for n, p in controlnet.named_parameters() if not p.requires_grad}
    if family == "sd3":  # the last block's text stream only: an earlier block's feeds the next block
        last = f"transformer_blocks.{expected[0] - 1}."
        assert {n.split(".")[2] for n in frozen} == {"attn", "ff_context"}
        assert all(n.startswith((last + "attn.to_add_out.", last + "ff_context.")) for n in frozen)
    else:  # single blocks read every joint block's text stream
        assert not frozen

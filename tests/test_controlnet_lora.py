"""ControlNet-LoRA on every family's tiny model, in process: the zero start, what trains, the optimiser, the
merge and the exports (train/controlnet_lora.py)."""

from __future__ import annotations

import types

import pytest
import torch

from train.controlnet_lora import LoraSettings, NEW_PARTS, is_new, merged, trained_parameters

FAMILIES = ("sd", "sdxl", "sd3", "flux")
CPU = torch.device("cpu")


def family_base(request, family: str, conditions: tuple[str, ...] = ("canny",), union: bool = False):
    from train.adapter import FamilyOptions
    from train.models import load_base

    base = load_base(str(request.getfixturevalue(f"tiny_{family}")), 64)
    base.options = FamilyOptions(conditions, union, max_sequence_length=16)
    return base


def new_controlnet(base, lora: LoraSettings | None, seed: int = 0) -> torch.nn.Module:
    from train.models import make_controlnet

    torch.manual_seed(seed)
    flow = base.family.name in ("sd3", "flux")
    return make_controlnet(base, 3 * len(base.options.conditions), None, 1 if flow else None, 1 if base.family.name == "flux" else None, lora)


def flat(value) -> list[torch.Tensor]:
    """Every tensor in a ControlNet's output (nested tuples, lists, output classes)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flat(v)]
    return []


def loss_and_residuals(base, controlnet, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The family's training loss on a fixed random batch, and the residuals the ControlNet gave in it."""
    captured = []
    hook = controlnet.register_forward_hook(lambda module, args, out: captured.append(flat(out)))
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, base.vae.config.latent_channels, 8, 8, generator=g)
    condition = torch.rand(2, 3 * len(base.options.conditions), 64, 64, generator=g)
    hidden, added = base.family.encode_prompts(base, ["a red circle", ""], CPU)
    try:
        loss = base.family.loss(controlnet, base, latents, hidden, added, condition, torch.Generator().manual_seed(seed))
    finally:
        hook.remove()
    return loss, captured[0]


def train_steps(base, controlnet, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW(trained_parameters(controlnet), lr=1e-2)
    for step in range(steps):
        loss, _ = loss_and_residuals(base, controlnet, seed=step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_fresh_lora_controlnet_is_the_full_zero_start_exactly(family, request):
    base = family_base(request, family)
    full = new_controlnet(base, None)
    lora = new_controlnet(base, LoraSettings(4))
    with torch.no_grad():
        full_loss, full_res = loss_and_residuals(base, full)
        lora_loss, lora_res = loss_and_residuals(base, lora)
    assert all(torch.count_nonzero(r) == 0 for r in lora_res)  # zero residuals: the base's own prediction
    assert torch.equal(full_loss, lora_loss)
    b_weights = [p for n, p in lora.named_parameters() if ".lora_B." in n]
    assert b_weights and all(torch.count_nonzero(p) == 0 for p in b_weights)
    plain, reference = merged(lora).state_dict(), full.state_dict()
    assert set(plain) == set(reference)
    assert all(torch.equal(plain[k], reference[k]) for k in reference)  # copied weights = the base's


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_adapters_and_the_new_parts_train_and_the_merge_gives_the_same_residuals(family, request):
    base = family_base(request, family)
    controlnet = new_controlnet(base, LoraSettings(4, alpha=8))
    parts = NEW_PARTS[type(controlnet).__name__]
    trained = {n for n, p in controlnet.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in controlnet.named_parameters()
                       if ".lora_" in n or (is_new(n, parts) and "base_layer" not in n)}
    assert not any(".lora_" in n for n in trained if is_new(n, parts))  # new parts are trained in full
    before = {n: p.detach().clone() for n, p in controlnet.named_parameters()}
    train_steps(base, controlnet)
    changed = {n for n, p in controlnet.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trained
    assert any(".lora_B." in n for n in changed) and any(is_new(n, parts) for n in changed)
    with torch.no_grad():
        lora_loss, lora_res = loss_and_residuals(base, controlnet.eval())
        plain_loss, plain_res = loss_and_residuals(base, merged(controlnet).eval())
    assert any(torch.count_nonzero(r) for r in lora_res)
    for a, b in zip(lora_res, plain_res, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lora_loss, plain_loss, rtol=1e-4, atol=1e-6)


def test_the_optimizer_and_ema_hold_only_the_trained_parameters(request, tmp_path):
    from train.config import TrainConfig
    from train.loop import make_ema, make_optimizer_and_schedule

    base = family_base(request, "sd")
    controlnet = new_controlnet(base, LoraSettings(4))
    config = TrainConfig(manifest=str(tmp_path), condition=("canny",), output_dir=str(tmp_path / "out"),
                         pretrained_model_name_or_path=str(request.getfixturevalue("tiny_sd")), controlnet_lora_rank=4)
    accelerator = types.SimpleNamespace(num_processes=1, device=CPU, register_for_checkpointing=lambda obj: None)
    optimizer, _ = make_optimizer_and_schedule(config, accelerator, controlnet, 10)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trained = {id(p) for p in controlnet.parameters() if p.requires_grad}
    assert held == trained and len(held) < len(list(controlnet.parameters()))
    ema = make_ema(accelerator, controlnet)
    assert [p.shape for p in ema.shadow_params] == [p.shape for p in controlnet.parameters() if p.requires_grad]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_exports_rebuild_the_trained_controlnet(family, request, tmp_path):
    import diffusers
    from peft import PeftModel

    from train.export import export

    base = family_base(request, family)
    controlnet = new_controlnet(base, LoraSettings(4))
    train_steps(base, controlnet, steps=2)
    card = {"base_model": "tiny", "manifest": "m", "manifest_fingerprint": "f", "conditions": ["canny"],
            "provenance": [], "figures": {}, "args": {}, "controlnet_class": type(controlnet).__name__}
    written = export(controlnet, str(tmp_path), card)
    with torch.no_grad():
        _, want = loss_and_residuals(base, controlnet.eval())
        loaded = getattr(diffusers, base.family.controlnet_class).from_pretrained(written["diffusers"]).eval()
        _, got = loss_and_residuals(base, loaded)
        fresh = new_controlnet(base, None, seed=1)  # another seed: the adapter file must bring the new parts
        rebuilt = PeftModel.from_pretrained(fresh, written["adapter"]).merge_and_unload().eval()
        _, from_adapter = loss_and_residuals(base, rebuilt)
    for a, b, c in zip(want, got, from_adapter, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
    assert ("control_lora" in written) == (family in ("sd", "sdxl"))
    images = base.family.sample(base.family.validation_pipeline(base, loaded), base, torch.rand(1, 3, 64, 64), "a",
                                1, torch.Generator().manual_seed(0), 2)
    assert images[0].size == (64, 64)
    assert "ControlNet-LoRA" in (tmp_path / "README.md").read_text()


@pytest.mark.parametrize(("flags", "message"), [
    (["--controlnet_lora_rank", "0"], "give a rank of 1 or more"),
    (["--controlnet_lora_rank", "4", "--controlnet_lora_alpha", "0"], "give an alpha above 0"),
    (["--controlnet_lora_rank", "4", "--controlnet_lora_dropout", "1"], "within 0..1"),
    (["--controlnet_lora_alpha", "8"], "add --controlnet_lora_rank"),
    (["--controlnet_lora_rank", "4", "--controlnet_model_name_or_path", "some/controlnet"],
     "does not continue a full ControlNet"),
])
def test_unusable_lora_flags_fail_before_any_model_loads(flags, message, tiny_sd, tmp_path, capsys, monkeypatch):
    from train import models
    from train.train import main

    monkeypatch.setattr(models, "load_base", lambda *a, **k: pytest.fail("loaded a model"))
    args = ["--manifest", str(tmp_path), "--condition", "canny", "--pretrained_model_name_or_path", str(tiny_sd),
            "--output_dir", str(tmp_path / "out"), *flags]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_a_union_lora_controlnet_starts_at_zero_trains_its_routing_and_its_adapter_rebuilds_it(family, request,
                                                                                              tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from train.controlnet_lora import ADAPTER_FOLDER, ROOT_PARAMETERS, save_adapter

    base = family_base(request, family, ("canny", "depth"), union=True)
    controlnet = new_controlnet(base, LoraSettings(4))
    with torch.no_grad():
        _, residuals = loss_and_residuals(base, controlnet)
    assert all(torch.count_nonzero(r) == 0 for r in residuals)
    routing = [n for n, p in controlnet.named_parameters() if p.requires_grad and n.startswith(
        ("task_embedding", "transformer_layes", "control_add_embedding", "controlnet_mode_embedder"))]
    assert routing  # the union's own parts train in full
    train_steps(base, controlnet)
    folder = save_adapter(controlnet, tmp_path / ADAPTER_FOLDER)
    rebuilt = PeftModel.from_pretrained(new_controlnet(base, None, seed=1), str(folder)).merge_and_unload()
    if (folder / ROOT_PARAMETERS).is_file():  # the SDXL union's task_embedding
        rebuilt.load_state_dict(load_file(str(folder / ROOT_PARAMETERS)), strict=False)
    with torch.no_grad():
        _, want = loss_and_residuals(base, controlnet.eval())
        _, got = loss_and_residuals(base, rebuilt.eval())
    assert any(torch.count_nonzero(r) for r in want)
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_resuming_from_a_checkpoint_of_another_layout_is_refused_with_a_message(request, tmp_path):
    from safetensors.torch import save_file

    from train.errors import SetupError
    from train.controlnet_lora import load_trained_state, trained_state

    base = family_base(request, "sd")
    full = new_controlnet(base, None)
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "model.safetensors"))
    controlnet = new_controlnet(base, LoraSettings(4))
    with pytest.raises(SetupError, match="not written by a run of this --controlnet_lora_rank layout"):
        load_trained_state(controlnet, tmp_path / "model.safetensors")
    other = {k: v.detach().contiguous() for k, v in trained_state(new_controlnet(base, LoraSettings(8))).items()}
    save_file(other, str(tmp_path / "rank8.safetensors"))
    with pytest.raises(SetupError, match="resume with the --controlnet_lora_rank that wrote it"):
        load_trained_state(controlnet, tmp_path / "rank8.safetensors")


def test_in_place_validation_samples_with_the_ema_of_exactly_the_trained_parameters(request, monkeypatch):
    from diffusers.training_utils import EMAModel

    from train import validation

    base = family_base(request, "flux")  # a family that samples with the trained module itself
    controlnet = new_controlnet(base, LoraSettings(4))
    ema = EMAModel(trained_parameters(controlnet), decay=0.5)
    for _ in range(2):  # EMAModel's first step copies the weights; the second mixes
        train_steps(base, controlnet, steps=2)
        ema.step(trained_parameters(controlnet))
    trained_now = [p.detach().clone() for p in trained_parameters(controlnet)]
    seen = []
    monkeypatch.setattr(base.family, "sample", lambda *args, **kwargs: seen.append(
        [p.detach().clone() for p in trained_parameters(controlnet)]) or [])
    validation.generate_in_place(base, controlnet, ema, [(torch.rand(1, 3, 64, 64), "a")], 1, 0, steps=1)
    assert len(seen[0]) == len(ema.shadow_params)
    assert all(torch.equal(a, b) for a, b in zip(seen[0], ema.shadow_params))  # sampled with the EMA weights
    assert not all(torch.equal(a, b) for a, b in zip(seen[0], trained_now))
    assert all(torch.equal(a, b) for a, b in zip(trained_parameters(controlnet), trained_now))  # and put back

"""``--fp8_base``: the locked base's Linear/Conv2d weights in float8, with gradients through it (train/float8_base.py).

(a) the float8 layers compute what F.linear/F.conv2d compute with the dequantised weight, forward and input
gradient, and stay float8 after a backward (diffusers' layerwise casting did not); (b) they hold about half
the bytes of bf16; (c) training runs with an fp8 base on tiny SD, SD3 and Flux; (d) the ControlNet's gradient
through an fp8 base is the one through the dequantised weights, and close to the full-precision one.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.test_train_families import (assert_resume_from_checkpoint_is_exact, load_exported, load_family_base, perturb,
                                       train_args, train_keeping_base)
from train.float8_base import (Float8Conv2d, Float8Linear, base_float8_report, dequantise, float8_report, quantise,
                               store_base_in_float8, store_in_float8, stored_bytes)

F8 = torch.float8_e4m3fn
DTYPES = (torch.float32, torch.bfloat16)


def converted(layer: nn.Module, dtype: torch.dtype) -> nn.Module:
    holder = nn.Sequential(layer.to(dtype).requires_grad_(False))
    store_in_float8(holder, dtype)
    return holder[0]


def layers() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {"linear": nn.Linear(48, 40), "linear_no_bias": nn.Linear(48, 40, bias=False),
            "conv": nn.Conv2d(8, 12, 3, padding=1),
            "conv_strided": nn.Conv2d(8, 12, (3, 5), stride=2, padding=(1, 2), dilation=(2, 1), groups=4)}


def inputs(kind: str, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    shape = (3, 5, 48) if kind.startswith("linear") else (2, 8, 11, 13)
    return torch.randn(shape, generator=g).to(dtype).requires_grad_(True)


def reference(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the layer computes, by plain autograd through its dequantised weight."""
    weight = dequantise(layer.weight_float8, layer.weight_scale, x.dtype)
    if isinstance(layer, Float8Linear):
        return F.linear(x, weight, layer.bias)
    return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)


# --- (a) the layers: forward, input gradient, frozen float8 state ------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["linear", "linear_no_bias", "conv", "conv_strided"])
def test_forward_and_input_gradient_are_those_of_the_dequantised_weight(kind, dtype):
    layer = converted(layers()[kind], dtype)
    stored = layer.weight_float8.clone(), layer.weight_scale.clone()
    x, x_ref = inputs(kind, dtype), inputs(kind, dtype)
    out, out_ref = layer(x), reference(layer, x_ref)
    assert out.dtype == dtype and torch.equal(out, out_ref)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    out.backward(grad)
    out_ref.backward(grad)
    assert x.grad.dtype == dtype
    # the same products as autograd's (conv2d_input is the transposed convolution autograd runs)
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    # frozen: no weight gradient anywhere, and the stored weight is still float8, bit for bit
    assert layer.weight_float8.dtype == F8 and layer.weight_scale.dtype == torch.float32
    assert torch.equal(layer.weight_float8.view(torch.uint8), stored[0].view(torch.uint8))
    assert torch.equal(layer.weight_scale, stored[1])
    assert all(p.grad is None for p in layer.parameters()) and layer.weight_float8.grad is None
    assert [n for n, _ in layer.named_parameters()] == ([] if kind == "linear_no_bias" else ["bias"])


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_the_backward_saves_the_float8_weight_not_an_upcast_copy(kind):
    layer = converted(layers()[kind], torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(inputs(kind, torch.float32)).sum().backward()
    assert sorted(str(t.dtype) for t in saved) == ["torch.float32", "torch.float8_e4m3fn"]  # weight + its scale
    assert any(t is layer.weight_float8 for t in saved)
    assert not any(t.dtype == torch.float32 and t.shape == layer.weight_float8.shape for t in saved)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_bias_that_asks_for_a_gradient_gets_autograds(kind):
    layer = converted(layers()[kind], torch.float32)
    layer.bias.requires_grad_(True)
    x = inputs(kind, torch.float32)
    layer(x).square().sum().backward()
    mine = layer.bias.grad.clone()
    layer.bias.grad = None
    reference(layer, x.detach()).square().sum().backward()
    torch.testing.assert_close(mine, layer.bias.grad)


def test_under_autocast_the_gradient_comes_back_in_the_inputs_dtype():
    layer = converted(layers()["linear"], torch.float32)
    x = inputs("linear", torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_quantisation_rounds_each_weight_to_float8_precision_without_saturating(kind):
    torch.manual_seed(0)
    weight = layers()[kind].weight.detach() * torch.logspace(-3, 2, layers()[kind].weight.shape[0]).view(
        -1, *(1,) * (layers()[kind].weight.dim() - 1))  # channels of very different magnitudes
    stored, scale = quantise(weight)
    back = dequantise(stored, scale, torch.float32)
    assert stored.dtype == F8 and torch.isfinite(back).all()
    # e4m3: 3 mantissa bits, half a step is 2^-4 relative; subnormals (below 2^-6 of the scale) absolute
    assert bool(((back - weight).abs() <= 2**-4 * weight.abs() + 2**-9 * scale).all())
    amax = weight.abs().flatten(1).amax(1)
    torch.testing.assert_close(back.abs().flatten(1).amax(1), amax, rtol=2**-4, atol=0)


def test_what_is_converted_and_what_is_left():
    class Custom(nn.Linear):
        pass

    shared = nn.Linear(16, 16)
    model = nn.Sequential(nn.Linear(16, 32), nn.Conv2d(3, 8, 3, padding=1, padding_mode="circular"),
                          nn.Conv2d(3, 8, 3, padding="same"), nn.Linear(2, 2), Custom(4, 4), nn.LayerNorm(16),
                          nn.Embedding(10, 16), shared, nn.Sequential(shared))
    report = store_in_float8(model, torch.float32, min_elements=16)
    assert isinstance(model[0], Float8Linear) and model[7] is model[8][0] and isinstance(model[7], Float8Linear)
    assert type(model[1]) is nn.Conv2d and type(model[2]) is nn.Conv2d and type(model[3]) is nn.Linear
    assert type(model[4]) is Custom and type(model[5]) is nn.LayerNorm and type(model[6]) is nn.Embedding
    assert (report.layers, report.skipped) == (2, 3)  # the shared layer once; circular, "same", too small
    assert report.bytes_before == 4 * (16 * 32 + 16 * 16) and report.bytes_after == 16 * 32 + 16 * 16 + 4 * 48
    assert float8_report(model) == report
    assert "2 layers (3 skipped)" in report.line()


def test_dtype_casts_and_device_moves_keep_the_float8_storage():
    layer = converted(layers()["conv"], torch.float32)
    stored = layer.weight_float8.clone()
    holder = nn.Sequential(layer).to(torch.bfloat16).to("cpu")
    assert holder[0] is layer and layer.weight_float8.dtype == F8 and layer.weight_scale.dtype == torch.float32
    assert torch.equal(layer.weight_float8.view(torch.uint8), stored.view(torch.uint8))
    assert layer.bias.dtype == torch.bfloat16 and layer.compute_dtype == torch.bfloat16
    assert layer.weight.dtype == torch.bfloat16 and layer.weight.shape == (12, 8, 3, 3)
    assert layer(inputs("conv", torch.bfloat16)).dtype == torch.bfloat16
    holder.half()
    assert layer.weight_float8.dtype == F8 and layer.weight.dtype == torch.float16
    assert set(layer.state_dict()) == {"weight_float8", "weight_scale", "bias"}


# --- (b) bytes, and what diffusers / transformers read from a converted base ---------------------


@pytest.mark.parametrize("family", ["sd", "sd3", "flux"])
def test_a_converted_base_reports_its_compute_dtype_and_holds_half_the_bytes_of_bf16(family, request):
    base = load_family_base(request.getfixturevalue(f"tiny_{family}"), family)
    base.place(torch.device("cpu"), torch.bfloat16)
    before = {id(m): stored_bytes(m) for m in (base.denoiser, *base.text_encoders)}
    report = store_base_in_float8(base, torch.bfloat16)
    assert report.layers > 0 and report.skipped == 0
    scales = sum(layer.weight_scale.numel() for module in (base.denoiser, *base.text_encoders)
                 for layer in module.modules() if isinstance(layer, (Float8Linear, Float8Conv2d)))
    assert report.bytes_after == report.bytes_before // 2 + 4 * scales  # 1 byte a weight + a float32 scale a channel
    assert report.bytes_after / report.bytes_before < 0.6  # rows of 32 weights here; at real widths about 0.501
    assert base_float8_report(base) == report
    # the full-precision weights are gone, not kept beside the float8 ones
    parts = (base.denoiser, *base.text_encoders)
    assert sum(map(stored_bytes, parts)) == sum(before.values()) - report.bytes_before + report.bytes_after
    if family == "sd":  # where Linear/Conv2d weights are nearly all of it (the tiny SD3/Flux are mostly embeddings)
        assert stored_bytes(base.denoiser) / before[id(base.denoiser)] < 0.53
    # what pipelines and the loss read: the model's dtype is still its compute dtype (a float8 parameter or
    # a cast to float8 activations would break them); T5 casts to wo.weight.dtype
    for module in (base.denoiser, *base.text_encoders):
        assert module.dtype == torch.bfloat16
        assert all(not p.is_floating_point() or p.dtype == torch.bfloat16 for p in module.parameters())
    for layer in base.denoiser.modules():
        if isinstance(layer, (Float8Linear, Float8Conv2d)):
            assert layer.weight.dtype == torch.bfloat16 and layer.weight_float8.dtype == F8
    assert not any(type(m) in (nn.Linear, nn.Conv2d) for m in base.denoiser.modules())


# --- (d) the ControlNet's gradient through the fp8 base ------------------------------------------------


def dequantised_in_place(module: nn.Module) -> None:
    """Each Linear/Conv2d weight replaced by its float8 round trip, kept in full-precision layers."""
    with torch.no_grad():
        for layer in module.modules():
            if type(layer) in (nn.Linear, nn.Conv2d):
                stored, scale = quantise(layer.weight)
                layer.weight.copy_(dequantise(stored, scale, layer.weight.dtype))


def controlnet_grads(family: str, base, controlnet) -> dict[str, torch.Tensor]:
    """The ControlNet's gradients (by parameter name) for one fixed batch through ``base``."""
    torch.manual_seed(0)
    channels = 4 if family == "sd" else 16
    latents, condition = torch.randn(2, channels, 8, 8), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        hidden, added = base.family.encode_prompts(base, ["a red circle", "a blue square"], torch.device("cpu"))
    controlnet.zero_grad(set_to_none=True)
    loss = base.family.loss(controlnet, base, latents, hidden, added, condition, torch.Generator().manual_seed(3))
    loss.backward()
    return {n: p.grad.detach().clone().flatten() for n, p in controlnet.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["sd", "sd3", "flux"])
def test_the_controlnet_gradient_through_an_fp8_base(family, request):
    from train.models import make_controlnet

    path = request.getfixturevalue(f"tiny_{family}")
    full = load_family_base(path, family)
    controlnet = make_controlnet(full, 3, None, *({"sd": (), "sd3": (1,), "flux": (1, 1)}[family]))
    perturb(controlnet)  # non-zero outputs: the gradient reaches every ControlNet weight through the base
    fp8, rounded, bf16 = (load_family_base(path, family) for _ in range(3))
    store_base_in_float8(fp8, torch.float32)
    for module in (rounded.denoiser, *rounded.text_encoders):
        dequantised_in_place(module)
    for module in (bf16.denoiser, *bf16.text_encoders):  # for scale: the weights rounded to bf16, fp32 compute
        module.to(torch.bfloat16).to(torch.float32)

    grads = {name: controlnet_grads(family, b, controlnet) for name, b in
             (("fp8", fp8), ("rounded", rounded), ("full", full), ("bf16", bf16))}
    assert set(grads["fp8"]) == set(grads["rounded"]) == set(grads["full"]) == set(grads["bf16"])
    assert any(k.startswith("controlnet_") and "blocks" in k for k in grads["fp8"])  # the zero-started outputs
    assert any("blocks" in k and not k.startswith("controlnet_") for k in grads["fp8"])  # behind them (perturbed)
    through_fp8, through_rounded, through_full, through_bf16 = (torch.cat(list(g.values())) for g in grads.values())
    assert through_fp8.abs().sum() > 0
    # the same weights, autograd's backward vs ours: equal up to float32 summation order
    torch.testing.assert_close(through_fp8, through_rounded, rtol=1e-4, atol=1e-6 * float(through_rounded.abs().max()))

    def error(grad: torch.Tensor) -> float:
        return float((grad - through_full).norm() / through_full.norm())

    # against the full-precision base: e4m3 keeps 3 mantissa bits (a weight rounds by up to 2^-4 of itself),
    # bf16 7, so the gradient's error should be about 2^4 times a bf16 base's, adding up layer by layer
    # (measured here: SD 10.5 % vs 0.71 %, SD3 3.0 % vs 0.23 %, Flux 2.8 % vs 0.21 %)
    cosine = float(F.cosine_similarity(through_fp8, through_full, dim=0))
    assert error(through_fp8) < 0.2 and cosine > 0.98, (error(through_fp8), cosine)
    assert error(through_fp8) < 2**5 * error(through_bf16), (error(through_fp8), error(through_bf16))


# --- (c) training with --fp8_base ------------------------------------------------------------------


PRECISION = {"sd": "no", "sd3": "no", "flux": "bf16"}
"""Flux trains in bf16 with gradient checkpointing (the realistic memory-saving setting); SD and SD3 in fp32."""


@pytest.fixture(scope="module", params=["sd", "sd3", "flux"])
def fp8_run(request, demo_manifest, tmp_path_factory):
    """2 steps with --fp8_base (checkpoint at 1, validation samples at 2 and on the export), keeping the base."""
    family = request.param
    base_dir = request.getfixturevalue(f"tiny_{family}")
    out = tmp_path_factory.mktemp(f"fp8_{family}") / "run"
    extra = ["--gradient_checkpointing"] if family == "flux" else []
    args = train_args(demo_manifest, base_dir, out, family, "--max_train_steps", "2", "--checkpointing_steps", "1",
                      "--validation_steps", "2", "--num_validation_rows", "1", "--num_validation_images", "1",
                      "--mixed_precision", PRECISION[family], "--fp8_base", *extra)
    return train_keeping_base(family, base_dir, out, args)


@pytest.mark.slow
def test_fp8_training_runs_changes_the_controlnet_and_leaves_the_float8_base_bit_identical(fp8_run):
    from train.models import make_controlnet

    family, trained = fp8_run["family"], fp8_run["base"]
    dtype = {"no": torch.float32, "bf16": torch.bfloat16}[PRECISION[family]]
    fresh = load_family_base(fp8_run["base_dir"], family)
    start = make_controlnet(fresh, 3, None, *({"sd": (), "sd3": (1,), "flux": (1, 1)}[family])).state_dict()
    fresh.place(torch.device("cpu"), dtype)
    store_base_in_float8(fresh, dtype)
    for a, b in zip((trained.denoiser, *trained.text_encoders), (fresh.denoiser, *fresh.text_encoders)):
        b_state, a_state = b.state_dict(), a.state_dict()
        assert set(a_state) == set(b_state)
        for k, v in a_state.items():
            assert v.dtype == b_state[k].dtype, k
            bits = (lambda t: t.view(torch.uint8)) if v.dtype == F8 else (lambda t: t)
            assert torch.equal(bits(v), bits(b_state[k])), f"{k} changed"
    assert float8_report(trained.denoiser).layers > 0 and trained.denoiser.dtype == dtype

    figures = fp8_run["result"]["figures"]
    assert figures["global_step"] == 2 and np.isfinite(figures["final_loss"])
    summary = json.loads((fp8_run["out"] / "train_summary.json").read_text())
    assert summary["figures"]["fp8_base"] == base_float8_report(trained).line() and "layers" in summary["figures"][
        "fp8_base"]
    assert summary["figures"]["mixed_precision"] == PRECISION[family]
    after = load_exported(family, fp8_run["out"] / "controlnet").state_dict()  # export loads
    assert all(v.dtype == torch.float32 for v in after.values())  # the ControlNet was never in float8
    changed = [k for k, v in after.items() if not torch.equal(v, start[k])]
    assert any(k.startswith("controlnet_") and "blocks" in k for k in changed)  # the zero outputs left zero
    validation = fp8_run["out"] / "validation"
    assert (validation / "step-000002.png").is_file() and (validation / "step-final.png").is_file()


@pytest.mark.slow
def test_fp8_resume_matches_the_uninterrupted_run(fp8_run, tmp_path):
    """The base is loaded and stored in float8 again on resume: the same steps give the same ControlNet."""
    assert_resume_from_checkpoint_is_exact(fp8_run, "checkpoint-1", tmp_path)


# --- flags -------------------------------------------------------------------------------------------


def test_fp8_base_is_refused_where_torch_has_no_float8(demo_manifest, tiny_sd, tmp_path, capsys, monkeypatch):
    from train.train import parse_args

    assert parse_args(train_args(demo_manifest, tiny_sd, tmp_path, "sd", "--fp8_base")).fp8_base
    assert not parse_args(train_args(demo_manifest, tiny_sd, tmp_path, "sd")).fp8_base
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(SystemExit):
        parse_args(train_args(demo_manifest, tiny_sd, tmp_path, "sd", "--fp8_base"))
    err = capsys.readouterr().err
    assert "--fp8_base stores the base in float8" in err and "or drop --fp8_base" in err


def test_a_device_without_float8_is_a_set_up_error(tiny_sd, monkeypatch):
    from train import float8_base
    from train.errors import SetupError

    base = load_family_base(tiny_sd, "sd")
    monkeypatch.setattr(float8_base, "float8_problem", lambda device: "mps cannot hold float8 tensors")
    with pytest.raises(SetupError, match="--fp8_base: mps cannot hold float8 tensors; drop --fp8_base"):
        store_base_in_float8(base, torch.float32)
    assert float8_report(base.denoiser).layers == 0  # nothing was converted


# --- attacks: fp16 compute, what is left and shared, copies, resume toggled, union/EMA/cache, DDP ------------


def test_fp16_dequantisation_keeps_small_channels_that_an_fp16_base_keeps():
    """The scale is amax/448: below 2^-14 it is an fp16 subnormal and below 2^-25 it rounds to zero, so a product
    taken in fp16 blurs or zeroes whole channels of small weights that an fp16 base holds (as subnormals)."""
    torch.manual_seed(0)
    weight = torch.randn(5, 64) * torch.tensor([1.0, 1e-2, 1e-3, 1e-4, 1e-5]).view(-1, 1)
    stored, scale = quantise(weight)
    as_fp32 = dequantise(stored, scale, torch.float32)
    as_fp16 = dequantise(stored, scale, torch.float16)
    assert as_fp16.dtype == torch.float16
    # in fp16, the float8 round trip (first rounded in fp32) plus fp16's own rounding of that value, no more
    torch.testing.assert_close(as_fp16, as_fp32.half(), rtol=0, atol=0)
    assert (as_fp16.float().abs().amax(1) > 0).all()


@pytest.mark.parametrize(("family", "union"), [("sd", False), ("sdxl", False), ("sdxl", True), ("sd3", False),
                                               ("flux", False), ("flux", True)])
def test_every_layer_of_every_family_is_converted_and_the_controlnet_shares_none_of_them(family, union, request):
    """No Linear/Conv2d (or a subclass of one, or nn.MultiheadAttention's packed weights) stays in full precision
    in the denoiser or text encoders, and the ControlNet, built from the base before, holds none of its tensors."""
    from train.float8_base import _Float8Layer
    from train.models import make_controlnet

    conditions = ("canny", "invert") if union else ("canny",)
    base = load_family_base(request.getfixturevalue(f"tiny_{family}"), family, conditions, union)
    controlnet = make_controlnet(base, 3, None, *({"sd3": (1,), "flux": (1, 1)}.get(family, ())))
    names = [n for n, _ in controlnet.named_parameters()]
    report = store_base_in_float8(base, torch.float32)
    parts = (base.denoiser, *base.text_encoders)
    left = [n for part in parts for n, m in part.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.MultiheadAttention))]
    assert report.layers > 0 and report.skipped == 0 and left == []
    assert not any(isinstance(m, _Float8Layer) for m in controlnet.modules())
    assert [n for n, _ in controlnet.named_parameters()] == names
    assert all(p.dtype == torch.float32 and p.requires_grad for p in controlnet.parameters()) or family == "sd3"
    held = {id(t) for part in parts for t in (*part.parameters(), *part.buffers())}
    assert not [n for n, p in controlnet.named_parameters() if id(p) in held]


def test_deepcopy_state_dict_and_load_state_dict_keep_float8():
    import copy

    model = nn.Sequential(layers()["linear"], layers()["conv_strided"])
    store_in_float8(model, torch.bfloat16)
    x = inputs("linear", torch.bfloat16)
    twin = copy.deepcopy(model)
    assert twin[0].weight_float8 is not model[0].weight_float8 and torch.equal(twin[0](x), model[0](x))
    other = nn.Sequential(nn.Linear(48, 40), nn.Conv2d(8, 12, (3, 5), stride=2, padding=(1, 2), dilation=(2, 1),
                                                       groups=4))
    store_in_float8(other, torch.bfloat16)
    other.load_state_dict(model.state_dict())
    for a, b in zip(model, other):
        assert b.weight_float8.dtype == F8 and b.weight_scale.dtype == torch.float32
        assert torch.equal(a.weight_float8.view(torch.uint8), b.weight_float8.view(torch.uint8))
        assert torch.equal(a.weight_scale, b.weight_scale) and torch.equal(a.weight, b.weight)
    with pytest.raises(RuntimeError, match="weight"):  # a full-precision state dict is refused, never quantised silently
        other.load_state_dict(nn.Sequential(nn.Linear(48, 40), nn.Conv2d(8, 12, 3)).state_dict())


@pytest.mark.slow
@pytest.mark.parametrize("first,second", [((), ("--fp8_base",)), (("--fp8_base",), ())],
                         ids=["bf16-then-fp8", "fp8-then-bf16"])
def test_resume_with_fp8_base_toggled_continues_from_the_checkpoint(first, second, demo_manifest, tiny_sd, tmp_path):
    """A checkpoint holds the ControlNet, optimiser, schedule and RNG, never the base (reloaded and converted on each
    start), so --fp8_base may change between runs like --mixed_precision: the resumed run starts at the saved step."""
    from train.train import main

    out = tmp_path / "run"
    common = ["--checkpointing_steps", "1", "--validation_steps", "0", "--mixed_precision", "bf16"]
    assert main(train_args(demo_manifest, tiny_sd, out, "sd", "--max_train_steps", "1", *common, *first)) == 0
    checkpoint = out / "checkpoint-1"
    assert checkpoint.is_dir()
    saved = [p.name for p in checkpoint.rglob("*") if p.is_file()]
    assert not any("unet" in n or "text_encoder" in n for n in saved), saved  # no base in it
    assert main(train_args(demo_manifest, tiny_sd, out, "sd", "--max_train_steps", "2", *common, *second,
                           "--resume_from_checkpoint", "latest")) == 0
    figures = json.loads((out / "train_summary.json").read_text())["figures"]
    assert figures["global_step"] == 2 and np.isfinite(figures["final_loss"])
    assert ("fp8_base" in figures) == bool(second)


MATRIX = [("sdxl", ["--union", "--use_ema", "--gradient_checkpointing"]), ("sd3", ["--cache_latents", "--center_crop"]),
          ("flux", ["--union", "--cache_latents", "--center_crop", "--use_ema"])]


@pytest.mark.slow
@pytest.mark.parametrize("family,extra", MATRIX, ids=[m[0] + "".join(m[1]) for m in MATRIX])
def test_fp8_base_with_union_ema_checkpointing_and_cached_latents(family, extra, demo_manifest, stacked_manifest,
                                                                   request, tmp_path):
    """bf16 runs with validation; --cache_latents encodes the cache with the float8 text encoders (as an uncached
    run encodes each step)."""
    from train.train import main

    union = "--union" in extra
    out = tmp_path / "run"
    assert main(train_args(stacked_manifest if union else demo_manifest, request.getfixturevalue(f"tiny_{family}"),
                           out, family, "--max_train_steps", "2", "--checkpointing_steps", "10", "--validation_steps",
                           "2", "--num_validation_rows", "1", "--num_validation_images", "1", "--mixed_precision",
                           "bf16", "--fp8_base", *extra, condition="canny,invert" if union else "canny")) == 0
    figures = json.loads((out / "train_summary.json").read_text())["figures"]
    assert np.isfinite(figures["final_loss"]) and "layers" in figures["fp8_base"]
    assert list((out / "validation").glob("step-final*.png"))


@pytest.mark.slow
def test_two_processes_train_in_sync_with_an_fp8_base(stacked_manifest, tiny_flux, tmp_path):
    from tests.test_train_families_ddp import assert_ranks_in_sync, ddp_args, summary_of
    from tests.test_train import launch

    out = tmp_path / "ddp"
    launch(ddp_args(stacked_manifest, tiny_flux, out, "flux", "--union", "--fp8_base", "--max_train_steps", "2",
                    "--checkpointing_steps", "10", "--train_batch_size", "1", condition="canny,invert"), processes=2)
    assert_ranks_in_sync(out)
    figures = summary_of(out)["figures"]
    assert figures["global_step"] == 2 and np.isfinite(figures["final_loss"]) and "layers" in figures["fp8_base"]


# --- what mutation testing found untested ---------------------------------------------------------------


def test_an_all_zero_channel_stays_zero_and_finite():
    weight = torch.randn(4, 16)
    weight[1] = 0
    stored, scale = quantise(weight)
    assert torch.isfinite(scale).all() and scale[1].item() > 0
    back = dequantise(stored, scale, torch.float32)
    assert torch.equal(back[1], torch.zeros(16)) and torch.isfinite(back).all()
    layer = converted(nn.Linear(16, 4), torch.float32)
    layer.weight_float8.copy_(stored)
    layer.weight_scale.copy_(scale)
    x = torch.randn(3, 16, requires_grad=True)
    layer(x).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["linear", "conv_strided"])
def test_the_weight_property_reads_the_dequantised_weight(kind, dtype):
    """What code outside the forward reads (T5's ``wo.weight``, fusing): the scaled values, not the raw float8."""
    original = layers()[kind]
    layer = converted(original, dtype)
    assert torch.equal(layer.weight, dequantise(layer.weight_float8, layer.weight_scale, dtype))
    assert layer.weight.dtype == dtype and layer.weight.shape == original.weight.shape
    torch.testing.assert_close(layer.weight.float(), original.weight.float(), rtol=2**-4, atol=1e-3)


def test_an_unbatched_conv_input_computes_like_the_batched_one():
    layer = converted(layers()["conv_strided"], torch.float32)
    x = inputs("conv", torch.float32)[0].detach().requires_grad_(True)
    out = layer(x)
    assert out.shape == reference(layer, x[None].detach())[0].shape
    torch.testing.assert_close(out, layer(x[None].detach())[0])
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_a_device_move_moves_the_float8_storage():
    """Device moves reach the popped buffers (``meta`` stands in for a GPU here)."""
    layer = converted(layers()["conv"], torch.bfloat16)
    nn.Sequential(layer).to("meta")
    assert {t.device.type for t in (layer.weight_float8, layer.weight_scale, layer.bias)} == {"meta"}
    assert layer.weight_float8.dtype == F8 and layer.weight_scale.dtype == torch.float32


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_each_channels_largest_weight_lands_on_e4m3s_largest_value_and_small_weights_keep_their_precision(kind):
    """The scale uses the whole e4m3 range (448, not e.g. e4m3fnuz's 240): each channel's largest magnitude is
    stored as the format's maximum, so weights down to 2^-14.5 of it are still normal float8 numbers with
    3 mantissa bits (a narrower range pushes them into subnormals, with fewer)."""
    weight = layers()[kind].weight.detach().clone()
    rows = weight.flatten(1)
    rows.copy_(torch.sign(torch.randn(rows.shape, generator=torch.Generator().manual_seed(1)))
               * torch.logspace(0, -14.5, rows.shape[1], base=2.0))  # every channel spans 2^0 .. 2^-14.5
    stored, scale = quantise(weight)
    top = stored.float().abs().flatten(1).amax(1)
    assert bool((top == torch.finfo(F8).max).all()), top
    back = dequantise(stored, scale, torch.float32)
    assert bool(((back - weight).abs() <= 2**-4 * weight.abs()).all())

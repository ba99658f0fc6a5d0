"""``--fp8_base``: the locked base's Linear and Conv2d weights stored in float8, trainable through.

The loss backpropagates through the frozen denoiser to reach the ControlNet's residuals, so a float8
base must give gradients with respect to its *inputs* while its weights stay frozen. diffusers'
``enable_layerwise_casting`` does not: its hooks cast each layer's weights back to float8 after the
layer's forward, so the backward meets float8 weights (``expected scalar type Float but found
Float8_e4m3fn``). Here each layer keeps its weight as a float8 buffer with a float32 scale per output
channel, and one ``torch.autograd.Function`` upcasts it to the compute dtype inside the forward and
again inside the backward: the graph saves the float8 weight (a reference to the buffer, one byte per
weight), never an upcast copy, and the backward returns the input's gradient only.

    report = store_in_float8(base.denoiser, torch.bfloat16)   # in place, after the ControlNet copied it
    log.info("fp8 base: %s", report.line())

Every ``nn.Linear`` and ``nn.Conv2d`` (exactly those classes: a subclass may override ``forward``) with
at least ``min_elements`` weights is converted; convolutions padded other than with zeros (or with
``padding="same"``-style strings) are left as they are. The default converts every layer: the scale is
per output channel, so a small layer quantises as well as a large one, and small layers' bytes are
negligible either way. Biases stay in the compute dtype. The converted layers are not ``nn.Linear`` /
``nn.Conv2d`` instances, so nothing that looks for those (LoRA, fusing) mistakes them for ones.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from train.adapter import BaseModels

FLOAT8: torch.dtype | None = getattr(torch, "float8_e4m3fn", None)
"""The storage dtype (4 exponent bits, 3 mantissa bits): None on a PyTorch without float8."""
FLOAT8_MAX = 448.0
"""The largest finite e4m3fn value: the scale maps each channel's largest magnitude to it (no saturation)."""
STORED = ("weight_float8", "weight_scale")
"""The buffers a converted layer keeps its weight in."""


@dataclasses.dataclass
class Float8Report:
    """What ``store_in_float8`` converted."""

    layers: int = 0
    """Layers now stored in float8."""
    skipped: int = 0
    """Linear/Conv2d layers left as they were (too small, or a convolution padded other than with zeros)."""
    bytes_before: int = 0
    """The converted layers' weights, in their dtype before."""
    bytes_after: int = 0
    """The same weights in float8, with their float32 scales."""

    def __add__(self, other: "Float8Report") -> "Float8Report":
        return Float8Report(*(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)))

    def line(self) -> str:
        """e.g. ``123 layers, 1.20 GiB -> 0.60 GiB`` (and the skipped count, when some were)."""
        skipped = f" ({self.skipped} skipped)" if self.skipped else ""
        return f"{self.layers} layers{skipped}, {human_bytes(self.bytes_before)} -> {human_bytes(self.bytes_after)}"

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def float8_problem(device: torch.device | str) -> str | None:
    """Why float8 weights cannot be stored and upcast on ``device`` (None when they can)."""
    if FLOAT8 is None:
        return f"this PyTorch ({torch.__version__}) has no float8 dtypes: upgrade to 2.1 or newer"
    try:
        torch.ones(2, device=device).to(FLOAT8).to(torch.float32)
    except (RuntimeError, TypeError) as exc:
        return f"{device} cannot hold float8 tensors ({str(exc).splitlines()[0]})"
    return None


# --- quantise / dequantise -----------------------------------------------------------------------


def quantise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, float32 scale per output channel shaped to broadcast against it): each channel
    divided by amax/448 so its largest magnitude lands on float8's largest value (an all-zero channel
    gets scale 1)."""
    w = weight.detach().float()  # one layer's fp32 copy at a time, freed on return
    amax = w.abs().flatten(1).amax(dim=1)
    scale = torch.where(amax > 0, amax / FLOAT8_MAX, torch.ones_like(amax)).view(-1, *(1,) * (w.dim() - 1))
    return (w / scale).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(FLOAT8), scale


def dequantise(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight in ``dtype``: float8 values are exact in bf16/fp16/fp32, so the only rounding is the product.
    fp16 takes the product in fp32: a scale (amax/448) below 2^-14 would be an fp16 subnormal, below 2^-25 zero,
    blurring or zeroing whole channels of small weights that an fp16 base keeps."""
    if dtype == torch.float16:
        return (weight.to(torch.float32) * scale.to(torch.float32)).to(dtype)
    return weight.to(dtype) * scale.to(dtype)


# --- the autograd functions: upcast in the forward, again in the backward -----------------------------


class _Float8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight, scale)  # the float8 buffer itself: no full-precision copy is kept
        ctx.x_dtype, ctx.bias_dtype = x.dtype, None if bias is None else bias.dtype
        return F.linear(x, dequantise(weight, scale, x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        weight, scale = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            # in the gradient's dtype: under autocast it is the forward's output dtype, not x's
            grad_x = grad.matmul(dequantise(weight, scale, grad.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:  # a frozen base's bias never asks; an unfrozen one gets its gradient
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, grad_bias  # the weight is frozen: no weight gradient


class _Float8Conv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                groups: int) -> torch.Tensor:
        ctx.save_for_backward(weight, scale)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.geometry = (stride, padding, dilation, groups)
        return F.conv2d(x, dequantise(weight, scale, x.dtype), None if bias is None else bias.to(x.dtype),
                        stride, padding, dilation, groups)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        weight, scale = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(ctx.x_shape, dequantise(weight, scale, grad.dtype), grad,
                                                *ctx.geometry).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = grad.sum((0, 2, 3)).to(ctx.bias_dtype)
        return grad_x, None, None, grad_bias, None, None, None, None


# --- the layers ---------------------------------------------------------------------------------------


class _Float8Layer(nn.Module):
    """A frozen weight in float8 (buffer ``weight_float8``) with its scale (``weight_scale``), and the
    original bias. Both buffers are in ``state_dict`` (what is stored is what is saved); they follow
    device moves but never dtype casts (see ``_apply``)."""

    def __init__(self, layer: nn.Module, compute_dtype: torch.dtype):
        super().__init__()
        weight8, scale = quantise(layer.weight)
        self.register_buffer("weight_float8", weight8)
        self.register_buffer("weight_scale", scale)
        self.register_parameter("bias", layer.bias)
        self.bytes_before = layer.weight.numel() * layer.weight.element_size()
        """The weight's bytes before it was stored in float8 (for reports)."""
        self.compute_dtype = compute_dtype
        """The dtype ``weight`` reads in and the one reported to code that asks the layer (the forward
        itself computes in its input's dtype)."""

    @property
    def bytes_after(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight_float8, self.weight_scale))

    @property
    def weight(self) -> torch.Tensor:
        """The weight dequantised to ``compute_dtype``, a new tensor on each read: for code that reads
        ``layer.weight`` (T5 casts its activations to ``wo.weight.dtype``). The forward never reads it."""
        return dequantise(self.weight_float8, self.weight_scale, self.compute_dtype)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "_Float8Layer":
        # Module.to(dtype) / .half() cast every floating-point buffer, float8 ones included: a bf16 copy of
        # the float8 values without their scale would be wrong and twice the size. The stored weight and
        # its float32 scale follow the device only; the bias and the reported compute dtype follow the cast.
        stored = {name: self._buffers.pop(name) for name in STORED}
        try:
            super()._apply(fn, recurse)
            probe = fn(torch.empty(0, dtype=self.compute_dtype, device=stored["weight_float8"].device))
            if probe.is_floating_point():
                self.compute_dtype = probe.dtype
            stored = {name: t.to(probe.device) for name, t in stored.items()}
        finally:
            self._buffers.update(stored)
        return self


class Float8Linear(_Float8Layer):
    """``nn.Linear`` with a frozen float8 weight; gradients reach its input (and a bias that asks)."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype):
        super().__init__(linear, compute_dtype)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Float8LinearFn.apply(x, self.weight_float8, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Float8Conv2d(_Float8Layer):
    """``nn.Conv2d`` (zero padding) with a frozen float8 weight; the input gradient by ``conv2d_input``."""

    def __init__(self, conv: nn.Conv2d, compute_dtype: torch.dtype):
        super().__init__(conv, compute_dtype)
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.padding_mode = conv.padding_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batched = x if x.dim() == 4 else x.unsqueeze(0)  # conv2d_input needs the batched shape
        out = _Float8Conv2dFn.apply(batched, self.weight_float8, self.weight_scale, self.bias, self.stride,
                                    self.padding, self.dilation, self.groups)
        return out if x.dim() == 4 else out.squeeze(0)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}")


# --- converting a model in place ------------------------------------------------------------------------


def convertible(layer: nn.Module) -> bool:
    """A layer this module can store in float8: exactly ``nn.Linear``, or ``nn.Conv2d`` zero-padded by numbers."""
    if type(layer) is nn.Linear:
        return True
    return type(layer) is nn.Conv2d and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)


def store_in_float8(module: nn.Module, compute_dtype: torch.dtype, min_elements: int = 0) -> Float8Report:
    """Swap every convertible layer inside ``module`` for its float8 twin, in place; layers with fewer than
    ``min_elements`` weights stay as they are. ``compute_dtype``: the dtype the module computes in (its
    bias dtype; what ``layer.weight`` reads as). A layer reached twice (shared) is converted once."""
    if FLOAT8 is None:
        raise RuntimeError(float8_problem("cpu"))
    report = Float8Report()
    converted: dict[int, nn.Module] = {}
    for parent in list(module.modules()):
        for name, child in list(parent._modules.items()):
            if child is None or isinstance(child, _Float8Layer):
                continue
            if id(child) in converted:
                parent._modules[name] = converted[id(child)]
                continue
            if type(child) not in (nn.Linear, nn.Conv2d):
                continue
            if not convertible(child) or child.weight.numel() < min_elements:
                report.skipped += 1
                continue
            twin = (Float8Linear if type(child) is nn.Linear else Float8Conv2d)(child, compute_dtype)
            report.layers += 1
            report.bytes_before += twin.bytes_before
            report.bytes_after += twin.bytes_after
            converted[id(child)] = parent._modules[name] = twin
    return report


def float8_report(module: nn.Module) -> Float8Report:
    """What is stored in float8 inside ``module`` now (a converted model, counted again: ``skipped`` is the
    Linear/Conv2d layers still in full precision)."""
    report = Float8Report()
    for layer in module.modules():
        if isinstance(layer, _Float8Layer):
            report += Float8Report(1, 0, layer.bytes_before, layer.bytes_after)
        elif type(layer) in (nn.Linear, nn.Conv2d):
            report.skipped += 1
    return report


def base_parts(base: "BaseModels") -> list[nn.Module]:
    """What ``--fp8_base`` stores in float8: the denoiser (trained through) and the text encoders (forward
    only). The VAE stays as it is: it is small, runs once per image, and SDXL's is kept in fp32."""
    return [base.denoiser, *base.text_encoders]


def store_base_in_float8(base: "BaseModels", compute_dtype: torch.dtype) -> Float8Report:
    """``--fp8_base`` on a placed base: call it after the ControlNet copied the base's full-precision weights.
    A device without float8 support is a ``SetupError`` saying so."""
    from train.errors import SetupError

    problem = float8_problem(base.denoiser.device)
    if problem:
        raise SetupError(f"--fp8_base: {problem}; drop --fp8_base")
    report = Float8Report()
    for module in base_parts(base):
        report += store_in_float8(module, compute_dtype)
    return report


def base_float8_report(base: "BaseModels") -> Float8Report:
    """``float8_report`` over the parts of the base that ``--fp8_base`` converts."""
    report = Float8Report()
    for module in base_parts(base):
        report += float8_report(module)
    return report


def stored_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each tensor once)."""
    seen: dict[int, int] = {}
    for t in (*module.parameters(), *module.buffers()):
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())

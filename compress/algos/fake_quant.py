"""Fake-quantized Linear layers for quantization-aware training, and how a model saves and reloads them.

Weights: int8, symmetric (zero point 0, range [-127, 127]), per output channel or per tensor; the scale
follows the weight (max |w| / 127 at every forward pass), so nothing about it can drift from the weight.
Activations (each Linear's input): uint8, asymmetric, per tensor, because x86 integer kernels (ONNX Runtime's
MLAS, SSE4.1 to AMX) multiply unsigned activations by signed weights natively: int8 activations are first
flipped to uint8 or, on some CPUs, take a slower kernel. Their scale is learned (LSQ: the straight-through
gradient of the rounding, clipped values pull the scale out, rounding error tunes it), starting from the range
calibration rows reach; the zero point, an integer, stays where calibration put it. Rounding is half to even
in float32 division, as ONNX QuantizeLinear computes it, so an exported graph reproduces these numbers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from compress.errors import ArtifactError

SPEC_FORMAT = "compress-fake-quant/1"
WEIGHT_MAX = 127  # symmetric int8 weights: -127..127, so that -w quantizes exactly as w
ACTIVATION_MIN, ACTIVATION_MAX = 0, 255  # uint8 activations
MIN_SCALE = 1e-8  # a Linear whose weights or inputs are all zero still gets a usable scale


class FakeQuantLinear(nn.Module):
    """A Linear computing on int8-rounded weights and uint8-rounded inputs, in float, with straight-through
    gradients. It takes over the Linear's own weight and bias parameters (tied weights stay tied)."""

    def __init__(self, linear: nn.Linear, per_channel: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.per_channel = per_channel
        device = linear.weight.device
        self.input_scale = nn.Parameter(torch.ones((), device=device))
        self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.uint8, device=device))

    def set_input_range(self, low: float, high: float) -> None:
        """Scale and zero point that cover [low, high] (widened to hold 0, which padding and ReLU need exact)."""
        low, high = min(low, 0.0), max(high, 0.0)
        scale = max((high - low) / (ACTIVATION_MAX - ACTIVATION_MIN), MIN_SCALE)
        zero_point = min(max(round(ACTIVATION_MIN - low / scale), ACTIVATION_MIN), ACTIVATION_MAX)
        with torch.no_grad():
            self.input_scale.fill_(scale)
            self.input_zero_point.fill_(zero_point)

    def input_qparams(self) -> tuple[Tensor, Tensor]:
        """(scale, zero point) of the input as the forward pass uses them: the scale kept positive."""
        return self.input_scale.clamp_min(MIN_SCALE), self.input_zero_point

    def weight_scale(self) -> Tensor:
        """[out, 1] per channel or [] per tensor: max |w| / 127 of the current weight (no gradient)."""
        peak = self.weight.detach().float().abs()
        peak = peak.amax(dim=1, keepdim=True) if self.per_channel else peak.amax()
        return (peak / WEIGHT_MAX).clamp_min(MIN_SCALE)

    def quantized_weight(self) -> Tensor:
        """The int8 weight [out, in] the forward pass computes with (times `weight_scale()`)."""
        scaled = self.weight.detach().float() / self.weight_scale()
        return torch.round(scaled).clamp(-WEIGHT_MAX, WEIGHT_MAX).to(torch.int8)

    def forward(self, x: Tensor) -> Tensor:
        scale, zero_point = self.input_qparams()
        x_fq = fake_quantize(x.float(), scale, zero_point.float(), ACTIVATION_MIN, ACTIVATION_MAX)
        weight_scale = self.weight_scale()
        w_fq = fake_quantize(self.weight.float(), weight_scale, torch.zeros_like(weight_scale), -WEIGHT_MAX,
                             WEIGHT_MAX)
        return F.linear(x_fq.to(x.dtype), w_fq.to(self.weight.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"per_channel={self.per_channel}")


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, low: int, high: int) -> Tensor:
    """(clamp(round(x / scale) + zero_point, low, high) - zero_point) * scale, with the straight-through
    estimator: the rounding passes gradients unchanged, the clamp stops them outside the range. The gradient
    this gives `scale` is LSQ's."""
    scaled = x / scale
    rounded = scaled + (torch.round(scaled) - scaled).detach()
    return (torch.clamp(rounded + zero_point, low, high) - zero_point) * scale


def quantizable_linears(model: nn.Module, keep_fp32: Iterable[str] = ()) -> list[str]:
    """Names of the Linear layers to fake-quantize: all but those whose name holds a `keep_fp32` fragment."""
    kept = list(keep_fp32)
    return [name for name, module in model.named_modules()
            if type(module) is nn.Linear and not any(fragment in name for fragment in kept)]


@torch.no_grad()
def input_ranges(model: nn.Module, names: list[str],
                 batches: Iterable[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """(min, max) of each named Linear's input over the batches (numpy or torch): run it on the float model,
    before `quantize_linears`, so each layer sees the inputs the float model gives it."""
    ranges: dict[str, tuple[float, float]] = {}

    def observer(name: str) -> Any:
        def observe(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            low, high = inputs[0].min().item(), inputs[0].max().item()
            seen = ranges.get(name, (low, high))
            ranges[name] = (min(seen[0], low), max(seen[1], high))

        return observe

    modules = dict(model.named_modules())
    hooks = [modules[name].register_forward_pre_hook(observer(name)) for name in names]
    training, device = model.training, next(model.parameters()).device
    try:
        model.eval()
        for batch in batches:
            model(**{key: torch.as_tensor(value, device=device) for key, value in batch.items()})
    finally:
        for hook in hooks:
            hook.remove()
        model.train(training)
    return ranges


def quantize_linears(model: nn.Module, names: list[str], per_channel: bool = True,
                     ranges: dict[str, tuple[float, float]] | None = None) -> None:
    """Swap each named Linear for a FakeQuantLinear, in place; `ranges` set the inputs' first scales."""
    for name in names:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        quantized = FakeQuantLinear(getattr(owner, attr), per_channel)
        if ranges is not None:
            quantized.set_input_range(*ranges[name])
        setattr(owner, attr, quantized)


def quantization_spec(model: nn.Module) -> dict[str, Any]:
    """What `apply_quantization_spec` needs to rebuild the fake-quant modules of `model` (JSON)."""
    # imported here: that module builds on this one's fake_quantize
    from compress.algos.fake_quant_embedding import FakeQuantEmbedding

    modules = {name: {"per_channel": module.per_channel} for name, module in model.named_modules()
               if isinstance(module, FakeQuantLinear)}
    embeddings = {name: {"bits": module.bits} for name, module in model.named_modules()
                  if isinstance(module, FakeQuantEmbedding)}
    return {"format": SPEC_FORMAT, "weights": "int8-symmetric", "activations": "uint8-asymmetric-per-tensor",
            "modules": modules, "embeddings": embeddings}


def apply_quantization_spec(model: nn.Module, spec: dict[str, Any]) -> None:
    """Swap in the spec's fake-quant modules (scales unset) so that loading the saved tensors fills them."""
    from compress.algos.fake_quant_embedding import BITS, quantize_embeddings

    if spec.get("format") != SPEC_FORMAT:
        raise ArtifactError(f"quantization spec: unknown format {spec.get('format')!r} (expected {SPEC_FORMAT})")
    modules = dict(model.named_modules())
    for name, settings in spec["modules"].items():
        if type(modules.get(name)) is not nn.Linear:
            raise ArtifactError(f"quantization spec: {name!r} is not a Linear layer of this model")
        quantize_linears(model, [name], per_channel=settings["per_channel"])
    for name, settings in spec.get("embeddings", {}).items():  # specs written before embeddings were quantized
        if type(modules.get(name)) is not nn.Embedding or settings.get("bits") not in BITS:
            raise ArtifactError(f"quantization spec: {name!r} is not an Embedding of this model quantized to one "
                                f"of {BITS} bits")
        quantize_embeddings(model, {name: settings["bits"]}, fit=False)  # the saved levels fill them

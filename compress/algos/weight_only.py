"""Weight-only quantized Linear layers: integer codes per group of input features with their scales (and zero
points when asymmetric), chosen by Intel Neural Compressor (RTN, GPTQ, AWQ) and held in our own module, which
saves as plain tensors and lowers to ONNX Runtime's MatMulNBits with the same bytes."""

from __future__ import annotations

import re
import tempfile
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compress.arch import FAMILIES
from compress.errors import ArtifactError, BackendError, RecipeError

SPEC_FORMAT = "compress-weight-only/1"
BACKEND_FALLBACK = "quantize the exported graph instead with `ptq: {mode: weight-only}`"
# Attributes INC leaves on the model it converted (among them a `save` that pickles).
INC_ATTRIBUTES = ("qconfig", "save", "is_quantized", "is_prepared", "quant_config", "example_inputs")


class WeightOnlyLinear(nn.Module):
    """y = x W^T + b with W = (codes - zero point) * scale per group of `group_size` input features.

    `codes` holds the unsigned integers packed along the input features, low bits first (two 4-bit codes a
    byte): row n reshaped to [groups, group_size * bits / 8] is MatMulNBits' B for output n. Without zero
    points (symmetric) the zero point is 2^(bits-1), as in MatMulNBits.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool,
                 bias: bool) -> None:
        super().__init__()
        if bits not in (4, 8) or in_features % group_size:
            raise ValueError(f"{bits}-bit codes in groups of {group_size} cannot cover {in_features} features")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        groups = in_features // group_size
        self.register_buffer("codes", torch.zeros(out_features, in_features * bits // 8, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, groups))
        self.register_buffer("zero_points", None if symmetric else torch.zeros(out_features, groups, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_integers(cls, integers: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                      bits: int, bias: torch.Tensor | None) -> WeightOnlyLinear:
        """From unsigned codes [out, in], scales [out, groups] and zero points [out, groups] (None: symmetric)."""
        out_features, in_features = integers.shape
        layer = cls(in_features, out_features, bits, in_features // scales.shape[1], zero_points is None,
                    bias is not None)
        if integers.min() < 0 or integers.max() >= 2 ** bits:
            raise ValueError(f"codes outside [0, {2 ** bits - 1}]")
        layer.codes.copy_(pack_codes(integers.to(torch.uint8), bits))
        layer.scales.copy_(scales.float())
        if zero_points is not None:
            layer.zero_points.copy_(zero_points.to(torch.uint8))
        if bias is not None:
            layer.bias.copy_(bias.float())
        return layer

    def integers(self) -> torch.Tensor:
        """The unsigned codes, uint8 [out, in]."""
        if self.bits == 8:
            return self.codes
        return torch.stack([self.codes & 0x0F, self.codes >> 4], dim=-1).reshape(self.out_features, -1)

    def dequantized_weight(self) -> torch.Tensor:
        grouped = self.integers().float().reshape(self.out_features, -1, self.group_size)
        zero = 2.0 ** (self.bits - 1) if self.symmetric else self.zero_points.float()[..., None]
        return ((grouped - zero) * self.scales[..., None]).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}, bias={self.bias is not None}")


def pack_codes(integers: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return integers
    pairs = integers.reshape(integers.shape[0], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def quantized_layers(model: nn.Module) -> dict[str, WeightOnlyLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, WeightOnlyLinear)}


def quantization_spec(model: nn.Module) -> dict[str, Any]:
    """What `apply_quantization_spec` needs to rebuild the quantized layers (empty) in a fresh model."""
    layers = {name: {"in_features": layer.in_features, "out_features": layer.out_features, "bits": layer.bits,
                     "group_size": layer.group_size, "symmetric": layer.symmetric, "bias": layer.bias is not None}
              for name, layer in quantized_layers(model).items()}
    return {"format": SPEC_FORMAT, "layers": layers}


def apply_quantization_spec(model: nn.Module, spec: dict[str, Any]) -> None:
    if spec.get("format") != SPEC_FORMAT:
        raise ArtifactError(f"quantization spec format {spec.get('format')!r} is not {SPEC_FORMAT}")
    for name, settings in spec["layers"].items():
        model.set_submodule(name, WeightOnlyLinear(**settings))


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A float twin of `model`: each quantized layer becomes an nn.Linear holding exactly its dequantized weight."""
    import copy

    twin = copy.deepcopy(model)
    for name, layer in quantized_layers(twin).items():
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(layer.dequantized_weight())
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        twin.set_submodule(name, linear)
    return twin


def quantizable_layers(model: nn.Module, keep_fp32: list[str]) -> dict[str, nn.Linear]:
    """The Linear layers whose name contains none of the `keep_fp32` fragments."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not any(fragment in name for fragment in keep_fp32)}


def check_group_size(layers: dict[str, nn.Linear], group_size: int) -> None:
    for name, layer in layers.items():
        if layer.in_features % group_size:
            raise RecipeError(f"quantize.group_size: {group_size} does not divide the {layer.in_features} input "
                              f"features of {name}; choose a divisor, or keep it in float with keep_fp32")


def check_awq_supported(model: nn.Module) -> None:
    if model.config.model_type not in FAMILIES or not FAMILIES[model.config.model_type].awq_pairs:
        known = ", ".join(name for name, arch in FAMILIES.items() if arch.awq_pairs)
        raise RecipeError(f"quantize.method awq: no AWQ scale pairs known for model family "
                          f"{model.config.model_type!r} (known: {known}); use rtn or gptq")


def quantize_weight_only(model: nn.Module, layers: list[str], method: str, bits: int, group_size: int,
                         symmetric: bool, calibration: list[dict[str, np.ndarray]] | None = None) -> nn.Module:
    """Quantize the named Linear layers of `model` in place with neural-compressor; returns the model, whose
    layers are now `WeightOnlyLinear`s."""
    from neural_compressor.torch.quantization import convert, prepare

    # INC keeps biases (and GPTQ's scales) in float16; the float biases stay as they were.
    biases = {name: _float_copy(model.get_submodule(name).bias) for name in layers}
    config = _inc_config(model, layers, method, bits, group_size, symmetric)
    batches = [_torch_batch(model, batch) for batch in calibration or []]
    try:
        example = {"example_inputs": batches[0]["input_ids"]} if method == "awq" else {}
        prepared = prepare(model, config, **example)
        with torch.no_grad():
            for batch in batches:
                prepared(**batch)
        # Float32 scales where INC allows it (RTN); its default "optimum" layout keeps float16 ones.
        converted = convert(prepared, use_optimum_format=False)
    except Exception as err:  # INC raises anything from assertions to tracer errors
        raise BackendError(f"quantize.backend neural-compressor ({method}) failed on this model: "
                          f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}; "
                          f"{BACKEND_FALLBACK}") from err
    for attribute in INC_ATTRIBUTES:
        converted.__dict__.pop(attribute, None)
    for name in layers:
        converted.set_submodule(name, _from_inc(converted.get_submodule(name), name, method, symmetric,
                                                biases[name]))
    return converted.eval()


def _inc_config(model: nn.Module, layers: list[str], method: str, bits: int, group_size: int,
                symmetric: bool) -> Any:
    from neural_compressor.torch.quantization import AWQConfig, GPTQConfig, RTNConfig

    common = {"bits": bits, "group_size": group_size, "use_sym": symmetric, "quant_lm_head": "lm_head" in layers}
    if method == "rtn":
        config = RTNConfig(**common, use_layer_wise=False)
    elif method == "gptq":
        # INC resolves `model_path` even when not loading layer by layer; an existing directory stops it
        # from asking the hub. Nothing is read there.
        config = GPTQConfig(**common, model_path=tempfile.gettempdir())
    else:
        config = AWQConfig(**common, folding=True, absorb_layer_dict=_awq_scale_pairs(model))
    make_float = {"rtn": RTNConfig, "gptq": GPTQConfig, "awq": AWQConfig}[method]
    wanted = set(layers)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name not in wanted:
            config.set_local(re.escape(name) + "$", make_float(dtype="fp32"))
    return config


def _awq_scale_pairs(model: nn.Module) -> dict[str, list[str]]:
    config, arch = model.config, FAMILIES[model.config.model_type]
    pairs = dict(arch.awq_pairs)
    if getattr(config, "num_key_value_heads", config.num_attention_heads) == config.num_attention_heads:
        pairs |= arch.awq_value_pair
    return {norm: list(linears) for norm, linears in pairs.items()}


def _torch_batch(model: nn.Module, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    import inspect

    accepted = inspect.signature(model.forward).parameters
    return {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in batch.items()
            if key in accepted and key != "labels"}


def _from_inc(module: nn.Module, name: str, method: str, symmetric: bool,
              bias: torch.Tensor | None) -> WeightOnlyLinear:
    """Our layer from INC's INCWeightOnlyLinear: its integers (signed when symmetric in INC's own layout,
    shifted by 2^(bits-1) in the optimum layout) and its scales."""
    if not hasattr(module, "unpack"):
        raise BackendError(f"quantize.backend neural-compressor ({method}) left {name} as "
                          f"{type(module).__name__}, not quantized; {BACKEND_FALLBACK}")
    unpacked = module.unpack()
    g_idx = unpacked.get("g_idx")
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(module.in_features) // module.group_size):
        raise BackendError(f"quantize.backend neural-compressor ({method}) reordered the input features of {name}, "
                          f"which MatMulNBits cannot hold; {BACKEND_FALLBACK}")
    integers, scales, zero_points = unpacked["int_weight"].int(), unpacked["scales"], unpacked.get("zp")
    middle = 2 ** (module.bits - 1)
    if zero_points is None:
        integers = integers + middle
    elif symmetric:
        if not bool((zero_points == middle).all()):
            raise RecipeError(f"quantize.backend neural-compressor ({method}) gave {name} zero points other than "
                              f"{middle} for a symmetric scheme; {BACKEND_FALLBACK}")
        zero_points = None
    return WeightOnlyLinear.from_integers(integers, scales.float(), zero_points, module.bits, bias)


def _float_copy(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().clone()

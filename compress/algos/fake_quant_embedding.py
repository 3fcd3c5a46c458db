"""Fake-quantized embedding tables: each row symmetric int8 or int4 with its own scale, for quantization-aware
training to learn around. In MiniLM-L6 the word table is half of the parameters (11.7M of 22.7M), so a model
whose Linear layers are int8 is still mostly float on disk until its tables are quantized too.

Per row because a lookup reads whole rows: an exported graph gathers the rows' codes and scales and
dequantizes only those, never the table. The scale follows the row (max |row| / qmax) and is rounded to
float16, the precision it is stored in, so the graph multiplies by the very scale training saw.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from compress.algos.fake_quant import fake_quantize
from compress.arch import family
from compress.errors import RecipeError

BITS = (4, 8)
SMALLEST_SCALE = 2.0 ** -24  # the smallest positive float16: an all-zero row keeps a usable scale
# A table this small stays float: it weighs nothing, and each of its rows is added to many tokens, so its rounding
# error is a bias they all share (BERT's 2-row token type table in int4 cost MiniLM-L6 4 points of SST-2 alone).
MIN_ROWS = 16


def code_max(bits: int) -> int:
    """Symmetric codes -qmax..qmax (int4: -7..7, int8: -127..127), so that -w quantizes exactly as w."""
    return 2 ** (bits - 1) - 1


class FakeQuantEmbedding(nn.Module):
    """An Embedding looking up rows rounded to `bits`-bit codes times a per-row float16 scale, in float, with
    straight-through gradients. It takes over the Embedding's own weight parameter."""

    def __init__(self, embedding: nn.Embedding, bits: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.weight = embedding.weight
        self.bits = bits

    def row_scales(self) -> Tensor:
        """[rows, 1] float32 holding float16 values: max |row| / qmax (no gradient)."""
        peak = self.weight.detach().float().abs().amax(dim=1, keepdim=True)
        return (peak / code_max(self.bits)).to(torch.float16).float().clamp_min(SMALLEST_SCALE)

    def codes(self) -> Tensor:
        """The int8 codes [rows, dim] (within -qmax..qmax) the forward pass looks up (times `row_scales()`)."""
        qmax = code_max(self.bits)
        return torch.round(self.weight.detach().float() / self.row_scales()).clamp(-qmax, qmax).to(torch.int8)

    def forward(self, ids: Tensor) -> Tensor:
        rows = F.embedding(ids, self.weight, self.padding_idx)
        scales = F.embedding(ids, self.row_scales())
        qmax = code_max(self.bits)
        return fake_quantize(rows.float(), scales, torch.zeros_like(scales), -qmax, qmax).to(rows.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}"


def quantizable_embeddings(model: Any, keep_fp32: list[str]) -> list[str]:
    """Names of the embedding tables of at least MIN_ROWS rows under the family's embedding module, but those
    whose name holds a `keep_fp32` fragment; RecipeError for a table whose weight another module shares (a tied
    output head would be quantized twice, on two grids)."""
    prefix = f"{model.base_model_prefix}.{family(model.config.model_type).embeddings}"
    if not any(name == prefix for name, _ in model.named_modules()):
        prefix = family(model.config.model_type).embeddings  # the model is its base model
    sharers: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for parameter in module.parameters(recurse=False):
            sharers.setdefault(id(parameter), []).append(name)
    names = []
    for name, module in model.named_modules():
        if type(module) is not nn.Embedding or not (name == prefix or name.startswith(prefix + ".")):
            continue
        if module.num_embeddings < MIN_ROWS or any(fragment in name for fragment in keep_fp32):
            continue
        tied = [other for other in sharers[id(module.weight)] if other != name]
        if tied:
            raise RecipeError(f"qat.embedding_bits: {name} shares its weight with {tied[0]} (tied embeddings); "
                              f"keep it float with keep_fp32: [{name.rpartition('.')[2]}]")
        names.append(name)
    return names


def quantize_embeddings(model: nn.Module, names: list[str], bits: int) -> None:
    """Swap each named Embedding for a FakeQuantEmbedding, in place."""
    for name in names:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        if bits == 4 and getattr(owner, attr).embedding_dim % 2:
            raise RecipeError(f"qat.embedding_bits: 4-bit rows are stored two codes to a byte; {name} has an odd "
                              f"width ({getattr(owner, attr).embedding_dim})")
        setattr(owner, attr, FakeQuantEmbedding(getattr(owner, attr), bits))

"""Fake-quantized embedding tables: each row symmetric int8 or int4 with its own scale, for quantization-aware
training to learn around. In MiniLM-L6 the word table is half of the parameters (11.7M of 22.7M), so a model
whose Linear layers are int8 is still mostly float on disk until its tables are quantized too.

Per row because a lookup reads whole rows: an exported graph gathers the rows' codes and scales and
dequantizes only those, never the table. The scale follows the row and is rounded to float16, the precision it
is stored in, so the graph multiplies by the very scale training saw.

int8 and int4 rows are symmetric uniform codes (scale: max |row| / qmax). Eight uniform levels are too few for
the bell-shaped values of a word table: 3-bit rows use 8 levels fitted to the whole table (Lloyd-Max over the
rows divided by their standard deviation, the row's scale). On MiniLM-L6's stacked student (SST-2 dev), uniform
3-bit word rows lost 2.2 points against int4 rows, fitted ones between 0.7 and none.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from compress.algos.fake_quant import fake_quantize
from compress.arch import family
from compress.errors import RecipeError

BITS = (3, 4, 8)
FITTED_BITS = 3  # rows on levels fitted to the table rather than on a uniform grid
LLOYD_ITERATIONS = 30  # the levels move by under 1e-4 of the rows' scale after about 20
SMALLEST_SCALE = 2.0 ** -24  # the smallest positive float16: an all-zero row keeps a usable scale
# A table this small stays float: it weighs nothing, and each of its rows is added to many tokens, so its rounding
# error is a bias they all share (BERT's 2-row token type table in int4 cost MiniLM-L6 4 points of SST-2 alone).
MIN_ROWS = 16
ROW_MULTIPLE = {3: 8, 4: 2}  # codes packed whole into bytes: 8 three-bit codes fill 3 bytes, 2 four-bit codes 1


def code_max(bits: int) -> int:
    """Symmetric codes -qmax..qmax (int4: -7..7, int8: -127..127), so that -w quantizes exactly as w."""
    return 2 ** (bits - 1) - 1


class FakeQuantEmbedding(nn.Module):
    """An Embedding looking up rows rounded to `bits`-bit codes times a per-row float16 scale, in float, with
    straight-through gradients. It takes over the Embedding's own weight parameter. 3-bit rows fit their levels
    to the weight when built (`fit=False` leaves them for a saved state to fill)."""

    def __init__(self, embedding: nn.Embedding, bits: int, fit: bool = True) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.weight = embedding.weight
        self.bits = bits
        levels = None
        if bits == FITTED_BITS:
            levels = fit_levels(self.weight.detach()) if fit else torch.zeros(2 ** bits, device=self.weight.device)
        self.register_buffer("levels", levels)

    def row_scales(self) -> Tensor:
        """[rows, 1] float32 holding float16 values (no gradient): max |row| / qmax, or the row's standard
        deviation for fitted levels."""
        rows = self.weight.detach().float()
        if self.levels is not None:
            return _row_deviations(rows)
        peak = rows.abs().amax(dim=1, keepdim=True)
        return (peak / code_max(self.bits)).to(torch.float16).float().clamp_min(SMALLEST_SCALE)

    def codes(self) -> Tensor:
        """The int8 codes [rows, dim] the forward pass looks up: within -qmax..qmax, or the index of the nearest
        fitted level (0..7)."""
        return self._codes(self.weight.detach().float() / self.row_scales()).to(torch.int8)

    def code_values(self, codes: Tensor) -> Tensor:
        """What each code stands for, before the row's scale."""
        return codes.float() if self.levels is None else self.levels[codes.long()]

    def forward(self, ids: Tensor) -> Tensor:
        rows = F.embedding(ids, self.weight, self.padding_idx)
        scales = F.embedding(ids, self.row_scales())
        if self.levels is None:
            qmax = code_max(self.bits)
            return fake_quantize(rows.float(), scales, torch.zeros_like(scales), -qmax, qmax).to(rows.dtype)
        scaled = rows.float() / scales
        rounded = scaled + (self.code_values(self._codes(scaled)) - scaled).detach()
        return (rounded * scales).to(rows.dtype)

    def _codes(self, scaled: Tensor) -> Tensor:
        if self.levels is None:
            qmax = code_max(self.bits)
            return torch.round(scaled).clamp(-qmax, qmax)
        return torch.bucketize(scaled, _midpoints(self.levels))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}"


def fit_levels(weight: Tensor, bits: int = FITTED_BITS) -> Tensor:
    """2**bits levels, ascending, that minimise the squared rounding error of the rows divided by their scales
    (Lloyd-Max: each level moves to the mean of the values nearest it), starting from evenly spaced quantiles."""
    values = (weight.float() / _row_deviations(weight.float())).flatten()
    count = 2 ** bits
    sample = values[:: max(1, values.numel() // 1_000_000)]  # torch.quantile's input is bounded
    levels = torch.quantile(sample, (torch.arange(count, device=values.device) + 0.5) / count)
    for _ in range(LLOYD_ITERATIONS):
        nearest = torch.bucketize(values, _midpoints(levels))
        sums = torch.bincount(nearest, weights=values, minlength=count)
        counts = torch.bincount(nearest, minlength=count)
        levels = torch.where(counts > 0, sums / counts.clamp_min(1), levels)  # a level no value is nearest stays
    return levels.float()


def _row_deviations(rows: Tensor) -> Tensor:
    """[rows, 1]: each row's standard deviation as float16 holds it (a constant row keeps a usable scale)."""
    return rows.std(dim=1, keepdim=True).to(torch.float16).float().clamp_min(SMALLEST_SCALE)


def _midpoints(levels: Tensor) -> Tensor:
    return (levels[1:] + levels[:-1]) / 2


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


def bits_by_table(tables: list[str], bits: int | dict[str, int]) -> dict[str, int]:
    """Each table's bits: `bits` for all, or per name fragment (the first that a table's name holds; a table
    none names stays float). RecipeError for a fragment that names none of `tables`."""
    if isinstance(bits, int):
        return dict.fromkeys(tables, bits)
    unmatched = [fragment for fragment in bits if not any(fragment in name for name in tables)]
    if unmatched:
        raise RecipeError(f"qat.embedding_bits: {unmatched[0]!r} names none of the tables that can be quantized "
                          f"({', '.join(tables) or 'none'})")
    chosen = {name: next((value for fragment, value in bits.items() if fragment in name), None) for name in tables}
    return {name: value for name, value in chosen.items() if value is not None}


def quantize_embeddings(model: nn.Module, bits: dict[str, int], fit: bool = True) -> None:
    """Swap each named Embedding for a FakeQuantEmbedding of its bits, in place (`fit`: see FakeQuantEmbedding)."""
    for name, table_bits in bits.items():
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        width = getattr(owner, attr).embedding_dim
        codes_per_pack = ROW_MULTIPLE.get(table_bits, 1)
        if width % codes_per_pack:
            raise RecipeError(f"qat.embedding_bits: {table_bits}-bit rows pack {codes_per_pack} codes into "
                              f"{table_bits * codes_per_pack // 8} byte(s); {name}'s width ({width}) is not a "
                              f"multiple of {codes_per_pack}")
        setattr(owner, attr, FakeQuantEmbedding(getattr(owner, attr), table_bits, fit))

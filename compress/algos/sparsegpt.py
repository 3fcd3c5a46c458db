"""SparseGPT (Frantar & Alistarh 2023) and Wanda (Sun et al. 2023): one-shot pruning of one Linear layer from
its calibration inputs.

Wanda: score |W_ij| * ||X_j||, compared within each output row; no weight update.
SparseGPT: columns are pruned left to right in blocks; each pruned weight's error is spread over the not yet
visited columns through the inverse Hessian of the layer's reconstruction loss (optimal brain surgeon), and
the mask of each block is chosen by w^2 / [H^-1]_jj^2 at the block's start.
"""

from __future__ import annotations

import torch

from compress.algos.sparsity import lowest, nm_mask, row_masks

NM = tuple[int, int] | None


def wanda(weight: torch.Tensor, squares: torch.Tensor, sparsity: float, nm: NM) -> torch.Tensor:
    """The mask (True = kept) of an output-major `weight` whose inputs had per-feature sums of squares."""
    scores = weight.detach().abs().double() * squares.sqrt()[None, :].to(weight.device)
    return nm_mask(scores, *nm) if nm else row_masks(scores, sparsity)


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, nm: NM, block: int = 128,
              damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(new weight, mask) for an output-major `weight` and its inputs' X^T X; `damp` x mean diagonal is added
    to the Hessian's diagonal (and 1 where an input was always zero) so that it inverts."""
    w = weight.detach().double().clone()
    rows, columns = w.shape
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h += damp * torch.diag(h).mean() * torch.eye(columns, dtype=h.dtype)
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    keep = torch.ones_like(w, dtype=torch.bool)
    starts = list(range(0, columns, block))
    counts = split(round(sparsity * w.numel()), [rows * (min(s + block, columns) - s) for s in starts])
    for start, count in zip(starts, counts, strict=True):
        end = min(start + block, columns)
        part, local = w[:, start:end].clone(), inverse[start:end, start:end]
        diagonal = torch.diag(local)
        errors = torch.zeros_like(part)
        kept = torch.ones_like(part, dtype=torch.bool)
        if not nm:
            kept = lowest(part ** 2 / diagonal[None, :] ** 2, count)
        for i in range(end - start):
            if nm and i % nm[1] == 0:
                kept[:, i:i + nm[1]] = nm_mask(part[:, i:i + nm[1]] ** 2 / diagonal[None, i:i + nm[1]] ** 2, *nm)
            pruned = part[:, i] * kept[:, i]
            errors[:, i] = (part[:, i] - pruned) / diagonal[i]
            part[:, i:] -= errors[:, i:i + 1] @ local[i:i + 1, i:]
            part[:, i] = pruned
        w[:, start:end] = part
        w[:, end:] -= errors @ inverse[start:end, end:]
        keep[:, start:end] = kept
    return (w * keep).to(weight.dtype), keep


def split(total: int, sizes: list[int]) -> list[int]:
    """`total` shared out in proportion to `sizes`, largest remainders first, summing exactly to `total`."""
    whole = sum(sizes)
    shares = [total * size / whole for size in sizes]
    counts = [int(share) for share in shares]
    for index in sorted(range(len(sizes)), key=lambda i: counts[i] - shares[i])[:total - sum(counts)]:
        counts[index] += 1
    return counts

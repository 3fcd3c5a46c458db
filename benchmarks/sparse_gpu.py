"""2:4 sparsity where a runtime exploits it: NVIDIA sparse tensor cores through torch's semi-structured sparse
tensors (cuSPARSELt, or CUTLASS), against the same dense fp16 matrices, side by side in one run.

The layers have SmolLM2-135M's Linear shapes (and, for scale, Llama-2-7B's MLP); their weights are random
with `compress`'s own 2:4 mask applied (speed does not depend on the values; the sparse product is checked
against the dense product of the masked weights). Run on a machine with an NVIDIA GPU (Ampere or later):

    python benchmarks/sparse_gpu.py [--out results.json]
    python benchmarks/sparse_gpu.py --probe   # where a 2:4 product's fixed cost goes
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from compress.algos.sparsity import nm_mask

SHAPES = {  # (out_features, in_features) per Linear of one block
    "smollm2-135m": {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
                     "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)},
    "llama-2-7b mlp": {"gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)},
}
BLOCKS = {"smollm2-135m": 30, "llama-2-7b mlp": 32}
TOKENS = (1, 16, 128, 2048, 8192)  # rows of the activation: decode (1 token) up to a long prefill


def median_ms(fn, runs: int = 30, calls: int = 20, warmup: int = 10) -> float:
    """Median over `runs` of the mean time of `calls` back-to-back calls (CUDA events around the loop): what a
    layer costs inside a model, where calls follow one another without synchronising."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--probe", action="store_true", help="where a 2:4 product's fixed cost goes, and stop")
    args = parser.parse_args()
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    if args.probe:
        for shape in ((1536, 576, 2048), (11008, 4096, 2048), (11008, 4096, 8192)):
            probe(*shape, to_sparse_semi_structured)
        return

    torch.manual_seed(0)
    device = torch.device("cuda")
    rows, refused = [], {}
    for backend in ("cuSPARSELt", "CUTLASS"):
        SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "CUTLASS"
        try:
            rows += measure(backend, device, to_sparse_semi_structured)
        except RuntimeError as why:  # e.g. CUTLASS's kernels are built for compute capability 8.x only
            refused[backend] = str(why).splitlines()[0]
            print(f"{backend}: cannot run here: {refused[backend]}")
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "dtype": "float16", "rows": rows, "refused": refused}
    print(f"{result['gpu']}, torch {result['torch']}, CUDA {result['cuda']}, fp16; ms per call")
    print(f"{'backend':10} {'model':16} {'layer':38} {'tokens':>6} {'dense ms':>9} {'2:4 ms':>9} {'x':>6}")
    for row in rows:
        print(f"{row['backend']:10} {row['model']:16} {row['layer']:38} {row['tokens']:>6} {row['dense_ms']:>9.4f} "
              f"{row['sparse_ms']:>9.4f} {row['speedup']:>6.2f}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)


def probe(out_features: int, in_features: int, tokens: int, to_sparse) -> None:
    """Eager F.linear vs the raw cuSPARSELt call vs torch.compile, for one layer."""
    weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.float16)
    weight = weight * nm_mask(weight.abs().float(), 2, 4).to(weight.dtype)
    sparse = to_sparse(weight)
    x = torch.randn(tokens, in_features, device="cuda", dtype=torch.float16)
    xt = x.t().contiguous()
    compiled = torch.compile(lambda a, w: torch.nn.functional.linear(a, w))
    rows = {
        "dense F.linear": median_ms(lambda: torch.nn.functional.linear(x, weight)),
        "2:4 F.linear (eager)": median_ms(lambda: torch.nn.functional.linear(x, sparse)),
        "2:4 raw _cslt_sparse_mm(W, x^T)": median_ms(lambda: torch._cslt_sparse_mm(sparse.packed, xt)),
        "2:4 F.linear (torch.compile)": median_ms(lambda: compiled(x, sparse)),
    }
    print(f"W {out_features}x{in_features}, {tokens} tokens: "
          + ", ".join(f"{name} {ms:.4f} ms" for name, ms in rows.items()))


def measure(backend: str, device: torch.device, to_sparse) -> list[dict]:
    rows = []
    for model, layers in SHAPES.items():
        for tokens in TOKENS:
            dense_total = sparse_total = 0.0
            for name, (out_features, in_features) in layers.items():
                weight = torch.randn(out_features, in_features, device=device, dtype=torch.float16)
                weight = weight * nm_mask(weight.abs().float(), 2, 4).to(weight.dtype)
                sparse = to_sparse(weight)
                x = torch.randn(tokens, in_features, device=device, dtype=torch.float16)
                dense_out, sparse_out = torch.nn.functional.linear(x, weight), torch.nn.functional.linear(x, sparse)
                error = float((dense_out - sparse_out).abs().max())
                dense_ms = median_ms(lambda x=x, w=weight: torch.nn.functional.linear(x, w))
                sparse_ms = median_ms(lambda x=x, w=sparse: torch.nn.functional.linear(x, w))
                dense_total += dense_ms
                sparse_total += sparse_ms
                rows.append({"backend": backend, "model": model, "layer": name, "shape": [out_features, in_features], "tokens": tokens,
                             "dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms,
                             "max_abs_diff": error})
            rows.append({"backend": backend, "model": model, "layer": f"one block's Linears (x{BLOCKS[model]} blocks)",
                         "tokens": tokens, "dense_ms": dense_total, "sparse_ms": sparse_total,
                         "speedup": dense_total / sparse_total})
    return rows


if __name__ == "__main__":
    main()

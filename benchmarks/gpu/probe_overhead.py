"""Where the fixed cost of a 2:4 product goes (eager F.linear vs the raw cuSPARSELt call vs torch.compile)."""

import statistics

import torch
from torch.sparse import to_sparse_semi_structured

from compress.algos.sparsity import nm_mask


def per_call_ms(fn, calls=20, runs=30):
    for _ in range(10):
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


def probe(out_features: int, in_features: int, tokens: int) -> None:
    weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.float16)
    weight = weight * nm_mask(weight.abs().float(), 2, 4).to(weight.dtype)
    sparse = to_sparse_semi_structured(weight)
    x = torch.randn(tokens, in_features, device="cuda", dtype=torch.float16)
    xt = x.t().contiguous()
    compiled = torch.compile(lambda a, w: torch.nn.functional.linear(a, w))
    rows = {
        "dense F.linear": per_call_ms(lambda: torch.nn.functional.linear(x, weight)),
        "2:4 F.linear (eager)": per_call_ms(lambda: torch.nn.functional.linear(x, sparse)),
        "2:4 raw _cslt_sparse_mm(W, x^T)": per_call_ms(lambda: torch._cslt_sparse_mm(sparse.packed, xt)),
        "2:4 F.linear (torch.compile)": per_call_ms(lambda: compiled(x, sparse)),
    }
    print(f"W {out_features}x{in_features}, {tokens} tokens: "
          + ", ".join(f"{name} {ms:.4f} ms" for name, ms in rows.items()))


for shape in ((1536, 576, 2048), (11008, 4096, 2048), (11008, 4096, 8192)):
    probe(*shape)

"""Torch model -> portable ONNX graph with optimum's exporter; ONNX Runtime's transformer fusions on a graph."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import onnx

from compress.arch import TASKS, family, is_text_stream
from compress.artifact import GRAPH, GRAPH_DATA, graph_files
from compress.errors import BadInput

# Measured on MiniLM-L6 (2 threads, batch 1, seq 128, AVX2): the Python fusions alone (level 0) run as fast
# as with ORT's level-1/2 rewrites first, and as optimum's ORTOptimizer at level 2 (the session applies those
# rewrites at load time anyway). On Llama, level 1 loses the RotaryEmbedding fusion and level 2 breaks shape
# inference.
FUSION_OPT_LEVEL = 0


def export_onnx(model: Any, task: str, out_path: Path, opset: int, kv_cache: bool = False) -> Path:
    """Write `model` as an fp32 ONNX graph to `out_path`; the weights of a graph over 2 GB go to
    `model.onnx_data` beside it. With `kv_cache` (causal LMs) the one graph also takes `past_key_values.*`
    inputs and returns `present.*` outputs, so a generator can feed each step's cache to the next."""
    from optimum.exporters.onnx import onnx_export_from_model

    if kv_cache and not is_text_stream(task):
        raise BadInput(f"kv_cache: only a causal LM generates, not a {task} model")
    optimum_task = TASKS[task].optimum_task + ("-with-past" if kv_cache else "")

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    use_cache = getattr(model.config, "use_cache", None)
    # optimum writes config and tokenizer files beside the graph; keep only the graph.
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out_path.parent) as scratch:
        try:
            with warnings.catch_warnings():  # tracer chatter about Python-side shapes; verification is the check
                warnings.simplefilter("ignore")
                onnx_export_from_model(model, scratch, opset=opset, task=optimum_task, do_validation=False)
        finally:
            if use_cache is not None:  # optimum's model patcher switches the cache off in the live config for good
                model.config.use_cache = use_cache
        graph, *external = graph_files(Path(scratch) / GRAPH)
        shutil.move(graph, out_path)
        for data in external:  # the graph refers to its weights file by this very name
            shutil.move(data, out_path.with_name(GRAPH_DATA))
    return out_path


def fuse_for_onnxruntime(path: Path, config: Any) -> dict[str, int]:
    """Fuse attention, layer norms and GELU in place into ONNX Runtime's own ops, keeping fp32; returns how
    many of each were fused."""
    from onnxruntime.transformers.fusion_options import AttentionMaskFormat, FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    arch = family(config.model_type)
    options = FusionOptions(arch.ort_model_type)
    options.enable_gelu_approximation = False
    # BERT's default turns the mask into per-row lengths, which is wrong for left-padded rows; the raw mask
    # is as fast.
    options.attention_mask_format = AttentionMaskFormat.AttentionMask
    # Blocks that kept different head counts (structured pruning): 0 lets the fuser read each block's count
    # and width from its own reshape.
    uniform = not getattr(config, "pruned_heads", None) and "num_attention_heads" not in (
        getattr(config, "layer_shapes", None) or {})
    optimized = optimize_model(
        str(path),
        model_type=arch.ort_model_type,
        num_heads=getattr(config, arch.heads_attr) if uniform else 0,
        hidden_size=getattr(config, arch.hidden_attr) if uniform else 0,
        optimization_options=options,
        opt_level=FUSION_OPT_LEVEL,
    )
    optimized.save_model_to_file(str(path), use_external_data_format=len(graph_files(path)) > 1)
    return {op: count for op, count in optimized.get_fused_operator_statistics().items() if count}


def graph_runtime(path: Path) -> str:
    """'portable' when every node is a default-domain ONNX op, else 'onnxruntime' (its contrib ops)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    custom = any(node.domain not in ("", "ai.onnx") for node in graph.node)
    return "onnxruntime" if custom else "portable"


def save_graph(model: onnx.ModelProto, target: Path, external_data: bool) -> None:
    """Write `model` to `target`, its weights to `model.onnx_data` beside it when `external_data`."""
    onnx.save_model(model, str(target), save_as_external_data=external_data, all_tensors_to_one_file=True,
                    location=GRAPH_DATA)


def graph_bytes(path: Path) -> int:
    """The graph's size on disk, with its external weights."""
    return sum(file.stat().st_size for file in graph_files(Path(path)))

"""Architecture knowledge, in one table: what each model family and task needs from the libraries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from compress.errors import ModelLoadError


@dataclass(frozen=True)
class Family:
    ort_model_type: str  # onnxruntime.transformers.optimizer's name for the fusion patterns
    embeddings: str  # the embedding module, as an attribute path from `model.base_model`
    layers: str  # the ModuleList of transformer blocks, as an attribute path from `model.base_model`
    # Inside one block: the attention's query, key and value projections (None where they are fused in one).
    qkv: tuple[str, str, str] | None
    heads_attr: str = "num_attention_heads"
    hidden_attr: str = "hidden_size"
    layers_attr: str = "num_hidden_layers"
    intermediate_attr: str = "intermediate_size"
    # Structured pruning. Inside one block: the attention's output projection (its input columns are the heads,
    # head after head), the FFN's input projections (their output rows are the neurons) and output projection.
    attention_out: str = ""
    ffn_in: tuple[str, ...] = ()
    ffn_out: str = ""
    # "transformers": the model's own `prune_heads` (BERT, GPT-2...), reloaded from `config.pruned_heads`.
    # "grouped-query": query heads leave each key-value group evenly (Llama), reloaded from `config.layer_shapes`.
    head_pruning: str = "transformers"
    # AWQ moves per-channel scales from quantized Linears into what feeds them: per block, the norm or Linear
    # whose output they all read -> those Linears. neural-compressor finds these by tracing with torch.jit, which
    # fails on transformers' Llama and silently leaves plain RTN, so they are named here.
    awq_pairs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    awq_value_pair: dict[str, tuple[str, ...]] = field(default_factory=dict)  # only without grouped-query attention


BERT_QKV = ("attention.self.query", "attention.self.key", "attention.self.value")
BERT_UNITS = {"attention_out": "attention.output.dense", "ffn_in": ("intermediate.dense",), "ffn_out": "output.dense"}
FAMILIES: dict[str, Family] = {
    "bert": Family("bert", "embeddings", "encoder.layer", BERT_QKV, **BERT_UNITS),
    "roberta": Family("bert", "embeddings", "encoder.layer", BERT_QKV, **BERT_UNITS),
    "distilbert": Family("bert", "embeddings", "transformer.layer",
                         ("attention.q_lin", "attention.k_lin", "attention.v_lin"), heads_attr="n_heads",
                         hidden_attr="dim", layers_attr="n_layers", intermediate_attr="hidden_dim",
                         attention_out="attention.out_lin", ffn_in=("ffn.lin1",), ffn_out="ffn.lin2"),
    # Conv1D layers (weights stored input-major) and one fused query-key-value projection.
    "gpt2": Family("gpt2", "wte", "h", None, heads_attr="n_head", hidden_attr="n_embd", layers_attr="n_layer",
                   intermediate_attr="n_inner", attention_out="attn.c_proj", ffn_in=("mlp.c_fc",),
                   ffn_out="mlp.c_proj"),
    # No Llama fuser in ORT; the GPT-2 one still fuses what it can.
    "llama": Family("gpt2", "embed_tokens", "layers", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                    attention_out="self_attn.o_proj", ffn_in=("mlp.gate_proj", "mlp.up_proj"),
                    ffn_out="mlp.down_proj", head_pruning="grouped-query",
                    awq_pairs={"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                               "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
                               "mlp.up_proj": ("mlp.down_proj",)},
                    awq_value_pair={"self_attn.v_proj": ("self_attn.o_proj",)}),
}


@dataclass(frozen=True)
class TaskSpec:
    auto_class: str  # transformers class name
    ort_class: str  # optimum.onnxruntime class name
    optimum_task: str  # optimum exporter task
    metric: str
    higher_is_better: bool
    # Classification reads rows with labels; a causal LM reads its text as one token stream, cut into blocks
    # (training) or windows (perplexity), scored per token.
    text_stream: bool


TASKS: dict[str, TaskSpec] = {
    "sequence-classification": TaskSpec("AutoModelForSequenceClassification", "ORTModelForSequenceClassification",
                                        "text-classification", "accuracy", True, text_stream=False),
    "causal-lm": TaskSpec("AutoModelForCausalLM", "ORTModelForCausalLM", "text-generation", "perplexity", False,
                          text_stream=True),
}


def is_text_stream(task: str) -> bool:
    return TASKS[task].text_stream


def auto_class(task: str) -> Any:
    """The transformers Auto class that loads a model for `task`."""
    import transformers

    return getattr(transformers, TASKS[task].auto_class)


def family(model_type: str) -> Family:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ModelLoadError(
            f"model family {model_type!r} is not in compress/arch.py yet (known: {', '.join(FAMILIES)})"
        ) from None

"""Architecture knowledge, in one table: what each model family and task needs from the libraries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from compress.errors import ModelLoadError


@dataclass(frozen=True)
class Family:
    ort_model_type: str  # onnxruntime.transformers.optimizer's name for the fusion patterns
    embeddings: str  # the embedding module, as an attribute path from `model.base_model`
    heads_attr: str = "num_attention_heads"
    hidden_attr: str = "hidden_size"


FAMILIES: dict[str, Family] = {
    "bert": Family("bert", "embeddings"),
    "roberta": Family("bert", "embeddings"),
    "distilbert": Family("bert", "embeddings", heads_attr="n_heads", hidden_attr="dim"),
    "gpt2": Family("gpt2", "wte", heads_attr="n_head", hidden_attr="n_embd"),
    "llama": Family("gpt2", "embed_tokens"),  # no Llama fuser in ORT; the GPT-2 one still fuses what it can
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

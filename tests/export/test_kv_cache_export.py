"""A causal LM exported with its KV cache: the passes after export keep working, and generation with the
cache produces what torch generates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from compress.errors import BadInput
from compress.eval.runners import OrtRunner, TorchRunner, greedy_tokens
from compress.export.onnx import export_onnx, fuse_for_onnxruntime, graph_runtime
from compress.export.quantize import quantize_dynamic_int8
from compress.export.verify import real_tokens_only, verify_float
from compress.settings import FloatTolerance

NEW_TOKENS = 12
CACHE_INPUTS = ["past_key_values.0.key", "past_key_values.0.value", "past_key_values.1.key",
                "past_key_values.1.value"]


@pytest.fixture(scope="module")
def lively_llama(tiny_causal_lm):
    """The tiny Llama's shape with larger random weights: the shared one, nearly uniform, repeats one token
    forever, which would let a broken cache go unnoticed."""
    import torch
    from transformers import LlamaForCausalLM

    config = tiny_causal_lm[0].config.to_dict()
    config["initializer_range"] = 0.5
    torch.manual_seed(0)
    return LlamaForCausalLM(type(tiny_causal_lm[0].config).from_dict(config)).eval()


@pytest.fixture(scope="module")
def graphs(lively_llama, tmp_path_factory) -> dict[str, Path]:
    """Exported without and with the cache, each as exported, fused, and fused then dynamically quantized."""
    out = {}
    for kv_cache in (False, True):
        directory = tmp_path_factory.mktemp(f"kv-cache-{kv_cache}")
        exported = export_onnx(lively_llama, "causal-lm", directory / "exported.onnx", opset=17, kv_cache=kv_cache)
        out[kv_cache, "portable"] = graph_runtime(exported)
        fused = directory / "fused.onnx"
        fused.write_bytes(exported.read_bytes())
        fuse_for_onnxruntime(fused, lively_llama.config)
        quantize_dynamic_int8(fused, directory / "int8.onnx", per_channel=False, reduce_range=False)
        out.update({(kv_cache, stage): directory / f"{stage}.onnx" for stage in ("exported", "fused", "int8")})
    return out


def prompt(lm_evalset) -> np.ndarray:
    return lm_evalset.real_token_inputs(batch_size=2, seq_len=16)["input_ids"]


def test_the_graph_takes_and_returns_the_cache_and_stays_portable(graphs):
    graph = onnx.load(str(graphs[True, "exported"])).graph
    names = {value.name for value in graph.input}
    assert {"input_ids", "attention_mask", "position_ids", *CACHE_INPUTS} == names
    assert [value.name for value in graph.output] == ["logits", *(n.replace("past_key_values", "present")
                                                                 for n in CACHE_INPUTS)]
    assert graphs[True, "portable"] == graphs[False, "portable"] == "portable"
    assert OrtRunner(graphs[False, "exported"]).cannot_generate == "no KV cache in the graph"
    assert OrtRunner(graphs[True, "int8"]).cannot_generate is None


def test_a_classifier_has_no_cache_to_export(tiny_classifier, tmp_path):
    with pytest.raises(BadInput, match="only a causal LM"):
        export_onnx(tiny_classifier[0], "sequence-classification", tmp_path / "model.onnx", opset=17, kv_cache=True)
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize("stage", ["fused", "int8"])
def test_perplexity_logits_with_an_empty_cache_match_the_graph_without(graphs, lm_evalset, stage):
    features = lm_evalset.features
    with_cache = OrtRunner(graphs[True, stage]).logits(features)
    without = OrtRunner(graphs[False, stage]).logits(features)
    assert with_cache.shape == without.shape == (*features["input_ids"].shape, without.shape[-1])
    checked = verify_float(real_tokens_only(without, features), real_tokens_only(with_cache, features),
                           FloatTolerance())
    assert checked["max_abs_diff"] < 1e-4


def test_greedy_generation_with_the_cache_matches_torch(lively_llama, graphs, lm_evalset):
    import torch

    input_ids = prompt(lm_evalset)
    expected = lively_llama.generate(torch.from_numpy(input_ids), attention_mask=torch.ones_like(
        torch.from_numpy(input_ids)), do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
        pad_token_id=0)[:, input_ids.shape[1]:].numpy()
    assert len(np.unique(expected)) > NEW_TOKENS // 2, "a model that repeats itself would prove nothing"
    for runner in (TorchRunner(lively_llama), OrtRunner(graphs[True, "fused"])):
        generated = np.stack(list(greedy_tokens(runner, input_ids, NEW_TOKENS)), axis=1)
        np.testing.assert_array_equal(generated, expected)


def test_the_quantized_graph_generates_with_its_cache_what_it_computes_without(graphs, lm_evalset):
    input_ids = prompt(lm_evalset)
    generated = np.stack(list(greedy_tokens(OrtRunner(graphs[True, "int8"]), input_ids, NEW_TOKENS)), axis=1)
    # Every generated token again, from the whole sequence before it in one pass without a cache.
    sequence = np.concatenate([input_ids, generated[:, :-1]], axis=1)
    logits = OrtRunner(graphs[False, "int8"]).logits({"input_ids": sequence,
                                                       "attention_mask": np.ones_like(sequence)})
    recomputed = logits[:, input_ids.shape[1] - 1:].argmax(-1)
    np.testing.assert_array_equal(generated[:, 0], recomputed[:, 0])  # the prefill is that very pass
    # Dynamic quantization scales activations per call, so a one-token step is not bit-equal to its position
    # inside the whole sequence and a near tie may flip; a broken cache would agree by chance (1 in the vocab).
    assert (recomputed == generated).mean() >= 0.6

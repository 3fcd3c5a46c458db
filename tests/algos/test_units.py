import copy

import pytest
import torch

from compress.algos.shrink import remove_heads, remove_neurons
from compress.algos.units import HEADS, NEURONS, gated, heads_per_layer, kv_groups, neurons_per_layer

SENTENCES = ["good movie and a great plot", "awful film", "the actor was not very fun but the story was"]


@pytest.fixture(params=["bert", "llama"])
def model_and_inputs(request):
    """(model, inputs): shared, deepcopy before changing the model."""
    model, tokenizer = request.getfixturevalue(request.param)
    return model, tokenizer(SENTENCES, padding=True, return_tensors="pt")


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def zero_gate(model, kind, layer, unit):
    """A gate function that is 1 everywhere but on `unit` of block `layer`."""
    counts = {HEADS: heads_per_layer(model), NEURONS: neurons_per_layer(model)}

    def gate(gate_kind, gate_layer):
        values = torch.ones(counts[gate_kind][gate_layer])
        if (gate_kind, gate_layer) == (kind, layer):
            values[unit] = 0
        return values

    return gate


def gated_logits(model, inputs, gate):
    with gated(model, gate):
        return logits(model, inputs)


def test_unit_counts_of_the_tiny_fixtures(tiny_classifier, tiny_causal_lm):
    bert, llama = tiny_classifier[0], tiny_causal_lm[0]
    assert heads_per_layer(bert) == [2, 2]
    assert neurons_per_layer(bert) == [64, 64]
    assert [kv_groups(bert, layer) for layer in range(2)] == [1, 1]
    assert heads_per_layer(llama) == [4, 4]
    assert neurons_per_layer(llama) == [64, 64]
    assert [kv_groups(llama, layer) for layer in range(2)] == [2, 2]


def test_unit_counts_follow_removal(bert, llama):
    bert_model, llama_model = copy.deepcopy(bert[0]), copy.deepcopy(llama[0])
    remove_heads(bert_model, {0: [1], 2: [0, 3]})
    remove_neurons(bert_model, {1: [0, 5, 63]})
    assert heads_per_layer(bert_model) == [3, 4, 2]
    assert neurons_per_layer(bert_model) == [64, 61, 64]
    remove_heads(llama_model, {1: [0, 3]})
    remove_neurons(llama_model, {2: list(range(10))})
    assert heads_per_layer(llama_model) == [4, 2, 4]
    assert neurons_per_layer(llama_model) == [64, 64, 54]
    assert kv_groups(llama_model, 1) == 2  # key-value heads are never removed


def test_all_ones_gates_leave_the_logits_unchanged(model_and_inputs):
    model, inputs = model_and_inputs
    ones = {HEADS: heads_per_layer(model), NEURONS: neurons_per_layer(model)}
    seen = []
    expected = logits(model, inputs)

    def gate(kind, layer):
        seen.append((kind, layer))
        return torch.ones(ones[kind][layer])

    assert torch.equal(gated_logits(model, inputs, gate), expected)
    assert {(kind, layer) for kind in (HEADS, NEURONS) for layer in range(3)} <= set(seen)
    # The hooks are gone afterwards.
    assert torch.equal(logits(model, inputs), expected)


def test_gated_records_each_unit_output_and_removes_its_hooks(model_and_inputs):
    model, inputs = model_and_inputs
    shapes = {}

    def record(kind, layer, units):
        shapes[kind, layer] = tuple(units.shape)

    with gated(model, lambda kind, layer: None, record):
        logits(model, inputs)
    batch, tokens = inputs["input_ids"].shape
    width = model.config.hidden_size // model.config.num_attention_heads
    for layer in range(3):
        assert shapes[HEADS, layer] == (batch, tokens, model.config.num_attention_heads, width)
        assert shapes[NEURONS, layer] == (batch, tokens, model.config.intermediate_size, 1)
    shapes.clear()
    logits(model, inputs)
    assert shapes == {}


def test_gated_removes_its_hooks_on_error(model_and_inputs):
    model, _ = model_and_inputs
    with pytest.raises(RuntimeError, match="boom"), gated(model, lambda kind, layer: None):
        raise RuntimeError("boom")
    for module in model.modules():
        assert not module._forward_pre_hooks


@pytest.mark.parametrize(("layer", "head"), [(0, 0), (1, 3), (2, 2)])
def test_a_zero_head_gate_is_that_head_removed(model_and_inputs, layer, head):
    model, inputs = model_and_inputs
    expected = gated_logits(model, inputs, zero_gate(model, HEADS, layer, head))
    # The head matters, and it is that head: gating another one gives other logits.
    assert not torch.allclose(expected, logits(model, inputs), atol=1e-3)
    other = gated_logits(model, inputs, zero_gate(model, HEADS, layer, (head + 1) % 4))
    assert not torch.allclose(expected, other, atol=1e-3)
    pruned = copy.deepcopy(model)
    if model.config.model_type == "llama":
        # Grouped-query heads go evenly from each key-value group: gate the partner head too.
        partner = (head + 2) % 4
        remove_heads(pruned, {layer: [head, partner]})
        gate_one, gate_two = zero_gate(model, HEADS, layer, head), zero_gate(model, HEADS, layer, partner)
        expected = gated_logits(model, inputs, lambda kind, i: gate_one(kind, i) * gate_two(kind, i))
    else:
        remove_heads(pruned, {layer: [head]})
    torch.testing.assert_close(logits(pruned, inputs), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("layer", "neuron"), [(0, 0), (1, 37), (2, 63)])
def test_a_zero_neuron_gate_is_that_neuron_removed(model_and_inputs, layer, neuron):
    model, inputs = model_and_inputs
    expected = gated_logits(model, inputs, zero_gate(model, NEURONS, layer, neuron))
    assert not torch.allclose(expected, logits(model, inputs), atol=1e-4)
    pruned = copy.deepcopy(model)
    remove_neurons(pruned, {layer: [neuron]})
    torch.testing.assert_close(logits(pruned, inputs), expected, atol=1e-5, rtol=1e-5)

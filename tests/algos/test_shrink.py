import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel

import compress  # noqa: F401  (teaches from_pretrained the per-layer shapes)
from compress.algos.shrink import (
    apply_layer_shapes,
    drop_layers,
    install_reload_hook,
    record_shapes,
    remove_heads,
    remove_neurons,
)
from compress.algos.units import HEADS, NEURONS, gated, heads_per_layer, neurons_per_layer
from tests.algos.conftest import variant

SENTENCES = ["good movie and a great plot", "awful film", "the actor was not very fun but the story was"]
AUTO_CLASSES = {"bert": AutoModelForSequenceClassification, "llama": AutoModelForCausalLM}
HIDDEN, HEAD = 32, 8  # the conftest models: 4 heads of width 8


@pytest.fixture(params=["bert", "llama"])
def family_model(request):
    """(a copy of the model, inputs, family name)."""
    model, tokenizer = request.getfixturevalue(request.param)
    return copy.deepcopy(model), tokenizer(SENTENCES, padding=True, return_tensors="pt"), request.param


# Heads removed per block, valid for both families: Llama loses one query head from each key-value group.
HEADS_REMOVED = {0: [1, 3], 2: [0, 2]}
NEURONS_REMOVED = {0: [0, 1, 2], 1: [5, 63]}


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def parameters(model):
    return sum(p.numel() for p in model.parameters())


def zero_gates(model, heads, neurons):
    counts = {HEADS: heads_per_layer(model), NEURONS: neurons_per_layer(model)}
    removed = {HEADS: heads, NEURONS: neurons}

    def gate(kind, layer):
        values = torch.ones(counts[kind][layer])
        values[removed[kind].get(layer, [])] = 0
        return values

    return gate


def gated_logits(model, inputs, heads, neurons=None):
    with gated(model, zero_gates(model, heads, neurons or {})):
        return logits(model, inputs)


def head_parameters(name):
    if name == "bert":  # query, key and value rows with their biases, and output-projection columns
        return 3 * (HEAD * HIDDEN + HEAD) + HIDDEN * HEAD
    return 2 * HEAD * HIDDEN  # Llama: query rows and output-projection columns; key-value heads stay


def neuron_parameters(name):
    if name == "bert":  # intermediate row and bias, output column
        return HIDDEN + 1 + HIDDEN
    return 3 * HIDDEN  # gate and up rows, down column


def test_removing_heads_drops_exactly_their_parameters(family_model):
    model, _, name = family_model
    before = parameters(model)
    remove_heads(model, HEADS_REMOVED)
    assert heads_per_layer(model) == [2, 4, 2]
    assert before - parameters(model) == 4 * head_parameters(name)


def test_removing_neurons_drops_exactly_their_parameters(family_model):
    model, _, name = family_model
    before = parameters(model)
    remove_neurons(model, NEURONS_REMOVED)
    assert neurons_per_layer(model) == [61, 62, 64]
    assert before - parameters(model) == 5 * neuron_parameters(name)


def test_drop_layers_gives_a_copy_without_those_blocks(family_model):
    model, inputs, _ = family_model
    before, expected = copy.deepcopy(model.state_dict()), logits(model, inputs)
    block = sum(p.numel() for p in model.base_model.get_submodule(
        "encoder.layer.1" if model.config.model_type == "bert" else "layers.1").parameters())
    dropped = drop_layers(model, [1])
    assert dropped.config.num_hidden_layers == 2
    assert parameters(model) - parameters(dropped) == block
    # The original is untouched.
    assert model.config.num_hidden_layers == 3
    assert all(torch.equal(tensor, before[key]) for key, tensor in model.state_dict().items())
    assert torch.equal(logits(model, inputs), expected)
    assert not torch.allclose(logits(dropped, inputs), expected, atol=1e-3)


def test_pruned_logits_equal_the_gated_logits(family_model):
    model, inputs, _ = family_model
    expected = gated_logits(model, inputs, HEADS_REMOVED, NEURONS_REMOVED)
    assert not torch.allclose(expected, logits(model, inputs), atol=1e-3)
    remove_heads(model, HEADS_REMOVED)
    remove_neurons(model, NEURONS_REMOVED)
    torch.testing.assert_close(logits(model, inputs), expected, atol=1e-5, rtol=1e-5)


def test_pruning_a_bert_layer_twice_counts_from_the_current_heads(bert):
    model, tokenizer = bert
    inputs = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    expected = gated_logits(model, inputs, {1: [1, 2]})
    pruned = copy.deepcopy(model)
    remove_heads(pruned, {1: [1]})
    remove_heads(pruned, {1: [1]})  # the current head 1 was head 2
    assert sorted(pruned.config.pruned_heads[1]) == [1, 2]
    assert heads_per_layer(pruned) == [4, 2, 4]
    query = model.bert.encoder.layer[1].attention.self.query.weight
    kept = torch.cat([query[0:HEAD], query[3 * HEAD:4 * HEAD]])
    assert torch.equal(pruned.bert.encoder.layer[1].attention.self.query.weight, kept)
    torch.testing.assert_close(logits(pruned, inputs), expected, atol=1e-5, rtol=1e-5)


def test_pruning_a_llama_layer_twice_counts_from_the_current_heads(tiny_causal_lm):
    model, tokenizer = tiny_causal_lm
    model = variant(model, num_hidden_layers=1, num_attention_heads=8, head_dim=4)  # 4 per key-value group
    inputs = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    expected = gated_logits(model, inputs, {0: [1, 2, 5, 6]})
    remove_heads(model, {0: [1, 5]})
    remove_heads(model, {0: [1, 4]})  # now 3 per group: current 1 and 4 were heads 2 and 6
    assert heads_per_layer(model) == [4]
    assert model.model.layers[0].self_attn.num_key_value_groups == 2
    torch.testing.assert_close(logits(model, inputs), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads", [[0], [0, 1], [1, 2, 3]])
def test_llama_heads_must_leave_every_key_value_group_evenly(llama, heads):
    model = copy.deepcopy(llama[0])
    before = parameters(model)
    with pytest.raises(ValueError, match="layer 1: .*same number of query heads.*2 key-value groups"):
        remove_heads(model, {1: heads})
    assert parameters(model) == before
    assert heads_per_layer(model) == [4, 4, 4]


def test_a_refused_llama_removal_leaves_every_block_as_it_was(llama):
    model = copy.deepcopy(llama[0])
    with pytest.raises(ValueError, match="layer 1: "):
        remove_heads(model, {0: [0, 2], 1: [0]})
    assert heads_per_layer(model) == [4, 4, 4]


def test_removing_every_query_head_of_a_group_raises(llama):
    model = copy.deepcopy(llama[0])
    with pytest.raises(ValueError, match="layer 0: removing every query head"):
        remove_heads(model, {0: [0, 1, 2, 3]})
    assert heads_per_layer(model) == [4, 4, 4]


def test_layer_shapes_are_recorded_only_once_a_block_differs(family_model):
    model, _, name = family_model
    assert getattr(model.config, "layer_shapes", None) is None
    record_shapes(model)
    assert model.config.layer_shapes is None
    remove_heads(model, HEADS_REMOVED)
    if name == "bert":  # BERT's heads are in config.pruned_heads
        assert getattr(model.config, "layer_shapes", None) is None
        assert {layer: sorted(heads) for layer, heads in model.config.pruned_heads.items()} == HEADS_REMOVED
    else:
        assert model.config.layer_shapes == {"num_attention_heads": [2, 4, 2]}
    remove_neurons(model, NEURONS_REMOVED)
    expected = {"intermediate_size": [61, 62, 64]}
    if name == "llama":
        expected["num_attention_heads"] = [2, 4, 2]
    assert model.config.layer_shapes == expected
    assert model.config.intermediate_size == 64 and model.config.num_attention_heads == 4


def test_import_compress_installs_the_reload_hook():
    assert getattr(PreTrainedModel.post_init, "_compress_layer_shapes", False)


def test_install_reload_hook_wraps_post_init_once():
    install_reload_hook()
    hook = PreTrainedModel.post_init
    install_reload_hook()
    assert PreTrainedModel.post_init is hook


def assert_reloads(model, inputs, name, directory):
    model.save_pretrained(directory)
    reloaded = AUTO_CLASSES[name].from_pretrained(directory).eval()
    assert heads_per_layer(reloaded) == heads_per_layer(model)
    assert neurons_per_layer(reloaded) == neurons_per_layer(model)
    assert reloaded.config.layer_shapes == model.config.layer_shapes
    torch.testing.assert_close(logits(reloaded, inputs), logits(model, inputs), atol=0, rtol=0)
    return reloaded


def test_pruned_model_reloads_with_from_pretrained(family_model, tmp_path):
    model, inputs, name = family_model
    remove_heads(model, HEADS_REMOVED)
    remove_neurons(model, NEURONS_REMOVED)
    reloaded = assert_reloads(model, inputs, name, tmp_path)
    if name == "llama":
        attention = [block.self_attn for block in reloaded.model.layers]
        assert [a.num_key_value_groups for a in attention] == [1, 2, 1]
        assert [a.k_proj.out_features for a in attention] == [2 * HEAD] * 3


def test_model_pruned_then_dropped_reloads(family_model, tmp_path):
    model, inputs, name = family_model
    remove_heads(model, HEADS_REMOVED)
    remove_neurons(model, NEURONS_REMOVED)
    dropped = drop_layers(model, [0])  # the block with the most changes goes
    assert heads_per_layer(dropped) == [4, 2]
    assert neurons_per_layer(dropped) == [62, 64]
    assert dropped.config.layer_shapes["intermediate_size"] == [62, 64]
    if name == "llama":
        assert dropped.config.layer_shapes["num_attention_heads"] == [4, 2]
    assert_reloads(dropped, inputs, name, tmp_path)


def test_a_fresh_model_from_a_pruned_config_has_the_pruned_shapes(llama):
    model = copy.deepcopy(llama[0])
    remove_heads(model, {1: [0, 2]})
    remove_neurons(model, {2: [7]})
    torch.manual_seed(1)
    fresh = type(model)(model.config)  # post_init applies the recorded shapes
    assert heads_per_layer(fresh) == [4, 2, 4]
    assert neurons_per_layer(fresh) == [64, 64, 63]
    fresh.load_state_dict(model.state_dict())
    apply_layer_shapes(fresh)  # already in shape: nothing changes
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_pruned_llama_generates_with_the_kv_cache(llama):
    model, tokenizer = llama
    inputs = tokenizer(SENTENCES[:1], return_tensors="pt")
    settings = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    heads, neurons = {0: [1, 2], 2: [0, 3]}, {1: list(range(0, 64, 3))}
    with torch.no_grad(), gated(model, zero_gates(model, heads, neurons)):
        expected = model.generate(**inputs, **settings)
    with torch.no_grad():
        unpruned = model.generate(**inputs, **settings)
    pruned = copy.deepcopy(model)
    remove_heads(pruned, heads)
    remove_neurons(pruned, neurons)
    with torch.no_grad():
        cached = pruned.generate(**inputs, **settings, use_cache=True)
        uncached = pruned.generate(**inputs, **settings, use_cache=False)
    assert cached.shape == (1, inputs["input_ids"].shape[1] + 3)
    assert torch.equal(cached, expected)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, unpruned)  # the removed units mattered


@pytest.mark.parametrize("name", ["gpt2", "distilbert", "roberta"])
def test_the_other_families_in_the_table_prune_and_reload(name, tmp_path):
    from transformers import (
        AutoModelForCausalLM,
        DistilBertConfig,
        DistilBertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    torch.manual_seed(0)
    model, auto = {
        "gpt2": lambda: (GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=3, n_head=4,
                                                    n_positions=64)), AutoModelForCausalLM),
        "distilbert": lambda: (DistilBertForSequenceClassification(DistilBertConfig(
            vocab_size=100, dim=32, n_layers=3, n_heads=4, hidden_dim=64)), AutoModelForSequenceClassification),
        "roberta": lambda: (RobertaForSequenceClassification(RobertaConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)),
            AutoModelForSequenceClassification),
    }[name]()
    ids = torch.randint(3, 90, (2, 9))
    model.eval()
    with torch.no_grad():
        expected = gated_logits(model, {"input_ids": ids}, {1: [0]}, {2: [1, 2, 3]})
    remove_heads(model, {1: [0]})
    remove_neurons(model, {2: [1, 2, 3]})
    assert heads_per_layer(model) == [4, 3, 4] and neurons_per_layer(model)[2] == neurons_per_layer(model)[0] - 3
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-5)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.allclose(auto.from_pretrained(tmp_path).eval()(input_ids=ids).logits, expected, atol=1e-5)

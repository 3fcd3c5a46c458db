import copy

import numpy as np
import pytest
import torch

from compress.algos.importance import (
    activation_scores,
    divergence,
    gradient_scores,
    layer_scores,
    magnitude_scores,
)
from compress.algos.students import transformer_blocks
from compress.algos.units import HEADS, NEURONS

SENTENCES = ["good movie and a great plot", "awful film", "the actor was not very fun but the story was",
             "dull slow scene"]
HEAD = 8  # the conftest models: 4 heads of width 8


def calibration(tokenizer, sentences=SENTENCES, batch_size=2):
    """Right-padded int64 numpy batches, as compress.loaders.calibration_batches makes them."""
    return [{key: values.astype(np.int64) for key, values in
             tokenizer(sentences[start:start + batch_size], padding=True, return_tensors="np").items()}
            for start in range(0, len(sentences), batch_size)]


@pytest.fixture(params=["bert", "llama"])
def scored(request):
    """(a copy of the model, calibration batches, text_stream)."""
    model, tokenizer = request.getfixturevalue(request.param)
    assert tokenizer.padding_side == "right"
    return copy.deepcopy(model), calibration(tokenizer), request.param == "llama"


def attention(model, layer):
    if model.config.model_type == "bert":
        block = model.bert.encoder.layer[layer]
        return block.attention.self.query, block.attention.self.value, block.attention.output.dense
    block = model.model.layers[layer].self_attn
    return block.q_proj, block.v_proj, block.o_proj


def ffn(model, layer):
    """(input projections, output projection)."""
    if model.config.model_type == "bert":
        block = model.bert.encoder.layer[layer]
        return [block.intermediate.dense], block.output.dense
    mlp = model.model.layers[layer].mlp
    return [mlp.gate_proj, mlp.up_proj], mlp.down_proj


def zero_rows(linear, rows):
    with torch.no_grad():
        linear.weight[rows] = 0
        if linear.bias is not None:
            linear.bias[rows] = 0


def zero_columns(linear, columns):
    with torch.no_grad():
        linear.weight[:, columns] = 0


SCORERS = {
    "gradient": gradient_scores,
    "activation": activation_scores,
    "magnitude": lambda model, batches, text_stream: magnitude_scores(model),
}


@pytest.mark.parametrize("method", SCORERS)
def test_scores_hold_one_finite_non_negative_value_per_unit(scored, method):
    model, batches, text_stream = scored
    scores = SCORERS[method](model, batches, text_stream)
    assert set(scores) == {HEADS, NEURONS}
    assert [tuple(score.shape) for score in scores[HEADS]] == [(4,)] * 3
    assert [tuple(score.shape) for score in scores[NEURONS]] == [(64,)] * 3
    for score in scores[HEADS] + scores[NEURONS]:
        assert torch.isfinite(score).all()
        assert (score >= 0).all()
        assert (score > 0).any()
        assert score.device.type == "cpu"


@pytest.mark.parametrize("method", SCORERS)
def test_a_dead_head_scores_zero_and_ranks_lowest(scored, method):
    model, batches, text_stream = scored
    layer, head = 1, 2
    rows = slice(head * HEAD, (head + 1) * HEAD)
    query, value, out = attention(model, layer)
    zero_columns(out, rows)  # the head's output no longer reaches the block: gradient 0
    zero_rows(query, rows)  # magnitude counts query rows and output columns
    if text_stream:
        if method == "activation":
            pytest.skip("a Llama head shares its value rows with its key-value group: its output is never 0")
    else:
        zero_rows(value, rows)  # activation is the head's output, before the output projection
    scores = SCORERS[method](model, batches, text_stream)[HEADS]
    assert scores[layer][head] == 0
    assert int(torch.argmin(scores[layer])) == head
    assert (scores[layer][torch.arange(4) != head] > 0).all()
    assert all((score > 0).all() for i, score in enumerate(scores) if i != layer)


@pytest.mark.parametrize("method", SCORERS)
def test_a_dead_neuron_scores_zero_and_ranks_lowest(scored, method):
    model, batches, text_stream = scored
    layer, neuron = 2, 17
    inputs, output = ffn(model, layer)
    for linear in inputs:
        zero_rows(linear, [neuron])
    zero_columns(output, [neuron])
    scores = SCORERS[method](model, batches, text_stream)[NEURONS]
    assert scores[layer][neuron] == 0
    assert int(torch.argmin(scores[layer])) == neuron
    assert (scores[layer][torch.arange(64) != neuron] > 0).all()


def test_magnitude_scores_are_the_norms_of_each_units_weights(scored):
    model = scored[0]
    scores = magnitude_scores(model)
    for layer in range(3):
        query, _, out = attention(model, layer)
        heads = [torch.cat([query.weight[h * HEAD:(h + 1) * HEAD].flatten(),
                            out.weight[:, h * HEAD:(h + 1) * HEAD].flatten()]).norm() for h in range(4)]
        torch.testing.assert_close(scores[HEADS][layer], torch.stack(heads).detach())
        inputs, output = ffn(model, layer)
        neurons = torch.cat([linear.weight for linear in inputs] + [output.weight.t()], dim=1).norm(dim=1)
        torch.testing.assert_close(scores[NEURONS][layer], neurons.detach())


def test_gradient_scores_leave_requires_grad_as_found_and_no_grads(scored):
    model, batches, text_stream = scored
    model.base_model.get_submodule("embeddings" if model.config.model_type == "bert" else "embed_tokens"
                                   ).requires_grad_(False)
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    assert not all(before.values()) and any(before.values())
    gradient_scores(model, batches, text_stream)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())


def test_scoring_leaves_the_model_unchanged(scored):
    model, batches, text_stream = scored
    inputs = {key: torch.as_tensor(values) for key, values in batches[0].items()}
    with torch.no_grad():
        expected = model(**inputs).logits
    state = copy.deepcopy(model.state_dict())
    gradient_scores(model, batches, text_stream)
    activation_scores(model, batches, text_stream)
    layer_scores(model, batches, text_stream)
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks
    assert all(torch.equal(tensor, state[key]) for key, tensor in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)


def test_activation_scores_ignore_padding(scored):
    """Rows scored in one right-padded batch or each alone give the same means: pads are not counted."""
    model, batches, text_stream = scored
    together = activation_scores(model, batches, text_stream)
    rows = [{key: values[i:i + 1, :int(batch["attention_mask"][i].sum())] for key, values in batch.items()}
            for batch in batches for i in range(len(batch["input_ids"]))]
    assert any(batch["attention_mask"].min() == 0 for batch in batches)
    alone = activation_scores(model, rows, text_stream)
    for kind in (HEADS, NEURONS):
        for padded, single in zip(together[kind], alone[kind]):
            torch.testing.assert_close(padded, single, atol=1e-5, rtol=1e-4)


def fitted(model, batches, steps=10):
    """`model` trained a little on the batches' next tokens, so that skipping a block costs loss (skipping a
    block of a random language model may as well lower it)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    tensors = [{key: torch.as_tensor(values) for key, values in batch.items()} for batch in batches]
    for step in range(steps):
        batch = tensors[step % len(tensors)]
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_layer_scores_find_an_identity_block(scored):
    model, batches, text_stream = scored
    if text_stream:
        model = fitted(model.train(), batches)
    layer = 1
    _, _, out = attention(model, layer)
    _, down = ffn(model, layer)
    for linear in (out, down):  # the block now hands its input on (up to a LayerNorm of a normalised input)
        zero_rows(linear, slice(None))
    scores = layer_scores(model, batches, text_stream)
    assert scores.shape == (3,)
    assert abs(float(scores[layer])) < 1e-4
    assert int(torch.argmin(scores)) == layer
    assert (scores[torch.arange(3) != layer] > 1e-3).all()


def skipped_one_at_a_time(model, batches, text_stream):
    """Layer scores the plain way: the whole model run once per block, that block handing its input on."""
    def hand_input_on(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    data = [{key: torch.as_tensor(values) for key, values in batch.items()} for batch in batches]
    with torch.no_grad():
        whole = [model(**batch).logits.float().log_softmax(-1) for batch in data]
        rises = []
        for block in transformer_blocks(model):
            handle = block.register_forward_hook(hand_input_on, with_kwargs=True)
            rises.append(sum(divergence(reference, model(**batch).logits.float().log_softmax(-1),
                                        batch["attention_mask"], text_stream)
                             for reference, batch in zip(whole, data)) / len(data))
            handle.remove()
    return torch.tensor(rises)


def test_layer_scores_replaying_the_blocks_before_match_running_the_whole_model_per_block(scored):
    model, batches, text_stream = scored
    if text_stream:
        model = fitted(model.train(), batches)
    expected = skipped_one_at_a_time(model, batches, text_stream)
    assert (expected > 0).all() and model.config.use_cache
    torch.testing.assert_close(layer_scores(model, batches, text_stream), expected, rtol=1e-5, atol=1e-7)
    assert model.config.use_cache  # the KV cache, off while scoring, is on again

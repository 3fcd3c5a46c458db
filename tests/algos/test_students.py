import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from compress.algos.kd import uniform_layer_map
from compress.algos.students import (
    default_layers,
    same_vocabulary,
    select_layers,
    smaller_config,
    student_from_config,
    uniform_layers,
)

SENTENCES = ["good movie and a great plot", "awful film", "the actor was not very fun but the story was"]
AUTO_CLASSES = {"bert": AutoModelForSequenceClassification, "llama": AutoModelForCausalLM}


def deeper(model, layers: int):
    """A seeded random model of `model`'s class and sizes, with `layers` blocks."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    return type(model)(config).eval()


@pytest.fixture(scope="module")
def bert_teacher(tiny_classifier):
    model, tokenizer = tiny_classifier
    return deeper(model, 6), tokenizer


@pytest.fixture(scope="module")
def llama_teacher(tiny_causal_lm):
    model, tokenizer = tiny_causal_lm
    return deeper(model, 4), tokenizer


@pytest.fixture(params=["bert", "llama"])
def teacher(request):
    """(model, tokenizer, family name): a 6-layer tiny BERT classifier or a 4-layer tiny Llama.
    Shared: copy it before changing it."""
    model, tokenizer = request.getfixturevalue(f"{request.param}_teacher")
    return model, tokenizer, request.param


def batch(tokenizer, sentences=SENTENCES):
    return tokenizer(sentences, padding=True, return_tensors="pt")


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def blocks(model):
    return model.bert.encoder.layer if model.config.model_type == "bert" else model.model.layers


def depth(model):
    return model.config.num_hidden_layers


def assert_same_state(a, b):
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name, tensor in state_a.items():
        assert torch.equal(tensor, state_b[name]), name


def assert_round_trip(model, name, tokenizer, tmp_path):
    model.save_pretrained(tmp_path)
    reloaded = AUTO_CLASSES[name].from_pretrained(tmp_path).eval()
    assert depth(reloaded) == depth(model)
    assert torch.equal(logits(reloaded, batch(tokenizer)), logits(model, batch(tokenizer)))


def assert_padding_ignored(model, name, tokenizer):
    """The short row of a right-padded batch gives what it gives alone."""
    padded = batch(tokenizer, SENTENCES[:2])
    alone = batch(tokenizer, SENTENCES[1:2])
    assert padded["attention_mask"][1].sum() < padded["attention_mask"].shape[1]
    expected = logits(model, alone)[0]
    row = logits(model, padded)[1]
    if name == "llama":
        row = row[: alone["input_ids"].shape[1]]
    torch.testing.assert_close(row, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("teacher_layers", "expected"), [
    (6, [1, 3, 5]), (5, [0, 2, 4]), (4, [1, 3]), (2, [1]), (1, [0]), (30, list(range(1, 30, 2))),
])
def test_default_layers_keep_every_other_block_from_the_top(teacher_layers, expected):
    assert default_layers(teacher_layers) == expected


def test_default_layers_refuse_a_teacher_without_layers():
    with pytest.raises(ValueError, match="student.layers: the teacher has 0 layers"):
        default_layers(0)


@pytest.mark.parametrize("teacher_layers", range(1, 32))
def test_halving_uniformly_is_the_default_selection(teacher_layers):
    assert uniform_layers(math.ceil(teacher_layers / 2), teacher_layers) == default_layers(teacher_layers)


@pytest.mark.parametrize(("student_layers", "teacher_layers"), [(3, 12), (4, 6), (6, 6), (1, 5)])
def test_uniform_layers_are_the_blocks_the_kd_layer_map_pairs(student_layers, teacher_layers):
    paired = [teacher - 1 for _, teacher in uniform_layer_map(student_layers, teacher_layers)[1:]]
    assert uniform_layers(student_layers, teacher_layers) == paired


def test_uniform_layers_refuse_a_student_deeper_than_its_teacher():
    with pytest.raises(ValueError, match="student.num_layers: 7 is not between 1 and the teacher's 6 layers"):
        uniform_layers(7, 6)


@pytest.mark.parametrize(("layers", "message"), [
    ([], "student.layers: give at least one teacher block"),
    ([1, 7], r"student.layers: index 7 is out of range for a 6-layer teacher \(0-5\)"),
    ([-1, 2], r"student.layers: index -1 is out of range for a 6-layer teacher \(0-5\)"),
    ([1, 3, 3], "student.layers: index 3 is listed more than once"),
    ([3, 1], r"student.layers: list the blocks in ascending order \(got \[3, 1\]\)"),
])
def test_select_layers_validates_the_indices(bert_teacher, layers, message):
    with pytest.raises(ValueError, match=message):
        select_layers(bert_teacher[0], layers)


def test_selecting_every_layer_gives_the_teachers_outputs(teacher):
    model, tokenizer, _ = teacher
    student = select_layers(model, list(range(depth(model))))
    assert torch.equal(logits(student, batch(tokenizer)), logits(model, batch(tokenizer)))


def test_select_layers_copies_the_listed_blocks_and_leaves_the_teacher_untouched(teacher):
    model, _, _ = teacher
    before = copy.deepcopy(model)
    layers = [0, depth(model) - 1]
    student = select_layers(model, layers)
    assert depth(student) == len(blocks(student)) == 2
    assert depth(model) == len(blocks(model)) == depth(before)
    assert_same_state(model, before)
    for position, index in enumerate(layers):
        assert_same_state(blocks(student)[position], blocks(model)[index])
    teacher_storage = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in teacher_storage for p in student.parameters())
    assert student.training == model.training


def test_selected_student_round_trips_through_save_pretrained(teacher, tmp_path):
    model, tokenizer, name = teacher
    assert_round_trip(select_layers(model, default_layers(depth(model))), name, tokenizer, tmp_path)


def test_selected_student_ignores_padding(teacher):
    model, tokenizer, name = teacher
    assert_padding_ignored(select_layers(model, [1, 2]), name, tokenizer)


def test_selected_llama_blocks_are_renumbered_for_the_kv_cache(llama_teacher):
    model, tokenizer = llama_teacher
    student = select_layers(model, [1, 3])
    assert [block.self_attn.layer_idx for block in student.model.layers] == [0, 1]
    assert [block.self_attn.layer_idx for block in model.model.layers] == [0, 1, 2, 3]
    ids = batch(tokenizer, SENTENCES[:1])["input_ids"]
    with torch.no_grad():
        full = student(ids).logits
        prefix = student(ids[:, :-1], use_cache=True)
        step = student(ids[:, -1:], past_key_values=prefix.past_key_values).logits
    torch.testing.assert_close(step[:, 0], full[:, -1], atol=1e-5, rtol=1e-5)


def test_select_layers_rekeys_pruned_heads(bert_teacher, tmp_path):
    model, tokenizer = bert_teacher
    pruned = copy.deepcopy(model)
    pruned.prune_heads({1: [0], 3: [1], 4: [0]})
    student = select_layers(pruned, [1, 2, 4])
    assert student.config.pruned_heads == {0: [0], 2: [0]}
    assert pruned.config.pruned_heads == {1: [0], 3: [1], 4: [0]}
    assert [block.attention.self.num_attention_heads for block in student.bert.encoder.layer] == [1, 2, 1]
    assert_round_trip(student, "bert", tokenizer, tmp_path)


def test_smaller_config_changes_the_family_fields_of_a_copy(bert_teacher):
    teacher_config = bert_teacher[0].config
    config = smaller_config(teacher_config, num_layers=2, hidden_size=16, intermediate_size=32, num_heads=1)
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size,
            config.num_attention_heads) == (2, 16, 32, 1)
    assert (teacher_config.num_hidden_layers, teacher_config.hidden_size) == (6, 32)
    assert config.num_labels == teacher_config.num_labels


def test_smaller_config_keeps_the_grouped_query_ratio_and_head_dim(llama_teacher):
    teacher_config = llama_teacher[0].config  # 4 heads, 2 key-value heads, width 32
    narrow = smaller_config(teacher_config, hidden_size=16, num_heads=2)
    assert (narrow.num_attention_heads, narrow.num_key_value_heads, narrow.head_dim) == (2, 1, 8)
    only_width = smaller_config(teacher_config, hidden_size=16)
    assert (only_width.num_attention_heads, only_width.num_key_value_heads, only_width.head_dim) == (4, 2, 4)
    assert (teacher_config.num_key_value_heads, teacher_config.head_dim) == (2, 8)


@pytest.mark.parametrize(("sizes", "message"), [
    ({"hidden_size": 30}, "student.hidden_size: 30 is not divisible by the number of attention heads 4"),
    ({"hidden_size": 24, "num_heads": 3},
     "student.num_heads: 3 heads cannot keep the teacher's 2 query heads per key-value head"),
    ({"num_layers": 5}, "student.num_layers: 5 is larger than the teacher's 4"),
    ({"intermediate_size": 0}, r"student.intermediate_size must be >= 1 \(got 0\)"),
])
def test_smaller_config_refuses_sizes_that_do_not_fit(llama_teacher, sizes, message):
    with pytest.raises(ValueError, match=message):
        smaller_config(llama_teacher[0].config, **sizes)


def test_a_same_width_student_from_the_teacher_is_the_uniform_layer_selection(teacher):
    model, tokenizer, _ = teacher
    student, report = student_from_config(model, smaller_config(model.config, num_layers=2))
    selected = select_layers(model, uniform_layers(2, depth(model)))
    assert report["teacher_blocks"] == uniform_layers(2, depth(model))
    assert report["sliced"] == report["random"] == []
    assert torch.equal(logits(student, batch(tokenizer)), logits(selected, batch(tokenizer)))


def test_a_same_width_student_keeps_the_teachers_pruned_heads(bert_teacher):
    model, tokenizer = bert_teacher
    pruned = copy.deepcopy(model)
    pruned.prune_heads({2: [1], 3: [0]})
    student, _ = student_from_config(pruned, smaller_config(pruned.config, num_layers=3))  # blocks 1, 3, 5
    assert student.config.pruned_heads == {1: [0]}
    selected = select_layers(pruned, [1, 3, 5])
    assert torch.equal(logits(student, batch(tokenizer)), logits(selected, batch(tokenizer)))


def test_a_narrower_student_holds_the_teachers_leading_slices(teacher, tmp_path):
    model, tokenizer, name = teacher
    config = smaller_config(model.config, num_layers=2, hidden_size=16, intermediate_size=24, num_heads=2)
    student, report = student_from_config(model, config)
    teacher_state, student_state = model.state_dict(), student.state_dict()
    prefix = "bert.encoder.layer" if name == "bert" else "model.layers"
    last = depth(model) - 1
    embeddings = "bert.embeddings.word_embeddings.weight" if name == "bert" else "model.embed_tokens.weight"
    query = "attention.self.query.weight" if name == "bert" else "self_attn.q_proj.weight"
    down = "output.dense.weight" if name == "bert" else "mlp.down_proj.weight"
    assert student_state[embeddings].shape == (model.config.vocab_size, 16)
    assert torch.equal(student_state[embeddings], teacher_state[embeddings][:, :16])
    # Student block 1 comes from the teacher's last block.
    for tensor, rows, columns in ((query, 16, 16), (down, 16, 24)):
        expected = teacher_state[f"{prefix}.{last}.{tensor}"][:rows, :columns]
        assert torch.equal(student_state[f"{prefix}.1.{tensor}"], expected)
    assert {embeddings, f"{prefix}.1.{query}", f"{prefix}.1.{down}"} <= set(report["sliced"])
    assert report["random"] == []
    assert sorted(report["copied"] + report["sliced"]) == sorted(student_state)
    out = logits(student, batch(tokenizer))
    expected_shape = (len(SENTENCES), model.config.num_labels) if name == "bert" else \
        (*batch(tokenizer)["input_ids"].shape, model.config.vocab_size)
    assert out.shape == expected_shape
    assert_padding_ignored(student, name, tokenizer)
    assert_round_trip(student, name, tokenizer, tmp_path)


def test_a_random_student_is_seeded_and_leaves_the_global_generator_alone(teacher):
    model, tokenizer, _ = teacher
    config = smaller_config(model.config, num_layers=2)
    rng_state = torch.get_rng_state()
    first, report = student_from_config(model, config, init="random", seed=3)
    assert torch.equal(torch.get_rng_state(), rng_state)
    again, _ = student_from_config(model, config, init="random", seed=3)
    other, _ = student_from_config(model, config, init="random", seed=4)
    assert_same_state(first, again)
    assert not torch.equal(logits(first, batch(tokenizer)), logits(other, batch(tokenizer)))
    selected = select_layers(model, uniform_layers(2, depth(model)))
    assert not torch.equal(logits(first, batch(tokenizer)), logits(selected, batch(tokenizer)))
    assert report == {"copied": [], "sliced": [], "random": list(first.state_dict())}


def test_student_from_config_refuses_what_it_cannot_build(bert_teacher, llama_teacher):
    bert, llama = bert_teacher[0], llama_teacher[0]
    with pytest.raises(ValueError, match="student.init must be one of teacher, random"):
        student_from_config(bert, bert.config, init="zeros")
    with pytest.raises(ValueError, match="a llama config cannot make a student of a bert teacher"):
        student_from_config(bert, llama.config)
    deeper_config = copy.deepcopy(llama.config)
    deeper_config.num_hidden_layers = 6
    with pytest.raises(ValueError, match="student.num_layers: 6 is not between 1 and the teacher's 4 layers"):
        student_from_config(llama, deeper_config)


def test_same_vocabulary_compares_tokens_and_special_ids(tiny_classifier, tiny_causal_lm):
    bert_tokenizer, llama_tokenizer = tiny_classifier[1], tiny_causal_lm[1]
    assert same_vocabulary(llama_tokenizer, copy.deepcopy(llama_tokenizer))
    assert not same_vocabulary(bert_tokenizer, llama_tokenizer)
    extra_token = copy.deepcopy(llama_tokenizer)
    extra_token.add_tokens(["zebra"])
    assert not same_vocabulary(llama_tokenizer, extra_token)
    other_padding = copy.deepcopy(llama_tokenizer)
    other_padding.pad_token = "<unk>"
    assert other_padding.get_vocab() == llama_tokenizer.get_vocab()
    assert not same_vocabulary(llama_tokenizer, other_padding)

import copy
import math

import pytest
import torch
from torch import nn

from compress.algos.kd import (
    DistillLoss,
    attention_kd,
    capture_qkv,
    check_layer_map,
    hidden_mse,
    logit_kd,
    make_projections,
    relation_kd,
    uniform_layer_map,
)
from compress.arch import FAMILIES, family

SENTENCES = ["good movie and a great plot", "awful film", "the actor was not very fun", "dull slow scene"]


# Two-class KL divergences in closed form, for the hand-computed logit_kd values below.
def kl_teacher_0a_student_a0(a: float) -> float:
    """KL(softmax([0, a]) ‖ softmax([a, 0])) = [1·log(e^-a) + e^a·log(e^a)] / (1 + e^a)."""
    return a * (math.exp(a) - 1) / (math.exp(a) + 1)


def kl_uniform_teacher_student_0b(b: float) -> float:
    """KL([½, ½] ‖ softmax([0, b])) = ½·log(½(1 + e^b)) + ½·log(½(1 + e^b)/e^b)."""
    return math.log((1 + math.exp(b)) / 2) - b / 2


STUDENT_LOGITS = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
TEACHER_LOGITS = torch.tensor([[0.0, 1.0], [1.0, 1.0]])


def test_logit_kd_matches_the_hand_value_at_temperature_1():
    expected = (kl_teacher_0a_student_a0(1.0) + kl_uniform_teacher_student_0b(2.0)) / 2
    assert logit_kd(STUDENT_LOGITS, TEACHER_LOGITS, 1.0).item() == pytest.approx(expected, rel=1e-5)


def test_logit_kd_divides_logits_by_t_and_scales_by_t_squared():
    expected = 4 * (kl_teacher_0a_student_a0(0.5) + kl_uniform_teacher_student_0b(1.0)) / 2
    assert logit_kd(STUDENT_LOGITS, TEACHER_LOGITS, 2.0).item() == pytest.approx(expected, rel=1e-5)


def test_logit_kd_of_identical_logits_is_zero():
    logits = torch.randn(3, 5)
    assert logit_kd(logits, logits.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_logit_kd_averages_over_scored_positions_only():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    loss = logit_kd(student, teacher, 1.5, mask)
    changed = student.clone()
    changed[~mask] = 100 * torch.randn(3, 7)
    assert logit_kd(changed, teacher, 1.5, mask).item() == pytest.approx(loss.item(), rel=1e-6)
    per_position = [logit_kd(student[b, p], teacher[b, p], 1.5).item() for b, p in [(0, 0), (0, 1), (1, 0)]]
    assert loss.item() == pytest.approx(sum(per_position) / 3, rel=1e-5)


def test_logit_kd_rejects_other_shapes_and_bad_temperatures():
    with pytest.raises(ValueError, match="shape"):
        logit_kd(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="temperature"):
        logit_kd(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)


# hidden_mse: one row of 2 tokens, width 2; hidden-state tuples (embeddings, block 1[, block 2]).
STUDENT_HIDDEN = (torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]), torch.zeros(1, 2, 2))
TEACHER_HIDDEN = (torch.tensor([[[1.0, 2.0], [3.0, 6.0]]]), torch.full((1, 2, 2), 7.0),
                  torch.tensor([[[3.0, 0.0], [0.0, 1.0]]]))
PAIRS = [(0, 0), (1, 2)]


def test_hidden_mse_matches_the_hand_value():
    # pair (0, 0): squared errors 0, 0, 0, 4 → 1; pair (1, 2): 9, 0, 0, 1 → 2.5; mean over pairs 1.75
    assert hidden_mse(STUDENT_HIDDEN, TEACHER_HIDDEN, PAIRS).item() == pytest.approx(1.75)


def test_hidden_mse_ignores_padding():
    mask = torch.tensor([[1, 0]])
    # real token only: pair (0, 0): 0, 0 → 0; pair (1, 2): 9, 0 → 4.5; mean 2.25
    assert hidden_mse(STUDENT_HIDDEN, TEACHER_HIDDEN, PAIRS, mask=mask).item() == pytest.approx(2.25)
    padded = (STUDENT_HIDDEN[0].clone(), STUDENT_HIDDEN[1].clone())
    padded[0][0, 1], padded[1][0, 1] = 50.0, -50.0
    assert hidden_mse(padded, TEACHER_HIDDEN, PAIRS, mask=mask).item() == pytest.approx(2.25)


def test_projections_change_the_result():
    projections = nn.ModuleList(nn.Linear(2, 2, bias=False) for _ in PAIRS)
    with torch.no_grad():
        for projection in projections:
            nn.init.eye_(projection.weight).mul_(2.0)
    # doubled student states: pair (0, 0): 1, 4, 9, 4 → 4.5; pair (1, 2) still 2.5; mean 3.5
    assert hidden_mse(STUDENT_HIDDEN, TEACHER_HIDDEN, PAIRS, projections).item() == pytest.approx(3.5)


def test_projections_map_other_widths_and_get_gradients():
    assert make_projections(4, 4, PAIRS) is None
    projections = make_projections(2, 3, PAIRS)
    assert [tuple(p.weight.shape) for p in projections] == [(3, 2), (3, 2)]
    student = tuple(torch.randn(1, 2, 2) for _ in range(2))
    wider_teacher = tuple(torch.randn(1, 2, 3) for _ in range(3))
    with pytest.raises(ValueError, match="make_projections"):
        hidden_mse(student, wider_teacher, PAIRS)
    hidden_mse(student, wider_teacher, PAIRS, projections).backward()
    assert all(p.weight.grad is not None and p.weight.grad.abs().sum() > 0 for p in projections)


def test_uniform_layer_map():
    assert uniform_layer_map(3, 6) == [(0, 0), (1, 2), (2, 4), (3, 6)]
    assert uniform_layer_map(2, 6) == [(0, 0), (1, 3), (2, 6)]
    assert uniform_layer_map(15, 30) == [(s, 2 * s) for s in range(16)]
    assert uniform_layer_map(6, 30) == [(s, 5 * s) for s in range(7)]
    assert uniform_layer_map(4, 4) == [(s, s) for s in range(5)]
    assert uniform_layer_map(4, 6) == [(0, 0), (1, 1), (2, 3), (3, 4), (4, 6)]  # s·6/4 rounded down


def test_check_layer_map_names_the_bad_index():
    assert check_layer_map([[0, 0], [3, 6]], 3, 6) == [(0, 0), (3, 6)]
    with pytest.raises(ValueError, match=r"student index 4 is outside 0\.\.3"):
        check_layer_map([(0, 0), (4, 6)], 3, 6)
    with pytest.raises(ValueError, match=r"teacher index 7 is outside 0\.\.6"):
        check_layer_map([(3, 7)], 3, 6)
    with pytest.raises(ValueError, match="student index -1"):
        check_layer_map([(-1, 6)], 3, 6)
    with pytest.raises(ValueError, match="empty"):
        check_layer_map([], 3, 6)


def random_attentions(blocks: int, heads: int, length: int = 3) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(2, heads, length, length).softmax(-1) for _ in range(blocks))


def test_attention_kd_of_identical_maps_is_zero():
    maps = random_attentions(2, 2)
    assert attention_kd(maps, maps, uniform_layer_map(2, 2)).item() == 0.0


def test_attention_kd_matches_the_hand_value_over_real_positions():
    student = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.3, 0.3, 0.4]])
    teacher = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    mask = torch.tensor([[1, 1, 0]])
    # real (query, key) pairs: squared errors 0.25, 0.25, 0, 0 → 0.125; block 1 ↔ block 1, embeddings skipped
    loss = attention_kd((student[None, None],), (teacher[None, None],), [(0, 0), (1, 1)], mask)
    assert loss.item() == pytest.approx(0.125)


def test_attention_kd_refuses_other_head_counts_and_missing_maps():
    with pytest.raises(ValueError, match="relation KD"):
        attention_kd(random_attentions(1, 2), random_attentions(1, 4), [(1, 1)])
    with pytest.raises(ValueError, match="eager"):
        attention_kd(None, random_attentions(1, 2), [(1, 1)])
    with pytest.raises(ValueError, match="index 0"):
        attention_kd(random_attentions(1, 2), random_attentions(2, 2), [(0, 2)])


def kl_of_row(scores: list[float], uniform_over: int) -> float:
    """KL(softmax(scores) ‖ uniform)."""
    exps = [math.exp(s) for s in scores]
    return sum(e / sum(exps) * math.log(e / sum(exps) * uniform_over) for e in exps)


def test_relation_kd_matches_the_hand_value_and_ignores_padding():
    # One relation head of width 1. The student's states are 0: every relation row is uniform. The teacher's
    # are x = [1, 0]: row 0 scores x0·x = [1, 0], row 1 scores [0, 0] (uniform, KL 0). Each of Q-Q, K-K and
    # V-V gives the mean over the 2 rows; the three are summed.
    expected = 3 * (kl_of_row([1.0, 0.0], 2) + 0.0) / 2
    teacher = torch.tensor([[[1.0], [0.0]]])
    student = torch.zeros(1, 2, 1)
    assert relation_kd((student,) * 3, (teacher,) * 3, 1).item() == pytest.approx(expected, rel=1e-5)
    mask = torch.tensor([[1, 1, 0]])
    padded_teacher = torch.tensor([[[1.0], [0.0], [9.0]]])
    padded_student = torch.tensor([[[0.0], [0.0], [-4.0]]])
    loss = relation_kd((padded_student,) * 3, (padded_teacher,) * 3, 1, mask)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def random_qkv(width: int, kv_width: int | None = None, length: int = 5) -> tuple[torch.Tensor, ...]:
    kv_width = kv_width or width
    return torch.randn(2, length, width), torch.randn(2, length, kv_width), torch.randn(2, length, kv_width)


def test_relation_kd_of_identical_states_is_zero():
    qkv = random_qkv(16, kv_width=8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert relation_kd(qkv, qkv, 4, mask).item() == pytest.approx(0.0, abs=1e-6)


def shuffle_within_relation_heads(states: torch.Tensor, relation_heads: int) -> torch.Tensor:
    """The same features in another order inside each relation head, as another head layout would give."""
    head_width = states.shape[-1] // relation_heads
    order = torch.cat([h * head_width + torch.randperm(head_width) for h in range(relation_heads)])
    return states[..., order]


def test_relation_kd_does_not_depend_on_the_models_head_counts():
    torch.manual_seed(0)
    # A student with 2 attention heads of 8 and a teacher with 4 heads of 4: the same width, 4 relation heads.
    student = tuple(torch.randn(2, 2, 5, 8).transpose(1, 2).flatten(2) for _ in range(3))
    teacher = tuple(torch.randn(2, 4, 5, 4).transpose(1, 2).flatten(2) for _ in range(3))
    loss = relation_kd(student, teacher, 4)
    assert torch.isfinite(loss) and loss.item() > 0
    reshuffled = relation_kd(tuple(shuffle_within_relation_heads(x, 4) for x in student),
                             tuple(shuffle_within_relation_heads(x, 4) for x in teacher), 4)
    assert reshuffled.item() == pytest.approx(loss.item(), rel=1e-5)
    narrower_student = relation_kd(random_qkv(8), random_qkv(16, kv_width=8), 4)
    assert torch.isfinite(narrower_student)


def test_relation_kd_names_a_width_not_divisible_by_the_relation_heads():
    with pytest.raises(ValueError, match=r"student's key width 12 .* relation_heads=8"):
        relation_kd(random_qkv(16, kv_width=12), random_qkv(16), 8)


def encoded(tokenizer) -> dict[str, torch.Tensor]:
    return dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))


def test_capture_qkv_on_the_tiny_bert(tiny_classifier):
    model, tokenizer = tiny_classifier
    inputs = encoded(tokenizer)
    batch, length = inputs["input_ids"].shape
    short = {name: values[:, :3] for name, values in inputs.items()}
    block = model.bert.encoder.layer[1]
    with torch.no_grad(), capture_qkv(model, family("bert"), 2) as capture:
        model(**short)
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    q, k, v = capture.qkv
    assert [tuple(x.shape) for x in (q, k, v)] == [(batch, length, 32)] * 3  # the latest pass only
    with torch.no_grad():
        model(**short)
    assert capture.qkv[0] is q  # hooks gone
    with torch.no_grad():
        torch.testing.assert_close(q, block.attention.self.query(hidden[1]))  # block 2 reads block 1's output


def test_capture_qkv_on_the_tiny_llama_keeps_the_narrower_grouped_kv(tiny_causal_lm):
    model, tokenizer = tiny_causal_lm
    inputs = encoded(tokenizer)
    batch, length = inputs["input_ids"].shape
    with torch.no_grad(), capture_qkv(model, family("llama"), 1) as capture:
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    q, k, v = capture.qkv
    # 4 query heads and 2 key/value heads of 8
    assert [x.shape[-1] for x in (q, k, v)] == [32, 16, 16]
    assert all(x.shape[:2] == (batch, length) for x in (q, k, v))
    attention = model.model.layers[0]
    with torch.no_grad():
        torch.testing.assert_close(q, attention.self_attn.q_proj(attention.input_layernorm(hidden[0])))
    same = relation_kd((q, k, v), (q, k, v), 4, inputs["attention_mask"])
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        model(**inputs)
    assert capture.qkv[0] is q  # hooks gone


def test_capture_qkv_refuses_fused_projections_and_missing_blocks(tiny_classifier):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=10, n_embd=8, n_layer=1, n_head=2, n_positions=8))
    with pytest.raises(ValueError, match="relation KD is not available for gpt2"), \
            capture_qkv(gpt2, FAMILIES["gpt2"], 1):
        pass
    with pytest.raises(ValueError, match=r"block_index 3 is outside 1\.\.2"), \
            capture_qkv(tiny_classifier[0], family("bert"), 3):
        pass


def noisy_copy(model: nn.Module, scale: float = 0.05) -> nn.Module:
    torch.manual_seed(1)
    student = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(scale * torch.randn_like(parameter))
    return student


def distill_steps(student, teacher, kd: DistillLoss, batch, block_pair: tuple[int, int], steps: int = 8):
    """Adam steps on student and projections; returns each step's (total, parts)."""
    optimizer = torch.optim.Adam([*student.parameters(), *kd.parameters()], lr=1e-3)
    arch = family(teacher.config.model_type)
    history = []
    with capture_qkv(student, arch, block_pair[0]) as student_qkv, \
            capture_qkv(teacher, arch, block_pair[1]) as teacher_qkv:
        for _ in range(steps):
            with torch.no_grad():
                teacher_outputs = teacher(**batch, **kd.output_flags)
            student_outputs = student(**batch, **kd.output_flags)
            total, parts = kd(student_outputs, teacher_outputs, batch["attention_mask"], student_qkv.qkv,
                              teacher_qkv.qkv)
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            history.append((total.item(), parts))
    return history


def test_distill_loss_trains_a_noisy_copy_and_its_parts_add_up(tiny_classifier):
    teacher, tokenizer = tiny_classifier
    student = noisy_copy(teacher)
    batch = dict(encoded(tokenizer), labels=torch.tensor([1, 0, 1, 0]))
    kd = DistillLoss(alpha=0.5, temperature=2.0, hidden_weight=1.0, attention_weight=10.0,
                     relation_weight=1.0, mapping=uniform_layer_map(2, 2), relation_heads=4)
    history = distill_steps(student, teacher, kd, batch, (2, 2))
    (first, parts), (last, _) = history[0], history[-1]
    assert set(parts) == {"soft", "hard", "hidden", "attention", "relation"}
    assert all(value > 0 for value in parts.values())
    assert sum(parts.values()) == pytest.approx(first, rel=1e-5)
    assert last < first


def test_distill_loss_trains_its_projections_for_a_narrower_shallower_student(tiny_classifier):
    from transformers import BertConfig, BertForSequenceClassification

    teacher, tokenizer = tiny_classifier
    torch.manual_seed(0)
    student = BertForSequenceClassification(BertConfig(
        vocab_size=teacher.config.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=160, num_labels=2)).eval()
    mapping = uniform_layer_map(1, 2)
    kd = DistillLoss(hidden_weight=1.0, attention_weight=1.0, relation_weight=1.0, mapping=mapping,
                     projections=make_projections(16, 32, mapping), relation_heads=4)
    before = [p.detach().clone() for p in kd.parameters()]
    assert len(before) == 4  # two Linear(16, 32): weights and biases
    history = distill_steps(student, teacher, kd, encoded(tokenizer), (1, 2))
    assert history[-1][0] < history[0][0]
    assert all(not torch.equal(old, new) for old, new in zip(before, kd.parameters(), strict=True))


def test_distill_loss_needs_labels_only_below_alpha_1(tiny_classifier):
    teacher, tokenizer = tiny_classifier
    batch = encoded(tokenizer)
    with torch.no_grad():
        teacher_outputs = teacher(**batch)
        student_outputs = noisy_copy(teacher)(**batch)
    total, parts = DistillLoss(alpha=1.0)(student_outputs, teacher_outputs, batch["attention_mask"])
    assert set(parts) == {"soft"} and total.item() == pytest.approx(parts["soft"]) and total.item() > 0
    with pytest.raises(ValueError, match="labels"):
        DistillLoss(alpha=0.9)(student_outputs, teacher_outputs, batch["attention_mask"])


def test_distill_loss_on_a_causal_lm_scores_real_tokens_and_the_lm_loss(tiny_causal_lm):
    teacher, tokenizer = tiny_causal_lm
    batch = encoded(tokenizer)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        teacher_outputs = teacher(**batch)
        student_outputs = noisy_copy(teacher)(**batch, labels=labels)
    total, parts = DistillLoss(alpha=0.25, temperature=2.0)(student_outputs, teacher_outputs,
                                                            batch["attention_mask"])
    soft = logit_kd(student_outputs.logits, teacher_outputs.logits, 2.0, batch["attention_mask"].bool())
    assert parts["soft"] == pytest.approx(0.25 * soft.item(), rel=1e-5)
    assert parts["hard"] == pytest.approx(0.75 * student_outputs.loss.item(), rel=1e-5)
    assert total.item() == pytest.approx(parts["soft"] + parts["hard"], rel=1e-5)


def test_distill_loss_tells_which_outputs_it_needs():
    plain = DistillLoss(alpha=1.0)
    assert (plain.needs_hidden_states, plain.needs_attentions, plain.needs_qkv) == (False, False, False)
    full = DistillLoss(hidden_weight=1.0, attention_weight=1.0, relation_weight=1.0, mapping=[(0, 0), (1, 2)],
                       relation_heads=2)
    assert (full.needs_hidden_states, full.needs_attentions, full.needs_qkv) == (True, True, True)
    assert full.output_flags == {"output_hidden_states": True, "output_attentions": True}


@pytest.mark.parametrize("settings, message", [
    ({"temperature": 0.0}, "temperature"),
    ({"alpha": 1.5}, "alpha"),
    ({"hidden_weight": -1.0}, "hidden_weight must be >= 0"),
    ({"hidden_weight": 1.0}, "mapping"),
    ({"relation_weight": 1.0}, "relation_heads"),
])
def test_distill_loss_rejects_bad_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        DistillLoss(**settings)

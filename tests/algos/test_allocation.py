import pytest
import torch

from compress.algos.allocation import Choice, choose, layers_to_drop


def seeded_scores(sizes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(size, generator=generator) + 0.1 for size in sizes]


def lowest_normalised(scores, count):
    """(block, unit) of the `count` lowest scores, each block's scores divided by their norm."""
    ranked = sorted((float(value / score.norm()), layer, unit)
                    for layer, score in enumerate(scores) for unit, value in enumerate(score))
    return sorted((layer, unit) for _, layer, unit in ranked[:count])


def flat(removed):
    return sorted((layer, unit) for layer, units in removed.items() for unit in units)


@pytest.mark.parametrize(("sizes", "ratio", "count"), [
    ([4, 4, 4], 0.25, 3), ([4, 4, 4], 0.3, 4), ([64, 64], 0.5, 64), ([64, 32, 16], 0.1, 11),
])
def test_global_removes_the_ratio_of_all_units_lowest_first(sizes, ratio, count):
    scores = seeded_scores(sizes)
    choice = choose("ffn", scores, "global", ratio, [1] * len(sizes))
    assert isinstance(choice, Choice)
    assert flat(choice.removed) == lowest_normalised(scores, count)
    assert sum(len(units) for units in choice.removed.values()) == round(ratio * sum(sizes)) == count
    assert choice.kept_at_minimum == [] and choice.emptied == []
    assert all(units for units in choice.removed.values())  # blocks that lose nothing are not listed


def test_global_normalises_each_blocks_scores():
    small = torch.tensor([0.4, 0.1, 0.3, 0.2])
    scores = [small, 10 * small]  # block 1 matters uniformly 10x more, and still loses its share
    choice = choose("heads", scores, "global", 0.5, [1, 1])
    assert choice.removed == {0: [1, 3], 1: [1, 3]}
    raw = choose("heads", scores, "global", 0.5, [1, 1], normalize=False)
    assert raw.removed == {0: [1, 2, 3]} and raw.kept_at_minimum == [0]  # block 0 keeps its best head


def test_a_block_zero_score_norm_is_not_divided_by():
    scores = [torch.zeros(4), torch.tensor([1.0, 2.0, 3.0, 4.0])]
    choice = choose("ffn", scores, "global", 0.25, [1, 1])
    assert choice.removed == {0: [0, 1]}


# Block 0's normalised scores are all about 0.5; blocks 1 and 2 each have one unit near 1 and three near 0.01.
CONCENTRATED = [torch.tensor([1.0, 1.1, 0.9, 1.05]), torch.tensor([10.0, 0.1, 0.1, 0.1]),
                torch.tensor([0.1, 0.1, 10.0, 0.1])]


def test_global_keeps_one_head_per_block():
    choice = choose("heads", CONCENTRATED, "global", 10 / 12, [1, 1, 1])
    assert choice.kept_at_minimum == [0]
    assert choice.emptied == []
    assert choice.removed == {0: [0, 2, 3], 1: [1, 2, 3], 2: [0, 1, 3]}


def test_global_empties_a_block_when_allowed():
    choice = choose("heads", CONCENTRATED, "global", 10 / 12, [1, 1, 1], allow_empty=True)
    assert choice.emptied == [0]
    assert choice.kept_at_minimum == []
    assert choice.removed == {1: [1, 2, 3], 2: [0, 1, 3]}


def test_global_leaves_out_skipped_blocks():
    scores = seeded_scores([4, 4, 4])
    choice = choose("heads", scores, "global", 0.5, [1, 1, 1], skip=frozenset({1}))
    assert 1 not in choice.removed
    kept = [scores[0], scores[2]]
    expected = [(0 if layer == 0 else 2, unit) for layer, unit in lowest_normalised(kept, 4)]
    assert flat(choice.removed) == sorted(expected)


def test_global_with_key_value_groups_keeps_multiples_and_removes_evenly():
    # Block 0's two lowest heads are both in group 0 (heads 0-1); it still loses one head from each group.
    scores = [torch.tensor([0.1, 0.2, 0.9, 0.8]), torch.tensor([0.5, 0.6, 0.7, 0.55])]
    choice = choose("heads", scores, "global", 0.25, [2, 2])
    assert choice.removed == {0: [0, 3]}
    # The ranking takes three heads of block 0: less than a group's worth is left, so it keeps one group's
    # worth (2 heads, one per group); it was not emptied, so allow_empty does not drop it.
    scores = [torch.tensor([0.1, 0.2, 0.3, 0.9]), torch.tensor([0.5, 0.6, 0.7, 0.55])]
    choice = choose("heads", scores, "global", 3 / 8, [2, 2])
    assert choice.removed == {0: [0, 2]}
    assert choice.kept_at_minimum == [0]
    assert choose("heads", scores, "global", 3 / 8, [2, 2], allow_empty=True).emptied == []
    choice = choose("heads", scores, "global", 0.75, [2, 2])
    assert choice.kept_at_minimum == [0, 1]
    assert choice.removed == {0: [0, 2], 1: [0, 3]}


def test_uniform_removes_the_ratio_of_every_block():
    scores = seeded_scores([4, 8, 64])
    choice = choose("ffn", scores, "uniform", 0.25, [1, 1, 1])
    assert [len(choice.removed[layer]) for layer in range(3)] == [1, 2, 16]
    for layer, score in enumerate(scores):
        assert choice.removed[layer] == sorted(torch.argsort(score)[:len(choice.removed[layer])].tolist())


def test_top_k_keeps_the_same_count_in_every_block():
    scores = seeded_scores([4, 4, 3])
    choice = choose("heads", scores, "top_k", 3, [1, 1, 1])
    assert choice.removed == {layer: [int(torch.argmin(score))] for layer, score in enumerate(scores[:2])}


def test_per_layer_keeps_the_listed_counts():
    scores = seeded_scores([4, 4, 4])
    choice = choose("heads", scores, "per_layer", [1, 4, 2], [1, 1, 1])
    assert choice.removed == {0: sorted(torch.argsort(scores[0])[:3].tolist()),
                              2: sorted(torch.argsort(scores[2])[:2].tolist())}


def test_rules_with_key_value_groups_remove_evenly_per_group():
    scores = [torch.tensor([0.1, 0.2, 0.9, 0.8, 0.3, 0.4, 0.7, 0.6])]  # 2 groups of 4 query heads
    assert choose("heads", scores, "uniform", 0.5, [2]).removed == {0: [0, 1, 4, 5]}
    assert choose("heads", scores, "top_k", 6, [2]).removed == {0: [0, 4]}
    assert choose("heads", scores, "per_layer", [2], [2]).removed == {0: [0, 1, 3, 4, 5, 7]}


def test_rules_leave_out_skipped_blocks():
    scores = seeded_scores([4, 4])
    choice = choose("heads", scores, "per_layer", [0, 2], [1, 1], skip=frozenset({0}))
    assert list(choice.removed) == [1]


@pytest.mark.parametrize(("allocation", "amount", "groups", "message"), [
    ("top_k", 0, [1, 1], r"^heads: block 0 would keep no heads \(of 4\)"),
    ("uniform", 1.0, [1, 1], r"^heads: block 0 would keep no heads"),
    ("per_layer", [4, 0], [1, 1], r"^heads: block 1 would keep no heads"),
    ("top_k", 5, [1, 1], r"^heads: block 0 has 4, so it cannot keep 5"),
    ("per_layer", [4, 3], [1, 2], r"^heads: block 1 keeps 3 of 4 query heads; with 2 key-value groups"),
    ("per_layer", [4], [1, 1], r"^heads: allocation per_layer needs one count per block \(2\)"),
    ("per_layer", 2, [1, 1], r"^heads: allocation per_layer needs one count per block"),
    ("everywhere", 0.5, [1, 1], r"allocation must be one of global, uniform, per_layer, top_k"),
])
def test_rule_errors_name_the_field(allocation, amount, groups, message):
    with pytest.raises(ValueError, match=message):
        choose("heads", seeded_scores([4, 4]), allocation, amount, groups)


def test_rule_errors_name_the_ffn_field():
    with pytest.raises(ValueError, match=r"^ffn: block 0 has 64, so it cannot keep 65"):
        choose("ffn", seeded_scores([64]), "top_k", 65, [1])


def test_layers_to_drop_by_fraction_picks_the_lowest_scores():
    scores = torch.tensor([0.5, -0.1, 0.3, 0.05, 0.9, 0.2])
    assert layers_to_drop(scores, 0.5) == [1, 3, 5]
    assert layers_to_drop(scores, 1 / 6) == [1]
    assert layers_to_drop(scores, 0.0) == []


def test_layers_to_drop_takes_a_list_as_given():
    assert layers_to_drop(torch.zeros(4), [3, 0, 3]) == [0, 3]


@pytest.mark.parametrize(("amount", "message"), [
    ([0, 4], r"^layers: index 4 is out of range for a 4-block model \(0-3\)"),
    ([-1], r"^layers: index -1 is out of range"),
    ([0, 1, 2, 3], r"^layers: removing 4 of 4 blocks leaves none"),
    (1.0, r"^layers: removing 4 of 4 blocks leaves none"),
    (0.9, r"^layers: removing 4 of 4 blocks leaves none"),
])
def test_layers_to_drop_errors_name_the_field(amount, message):
    with pytest.raises(ValueError, match=message):
        layers_to_drop(torch.tensor([0.1, 0.2, 0.3, 0.4]), amount)


@pytest.mark.parametrize(("allocation", "amount", "kept"), [
    ("global", 0.5, None), ("uniform", 0.3, [64, 128, 32]), ("top_k", 32, [32, 32, 32]),
])
def test_a_multiple_rounds_what_every_block_keeps(allocation, amount, kept):
    sizes = [96, 160, 40]  # 40: fewer than two multiples, so the largest one it holds
    scores = seeded_scores(sizes)
    choice = choose("ffn", scores, allocation, amount, [1, 1, 1], multiple=32)
    counts = [size - len(choice.removed.get(layer, [])) for layer, size in enumerate(sizes)]
    assert all(count % 32 == 0 and count > 0 for count in counts)
    if kept is not None:  # uniform: 96 - 29 = 67 -> 64, 160 - 48 = 112 -> 128, 40 - 12 = 28 -> 32
        assert counts == kept
    else:  # global: each block's ranked count rounded to the nearest multiple, the lowest still the ones gone
        plain = choose("ffn", scores, allocation, amount, [1, 1, 1])
        ranked = [size - len(plain.removed.get(layer, [])) for layer, size in enumerate(sizes)]
        assert counts == [max(min(int(count / 32 + 0.5) * 32, size // 32 * 32), 32)
                          for count, size in zip(ranked, sizes)]
        for layer, removed in choice.removed.items():
            order = torch.argsort(scores[layer], stable=True)
            assert removed == sorted(int(unit) for unit in order[:len(removed)])


@pytest.mark.parametrize(("allocation", "amount", "message"), [
    ("per_layer", [64, 100, 32], "block 1 keeps 100, not a multiple of ffn_multiple_of \\(32\\)"),
    ("global", 0.5, "ffn_multiple_of: block 2 has 16 ffn units, fewer than 32"),
])
def test_counts_off_the_multiple_and_blocks_narrower_than_it_are_refused(allocation, amount, message):
    sizes = [96, 160, 16] if allocation == "global" else [96, 160, 40]
    with pytest.raises(ValueError, match=message):
        choose("ffn", seeded_scores(sizes), allocation, amount, [1, 1, 1], multiple=32)

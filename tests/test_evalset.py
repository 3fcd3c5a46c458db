import numpy as np
import pytest

from compress.evalset import EvalSet


def small() -> EvalSet:
    ids = np.array([[5, 6, 7, 0], [8, 9, 0, 0], [4, 4, 4, 4]], np.int64)
    return EvalSet("sequence-classification", {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)},
                   pad_token_id=0, labels=np.array([1, 0, 1]))


def test_batches_trim_to_the_longest_row_of_each_batch():
    shapes = [(rows, features["input_ids"].shape) for rows, features in small().batches(2)]
    assert shapes == [(slice(0, 2), (2, 3)), (slice(2, 3), (1, 4))]


def test_real_token_inputs_are_the_rows_real_tokens_in_order_without_padding():
    evalset = small()
    evalset.features["token_type_ids"] = np.ones_like(evalset.features["input_ids"])
    fixed = evalset.real_token_inputs(batch_size=2, seq_len=7)
    assert set(fixed) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(value.shape == (2, 7) and value.dtype == np.int64 for value in fixed.values())
    # The real tokens 5 6 7 | 8 9 | 4 4 4 4, then again from the start: never a pad id.
    assert fixed["input_ids"].tolist() == [[5, 6, 7, 8, 9, 4, 4], [4, 4, 5, 6, 7, 8, 9]]
    assert (fixed["attention_mask"] == 1).all()
    assert (fixed["token_type_ids"] == 0).all()


def test_real_token_inputs_cut_long_data_and_refuse_empty_data():
    assert small().real_token_inputs(1, 2)["input_ids"].tolist() == [[5, 6]]
    empty = EvalSet("sequence-classification", {"input_ids": np.zeros((1, 3), np.int64),
                                                "attention_mask": np.zeros((1, 3), np.int64)}, 0)
    with pytest.raises(ValueError, match="no tokens"):
        empty.real_token_inputs(1, 4)


def test_padded_inputs_pad_cut_and_repeat_rows():
    padded = small().padded_inputs(batch_size=4, seq_len=6)
    assert padded["input_ids"].shape == (4, 6)
    assert padded["input_ids"][1].tolist() == [8, 9, 0, 0, 0, 0]
    assert padded["attention_mask"][1].tolist() == [1, 1, 0, 0, 0, 0]
    assert padded["input_ids"][3].tolist() == padded["input_ids"][0].tolist()  # rows repeat to fill the batch
    assert small().padded_inputs(1, 2)["attention_mask"].tolist() == [[1, 1]]


def test_real_length_inputs_are_unpadded_single_rows():
    rows = small().real_length_inputs(5)
    assert [r["input_ids"].shape for r in rows] == [(1, 3), (1, 2), (1, 4)]


def test_save_and_load_round_trip(tmp_path):
    original = small()
    original.save(tmp_path / "e.npz")
    loaded = EvalSet.load(tmp_path / "e.npz")
    assert loaded.task == original.task and loaded.pad_token_id == 0
    assert np.array_equal(loaded.features["input_ids"], original.features["input_ids"])
    assert np.array_equal(loaded.labels, original.labels) and loaded.target_mask is None
    assert len(loaded.take(2)) == 2


def test_the_fingerprint_follows_the_rows_and_their_labels():
    assert small().fingerprint() == small().fingerprint()
    relabelled = small()
    relabelled.labels = np.array([0, 0, 1])
    assert relabelled.fingerprint() != small().fingerprint()
    assert small().take(2).fingerprint() != small().fingerprint()

import numpy as np

from compress.evalset import EvalSet


def small() -> EvalSet:
    ids = np.array([[5, 6, 7, 0], [8, 9, 0, 0], [4, 4, 4, 4]], np.int64)
    return EvalSet("sequence-classification", {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)},
                   pad_token_id=0, labels=np.array([1, 0, 1]))


def test_batches_trim_to_the_longest_row_of_each_batch():
    shapes = [(rows, features["input_ids"].shape) for rows, features in small().batches(2)]
    assert shapes == [(slice(0, 2), (2, 3)), (slice(2, 3), (1, 4))]


def test_fixed_length_inputs_pad_cut_and_repeat_rows():
    padded = small().fixed_length_inputs(batch_size=4, seq_len=6)
    assert padded["input_ids"].shape == (4, 6)
    assert padded["input_ids"][1].tolist() == [8, 9, 0, 0, 0, 0]
    assert padded["input_ids"][3].tolist() == padded["input_ids"][0].tolist()  # rows repeat to fill the batch
    assert small().fixed_length_inputs(1, 2)["attention_mask"].tolist() == [[1, 1]]


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

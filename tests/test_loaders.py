import numpy as np
import pytest
import torch
from datasets import Dataset

from compress.data import lm_token_ids
from compress.errors import DataError
from compress.loaders import calibration_batches, train_loader

CLASSIFY, LM = "sequence-classification", "causal-lm"
TEXTS = ["good movie and a great plot", "awful film", "the actor was not very fun but the story was",
         "dull", "i love this really fast story", "bad", "quite a good film",
         "hate the plot and the actor and the scene", "the scene was slow", "fun"]


@pytest.fixture
def labelled() -> Dataset:
    return Dataset.from_dict({"text": TEXTS, "label": [i % 2 for i in range(len(TEXTS))]})


@pytest.fixture
def text() -> Dataset:
    return Dataset.from_dict({"text": [" ".join(TEXTS * 4)]})


def assert_right_padded(batch: dict, pad_id: int) -> None:
    mask = np.asarray(batch["attention_mask"])
    assert (np.diff(mask, axis=1) <= 0).all()  # ones, then only zeros
    assert (mask[:, 0] == 1).all()
    assert (np.asarray(batch["input_ids"])[mask == 0] == pad_id).all()


def order(loader) -> list[list[list[int]]]:
    return [batch["input_ids"].tolist() for batch in loader]


def test_classification_train_loader_pads_each_batch_at_the_right(labelled, tiny_classifier):
    _, tokenizer = tiny_classifier
    loader = train_loader(labelled, tokenizer, CLASSIFY, max_length=6, batch_size=4, seed=0)
    batches = list(loader)
    assert [len(b["labels"]) for b in batches] == [4, 4, 2]
    for batch in batches:
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        assert batch["input_ids"].dtype == torch.int64
        assert batch["input_ids"].shape[1] == batch["attention_mask"].sum(1).max() <= 6  # its longest row
        assert_right_padded(batch, tokenizer.pad_token_id)
    seen = sorted(zip((row for b in batches for row in b["attention_mask"].sum(1).tolist()),
                      (label for b in batches for label in b["labels"].tolist())))
    lengths = [min(len(tokenizer(t)["input_ids"]), 6) for t in TEXTS]
    assert seen == sorted(zip(lengths, labelled["label"]))  # every row once, with its label


def test_train_loader_order_follows_the_seed(labelled, tiny_classifier):
    _, tokenizer = tiny_classifier
    first, again, other = (train_loader(labelled, tokenizer, CLASSIFY, 16, 2, seed) for seed in (0, 0, 1))
    assert order(first) == order(again) != order(other)


def test_sentence_pairs_are_encoded_together(tiny_classifier):
    _, tokenizer = tiny_classifier
    table = Dataset.from_dict({"text": ["good film"], "text_pair": ["bad plot"], "label": [1]})
    batch = next(iter(train_loader(table, tokenizer, CLASSIFY, 16, 1, 0)))
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1]]  # [CLS] a a [SEP] b b [SEP]


def test_causal_lm_train_loader_cuts_the_stream_into_blocks(text, tiny_causal_lm):
    _, tokenizer = tiny_causal_lm
    ids = lm_token_ids(text["text"], tokenizer)
    batches = list(train_loader(text, tokenizer, LM, max_length=8, batch_size=3, seed=0))
    blocks = torch.cat([b["input_ids"] for b in batches])
    assert blocks.shape == (len(ids) // 8, 8)
    assert all(torch.equal(b["labels"], b["input_ids"]) and bool(b["attention_mask"].all()) for b in batches)
    expected = sorted(ids[i:i + 8] for i in range(0, len(ids) // 8 * 8, 8))
    assert sorted(blocks.tolist()) == expected


def test_text_shorter_than_a_block_is_a_data_error(tiny_causal_lm):
    _, tokenizer = tiny_causal_lm
    with pytest.raises(DataError, match="fewer than one block of max_length 64"):
        train_loader(Dataset.from_dict({"text": ["good film"]}), tokenizer, LM, 64, 2, 0)


def test_calibration_draws_seeded_rows_as_padded_numpy_batches(tiny_classifier):
    _, tokenizer = tiny_classifier
    unlabelled = Dataset.from_dict({"text": TEXTS})
    batches = calibration_batches(unlabelled, tokenizer, CLASSIFY, max_length=8, samples=7, batch_size=3,
                                  seed=0)
    assert [len(b["input_ids"]) for b in batches] == [3, 3, 1]
    for batch in batches:
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
        assert all(v.dtype == np.int64 and isinstance(v, np.ndarray) for v in batch.values())
        assert batch["input_ids"].shape[1] == batch["attention_mask"].sum(1).max() <= 8  # its longest row
        assert_right_padded(batch, tokenizer.pad_token_id)
    again = calibration_batches(unlabelled, tokenizer, CLASSIFY, 8, 7, 3, seed=0)
    other = calibration_batches(unlabelled, tokenizer, CLASSIFY, 8, 7, 3, seed=1)
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    assert not all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, other))


def test_calibration_takes_every_row_when_asked_for_more(labelled, tiny_classifier):
    _, tokenizer = tiny_classifier
    batches = calibration_batches(labelled, tokenizer, CLASSIFY, 32, samples=100, batch_size=4, seed=0)
    assert sum(len(b["input_ids"]) for b in batches) == len(TEXTS)
    assert "labels" not in batches[0]


def test_causal_lm_calibration_samples_whole_blocks(text, tiny_causal_lm):
    _, tokenizer = tiny_causal_lm
    ids = lm_token_ids(text["text"], tokenizer)
    blocks = [ids[i:i + 8] for i in range(0, len(ids) // 8 * 8, 8)]
    batches = calibration_batches(text, tokenizer, LM, max_length=8, samples=5, batch_size=2, seed=0)
    drawn = [row for b in batches for row in b["input_ids"].tolist()]
    assert [b["input_ids"].shape for b in batches] == [(2, 8), (2, 8), (1, 8)]
    assert len(drawn) == 5 and all(row in blocks for row in drawn) and len({tuple(r) for r in drawn}) == 5
    assert all(b["attention_mask"].all() for b in batches)
    assert set(batches[0]) == {"input_ids", "attention_mask"}

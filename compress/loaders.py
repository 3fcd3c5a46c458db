"""Training and calibration data: the one place that tokenizes task tables for anything but evaluation.

Classification rows are tokenized one by one (text, optional text_pair, truncated to `max_length`); causal LM
text is one token stream cut into `max_length` blocks. Batches are always right-padded, like the eval sets.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from compress.arch import is_text_stream
from compress.data import lm_token_ids
from compress.errors import DataError

Row = dict[str, Any]  # token lists (or arrays) per model input; training rows also hold `labels`
PER_ROW = ("labels", "row_id")  # one value per row, never padded


def train_loader(table: Any, tokenizer: Any, task: str, max_length: int, batch_size: int,
                 seed: int, row_ids: bool = False) -> DataLoader:
    """Shuffled (seeded) torch batches with `labels`: class ids, or the input ids for causal LM; with
    `row_ids`, also each row's index in the table (`row_id`), for whatever is kept per row across epochs."""
    if is_text_stream(task):
        rows = block_rows(lm_blocks(table, tokenizer, max_length))
    else:
        encoded = encode_rows(table, tokenizer, max_length)
        labels = table["label"] if "label" in table.column_names else [None] * len(table)
        rows = [row if label is None else {**row, "labels": label}
                for row, label in zip(encoded, labels, strict=True)]
    if row_ids:
        rows = [{**row, "row_id": index} for index, row in enumerate(rows)]
    collate = partial(collate_rows, pad_id=tokenizer.pad_token_id, causal=is_text_stream(task))
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(rows, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=collate)


def calibration_batches(table: Any, tokenizer: Any, task: str, max_length: int, samples: int, batch_size: int,
                        seed: int) -> list[dict[str, np.ndarray]]:
    """`samples` seeded rows (causal LM: blocks), all when fewer, as right-padded int64 numpy batches."""
    rng = np.random.default_rng(seed)
    if not len(table):
        return []
    if is_text_stream(task):
        blocks = lm_blocks(table, tokenizer, max_length)
        rows = block_rows(blocks[drawn(rng, len(blocks), samples)])
    else:
        rows = encode_rows(table.select(drawn(rng, len(table), samples)), tokenizer, max_length)
    starts = range(0, len(rows), batch_size)
    return [pad_right(rows[start:start + batch_size], tokenizer.pad_token_id) for start in starts]


def drawn(rng: np.random.Generator, population: int, samples: int) -> np.ndarray:
    """Indices of `samples` distinct items (all of them when fewer), in their original order."""
    return np.sort(rng.choice(population, size=min(samples, population), replace=False))


def encode_rows(table: Any, tokenizer: Any, max_length: int) -> list[Row]:
    pairs = list(table["text_pair"]) if "text_pair" in table.column_names else None
    encoded = tokenizer(list(table["text"]), pairs, truncation=True, max_length=max_length)
    return [{key: values[i] for key, values in encoded.items()} for i in range(len(table))]


def block_rows(blocks: np.ndarray) -> list[Row]:
    return [{"input_ids": block, "attention_mask": np.ones_like(block)} for block in blocks]


def lm_blocks(table: Any, tokenizer: Any, max_length: int) -> np.ndarray:
    """int64 [blocks, max_length]: the text as one token stream; a last, shorter block is dropped."""
    ids = np.asarray(lm_token_ids(table["text"], tokenizer), dtype=np.int64)
    if len(ids) < max_length:
        raise DataError(f"the text holds {len(ids)} tokens, fewer than one block of max_length {max_length}")
    return ids[: len(ids) // max_length * max_length].reshape(-1, max_length)


def pad_right(rows: list[Row], pad_id: int) -> dict[str, np.ndarray]:
    """int64 arrays as wide as the longest row; input_ids padded with `pad_id`, every other input with 0."""
    width = max(len(row["input_ids"]) for row in rows)
    batch = {key: np.full((len(rows), width), pad_id if key == "input_ids" else 0, dtype=np.int64)
             for key in rows[0]}
    for i, row in enumerate(rows):
        for key, values in row.items():
            batch[key][i, : len(values)] = values
    return batch


def collate_rows(rows: list[Row], pad_id: int, causal: bool) -> dict[str, torch.Tensor]:
    per_row = [key for key in PER_ROW if key in rows[0]]
    features = pad_right([{k: v for k, v in row.items() if k not in per_row} for row in rows], pad_id)
    batch = {key: torch.from_numpy(values) for key, values in features.items()}
    batch |= {key: torch.tensor([row[key] for row in rows]) for key in per_row}
    if causal:  # causal LM blocks are never padded, so every position is a target
        batch["labels"] = batch["input_ids"].clone()
    return batch

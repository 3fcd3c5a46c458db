"""Task data: local csv/tsv/jsonl/text files or hub datasets, through `datasets`, checked up front."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compress.arch import is_text_stream
from compress.errors import DataError, OfflineError
from compress.evalset import EvalSet
from compress.recipe import DataConfig, DataSource

INTEGER = re.compile(r"-?\d+")
FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "json", ".json": "json", ".txt": "text", ".raw": "text"}


@dataclass
class TaskData:
    task: str
    # datasets.Dataset tables with columns text, [text_pair], [label] (int ids). `train` never holds the
    # validation rows; `calib` is None when calibration samples come from `train`.
    train: Any
    eval: Any
    label_names: list[str] | None
    fingerprint: str  # of the files' bytes and the settings that shaped them, for stage caching
    notes: dict[str, Any] = field(default_factory=dict)
    validation: Any = None
    calib: Any = None
    own_rows: dict[str, Any] = field(default_factory=dict)  # steps' own `train_data`, by the source's JSON

    def table(self, split: str) -> Any:
        """`eval`, `validation`, `train`, or `calib` (which falls back to train)."""
        table = self.train if split == "calib" and self.calib is None else getattr(self, split)
        if table is None:
            needs = {"train": "data.train", "validation": "data.train or data.validation",
                     "calib": "data.train or data.calib"}
            raise DataError(f"this step needs {needs.get(split, 'data.' + split)} in the recipe")
        return table

    def training_rows(self, source: DataSource | None) -> Any:
        """A step's own `train_data` when it has one (loaded with the recipe's data), else data.train."""
        return self.table("train") if source is None else self.own_rows[source.model_dump_json()]


SOURCES = ("train", "eval", "validation", "calib")


def load_task_data(cfg: DataConfig, task: str, seed: int = 0,
                   train_sources: dict[str, DataSource] | None = None) -> TaskData:
    """The recipe's tables; `train_sources` (a step's own training rows, by field name) are read with them, so a
    bad file fails before any stage runs."""
    classify = not is_text_stream(task)
    # Calibration needs inputs only: its rows may be unlabelled.
    tables = {name: read_table(getattr(cfg, name), f"data.{name}", classify, labelled=name != "calib")
              for name in SOURCES if getattr(cfg, name) is not None}
    notes: dict[str, Any] = {}
    if "eval" not in tables:
        tables["train"], tables["eval"], notes["eval_split"] = carve(tables["train"], task, cfg.eval_fraction, None, seed)
    if "validation" not in tables and "train" in tables:
        tables["train"], tables["validation"], notes["validation_split"] = carve(
            tables["train"], task, cfg.validation_fraction, cfg.validation_max_rows, seed)
    label_names = None
    if classify:
        label_names = _label_names(tables, cfg.labels)
        train_labelled = "label" in getattr(tables.get("train"), "column_names", ())
        tables = {name: _encode_labels(table, label_names, f"data.{name}", train_labelled)
                  if "label" in table.column_names else table for name, table in tables.items()}
        if cfg.max_eval_rows:
            tables["eval"] = tables["eval"].select(range(min(cfg.max_eval_rows, len(tables["eval"]))))
    own_rows = {}
    for where, src in (train_sources or {}).items():
        table = read_table(src, where, classify)
        if classify:
            table, notes.setdefault("train_data", {})[where] = _own_rows(table, where, label_names, tables)
        own_rows[src.model_dump_json()] = table
    return TaskData(task, tables.get("train"), tables["eval"], label_names, _fingerprint(cfg, task, seed), notes,
                    validation=tables.get("validation"), calib=tables.get("calib"), own_rows=own_rows)


def _own_rows(table: Any, where: str, label_names: list[str], tables: dict[str, Any]) -> tuple[Any, dict[str, int]]:
    """A step's own classification rows, labels encoded like data.train's, without any row whose text (and pair)
    the validation or eval split holds: drawn from the same corpus, they would otherwise be trained on."""
    if "label" in table.column_names:
        table = _encode_labels(table, label_names, where, "label" in getattr(tables.get("train"), "column_names", ()))

    def texts(rows: Any) -> list[tuple[str, str | None]]:
        pairs = rows["text_pair"] if "text_pair" in rows.column_names else [None] * len(rows)
        return list(zip(rows["text"], pairs, strict=True))

    held_out = {text for name in ("validation", "eval") if name in tables for text in texts(tables[name])}
    kept = [index for index, text in enumerate(texts(table)) if text not in held_out]
    if not kept:
        raise DataError(f"{where}: every row is also in the validation or eval split")
    left_out = len(table) - len(kept)
    return (table.select(kept) if left_out else table), {"rows": len(kept), "left_out_as_held_out": left_out}


def carve(table: Any, task: str, fraction: float, cap: int | None, seed: int) -> tuple[Any, Any, dict[str, Any]]:
    """(rest, carved, note): a seeded share of a table's rows; for causal LM text, the last lines of the text."""
    if is_text_stream(task):
        return _carve_text_tail(table, fraction, cap)
    rows = max(1, round(len(table) * fraction))
    rows = min(rows, cap) if cap else rows
    if rows >= len(table):
        raise DataError(f"data.train: {len(table)} rows are too few to carve {rows} off")
    split = table.train_test_split(test_size=rows, seed=seed)
    return split["train"], split["test"], {"carved_from": "data.train", "fraction": fraction, "seed": seed,
                                           "rows": rows}


def _carve_text_tail(table: Any, fraction: float, cap: int | None) -> tuple[Any, Any, dict[str, Any]]:
    """Language-model text is one stream: hold out its last lines, so neither part has holes."""
    from datasets import Dataset

    lines = "\n".join(table["text"]).splitlines()
    count = max(1, round(len(lines) * fraction))
    count = min(count, cap) if cap else count
    if count >= len(lines):
        raise DataError(f"data.train: {len(lines)} lines of text are too few to carve {count} off")
    head, tail = lines[:-count], lines[-count:]
    note = {"carved_from": "data.train", "fraction": fraction, "lines": count, "how": "last lines of the text"}
    return Dataset.from_dict({"text": ["\n".join(head)]}), Dataset.from_dict({"text": ["\n".join(tail)]}), note


def read_table(src: DataSource, where: str, classify: bool, labelled: bool = True) -> Any:
    """One source as a Dataset with columns text, [text_pair], [label]; DataError names `where` and the file.

    Classification reads rows (a text file: one per line) with their labels when `labelled` and the source
    names a label column; a causal LM reads a text file as one stream."""
    table = _read_hub(src, where) if src.dataset else _read_file(src, where, rows_are_lines=classify)
    name = src.path or src.dataset
    if len(table) == 0:
        raise DataError(f"{where}: {name} has no rows")
    wanted = {"text": src.text} | ({"text_pair": src.text_pair} if src.text_pair else {})
    if classify and labelled and src.label is not None:
        wanted["label"] = src.label
    missing = [column for column in wanted.values() if column not in table.column_names]
    if missing:
        raise DataError(f"{where}: {name} has no column {missing[0]!r} (columns: {', '.join(table.column_names)})"
                        + _delimiter_hint(table.column_names, where))
    table = table.select_columns(list(wanted.values()))
    table = table.rename_columns({v: k for k, v in wanted.items() if k != v})
    if src.limit:
        table = table.select(range(min(src.limit, len(table))))
    return table


def _read_file(src: DataSource, where: str, rows_are_lines: bool) -> Any:
    from datasets import disable_progress_bars

    disable_progress_bars()  # a local table loads in a blink: a bar per file is only noise
    from datasets.exceptions import DatasetGenerationError

    path = Path(src.path)
    if not path.is_file():
        raise DataError(f"{where}.path: {path} not found")
    if path.stat().st_size == 0:
        raise DataError(f"{where}.path: {path} is empty")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{where}.path: {path} has an unknown extension (known: {', '.join(FORMATS)})")
    if kind == "text":
        # A text file holds one row per line for classification, one stream for a language model.
        return _load_local("text", path, sample_by="line" if rows_are_lines else "document")
    if kind == "json":
        return _load_local("json", path)
    _check_utf8(path, where)
    options: dict[str, Any] = {"sep": src.delimiter or ("\t" if kind == "tsv" else ","), "keep_default_na": False}
    if kind == "tsv":
        options["quoting"] = csv.QUOTE_NONE  # TSV text keeps its quote characters
    if src.columns:
        options["column_names"] = src.columns
    try:
        return _load_local("csv", path, **options)
    except (ValueError, DatasetGenerationError) as err:  # the csv reader's own error says which line is off
        if "corresponds to no data" in str(err):
            raise DataError(f"{where}: {path} has no rows") from None
        raise DataError(f"{where}.path: {path} could not be read as {kind}: {str(err).splitlines()[0]}") from None


def _load_local(builder: str, path: Path, **options: Any) -> Any:
    """datasets would keep an Arrow copy of the user's file under ~/.cache for good: build it in a scratch
    directory instead, and hold the table in memory."""
    from datasets import load_dataset

    with tempfile.TemporaryDirectory(prefix="compress-data-") as scratch:
        return load_dataset(builder, data_files=str(path), split="train", cache_dir=scratch, keep_in_memory=True,
                            **options)


def _check_utf8(path: Path, where: str) -> None:
    """A table in another encoding is named with the row of its first foreign byte, before the csv reader fails
    on it less helpfully."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        row = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{where}.path: {path} is not UTF-8 text (byte 0x{data[err.start]:02x} on line {row}); "
                        "save it as UTF-8") from None


def _delimiter_hint(columns: list[str], where: str) -> str:
    """When the one column read holds another separator, the file is likely separated by that one."""
    if len(columns) != 1:
        return ""
    found = next((sep for sep in (",", "\t", ";", "|") if sep in columns[0]), None)
    return f"; it looks {found!r}-separated: set {where}.delimiter: {found!r}" if found else ""


def _read_hub(src: DataSource, where: str) -> Any:
    from datasets import load_dataset

    from compress.models import hub_reachable

    if not hub_reachable():
        raise OfflineError(f"{where}.dataset: {src.dataset!r} is a hub dataset, but the hub cannot be reached from "
                           "here; save it to a local file where you are online and give its 'path' instead")
    return load_dataset(src.dataset, src.subset, split=src.split)


def _label_names(tables: dict[str, Any], declared: list[str] | None) -> list[str]:
    if declared:
        return list(declared)
    labelled = [table for table in tables.values() if "label" in table.column_names]
    if not labelled:
        raise DataError("data: no source has labels; declare their names in data.labels")
    reference = labelled[0]  # train when it has labels, else eval
    values = sorted(set(reference["label"]), key=lambda v: (not isinstance(v, int), v))
    if all(isinstance(v, int) for v in values):
        return [str(i) for i in range(int(max(values)) + 1)]
    return [str(v) for v in values]


def _encode_labels(table: Any, names: list[str], where: str, against_train: bool) -> Any:
    ids = {name: i for i, name in enumerate(names)}
    encoded = []
    for row, value in enumerate(list(table["label"])):
        key = str(value)
        if isinstance(value, str) and key not in ids and INTEGER.fullmatch(value.strip()):
            value = int(value)  # one non-numeric cell makes the csv reader read the whole column as text
        if isinstance(value, int) and not isinstance(value, bool) and key not in ids and 0 <= value < len(names):
            encoded.append(value)  # integer labels index a declared list of names
            continue
        if key not in ids:
            source = "data.train" if against_train and where != "data.train" else "the declared data.labels"
            raise DataError(f"{where}: label {value!r} (row {row + 1}) never occurs in {source} "
                            f"(labels: {', '.join(names)})")
        encoded.append(ids[key])
    return table.remove_columns("label").add_column("label", encoded)


def _fingerprint(cfg: DataConfig, task: str, seed: int) -> str:
    digest = hashlib.sha256(json.dumps([cfg.model_dump(mode="json"), task, seed], sort_keys=True).encode())
    for src in (getattr(cfg, name) for name in SOURCES):
        if src is not None and src.path:
            digest.update(Path(src.path).read_bytes())
    return digest.hexdigest()


def build_eval_set(data: TaskData, tokenizer: Any, cfg: DataConfig, split: str = "eval") -> EvalSet:
    """Tokenized arrays of the eval split (the reported metric) or of the validation split (for tuning)."""
    table = data.table(split)
    if not is_text_stream(data.task):
        return _classification_eval_set(table, data.task, tokenizer, cfg.max_length)
    return _lm_eval_set(table, data.task, tokenizer, cfg.max_length, cfg.stride or cfg.max_length,
                        cfg.max_eval_tokens, f"data.{split}")


def _classification_eval_set(table: Any, task: str, tokenizer: Any, max_length: int) -> EvalSet:
    pairs = list(table["text_pair"]) if "text_pair" in table.column_names else None
    encoded = tokenizer(list(table["text"]), pairs, truncation=True, max_length=max_length, padding="longest",
                        return_tensors="np")
    features = {k: np.asarray(v, dtype=np.int64) for k, v in encoded.items()}
    labels = np.asarray(list(table["label"]), np.int64) if "label" in table.column_names else None  # unlabeled: outputs only
    return EvalSet(task, features, int(tokenizer.pad_token_id), labels=labels)


def lm_token_ids(texts: list[str], tokenizer: Any, cap: int | None = None) -> list[int]:
    ids = tokenizer("\n\n".join(list(texts)), add_special_tokens=False)["input_ids"]
    return ids[:cap] if cap else ids


def _lm_eval_set(table: Any, task: str, tokenizer: Any, context: int, stride: int, cap: int | None,
                 where: str) -> EvalSet:
    """Sliding windows that score every token but the first exactly once, each with up to `context` tokens.

    A window starts `stride` tokens after the previous one, but never past the last token that one scored,
    so with stride == context each window still has the previous token to predict its first from.
    """
    ids = lm_token_ids(table["text"], tokenizer, cap)
    if len(ids) < 2:
        raise DataError(f"{where}: the text holds fewer than 2 tokens; nothing to score")
    rows, masks, attention = [], [], []
    begin, scored_until = 0, 1
    while scored_until < len(ids):
        end = min(begin + context, len(ids))
        window = ids[begin:end]
        mask = np.zeros(context, dtype=bool)
        mask[scored_until - begin : end - begin] = True
        rows.append(window + [tokenizer.pad_token_id] * (context - len(window)))
        attention.append([1] * len(window) + [0] * (context - len(window)))
        masks.append(mask)
        scored_until, begin = end, min(begin + stride, end - 1)
    features = {"input_ids": np.asarray(rows, np.int64), "attention_mask": np.asarray(attention, np.int64)}
    return EvalSet(task, features, int(tokenizer.pad_token_id), target_mask=np.stack(masks),
                   meta={"tokens": len(ids), "context": context, "stride": stride})

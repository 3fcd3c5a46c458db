import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from compress.data import build_eval_set, load_task_data
from compress.errors import DataError
from compress.recipe import DataConfig, DataSource

CLS = "sequence-classification"


def config(**data) -> DataConfig:
    return DataConfig.model_validate(data)


def test_string_labels_become_ids_and_names_are_kept(sentiment_files):
    data = load_task_data(config(train={"path": str(sentiment_files["train"]), "text": "sentence"},
                                 eval={"path": str(sentiment_files["dev"]), "text": "sentence"}), CLS)
    assert data.label_names == ["negative", "positive"]
    assert set(data.train["label"]) == {0, 1}
    assert len(data.eval) == 40 and set(data.notes) == {"validation_split"}


def test_eval_split_is_carved_from_train_seeded_and_recorded(sentiment_files):
    cfg = config(train={"path": str(sentiment_files["train"]), "text": "sentence"}, eval_fraction=0.25)
    first, again = load_task_data(cfg, CLS, seed=3), load_task_data(cfg, CLS, seed=3)
    assert len(first.eval) == 50 and len(first.validation) == 15 and len(first.train) == 135
    assert first.eval["text"] == again.eval["text"]
    assert first.notes["eval_split"] == {"carved_from": "data.train", "fraction": 0.25, "seed": 3, "rows": 50}


def test_validation_rows_are_withheld_from_training_and_recorded(sentiment_files):
    cfg = config(train={"path": str(sentiment_files["train"]), "text": "sentence"},
                 eval={"path": str(sentiment_files["dev"]), "text": "sentence"})
    data = load_task_data(cfg, CLS, seed=1)
    assert (len(data.train), len(data.validation)) == (180, 20)
    train_rows = set(zip(data.train["text"], data.train["label"]))
    assert not train_rows & set(zip(data.validation["text"], data.validation["label"]))
    assert data.notes["validation_split"] == {"carved_from": "data.train", "fraction": 0.1, "seed": 1, "rows": 20}
    assert load_task_data(cfg, CLS, seed=1).validation["text"] == data.validation["text"]
    capped = load_task_data(cfg.model_copy(update={"validation_max_rows": 7}), CLS, seed=1)
    assert (len(capped.train), len(capped.validation)) == (193, 7)


def test_declared_validation_and_unlabelled_calibration_rows(tmp_path, sentiment_files):
    calib = tmp_path / "calib.txt"
    calib.write_text("just some text to calibrate on\n")
    data = load_task_data(config(train={"path": str(sentiment_files["train"]), "text": "sentence"},
                                 validation={"path": str(sentiment_files["dev"]), "text": "sentence"},
                                 eval={"path": str(sentiment_files["dev"]), "text": "sentence"},
                                 calib={"path": str(calib)}), CLS)
    assert len(data.train) == 200 and len(data.validation) == 40 and "validation_split" not in data.notes
    assert data.table("calib")["text"] == ["just some text to calibrate on"]  # one row per line
    no_calib = load_task_data(config(train={"path": str(sentiment_files["train"]), "text": "sentence"}), CLS)
    assert no_calib.table("calib") is no_calib.train


def test_a_split_the_recipe_cannot_give_is_a_data_error(sentiment_files):
    data = load_task_data(config(eval={"path": str(sentiment_files["dev"]), "text": "sentence"}), CLS)
    assert data.train is None and data.validation is None
    with pytest.raises(DataError, match="needs data.train or data.calib"):
        data.table("calib")
    with pytest.raises(DataError, match="needs data.train or data.validation"):
        data.table("validation")


def test_causal_lm_text_holds_out_its_last_lines(text_file):
    data = load_task_data(config(train={"path": str(text_file)}, eval={"path": str(text_file)}), "causal-lm")
    lines = text_file.read_text().splitlines()
    assert data.validation["text"] == ["\n".join(lines[-30:])]
    assert data.train["text"] == ["\n".join(lines[:-30])]
    assert data.notes["validation_split"]["lines"] == 30


def test_eval_label_never_seen_in_train(tmp_path, sentiment_files):
    dev = tmp_path / "dev.tsv"
    dev.write_text("sentence\tlabel\ngood film\tpositive\nmeh\tneutral\n")
    with pytest.raises(DataError, match=r"data.eval: label 'neutral' \(row 2\) never occurs in data.train"):
        load_task_data(config(train={"path": str(sentiment_files["train"]), "text": "sentence"},
                              eval={"path": str(dev), "text": "sentence"}), CLS)


def test_label_outside_declared_list(tmp_path):
    dev = tmp_path / "dev.tsv"
    dev.write_text("sentence\tlabel\ngood film\t1\nodd\t7\n")
    with pytest.raises(DataError, match="label 7 .* never occurs in the declared data.labels"):
        load_task_data(config(eval={"path": str(dev), "text": "sentence"}, labels=["negative", "positive"]), CLS)


def test_integer_labels_index_declared_names(tmp_path):
    dev = tmp_path / "dev.tsv"
    dev.write_text("sentence\tlabel\ngood film\t1\nbad film\t0\n")
    data = load_task_data(config(eval={"path": str(dev), "text": "sentence"}, labels=["negative", "positive"]), CLS)
    assert data.eval["label"] == [1, 0]


@pytest.mark.parametrize(
    ("content", "column", "expected"),
    [
        (None, "sentence", r"data.eval.path: .*absent.tsv not found"),
        ("", "sentence", r"data.eval.path: .*empty.tsv is empty"),
        ("sentence\tlabel\n", "sentence", r"data.eval: .* has no rows"),
        ("sentence\tlabel\nfine\t1\n", "review", r"data.eval: .* has no column 'review' \(columns: sentence, label\)"),
    ],
)
def test_bad_files_name_the_field_and_file(tmp_path, content, column, expected):
    name = {None: "absent.tsv", "": "empty.tsv"}.get(content, "dev.tsv")
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=expected):
        load_task_data(config(eval={"path": str(path), "text": column}), CLS)


def test_headerless_tsv_with_named_columns_and_jsonl_pairs(tmp_path):
    tsv = tmp_path / "news.tsv"
    tsv.write_text("stocks rally\tBusiness\nteam wins\tSports\n")
    data = load_task_data(config(eval={"path": str(tsv), "columns": ["text", "label"]}), CLS)
    assert data.label_names == ["Business", "Sports"]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"a": f"q{i}", "b": f"a{i}", "y": i % 2}) for i in range(4)))
    data = load_task_data(config(eval={"path": str(pairs), "text": "a", "text_pair": "b", "label": "y"}), CLS)
    assert data.eval.column_names == ["text", "text_pair", "label"] and data.label_names == ["0", "1"]


def test_classification_eval_set_pads_to_the_longest_row(sentiment_files, tiny_bert_dir):
    cfg = config(eval={"path": str(sentiment_files["dev"]), "text": "sentence"})
    evals = build_eval_set(load_task_data(cfg, CLS), AutoTokenizer.from_pretrained(tiny_bert_dir), cfg)
    assert len(evals) == 40 and evals.features["input_ids"].shape[1] == evals.lengths.max()
    assert set(evals.features) == {"input_ids", "attention_mask", "token_type_ids"}
    assert evals.labels.tolist() == [1, 0] * 20  # 'negative' < 'positive'; rows alternate positive first


@pytest.mark.parametrize("stride", [32, 20])
def test_lm_windows_score_every_token_once(text_file, tiny_llama_dir, stride):
    cfg = config(eval={"path": str(text_file)}, max_length=32, stride=stride, max_eval_tokens=300)
    evals = build_eval_set(load_task_data(cfg, "causal-lm"), AutoTokenizer.from_pretrained(tiny_llama_dir), cfg)
    assert evals.meta["tokens"] == 300
    assert int(evals.target_mask.sum()) == 299  # every token but the very first is predicted exactly once
    assert evals.features["input_ids"].shape[1] == 32
    assert not np.any(evals.target_mask[:, 0])


def test_unlabelled_training_rows_take_their_label_names_from_eval(tmp_path, sentiment_files):
    unlabelled = tmp_path / "unlabelled.txt"
    unlabelled.write_text("".join(f"in-domain sentence {i}\n" for i in range(20)))
    data = load_task_data(config(train={"path": str(unlabelled), "label": None},
                                 eval={"path": str(sentiment_files["dev"]), "text": "sentence"}), CLS)
    assert data.label_names == ["negative", "positive"] and "label" not in data.train.column_names
    assert len(data.train) + len(data.validation) == 20  # one row per line
    with pytest.raises(DataError, match="no source has labels; declare their names in data.labels"):
        load_task_data(config(train={"path": str(unlabelled), "label": None}), CLS)


def test_a_file_in_another_encoding_is_named_with_its_line(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_bytes("sentence\tlabel\nfine\t1\ncafé good\t1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"data.eval.path: .*dev.tsv is not UTF-8 text \(byte 0xe9 on line 3\)"):
        load_task_data(config(eval={"path": str(path), "text": "sentence"}), CLS)


def test_a_delimiter_other_than_the_extension_says_is_suggested_and_can_be_set(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("sentence,label\nfine,1\nbad,0\n")
    with pytest.raises(DataError, match=r"it looks ','-separated: set data.eval.delimiter: ','"):
        load_task_data(config(eval={"path": str(path), "text": "sentence"}), CLS)
    data = load_task_data(config(eval={"path": str(path), "text": "sentence", "delimiter": ","}), CLS)
    assert data.eval["text"] == ["fine", "bad"]


def test_messy_tsv_rows_read_as_written(tmp_path):
    """A byte-order mark, blank lines and an unbalanced quote inside a field (real GLUE files have them)."""
    path = tmp_path / "dev.tsv"
    path.write_text("\ufeffsentence\tlabel\n\"a quote that never closes\t1\n\nbad\t0\n\ngood\t1\n")
    data = load_task_data(config(eval={"path": str(path), "text": "sentence"}), CLS)
    assert data.eval["text"] == ['"a quote that never closes', "bad", "good"]


@pytest.mark.parametrize(("content", "expected"), [
    (b"\x00\x01\x02\xff\xfe binary\n", r"dev.tsv is not UTF-8 text \(byte 0xff on line 1\)"),
    (b"sentence\tlabel\nfine\t1\nodd\tnan\n", r"label 'nan' \(row 2\) never occurs in the declared data.labels"),
    (b"sentence\tlabel\nfine\t1\nodd\t\n", r"row 2"),
    (b"sentence\tlabel\nfine\t1\nodd\t-1\n", r"label -1 \(row 2\) never occurs in the declared data.labels"),
])
def test_binary_files_and_missing_or_impossible_labels_name_the_row(tmp_path, content, expected):
    path = tmp_path / "dev.tsv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=expected):
        load_task_data(config(eval={"path": str(path), "text": "sentence"}, labels=["negative", "positive"]), CLS)


def test_a_steps_own_training_rows_leave_out_the_held_out_rows_and_say_how_many(tmp_path, sentiment_files):
    cfg = config(train={"path": str(sentiment_files["train"]), "text": "sentence"},
                 eval={"path": str(sentiment_files["dev"]), "text": "sentence"})
    transfer = sentiment_files["train"].read_text() + "".join(
        line + "\n" for line in sentiment_files["dev"].read_text().splitlines()[1:6])  # 5 eval rows slipped in
    (tmp_path / "transfer.tsv").write_text(transfer)
    source = DataSource(path=str(tmp_path / "transfer.tsv"), text="sentence")
    data = load_task_data(cfg, CLS, seed=1, train_sources={"steps[1].recover.train_data": source})
    own = data.training_rows(source)
    assert data.notes["train_data"] == {"steps[1].recover.train_data": {"rows": 180, "left_out_as_held_out": 25}}
    assert set(own["text"]) == set(data.train["text"]) and set(own["label"]) == {0, 1}
    assert data.training_rows(None) is data.train


def test_own_training_rows_may_be_unlabelled_and_bad_ones_name_their_field(tmp_path, sentiment_files):
    cfg = config(train={"path": str(sentiment_files["train"]), "text": "sentence"})
    (tmp_path / "more.txt").write_text("a calm and lovely film\nthe plot drags on\n")
    unlabelled = DataSource(path=str(tmp_path / "more.txt"), label=None)
    own = load_task_data(cfg, CLS, train_sources={"steps[0].train_data": unlabelled}).training_rows(unlabelled)
    assert own.column_names == ["text"] and len(own) == 2
    with pytest.raises(DataError, match=r"^steps\[2\]\.train_data\.path: .*missing\.tsv not found"):
        load_task_data(cfg, CLS, train_sources={"steps[2].train_data": DataSource(path=str(tmp_path / "missing.tsv"))})
    (tmp_path / "odd.tsv").write_text("sentence\tlabel\nfine\tneutral\n")
    odd = DataSource(path=str(tmp_path / "odd.tsv"), text="sentence")
    with pytest.raises(DataError, match=r"^steps\[0\]\.train_data: label 'neutral' \(row 1\) never occurs in data\.train"):
        load_task_data(cfg, CLS, train_sources={"steps[0].train_data": odd})
    held_out = config(train={"path": str(sentiment_files["train"]), "text": "sentence"},
                      eval={"path": str(tmp_path / "more.txt"), "label": None})
    with pytest.raises(DataError, match=r"^steps\[0\]\.train_data: every row is also in the validation or eval"):
        load_task_data(held_out, CLS, train_sources={"steps[0].train_data": unlabelled})

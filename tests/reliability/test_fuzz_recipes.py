"""Malformed recipes, generated: every one must end in one line naming what is wrong, exit 2, and nothing written.

`make test` runs FUZZ_EXAMPLES of each kind; `make reliability` sets COMPRESS_FUZZ_EXAMPLES higher.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from compress.cli import main

FUZZ_EXAMPLES = int(os.environ.get("COMPRESS_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=not os.environ.get("COMPRESS_FUZZ_EXAMPLES"),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# Fields of the recipe and of its steps with the kind of value each takes, to be given the wrong kind.
TOP_FIELDS = ("model", "task", "data", "steps", "bench", "seed")
STEP_FIELDS = {"finetune": ("epochs", "batch_size", "lr", "max_steps", "precision", "freeze_embeddings"),
               "export": ("opset", "verify"), "ptq": ("mode", "bits", "per_channel", "calibration", "verify"),
               "prune": ("method", "sparsity", "heads", "ffn"), "distill": ("student", "alpha", "temperature")}
# Empty `steps` and `bench` are valid recipes (benchmark the base model, default settings): not wrong values.
WRONG_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                         # no subnormals: ONNX Runtime sessions in this process set the CPU to flush them to zero
                         st.floats(allow_nan=True, allow_subnormal=False),
                         st.text(max_size=40), st.lists(st.integers(), min_size=1, max_size=3),
                         st.dictionaries(st.text(max_size=5), st.integers(), min_size=1, max_size=2))
NAMES = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)


def base(data_dir: Path) -> dict:
    return {"model": "minilm-l6", "task": "sequence-classification",
            "data": {"train": {"path": str(data_dir / "train.tsv"), "text": "sentence"},
                     "eval": {"path": str(data_dir / "dev.tsv"), "text": "sentence"}},
            "steps": [{"kind": "finetune", "epochs": 1}, {"kind": "export"}, {"kind": "ptq"}],
            "bench": {"runs": 20}}


def refused(tmp_path: Path, text: str, capsys) -> str:
    """Validates, then runs, the recipe `text`: both must refuse it in one line, exit 2, writing nothing."""
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    capsys.readouterr()
    for argv in (["validate", str(path)], ["run", str(path), "--out", str(out)]):
        assert main(argv) == 2, f"{argv[0]} accepted:\n{text}"
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    assert not out.exists(), "a refused recipe wrote its output directory"
    return err[0]


@pytest.fixture
def data_dir(sentiment_files) -> Path:
    return sentiment_files["train"].parent


@FUZZ
@given(field=st.sampled_from(TOP_FIELDS), value=WRONG_VALUES)
def test_a_top_level_field_of_the_wrong_kind(tmp_path, data_dir, capsys, field, value):
    raw = base(data_dir) | {field: value}
    if field == "seed" and isinstance(value, int) and not isinstance(value, bool):
        raw["task"] = value  # an int seed is fine: break the task instead
    if field == "model" and isinstance(value, str) and value:
        raw["model"] = value + "/\0"
    refused(tmp_path, yaml.safe_dump(raw, allow_unicode=True), capsys)


@FUZZ
@given(kind=st.sampled_from(sorted(STEP_FIELDS)), data=st.data())
def test_a_step_field_of_the_wrong_kind_is_named(tmp_path, data_dir, capsys, kind, data):
    field = data.draw(st.sampled_from(STEP_FIELDS[kind]))
    value = data.draw(st.one_of(st.text(min_size=1, max_size=20).map(lambda t: "x" + t), st.lists(st.none(),
                                                                                               min_size=1)))
    raw = base(data_dir)
    raw["steps"] = [{"kind": kind, field: value}]
    line = refused(tmp_path, yaml.safe_dump(raw, allow_unicode=True), capsys)
    assert "steps" in line


@FUZZ
@given(where=st.sampled_from(["top", "data", "bench", "step"]), name=NAMES)
@example(where="top", name="ort-fuse")  # found by the fuzz: a key spelled like a step kind hid its own name
@example(where="data", name="export")
def test_an_unknown_key_anywhere_is_named(tmp_path, data_dir, capsys, where, name):
    raw = base(data_dir)
    target = {"top": raw, "data": raw["data"], "bench": raw["bench"], "step": raw["steps"][0]}[where]
    if name in target:
        name += "_unknown"
    target[name] = 1
    refused(tmp_path, yaml.safe_dump(raw, allow_unicode=True), capsys)


@FUZZ
@given(field=st.sampled_from([("bench", "runs"), ("bench", "rounds"), ("bench", "threads"), ("bench", "seq_len"),
                              ("steps", "epochs"), ("steps", "lr"), ("steps", "batch_size")]),
       value=st.one_of(st.integers(max_value=0), st.floats(min_value=1e6, allow_infinity=True), st.just(-1.5)))
def test_an_out_of_range_value_is_named(tmp_path, data_dir, capsys, field, value):
    raw = base(data_dir)
    section, name = field
    (raw["bench"] if section == "bench" else raw["steps"][0])[name] = value
    refused(tmp_path, yaml.safe_dump(raw), capsys)


@FUZZ
@given(chain=st.lists(st.sampled_from(["finetune", "export", "ptq", "ort-fuse", "qat", "prune"]), min_size=2,
                      max_size=6).filter(lambda kinds: kinds.index("export") < len(kinds) - 1 if "export" in kinds
                                         else False))
def test_a_step_after_one_it_cannot_follow_is_refused(tmp_path, data_dir, capsys, chain):
    raw = base(data_dir)
    chain = [*chain[: chain.index("export") + 1], "finetune"]  # a torch step after the export: never allowed
    raw["steps"] = [{"kind": kind} for kind in chain]
    assert "steps[" in refused(tmp_path, yaml.safe_dump(raw), capsys)


@FUZZ
@given(size=st.sampled_from([0, 5000]), field=st.sampled_from(["labels", "runtimes", "seq_len"]))
def test_huge_and_empty_lists(tmp_path, data_dir, capsys, size, field):
    raw = base(data_dir)
    values = [f"v{i}" for i in range(size)]
    if field == "labels":
        raw["data"]["labels"] = values
    elif field == "runtimes":
        raw["bench"]["runtimes"] = values
    else:
        raw["bench"]["seq_len"] = list(range(size))
    refused(tmp_path, yaml.safe_dump(raw), capsys)


YAML_TRICKS = [
    "model: a\nmodel: b\n",  # a duplicate key: which one is meant?
    "steps:\n  - kind: export\n    opset: 17\n    opset: 18\n",
    "!!python/object/apply:os.system ['true']\n",
    "model: !!python/name:os.system\n",
    "base: &b {kind: export}\nsteps: [*b, {<<: *b, bogus: 1}]\n",
    "1: model\n",
    "? [a, b]\n: c\n",
    "steps: [{kind: export, opset: !!binary aGVsbG8=}]\n",
    "{{{\n",
    "- a list\n- not a mapping\n",
    "",
    "\ufeffmodel: minilm-l6\ntask: sequence-classification\n",
    "model: минилм\ntask: 分類\n",
    "model: " + "a" * 100_000 + "\n",
]


@pytest.mark.parametrize("text", YAML_TRICKS, ids=range(len(YAML_TRICKS)))
def test_yaml_tricks_are_refused_in_one_line(tmp_path, capsys, text):
    refused(tmp_path, text, capsys)

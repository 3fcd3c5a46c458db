from pathlib import Path

import pytest

from compress.errors import RecipeError
from compress.recipe import PTQStep
from compress.recipe_loader import load_recipe

BASE = """
model: minilm-l6
task: sequence-classification
data:
  train: {path: train.tsv, text: sentence}
steps:
  - kind: finetune
  - kind: export
  - kind: ptq
"""


def write(tmp_path: Path, text: str = BASE) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def error(path: Path, *overrides: str) -> str:
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, list(overrides))
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_paths_are_relative_to_the_recipe_file(tmp_path):
    recipe = load_recipe(write(tmp_path))
    assert recipe.data.train.path == str(tmp_path / "train.tsv")
    assert recipe.model == "minilm-l6"
    assert isinstance(recipe.steps[2], PTQStep)


def test_local_model_path_is_relative_to_the_recipe_file(tmp_path):
    recipe = load_recipe(write(tmp_path, BASE.replace("minilm-l6", "./models/mine")))
    assert recipe.model == str(tmp_path / "models" / "mine")


def test_misspelt_key_names_the_path_and_suggests(tmp_path):
    text = BASE.replace("- kind: finetune", "- kind: finetune\n    epochz: 2")
    assert error(write(tmp_path, text)).endswith("steps[0].epochz: unknown field; did you mean 'epochs'?")


def test_override_goes_through_the_same_validation(tmp_path):
    path = write(tmp_path)
    assert load_recipe(path, ["steps.0.epochs=3"]).steps[0].epochs == 3
    assert "steps[0].epochz: unknown field; did you mean 'epochs'?" in error(path, "steps.0.epochz=2")
    assert "steps[1].verify.atoll: unknown field; did you mean 'atol'?" in error(path, "steps.1.verify.atoll=1")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("steps.0.epochs=-1", "steps[0].epochs: Input should be greater than 0"),
        ("steps.0.lr=fast", "steps[0].lr: Input should be a valid number"),
        ("steps.2.mode=int3", "steps[2].mode: Input should be 'dynamic'"),
        ("task=translation", "task: Input should be 'sequence-classification' or 'causal-lm'"),
        ("steps.0.kind=finetun", "steps[0].kind: unknown step kind 'finetun'; did you mean 'finetune'?"),
        ("data.train.textt=x", "data.train.textt: unknown field; did you mean 'text'?"),
        ("steps.9.epochs=1", "steps.9 is not an index of a list of 3"),
        ("steps.0.epochs", "expected KEY=VALUE"),
        ("data.stride=999", "stride (999) must not exceed max_length (128)"),
    ],
)
def test_wrong_types_and_ranges_name_the_field(tmp_path, override, expected):
    assert expected in error(write(tmp_path), override)


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ("[{kind: export}, {kind: finetune}]",
         "steps[1] (finetune) would receive ONNX fp32 from 00-export: finetune works on a torch model"),
        ("[{kind: ptq}]", ("steps[0] (ptq) would receive torch fp32 from base: ptq quantizes an ONNX graph; "
                          "add an 'export' step before it")),
        ("[{kind: export}, {kind: export}]", ("steps[1] (export) would receive ONNX fp32 from 00-export: it is "
                                             "already an ONNX graph")),
        ("[{kind: export}, {kind: ptq}, {kind: ptq}]",
         "steps[2] (ptq) would receive ONNX int8 (integer ops) from 01-ptq: the graph is already int8"),
        ("[{kind: export}, {kind: ptq}, {kind: ort-fuse}]",
         "steps[2] (ort-fuse) would receive ONNX int8 (integer ops) from 01-ptq: fuse the float graph"),
        ("[{kind: export}, {kind: ort-fuse}, {kind: ort-fuse, from: '@00-export'}, {kind: ort-fuse}]",
         ("steps[3] (ort-fuse) would receive ONNX fp32 with ONNX Runtime contrib ops from 02-ort-fuse: the graph is "
         "already rewritten into ONNX Runtime ops")),
        ("[{kind: export, from: '@01-ptq'}]", "steps[0] (export).from: '@01-ptq' names no earlier stage (earlier: base)"),
        ("[{kind: export, from: 'base'}]", "steps[0].from: String should match pattern"),
        ("[{epochs: 1}]", "steps[0]: every step needs a 'kind'"),
        ("[{kind: export, optimize: true}]", "steps[0].optimize: ONNX Runtime fusions are now a step of their own"),
        ("[{kind: export}, {kind: ptq, keep_fp32: ['']}]", "steps[1].keep_fp32[0]: String should have at least 1"),
        ("[{kind: qat, embedding_bits: 2}]", "steps[0].embedding_bits: 2 bits; a table takes 3 (levels fitted to it)"),
        ("[{kind: qat, embedding_bits: {word: 3, position: 5}}]", "steps[0].embedding_bits: position: 5 bits;"),
        ("[{kind: qat, embedding_bits: {}}]", "steps[0].embedding_bits: name at least one table"),
    ],
)
def test_impossible_step_orders_are_rejected(tmp_path, steps, expected):
    text = BASE.split("steps:")[0] + f"steps: {steps}\n"
    assert expected in error(write(tmp_path, text))


def test_unknown_field_suggestions_use_the_yaml_name(tmp_path):
    text = BASE.split("steps:")[0] + "steps: [{kind: export, form: '@base'}]\n"
    assert "steps[0].form: unknown field; did you mean 'from'?" in error(write(tmp_path, text))


def test_a_baseline_that_names_no_stage(tmp_path):
    assert "bench.baseline: '@02-distill' names no earlier stage" in error(write(tmp_path), "bench.baseline=@02-distill")


def test_training_step_without_training_data(tmp_path):
    text = BASE.replace("train: {path: train.tsv, text: sentence}", "eval: {path: dev.tsv}")
    assert "steps[0] (finetune) needs data.train" in error(write(tmp_path, text))


def test_not_a_mapping_and_not_yaml(tmp_path):
    assert "a recipe is a YAML mapping" in error(write(tmp_path, "- just\n- a list\n"))
    assert "not valid YAML" in error(write(tmp_path, "model: [unclosed\n"))
    assert "recipe file not found" in error(tmp_path / "absent.yaml")


def test_hub_ids_with_dots_stay_hub_ids(tmp_path):
    assert load_recipe(write(tmp_path, BASE.replace("minilm-l6", "microsoft/phi-1.5"))).model == "microsoft/phi-1.5"
    (tmp_path / "mine").mkdir()
    assert load_recipe(write(tmp_path, BASE.replace("minilm-l6", "mine"))).model == str(tmp_path / "mine")


def test_steps_that_train_on_labels_need_labelled_rows(tmp_path):
    unlabelled = BASE.replace("train: {path: train.tsv, text: sentence}", "train: {path: train.tsv, label: null}")
    assert "steps[0] (finetune) trains on labels, but data.train has none" in error(write(tmp_path, unlabelled))
    distill = unlabelled.split("steps:")[0] + "steps: [{kind: distill, alpha: 0.5}]\n"
    assert "steps[0] (distill) trains on labels" in error(write(tmp_path, distill))
    assert load_recipe(write(tmp_path, distill.replace("alpha: 0.5", "alpha: 1"))).steps[0].alpha == 1
    labelled_own = unlabelled.replace("kind: finetune", "kind: finetune\n    train_data: {path: more.tsv, text: sentence}")
    assert load_recipe(write(tmp_path, labelled_own)).steps[0].train_data.path == str(tmp_path / "more.tsv")
    prune = BASE.split("steps:")[0] + ("steps: [{kind: prune, heads: 0.5, recover: {alpha: 0.5, "
                                       "train_data: {path: more.txt, label: null}}}]\n")
    assert ("steps[0] (prune) trains on labels, but steps[0].recover.train_data has none (label: null)"
            in error(write(tmp_path, prune)))


@pytest.mark.parametrize(("step", "expected"), [
    ("{kind: distill, temperature: 0}", "steps[0].temperature: Input should be greater than 0"),
    ("{kind: distill, alpha: 1.5}", "steps[0].alpha: Input should be less than or equal to 1"),
    ("{kind: distill, student: {layers: [3, 1]}}", "steps[0].student: layers must be distinct block indices"),
    ("{kind: distill, student: {layers: [1], num_layers: 2}}", "steps[0].student: give one of 'layers'"),
    ("{kind: distill, layer_map: [[0, -1]]}", "steps[0].layer_map[0][1]: Input should be greater than or equal to 0"),
    ("{kind: export}, {kind: distill}", "steps[1] (distill) would receive ONNX fp32 from 00-export"),
])
def test_bad_distill_settings_name_the_field(tmp_path, step, expected):
    assert expected in error(write(tmp_path, BASE.split("steps:")[0] + f"steps: [{step}]\n"))

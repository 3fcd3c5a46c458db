import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from compress import pipeline
from compress.errors import DataError, OutDirError, RecipeError
from compress.eval.targets import TARGETS
from compress.pipeline import run_pipeline
from compress.recipe_loader import load_recipe
from compress.rundir import RunLock

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = {"kind": "finetune", "epochs": 1, "batch_size": 16, "lr": 1e-3}
LENIENT_PTQ = {"kind": "ptq", "verify": {"max_metric_drop": 1.0, "min_agreement": 0.0}}


@pytest.fixture
def recipe_file(tmp_path, tiny_bert_dir, sentiment_files):
    def write(steps: list[dict], bench: bool = False, model: Path = tiny_bert_dir, **data) -> Path:
        recipe = {
            "model": str(model),
            "task": "sequence-classification",
            "data": {"train": {"path": str(sentiment_files["train"]), "text": "sentence"},
                     "eval": {"path": str(sentiment_files["dev"]), "text": "sentence"}, "max_length": 32, **data},
            "steps": steps,
            "bench": {"enabled": bench, "runs": 12, "warmup": 1, "real_length_samples": 3, "seq_len": 16},
        }
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path

    return write


def statuses(outcome: dict) -> list[tuple[str, str]]:
    return [(stage["name"], stage["status"]) for stage in outcome["stages"]]


def test_edit_to_the_last_step_reuses_earlier_stages(tmp_path, recipe_file):
    out = tmp_path / "run"
    first = run_pipeline(load_recipe(recipe_file([FINETUNE, {"kind": "export"}])), out, quiet=True)
    assert statuses(first) == [("00-finetune", "computed"), ("01-export", "computed")]
    stamp = (out / "00-finetune" / "model.safetensors").stat().st_mtime_ns

    edited = recipe_file([FINETUNE, {"kind": "export", "opset": 18}])
    second = run_pipeline(load_recipe(edited), out, quiet=True)
    assert statuses(second) == [("00-finetune", "reused"), ("01-export", "computed")]
    assert (out / "00-finetune" / "model.safetensors").stat().st_mtime_ns == stamp
    third = run_pipeline(load_recipe(edited), out, quiet=True)
    assert [status for _, status in statuses(third)] == ["reused", "reused"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["machine"]["isa"] is not None
    assert manifest["baseline"] == "00-finetune"
    assert manifest["data"]["validation_split"]["rows"] == 20
    assert [stage["input"] for stage in manifest["stages"]] == ["base", "00-finetune"]
    assert yaml.safe_load((out / "recipe.resolved.yaml").read_text())["steps"][1]["opset"] == 18


def test_a_stage_whose_files_changed_is_recomputed(tmp_path, recipe_file):
    out, recipe = tmp_path / "run", load_recipe(recipe_file([{"kind": "export"}]))
    run_pipeline(recipe, out, quiet=True)
    with open(out / "00-export" / "model.onnx", "ab") as graph:
        graph.write(b"\0")  # bit rot, or a hand edit
    assert statuses(run_pipeline(recipe, out, quiet=True)) == [("base", "reused"), ("00-export", "computed")]
    assert statuses(run_pipeline(recipe, out, quiet=True)) == [("base", "reused"), ("00-export", "reused")]


def test_a_failed_run_says_so_and_leaves_no_finished_looking_stage(tmp_path, recipe_file, monkeypatch):
    out = tmp_path / "run"
    from compress.passes import finetune

    def crash(*args, **kwargs):
        raise RuntimeError("power cut")

    monkeypatch.setattr(finetune, "run", crash)
    with pytest.raises(RuntimeError):
        run_pipeline(load_recipe(recipe_file([FINETUNE])), out, quiet=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"] == "RuntimeError: power cut"
    assert not (out / "00-finetune").exists()
    monkeypatch.undo()
    resumed = run_pipeline(load_recipe(recipe_file([FINETUNE])), out, quiet=True)
    assert statuses(resumed) == [("00-finetune", "computed")]
    assert not [path for path in out.iterdir() if path.name.endswith((".partial", ".old"))]


def test_a_second_run_on_the_same_out_is_refused(tmp_path, recipe_file):
    out = tmp_path / "run"
    with RunLock(out), pytest.raises(OutDirError, match=rf"in use by another compress run \(pid {os.getpid()}\)"):
        run_pipeline(load_recipe(recipe_file([{"kind": "export"}])), out, quiet=True)


def test_out_that_is_not_a_run_is_refused_unless_overwrite(tmp_path, recipe_file):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    with pytest.raises(OutDirError, match="not empty and not a compress run"):
        run_pipeline(load_recipe(recipe_file([FINETUNE])), out, quiet=True)
    assert (out / "thesis.tex").read_text() == "keep me"
    run_pipeline(load_recipe(recipe_file([{"kind": "export"}])), out, overwrite=True, quiet=True)
    assert not (out / "thesis.tex").exists() and (out / "00-export" / "model.onnx").is_file()


def test_bad_data_fails_before_anything_is_written(tmp_path, recipe_file):
    out = tmp_path / "run"
    recipe = load_recipe(recipe_file([FINETUNE], eval={"path": str(tmp_path / "missing.tsv")}))
    with pytest.raises(DataError, match="data.eval.path: .*missing.tsv not found"):
        run_pipeline(recipe, out, quiet=True)
    assert not out.exists()


def test_lengths_beyond_the_models_positions_fail_before_any_stage(tmp_path, recipe_file):
    out = tmp_path / "run"
    with pytest.raises(RecipeError, match="data.max_length: 200 exceeds the model's 160 positions"):
        run_pipeline(load_recipe(recipe_file([{"kind": "export"}], max_length=200)), out, quiet=True)
    assert not list(out.glob("0*"))


def test_a_decoder_bench_must_fit_prompt_and_generated_tokens_in_the_positions():
    from types import SimpleNamespace

    from compress.pipeline import check_lengths
    from compress.recipe import Recipe

    recipe = Recipe.model_validate({"model": "m", "task": "causal-lm", "data": {"eval": {"path": "t.txt"}},
                                    "bench": {"seq_len": 128, "new_tokens": 40}})
    check_lengths(SimpleNamespace(max_position_embeddings=168), recipe)
    with pytest.raises(RecipeError, match=r"bench.new_tokens: a 128-token prompt and 40 new tokens \(168\) exceed "
                                          "the model's 160 positions"):
        check_lengths(SimpleNamespace(max_position_embeddings=160), recipe)


def test_branches_make_side_by_side_variants(tmp_path, recipe_file):
    steps = [{"kind": "export"}, LENIENT_PTQ, {"kind": "ort-fuse", "from": "@00-export"},
             {**LENIENT_PTQ, "from": "@ort-fuse"}, {**LENIENT_PTQ, "mode": "fp16", "name": "half", "from": "@00-export"}]
    out = tmp_path / "run"
    outcome = run_pipeline(load_recipe(recipe_file(steps, bench=True)), out, quiet=True)
    assert [(s["name"], s["input"]) for s in outcome["stages"]] == [
        ("base", None), ("00-export", "base"), ("01-ptq", "00-export"), ("02-ort-fuse", "00-export"),
        ("03-ptq", "02-ort-fuse"), ("04-half", "00-export")]
    assert "04-half: ONNX Runtime's x86 CPU provider has few fp16 kernels" in (out / "report.md").read_text()
    kinds = {s["name"]: s["kind"] for s in outcome["stages"]}
    assert kinds["01-ptq"]["runtime"] == "portable" and kinds["03-ptq"]["runtime"] == "onnxruntime"
    rows = {row["name"]: row for row in outcome["results"]["rows"]}
    # The base model is the baseline: uncompressed (its task head is fresh, so every row is at chance level).
    assert list(rows) == ["base", "00-export", "01-ptq", "02-ort-fuse", "03-ptq", "04-half"]
    assert "freshly initialised task head" in (out / "report.md").read_text()
    assert (rows["01-ptq"]["parent"], rows["03-ptq"]["parent"], rows["02-ort-fuse"]["parent"]) == (
        "00-export", "02-ort-fuse", "00-export")


def test_bench_runtimes_put_each_stage_on_each_runtime_side_by_side(tmp_path, recipe_file):
    steps = [{"kind": "export"}, {"kind": "ort-fuse"}, LENIENT_PTQ, {**LENIENT_PTQ, "name": "portable", "from": "@00-export"}]
    path = recipe_file(steps, bench=True)
    recipe = load_recipe(path, ["bench.runtimes=[torch, onnxruntime, openvino-bf16]"])
    out = tmp_path / "run"
    rows = {row["name"]: row for row in run_pipeline(recipe, out, quiet=True)["results"]["rows"]}
    assert list(rows) == ["base", "00-export", "00-export@openvino-bf16", "01-ort-fuse", "01-ort-fuse@openvino-bf16",
                          "02-ptq", "02-ptq@openvino-bf16", "03-portable", "03-portable@openvino-bf16"]
    report = (out / "report.md").read_text()
    assert "## Roofline" in report
    passes = run_pipeline(recipe, out, quiet=True)["results"]["passes"]
    assert [(entry["stage"], entry["pass"]) for entry in passes] == [
        ("00-export", "export"), ("01-ort-fuse", "ort-fuse"), ("02-ptq", "ptq"), ("03-portable", "ptq")]
    assert "- 00-export (export, " in report and "max_abs_diff=" in report.split("## What each pass did")[1]
    lacking = TARGETS["openvino-bf16"].unavailable()
    if lacking:  # an AVX2 machine: every bf16 row says why it did not run
        assert {row["not_run"] for name, row in rows.items() if "@" in name} == {lacking}
        return
    assert rows["02-ptq@openvino-bf16"]["not_run"].startswith("No conversion rule found for operations:")
    assert rows["03-portable@openvino-bf16"]["parent"] == "00-export@openvino-bf16"
    assert rows["03-portable@openvino-bf16"]["runtime"]["name"] == "openvino"
    assert ("00-export@openvino-bf16, 01-ort-fuse@openvino-bf16: the runtime was told to compute the float matrix "
            "products in bf16/fp16") in report


def test_the_baseline_is_exported_when_the_recipe_exports_something_else(tmp_path, recipe_file):
    steps = [FINETUNE, {**FINETUNE, "max_steps": 2}, {"kind": "export", "from": "@00-finetune"}]
    out = tmp_path / "run"
    outcome = run_pipeline(load_recipe(recipe_file(steps, bench=True)), out, quiet=True)
    assert [s["name"] for s in outcome["stages"]] == ["00-finetune", "01-finetune", "02-export", "baseline-export"]
    assert outcome["stages"][-1]["input"] == "01-finetune"
    results = outcome["results"]
    assert results["baseline"] == "01-finetune"
    names = [row["name"] for row in results["rows"]]
    assert names == ["00-finetune", "01-finetune", "baseline-export", "02-export"]
    assert {row["name"]: row["parent"] for row in results["rows"]}["02-export"] == "baseline-export"


def test_the_key_follows_the_pass_code_and_the_base_models_files(tmp_path, recipe_file, tiny_bert_dir, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    out, recipe = tmp_path / "run", load_recipe(recipe_file([{"kind": "export"}], model=model))
    run_pipeline(recipe, out, quiet=True)

    real = pipeline.code_fingerprint
    monkeypatch.setattr(pipeline, "code_fingerprint", lambda name: real(name) + ("edited" if "export" in name else ""))
    assert statuses(run_pipeline(recipe, out, quiet=True)) == [("base", "reused"), ("00-export", "computed")]
    monkeypatch.undo()
    assert statuses(run_pipeline(recipe, out, quiet=True)) == [("base", "reused"), ("00-export", "computed")]

    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.3}))
    assert statuses(run_pipeline(recipe, out, quiet=True)) == [("base", "computed"), ("00-export", "computed")]
    tokenizer = (model / "tokenizer.json").read_text()
    (model / "tokenizer.json").write_text(tokenizer.replace('"hate":', '"loathe":'))
    assert statuses(run_pipeline(recipe, out, quiet=True)) == [("base", "computed"), ("00-export", "computed")]


def test_a_run_killed_mid_stage_resumes_cleanly(tmp_path, recipe_file):
    slow = {**FINETUNE, "epochs": 40, "batch_size": 2}
    out, recipe = tmp_path / "run", recipe_file([slow, {"kind": "export"}])
    command = [sys.executable, "-m", "compress.cli", "-q", "run", str(recipe), "--out", str(out)]
    victim = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / ".00-finetune.partial").exists() and time.monotonic() < deadline and victim.poll() is None:
        time.sleep(0.05)
    assert victim.poll() is None, "the run ended before it could be killed"
    time.sleep(0.5)  # well inside the training stage
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (out / "00-finetune").exists()
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"  # it had no chance to say more

    finished = subprocess.run([*command, "--set", "steps.0.epochs=1"], cwd=ROOT, capture_output=True, text=True,
                              check=False)
    assert finished.returncode == 0, finished.stderr
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    assert sorted(path.name for path in out.iterdir() if path.is_dir()) == ["00-finetune", "01-export"]


def test_a_referenced_models_content_is_in_the_key(tmp_path, recipe_file, tiny_bert_dir, monkeypatch):
    from compress.recipe import ExportStep

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_bert_dir, teacher)
    # No shipped step names a model yet (distillation will): give export one, as such a step would.
    monkeypatch.setattr(ExportStep, "model_refs", lambda self: {"teacher": str(teacher)})
    out, recipe = tmp_path / "run", load_recipe(recipe_file([{**FINETUNE, "max_steps": 2}, {"kind": "export"}]))
    run_pipeline(recipe, out, quiet=True)
    assert statuses(run_pipeline(recipe, out, quiet=True)) == [("00-finetune", "reused"), ("01-export", "reused")]
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "attention_probs_dropout_prob": 0.2}))
    assert statuses(run_pipeline(recipe, out, quiet=True)) == [("00-finetune", "reused"), ("01-export", "computed")]


def test_the_sparsity_record_comes_from_the_stage_own_pruning_record(tmp_path, tiny_classifier):
    from compress.artifact import Artifact

    model, tokenizer = tiny_classifier
    base = Artifact("sequence-classification", model.config, tokenizer, model)
    assert pipeline._sparsity_record(base.save(tmp_path / "base")) is None  # a base model has no history
    effect = {"target_sparsity": 0.5, "achieved_sparsity": 0.5, "layers": {"a": {"sparsity": 0.5}}}
    pruned = base.evolve({"kind": "prune", "config": {}, "effect": effect})
    assert pipeline._sparsity_record(pruned.save(tmp_path / "pruned")) == {"achieved": 0.5, "target": 0.5,
                                                                           "layers": {"a": 0.5}}
    exported = pruned.evolve({"kind": "export", "config": {}, "effect": {}})
    assert pipeline._sparsity_record(exported.save(tmp_path / "exported")) is None  # shown once, at the prune


def test_a_step_trains_on_its_own_rows_whose_bytes_are_in_its_key_alone(tmp_path, recipe_file, sentiment_files):
    own = tmp_path / "own.tsv"
    own.write_text("\n".join(sentiment_files["train"].read_text().splitlines()[:49]) + "\n")  # header + 48 rows
    steps = [FINETUNE, {**FINETUNE, "train_data": {"path": str(own), "text": "sentence"}}]
    out, recipe = tmp_path / "run", load_recipe(recipe_file(steps))
    assert [status for _, status in statuses(run_pipeline(recipe, out, quiet=True))] == ["computed", "computed"]
    own_rows = json.loads((out / "manifest.json").read_text())["data"]["train_data"]["steps[1].train_data"]
    trained = [json.loads((out / name / "compress.json").read_text())["history"][-1]["effect"]["samples"]
               for name in ("00-finetune", "01-finetune")]
    assert trained == [180, own_rows["rows"]] and own_rows["rows"] + own_rows["left_out_as_held_out"] == 48
    own.write_text(own.read_text().replace("\tpositive", "\tnegative", 1))
    assert statuses(run_pipeline(recipe, out, quiet=True)) == [("00-finetune", "reused"), ("01-finetune", "computed")]


def test_settings_newer_than_cached_stages_leave_their_keys_alone_while_unset():
    settings = {"lr": 0.1, "checkpoint_every": 5, "train_data": None, "recover": {"train_data": None, "epochs": 1}}
    assert pipeline._what_computes(settings) == {"lr": 0.1, "checkpoint_every": None, "recover": {"epochs": 1}}

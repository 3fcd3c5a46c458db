import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml

from compress.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def recipe(tmp_path, tiny_bert_dir, sentiment_files):
    def write(**changes) -> str:
        raw = {
            "model": str(tiny_bert_dir),
            "task": "sequence-classification",
            "data": {"train": {"path": str(sentiment_files["train"]), "text": "sentence"},
                     "eval": {"path": str(sentiment_files["dev"]), "text": "sentence"}, "max_length": 32},
            "steps": [{"kind": "finetune", "batch_size": 16, "lr": 1e-3}, {"kind": "export"}],
            "bench": {"runs": 10, "warmup": 1, "real_length_samples": 5},
        } | changes
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(raw))
        return str(path)

    return write


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_version(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0 and "compress 0.1.0" in capsys.readouterr().out


def test_validate_ok_and_misspelt_key(recipe, capsys):
    assert main(["validate", recipe()]) == 0
    shown = capsys.readouterr().out
    assert "ok (sequence-classification, 180 train / 20 validation / 40 eval rows, labels: negative, positive" in shown
    assert re.search(r"  00-finetune +torch fp32 <- base  \(baseline\)\n  01-export +ONNX fp32 <- 00-finetune\n", shown)
    assert main(["validate", recipe(), "--set", "steps.0.epochz=2"]) == 2
    assert "steps[0].epochz: unknown field; did you mean 'epochs'?" in one_error_line(capsys)


@pytest.mark.parametrize("name", ["quickstart.yaml", "llm-quickstart.yaml"])
def test_shipped_recipes_validate(name, capsys):
    assert main(["validate", str(ROOT / "pipelines" / name)]) == 0


def test_quickstart_validates_against_the_full_shared_dev_set(shared_data, capsys):
    dev = shared_data / "sst2" / "dev.tsv"
    assert main(["validate", str(ROOT / "pipelines" / "quickstart.yaml"), "--set", f"data.eval.path={dev}"]) == 0
    assert "/ 872 eval rows" in capsys.readouterr().out


def test_the_stack_recipe_validates_with_its_transfer_rows_from_shared_data(shared_data, capsys):
    assert main(["validate", str(ROOT / "pipelines" / "stack.yaml")]) == 0
    shown = capsys.readouterr().out
    assert re.search(r"  steps\[2\]\.recover\.train_data: [\d,]+ rows \([\d,]+ left out: in validation or eval\)", shown)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"model": "/no/such/model"}, "model: /no/such/model does not exist"),
        ({"model": "someone/not-cached-anywhere"}, "looks like a hub id, but the hub cannot be reached"),
        ({"steps": [{"kind": "export"}, {"kind": "finetune"}]},
         "steps[1] (finetune) would receive ONNX fp32 from 00-export: finetune works on a torch model"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, recipe, capsys, monkeypatch, changes, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    assert main(["run", recipe(**changes), "--out", str(out)]) == 2
    assert expected in one_error_line(capsys)
    assert not out.exists()


def test_model_dir_without_config_exits_2(tmp_path, recipe, capsys):
    (tmp_path / "empty-model").mkdir()
    assert main(["validate", recipe(model=str(tmp_path / "empty-model"))]) == 2
    assert "is not a Hugging Face model directory (no config.json)" in one_error_line(capsys)


def test_out_that_is_not_a_run_exits_2_then_overwrite_clears_it(tmp_path, recipe, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("mine")
    steps = [{"kind": "finetune", "max_steps": 2, "batch_size": 16}]
    assert main(["run", recipe(steps=steps, bench={"enabled": False}), "--out", str(out)]) == 2
    assert "not empty and not a compress run; pick another or pass --overwrite" in one_error_line(capsys)
    assert (out / "todo.txt").read_text() == "mine"
    assert main(["-q", "run", recipe(steps=steps, bench={"enabled": False}), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "todo.txt").exists() and (out / "00-finetune" / "compress.json").is_file()


def test_real_process_exit_code_for_bad_input(tmp_path, recipe):
    done = subprocess.run([sys.executable, "-m", "compress.cli", "validate", recipe(), "--set", "task=poetry"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "task: Input should be" in done.stderr


def test_run_inspect_and_bench(tmp_path, recipe, capsys, sentiment_files):
    out = tmp_path / "run"
    assert main(["-q", "run", recipe(bench={"enabled": False}), "--out", str(out)]) == 0
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "01-export  [sequence-classification, ONNX fp32]" in shown
    assert "model.onnx" in shown and "max_abs_diff=" in shown
    assert "  loads on: onnxruntime, openvino\n" in shown
    bench_out = tmp_path / "bench"
    assert main(["-q", "bench", str(out / "01-export"), "--data", str(sentiment_files["dev"]), "--text", "sentence",
                 "--runs", "10", "--out", str(bench_out)]) == 0
    results = json.loads((bench_out / "results.json").read_text())
    assert [row["name"] for row in results["rows"]] == ["01-export"]
    assert 0.0 <= results["rows"][0]["metric"]["value"] <= 1.0
    assert main(["-q", "bench", str(out), "--data", str(sentiment_files["dev"]), "--text", "sentence",
                 "--runs", "10", "--out", str(tmp_path / "bench-run")]) == 0
    results = json.loads((tmp_path / "bench-run" / "results.json").read_text())
    assert results["baseline"] == "00-finetune"
    assert [(row["name"], row["format"]) for row in results["rows"]] == [("00-finetune", "torch"), ("01-export", "onnx")]
    assert main(["-q", "bench", str(out / "01-export"), "--data", str(sentiment_files["dev"]), "--text", "sentence",
                 "--runs", "10", "--runtime", "openvino", "--out", str(tmp_path / "bench-ov")]) == 0
    results = json.loads((tmp_path / "bench-ov" / "results.json").read_text())
    assert [(row["name"], row["runtime"]["name"]) for row in results["rows"]] == [("01-export", "openvino")]


def test_gate_passes_an_equal_run_and_fails_a_worse_one_with_exit_4(tmp_path, recipe, capsys, sentiment_files):
    out = tmp_path / "run"
    assert main(["-q", "run", recipe(bench={"enabled": False}), "--out", str(out)]) == 0
    bench = ["-q", "bench", str(out / "01-export"), "--data", str(sentiment_files["dev"]), "--text", "sentence",
             "--runs", "10"]
    assert main([*bench, "--out", str(tmp_path / "a")]) == 0
    assert main([*bench, "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    gate = ["gate", "--baseline", str(tmp_path / "a" / "results.json"), "--max-slowdown", "3"]
    assert main([*gate, "--candidate", str(tmp_path / "b" / "results.json")]) == 0
    assert "gate passed: 2 checks within the limits" in capsys.readouterr().out
    worse = json.loads((tmp_path / "b" / "results.json").read_text())
    row = worse["rows"][0]
    row["metric_rows"]["correct"] = [0] * len(row["metric_rows"]["correct"])  # every answer wrong
    row["metric"]["value"] = 0.0
    (tmp_path / "worse.json").write_text(json.dumps(worse))
    assert main([*gate, "--candidate", str(tmp_path / "worse.json")]) == 4
    err = capsys.readouterr().err
    assert "FAIL 01-export accuracy" in err and "gate failed: 1 of 2 checks" in err
    assert main([*gate, "--candidate", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: cannot read" in one_error_line(capsys)


def test_diff_names_the_first_module_a_graph_gets_wrong(tmp_path, recipe, capsys):
    from onnx import numpy_helper

    out = tmp_path / "run"
    assert main(["-q", "run", recipe(bench={"enabled": False}), "--out", str(out)]) == 0
    assert main(["diff", str(out / "00-finetune"), str(out / "01-export")]) == 0
    assert "no divergence: every module compared is within atol 0.0001" in capsys.readouterr().out
    broken = tmp_path / "broken"
    shutil.copytree(out / "01-export", broken)
    proto = onnx.load(str(broken / "model.onnx"))
    node = next(n for n in proto.graph.node if n.name == "/bert/encoder/layer.1/output/dense/MatMul")
    weight = next(i for i in proto.graph.initializer if i.name == node.input[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.5, weight.name))
    onnx.save(proto, str(broken / "model.onnx"))
    assert main(["diff", str(out / "00-finetune"), str(broken)]) == 3
    assert "first divergence at module bert.encoder.layer.1.output.dense (ONNX node " in one_error_line(capsys)
    assert main(["diff", str(out / "01-export"), str(broken)]) == 3  # graph against graph: value by value
    assert "relative error" in one_error_line(capsys)
    assert main(["diff", str(broken), str(out / "00-finetune")]) == 2
    assert "the candidate is an ONNX graph" in one_error_line(capsys)


def test_inspect_names_the_runtimes_that_cannot_load_a_graph(bert_int8_fused_artifact, capsys):
    assert main(["inspect", str(bert_int8_fused_artifact)]) == 0
    assert ("  loads on: onnxruntime; not on: openvino (No conversion rule found for operations: "
            "com.microsoft.QAttention, com.microsoft.QEmbedLayerNormalization)") in capsys.readouterr().out


def test_a_runtime_not_installed_is_refused_with_the_pip_command(tmp_path, recipe, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else find_spec(name, *a))
    assert main(["validate", recipe(bench={"runtimes": ["onnxruntime", "openvino"]})]) == 2
    assert ("bench.runtimes: openvino needs the openvino package, which is not installed: pip install "
            "openvino==2026.4.1") in capsys.readouterr().err


def test_altered_graph_fails_export_with_exit_3_and_leaves_nothing(tmp_path, tiny_bert_dir, capsys, monkeypatch):
    import compress.passes.export as export_pass

    real_export = export_pass.export_onnx

    def export_then_damage(model, task, path, opset, kv_cache):
        exported = real_export(model, task, path, opset, kv_cache=kv_cache)
        graph = onnx.load(exported)
        weight = next(t for t in graph.graph.initializer if len(t.dims) == 2 and t.dims[0] == 32)
        values = onnx.numpy_helper.to_array(weight) * np.float32(1.5)
        weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
        onnx.save(graph, exported)
        return exported

    monkeypatch.setattr(export_pass, "export_onnx", export_then_damage)
    out = tmp_path / "exported"
    assert main(["-q", "export", str(tiny_bert_dir), "--task", "sequence-classification", "--out", str(out)]) == 3
    line = one_error_line(capsys)
    assert "values differ beyond tolerance" in line
    damaged = re.search(r"first divergence at module (\S+) \(ONNX node (\S+)\)", line)
    assert damaged is not None and damaged.group(2).startswith("/" + damaged.group(1).replace(".", "/") + "/")
    assert not out.exists() and not list(tmp_path.glob(".exported*"))


@pytest.mark.slow
def test_export_real_minilm_loads_with_optimum(tmp_path, capsys):
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer

    out = tmp_path / "minilm-onnx"
    assert main(["-q", "export", "minilm-l6", "--task", "sequence-classification", "--out", str(out)]) == 0
    manifest = json.loads((out / "compress.json").read_text())
    assert manifest["kind"]["format"] == "onnx" and manifest["history"][0]["effect"]["max_abs_diff"] < 1e-4
    model = ORTModelForSequenceClassification.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    logits = model(**tokenizer(["a fine film"], return_tensors="pt")).logits
    assert tuple(logits.shape) == (1, 2)


@pytest.mark.parametrize(("command", "expected"), [
    (["bench", "{art}", "--data", "{dev}", "--runs", "5"], "--runs: Input should be greater than or equal to 10 (got 5)"),
    (["bench", "{art}", "--data", "{dev}", "--max-length", "0"], "--max-length: Input should be greater than 0 (got 0)"),
    (["bench", "{art}", "--data", "{dev}", "--rounds", "1"], "--rounds: Input should be greater than or equal to 3"),
    (["export", "{model}", "--task", "sequence-classification", "--opset", "13", "--out", "{out}"],
     "--opset: Input should be greater than or equal to 14 (got 13)"),
])
def test_bad_flag_values_exit_2_naming_the_flag(tmp_path, tiny_bert_dir, sentiment_files, capsys, command, expected):
    from compress import models

    artifact = models.load(str(tiny_bert_dir), "sequence-classification", ["negative", "positive"]).artifact()
    art = artifact.save(tmp_path / "artifact")
    values = {"art": str(art), "dev": str(sentiment_files["dev"]), "model": str(tiny_bert_dir),
              "out": str(tmp_path / "out")}
    assert main([part.format(**values) for part in command]) == 2
    assert expected in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_export_with_fuse_writes_an_onnxruntime_graph(tmp_path, tiny_bert_dir, capsys):
    out = tmp_path / "fused"
    assert main(["-q", "export", str(tiny_bert_dir), "--task", "sequence-classification", "--fuse",
                 "--out", str(out)]) == 0
    manifest = json.loads((out / "compress.json").read_text())
    assert manifest["kind"]["runtime"] == "onnxruntime"
    assert [entry["kind"] for entry in manifest["history"]] == ["export", "ort-fuse"]

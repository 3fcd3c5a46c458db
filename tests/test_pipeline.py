import json

import pytest
import yaml

from compress.errors import DataError, OutDirError
from compress.pipeline import run_pipeline
from compress.recipe_loader import load_recipe


@pytest.fixture
def recipe_file(tmp_path, tiny_bert_dir, sentiment_files):
    def write(steps: list[dict], bench: bool = False, **data) -> str:
        recipe = {
            "model": str(tiny_bert_dir),
            "task": "sequence-classification",
            "data": {"train": {"path": str(sentiment_files["train"]), "text": "sentence"},
                     "eval": {"path": str(sentiment_files["dev"]), "text": "sentence"}, "max_length": 32, **data},
            "steps": steps,
            "bench": {"enabled": bench, "runs": 10, "warmup": 1, "real_length_samples": 5},
        }
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path

    return write


FINETUNE = {"kind": "finetune", "epochs": 1, "batch_size": 16, "lr": 1e-3}


def test_edit_to_the_last_step_reuses_earlier_stages(tmp_path, recipe_file):
    out = tmp_path / "run"
    first = run_pipeline(load_recipe(recipe_file([FINETUNE, {"kind": "export"}])), out, quiet=True)
    assert [s["status"] for s in first["stages"]] == ["computed", "computed"]
    stamp = (out / "00-finetune" / "model.safetensors").stat().st_mtime_ns

    edited = recipe_file([FINETUNE, {"kind": "export", "optimize": False}])
    second = run_pipeline(load_recipe(edited), out, quiet=True)
    assert [s["status"] for s in second["stages"]] == ["reused", "computed"]
    assert (out / "00-finetune" / "model.safetensors").stat().st_mtime_ns == stamp
    third = run_pipeline(load_recipe(edited), out, quiet=True)
    assert [s["status"] for s in third["stages"]] == ["reused", "reused"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["machine"]["isa"] is not None
    assert (out / "recipe.resolved.yaml").is_file()


def test_a_finished_stage_is_never_left_half_written(tmp_path, recipe_file, monkeypatch):
    out = tmp_path / "run"
    from compress.passes import finetune

    def crash(*args, **kwargs):
        raise RuntimeError("power cut")

    monkeypatch.setattr(finetune, "run", crash)
    with pytest.raises(RuntimeError):
        run_pipeline(load_recipe(recipe_file([FINETUNE])), out, quiet=True)
    assert not (out / "00-finetune").exists()
    monkeypatch.undo()
    resumed = run_pipeline(load_recipe(recipe_file([FINETUNE])), out, quiet=True)
    assert resumed["stages"][0]["status"] == "computed"
    assert not list(out.glob(".*.partial"))


def test_out_that_is_not_a_run_is_refused_unless_overwrite(tmp_path, recipe_file):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    with pytest.raises(OutDirError, match="not empty and not a compress run"):
        run_pipeline(load_recipe(recipe_file([FINETUNE])), out, quiet=True)
    assert (out / "thesis.tex").read_text() == "keep me"


def test_bad_data_fails_before_anything_is_written(tmp_path, recipe_file):
    out = tmp_path / "run"
    recipe = load_recipe(recipe_file([FINETUNE], eval={"path": str(tmp_path / "missing.tsv")}))
    with pytest.raises(DataError, match="data.eval.path: .*missing.tsv not found"):
        run_pipeline(recipe, out, quiet=True)
    assert not out.exists()


def test_full_run_writes_results_with_the_contract_fields(tmp_path, recipe_file):
    out = tmp_path / "run"
    outcome = run_pipeline(load_recipe(recipe_file([FINETUNE, {"kind": "export"},
                                                    {"kind": "ptq", "verify": {"max_metric_drop": 1.0,
                                                                               "min_agreement": 0.0}}],
                                                   bench=True)), out, quiet=True)
    results = json.loads((out / "results.json").read_text())
    assert results["baseline"] == "00-finetune"
    assert [(r["name"], r["format"], r["precision"]) for r in results["rows"]] == [
        ("00-finetune", "torch", "fp32"), ("01-export", "onnx", "fp32"), ("02-ptq", "onnx", "int8")]
    for row in results["rows"]:
        assert {"name", "format", "precision", "metric", "latency_ms", "batch_size", "seq_len", "threads",
                "size_bytes", "peak_rss_mb"} <= set(row)
        assert 0.0 <= row["metric"]["value"] <= 1.0 and row["latency_ms"]["p50"] <= row["latency_ms"]["p90"]
    assert results["rows"][0]["metric"]["value"] == outcome["results"]["rows"][0]["metric"]["value"]
    assert "| 02-ptq" in (out / "report.md").read_text()


def test_causal_lm_run_benchmarks_the_base_model_and_both_graphs(tmp_path, tiny_llama_dir, text_file):
    recipe = tmp_path / "llm.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(tiny_llama_dir), "task": "causal-lm",
        "data": {"eval": {"path": str(text_file)}, "max_length": 32, "max_eval_tokens": 256},
        "steps": [{"kind": "export"},
                  {"kind": "ptq", "reduce_range": True, "verify": {"max_metric_drop": 1.0, "min_agreement": 0.0}}],
        "bench": {"runs": 10, "warmup": 1, "seq_len": 16, "real_length_samples": 0},
    }))
    out = tmp_path / "run"
    run_pipeline(load_recipe(recipe), out, quiet=True)
    results = json.loads((out / "results.json").read_text())
    assert results["baseline"] == "base"
    assert [(r["name"], r["precision"]) for r in results["rows"]] == [
        ("base", "fp32"), ("00-export", "fp32"), ("01-ptq", "int8")]
    base, exported, _ = (r["metric"] for r in results["rows"])
    assert base["name"] == "perplexity" and 1.0 < base["value"] and abs(exported["value"] - base["value"]) < 1e-3
    assert results["data"]["tokens"] == 256 and results["rows"][0]["seq_len"] == 16

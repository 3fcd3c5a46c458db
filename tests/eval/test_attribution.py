from compress.eval.attribution import attribution_section, chain


def _row(name: str, target: str, ms: float, accuracy: float, mib: float) -> dict:
    return {"name": name if target in ("torch", "onnxruntime") else f"{name}@{target}", "target": target,
            "latency_ms": {"p50": ms}, "metric": {"name": "accuracy", "value": accuracy},
            "size_bytes": int(mib * 2**20)}


PASSES = [{"stage": "00-finetune", "input": None, "pass": "finetune"},
          {"stage": "01-distill", "input": "00-finetune", "pass": "distill"},
          {"stage": "02-prune", "input": "01-distill", "pass": "prune"},
          {"stage": "03-qat", "input": "02-prune", "pass": "qat"},
          {"stage": "04-export", "input": "03-qat", "pass": "export"},
          {"stage": "05-distill-onnx", "input": "01-distill", "pass": "export"},
          {"stage": "06-prune-onnx", "input": "02-prune", "pass": "export"},
          {"stage": "baseline-export", "input": "00-finetune", "pass": "export"}]
ROWS = [_row("00-finetune", "torch", 20.0, 0.86, 88), _row("01-distill", "torch", 10.0, 0.85, 67),
        _row("02-prune", "torch", 8.0, 0.84, 57), _row("03-qat", "torch", 25.0, 0.84, 57),
        _row("baseline-export", "openvino", 5.0, 0.86, 88), _row("05-distill-onnx", "openvino", 2.5, 0.85, 67),
        _row("06-prune-onnx", "openvino", 2.0, 0.84, 57), _row("04-export", "openvino", 1.6, 0.84, 10)]


def test_the_chain_follows_inputs_from_the_first_stage_to_the_last_step():
    assert [record["stage"] for record in chain(PASSES)] == ["00-finetune", "01-distill", "02-prune", "03-qat",
                                                              "04-export"]


def test_each_technique_is_a_row_on_each_runtime_by_its_deployed_form():
    lines = attribution_section({"baseline": "00-finetune", "rows": ROWS, "passes": PASSES})
    text = "\n".join(lines)
    openvino = text.split("On **openvino**:")[1].strip().splitlines()[2:]
    assert [line.split(" | ")[:2] for line in openvino] == [
        ["| 00-finetune", "finetune (as baseline-export)"], ["| 01-distill", "distill (as 05-distill-onnx)"],
        ["| 02-prune", "prune (as 06-prune-onnx)"], ["| 04-export", "qat, exported"]]
    last = openvino[-1].split(" | ")
    assert last[2:5] == ["1.60", "12.50x", "1.25x"] and last[6:8] == ["-2.00 pt", "+0.00 pt"] and last[-1] == "8.8x |"
    torch = text.split("On **torch**:")[1].split("On **")[0]
    assert "| 03-qat | qat | 25.00 | 0.80x | 0.32x |" in torch


def test_a_recipe_without_a_chain_gets_no_section():
    passes = [{"stage": "00-export", "input": "base", "pass": "export"}]
    assert attribution_section({"baseline": "base", "rows": ROWS[:1], "passes": passes}) == []


def test_a_chain_starting_from_the_baseline_shows_it_first():
    passes = [{"stage": "00-prune", "input": "base", "pass": "prune"},
              {"stage": "01-int4", "input": "00-prune", "pass": "quantize"},
              {"stage": "02-int4-onnx", "input": "01-int4", "pass": "export"},
              {"stage": "03-prune-onnx", "input": "00-prune", "pass": "export"},
              {"stage": "baseline-export", "input": "base", "pass": "export"}]
    rows = [_row("base", "torch", 40.0, 0.5, 500), _row("00-prune", "torch", 30.0, 0.45, 400),
            _row("baseline-export", "onnxruntime", 30.0, 0.5, 500),
            _row("03-prune-onnx", "onnxruntime", 20.0, 0.45, 400), _row("02-int4-onnx", "onnxruntime", 10.0, 0.4, 150)]
    text = "\n".join(attribution_section({"baseline": "base", "rows": rows, "passes": passes}))
    ort = text.split("On **onnxruntime**:")[1].strip().splitlines()[2:]
    assert [line.split(" | ")[:2] for line in ort] == [
        ["| base", "baseline (as baseline-export)"], ["| 00-prune", "prune (as 03-prune-onnx)"],
        ["| 02-int4-onnx", "quantize, exported"]]
    torch = text.split("On **torch**:")[1].split("On **")[0].strip().splitlines()[2:]
    assert [line.split(" | ")[:2] for line in torch] == [["| base", "baseline"], ["| 00-prune", "prune"]]

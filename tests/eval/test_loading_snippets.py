"""The README's loading snippets, run as written against tiny artifacts: a user who copies them gets logits."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
SNIPPET = re.compile(r"<!-- tested: (\S+) -->\n```python\n(.*?)```", re.DOTALL)
STAGES = {"runs/quickstart/04-int8-portable": "onnx", "runs/quickstart/00-finetune": "torch"}


def snippets() -> dict[str, str]:
    return dict(SNIPPET.findall(README.read_text()))


def test_every_runtime_has_a_tested_snippet():
    assert set(snippets()) == {"onnxruntime", "openvino", "torch"}


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino", "torch"])
def test_a_loading_snippet_runs_as_written_and_agrees_with_the_others(runtime, bert_onnx_artifact,
                                                                     bert_torch_artifact, tmp_path):
    artifacts = {"onnx": bert_onnx_artifact, "torch": bert_torch_artifact}
    code = snippets()[runtime]
    for stage, kind in STAGES.items():
        code = code.replace(f'"{stage}"', repr(str(artifacts[kind])))
    assert "runs/quickstart" not in code
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # The tiny classifier's prediction for the snippet's sentence, as its torch and ONNX forms both give it.
    assert done.stdout.strip().splitlines()[-1] == expected_prediction(bert_torch_artifact)


def expected_prediction(torch_artifact: Path) -> str:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(torch_artifact)
    model = AutoModelForSequenceClassification.from_pretrained(torch_artifact).eval()
    with torch.inference_mode():
        logits = model(**tokenizer(["a gripping, funny film"], return_tensors="pt")).logits
    return str(logits.argmax(-1).numpy())

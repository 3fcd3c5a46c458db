from pathlib import Path

import pytest
import yaml


@pytest.fixture(scope="session")
def tiny_recipe(tiny_bert_dir, sentiment_files):
    """Writes DIRECTORY/recipe.yaml: the tiny BERT on the sentiment files with `steps`, no bench unless given."""
    def write(directory: Path, steps: list[dict], bench: dict | None = None) -> Path:
        path = Path(directory) / "recipe.yaml"
        path.write_text(yaml.safe_dump({
            "model": str(tiny_bert_dir), "task": "sequence-classification",
            "data": {"train": {"path": str(sentiment_files["train"]), "text": "sentence"},
                     "eval": {"path": str(sentiment_files["dev"]), "text": "sentence"}, "max_length": 32},
            "steps": steps, "bench": bench or {"enabled": False}}))
        return path
    return write

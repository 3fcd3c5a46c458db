"""compress: make Transformer models smaller and faster, and prove it.

    import compress
    recipe = compress.load_recipe("pipelines/quickstart.yaml", ["steps.0.epochs=2"])
    outcome = compress.run_pipeline(recipe, out="runs/qs")
    artifact = compress.Artifact.load("runs/qs/02-ptq")
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Loaded on first use: `import compress` stays cheap, so an ONNX bench worker never pulls in torch.
_PUBLIC = {
    "load_recipe": "compress.recipe_loader",
    "run_pipeline": "compress.pipeline",
    "Recipe": "compress.recipe",
    "Artifact": "compress.artifact",
}
__all__ = ["Artifact", "Recipe", "__version__", "load_recipe", "run_pipeline"]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'compress' has no attribute {name!r}")
    return getattr(import_module(_PUBLIC[name]), name)

"""compress: make Transformer models smaller and faster, and prove it.

    import compress
    recipe = compress.load_recipe("pipelines/quickstart.yaml", ["steps.0.epochs=2"])
    outcome = compress.run_pipeline(recipe, out="runs/qs")
    artifact = compress.Artifact.load("runs/qs/02-ptq")
"""

import os
from importlib import import_module
from typing import Any

from compress.after_import import after_import

__version__ = "0.1.0"

# ONNX Runtime (1.29+) otherwise writes a device id under ~/.cache/Microsoft and a session file in the temporary
# directory, and tries to send usage data, on the first session it creates. A user may set it to 0.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

# Loaded on first use: `import compress` stays cheap, so an ONNX bench worker never pulls in torch.
_PUBLIC = {
    "load_recipe": "compress.recipe_loader",
    "run_pipeline": "compress.pipeline",
    "Recipe": "compress.recipe",
    "Artifact": "compress.artifact",
}
__all__ = ["Artifact", "Recipe", "__version__", "load_recipe", "run_pipeline"]



def _teach_transformers_layer_shapes() -> None:
    from compress.algos.shrink import install_reload_hook

    install_reload_hook()


# Structured pruning leaves blocks with their own FFN widths (and Llama blocks with their own query heads):
# with `compress` imported, `AutoModelFor*.from_pretrained` builds those shapes before loading the weights.
after_import("transformers.modeling_utils", _teach_transformers_layer_shapes)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'compress' has no attribute {name!r}")
    return getattr(import_module(_PUBLIC[name]), name)

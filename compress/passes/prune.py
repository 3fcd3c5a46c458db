"""The prune step: structured (units leave the matrices) or unstructured (zeros inside them), by `method`."""

from __future__ import annotations

from compress.artifact import Artifact
from compress.context import Context
from compress.errors import RecipeError
from compress.passes import prune_structured, prune_unstructured
from compress.plan import StepRejects
from compress.recipe import PruneStep


def run(artifact: Artifact, step: PruneStep, ctx: Context) -> Artifact:
    try:
        kind = step.output_kind(artifact.kind)
    except StepRejects as why:
        raise RecipeError(f"prune: {why}") from None
    method = prune_structured if step.method == "structured" else prune_unstructured
    return method.run(artifact, step, ctx, kind)

"""YAML in, a validated `Recipe` out; every problem becomes one `RecipeError` line naming the field."""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from compress.errors import RecipeError
from compress.recipe import STEP_CLASSES, Recipe, nested_models


class RecipeYamlLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (which of them was meant?) and reading
    `1e-4` as the number YAML 1.2 and every user mean by it (YAML 1.1 wants `1.0e-4`)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, list | dict):
                raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a scalar",
                                                        key_node.start_mark)
            if key in seen and key != "<<":
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


RecipeYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789."))


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    return parse_recipe(apply_overrides(read_raw(path), overrides), base_dir=path.resolve().parent, source=str(path))


def read_raw(path: Path) -> dict[str, Any]:
    """The recipe file as YAML data, before validation."""
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=RecipeYamlLoader)  # a SafeLoader
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping with at least 'model', 'task' and 'data'")
    return raw


def parse_recipe(raw: dict[str, Any], base_dir: Path, source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as err:
        raise RecipeError(f"{source}: {describe(err.errors()[0])}") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`steps.0.epochs=2` sets that key; the value is read as YAML (so `2` is an int, `[1, 2]` a list)."""
    raw = copy.deepcopy(raw)
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set {override!r}: expected KEY=VALUE, e.g. steps.0.epochs=2")
        parts = key.split(".")
        node: Any = raw
        for depth, part in enumerate(parts[:-1]):
            node = _child(node, part, ".".join(parts[: depth + 1]), override)
        _assign(node, parts[-1], _yaml_value(text), override)
    return raw


def _yaml_value(text: str) -> Any:
    """`2` is an int and `[1, 2]` a list; text YAML cannot parse (`@01-export`) stays the string it is."""
    try:
        return yaml.load(text, Loader=RecipeYamlLoader)  # a SafeLoader
    except yaml.YAMLError:
        return text


def _child(node: Any, part: str, where: str, override: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, where, override)]
    if isinstance(node, dict):
        return node.setdefault(part, {})
    raise RecipeError(f"--set {override!r}: {where} is not a mapping or list")


def _assign(node: Any, part: str, value: Any, override: str) -> None:
    if isinstance(node, list):
        node[_index(node, part, part, override)] = value
    elif isinstance(node, dict):
        node[part] = value
    else:
        raise RecipeError(f"--set {override!r}: cannot set {part!r} inside a {type(node).__name__}")


def _index(node: list, part: str, where: str, override: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise RecipeError(f"--set {override!r}: {where} is not an index of a list of {len(node)}")
    return int(part)


def describe(error: dict[str, Any]) -> str:
    """One pydantic error as `steps[0].epochz: unknown field; did you mean 'epochs'?`."""
    raw = error["loc"]  # pydantic puts the step's kind after its index: steps, 0, "export", field
    loc = tuple(part for i, part in enumerate(raw) if not (i and isinstance(raw[i - 1], int) and _is_step_tag(part)))
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    kind = error["type"]
    if kind == "extra_forbidden":
        if tuple(error["loc"][-2:]) == ("export", "optimize"):
            return f"{where}: ONNX Runtime fusions are now a step of their own: add '- kind: ort-fuse' after the export"
        close = difflib.get_close_matches(str(loc[-1]), _fields_at(error["loc"][:-1]), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(_fields_at(error['loc'][:-1]))}"
        return f"{where}: unknown field{hint}"
    if kind == "union_tag_invalid":
        tag = error["ctx"]["tag"]
        close = difflib.get_close_matches(str(tag), list(STEP_CLASSES), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known kinds: {', '.join(STEP_CLASSES)}"
        return f"{where}.kind: unknown step kind {tag!r}{hint}"
    if kind == "union_tag_not_found":
        return f"{where}: every step needs a 'kind' ({', '.join(STEP_CLASSES)})"
    if kind == "missing":
        return f"{where}: required field missing"
    message = error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    shown = "" if isinstance(got, (dict, list)) or kind.startswith("value_error") else f" (got {got!r})"
    return f"{where}: {message}{shown}" if where else message


def _is_step_tag(part: Any) -> bool:
    return isinstance(part, str) and part in STEP_CLASSES


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    candidates = [Recipe]
    for part in loc:
        if isinstance(part, int):
            continue
        if _is_step_tag(part) and len(candidates) > 1:
            candidates = [STEP_CLASSES[part]]
            continue
        candidates = [m for c in candidates if part in c.model_fields for m in nested_models(c.model_fields[part].annotation)]
    if len(candidates) != 1:
        return []
    return sorted(info.alias or name for name, info in candidates[0].model_fields.items())

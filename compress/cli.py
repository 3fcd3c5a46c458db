"""`compress run | validate | export | bench | inspect | sweep | search | gate | diff`.

Exit codes: 0 ok, 1 internal, 2 bad input, 3 verification failed (or `diff` found a divergence), 4 `gate` failed
(or no `search` rung met the budget)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress import __version__
from compress.arch import TASKS, is_text_stream
from compress.errors import ArtifactError, CompressError, GateFailed, UsageError
from compress.rundir import output_errors

log = logging.getLogger("compress")
LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")  # what str.splitlines splits on
# Used to verify a stand-alone export when no --data is given: real sentences, not random ids.
VERIFY_SENTENCES = [
    "a gripping, beautifully acted film that stays with you .",
    "the plot is thin and the jokes fall flat .",
    "It was the best of times, it was the worst of times.",
    "Compression makes models smaller and faster; verification proves it kept its answers.",
    "short",
    "Numbers like 3.14159 and dates like 2026-11-23 tokenize into many pieces.",
]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # force: each call binds the current stderr; libraries speak only on errors, we on progress
    logging.basicConfig(level=logging.ERROR, format="%(name)s: %(message)s", force=True)
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    _quiet_libraries()
    try:
        with output_errors(getattr(args, "out", None) or Path.cwd()):
            return args.handler(args) or 0
    except CompressError as err:
        print(f"error: {_one_line(str(err)) if not isinstance(err, GateFailed) else err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted: finished stages are kept; re-run the same command to resume", file=sys.stderr)
        return 130


def _one_line(message: str) -> str:
    """Line breaks inside a message (a field name with a newline in it) shown escaped: an error is one line."""
    return "".join(char.encode("unicode_escape").decode() if char in LINE_BREAKS else char for char in message)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compress", description=__doc__)
    parser.add_argument("--version", action="version", version=f"compress {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info lines")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a recipe: steps, export, verification, benchmark, report")
    run.add_argument("recipe", type=Path)
    run.add_argument("--out", type=Path, required=True, help="run directory (resumed when it is a previous run)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe field, e.g. steps.0.epochs=2 (repeatable)")
    run.add_argument("--overwrite", action="store_true", help="clear --out even if it is not a compress run")
    run.set_defaults(handler=_run)

    validate = sub.add_parser("validate", help="check a recipe, its files and its step order without running it")
    validate.add_argument("recipe", type=Path)
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    validate.set_defaults(handler=_validate)

    export = sub.add_parser("export", help="export a model or artifact to a verified ONNX artifact")
    export.add_argument("model", help="artifact directory, model directory, embedded alias or hub id")
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--task", choices=list(TASKS),
                        help="needed unless MODEL is a compress artifact")
    export.add_argument("--opset", type=int, default=17)
    export.add_argument("--fuse", action="store_true",
                        help="also apply ONNX Runtime's fusions (faster there; the graph then loads in ONNX Runtime only)")
    export.add_argument("--data", type=Path, help="text file/table whose rows verify the export")
    export.add_argument("--text", default="text", help="text column of --data")
    export.set_defaults(handler=_export)

    bench = sub.add_parser("bench", help="measure metric, latency, size and memory of artifacts")
    bench.add_argument("path", type=Path, help="an artifact directory, or a run directory (all its stages)")
    bench.add_argument("--data", type=Path, required=True, help="eval file (csv, tsv, jsonl or text)")
    bench.add_argument("--out", type=Path, help="where results.json and report.md go (default: ./bench-NAME)")
    bench.add_argument("--text", default="text")
    bench.add_argument("--text-pair")
    bench.add_argument("--label", default="label")
    bench.add_argument("--columns", nargs="+", help="column names of a header-less csv/tsv")
    bench.add_argument("--max-length", type=int, default=128, help="truncation, or causal LM context")
    bench.add_argument("--max-rows", type=int, help="classification: use only the first N eval rows")
    bench.add_argument("--threads", type=int, default=2)
    bench.add_argument("--runs", type=int, default=100, help="timed runs per variant, over all rounds")
    bench.add_argument("--rounds", type=int, default=3, help="interleaved rounds (A B C, A B C, ...)")
    bench.add_argument("--seq-len", type=int, default=128)
    bench.add_argument("--runtime", dest="runtimes", action="append", metavar="NAME",
                       help="where to run: torch, torch-bf16, onnxruntime, openvino, openvino-bf16, torch-cuda, "
                            "... (repeat for several; default: torch and onnxruntime)")
    bench.set_defaults(handler=_bench)

    inspect = sub.add_parser("inspect", help="history, sizes and hashes of an artifact or a run")
    inspect.add_argument("path", type=Path)
    inspect.set_defaults(handler=_inspect)

    sweep = sub.add_parser("sweep", help="every combination of a grid of recipe values, shared stages run once, "
                                         "one report with the Pareto frontier")
    sweep.add_argument("recipe", type=Path)
    sweep.add_argument("--out", type=Path, required=True)
    sweep.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2",
                       help="a recipe field and its values, e.g. steps.2.sparsity=0.3,0.5,0.7 (repeatable)")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sweep.add_argument("--max-runs", type=int, default=16, help="refuse grids with more combinations (default 16)")
    sweep.add_argument("--seeds", type=int, default=1,
                       help="run every combination with this many seeds (the recipe's and the next ones)")
    sweep.set_defaults(handler=_sweep)

    search = sub.add_parser("search", help="a ladder of compression recipes after RECIPE, cheapest first; the "
                                           "fastest (or smallest) one within the budget, judged on validation")
    search.add_argument("recipe", type=Path, help="model, data and the steps that make the model to compress")
    search.add_argument("--out", type=Path, required=True)
    search.add_argument("--max-drop", type=float, required=True,
                        help="accuracy points (perplexity: percent rise) a rung may lose on the validation split")
    search.add_argument("--max-latency-ms", type=float, help="p50 a rung must reach at the bench's main shape")
    search.add_argument("--objective", choices=["fastest", "smallest"], default="fastest")
    search.add_argument("--rungs", help="comma-separated rungs to try (default: the whole ladder for the task)")
    search.set_defaults(handler=_search)

    gate = sub.add_parser("gate", help="exit 4 when a candidate's results lose more than allowed vs a baseline's")
    gate.add_argument("--baseline", type=Path, required=True, help="results.json of the reference run")
    gate.add_argument("--candidate", type=Path, required=True, help="results.json of the run to judge")
    gate.add_argument("--max-drop", type=float, default=0.5,
                      help="accuracy points (perplexity: percent rise) a row may lose beyond noise (default 0.5)")
    gate.add_argument("--max-slowdown", type=float, default=1.05,
                      help="p50 ratio a row may slow down beyond the rounds' spread (default 1.05)")
    gate.add_argument("--row", dest="rows", action="append", default=[], metavar="NAME",
                      help="judge only these rows (repeatable; default: every row both measured)")
    gate.add_argument("--allow-other-data", action="store_true", help="compare runs on different eval data")
    gate.add_argument("--allow-other-machine", action="store_true",
                      help="compare runs from different machines or thread counts")
    gate.set_defaults(handler=_gate)

    diff = sub.add_parser("diff", help="where an ONNX graph first leaves its torch model, or a quantized graph its "
                                       "float graph")
    diff.add_argument("reference", type=Path, help="artifact directory: the torch model, or the float ONNX graph")
    diff.add_argument("candidate", type=Path, help="artifact directory: its exported or quantized ONNX graph")
    diff.add_argument("--data", type=Path, help="text file/table whose rows are the inputs (default: built-in)")
    diff.add_argument("--text", default="text", help="text column of --data")
    diff.add_argument("--atol", type=float, default=1e-4)
    diff.add_argument("--rtol", type=float, default=1e-3)
    diff.set_defaults(handler=_diff)
    return parser


def _run(args: argparse.Namespace) -> int:
    from compress.kinds import Kind
    from compress.pipeline import run_pipeline
    from compress.recipe_loader import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    command = "compress " + shlex.join(sys.argv[1:]) if sys.argv[1:] else None
    outcome = run_pipeline(recipe, args.out, overwrite=args.overwrite, quiet=args.quiet, command=command)
    for stage in outcome["stages"]:
        print(f"{stage['name']:<16} {stage['status']:<9} {Kind.from_json(stage['kind']).describe()}")
    if outcome["results"]:
        print(f"report: {args.out / 'report.md'}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from compress import models
    from compress.data import load_task_data
    from compress.depths import base_depth, check_depths
    from compress.plan import baseline, baseline_export, plan_stages
    from compress.recipe_loader import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    data = load_task_data(recipe.data, recipe.task, recipe.seed, recipe.train_data_sources())
    stages = plan_stages(recipe.steps)
    check_depths(stages, base_depth(models.resolve(recipe.model)))
    stream = is_text_stream(recipe.task)  # one text each: its size is in characters, not rows
    counts = [(sum(map(len, table["text"])) if stream else len(table), name)
              for name, table in (("train", data.train), ("validation", data.validation), ("eval", data.eval))
              if table is not None]
    rows = " / ".join(f"{count:,} {name}" for count, name in counts) + (" characters" if stream else " rows")
    labels = f", labels: {', '.join(data.label_names)}" if data.label_names else ""
    print(f"{args.recipe}: ok ({recipe.task}, {rows}{labels})")
    for where, own in data.notes.get("train_data", {}).items():
        print(f"  {where}: {own['rows']:,} rows ({own['left_out_as_held_out']:,} left out: in validation or eval)")
    reference = baseline(stages, recipe.bench.baseline)
    extra = baseline_export(stages, reference)
    shown = [*stages, *([extra] if extra else [])]
    width = max(len(stage.name) for stage in shown)
    for stage in shown:
        source = f" <- {stage.input}" if stage.input else ""
        mark = "  (baseline)" if stage is reference else ""
        print(f"  {stage.name:<{width}}  {stage.kind.describe()}{source}{mark}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from datasets import Dataset

    from compress import models
    from compress.artifact import MANIFEST, Artifact
    from compress.context import Context
    from compress.data import TaskData, build_eval_set, read_table
    from compress.passes import export as export_pass
    from compress.passes import ort_fuse
    from compress.recipe import DataConfig, DataSource, ExportStep, OrtFuseStep

    step = _settings(ExportStep, {"opset": "--opset"}, opset=args.opset)
    if (Path(args.model) / MANIFEST).is_file():
        artifact = Artifact.load(Path(args.model))
    else:
        if args.task is None:
            raise ArtifactError(f"--task: {args.model} is not a compress artifact; say which task to export")
        artifact = models.load(args.model, args.task).artifact()
    if artifact.format != "torch":
        raise ArtifactError(f"{args.model}: holds no torch model to export (it is already {artifact.kind.describe()})")
    texts = VERIFY_SENTENCES
    if args.data:
        source = DataSource(path=str(args.data), text=args.text)
        texts = read_table(source, "--data", not is_text_stream(artifact.task), labelled=False)["text"]
    data = TaskData(artifact.task, None, Dataset.from_dict({"text": list(texts)}), None, "")
    data_cfg = DataConfig(eval=DataSource(path="-"))

    def export_into(partial: Path) -> None:
        ctx = Context(stage_dir=partial, task=artifact.task, data=data, quiet=args.quiet,
                      make_eval_set=lambda tok, split: build_eval_set(data, tok, data_cfg, split))
        exported = export_pass.run(artifact, step, ctx)
        if args.fuse:
            exported = ort_fuse.run(exported, OrtFuseStep(), ctx)
        exported.save(partial)

    _atomic_dir(args.out, export_into)
    print(f"exported: {args.out / 'model.onnx'}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from compress.artifact import Artifact
    from compress.data import build_eval_set, load_task_data
    from compress.eval.bench import BenchStage, on_targets, run_bench
    from compress.eval.report import write_results
    from compress.eval.targets import check_targets
    from compress.plan import PlannedStage, parent_on_same_format
    from compress.recipe import BenchConfig, DataConfig, DataSource

    bench_cfg = _settings(BenchConfig, {"threads": "--threads", "runs": "--runs", "seq_len": "--seq-len",
                                        "rounds": "--rounds", "runtimes": "--runtime"},
                          threads=args.threads, runs=args.runs, seq_len=args.seq_len, rounds=args.rounds,
                          **({"runtimes": args.runtimes} if args.runtimes else {}))
    stages, baseline = _benchable(args.path)
    reference = Artifact.load(stages[0].directory)
    source = DataSource(path=str(args.data.resolve()), text=args.text, text_pair=args.text_pair, label=args.label,
                        columns=args.columns)
    cfg = _settings(DataConfig, {"max_length": "--max-length", "max_eval_rows": "--max-rows"}, eval=source,
                    labels=reference.label_names, max_length=args.max_length, max_eval_rows=args.max_rows)
    evals = build_eval_set(load_task_data(cfg, reference.task), reference.tokenizer, cfg)
    planned = [PlannedStage(s.name, None, s.input, s.kind) for s in stages]
    shown = {s.name for s in stages}
    variants = on_targets([BenchStage(s.name, s.directory, s.kind, parent_on_same_format(planned, s.name, shown))
                           for s in stages], check_targets(bench_cfg.runtimes))
    out = args.out or Path(f"bench-{args.path.resolve().name}")
    out.mkdir(parents=True, exist_ok=True)
    results = run_bench(variants, evals, bench_cfg, baseline, quiet=args.quiet)
    write_results(results, out, command="compress " + shlex.join(sys.argv[1:]))
    print(f"report: {out / 'report.md'}")
    return 0


@dataclass
class _Found:
    name: str
    directory: Path
    input: str | None
    kind: Any
    manifest: dict


def _benchable(path: Path) -> tuple[list[_Found], str]:
    """The artifacts under `path` (one artifact, or every finished stage of a run) and the baseline's name."""
    from compress.artifact import MANIFEST, read_manifest
    from compress.kinds import Kind
    from compress.pipeline import RUN_MANIFEST

    if (path / MANIFEST).is_file():
        manifest = read_manifest(path)
        return [_Found(path.name, path, None, Kind.from_json(manifest["kind"]), manifest)], path.name
    if (path / RUN_MANIFEST).is_file():
        run = json.loads((path / RUN_MANIFEST).read_text())
        found = [_Found(s["name"], path / s["name"], s.get("input"), Kind.from_json(s["kind"]),
                        read_manifest(path / s["name"]))
                 for s in run.get("stages", []) if (path / s["name"] / MANIFEST).is_file()]
        if found:
            names = [f.name for f in found]
            return found, run["baseline"] if run.get("baseline") in names else names[0]
    raise ArtifactError(f"{path}: neither a compress artifact nor a run directory with finished stages")


def _settings(cls: Any, flags: dict[str, str], **values: Any) -> Any:
    """Build a settings block from command-line flags; a bad value becomes one line naming the flag."""
    from pydantic import ValidationError

    from compress.recipe_loader import describe

    try:
        return cls(**values)
    except ValidationError as err:
        error = err.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else ""
        message = describe({**error, "loc": ()})
        raise UsageError(f"{flags.get(field, field)}: {message} (got {error.get('input')!r})") from None


def _inspect(args: argparse.Namespace) -> int:
    from compress.eval.report import effect_line

    for found in _benchable(args.path)[0]:
        directory, manifest = found.directory, found.manifest
        print(f"{directory}  [{manifest['task']}, {found.kind.describe()}]")
        if manifest.get("source"):
            print(f"  source: {manifest['source']}")
        for name, digest in manifest["files"].items():
            print(f"  {name:<18} {(directory / name).stat().st_size / 1e6:9.2f} MB  sha256 {digest[:16]}…")
        if found.kind.format == "onnx":
            print("  " + _loads_on(directory))
        for entry in manifest["history"]:
            print(f"  {entry.get('stage', entry['kind'])}: {effect_line(entry['effect'])}")
    return 0


def _loads_on(directory: Path) -> str:
    """Which runtimes load the graph, found by loading it in each: 'loads on: onnxruntime; not on: openvino (...)'."""
    from compress.artifact import GRAPH
    from compress.eval.runners import loads_on

    verdicts = loads_on(directory / GRAPH)
    loads = [name for name, reason in verdicts.items() if reason is None]
    refused = [f"{name} ({reason})" for name, reason in verdicts.items() if reason is not None]
    return "; ".join(filter(None, [f"loads on: {', '.join(loads)}" if loads else "loads on no installed runtime",
                                   f"not on: {', '.join(refused)}" if refused else ""]))


def _sweep(args: argparse.Namespace) -> int:
    from compress.sweep import run_sweep

    command = "compress " + shlex.join(sys.argv[1:]) if sys.argv[1:] else None
    if args.seeds < 1:
        raise UsageError(f"--seeds: at least 1 (got {args.seeds})")
    outcome = run_sweep(args.recipe, args.grid, args.out, args.overrides, args.max_runs, args.quiet, command,
                        args.seeds)
    for point, stages in outcome["points"].items():
        print(f"{point}: " + ", ".join(f"{stage['name']} {stage['status']}" for stage in stages))
    for point, error in outcome["failed"].items():
        print(f"{point}: failed verification ({error})")
    if outcome["results"]:
        print(f"report: {args.out / 'report.md'} and {args.out / 'report.html'}")
    return 0


def _search(args: argparse.Namespace) -> int:
    from compress.search import run_search

    rungs = [name.strip() for name in args.rungs.split(",")] if args.rungs else []
    record = run_search(args.recipe, args.out, args.max_drop, args.max_latency_ms, args.objective, rungs, args.quiet)
    for name, verdict in record["verdicts"].items():
        print(f"{name}: {verdict or 'within the budget'}")
    for name in record["failed_verification"]:
        print(f"{name}: failed its verification")
    chosen = record["eval"][record["chosen"]]
    print(f"chosen: {record['chosen']} -> {record['artifact']} (eval: {chosen['metric']['name']} "
          f"{chosen['metric']['value']:.4g}, p50 {chosen['p50_ms']:.2f} ms); evidence: {args.out / 'report.md'}")
    return 0


def _gate(args: argparse.Namespace) -> int:
    from compress.errors import GateFailed
    from compress.eval.gate import gate, read_results, render

    checks = gate(read_results(args.baseline), read_results(args.candidate), args.max_drop, args.max_slowdown,
                  args.rows, other_data=args.allow_other_data, other_machine=args.allow_other_machine)
    text = render(checks, args.max_drop, args.max_slowdown)
    if any(check.failed for check in checks):
        raise GateFailed(text)
    print(text)
    return 0


def _diff(args: argparse.Namespace) -> int:
    from compress.artifact import GRAPH, Artifact
    from compress.data import read_table
    from compress.errors import ExportMismatch
    from compress.eval.divergence import QUANTIZED_RELATIVE_ERROR, first_divergence, first_graph_divergence
    from compress.recipe import DataSource
    from compress.settings import FloatTolerance

    tolerance = _settings(FloatTolerance, {"atol": "--atol", "rtol": "--rtol"}, atol=args.atol, rtol=args.rtol)
    reference, graph = Artifact.load(args.reference), Artifact.load(args.candidate)
    if graph.format != "onnx":
        raise ArtifactError(f"diff: {args.candidate} holds {graph.kind.describe()}; the candidate is an ONNX graph")
    texts = VERIFY_SENTENCES
    if args.data:
        texts = read_table(DataSource(path=str(args.data), text=args.text), "--data",
                           not is_text_stream(reference.task), labelled=False)["text"]
    features = dict(reference.tokenizer(list(texts), padding=True, truncation=True, max_length=128,
                                        return_tensors="np"))
    if reference.format == "onnx":  # a quantized graph against its float graph: value by value
        found = first_graph_divergence(args.reference / GRAPH, args.candidate / GRAPH, features)
        within = f"every value both graphs compute is within {QUANTIZED_RELATIVE_ERROR:.0%} relative error"
    else:
        found = first_divergence(reference.model, args.candidate / GRAPH, features, tolerance)
        within = f"every module compared is within atol {tolerance.atol:g}, rtol {tolerance.rtol:g}"
    if found is not None:
        raise ExportMismatch(found.describe())
    print(f"no divergence: {within}")
    return 0


def _atomic_dir(out: Path, write: Any) -> None:
    """Write into a temporary sibling, rename at the end: a failed export leaves nothing behind."""
    if out.exists() and any(out.iterdir()):
        raise ArtifactError(f"--out: {out} already exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(partial)
        if out.exists():
            out.rmdir()
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import optimum.utils.logging
    import transformers

    transformers.logging.set_verbosity_error()
    optimum.utils.logging.set_verbosity_error()
    # torchao, which transformers imports when present, registers enums torch now deprecates registering.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())

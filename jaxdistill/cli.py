"""The `jaxdistill` command line: train, distil, evaluate, cache teachers, export, inspect.

Each subcommand is a thin wrapper over a library call. jax, grain and transformers are imported
inside the subcommands, so `jaxdistill --help` answers at once. A user error (a bad config,
record, path or checkpoint) exits with status 2 and a one-paragraph message; `--debug` adds the
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

EXIT_USER_ERROR = 2
RUNS_DIR = "runs"


class UserError(Exception):
    """A problem with what the user asked for; its message is shown as is, without traceback."""


# ----------------------------------------------------------------------------- helpers


def _load_config(path: str, overrides: Sequence[str]):
    from jaxdistill.config import load_config

    return load_config(path, overrides)


def _module(name: str, what: str):
    """An optional part of the package, or a UserError saying it is not available yet."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name:
            raise
        raise UserError(f"{what} is not available in this installation ({name} is missing)") from None


def _emit(text: str) -> None:
    """A command's result goes to the real stdout; libraries' chatter is sent to stderr."""
    print(text, file=_RESULT_STREAM[0] or sys.stdout)


_RESULT_STREAM: list[Any] = [None]


def _print_json(value: Any) -> None:
    _emit(json.dumps(_jsonable(value), indent=2, sort_keys=False))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return os.fspath(value)
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _run_dir(cfg, run_dir: str | None) -> Path:
    return Path(run_dir) if run_dir else Path(RUNS_DIR) / cfg.name


def _existing_dir(path: str, what: str) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{path}: no such {what} directory")
    return directory


def _config_and_run_dir(target: str, overrides: Sequence[str], run_dir: str | None):
    """`eval` takes a config (its run dir is runs/<name> or --run-dir) or a run directory."""
    path = Path(target)
    if path.is_dir():
        config_file = path / "config.yaml"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path}: not a run directory (no config.yaml)")
        return _load_config(config_file, overrides), path
    cfg = _load_config(target, overrides)
    return cfg, _run_dir(cfg, run_dir)


# ----------------------------------------------------------------------------- commands


def cmd_train(args) -> None:
    """`train` (no teachers) and `distill` (at least one teacher): one engine, train.run."""
    cfg = _load_config(args.config, args.set)
    if args.command == "train" and cfg.teachers:
        raise UserError(
            f"{args.config}: `train` fits one model on labels, but the config names teachers "
            f"{sorted(cfg.teachers)}; use `jaxdistill distill` to distil from them")
    if args.command == "distill" and not cfg.teachers:
        raise UserError(
            f"{args.config}: `distill` needs at least one teacher under `teachers:`; use "
            "`jaxdistill train` to fit a model on labels alone")
    from jaxdistill import cache

    cache.check_offline_sources(cfg)
    train = _module("jaxdistill.train", "training (jaxdistill.train)")
    result = train.run(cfg, _run_dir(cfg, args.run_dir), resume=not args.no_resume,
                       force_teachers=args.force_teachers)
    _print_json({"run_dir": result.run_dir, "step": result.step, "metrics": result.metrics,
                 "eval_metrics": result.eval_metrics, "checkpoint_dir": result.checkpoint_dir})


def cmd_eval(args) -> None:
    cfg, run_dir = _config_and_run_dir(args.target, args.set, args.run_dir)
    split = args.split or cfg.data.eval_split
    if not split:
        raise UserError("no split to evaluate: the config has data.eval_split: null; pass --split")
    checkpoint = _module("jaxdistill.checkpoint", "checkpoints (jaxdistill.checkpoint)")
    model_cfg, params = checkpoint.load_params(run_dir)
    result = evaluate_run(cfg, model_cfg, params, split, max_batches=args.max_batches)
    result = {"run_dir": os.fspath(run_dir), "split": split, **result}
    out = Path(args.out) if args.out else run_dir / f"eval_{split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_jsonable(result), indent=2) + "\n")
    _print_json(result)


def evaluate_run(cfg, model_cfg, params, split: str, *, max_batches: int | None = None):
    """The objective's terms (teachers online, or offline from the records) and headline
    metrics (NDCG@10 and poor-match@10 of each two-logit head, AUROC per action) on `split`."""
    import jax
    import numpy as np

    from jaxdistill import cache, evaluate
    from jaxdistill.distill.objectives import apply_transform, compute_objective
    from jaxdistill.models.heads import ActionHead
    from jaxdistill.models.model import functional

    cache.check_offline_sources(cfg)
    student = functional(model_cfg)
    teachers = _load_online_teachers(cfg)

    @jax.jit
    def evaluate_batch(params, teacher_params, batch):
        student_out = student.apply(params, batch)
        teacher_out = {name: model.apply(teacher_params[name], batch)
                       for name, (model, _) in teachers.items()}
        _, terms = compute_objective(cfg.objective, student_out, teacher_out, batch,
                                     jax.numpy.zeros((), jax.numpy.int32))
        scores = {name: apply_transform(out, "log_odds") for name, out in student_out.items()
                  if name != "pooled" and not isinstance(out, tuple) and out.shape[-1] == 2}
        actions = {name: student_out[name] for name, head in model_cfg.heads.items()
                   if isinstance(head, ActionHead)}
        return terms, scores, actions

    teacher_params = {name: p for name, (_, p) in teachers.items()}
    sums: dict[str, float] = {}
    kept: dict[str, list] = {}
    batches = 0
    for batch in cache.eval_batches(cfg, split):
        batch = {k: v for k, v in batch.items() if k != "batch_malformed"}
        terms, scores, actions = jax.device_get(evaluate_batch(params, teacher_params, batch))
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + float(value)
        for name, value in {**{f"score:{k}": v for k, v in scores.items()},
                            **{f"actions:{k}": v for k, v in actions.items()}}.items():
            kept.setdefault(name, []).append(value)
        for key in ("grade", "candidate_mask", "actions", "action_mask"):
            if key in batch:
                kept.setdefault(key, []).append(np.asarray(batch[key]))
        batches += 1
        if max_batches is not None and batches >= max_batches:
            break
    if not batches:
        raise UserError(f"{cfg.data.path}[{split}]: no complete batch to evaluate")
    joined = {k: np.concatenate(v) for k, v in kept.items()}
    metrics: dict[str, Any] = {}
    listwise = cfg.data.kind == "listwise"
    for key, scores in joined.items():
        if key.startswith("score:") and listwise:
            head = key.split(":", 1)[1]
            metrics[f"{head}/ndcg_at_10"] = evaluate.ndcg_at_k(
                scores, joined["grade"], joined["candidate_mask"], 10)
            metrics[f"{head}/poor_match_rate_at_10"] = evaluate.poor_match_rate_at_k(
                scores, joined["grade"], joined["candidate_mask"], 10)
        elif key.startswith("actions:"):
            head = key.split(":", 1)[1]
            names = model_cfg.heads[head].names
            data_names = sorted(cfg.data.action_names)
            for i, action in enumerate(names):
                if action not in data_names:
                    continue
                j = data_names.index(action)
                value, note = evaluate.auroc_with_reason(
                    scores[..., i].ravel(), joined["actions"][..., j].ravel(),
                    joined["action_mask"][..., j].ravel() > 0)
                metrics[f"{head}/auroc_{action}"] = value if note is None else note
    return {"batches": batches, "terms": {k: v / batches for k, v in sums.items()},
            "metrics": metrics}


def _load_online_teachers(cfg) -> dict[str, tuple[Any, Any]]:
    """{name: (Functional, params)} of the config's run:/hf: teachers the objective reads."""
    from jaxdistill.models.model import functional

    used = {term.teacher for term in cfg.objective if term.teacher is not None}
    online = {name: t for name, t in cfg.teachers.items()
              if name in used and not t.source.startswith("offline:")}
    if not online:
        return {}
    train = _module("jaxdistill.train", "loading teachers (jaxdistill.train)")
    out = {}
    for name, teacher in online.items():
        if teacher.inputs is not None:
            raise UserError(f"teachers.{name}: teachers with their own inputs are not supported "
                            "by `eval` yet")
        model_cfg, params = train.load_model(teacher.source, heads=teacher.heads,
                                             dtype=teacher.dtype)
        out[name] = (functional(model_cfg), params)
    return out


def cmd_cache_teacher(args) -> None:
    from jaxdistill import cache

    cfg = _load_config(args.config, args.set)
    outputs = args.outputs.split(",") if args.outputs else None
    report = cache.cache_teacher(cfg, args.teacher, args.out, outputs=outputs,
                                 overwrite=args.overwrite)
    _print_json(report)


def cmd_export(args) -> None:
    run_dir = _existing_dir(args.run_dir, "run")
    checkpoint = _module("jaxdistill.checkpoint", "checkpoints (jaxdistill.checkpoint)")
    hf = _module("jaxdistill.models.hf", "HF export (jaxdistill.models.hf)")
    from jaxdistill.config import load_config

    cfg = load_config(run_dir / "config.yaml")
    model_cfg, params = checkpoint.load_params(run_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = _tokenizer_dir(cfg.data.tokenizer, tmp)
        out = hf.export_hf(model_cfg, params, args.out, tokenizer_dir=tokenizer_dir,
                           dtype=args.dtype)
    _print_json({"run_dir": run_dir, "out": out, "format": args.format,
                 "files": sorted(p.name for p in Path(out).iterdir())})


def _tokenizer_dir(spec: str, scratch: str) -> str:
    """A directory holding the tokenizer's files (a built-in tokenizer is saved to `scratch`)."""
    from jaxdistill.data.tokenizer import BUILTIN_PREFIX, load_tokenizer

    if not spec.startswith(BUILTIN_PREFIX):
        return spec
    load_tokenizer(spec).save_pretrained(scratch)
    return scratch


def cmd_data_prepare(args) -> None:
    from jaxdistill.data.prepare import prepare

    report = prepare(args.input, args.kind, args.out, split=args.split,
                     skip_malformed=args.skip_malformed, overwrite=args.overwrite)
    _print_json(vars(report))


def cmd_inspect_config(args) -> None:
    from jaxdistill.config import resolved_yaml

    _emit(resolved_yaml(_load_config(args.config, args.set)).rstrip("\n"))


def cmd_inspect_checkpoint(args) -> None:
    import jax

    from jaxdistill import checkpoint
    from jaxdistill.models.model import count_params, functional

    run_dir = _existing_dir(args.run_dir, "run")
    model_cfg = checkpoint.run_model_config(run_dir)
    shapes = functional(model_cfg).shapes
    checkpointer = checkpoint.Checkpointer(run_dir / checkpoint.CHECKPOINT_SUBDIR, read_only=True)
    try:
        steps = checkpointer.all_steps()
        meta = checkpointer.read_meta(steps[-1]) if steps else {}
    finally:
        checkpointer.close()
    run_json = run_dir / "run.json"
    _print_json({
        "run_dir": run_dir,
        "steps": steps,
        "run": json.loads(run_json.read_text()) if run_json.is_file() else None,
        "teachers": meta.get("manifest", {}),
        "parameters": count_params(shapes),
        "params": {jax.tree_util.keystr(path): f"{leaf.dtype}{list(leaf.shape)}"
                   for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)},
    })


def cmd_inspect_data(args) -> None:
    directory = _existing_dir(args.dir, "dataset")
    from jaxdistill import cache
    from jaxdistill.data import sources

    _print_json({"path": directory, **sources.dataset_info(directory),
                 "offline_teachers": cache.read_manifest(directory)})


def cmd_inspect_hf(args) -> None:
    hf = _module("jaxdistill.models.hf", "HF interop (jaxdistill.models.hf)")
    _print_json(hf.inspect_hf(_existing_dir(args.dir, "HF checkpoint")))


def cmd_plan(args) -> None:
    """Per-device memory of a config's fused step, compiled from abstract arrays (no weights)."""
    if args.fake_devices:
        import jax

        try:  # only before jax's backend starts, i.e. here, before anything touches a device
            jax.config.update("jax_platforms", "cpu")
            jax.config.update("jax_num_cpu_devices", args.fake_devices)
        except RuntimeError as error:
            raise UserError(f"--fake-devices {args.fake_devices}: {error}") from None
    cfg = _load_config(args.config, args.set)
    from jaxdistill import plan

    device_memory = plan.parse_bytes(args.device_memory) if args.device_memory else None
    report = plan.plan(cfg, device_memory)
    if args.json:
        _print_json(report.to_dict())
    else:
        _emit(report.format())


def cmd_pipeline(args) -> None:
    try:
        module = importlib.import_module("jaxdistill.pipeline")
    except ModuleNotFoundError as error:
        if error.name != "jaxdistill.pipeline":
            raise
        raise UserError("`jaxdistill pipeline` is not available yet (jaxdistill.pipeline is not "
                        "installed); run the stages with train / distill / eval / export") from None
    options = {k: v for k, v in (("preset", args.preset), ("workdir", args.workdir)) if v}
    code = module.main(args.config, **options)
    if code:
        raise SystemExit(code)


# ----------------------------------------------------------------------------- parser

_EPILOGS = {
    "main": """examples:
  jaxdistill data prepare logs.jsonl --kind listwise --out data/job_search
  jaxdistill train configs/examples/relevance_teacher.yaml
  jaxdistill distill configs/examples/student.yaml --set trainer.steps=2000
  jaxdistill eval runs/student
  jaxdistill export runs/student --out exports/student

Run `jaxdistill COMMAND --help` for each command's options.""",
    "train": """examples:
  jaxdistill train configs/examples/relevance_teacher.yaml
  jaxdistill train configs/examples/engagement_teacher.yaml --set trainer.steps=500 \\
      --run-dir runs/engagement_v2

The run directory (default runs/<name>) receives config.yaml, run.json, metrics.jsonl and
checkpoints/. An existing run resumes from its latest checkpoint unless --no-resume.""",
    "distill": """examples:
  jaxdistill distill configs/examples/student.yaml
  jaxdistill distill configs/examples/student.yaml --set objective.0.weight=0.5

Each teacher's term is logged under loss/<term name> in metrics.jsonl. A resumed run refuses
teachers that changed since its checkpoint unless --force-teachers.""",
    "eval": """examples:
  jaxdistill eval runs/student
  jaxdistill eval configs/examples/student.yaml --split test --out student_test.json

Prints (and writes to RUN_DIR/eval_<split>.json unless --out) the mean of every objective
term over the split, NDCG@10 / poor-match@10 of each two-logit head, AUROC per action.""",
    "cache-teacher": """examples:
  jaxdistill cache-teacher configs/examples/student.yaml --teacher relevance \\
      --out data/job_search_relevance

Then use it: teachers.relevance.source: offline:data/job_search_relevance and
data.path: data/job_search_relevance (outputs travel with the records). Cache a second
teacher by running cache-teacher again on a config whose data.path is the first cache.""",
    "export": """examples:
  jaxdistill export runs/student --out exports/student
  python -c "import transformers; transformers.AutoModel.from_pretrained('exports/student')"

Task heads travel in jaxdistill_heads.json / jaxdistill_heads.safetensors beside the HF files.""",
    "data": """examples:
  jaxdistill data prepare logs.jsonl --kind listwise --out data/job_search
  jaxdistill data prepare val.parquet --kind listwise --out data/job_search_val --split validation""",
    "inspect": """examples:
  jaxdistill inspect config configs/examples/student.yaml --set trainer.steps=10
  jaxdistill inspect checkpoint runs/student
  jaxdistill inspect data data/job_search
  jaxdistill inspect hf exports/student""",
    "pipeline": """examples:
  jaxdistill pipeline configs/job_search/pipeline.yaml --preset small""",
}


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def _common(debug_default) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--debug", action="store_true", default=debug_default,
                        help="show the full traceback on errors")
    return parent


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a config value (YAML-typed; repeatable), "
                             "e.g. --set trainer.steps=100 --set objective.0.weight=0.5")


def build_parser() -> argparse.ArgumentParser:
    # On subcommands --debug defaults to SUPPRESS so it does not undo a `jaxdistill --debug ...`.
    common = _common(argparse.SUPPRESS)
    parser = argparse.ArgumentParser(
        prog="jaxdistill", formatter_class=_Formatter, parents=[_common(False)],
        description="Multi-teacher knowledge distillation in JAX: train teachers on labels, "
                    "distil a student from them, evaluate and export it.",
        epilog=_EPILOGS["main"])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name, help_text, description, epilog_key=None, sub=commands):
        return sub.add_parser(name, help=help_text, description=description,
                              epilog=_EPILOGS.get(epilog_key or name),
                              formatter_class=_Formatter, parents=[common])

    for name, help_text, description in (
        ("train", "train one model on labels (a teacher, or a student without teachers)",
         "Train one model on hard labels from the dataset. The config must have no teachers."),
        ("distill", "distil a student from one or more teachers",
         "Distil a student from the config's teachers (online run:/hf: models in the same "
         "fused step, or offline outputs cached with cache-teacher), plus any label terms."),
    ):
        p = command(name, help_text, description)
        p.add_argument("config", help="experiment YAML")
        _add_set(p)
        p.add_argument("--run-dir", help="run directory (default: runs/<config name>)")
        p.add_argument("--no-resume", action="store_true",
                       help="start afresh even if the run directory has checkpoints")
        p.add_argument("--force-teachers", action="store_true",
                       help="resume even though the teachers differ from the checkpoint's")
        p.set_defaults(handler=cmd_train)

    p = command("eval", "evaluate a run on a split",
                "Load a run's params (best or latest checkpoint) and report the objective's terms "
                "and ranking/action metrics on a split, as JSON.")
    p.add_argument("target", metavar="CONFIG|RUN_DIR",
                   help="a run directory, or an experiment YAML (its run: runs/<name>)")
    _add_set(p)
    p.add_argument("--run-dir", help="with a CONFIG: the run directory to load")
    p.add_argument("--split", help="dataset split (default: the config's data.eval_split)")
    p.add_argument("--max-batches", type=int, help="evaluate at most this many batches")
    p.add_argument("--out", help="JSON file to write (default: RUN_DIR/eval_<split>.json)")
    p.set_defaults(handler=cmd_eval)

    p = command("cache-teacher", "precompute one teacher's outputs into a new dataset",
                "Run one teacher of the config over every split of data.path and write a new "
                "dataset: the same records, each carrying the teacher's outputs, so a config can "
                "use the teacher as `source: offline:DIR` without running it.")
    p.add_argument("config", help="experiment YAML naming the teacher")
    _add_set(p)
    p.add_argument("--teacher", required=True, help="teacher name under `teachers:`")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--outputs", help="comma-separated teacher outputs to keep (default: every "
                                     "head but lm; 'pooled' for the pooled hidden state)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(handler=cmd_cache_teacher)

    p = command("export", "export a run's model (HF transformers format)",
                "Write a run's params as an HF directory transformers loads (config.json, "
                "model.safetensors, tokenizer) with the task heads in side files.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory")
    p.add_argument("--out", required=True, help="output directory (replaced atomically)")
    p.add_argument("--format", choices=("hf",), default="hf", help="export format (default: hf)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="cast weights (default: keep the checkpoint's dtype)")
    p.set_defaults(handler=cmd_export)

    data = command("data", "dataset tools", "Dataset tools.")
    data_commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    p = command("prepare", "JSONL/Parquet records -> a validated dataset",
                "Validate JSONL or Parquet records against a record kind's schema (see "
                "docs/configs.md) and write them as an array_record dataset.", "data",
                sub=data_commands)
    p.add_argument("input", help=".jsonl or .parquet file")
    p.add_argument("--kind", required=True,
                   choices=("pointwise", "listwise", "impressions", "chat"), help="record kind")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--split", default="train", help="split name to write (default: train)")
    p.add_argument("--skip-malformed", action="store_true",
                   help="skip and count records that break the schema instead of failing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(handler=cmd_data_prepare)

    inspect = command("inspect", "look at configs, checkpoints, datasets, HF directories",
                      "Print what a config resolves to or what a directory holds.")
    inspect_commands = inspect.add_subparsers(dest="inspect_command", metavar="WHAT",
                                              required=True)
    p = command("config", "print the resolved config (base merged, --set applied) as YAML",
                "Print the fully resolved config: base files merged, --set applied, defaults "
                "filled in.", "inspect", sub=inspect_commands)
    p.add_argument("config", help="experiment YAML")
    _add_set(p)
    p.set_defaults(handler=cmd_inspect_config)
    p = command("checkpoint", "steps, parameter shapes and teacher manifest of a run",
                "Print a run's checkpointed steps, parameter tree shapes and teacher manifest.",
                "inspect", sub=inspect_commands)
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.set_defaults(handler=cmd_inspect_checkpoint)
    p = command("data", "record kind, splits and sizes of a dataset",
                "Print a dataset's record kind, split sizes, content hashes and cached teachers.",
                "inspect", sub=inspect_commands)
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(handler=cmd_inspect_data)
    p = command("hf", "family, dimensions and parameter count of an HF directory",
                "Print an HF checkpoint directory's family, dimensions and parameter counts "
                "(reads headers only).", "inspect", sub=inspect_commands)
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(handler=cmd_inspect_hf)

    p = command("pipeline", "run the whole teachers -> student -> report pipeline",
                "Run every stage (teachers, student, calibration, evaluation, report) of a "
                "pipeline config, re-running only what changed.")
    p.add_argument("config", help="pipeline YAML")
    p.add_argument("--preset", help="size preset (default: the pipeline's own)")
    p.add_argument("--workdir", help="where stages write (default: the pipeline's own)")
    p.set_defaults(handler=cmd_pipeline)

    p = command("plan", "per-device memory of a config's fused step, and whether it fits",
                "Compile the config's fused step from abstract arrays (no weight is loaded or "
                "allocated, nothing runs) on its mesh and print per device: student params, "
                "optimizer state, each teacher, the batch and XLA's temporaries (activations), "
                "and whether the peak fits --device-memory.")
    p.add_argument("config", help="experiment YAML (teachers' run:/hf: configs are read, not "
                                  "their weights)")
    _add_set(p)
    p.add_argument("--device-memory", metavar="BYTES",
                   help="memory of one device, e.g. 80GiB, 141GB (default: no fit verdict)")
    p.add_argument("--fake-devices", type=int, metavar="N",
                   help="plan on N fake CPU devices (e.g. 8, with --set mesh.shape=[1,8,1])")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.epilog = ("examples:\n"
                "  jaxdistill plan configs/bench/linkedin.yaml --device-memory 80GiB\n"
                "  jaxdistill plan configs/bench/linkedin.yaml --fake-devices 8 "
                "--set mesh.shape=[1,8,1]")
    p.set_defaults(handler=cmd_plan)
    return parser


# ----------------------------------------------------------------------------- entry point


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "your input is wrong" (the library's own are checked only when
    their modules were imported, so this never imports jax)."""
    types: list[type[BaseException]] = [UserError, ValueError, KeyError, FileNotFoundError,
                                        FileExistsError, NotADirectoryError, IsADirectoryError]
    for module_name, attr in (("jaxdistill.checkpoint", "CheckpointError"),
                              ("jaxdistill.train", "TeacherMismatchError")):
        module = sys.modules.get(module_name)
        if module is not None and isinstance(getattr(module, attr, None), type):
            types.append(getattr(module, attr))
    return tuple(types)


def _message(error: BaseException) -> str:
    if isinstance(error, KeyError) and len(error.args) == 1:
        return str(error.args[0])
    return str(error) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable = args.handler
    _RESULT_STREAM[0] = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            handler(args)
    except _user_error_types() as error:
        if args.debug:
            traceback.print_exc()
        print(f"jaxdistill {args.command}: error: {_message(error)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        _RESULT_STREAM[0] = None
    return 0


if __name__ == "__main__":
    sys.exit(main())

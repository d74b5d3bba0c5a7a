"""The `jaxdistill` command line: train, distil, evaluate, cache teachers, export, inspect.

Longer than ~400 lines because most of it is the parser's help texts and examples.

Each subcommand is a thin wrapper over a library call. jax, grain and transformers are imported
inside the subcommands, so `jaxdistill --help` answers at once. A user error (a bad config,
record, path or checkpoint) exits with status 2 and a one-paragraph message; `--debug` adds the
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import json
import math
import os
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM with its state saved; schedulers retry
RUNS_DIR = "runs"


class UserError(Exception):
    """A problem with what the user asked for; its message is shown as is, without traceback."""


# ----------------------------------------------------------------------------- helpers


def _load_config(path: str, overrides: Sequence[str], *, allow_pickle: bool = False):
    """The experiment; `allow_pickle` (--allow-pickle) sets `allow_pickle: true` on the model
    and on every teacher, so pickle weight files of hf: sources load."""
    from jaxdistill.config import load_config

    cfg = load_config(path, overrides)
    if not allow_pickle:
        return cfg
    trusted = ["model.allow_pickle=true",
               *(f"teachers.{name}.allow_pickle=true" for name in cfg.teachers)]
    return load_config(path, [*overrides, *trusted])


def _add_allow_pickle(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load pickle weight files (pytorch_model.bin) of hf: sources; "
                             "unpickling can run code, so only for checkpoints you trust "
                             "(= model.allow_pickle and teachers.NAME.allow_pickle)")


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


def _run_log(run_dir: Path):
    """Library logging into RUN_DIR/log.txt (not when the run does not exist: no directory is
    made for a command that is about to say so)."""
    from jaxdistill import logs

    return logs.to_file(run_dir / logs.RUN_LOG) if run_dir.is_dir() else contextlib.nullcontext()


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
    cfg = _load_config(args.config, args.set, allow_pickle=args.allow_pickle)
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
    if args.from_step is not None and (args.from_step < 1 or args.no_resume):
        raise UserError(f"--from-step {args.from_step}: expected the positive step of a committed "
                        "checkpoint to resume from (and no --no-resume)")
    result = train.run(cfg, _run_dir(cfg, args.run_dir), resume=not args.no_resume,
                       force_teachers=args.force_teachers, force_config=args.force_config,
                       from_step=args.from_step)
    _print_json({"run_dir": result.run_dir, "step": result.step, "preempted": result.preempted,
                 "metrics": result.metrics, "eval_metrics": result.eval_metrics,
                 "checkpoint_dir": result.checkpoint_dir})
    return EXIT_PREEMPTED if result.preempted else 0


def cmd_eval(args) -> None:
    cfg, run_dir = _config_and_run_dir(args.target, args.set, args.run_dir)
    split = args.split or cfg.data.eval_split
    if not split:
        raise UserError("no split to evaluate: the config has data.eval_split: null; pass --split")
    if args.max_batches is not None and args.max_batches < 1:
        raise UserError(f"--max-batches must be a positive number of batches, found "
                        f"{args.max_batches}")
    from jaxdistill import runs

    with _run_log(run_dir):
        result = {"run_dir": os.fspath(run_dir), "split": split,
                  **runs.evaluate_run(cfg, run_dir, split, max_batches=args.max_batches)}
    out = Path(args.out) if args.out else run_dir / runs.EVAL_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_jsonable(result), indent=2) + "\n")
    _emit(_metrics_table(result["terms"], result["metrics"]))
    _emit(f"written: {out}")


def _metrics_table(terms: Mapping[str, float], metrics: Mapping[str, Any]) -> str:
    """Scalar results as aligned `name  value` lines (matrices live in the JSON file)."""
    lines = []
    for key, value in [*terms.items(), *metrics.items()]:
        if isinstance(value, int | float):
            lines.append(f"  {key:<48} {value:.4f}" if isinstance(value, float)
                         else f"  {key:<48} {value}")
    return "\n".join(lines) if lines else "  (no metrics: no head has labels or a teacher)"


def cmd_predict(args) -> None:
    cfg, run_dir = _config_and_run_dir(args.run_dir, args.set, None)
    from jaxdistill import runs

    with _run_log(run_dir):
        rows = runs.predict_run(cfg, run_dir, data=args.data, split=args.split)
    out = runs.write_rows(rows, args.out)
    _print_json({"run_dir": run_dir, "rows": len(rows), "out": out})


def cmd_report(args) -> None:
    from jaxdistill import report

    run_dirs = [_existing_dir(d, "run") for d in args.run_dirs]
    out = Path(args.out) if args.out else run_dirs[0]
    path = report.write_run_report(run_dirs, out)
    _print_json({"report": path, "runs": run_dirs})


def cmd_cache_teacher(args) -> None:
    from jaxdistill import cache, logs

    cfg = _load_config(args.config, args.set, allow_pickle=args.allow_pickle)
    outputs = args.outputs.split(",") if args.outputs else None
    with logs.to_file(logs.beside(args.out), capture_output=True):
        report = cache.cache_teacher(cfg, args.teacher, args.out, outputs=outputs,
                                     overwrite=args.overwrite, top_k=args.top_k,
                                     temperature=args.temperature,
                                     logprob_dtype=args.logprob_dtype)
    _print_json(report)


def cmd_export(args) -> None:
    run_dir = _existing_dir(args.run_dir, "run")
    checkpoint = _module("jaxdistill.checkpoint", "checkpoints (jaxdistill.checkpoint)")
    hf = _module("jaxdistill.models.hf", "HF export (jaxdistill.models.hf)")
    from jaxdistill.config import load_config

    cfg = load_config(run_dir / "config.yaml")
    # A model fine-tuned from an HF checkpoint keeps that checkpoint's config fields.
    source = cfg.model.init if cfg.model.init.kind == "hf" else None
    with _run_log(run_dir), tempfile.TemporaryDirectory() as tmp:
        model_cfg, params = checkpoint.load_params(run_dir)
        tokenizer_dir = _tokenizer_dir(cfg.data.tokenizer, tmp)
        out = hf.export_hf(model_cfg, params, args.out, tokenizer_dir=tokenizer_dir,
                           dtype=args.dtype, source_dir=source.path if source else None)
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

    named = [s for s in args.split or () if "=" in s]
    if named:
        if len(named) != len(args.split) or args.input or args.split_fractions:
            raise UserError("--split NAME=FILE gives each split its own file: use it for every "
                            "split, with no positional INPUT and no --split-fractions")
        inputs = dict(s.split("=", 1) for s in named)
        if len(inputs) != len(named) or not all(k and v for k, v in inputs.items()):
            raise UserError(f"--split: expected distinct NAME=FILE pairs, got {named}")
        split = "train"
    else:
        if not args.input:
            raise UserError("no input: give INPUT (one file) or --split NAME=FILE per split")
        if args.split and (len(args.split) > 1 or args.split_fractions):
            raise UserError("with one INPUT, give one --split NAME, or --split-fractions "
                            "(which names the splits train, validation, test)")
        inputs, split = args.input, (args.split or ["train"])[0]
    from jaxdistill import logs

    with logs.to_file(logs.beside(args.out), capture_output=True):
        report = prepare(inputs, args.kind, args.out, split=split,
                         split_fractions=args.split_fractions, seed=args.seed,
                         skip_malformed=args.skip_malformed, overwrite=args.overwrite,
                         tokenizers=args.tokenizer, max_len=args.max_len)
    _print_json(report.to_json())


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
        from jaxdistill.config import read_yaml

        chat = read_yaml(args.config).get("kind") == "chat"  # the chat recipe
        module = importlib.import_module("jaxdistill.chat_pipeline" if chat
                                         else "jaxdistill.pipeline")
    except ModuleNotFoundError as error:
        if error.name != "jaxdistill.pipeline":
            raise
        raise UserError("`jaxdistill pipeline` is not available yet (jaxdistill.pipeline is not "
                        "installed); run the stages with train / distill / eval / export") from None
    options = {k: v for k, v in (("preset", args.preset), ("workdir", args.workdir)) if v}
    if args.ablations:
        if chat:
            raise UserError(f"{args.config}: --ablations runs the job-search pipeline's "
                            "ablations: section; the chat pipeline has none")
        module = importlib.import_module("jaxdistill.ablations")
        options["seeds"] = args.seeds
    elif args.seeds is not None:
        raise UserError("--seeds N is the number of seeds of --ablations; pass --ablations")
    code = module.main(args.config, **options)
    if code:
        raise SystemExit(code)


# ----------------------------------------------------------------------------- parser

_EPILOGS = {
    "main": """examples: (data: `python scripts/make_example_data.py`, then `data prepare`)
  jaxdistill data prepare --kind listwise --out data/examples/job_search \\
      --split train=data/examples/train.jsonl --split validation=data/examples/validation.jsonl
  jaxdistill train configs/examples/relevance_teacher.yaml
  jaxdistill train configs/examples/engagement_teacher.yaml
  jaxdistill distill configs/examples/student.yaml --set trainer.steps=200
  jaxdistill eval runs/student
  jaxdistill predict runs/student --data data/examples/new_records.jsonl --out scores.jsonl
  jaxdistill report runs/student
  jaxdistill export runs/student --out exports/student

Run `jaxdistill COMMAND --help` for each command's options.""",
    "train": """examples:
  jaxdistill train configs/examples/relevance_teacher.yaml
  jaxdistill train configs/examples/engagement_teacher.yaml --set trainer.steps=500 \\
      --run-dir runs/engagement_v2

The run directory (default runs/<name>) receives config.yaml, run.json, metrics.jsonl, log.txt
(library logging) and checkpoints/. An existing run resumes from its latest checkpoint unless
--no-resume.""",
    "distill": """examples:
  jaxdistill distill configs/examples/student.yaml
  jaxdistill distill configs/examples/student.yaml --set objective.0.weight=0.5

Each teacher's term is logged under loss/<term name> in metrics.jsonl. Each teacher reads its
own tokenizer's ids (a run records its tokenizer; an hf: directory holds one). A resumed run
refuses teachers that changed since its checkpoint unless --force-teachers.""",
    "eval": """examples:
  jaxdistill eval runs/student
  jaxdistill eval configs/examples/student.yaml --split validation --out student_validation.json

Prints (and writes to RUN_DIR/eval.json unless --out) the mean of every objective term over
the split's full batches and each head's metrics by its type, over every record: classifier
accuracy, macro-F1, log loss, AUROC, ECE; actions AUROC, average precision, ECE; ranking
NDCG@10, poor-match@10; agreement of every distilled head with its teacher.""",
    "predict": """examples:
  jaxdistill predict runs/student --data data/examples/new_records.jsonl --out scores.jsonl
  jaxdistill predict runs/student --data data/examples/job_search --split validation \\
      --out scores.parquet

One row per record (per candidate for listwise data) with the record's id, each head's raw
outputs and probabilities, calibrated where the run has calibration.json.""",
    "report": """examples:
  jaxdistill report runs/student
  jaxdistill report runs/student runs/relevance_teacher --out reports/student

Writes report.md with PNG plots beside it: loss per objective term and eval metrics over
steps, reliability diagrams of calibrated heads, confusion matrices of classifiers, and a
side-by-side table when several runs are given.""",
    "cache-teacher": """examples:
  jaxdistill cache-teacher configs/examples/student.yaml --teacher relevance \\
      --out data/examples/job_search_relevance

Then use it: teachers.relevance.source: offline:data/examples/job_search_relevance and
data.path: data/examples/job_search_relevance (outputs travel with the records). Cache a
second teacher by running cache-teacher again on a config whose data.path is the first cache.

A chat (lm) teacher is cached as its top-k token distributions:
  jaxdistill cache-teacher configs/chat/student.yaml --teacher accuracy_teacher --top-k 32 \\
      --out data/chat_accuracy_top32
and read by a term `loss: sparse_token_kl` (same temperature) with the teacher's source
offline:DIR; a live teacher's token_kl term can sit beside it. Under several JAX processes
each writes its share of the records and process 0 joins the shards.""",
    "export": """examples:
  jaxdistill export runs/student --out exports/student
  python -c "import transformers; transformers.AutoModel.from_pretrained('exports/student')"

Task heads travel in jaxdistill_heads.json / jaxdistill_heads.safetensors beside the HF files.""",
    "data": """examples: (the input files: `python scripts/make_example_data.py`)
  jaxdistill data prepare --kind listwise --out data/examples/job_search \\
      --split train=data/examples/train.jsonl --split validation=data/examples/validation.jsonl
  jaxdistill data prepare data/examples/mail.jsonl --kind text --out data/examples/mail \\
      --split-fractions 0.8,0.1,0.1
  jaxdistill data prepare data/examples/mail.jsonl --kind text --out data/examples/mail_ids \\
      --split-fractions 0.8,0.1,0.1 --tokenizer builtin:wordpiece --max-len 32

Progress and library logging go to OUT.log (a file beside --out); the console shows the result.""",
    "inspect": """examples:
  jaxdistill inspect config configs/examples/student.yaml --set trainer.steps=10
  jaxdistill inspect checkpoint runs/student
  jaxdistill inspect data data/examples/job_search
  jaxdistill inspect hf exports/student""",
    "pipeline": """examples:
  jaxdistill pipeline configs/job_search/pipeline.yaml --preset laptop
  jaxdistill pipeline configs/job_search/pipeline.yaml --preset full --workdir runs/full
  jaxdistill pipeline configs/job_search/pipeline.yaml --preset laptop --ablations --seeds 3

Presets: laptop (CPU, about 10 minutes) and full (realistic sizes, for a GPU or TPU).""",
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
        description += (
            f" Exit status: 0 when the run reached trainer.steps; {EXIT_PREEMPTED} (EX_TEMPFAIL) "
            "when SIGTERM/preemption stopped it with its state saved (rerun to resume); "
            f"{EXIT_USER_ERROR} on a user error (bad config or data, a run directory in use, an "
            "unreadable checkpoint, a full disk, a run whose updates are all non-finite).")
        p = command(name, help_text, description)
        p.add_argument("config", help="experiment YAML")
        _add_set(p)
        p.add_argument("--run-dir", help="run directory (default: runs/<config name>)")
        p.add_argument("--no-resume", action="store_true",
                       help="start afresh even if the run directory has checkpoints")
        p.add_argument("--force-teachers", action="store_true",
                       help="resume even though the teachers differ from the checkpoint's")
        _add_allow_pickle(p)
        p.add_argument("--force-config", action="store_true",
                       help="resume even though the config differs from the checkpoint's in "
                            "more than run length and cadence (trainer.steps, log/eval/"
                            "checkpoint intervals)")
        p.add_argument("--from-step", type=int, metavar="N",
                       help="resume from checkpoint step N instead of the newest one that "
                            "restores (later steps are set aside)")
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
    p.add_argument("--out", help="JSON file to write (default: RUN_DIR/eval.json)")
    p.set_defaults(handler=cmd_eval)

    p = command("predict", "score records with a run's model",
                "Score the records of a dataset split or a JSONL/Parquet file with a run's "
                "student; writes one row per record (or candidate) as JSONL or Parquet.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory")
    _add_set(p)
    p.add_argument("--data", help="a dataset directory or a .jsonl/.parquet file of records "
                                  "(default: the run's data.path)")
    p.add_argument("--split", help="with a dataset directory: the split (default: the run's "
                                   "data.eval_split)")
    p.add_argument("--out", required=True, help="output .jsonl or .parquet file")
    p.set_defaults(handler=cmd_predict)

    p = command("report", "write a report (markdown + plots) of one or more runs",
                "Write report.md with PNG plots of runs: training curves per objective term, "
                "eval metrics over steps, reliability diagrams, confusion matrices.")
    p.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="run directories")
    p.add_argument("--out", help="output directory (default: the first run directory)")
    p.set_defaults(handler=cmd_report)

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
    p.add_argument("--top-k", type=int, metavar="K",
                   help="an lm teacher on chat data: store each response token's top-K "
                        "ids, log-probs and tail mass (read by a sparse_token_kl term)")
    p.add_argument("--temperature", type=float,
                   help="with --top-k: the softening temperature of the stored distribution "
                        "(default: the config's token terms' on this teacher, else 1.0)")
    p.add_argument("--logprob-dtype", choices=("float16", "float32"), default="float16",
                   help="with --top-k: stored log-prob precision (default: float16)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _add_allow_pickle(p)
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
    from jaxdistill.data.records import KINDS  # plain Python: no jax at parse time

    p = command("prepare", "JSONL/Parquet/CSV records -> splits of a validated dataset",
                "Validate JSONL, Parquet or CSV records against a record kind's schema (see "
                "docs/configs.md) and write them as splits of an array_record dataset. Splits "
                "already in --out and not written now are kept.", "data", sub=data_commands)
    p.add_argument("input", nargs="?",
                   help=".jsonl, .parquet or .csv file (or give --split NAME=FILE instead)")
    p.add_argument("--kind", required=True, choices=KINDS, help="record kind")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--split", action="append", metavar="NAME[=FILE]",
                   help="NAME=FILE: write FILE as split NAME (repeatable); NAME alone: the "
                        "split INPUT is written as (default: train)")
    p.add_argument("--split-fractions", metavar="F1,F2[,F3]",
                   help="cut INPUT into train,validation[,test] by these fractions (seeded "
                        "shuffle, exact sizes), e.g. 0.8,0.1,0.1")
    p.add_argument("--seed", type=int, default=0, help="seed of --split-fractions (default: 0)")
    p.add_argument("--skip-malformed", action="store_true",
                   help="skip and count records that break the schema instead of failing")
    p.add_argument("--overwrite", action="store_true",
                   help="rewrite splits that --out already has (its other splits are kept)")
    p.add_argument("--tokenizer", action="append", default=[], metavar="DIR|builtin:NAME",
                   help="store each record's token ids under this tokenizer (repeatable; "
                        "needs --max-len); training with it at that max_len reads them "
                        "instead of tokenising")
    p.add_argument("--max-len", type=int, help="length the stored token ids are truncated to "
                                               "(= data.max_len of the configs that read them)")
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
    p.add_argument("--ablations", action="store_true",
                   help="run the pipeline file's ablations: section instead (each study's "
                        "variants over --seeds seeds, sharing cached stages) and write "
                        "ablations.md/.json (mean ± std per variant, baseline marked) in the "
                        "workdir; exits 1 if any run failed")
    p.add_argument("--seeds", type=int, metavar="N",
                   help="seeds per ablation variant (default: the section's, 3)")
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
                              ("jaxdistill.loader", "TeacherMismatchError"),
                              ("jaxdistill.runlock", "RunLockedError"),
                              ("jaxdistill.train", "DivergedError"),
                              ("jaxdistill.train", "RunStorageError")):
        module = sys.modules.get(module_name)
        if module is not None and isinstance(getattr(module, attr, None), type):
            types.append(getattr(module, attr))
    return tuple(types)


def _storage_error(error: BaseException) -> bool:
    """An OSError that says the disk or its permissions refused a write (names its path)."""
    return isinstance(error, PermissionError) or (
        isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS,
                                                       errno.EACCES))


def _message(error: BaseException) -> str:
    if isinstance(error, KeyError) and len(error.args) == 1:
        return str(error.args[0])
    if isinstance(error, OSError) and error.strerror and (
            error.filename is not None or type(error) is not OSError):
        path = f"{error.filename}: " if error.filename is not None else ""
        return f"{path}{error.strerror}"
    return str(error) or type(error).__name__


class _NoTraceback:
    """A logging filter that keeps a record's message but drops its traceback."""

    def filter(self, record) -> bool:
        if record.exc_info or record.exc_text:
            record.exc_info, record.exc_text = None, None
        return True


_QUIET_LOGGERS = ("absl", "orbax", "asyncio")  # orbax logs background failures with tracebacks


def _quiet_threads() -> Callable[[], None]:
    """Without --debug, a failure in a background thread (orbax's async savers on a full disk)
    prints one line, not a traceback: the main thread reports the failure itself. Returns the
    function that undoes it."""
    import logging

    previous_hook = threading.excepthook

    def hook(args):
        if args.exc_type is SystemExit:
            return
        print(f"jaxdistill: background thread {args.thread.name if args.thread else '?'}: "
              f"{args.exc_type.__name__}: {args.exc_value}", file=sys.stderr)

    threading.excepthook = hook
    quiet = _NoTraceback()
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).addFilter(quiet)

    def undo():
        threading.excepthook = previous_hook
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).removeFilter(quiet)

    return undo


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable = args.handler
    _RESULT_STREAM[0] = sys.stdout
    undo_quiet = (lambda: None) if args.debug else _quiet_threads()
    from jaxdistill import logs

    try:
        with logs.console(), contextlib.redirect_stdout(sys.stderr):
            code = handler(args)
    except Exception as error:
        if not isinstance(error, _user_error_types()) and not _storage_error(error):
            raise
        if args.debug:
            traceback.print_exc()
        print(f"jaxdistill {args.command}: error: {_message(error)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        _RESULT_STREAM[0] = None
        undo_quiet()
    return code or 0


if __name__ == "__main__":
    sys.exit(main())

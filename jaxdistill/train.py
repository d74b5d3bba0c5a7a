"""The training loop: the fused step at its cadences (log, eval, checkpoint), resume, preemption.

Longer than ~400 lines because the loop and what keeps a run safe around it (resume checks, the
run lock, storage errors) belong together.

`run(cfg, run_dir)` is the whole of `jaxdistill train` / `distill`: a run with no teachers is
plain training on labels. Models, batches and the evaluator come from `jaxdistill.runs.setup`
(`loader` for sources, teachers and warm starts; `data.batches`; `evaluator`); this module only
drives them.

The loop never waits on the devices except at its cadences: step N's metrics are fetched once
step N+1 is dispatched, and the next batch is read and placed on the devices while a step runs.
Inside the step call host<->device transfers are errors (`jax.transfer_guard("disallow")`), so
a stray numpy value in the batch fails loudly instead of silently syncing. The step is compiled
ahead of the loop from the shardings the model declares, so a fresh and a resumed run run the
same program, and the progress bar's rate and ETA count only training steps (compilation,
evaluation and checkpoint saves are left out). With `on_policy`, the steps its (seed, step)
draw picks first replace their batch by the student's own responses (`jaxdistill.on_policy`:
a second program, compiled ahead with the step, same batch shapes and shardings); the logs
carry `on_policy/fraction` (of steps so far) and `on_policy/sampled_tokens` (mean per row).

Resume continues exactly: student state and the grain iterator's position come from the
latest complete checkpoint, and the run refuses to continue with teachers that differ from
the checkpoint's manifest (names, sources, content hashes) unless `force_teachers`, or with a
config that differs from the checkpoint's in anything but run length and cadence
(`RESUMABLE_KEYS`) unless `force_config`. A step that fails to restore is named and set aside,
and the run resumes from the newest step that does (`from_step` picks one). `config.yaml` and
`run.json` are rewritten only once the restore succeeded, and `metrics.jsonl` drops the lines
past the restored step, so each step is logged once.

Failures end the run loudly: one process per run directory (`runlock`); a run whose updates are
all skipped (non-finite loss or gradient) for `trainer.max_skipped_updates` steps in a row stops
with `DivergedError`; a write that fails (full disk, no permission) is a `RunStorageError`
naming the path and the last committed checkpoint. A SIGTERM stops at the next step boundary
with the state saved and `RunResult.preempted` set (the CLI exits `EXIT_PREEMPTED`, 75).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import errno
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxdistill import config as config_lib
from jaxdistill import evaluator as evaluator_lib
from jaxdistill import loader, logs, parallel, runs
from jaxdistill.checkpoint import CHECKPOINT_SUBDIR, CONFIG_FILE, CheckpointError, Checkpointer
from jaxdistill.data.pipeline import iterator_state, restore_iterator
from jaxdistill.distill.step import abstract_state, compile_step, init_sharded_state
from jaxdistill.loader import TeacherMismatchError
from jaxdistill.metrics import MetricWriter, progress_bar, truncate_metrics
from jaxdistill.on_policy import is_on_policy, on_policy_steps
from jaxdistill.runlock import RunLock

log = logging.getLogger(__name__)

RUN_FILE = "run.json"

# Keys a resume may change: how long the run is and how often it logs, evaluates and saves.
# Everything else (model, data, objective, optimizer, including `optimizer.total_steps`, which
# reshapes the learning-rate schedule the checkpoint already followed) must match the checkpoint.
RESUMABLE_KEYS = frozenset({
    "trainer.steps", "trainer.log_every", "trainer.eval_every", "trainer.eval_batches",
    "trainer.eval_on_start", "trainer.progress", "trainer.max_skipped_updates", "checkpoint.every",
    "checkpoint.max_to_keep", "checkpoint.async_save",
})
RESUMABLE_SECTIONS = ("logging",)  # where metrics go (JSONL, TensorBoard, wandb) never matters


class ConfigMismatchError(ValueError):
    """A resume whose config differs from the checkpoint's; the message lists each key."""


class DivergedError(RuntimeError):
    """Every update of `trainer.max_skipped_updates` steps in a row was skipped (non-finite)."""


class RunStorageError(OSError):
    """A run's file could not be written (full disk, no permission); the message names the
    path and what the run had saved."""


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    step: int
    metrics: dict[str, float]  # the last logged train metrics
    eval_metrics: dict[str, float]  # the last eval
    checkpoint_dir: Path
    preempted: bool = False  # stopped early by SIGTERM / a preemption notice, state saved


def write_run_files(cfg: config_lib.Experiment, run_dir: Path, *, resumed_from: int | None):
    """`config.yaml` (the resolved config) and `run.json` (policy hash, provenance)."""
    policy_hash = None
    if cfg.policy is not None:
        if not Path(cfg.policy).is_file():
            raise FileNotFoundError(f"policy: document {cfg.policy} not found")
        policy_hash = config_lib.file_hash(cfg.policy)
    if jax.process_index() != 0:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(config_lib.resolved_yaml(cfg))
    info = {
        "name": cfg.name,
        "policy": cfg.policy,
        "policy_sha256": policy_hash,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "resumed_from_step": resumed_from,
        "jax": jax.__version__,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
    }
    if cfg.on_policy is not None:
        info["on_policy"] = cfg.on_policy.model_dump(mode="json")
    (run_dir / RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")


def run(cfg: config_lib.Experiment, run_dir: str | Path, *, resume: bool = True,
        force_teachers: bool = False, force_config: bool = False, from_step: int | None = None,
        report: bool = True) -> RunResult:
    """Trains `cfg` in `run_dir` until `trainer.steps`, or until SIGTERM / preemption; then
    writes `eval.json` and `report.md` (with `report`).

    `from_step`: resume from this checkpoint step instead of the newest one that restores
    (the steps after it are set aside)."""
    run_dir = Path(run_dir).absolute()
    # Everything that can refuse the config runs before anything is written to run_dir.
    s = runs.setup(cfg)
    s.check_labels()
    checkpointer = None
    try:
        with RunLock(run_dir, active=jax.process_index() == 0):
            log_file = logs.RUN_LOG if jax.process_index() == 0 else \
                f"log.{jax.process_index()}.txt"
            with logs.to_file(run_dir / log_file):
                checkpointer = Checkpointer.from_config(
                    run_dir / CHECKPOINT_SUBDIR, cfg.checkpoint,
                    config_yaml=config_lib.resolved_yaml(cfg), manifest=s.teachers.manifest)
                try:
                    result = _run(s, run_dir, checkpointer, resume=resume,
                                  force_teachers=force_teachers, force_config=force_config,
                                  from_step=from_step)
                finally:
                    checkpointer.close()
                if report and not result.preempted and jax.process_index() == 0:
                    from jaxdistill import report as report_lib

                    report_lib.write_run_report([run_dir], run_dir)
    except (OSError, ValueError) as err:
        code, path = _storage_failure(err)
        if code is None or isinstance(err, RunStorageError):
            raise
        raise _storage_error(code, path or run_dir, checkpointer) from err
    return result


_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _storage_failure(err: BaseException) -> tuple[int | None, str | None]:
    """(errno, path) when `err` says a write was refused by the disk or its permissions:
    an OSError, or the ValueError orbax/tensorstore raise (`... [os_error_code='28']`)."""
    if isinstance(err, OSError):
        return (err.errno, err.filename) if err.errno in _STORAGE_ERRNOS else (None, None)
    text = str(err)
    code = re.search(r"os_error_code='(\d+)'", text)
    if code is None or int(code.group(1)) not in _STORAGE_ERRNOS:
        return None, None
    path = re.search(r'Failed (?:writing|to open|to create)[^"]*"([^"]+)"', text) or re.search(
        r'local file "([^"]+)"', text)
    return int(code.group(1)), path.group(1) if path else None


def _storage_error(code: int, path, checkpointer: Checkpointer | None) -> RunStorageError:
    saved = None
    if checkpointer is not None:
        try:
            saved = checkpointer.latest_step()
        except Exception:  # noqa: BLE001 (the manager may be as broken as the disk)
            saved = None
    what = (f"the last committed checkpoint is step {saved} in {checkpointer.directory}"
            if saved is not None else "no checkpoint was committed")
    return RunStorageError(code, f"{path}: cannot write ({os.strerror(code)}); {what}. Free "
                                 "space or fix permissions, then rerun to resume")


def config_differences(saved_yaml: str, current_yaml: str, *,
                       ignore: tuple[str, ...] = ()) -> list[str]:
    """`key: checkpoint X, now Y` for each resolved-config key that differs (list items by
    index, `objective.1.name`), but those in `RESUMABLE_KEYS` and under an `ignore` prefix. Two
    paths to files of the same content (a policy document copied elsewhere) are the same
    input."""
    import yaml

    def flat(value, prefix=""):
        if isinstance(value, dict | list) and value:
            out = {}
            for k, v in (value.items() if isinstance(value, dict) else enumerate(value)):
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: value}

    saved = flat(yaml.safe_load(saved_yaml) or {})
    current = flat(yaml.safe_load(current_yaml) or {})
    missing = object()
    lines = []
    for key in sorted(saved.keys() | current.keys()):
        if key in RESUMABLE_KEYS or any(key == p or key.startswith(f"{p}.")
                                        for p in (*RESUMABLE_SECTIONS, *ignore)):
            continue
        a, b = saved.get(key, missing), current.get(key, missing)
        if a != b and not _same_file(a, b):
            shown = lambda v: "(absent)" if v is missing else json.dumps(v)  # noqa: E731
            lines.append(f"{key}: checkpoint {shown(a)}, now {shown(b)}")
    return lines


def _same_file(a: Any, b: Any) -> bool:
    if not (isinstance(a, str) and isinstance(b, str)):
        return False
    try:
        return Path(a).is_file() and Path(b).is_file() and (
            config_lib.file_hash(a) == config_lib.file_hash(b))
    except OSError:
        return False


def _check_resumable(checkpointer: Checkpointer, step: int, meta: dict[str, Any], *,
                     force_teachers: bool, force_config: bool) -> None:
    where = f"{checkpointer.directory}/{step}"
    differences = loader.manifest_differences(meta["manifest"], checkpointer.manifest)
    if differences and not force_teachers:
        raise TeacherMismatchError(
            f"{where}: the checkpoint was trained with other teachers; refusing to resume (pass "
            "force_teachers / --force-teachers to continue anyway):\n  "
            + "\n  ".join(differences))
    for line in differences:
        log.warning("resuming with changed teachers (forced): %s", line)
    saved_yaml = meta.get("config_yaml") or ""
    # Forcing other teachers (checked by their manifest above) lets their config through, and
    # the objective terms that read them.
    ignore = ("teachers", "objective") if force_teachers else ()
    changed = (config_differences(saved_yaml, checkpointer.config_yaml, ignore=ignore)
               if saved_yaml else [])
    if changed and not force_config:
        raise ConfigMismatchError(
            f"{where}: the checkpoint was trained with another config; refusing to resume (only "
            f"{', '.join(sorted(RESUMABLE_KEYS))} and logging.* may change; pass force_config / "
            "--force-config to continue anyway):\n  " + "\n  ".join(changed))
    for line in changed:
        log.warning("resuming with a changed config (forced): %s", line)


def _restore(checkpointer: Checkpointer, targets, *, resume: bool, force_teachers: bool,
             force_config: bool, from_step: int | None):
    """(step, state, iterator state) of the checkpoint to resume from, or None for a fresh
    run: the newest step that restores (those that fail are named), or `from_step`. The steps
    after it are set aside (they would block the new saves at those steps); when none restores,
    nothing is moved."""
    steps = checkpointer.all_steps()
    if steps and not resume:
        raise FileExistsError(f"{checkpointer.directory} already holds checkpoints (latest step "
                              f"{steps[-1]}); resume, or start the run in a fresh directory")
    if from_step is not None:
        if from_step not in steps:
            raise CheckpointError(f"{checkpointer.directory}: --from-step {from_step}: no "
                                  f"committed checkpoint at that step; committed steps: {steps}")
        candidates = [from_step]
    else:
        candidates = steps[::-1]
    failures: dict[int, str] = {}
    for step in candidates:
        try:
            meta = checkpointer.read_meta(step)
            _check_resumable(checkpointer, step, meta, force_teachers=force_teachers,
                             force_config=force_config)
            state, saved_iterator, _ = checkpointer.restore(step, target_state_shardings=targets)
        except CheckpointError as err:
            if from_step is not None:
                raise
            failures[step] = str(err)
            continue
        if failures:
            log.warning("resuming from step %d, the newest checkpoint that restores; skipped:\n  "
                        "%s", step, "\n  ".join(failures.values()))
        if jax.process_index() == 0:
            for later in (s for s in checkpointer.all_steps() if s > step):
                checkpointer.set_aside(later, f"failed to restore: {failures[later]}"
                                       if later in failures else
                                       f"superseded: the run resumed from step {step}")
        return step, state, saved_iterator
    if failures:
        raise CheckpointError(f"{checkpointer.directory}: no checkpoint restores (each error "
                              "below; repair or remove those steps, or use a fresh --run-dir):"
                              "\n  "
                              + "\n  ".join(failures.values()))
    return None


def _run(s: runs.Setup, run_dir: Path, checkpointer: Checkpointer, *, resume: bool,
         force_teachers: bool, force_config: bool = False, from_step: int | None = None
         ) -> RunResult:
    cfg, mesh, rules, distiller = s.cfg, s.mesh, s.rules, s.distiller
    trainer = cfg.trainer
    teacher_params = s.teachers.params
    sampler = s.sampler()

    train_iter = iter(s.batches(cfg.data.train_split, train=True))
    restored = _restore(checkpointer, abstract_state(distiller, mesh, rules), resume=resume,
                        force_teachers=force_teachers, force_config=force_config,
                        from_step=from_step)
    if restored is not None:
        start, state, saved_iterator = restored
        restore_iterator(train_iter, saved_iterator)
        log.info("resumed from %s at step %d", checkpointer.directory, start)
        if jax.process_index() == 0:
            truncate_metrics(run_dir, start)
    else:
        start = None
        params = loader.initial_params(cfg, distiller.student, mesh, rules)
        state = init_sharded_state(distiller, cfg.seed, mesh, rules, params)
    write_run_files(cfg, run_dir, resumed_from=start)
    step = start or 0

    eval_batches = None
    if cfg.data.eval_split is not None:
        try:
            eval_batches = s.batches(cfg.data.eval_split, train=False)
        except KeyError as err:
            log.warning("no eval: %s", err)
    evaluator = s.evaluator() if eval_batches is not None else None

    writer = MetricWriter(run_dir, jsonl=cfg.logging.jsonl, tensorboard=cfg.logging.tensorboard,
                          wandb=cfg.logging.wandb, project=cfg.logging.wandb_project)
    checkpointer.install_sigterm_handler()
    last_metrics: dict[str, float] = {}
    eval_metrics: dict[str, Any] = {}
    malformed, preempted = 0, False
    pending = None  # (step, device metrics) waiting for the next step's dispatch
    watched = None  # (step, device metrics): every step's, checked for skipped updates
    skipped_before = int(jax.device_get(state["skipped"]))
    streak: list[tuple[int, list[str]]] = []  # consecutive skipped steps and what was non-finite
    bar = None
    # On-policy steps so far and the mean sampled length of each since the last log.
    on_policy_count = on_policy_steps(cfg.seed, step, cfg.on_policy.fraction) if sampler else 0
    sampled_lengths: list[jax.Array] = []

    def on_policy_window(at_step: int) -> tuple[dict[str, float], list[jax.Array]]:
        """The fraction of steps 1..at_step that trained on samples, and the sampled lengths
        (device values, read when logged) of the on-policy steps since the last log."""
        if cfg.on_policy is None:
            return {}, []
        window = list(sampled_lengths)
        sampled_lengths.clear()
        return {"on_policy/fraction": on_policy_count / at_step}, window

    def check_skipped():
        """Ends the run once `trainer.max_skipped_updates` updates in a row were skipped."""
        nonlocal watched, skipped_before
        if watched is None:
            return
        watched_step, metrics = watched
        watched = None
        values = jax.device_get(metrics)
        skipped = int(values["skipped_updates"])
        if skipped == skipped_before:
            streak.clear()
            return
        skipped_before = skipped
        streak.append((watched_step, [k for k, v in values.items()
                                      if (k.startswith("loss/") or k == "grad_norm")
                                      and not math.isfinite(float(v))]))
        if len(streak) >= trainer.max_skipped_updates:
            first, terms = streak[0]
            checkpointer.wait()  # so the message names what is committed
            raise DivergedError(
                f"{run_dir}: the last {len(streak)} updates (steps {first}-{watched_step}) were "
                f"all skipped: non-finite {', '.join(terms) or 'loss or gradient'} from step "
                f"{first} on (trainer.max_skipped_updates = {trainer.max_skipped_updates}); the "
                "run is learning nothing. Lower optimizer.learning_rate or check the data and "
                "model.backbone.vocab_size; the last committed checkpoint is "
                f"{checkpointer.latest_step()}")

    def host_batch():
        nonlocal malformed
        batch = dict(next(train_iter))
        malformed += int(batch.pop("batch_malformed", 0))
        return _to_device(batch, mesh, rules)

    def log_pending():
        nonlocal pending, last_metrics, window_start, window_steps
        if pending is None:
            return
        logged_step, metrics, (on_policy, sampled) = pending
        pending = None
        last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        last_metrics.update(on_policy)
        if sampled:
            last_metrics["on_policy/sampled_tokens"] = float(np.mean(jax.device_get(sampled)))
        now = time.perf_counter()
        last_metrics["steps_per_second"] = window_steps / max(now - window_start, 1e-9)
        last_metrics["flops_per_second"] = total_flops * last_metrics["steps_per_second"]
        if cfg.data.skip_malformed:
            last_metrics["malformed_records"] = malformed
        window_start, window_steps = now, 0
        writer.write(logged_step, last_metrics)
        bar.set_postfix(loss=f"{last_metrics['loss/total']:.4g}", refresh=False)

    @contextlib.contextmanager
    def paused():
        """Time spent here counts neither in the bar's rate nor in steps_per_second."""
        nonlocal window_start
        began = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - began
            window_start += spent
            if not bar.disable:
                bar.start_t += spent
                bar.last_print_t += spent

    def evaluate(at_step: int) -> dict[str, Any]:
        try:
            scores = evaluator.run(state["params"], teacher_params, eval_batches,
                                   max_batches=trainer.eval_batches, step=state["step"])
        except evaluator_lib.EmptySplitError:
            log.warning("eval split %r holds no records", cfg.data.eval_split)
            return {}
        metrics = s.metrics(scores)
        writer.write(at_step, {f"eval/{k}": v for k, v in metrics.items()})
        return metrics

    try:
        device_batch = host_batch() if step < trainer.steps else None
        total_flops = 0.0
        if device_batch is not None:
            step_fn = compile_step(distiller, mesh, rules, state, teacher_params, device_batch
                                   ).lower(state, teacher_params, device_batch).compile()
            total_flops = _record_flops(run_dir, distiller, device_batch)
            sample_fn = sampler.compile(mesh, rules, state["params"], device_batch) \
                if sampler is not None else None
        bar = progress_bar(trainer.steps, initial=step, enabled=trainer.progress)
        window_start, window_steps = time.perf_counter(), 0
        if evaluator is not None and trainer.eval_on_start and step == 0:
            with paused():
                eval_metrics = evaluate(0)
        while step < trainer.steps:
            with jax.transfer_guard("disallow"):
                if sampler is not None and is_on_policy(cfg.seed, step, cfg.on_policy.fraction):
                    device_batch, sampled = sample_fn(state["params"], device_batch,
                                                      state["step"])
                    sampled_lengths.append(sampled)
                    on_policy_count += 1
                state, metrics = step_fn(state, teacher_params, device_batch)
            check_skipped()  # the previous step's, now that this one is dispatched
            watched = (step + 1, metrics)
            step += 1
            window_steps += 1
            saved_iterator = iterator_state(train_iter)  # the position after this step's batch
            stop = checkpointer.should_stop(step)
            if step < trainer.steps and not stop:
                device_batch = host_batch()  # read while the step runs
            log_pending()
            if step % trainer.log_every == 0 or step == trainer.steps:
                pending = (step, metrics, on_policy_window(step))
            bar.update(1)

            evaluated = evaluator is not None and (step % trainer.eval_every == 0
                                                   or step == trainer.steps)
            save = stop or step == trainer.steps or checkpointer.should_save(step)
            if evaluated or save:
                log_pending()
                with paused():
                    if evaluated:
                        eval_metrics = evaluate(step)
                    if save:
                        scored = _scalars(eval_metrics) if evaluated and eval_metrics else None
                        checkpointer.save(step, state, saved_iterator, metrics=scored, force=True)
            if stop:
                preempted = True
                log.warning("stopping at step %d (SIGTERM / preemption); checkpoint saved", step)
                break
        if bar is not None:
            log_pending()
            check_skipped()
    finally:
        if bar is not None:
            bar.close()
        writer.close()
        checkpointer.wait()
    if eval_metrics:
        runs.write_eval(run_dir, step, cfg.data.eval_split, eval_metrics)
    return RunResult(run_dir=run_dir, step=step, metrics=last_metrics,
                     eval_metrics={f"eval/{k}": v for k, v in _scalars(eval_metrics).items()},
                     checkpoint_dir=checkpointer.directory, preempted=preempted)


def _record_flops(run_dir: Path, distiller, batch) -> float:
    """FLOPs of one step split by model (`flops.FORMULA`: teachers' forwards 2·N·tokens, the
    student's 6·N·tokens, attention counted), added to run.json; returns their total."""
    from jaxdistill.flops import step_flops

    ids = batch["input_ids"]
    flops = step_flops(distiller.student, distiller.teachers, int(np.prod(ids.shape[:-1])),
                       int(ids.shape[-1]))
    if jax.process_index() == 0 and (run_dir / RUN_FILE).is_file():
        info = json.loads((run_dir / RUN_FILE).read_text())
        info["flops_per_step"] = flops
        (run_dir / RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return float(flops["total"])


def _to_device(batch, mesh, rules):
    """A training batch onto the devices (a seam the kill tests watch)."""
    return parallel.shard_batch(batch, mesh, rules)


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}

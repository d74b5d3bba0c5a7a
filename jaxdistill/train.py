"""The training loop: the fused step at its cadences (log, eval, checkpoint), resume, preemption.

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
evaluation and checkpoint saves are left out).

Resume continues exactly: student state and the grain iterator's position come from the
latest complete checkpoint, and the run refuses to continue with teachers that differ from
the checkpoint's manifest (names, sources, content hashes) unless `force_teachers`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax

from jaxdistill import config as config_lib
from jaxdistill import evaluator as evaluator_lib
from jaxdistill import loader, logs, parallel, runs
from jaxdistill.checkpoint import CHECKPOINT_SUBDIR, CONFIG_FILE, Checkpointer
from jaxdistill.data.pipeline import iterator_state, restore_iterator
from jaxdistill.distill.step import abstract_state, compile_step, init_sharded_state
from jaxdistill.loader import TeacherMismatchError
from jaxdistill.metrics import MetricWriter, progress_bar

log = logging.getLogger(__name__)

RUN_FILE = "run.json"


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
    (run_dir / RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")


def run(cfg: config_lib.Experiment, run_dir: str | Path, *, resume: bool = True,
        force_teachers: bool = False, report: bool = True) -> RunResult:
    """Trains `cfg` in `run_dir` until `trainer.steps`, or until SIGTERM / preemption; then
    writes `eval.json` and `report.md` (with `report`)."""
    run_dir = Path(run_dir).absolute()
    log_file = logs.RUN_LOG if jax.process_index() == 0 else f"log.{jax.process_index()}.txt"
    with logs.to_file(run_dir / log_file):
        return _logged_run(cfg, run_dir, resume=resume, force_teachers=force_teachers,
                           report=report)


def _logged_run(cfg: config_lib.Experiment, run_dir: Path, *, resume: bool,
                force_teachers: bool, report: bool) -> RunResult:
    s = runs.setup(cfg)
    s.check_labels()
    checkpointer = Checkpointer.from_config(run_dir / CHECKPOINT_SUBDIR, cfg.checkpoint,
                                            config_yaml=config_lib.resolved_yaml(cfg),
                                            manifest=s.teachers.manifest)
    try:
        result = _run(s, run_dir, checkpointer, resume=resume, force_teachers=force_teachers)
    finally:
        checkpointer.close()
    if report and not result.preempted and jax.process_index() == 0:
        from jaxdistill import report as report_lib

        report_lib.write_run_report([run_dir], run_dir)
    return result


def _resume_step(checkpointer: Checkpointer, *, resume: bool, force_teachers: bool) -> int | None:
    start = checkpointer.latest_step()
    if start is not None and not resume:
        raise FileExistsError(f"{checkpointer.directory} already holds checkpoints (latest step "
                              f"{start}); resume, or start the run in a fresh directory")
    if start is not None:
        differences = loader.manifest_differences(checkpointer.read_meta(start)["manifest"],
                                                  checkpointer.manifest)
        if differences and not force_teachers:
            raise TeacherMismatchError(
                f"{checkpointer.directory}/{start}: the checkpoint was trained with other "
                "teachers; refusing to resume (pass force_teachers / --force-teachers to "
                "continue anyway):\n  " + "\n  ".join(differences))
        for line in differences:
            log.warning("resuming with changed teachers (forced): %s", line)
    return start


def _run(s: runs.Setup, run_dir: Path, checkpointer: Checkpointer, *, resume: bool,
         force_teachers: bool) -> RunResult:
    cfg, mesh, rules, distiller = s.cfg, s.mesh, s.rules, s.distiller
    trainer = cfg.trainer
    start = _resume_step(checkpointer, resume=resume, force_teachers=force_teachers)
    write_run_files(cfg, run_dir, resumed_from=start)
    teacher_params = s.teachers.params

    train_iter = iter(s.batches(cfg.data.train_split, train=True))
    if start is not None:
        state, saved_iterator, _ = checkpointer.restore(
            start, target_state_shardings=abstract_state(distiller, mesh, rules))
        restore_iterator(train_iter, saved_iterator)
        log.info("resumed from %s at step %d", checkpointer.directory, start)
    else:
        params = loader.initial_params(cfg, distiller.student, mesh, rules)
        state = init_sharded_state(distiller, cfg.seed, mesh, rules, params)
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
    bar = None

    def host_batch():
        nonlocal malformed
        batch = dict(next(train_iter))
        malformed += int(batch.pop("batch_malformed", 0))
        return _to_device(batch, mesh, rules)

    def log_pending():
        nonlocal pending, last_metrics, window_start, window_steps
        if pending is None:
            return
        logged_step, metrics = pending
        pending = None
        last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        last_metrics["steps_per_second"] = window_steps / max(now - window_start, 1e-9)
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
        if device_batch is not None:
            step_fn = compile_step(distiller, mesh, rules, state, teacher_params, device_batch
                                   ).lower(state, teacher_params, device_batch).compile()
        bar = progress_bar(trainer.steps, initial=step, enabled=trainer.progress)
        window_start, window_steps = time.perf_counter(), 0
        while step < trainer.steps:
            with jax.transfer_guard("disallow"):
                state, metrics = step_fn(state, teacher_params, device_batch)
            step += 1
            window_steps += 1
            saved_iterator = iterator_state(train_iter)  # the position after this step's batch
            stop = checkpointer.should_stop(step)
            if step < trainer.steps and not stop:
                device_batch = host_batch()  # read while the step runs
            log_pending()
            if step % trainer.log_every == 0 or step == trainer.steps:
                pending = (step, metrics)
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


def _to_device(batch, mesh, rules):
    """A training batch onto the devices (a seam the kill tests watch)."""
    return parallel.shard_batch(batch, mesh, rules)


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}

"""Checkpoints of a run: orbax `CheckpointManager` over student state, data position and provenance.

Longer than ~400 lines because orbax's manager plus what a run needs around it: restore onto any
mesh, preemption, commit markers, fallback and set-aside of unreadable steps.

Each step directory holds three items:

- `state`: the student's train state (params, optimizer state, step, ...; an RNG key too when
  the state carries one, as raw key data), written with `StandardSave` and restored straight
  into the caller's target shardings, so a checkpoint written on one mesh restores onto another.
- `iterator`: the grain iterator state (JSON), so a resumed run reads the exact next example.
- `meta`: the resolved config (YAML text) and the teacher manifest
  `{name: {"source", "content_hash"}}`. Teachers themselves are never checkpointed.

Crash safety is orbax's: a step is written to `<step>.orbax-checkpoint-tmp-*` and renamed only
once complete, so a half-written step is never listed, and `cleanup_tmp_directories` removes
its leftovers when the next manager starts. A step directory without orbax's commit marker
(`commit_success.txt`: copied in by hand, or left by another tool) is not a checkpoint: it is
never listed, and a writing manager moves it to `run_dir/checkpoints-set-aside/` with a
warning. A committed step that fails to restore (a truncated array file, a deleted
`_METADATA`) is named by `restore_error` and set aside the same way by the loop, which then
resumes from the newest step that restores. Preemption: in multi-process runs the loop asks
`reached_preemption(step)` (JAX's preemption sync point, which every host reaches at the same
step); a single process installs a SIGTERM handler that sets a flag read at step boundaries.

Run directory layout (shared with `jaxdistill.train`): `run_dir/config.yaml`,
`run_dir/run.json`, `run_dir/checkpoints/<step>/...`.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
import yaml
from orbax.checkpoint import checkpoint_managers as policies

from jaxdistill.models.model import ModelConfig, Params

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
SET_ASIDE_SUBDIR = "checkpoints-set-aside"  # steps that are not (or no longer) usable
CONFIG_FILE = "config.yaml"
COMMIT_MARKER = "commit_success.txt"  # orbax writes it last, in every finalised step


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the directory and what is wrong."""


class Checkpointer:
    """Saves and restores a run's checkpoints under `directory` (one subdirectory per step).

    `save_every`: steps between regular saves (`should_save`); `keep_best_metric`: with it,
    the latest `max_to_keep` checkpoints are kept *and* the best one by that eval metric
    (`keep_best_mode` "min" or "max"), so resuming always finds the newest state while the
    best survives rotation.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        max_to_keep: int = 3,
        save_every: int = 1,
        keep_best_metric: str | None = None,
        keep_best_mode: str = "min",
        async_save: bool = True,
        config_yaml: str = "",
        manifest: Mapping[str, Mapping[str, Any]] | None = None,
        read_only: bool = False,
    ):
        self.directory = Path(directory).absolute()
        self.keep_best_metric = keep_best_metric
        self._best_mode = keep_best_mode
        self.config_yaml = config_yaml
        self.manifest = {k: dict(v) for k, v in (manifest or {}).items()}
        preservation: policies.PreservationPolicy = policies.LatestN(n=max_to_keep)
        if keep_best_metric is not None:
            if keep_best_mode not in ("min", "max"):
                raise ValueError(f"keep_best_mode must be 'min' or 'max', got {keep_best_mode!r}")
            preservation = policies.AnyPreservationPolicy([
                preservation,
                policies.BestN(get_metric_fn=self._best_value, reverse=keep_best_mode == "min",
                               n=1, keep_checkpoints_without_metrics=False),
            ])
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy([
                policies.FixedIntervalPolicy(save_every),
                policies.PreemptionCheckpointingPolicy(),
            ]),
            preservation_policy=preservation,
            # best_fn also makes orbax write each save's metrics next to it.
            best_fn=self._best_value if keep_best_metric is not None else None,
            best_mode=keep_best_mode,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
        )
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: no checkpoint directory")
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "iterator": ocp.JsonCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        })
        self._sigterm = threading.Event()
        self._previous_handler = None
        if not read_only and jax.process_index() == 0:
            for step in self._uncommitted_steps():
                self.set_aside(step, f"no commit marker ({COMMIT_MARKER}): not a complete "
                                     "checkpoint")

    @classmethod
    def from_config(cls, directory, section, **kwargs) -> Checkpointer:
        """From a `config.CheckpointSection` (every, max_to_keep, keep_best, async_save)."""
        best = section.keep_best
        return cls(directory, max_to_keep=section.max_to_keep, save_every=section.every,
                   keep_best_metric=best.metric if best else None,
                   keep_best_mode=best.mode if best else "min", async_save=section.async_save,
                   **kwargs)

    def _best_value(self, metrics: Mapping[str, Any]) -> float:
        name = self.keep_best_metric
        for key in (name, f"eval/{name}", name.removeprefix("eval/")):
            if key in metrics:
                return float(metrics[key])
        raise KeyError(f"keep_best metric {name!r} not in checkpoint metrics {sorted(metrics)}")

    # ------------------------------------------------------------------------- save

    def should_save(self, step: int) -> bool:
        """A regular save is due at `step` (the interval, or a multi-host preemption point)."""
        return self._manager.should_save(step)

    def save(self, step: int, state, iterator_state: Mapping[str, Any] | None,
             metrics: Mapping[str, Any] | None = None, force: bool = False) -> bool:
        """Saves unless orbax's policies decline (`force` overrides); True when a save started.

        With async saves the arrays are copied off the devices before this returns, so the
        caller may donate `state` to the next step at once.
        """
        if step in self._manager.all_steps():
            return False
        if metrics is not None and self.keep_best_metric is not None:
            metrics = {k: float(v) for k, v in metrics.items()}
            self._best_value(metrics)  # fail now, not inside orbax's background deletion
        elif self.keep_best_metric is None:
            metrics = None
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_savable(state)),
            iterator=ocp.args.JsonSave(dict(iterator_state or {})),
            meta=ocp.args.JsonSave({"config_yaml": self.config_yaml, "manifest": self.manifest}),
        )
        return self._manager.save(step, args=args, metrics=metrics, force=force)

    # ---------------------------------------------------------------------- restore

    def all_steps(self) -> list[int]:
        """Committed steps (half-written tmp directories and unmarked ones are never listed)."""
        return sorted(s for s in self._manager.all_steps() if self._committed(s))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _committed(self, step: int) -> bool:
        return (self.directory / str(step) / COMMIT_MARKER).is_file()

    def _uncommitted_steps(self) -> list[int]:
        return sorted(s for s in self._manager.all_steps() if not self._committed(s))

    def set_aside(self, step: int, reason: str) -> Path:
        """Moves step `step` out of the checkpoint directory (kept for inspection, with
        `reason` in `SET_ASIDE.txt`), so it is neither restored nor in the way of a new save."""
        source = self.directory / str(step)
        target_root = self.directory.parent / SET_ASIDE_SUBDIR
        target_root.mkdir(parents=True, exist_ok=True)
        target, n = target_root / str(step), 1
        while target.exists():
            target, n = target_root / f"{step}.{n}", n + 1
        source.rename(target)
        (target / "SET_ASIDE.txt").write_text(reason + "\n")
        log.warning("%s: set aside to %s: %s", source, target, reason)
        self._manager.reload()
        return target

    def restore_error(self, step: int, error: BaseException) -> str:
        """What is wrong with step `step` that failed to restore with `error`: its directory,
        the file at fault where one can be named, and orbax's words."""
        step_dir = self.directory / str(step)
        expected = [COMMIT_MARKER, "_CHECKPOINT_METADATA", "state/_METADATA",
                    "state/manifest.ocdbt", "meta/metadata", "iterator/metadata"]
        missing = [name for name in expected if not (step_dir / name).is_file()]
        text = " ".join(str(error).split())
        # tensorstore names the array it failed on (`'path': 'params.x.kernel/'`), and at times
        # the hash-named data file; short names such as `metadata` would match any text.
        arrays = [m.rstrip("/") for m in re.findall(r"'path': '([^/'][^']*)'", text)]
        named = [str(p.relative_to(step_dir)) for p in sorted(step_dir.rglob("*"))
                 if p.is_file() and len(p.name) >= 16 and p.name in text
                 ] if step_dir.is_dir() else []
        if missing:
            what = f"missing {', '.join(missing)}"
        elif named or arrays:
            what = (f"unreadable {', '.join(named[:3]) or 'state data'}"
                    + (f" (array {arrays[0]}: a truncated or corrupt file)" if arrays else ""))
        else:
            what = "unreadable array data"
        return f"{step_dir}: {what} ({type(error).__name__}: {text[:300]})"

    def best_step(self) -> int | None:
        """The best checkpoint by the keep-best metric; the latest without one."""
        if self.keep_best_metric is None:
            return self.latest_step()
        scored = []
        for step in self.all_steps():
            metrics = self._manager.metrics(step)
            if metrics:
                scored.append((self._best_value(metrics), step))
        if not scored:
            return self.latest_step()
        return (min(scored) if self._best_mode == "min" else max(scored))[1]

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """`{"config_yaml", "manifest"}` of a checkpoint, without touching its arrays."""
        step = self._resolve(step)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))
        except Exception as err:
            raise CheckpointError(self.restore_error(step, err)) from err
        return dict(restored["meta"])

    def restore(self, step: int | None = None, *, target_state_shardings):
        """(state, iterator_state, manifest) of `step` (default: the latest complete one).

        `target_state_shardings` mirrors the state: a `jax.sharding.Sharding` per leaf (shapes
        and dtypes come from the checkpoint) or `jax.ShapeDtypeStruct`s with shardings. Each
        array is read straight into its target sharding, whatever mesh wrote it.
        """
        step = self._resolve(step)
        try:
            saved = self._manager.item_metadata(step)["state"]
            if saved is None:
                raise CheckpointError("the state's _METADATA is missing or unreadable")
            target = _abstract(saved, target_state_shardings, where=f"{self.directory}/{step}")
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                iterator=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ))
            jax.block_until_ready(restored["state"])  # a bad byte range fails here, not later
        except Exception as err:
            raise CheckpointError(self.restore_error(step, err)) from err
        return restored["state"], dict(restored["iterator"] or {}), dict(restored["meta"]["manifest"])

    def restore_params(self, step: int | None = None, *, shardings=None) -> Params:
        """Only the student params of a checkpoint (the optimizer state is never read)."""
        step = self._resolve(step)
        path = self._manager.directory / str(step) / "state"
        try:
            return self._restore_params(path, shardings)
        except CheckpointError:
            raise
        except Exception as err:  # orbax/tensorstore say little about which file is bad
            raise CheckpointError(f"cannot read the student params of checkpoint step {step}: "
                                  f"{self.restore_error(step, err)}") from err

    def _restore_params(self, path: Path, shardings) -> Params:
        with ocp.PyTreeCheckpointer() as reader:
            metadata = reader.metadata(path).item_metadata
            if metadata is None or getattr(metadata, "tree", None) is None:
                raise CheckpointError(f"{path}: not an orbax state checkpoint (its _METADATA is "
                                      "missing or unreadable)")
            saved = metadata.tree
            if "params" not in saved:
                raise CheckpointError(f"{path}: state has no 'params' (found {sorted(saved)})")
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            params_target = (jax.tree.map(lambda _: device, saved["params"])
                             if shardings is None else shardings)
            target = {"params": _abstract(saved["params"], params_target, where=str(path))}
            restored = reader.restore(path, args=ocp.args.PyTreeRestore(
                target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True))
        return restored["params"]

    def _resolve(self, step: int | None) -> int:
        self._manager.reload()
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no complete checkpoint to restore")
        if step not in self.all_steps():
            raise CheckpointError(f"{self.directory}: no complete checkpoint at step {step}; "
                                  f"complete steps: {self.all_steps()}")
        return step

    # ------------------------------------------------------------------- preemption

    def install_sigterm_handler(self) -> None:
        """Single process: SIGTERM sets a flag read by `should_stop` at step boundaries.

        In multi-process runs JAX's preemption service owns SIGTERM and `reached_preemption`
        reports the agreed step, so no Python handler is installed there.
        """
        if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
            return
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame
        self._sigterm.set()

    def reached_preemption(self, step: int) -> bool:
        """JAX's multi-host preemption sync point (False in a single process)."""
        return self._manager.reached_preemption(step)

    def should_stop(self, step: int) -> bool:
        """Save now and stop: a SIGTERM arrived, or every host reached the preemption point."""
        return self._sigterm.is_set() or self.reached_preemption(step)

    # ---------------------------------------------------------------------- closing

    def wait(self) -> None:
        """Blocks until any async save has been finalised."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None


def _savable(state):
    """Typed PRNG keys are stored as their raw key data (restored as such: re-wrap with
    `jax.random.wrap_key_data`)."""
    return jax.tree.map(
        lambda x: jax.random.key_data(x) if _is_key(x) else x, state)


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _path_key(path) -> tuple[str, ...]:
    """A leaf's path with the container kind dropped: orbax metadata stores namedtuples as
    dicts and tuples as lists, so `.mu` and `['mu']` name the same leaf."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _abstract(saved, targets, *, where: str):
    """ShapeDtypeStructs with target shardings, after checking the tree matches the saved one."""
    is_target = lambda x: isinstance(x, jax.sharding.Sharding | jax.ShapeDtypeStruct)  # noqa
    saved_paths = {_path_key(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(saved)}
    target_paths = {_path_key(p) for p, _ in
                    jax.tree_util.tree_leaves_with_path(targets, is_leaf=is_target)}
    if saved_paths.keys() != target_paths:
        missing = ["/".join(k) for k in sorted(saved_paths.keys() - target_paths)[:5]]
        extra = ["/".join(k) for k in sorted(target_paths - saved_paths.keys())[:5]]
        raise CheckpointError(f"{where}: checkpoint state does not match the target: only in "
                              f"the checkpoint {missing}, only in the target {extra}")

    def one(path, target):
        leaf = saved_paths[_path_key(path)]
        sharding = target.sharding if isinstance(target, jax.ShapeDtypeStruct) else target
        if isinstance(target, jax.ShapeDtypeStruct) and tuple(target.shape) != tuple(leaf.shape):
            raise CheckpointError(f"{where}: {'/'.join(_path_key(path))} has shape "
                                  f"{tuple(leaf.shape)} in the checkpoint, the target expects "
                                  f"{tuple(target.shape)}")
        return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(one, targets, is_leaf=is_target)


# ------------------------------------------------------------------ finished runs as sources


def _run_config(run_dir: str | Path) -> dict[str, Any]:
    """A run directory's resolved config as a mapping (its `model` section checked)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"run:{run_dir}: no {CONFIG_FILE} (not a jaxdistill run directory)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = " ".join(str(err).split())[:200]
        raise CheckpointError(f"run:{run_dir}: {path} is not a resolved run config (not valid "
                              f"YAML: {first})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise CheckpointError(f"run:{run_dir}: {path} is not a resolved run config (expected a "
                              f"mapping with a 'model' section, found {type(data).__name__})")
    return data


def run_model_config(run_dir: str | Path) -> ModelConfig:
    """The student ModelConfig recorded in a run directory's resolved config."""
    model = dict(_run_config(run_dir)["model"])
    return ModelConfig.model_validate({k: model[k] for k in ("backbone", "heads") if k in model})


def load_params(run_dir: str | Path, *, shardings=None) -> tuple[ModelConfig, Params]:
    """(ModelConfig, params) of a finished run: its best checkpoint when the run kept the best
    by a metric, else its latest. Params land on one device unless `shardings` are given."""
    run_dir = Path(run_dir)
    model_cfg = run_model_config(run_dir)
    run_cfg = _run_config(run_dir)
    keep_best = (run_cfg.get("checkpoint") or {}).get("keep_best")
    directory = run_dir / CHECKPOINT_SUBDIR
    if not directory.is_dir():
        raise CheckpointError(f"run:{run_dir}: no {CHECKPOINT_SUBDIR}/ directory")
    checkpointer = Checkpointer(
        directory, read_only=True,
        keep_best_metric=keep_best["metric"] if keep_best else None,
        keep_best_mode=keep_best.get("mode", "min") if keep_best else "min")
    try:
        step = checkpointer.best_step()
        if step is None:
            raise CheckpointError(f"run:{run_dir}: no complete checkpoint in {directory}")
        params = checkpointer.restore_params(step, shardings=shardings)
    finally:
        checkpointer.close()
    log.info("loaded run:%s step %d", run_dir, step)
    return model_cfg, params

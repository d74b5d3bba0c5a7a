"""Metric sinks of a run: JSONL lines, TensorBoard event files, optional wandb, a progress bar.

Values arrive already on the host (the loop fetches them only at its log cadence). Only
process 0 writes; other processes get a writer that drops everything.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TB_SUBDIR = "tb"


def _scalar(value: Any) -> float | int | None:
    """A plain Python number, or None for anything that is not a scalar."""
    if isinstance(value, bool | np.bool_):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    array = np.asarray(value)
    if array.ndim != 0 or array.dtype.kind not in "biuf":
        return None
    return array.item()


class MetricWriter:
    """Writes `{step, **metrics}` to `run_dir/metrics.jsonl`, TensorBoard (`run_dir/tb`), wandb."""

    def __init__(self, run_dir: str | Path, *, jsonl: bool = True, tensorboard: bool = True,
                 wandb: bool = False, project: str | None = None):
        self.run_dir = Path(run_dir)
        self._active = jax.process_index() == 0
        self._jsonl = self._tb = self._wandb = None
        if not self._active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if jsonl:
            self._jsonl = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / TB_SUBDIR))
        if wandb:
            if importlib.util.find_spec("wandb") is None:
                log.warning("logging.wandb is set but wandb is not installed "
                            "(pip install wandb); metrics go to JSONL/TensorBoard only")
            else:
                import wandb as wandb_lib

                self._wandb = wandb_lib.init(project=project, dir=str(self.run_dir),
                                             name=self.run_dir.name, resume="allow")

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self._active:
            return
        values = {}
        for key, value in metrics.items():
            scalar = _scalar(value)
            if scalar is not None:
                values[key] = scalar
        if self._jsonl is not None:
            line = {"step": int(step), **{k: (v if math.isfinite(v) else str(v))
                                          for k, v in values.items()}}
            self._jsonl.write(json.dumps(line) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, int(step))
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(values, step=int(step))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def progress_bar(total: int, *, initial: int = 0, enabled: bool = True) -> tqdm:
    """Steps done of `total`, with step rate and ETA; silent off process 0.

    The rate is the average since the bar started (smoothing 0), so one slow step does not
    swing the ETA; the loop shifts the bar's clock past compilation, evals and saves.
    """
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                disable=not enabled or jax.process_index() != 0, smoothing=0.0)


def truncate_metrics(run_dir: str | Path, step: int) -> int:
    """Drops the JSONL lines past `step` (a resume from `step` logs them again), atomically:
    the kept lines go to a temporary file that replaces the old one. Returns lines dropped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            logged = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            dropped += 1  # a line cut short by a kill mid-write
            continue
        if logged > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
        log.info("%s: dropped %d lines past the resumed step %d", path, dropped, step)
    return dropped


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The JSONL lines a run wrote, in order."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

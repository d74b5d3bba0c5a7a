"""The run report: report.md with headline, all-models and targets tables, and PNG plots beside it.

Longer than ~400 lines because the pipeline report and the per-run report share their tables and
plots.

Takes plain dicts and lists of metrics (from `evaluate.summarize`, `calibration.calibration_summary`
and the training metrics JSONL) and writes, into `run_dir`:

- report.md: headline table, all-models table, targets (met / missed, with the note where
  missed), calibration and kappa tables, images embedded by relative path;
- training_curves.png (one subplot per model/stage, one line per loss term),
  models_vs_metrics.png (grouped bars, teachers vs students per metric),
  calibration.png (reliability curves before/after per head), kappa_by_dimension.png;
- report.json: the same inputs, for machines.

Plots use matplotlib's Agg canvas directly (no pyplot), so importing this module changes no
global backend.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Curves = dict[str, dict[str, list[tuple[int, float]]]]

TRAINING_CURVES_PNG = "training_curves.png"
MODELS_PNG = "models_vs_metrics.png"
CALIBRATION_PNG = "calibration.png"
KAPPA_PNG = "kappa_by_dimension.png"

_NON_FINITE = ("nan", "inf", "-inf", "infinity", "-infinity")

# Headline metrics the all-models table and the bar chart show, in this order.
_METRIC_PATTERNS = (r"ndcg_at_\d+$", r"poor_match_rate_at_\d+$", r"auroc_(?!.*_note$).+",
                    r"kappa$")


def read_metrics_jsonl(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} from a JSONL file of {"step": int, metric: number, ...}.

    Non-numeric fields are skipped ("nan"/"inf" strings, as `metrics.py` writes non-finite
    values, become floats). When steps go back (a run resumed from a checkpoint appends to the
    same file), the later lines replace the earlier points from that step on. A line that is not
    a JSON object with an integer "step" is an error naming the file and line.
    """
    path = Path(path)
    curves: dict[str, list[tuple[int, float]]] = {}
    with path.open() as lines:
        for line_number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError(f"{path}:{line_number}: expected a JSON object with an integer "
                                 f"'step'; found {line.strip()[:80]!r}")
            step = record["step"]
            for key, value in record.items():
                if isinstance(value, str) and value.lower() in _NON_FINITE:
                    value = float(value)  # the metrics writer stores nan/inf as strings
                if key == "step" or not _is_number(value):
                    continue
                points = curves.setdefault(key, [])
                while points and points[-1][0] >= step:
                    points.pop()  # a resumed run re-logs steps after its checkpoint: keep the rerun
                points.append((step, float(value)))
    return curves


# --- Formatting -------------------------------------------------------------------------

def _label(key: str) -> str:
    if match := re.fullmatch(r"ndcg_at_(\d+)", key):
        return f"NDCG@{match[1]}"
    if match := re.fullmatch(r"poor_match_rate_at_(\d+)", key):
        return f"poor-match@{match[1]}"
    if key.startswith("auroc_"):
        return f"AUROC {key[len('auroc_'):]}"
    return {"items_per_second": "items/s", "params": "params", "model": "model"}.get(
        key, key.replace("_", " "))


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "met" if value else "**missed**"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "n/a"
        # Rates and counts in whole units (items/s 964, not 964.1362); metrics to 4 places.
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _fmt_params(value: Any) -> str:
    if not isinstance(value, (int, float, np.integer, np.floating)):
        return _fmt(value)
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{suffix}"
    return f"{int(value)}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _metric_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Table columns: model, params, the headline metrics in a fixed order, items/s, the rest."""
    keys = list(dict.fromkeys(k for row in rows for k in row if not k.endswith("_note")))
    ordered = [k for k in ("model", "params") if k in keys]
    for pattern in _METRIC_PATTERNS:
        ordered += [k for k in keys if re.fullmatch(pattern, k) and k not in ordered]
    ordered += [k for k in ("items_per_second",) if k in keys]
    return ordered + [k for k in keys if k not in ordered]


def _bar_metrics(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return [k for k in _metric_columns(rows)
            if any(re.fullmatch(p, k) for p in _METRIC_PATTERNS)
            and any(_is_number(row.get(k)) for row in rows)]


# --- Plots ------------------------------------------------------------------------------

def _figure(n_panels: int, panel_size: tuple[float, float] = (5.0, 3.6),
            max_cols: int = 3) -> tuple[Figure, list[Any]]:
    cols = min(max_cols, max(n_panels, 1))
    rows = math.ceil(max(n_panels, 1) / cols)
    figure = Figure(figsize=(panel_size[0] * cols, panel_size[1] * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = [figure.add_subplot(rows, cols, i + 1) for i in range(max(n_panels, 1))]
    return figure, axes


def _plot_training_curves(curves: Curves, path: Path) -> None:
    figure, axes = _figure(len(curves))
    for ax, (stage, terms) in zip(axes, curves.items()):
        positive = []
        for term, points in terms.items():
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=term, linewidth=1.2)
                positive += [v for v in values if np.isfinite(v)]
        if positive and min(positive) > 0 and max(positive) / min(positive) > 100:
            ax.set_yscale("log")
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.savefig(path, dpi=100)


def _grouped_bars(ax: Any, groups: Sequence[str], series: Mapping[str, Sequence[float]]) -> None:
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        heights = np.array([v if _is_number(v) else np.nan for v in values], dtype=np.float64)
        ax.bar(x + (i - (len(series) - 1) / 2) * width, np.nan_to_num(heights), width, label=name)
    ax.set_xticks(x, [_label(g) for g in groups], rotation=20, ha="right")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # clear of the bars


def _plot_models(rows: Sequence[Mapping[str, Any]], metrics: list[str], path: Path) -> None:
    figure, (ax,) = _figure(1, panel_size=(max(6.0, 1.3 * len(metrics) + 2), 4.0))
    _grouped_bars(ax, metrics, {str(row.get("model", i)): [row.get(m) for m in metrics]
                                for i, row in enumerate(rows)})
    ax.set_title("teachers vs students")
    figure.savefig(path, dpi=100)


def _plot_calibration(calibration: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    figure, axes = _figure(len(calibration), panel_size=(4.0, 3.8))
    for ax, (head, result) in zip(axes, calibration.items()):
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        for stage, style in (("before", "--"), ("after", "-")):
            curve = result.get(stage)
            if curve:
                ax.plot(curve["mean_predicted"], curve["fraction_positive"], style, marker="o",
                        markersize=3, label=f"{stage} (ECE {_fmt(result.get(f'ece_{stage}'))})")
        ax.set_title(head)
        ax.set_xlabel("mean predicted")
        ax.set_ylabel("observed rate")
        ax.legend(fontsize=7)
    figure.savefig(path, dpi=100)


def _plot_kappa(kappa: Mapping[str, Mapping[str, float]], dimensions: list[str], path: Path) -> None:
    figure, (ax,) = _figure(1, panel_size=(max(6.0, 1.2 * len(dimensions) + 2), 4.0))
    _grouped_bars(ax, dimensions, {model: [by_dim.get(d) for d in dimensions]
                                   for model, by_dim in kappa.items()})
    ax.set_ylabel("quadratic weighted kappa")
    ax.set_title("kappa vs golden set, by policy dimension")
    figure.savefig(path, dpi=100)


# --- The report -------------------------------------------------------------------------

def _normalise_kappa(kappa: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """{model: {dimension: κ}}; a flat {dimension: κ} becomes one series named 'model'."""
    if kappa and all(_is_number(v) for v in kappa.values()):
        return {"model": dict(kappa)}
    return {model: dict(by_dim) for model, by_dim in kappa.items()}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def table_lines(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A markdown table, numbers formatted as in the standard sections (for `sections`)."""
    return _table(list(header), [[_fmt(v) for v in row] for row in rows])


def write_report(run_dir: str | Path, *, headline: Mapping[str, Any],
                 models_table: Sequence[Mapping[str, Any]], curves: Curves,
                 calibration: Mapping[str, Mapping[str, Any]],
                 kappa_by_dimension: Mapping[str, Any], targets: Sequence[Mapping[str, Any]],
                 title: str = "jaxdistill run report",
                 sections: Sequence[tuple[str, Sequence[str]]] = ()) -> Path:
    """Writes report.md, its PNGs and report.json into run_dir; returns the report.md path.

    models_table: one row per model, e.g. {"model": "two-teacher student", "params": 3.1e7,
    "ndcg_at_10": ..., "poor_match_rate_at_10": ..., "auroc_click": ..., "kappa": ...,
    "items_per_second": ...}; keys ending in "_note" are listed under the table.
    curves: {model/stage: {loss term: [(step, value)]}} (see `read_metrics_jsonl`).
    calibration: {head: calibration_summary entry}. kappa_by_dimension: {model: {dim: κ}}
    or {dim: κ}. targets: [{"name", "value", "target", "met", "note"}].
    A section without data says so and draws no plot. sections: extra (heading, markdown
    lines) pairs, written after the standard sections in order (see `table_lines`).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for i, target in enumerate(targets):
        missing = {"name", "value", "target", "met"} - set(target)
        if missing:
            raise ValueError(f"targets[{i}] lacks keys {sorted(missing)}; found {sorted(target)}")
    kappa = _normalise_kappa(kappa_by_dimension)
    md = [f"# {title}", ""]

    md += ["## Headline", ""]
    md += _table(["metric", "value"], [[_label(k), _fmt(v)] for k, v in headline.items()])

    md += ["", "## Targets", ""]
    if targets:
        md += _table(["target", "value", "goal", "status", "note"],
                     [[_fmt(t["name"]), _fmt(t["value"]), _fmt(t["target"]), _fmt(bool(t["met"])),
                       _fmt(t.get("note") or "")] for t in targets])
        missed = [t for t in targets if not t["met"]]
        md += ["", f"{len(targets) - len(missed)} of {len(targets)} targets met.", ""]
        for t in missed:
            note = t.get("note") or "no note given"
            md.append(f"- **Missed: {t['name']}** — {_fmt(t['value'])} against {_fmt(t['target'])}. {note}")
    else:
        md.append("No targets given.")

    md += ["", "## All models", ""]
    if models_table:
        columns = _metric_columns(models_table)
        md += _table([_label(c) for c in columns],
                     [[_fmt_params(row.get(c)) if c == "params" else _fmt(row.get(c))
                       for c in columns] for row in models_table])
        notes = [(row.get("model", "?"), k, v) for row in models_table
                 for k, v in row.items() if k.endswith("_note")]
        if notes:
            md.append("")
            md += [f"- {model}, {_label(key[:-len('_note')])}: {note}" for model, key, note in notes]
        metrics = _bar_metrics(models_table)
        if metrics:
            _plot_models(models_table, metrics, run_dir / MODELS_PNG)
            md += ["", f"![Teachers vs students]({MODELS_PNG})"]
    else:
        md.append("No models evaluated.")

    md += ["", "## Training curves", ""]
    if any(points for terms in curves.values() for points in terms.values()):
        _plot_training_curves({s: t for s, t in curves.items() if t}, run_dir / TRAINING_CURVES_PNG)
        md.append(f"![Training curves]({TRAINING_CURVES_PNG})")
    else:
        md.append("No training curves recorded.")

    md += ["", "## Calibration", ""]
    if calibration:
        md += _table(["head", "ECE before", "ECE after", "Brier before", "Brier after"],
                     [[head, *(_fmt(r.get(k)) for k in ("ece_before", "ece_after",
                                                        "brier_before", "brier_after"))]
                      for head, r in calibration.items()])
        _plot_calibration(calibration, run_dir / CALIBRATION_PNG)
        md += ["", "ECE over equal-mass bins.", "", f"![Reliability curves]({CALIBRATION_PNG})"]
    else:
        md.append("No calibration results.")

    md += ["", "## Kappa by policy dimension", ""]
    dimensions = list(dict.fromkeys(d for by_dim in kappa.values() for d in by_dim))
    if dimensions:
        md += _table(["dimension", *kappa],
                     [[d, *(_fmt(by_dim.get(d)) for by_dim in kappa.values())] for d in dimensions])
        _plot_kappa(kappa, dimensions, run_dir / KAPPA_PNG)
        md += ["", f"![Kappa by dimension]({KAPPA_PNG})"]
    else:
        md.append("No golden-set kappa.")

    for heading, lines in sections:
        md += ["", f"## {heading}", "", *lines]

    report_path = run_dir / "report.md"
    report_path.write_text("\n".join(md) + "\n")
    (run_dir / "report.json").write_text(json.dumps(
        {"headline": headline, "models": list(models_table), "targets": list(targets),
         "calibration": calibration, "kappa_by_dimension": kappa}, indent=1,
        default=_json_default))
    return report_path


# --- The report of any run ---------------------------------------------------------------

EVAL_CURVES_PNG = "eval_curves.png"
CONFUSION_PNG = "confusion_matrices.png"
RELIABILITY_PNG = "reliability.png"


def _run_eval(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "eval.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg})") from None


def _plot_confusion(matrices: Mapping[str, Sequence[Sequence[int]]], path: Path) -> None:
    figure, axes = _figure(len(matrices), panel_size=(3.8, 3.4))
    for ax, (name, matrix) in zip(axes, matrices.items()):
        counts = np.asarray(matrix, dtype=np.float64)
        ax.imshow(counts, cmap="Blues")
        for (i, j), value in np.ndenumerate(counts):
            ax.text(j, i, f"{int(value)}", ha="center", va="center", fontsize=8,
                    color="white" if value > counts.max() / 2 else "black")
        ax.set_xticks(range(len(counts)))
        ax.set_yticks(range(len(counts)))
        ax.set_xlabel("predicted")
        ax.set_ylabel("label")
        ax.set_title(name)
    figure.savefig(path, dpi=100)


def write_run_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """report.md (+ PNGs) for one or more training runs of any kind, from what each run wrote:
    metrics.jsonl (loss per objective term, eval metrics over steps) and eval.json (its last
    evaluation: metrics by head, confusion matrices, reliability curves); with several runs, a
    side-by-side table of their last evaluations. Returns the report.md path."""
    run_dirs = [Path(d) for d in run_dirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [d.name for d in run_dirs]
    losses: Curves = {}
    eval_curves: Curves = {}
    evals = {}
    for name, run_dir in zip(names, run_dirs):
        metrics_path = run_dir / "metrics.jsonl"
        curves = read_metrics_jsonl(metrics_path) if metrics_path.is_file() else {}
        losses[name] = {k: v for k, v in curves.items() if k.startswith(("loss/", "eval/loss/"))}
        eval_curves[name] = {k.removeprefix("eval/"): v for k, v in curves.items()
                             if k.startswith("eval/") and not k.startswith("eval/loss/")}
        evals[name] = _run_eval(run_dir)

    title = names[0] if len(names) == 1 else " vs ".join(names)
    md = [f"# Run report: {title}", ""]
    md += ["## Last evaluation", ""]
    scalar = {name: {k: v for k, v in e.get("metrics", {}).items() if _is_number(v)}
              for name, e in evals.items()}
    keys = list(dict.fromkeys(k for m in scalar.values() for k in m))
    if keys:
        splits = {n: f"{e.get('split')} @ step {e.get('step')}" for n, e in evals.items() if e}
        md += [", ".join(f"{n}: {where}" for n, where in splits.items()), ""]
        md += _table(["metric", *names], [[k, *(_fmt(scalar[n].get(k)) for n in names)]
                                          for k in keys])
    else:
        md.append("No evaluation recorded (the run has no eval split, or did not finish).")

    md += ["", "## Loss per objective term", ""]
    if any(points for terms in losses.values() for points in terms.values()):
        _plot_training_curves({n: t for n, t in losses.items() if t}, out_dir / TRAINING_CURVES_PNG)
        md.append(f"![Loss per objective term]({TRAINING_CURVES_PNG})")
    else:
        md.append("No losses recorded.")

    md += ["", "## Eval metrics over steps", ""]
    by_metric: Curves = {}  # {metric: {run: points}}: one panel per metric, a line per run
    for n, curves in eval_curves.items():
        for k, points in curves.items():
            if points and not k.startswith(("agreement/", "teacher/")):
                by_metric.setdefault(k, {})[n] = points
    if by_metric:
        _plot_training_curves(dict(list(by_metric.items())[:12]), out_dir / EVAL_CURVES_PNG)
        md.append(f"![Eval metrics over steps]({EVAL_CURVES_PNG})")
    else:
        md.append("No eval metrics recorded.")

    matrices = {f"{n}: {k.removesuffix('/confusion_matrix')}": v for n, e in evals.items()
                for k, v in e.get("metrics", {}).items() if k.endswith("/confusion_matrix")}
    md += ["", "## Confusion matrices", ""]
    if matrices:
        _plot_confusion(matrices, out_dir / CONFUSION_PNG)
        md.append(f"![Confusion matrices]({CONFUSION_PNG})")
    else:
        md.append("No classifier heads.")

    reliability = {f"{n}: {k.replace('reliability', '').strip('/_') or k}": {
                       "before": v, "ece_before": e["metrics"].get(k.replace("reliability", "ece"))}
                   for n, e in evals.items() for k, v in e.get("metrics", {}).items()
                   if k.rsplit("/", 1)[-1].startswith("reliability")}
    md += ["", "## Reliability", ""]
    if reliability:
        _plot_calibration(reliability, out_dir / RELIABILITY_PNG)
        md += ["Equal-mass bins of predicted probability against the observed rate "
               "(uncalibrated outputs).", "", f"![Reliability]({RELIABILITY_PNG})"]
    else:
        md.append("No probabilistic heads with labels.")
    path = out_dir / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path

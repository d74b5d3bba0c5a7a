"""Tests for jaxdistill.report: report.md tables, targets, PNG plots, metrics JSONL."""
import json

import numpy as np
import pytest

from jaxdistill import calibration, report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _inputs(tmp_path):
    rng = np.random.default_rng(0)
    metrics_path = tmp_path / "student_metrics.jsonl"
    with metrics_path.open("w") as f:
        for step in range(0, 100, 10):
            f.write(json.dumps({"step": step, "loss/relevance_teacher": 1.0 / (1 + step),
                                "loss/engagement_teacher": 0.5 - step / 400, "tag": "x"}) + "\n")
    scores = rng.random(2000)
    labels = rng.random(2000) < scores ** 2
    calibrators = {"relevance": calibration.IsotonicCalibrator().fit(scores, labels)}
    models = [
        {"model": "relevance teacher", "params": 1_700_000_000, "ndcg_at_10": 0.91,
         "poor_match_rate_at_10": 0.05, "auroc_click": float("nan"),
         "auroc_click_note": "AUROC undefined: only one class", "kappa": 0.81,
         "items_per_second": 1200.0},
        {"model": "engagement teacher", "params": 1_700_000_000, "ndcg_at_10": 0.80,
         "poor_match_rate_at_10": 0.12, "auroc_click": 0.74, "auroc_apply": 0.81,
         "kappa": 0.55, "items_per_second": 1150.0},
        {"model": "two-teacher student", "params": 600_000_000, "ndcg_at_10": 0.89,
         "poor_match_rate_at_10": 0.06, "auroc_click": 0.73, "auroc_apply": 0.80,
         "kappa": 0.78, "items_per_second": 4100.0},
        {"model": "relevance-only student", "params": 600_000_000, "ndcg_at_10": 0.88,
         "poor_match_rate_at_10": 0.07, "auroc_click": 0.65, "kappa": 0.77,
         "items_per_second": 4150.0},
    ]
    return dict(
        headline={"ndcg_at_10": 0.89, "poor_match_rate_at_10": 0.06, "items_per_second": 4100.0},
        models_table=models,
        curves={"two-teacher student": report.read_metrics_jsonl(metrics_path),
                "relevance teacher": {"loss/listwise": [(0, 2.0), (50, 1.2), (100, 0.9)]}},
        calibration=calibration.calibration_summary(calibrators, {"relevance": scores},
                                                    {"relevance": labels}),
        kappa_by_dimension={"relevance teacher": {"overall": 0.81, "function": 0.7, "skills": 0.6},
                            "two-teacher student": {"overall": 0.78, "function": 0.68,
                                                    "skills": 0.55}},
        targets=[
            {"name": "student NDCG@10 within 2% of teacher", "value": 0.978, "target": 0.98,
             "met": False, "note": "student 0.89 vs teacher 0.91 (-2.2%)"},
            {"name": "student items/s >= 3x teacher", "value": 3.4, "target": 3.0, "met": True,
             "note": ""},
        ],
    )


def test_read_metrics_jsonl(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 0, "loss": 2.5, "lr": 0.001, "stage": "warmup"}\n\n'
                    '{"step": 10, "loss": 1.5}\n')
    assert report.read_metrics_jsonl(path) == {"loss": [(0, 2.5), (10, 1.5)], "lr": [(0, 0.001)]}
    # Non-finite values as the metrics writer stores them; a resume that re-logs steps 10-20.
    path.write_text("\n".join(json.dumps(r) for r in [
        {"step": 0, "loss": 3.0}, {"step": 10, "loss": "nan"}, {"step": 20, "loss": 2.0},
        {"step": 10, "loss": 2.2}, {"step": 20, "loss": 1.9}]))
    loss = report.read_metrics_jsonl(path)["loss"]
    assert [step for step, _ in loss] == [0, 10, 20] and loss[1:] == [(10, 2.2), (20, 1.9)]
    path.write_text('{"step": 5, "loss": "nan"}\n')
    assert np.isnan(report.read_metrics_jsonl(path)["loss"][0][1])
    path.write_text('{"step": 0, "loss": 2.5}\n{"loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2: expected a JSON object with an integer 'step'"):
        report.read_metrics_jsonl(path)
    path.write_text('{"step": 0,\n')
    with pytest.raises(ValueError, match=r"m.jsonl:1: not valid JSON"):
        report.read_metrics_jsonl(path)


def test_write_report_markdown_and_pngs(tmp_path):
    run_dir = tmp_path / "run"
    path = report.write_report(run_dir, **_inputs(tmp_path))
    assert path == run_dir / "report.md"
    md = path.read_text()
    # Headline and all-models tables.
    assert "| NDCG@10 | 0.8900 |" in md
    assert ("| model | params | NDCG@10 | poor-match@10 | AUROC click | AUROC apply | kappa | items/s |"
            in md)
    assert "| two-teacher student | 600.0M | 0.8900 | 0.0600 | 0.7300 | 0.8000 | 0.7800 | 4,100 |" in md
    assert "| relevance teacher | 1.7B | 0.9100 | 0.0500 | n/a | – | 0.8100 | 1,200 |" in md
    assert "relevance teacher, AUROC click: AUROC undefined: only one class" in md
    # Targets: met / missed, and the missed note with its numbers.
    assert "| student items/s >= 3x teacher | 3.4000 | 3.0000 | met |" in md
    assert "**missed**" in md
    assert ("**Missed: student NDCG@10 within 2% of teacher** — 0.9780 against 0.9800. "
            "student 0.89 vs teacher 0.91 (-2.2%)") in md
    assert "1 of 2 targets met." in md
    assert "| relevance |" in md and "| function | 0.7000 | 0.6800 |" in md
    for png in (report.TRAINING_CURVES_PNG, report.MODELS_PNG, report.CALIBRATION_PNG,
                report.KAPPA_PNG):
        assert f"]({png})" in md  # embedded by relative path
        data = (run_dir / png).read_bytes()
        assert data[:8] == PNG_SIGNATURE
        assert len(data) > 5_000
    assert json.loads((run_dir / "report.json").read_text())["targets"][0]["met"] is False


def test_write_report_with_empty_sections(tmp_path):
    path = report.write_report(tmp_path, headline={"ndcg_at_10": 0.5}, models_table=[], curves={},
                               calibration={}, kappa_by_dimension={}, targets=[])
    md = path.read_text()
    assert "No training curves recorded." in md and "No targets given." in md
    assert not list(tmp_path.glob("*.png"))
    with pytest.raises(ValueError, match=r"targets\[0\] lacks keys \['met'\]"):
        report.write_report(tmp_path, headline={}, models_table=[], curves={}, calibration={},
                            kappa_by_dimension={}, targets=[{"name": "x", "value": 1, "target": 2}])


def test_extra_sections_follow_the_standard_ones(tmp_path):
    table = report.table_lines(["query", "p(Yes)"], [["sr swe | remote", 0.123456], ["ds", 2500.0],
                                                     ["ml", 964.1362], ["pm", 12.5]])
    assert table == ["| query | p(Yes) |", "|---|---|", "| sr swe \\| remote | 0.1235 |",
                     "| ds | 2,500 |", "| ml | 964 |", "| pm | 12.5000 |"]
    path = report.write_report(tmp_path, headline={}, models_table=[], curves={}, calibration={},
                               kappa_by_dimension={}, targets=[],
                               sections=[("Judge", ["Labelled by the judge."]), ("Pairs", table)])
    md = path.read_text()
    assert md.index("## Kappa by policy dimension") < md.index("## Judge") < md.index("## Pairs")
    assert "Labelled by the judge." in md and "| sr swe \\| remote | 0.1235 |" in md

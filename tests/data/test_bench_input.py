"""scripts/bench_input.py runs end to end on a tiny workload and prints the step's need."""
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_input.py"


def test_bench_input_reports_both_modes(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_input", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--records", "64", "--list-size", "2", "--max-len", "32", "--step-ms", "200",
                "--json", str(tmp_path / "out.json")])
    printed = capsys.readouterr().out
    assert "sequences/s = B / step_s = 16 / 0.200 = 80.0" in printed
    figures = json.loads((tmp_path / "out.json").read_text())["workloads"]
    assert figures["listwise"]["records_per_s_needed"] == 40.0
    assert figures["text"]["records_per_s_needed"] == 80.0
    for kind in ("listwise", "text"):
        assert figures[kind]["live_records_per_s"] > 0 and figures[kind]["prepared_records_per_s"] > 0

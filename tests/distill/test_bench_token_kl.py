"""Smoke test of scripts/bench_token_kl.py on tiny shapes: the variants agree, chunked is smaller."""

import importlib.util
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "bench_token_kl.py"


def test_bench_token_kl_tiny():
    spec = importlib.util.spec_from_file_location("bench_token_kl", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = {r["variant"]: r for r in bench.main([
        "--seq", "64", "--vocab", "1024", "--student-dim", "8", "--teacher-dim", "8",
        "--chunk", "8", "--k", "4", "--steps", "1"])}
    assert results["chunked"]["loss"] == pytest.approx(results["dense"]["loss"], rel=1e-5)
    assert 0 < results["sparse"]["loss"] < results["dense"]["loss"]
    assert results["chunked"]["temp"] < results["dense"]["temp"] / 2

"""Smoke test of scripts/bench_step.py: the cpu-tiny workload runs and its first losses are finite."""

import importlib.util
import json
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "bench_step.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flop_count_matches_design_reference():
    # DESIGN.md: torch.compile at 168 ms/step on an H200 is 42% MFU at B=16.
    bench = _bench()
    args = bench.parse_args(["--preset", "linkedin"])
    flops = bench.flop_count(args, bench.PRESETS["linkedin"])
    assert flops["tokens"] == 16 * 512
    assert flops["models"]["student"]["non_embedding"] == pytest.approx(0.4405e9, rel=1e-3)
    assert flops["total"] / 0.168 / 989e12 == pytest.approx(0.42, abs=0.01)


def test_linkedin_shapes_come_from_the_plan_config():
    from jaxdistill.models import decoder

    bench = _bench()
    teacher, student = bench.backbones("linkedin")
    shape = lambda cfg: {k: getattr(cfg, k) for k in (  # noqa: E731
        "vocab_size", "hidden", "layers", "heads", "kv_heads", "head_dim", "mlp", "qk_norm",
        "tie_embeddings")}
    assert shape(teacher) == shape(decoder.qwen3_1_7b())
    assert shape(student) == shape(decoder.qwen3_0_6b())


def _result(step_s, total=1.5, device_kind="NVIDIA H200", **extra):
    return dict(first_step_s=10.0, step_s=step_s, device_kind=device_kind, peak_bytes=2**30,
                peak_kind="device", first_losses={"total": total}, **extra)


def test_table_ratios_and_mfu_by_model():
    bench = _bench()
    args = bench.parse_args(["--preset", "linkedin"])
    flops = bench.flop_count(args, bench.PRESETS["linkedin"])
    error = {"relevance_teacher": {"relevance": {"kl_mean": 1e-5, "kl_max": 4e-5}}}
    results = {"fused": _result(0.100), "fused+int8": _result(0.080, teacher_error=error),
               "fused+fp8": {"skipped": "fp8 dots are emulated"},
               "torch-compile": _result(0.168)}
    text = bench.table(results, flops, args, 512)
    rows = {}
    for line in text.splitlines()[2:]:  # the rows come first, under the header and its rule
        rows.setdefault(line.split()[0], line)
    assert rows["fused"].split()[-1] == "1.68x" and rows["fused+int8"].split()[-1] == "2.10x"
    assert rows["torch-compile"].split()[-1] == "1.00x"
    assert "42.3%" in rows["torch-compile"]  # DESIGN.md: 168 ms on an H200 is 42% MFU
    assert "fused+fp8      skipped: fp8 dots are emulated" in text
    # Per model: each model's FLOPs over the step time; they add up to the step's MFU.
    line = next(l for l in text.splitlines() if l.startswith("MFU by model, torch-compile"))
    shares = [float(part.split()[-1].rstrip("%")) for part in line.split(" (")[0].split(": ")[1]
              .split(", ")]
    assert len(shares) == 3 and sum(shares) == pytest.approx(42.3, abs=0.2)
    assert "fused+int8 relevance_teacher output error vs unquantized: relevance kl_mean " \
           "1.00e-05, kl_max 4.00e-05" in text
    # On CPU there is no peak unless one is given.
    cpu = {"fused": _result(1.0, device_kind="cpu")}
    assert "n/a" in bench.table(cpu, flops, args, 512)
    args.peak_tflops = 1.0
    assert "MFU by model, fused" in bench.table(cpu, flops, args, 512)


@pytest.mark.slow
def test_cpu_tiny_runs_every_jax_variant_and_torch_eager(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    bench = _bench()
    out = tmp_path / "bench.json"
    bench.main(["--preset", "cpu-tiny", "--steps", "1", "--warmup", "0", "--in-process",
                "--variants", "fused,unfused,fused+int8,fused+fp8,fused+remat-full,torch-eager",
                "--json", str(out)])
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"fused", "unfused", "fused+int8", "fused+fp8", "fused+remat-full",
                            "torch-eager"}
    assert "emulated in f32 on CPU" in results.pop("fused+fp8")["skipped"]
    for result in results.values():
        assert result["finite"] and result["step_s"] > 0
    # Same weights, same batch: fusing the teachers into the step changes nothing numerically.
    assert results["fused"]["first_losses"] == pytest.approx(results["unfused"]["first_losses"])
    # Rematerialising the student recomputes its activations: the same losses.
    assert results["fused+remat-full"]["student_remat"] == "full"
    assert results["fused"]["student_remat"] == "none"
    assert results["fused+remat-full"]["first_losses"] == pytest.approx(
        results["fused"]["first_losses"])
    # int8 teachers: the same losses up to their measured output error, which is reported.
    assert results["fused+int8"]["first_losses"] != results["fused"]["first_losses"]
    assert results["fused+int8"]["first_losses"] == pytest.approx(
        results["fused"]["first_losses"], abs=0.02)
    errors = results["fused+int8"]["teacher_error"]
    assert 0 < errors["relevance_teacher"]["relevance"]["kl_mean"] < 1e-3
    assert 0 < errors["engagement_teacher"]["actions"]["max_abs_prob"] < 0.05

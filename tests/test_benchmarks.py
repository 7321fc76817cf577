"""Smoke test of the benchmark (`benchmarks/run.py`): the tiny size end to end, and the gpu-qwen configurations.

The benchmark runs GNDPOTrainer, TRL's DistillationTrainer and GRPOTrainer each in a fresh process on the same tiny
offline models; these tests fail if it stops running or stops measuring what the report claims.
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
TRAINERS = ("gndpo", "distillation", "grpo")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    results, report = out / "results.json", out / "RESULTS.md"
    command = [
        sys.executable,
        str(BENCHMARKS / "run.py"),
        "--size=tiny",
        "--warmup=1",
        "--steps=2",
        f"--json={results}",
        f"--markdown={report}",
        f"--logdir={out / 'logs'}",
    ]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(results.read_text()), report.read_text(), proc.stdout


def test_tiny_benchmark_runs_the_three_trainers_on_the_same_work(tiny_run):
    results, _, _ = tiny_run
    entry = results["tiny"]
    spec, main = entry["spec"], entry["main"]
    assert set(main) == set(TRAINERS)
    for name, record in main.items():
        assert "error" not in record, (name, record.get("log_tail"))
    generation_batch = spec["batch_size"] * spec["grad_accum"]
    # identical copies of the models, and the same tokens per step
    assert len({r["student_fingerprint"] for r in main.values()}) == 1
    assert main["gndpo"]["teacher_fingerprint"] == main["distillation"]["teacher_fingerprint"]
    assert main["grpo"]["teacher_fingerprint"] is None
    tokens = {r["completion_tokens_per_step"] for r in main.values()}
    assert tokens == {generation_batch * spec["completion_length"]}
    for record in main.values():
        assert record["completions_per_generation_batch"] == generation_batch
        assert record["optimizer_steps_per_generation_batch"] == 1
        assert record["micro_steps_per_step"] == spec["grad_accum"]
        assert record["steps_measured"] == spec["steps"]


def test_tiny_benchmark_timings_and_phase_split(tiny_run):
    results, _, _ = tiny_run
    for name, record in results["tiny"]["main"].items():
        assert record["step_time_median"] > 0 and record["completion_tokens_per_s"] > 0, name
        assert record["peak_rss_bytes"] >= record["rss_after_setup_bytes"] > 0, name
        assert record["phases_mean"]["generation"] > 0, name
        assert math.isclose(sum(record["phases_mean"].values()), record["step_time_mean"], rel_tol=1e-6), name
        for step in record["per_step"]:
            phases = step["time"]
            assert all(v >= 0 for v in phases.values()), (name, phases)
            assert math.isclose(sum(phases.values()), step["total"], rel_tol=1e-6, abs_tol=1e-9), (name, step)
        assert record["outside_steps"]["time"] == {}, name  # everything timed fell inside an optimizer step
    main = results["tiny"]["main"]
    assert main["gndpo"]["phases_mean"]["teacher"] > 0
    assert main["gndpo"]["phases_mean"]["student_scoring"] > 0  # GNDPO's log p_old pass
    assert main["distillation"]["phases_mean"]["teacher"] > 0
    assert main["grpo"]["phases_mean"]["teacher"] == 0


def test_teacher_runs_once_per_generation_batch(tiny_run):
    results, _, _ = tiny_run
    spec, main = results["tiny"]["spec"], results["tiny"]["main"]
    generation_batch = spec["batch_size"] * spec["grad_accum"]
    gndpo, distillation = main["gndpo"], main["distillation"]
    # GNDPO: one scoring pass per generation batch (not one per micro-step), every completion scored once
    assert gndpo["teacher_scoring_passes_per_generation_batch"] == 1
    assert gndpo["teacher_rows_per_generation_batch"] == generation_batch
    assert gndpo["teacher_forward_calls_per_generation_batch"] == math.ceil(generation_batch / spec["batch_size"])
    # DistillationTrainer runs its teacher in the loss of every micro-step
    assert distillation["teacher_scoring_passes_per_generation_batch"] == spec["grad_accum"]
    assert distillation["teacher_rows_per_generation_batch"] == generation_batch
    assert main["grpo"]["teacher_forward_calls_per_generation_batch"] == 0
    assert all(r["head_rows_per_step"] > 0 for r in main.values())


def test_tiny_benchmark_report(tiny_run):
    _, report, stdout = tiny_run
    assert "GNDPOTrainer" in stdout and "DistillationTrainer" in stdout
    assert "## Size `tiny`" in report and "ratios against DistillationTrainer" in report
    assert "### GNDPO vs DistillationTrainer: gaps and their measured causes" in report
    assert "failed" not in report.lower()


def test_gpu_qwen_configs_build_on_cpu():
    """The GPU size cannot run here; its configurations must still build (models on the meta device)."""
    spec = importlib.util.spec_from_file_location("gndpo_benchmark_models", BENCHMARKS / "models.py")
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    rows = {row["pair"]: row for row in models.describe_gpu_qwen_configs()}
    assert set(rows) == {"qwen2.5-vl", "qwen3-vl"}
    for row in rows.values():
        assert row["vocab_size"] == models.QWEN_VOCAB
        assert 1.5e9 < row["student_params"] < row["teacher_params"] < 1e10

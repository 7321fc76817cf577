"""benchmarks/gpu_check.py, the one-command GPU validation, dry-run on CPU: every case runs (vLLM skipped without it),
and the full-size Qwen2.5-VL-shaped pair is built on the meta device, so the script has no error off the GPU path."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_dry_run_trains_every_case():
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]  # DeepSpeed may log to stdout
    records = {r["case"]: r for r in map(json.loads, lines)}
    assert records["setup"]["gpu_pair_parameters"]["teacher"] > records["setup"]["gpu_pair_parameters"]["student"]
    for case in ("lora", "qlora", "teacher_device", "teacher_offload"):
        record = records[case]
        assert record["status"] == "ok" and record["steps"] == 3, record
        assert record["finite_weights"] and record["adapter_moved"], record
        assert record["student_4bit"] == (case == "qlora"), record
    assert records["vllm"]["status"] in ("ok", "skipped")

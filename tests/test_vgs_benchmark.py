"""The VGS benchmark (benchmarks/vgs.py) runs end to end at its smallest size and reports what it claims to."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_vgs_benchmark_runs_and_compares_the_same_batches(tmp_path):
    results, markdown = tmp_path / "vgs.json", tmp_path / "VGS.md"
    command = [sys.executable, "benchmarks/vgs.py", "--size", "tiny", "--families", "qwen2_vl", "--warmup", "0",
               "--steps", "2", "--json", str(results), "--markdown", str(markdown)]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    row = json.loads(results.read_text())["tiny"]["rows"]["qwen2_vl"]
    gndpo, vgs = row["gndpo"], row["vgs"]
    assert row["same_batches"], "learning rate 0 and one seed: both runs must sample the same completions"
    assert gndpo["steps"] == vgs["steps"] == 2
    # VGS's own phases are timed only where VGS runs, inside the generation batch and the update
    assert gndpo["text_teacher"] == gndpo["vgs_loss"] == 0
    assert 0 < vgs["text_teacher"] < vgs["batch"] and 0 < vgs["vgs_loss"] < vgs["update"]
    assert row["time_ratio"] == vgs["step"] / gndpo["step"] and vgs["peak_growth"] > 0
    assert "| qwen2_vl | yes |" in markdown.read_text()

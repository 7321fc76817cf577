"""Smoke test of the benchmark harness (`benchmarks/run.py`, `render.py`): both comparisons at the smallest size.

The trainer comparison (GNDPO with and without `old_logps_from_sampler`, DistillationTrainer, GRPO) and the VGS
comparison (GNDPO with VGS off and on) each run one fresh process per trainer on the tiny offline models, then render
their tables and step-time PNGs; these tests fail if the harness stops running, stops giving every trainer the same
work, or stops measuring what it reports.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import render

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
STEPS = 1


def run(tmp: Path, name: str, *options: str) -> tuple[dict, str]:
    results, markdown = tmp / f"{name}.json", tmp / f"{name}.md"
    command = [sys.executable, "-m", "benchmarks.run", "--size=tiny", "--warmup=1", f"--steps={STEPS}", *options,
               f"--json={results}", f"--markdown={markdown}", f"--logdir={tmp / 'logs'}"]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert results.stat().st_size < 50_000, "the results JSON must stay small"
    return json.loads(results.read_text()), markdown.read_text()


@pytest.fixture(scope="module")
def trainers(tmp_path_factory):
    return run(tmp_path_factory.mktemp("bench"), "trainers")


@pytest.fixture(scope="module")
def vgs(tmp_path_factory):
    return run(tmp_path_factory.mktemp("vgs"), "vgs", "--vgs", "--family=qwen2_vl")


def check_rendered(markdown: str, entry: dict) -> None:
    summary = markdown.split("## Summary\n", 1)[1].split("\n## ", 1)[0].strip().splitlines()
    assert 1 <= len(summary) <= 10, summary
    assert "![step-time split](" in markdown
    for record in entry["main"].values():  # each trainer's row shows its measured median
        assert f"| {record['step_time_median']:.3g} |" in markdown


@pytest.mark.slow
def test_trainer_comparison_gives_every_trainer_the_same_work(trainers):
    results, markdown = trainers
    entry = results["tiny"]
    spec, main = entry["spec"], entry["main"]
    assert list(main) == ["gndpo", "gndpo_sampler", "distillation", "grpo"]
    generation_batch = spec["batch_size"] * spec["grad_accum"]
    tokens = generation_batch * spec["completion_length"]
    assert len({r["student_fingerprint"] for r in main.values()}) == 1  # identical starting copies
    assert main["gndpo"]["teacher_fingerprint"] == main["distillation"]["teacher_fingerprint"] is not None
    assert main["grpo"]["teacher_fingerprint"] is None  # the floor keeps no teacher in memory
    for name, record in main.items():
        assert record["completion_tokens_per_step"] == tokens, name
        assert record["optimizer_steps_per_generation_batch"] == 1, name
        assert len(record["step_times"]) == STEPS and len(record["rounds"]) == 1, name
        assert all(t >= 0 for step in record["phases"] for t in step.values()), (name, record["phases"])
        assert record["phases_mean"]["generation"] > 0 and record["peak_rss_bytes"] > record["rss_after_setup_bytes"]
    # the teacher scores once per generation batch in GNDPO, in every micro-step's loss in DistillationTrainer
    assert main["gndpo"]["teacher_scoring_passes_per_generation_batch"] == 1
    assert main["gndpo"]["teacher_forward_calls_per_generation_batch"] == generation_batch // spec["batch_size"]
    assert main["distillation"]["teacher_scoring_passes_per_generation_batch"] == spec["grad_accum"]
    assert main["grpo"]["teacher_forward_calls_per_generation_batch"] == 0
    assert main["gndpo"]["phases_mean"]["teacher"] > 0 and main["distillation"]["phases_mean"]["teacher"] > 0
    assert main["gndpo"]["phases_mean"]["student_scoring"] > 0  # the default re-scores log p_old
    assert main["gndpo_sampler"]["phases_mean"]["student_scoring"] == 0  # old_logps_from_sampler skips it
    assert main["gndpo_sampler"]["teacher_scoring_passes_per_generation_batch"] == 1
    assert main["grpo"]["phases_mean"]["teacher"] == 0
    # the JSD kernel projects each completion row through both heads; GNDPO's head covers at least the completion
    # rows of the student re-score, the teacher and the loss
    assert main["distillation"]["head_rows_per_step"] == 2 * tokens
    assert main["gndpo"]["head_rows_per_step"] >= 3 * tokens
    assert 2 * tokens <= main["gndpo_sampler"]["head_rows_per_step"] < main["gndpo"]["head_rows_per_step"]
    check_rendered(markdown, entry)


@pytest.mark.slow
def test_vgs_comparison_runs_on_the_same_batches(vgs):
    results, markdown = vgs
    entry = results["tiny/qwen2_vl"]
    main = entry["main"]
    assert list(main) == ["gndpo", "gndpo_vgs"] and entry["spec"]["lr"] == 0
    hashes = [h for record in main.values() for h in record["batch_hashes"]]
    assert len(hashes) == 2 and len(hashes[0]) == 1 + STEPS and hashes[0] == hashes[1]
    for phase in ("vgs_text_view", "vgs_loss"):  # VGS's own phases are timed where it runs, and only there
        assert main["gndpo"]["phases_mean"][phase] == 0 < main["gndpo_vgs"]["phases_mean"][phase]
    check_rendered(markdown, entry)
    assert "same sampled batches: yes" in markdown


@pytest.mark.slow
def test_png_per_comparison(trainers, vgs, tmp_path):
    """The renderer draws one PNG per comparison, with a bar per trainer, from the JSON alone."""
    import matplotlib.image

    results = {**trainers[0], **vgs[0]}
    markdown = render.render(results, tmp_path, "OUT")
    for key, entry in results.items():
        png = tmp_path / f"OUT-{key.replace('/', '-')}.png"
        assert f"]({png.name})" in markdown
        height, width, _ = matplotlib.image.imread(png).shape
        assert width > height > 50 * len(entry["main"])


# three seconds each, mostly drawing PNGs: the quick suite keeps the one it always had
@pytest.mark.parametrize(
    "name", ["results", *(pytest.param(n, marks=pytest.mark.slow) for n in ("vgs_results", "quality"))]
)
def test_committed_results_are_rendered_from_their_json(name, tmp_path):
    """Each committed Markdown is what the renderer makes of its JSON (figures are never edited by hand; QUALITY.md's
    hand-written summary is kept)."""
    markdown = BENCHMARKS / f"{name.upper()}.md"
    copy = Path(shutil.copy(markdown, tmp_path))
    render.write(json.loads((BENCHMARKS / f"{name}.json").read_text()), copy)
    assert copy.read_text() == markdown.read_text()


def test_every_trainer_the_harness_runs_is_named_in_the_tables():
    from benchmarks import run

    assert set(run.CHOICES) <= set(render.NAMES) & set(render.SHORT)

"""benchmarks/quality.py at its smoke size (tiny models): the JSON it writes, the rates it chooses, the corruption of
the stress test, and the Markdown and plots rendered from the JSON (the hand-written summary survives a re-render)."""

import json
import math
from pathlib import Path

import pytest

from benchmarks import quality, render

LRS, SEEDS, STRESS_SEEDS = [1e-3, 1e-2], [0, 1], [0]


def arguments(out: Path) -> list[str]:
    return [
        "--size",
        "tiny",
        "--json",
        str(out / "quality.json"),
        "--markdown",
        str(out / "QUALITY.md"),
        "--lrs",
        *map(str, LRS),
        "--seeds",
        *map(str, SEEDS),
        "--stress-seeds",
        *map(str, STRESS_SEEDS),
    ]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    quality.main(arguments(out))
    return out, json.loads((out / "quality.json").read_text())


@pytest.mark.slow
def test_every_phase_is_recorded(measured):
    _, results = measured
    spec, runs = results["spec"], results["runs"]
    assert results["finished"]
    methods = list(quality.METHODS)
    phases = [(r["phase"], r["method"], r["seed"], r["lr"]) for r in runs]
    stress_lr = LRS[1]  # the middle of the swept rates
    assert spec["stress_lr"] == stress_lr
    assert phases == (
        [("sweep", m, SEEDS[0], stress_lr) for m in methods]
        + [("stress", m, s, stress_lr) for s in STRESS_SEEDS for m in quality.STRESS_METHODS]
        + [("sweep", m, SEEDS[0], LRS[0]) for m in methods]
        + [("seeds", m, s, results["chosen_lr"][m]) for s in SEEDS[1:] for m in methods]
    )
    for run in runs:
        assert [e["step"] for e in run["evals"]] == list(range(0, spec["steps"] + 1, spec["eval_every"]))
        assert all(e["tokens"] > 0 and math.isfinite(e["reverse_kl"]) for e in run["evals"])
        assert [s["step"] for s in run["steps"]] == list(range(1, spec["steps"] + 1))
        assert all(math.isfinite(s["grad_norm"]) and s["grad_norm"] > 0 for s in run["steps"])
        assert len(run["step_seconds"]) == spec["steps"]
        norms = sorted(s["grad_norm"] for s in run["steps"])
        assert run["grad_norm"]["max"] == norms[-1] and norms[0] <= run["grad_norm"]["median"] <= norms[-1]
        assert run["initial_kl"] == run["evals"][0]["reverse_kl"] and run["final_kl"] == run["evals"][-1]["reverse_kl"]
    # every run starts from the same student, measured on the same held-out draws
    assert len({r["initial_kl"] for r in runs}) == 1


@pytest.mark.slow
def test_each_method_runs_its_other_seeds_at_the_rate_with_the_lowest_sweep_kl(measured):
    _, results = measured
    for method in quality.METHODS:
        sweep = {r["lr"]: r["final_kl"] for r in results["runs"] if r["phase"] == "sweep" and r["method"] == method}
        assert results["chosen_lr"][method] == min(sweep, key=sweep.get)
        later = [r["lr"] for r in results["runs"] if r["method"] == method and r["phase"] == "seeds"]
        assert later and set(later) == {results["chosen_lr"][method]}


@pytest.mark.slow
def test_the_stress_test_corrupts_the_teacher_scores(measured):
    _, results = measured
    fraction = results["spec"]["corrupt_fraction"]
    for run in results["runs"]:
        clamped = [s["gndpo/clamped_frac"] for s in run["steps"] if s["gndpo/clamped_frac"] is not None]
        if run["stress"]:
            counts = run["corrupted_tokens"]
            assert 0 < counts["corrupted"] < counts["tokens"]
            # a corrupted token's signal reaches the clamp: the clamped share at least follows the corruption
            assert min(clamped) >= 0.5 * counts["corrupted"] / counts["tokens"]
        elif run["method"] in quality.STRESS_METHODS:
            assert run["corrupted_tokens"] is None and max(clamped) < 0.5 * fraction


@pytest.mark.slow
def test_markdown_and_plots_are_rendered_from_the_json(measured, tmp_path):
    out, results = measured
    text = (out / "QUALITY.md").read_text()
    assert text == render.render_quality(results, tmp_path, "QUALITY")  # the same file from the JSON alone
    for method, name in render.QUALITY_METHODS.items():
        assert f"| {name} | {results['chosen_lr'][method]:g} | {len(SEEDS)} |" in text
    for run in results["runs"]:
        if run["phase"] == "sweep":
            assert f"| {render.QUALITY_METHODS[run['method']]} | {run['lr']:g} | " in text
            assert render.fmt(run["final_kl"]) in text
    images = [line[line.index("(") + 1 : -1] for line in text.splitlines() if line.startswith("![")]
    assert len(images) == 4 and all((out / name).stat().st_size > 0 for name in images)

    # the summary is written by hand between the markers and survives a re-render
    written = text.replace("(not written yet)", "GNDPO wins here; it loses there.")
    (out / "QUALITY.md").write_text(written)
    render.write(results, out / "QUALITY.md")
    assert (out / "QUALITY.md").read_text() == written


@pytest.mark.slow
def test_a_partial_json_renders(measured, tmp_path):
    _, results = measured
    partial = dict(results, runs=results["runs"][:3], chosen_lr={}, finished=False)
    text = render.render_quality(partial, tmp_path)
    assert "INCOMPLETE: 3 runs recorded so far" in text
    assert "THE SWEEP IS NOT COMPLETE" in text
    # the best rate swept so far stands in for the chosen one; the method not yet run is in no table
    assert f"| {render.QUALITY_METHODS['gndpo']} | {LRS[1]:g} | 1 |" in text
    assert f"| {render.QUALITY_METHODS['distill_jsd']} |" not in text


@pytest.mark.slow
def test_resume_runs_only_what_is_missing(measured, tmp_path):
    _, results = measured
    kept = results["runs"][:-2]
    (tmp_path / "quality.json").write_text(json.dumps(dict(results, runs=kept, finished=False)))
    resumed = quality.main([*arguments(tmp_path), "--resume"])
    assert resumed["finished"] and resumed["runs"][: len(kept)] == kept
    key = lambda r: (r["phase"], r["method"], r["seed"], r["lr"])  # noqa: E731
    assert [key(r) for r in resumed["runs"]] == [key(r) for r in results["runs"]]
    assert "resumed with:" in resumed["command"]
    # more stress seeds: only their clean and corrupted runs are added
    more = quality.main([*arguments(tmp_path), "--resume", "--stress-seeds", "0", "1"])
    assert [key(r) for r in more["runs"][len(resumed["runs"]) :]] == [
        (phase, m, 1, more["spec"]["stress_lr"])
        for m in quality.STRESS_METHODS
        for phase in ("stress-clean", "stress")
    ]
    with pytest.raises(SystemExit, match="another spec"):
        quality.main([*arguments(tmp_path), "--resume", "--steps", "3"])

"""benchmarks/quality.py at its smoke size (tiny models): the JSON it writes, the rates it chooses (a sweep extends
until each method's best rate is inside it), the variants and seeds it runs, the corruption of the stress test, and the
Markdown and plots rendered from the JSON (the hand-written summary survives a re-render)."""

import json
import math
from pathlib import Path

import pytest

from benchmarks import quality, render

SPEC = quality.SIZES["tiny"]


def arguments(out: Path) -> list[str]:
    return ["--size", "tiny", "--json", str(out / "quality.json"), "--markdown", str(out / "QUALITY.md")]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    quality.main(arguments(out))
    return out, json.loads((out / "quality.json").read_text())


def key(run: dict) -> tuple:
    return run["phase"], run["arm"], run["method"], run["lr"], run["seed"]


@pytest.mark.slow
def test_every_phase_is_recorded(measured):
    _, results = measured
    spec, runs, chosen = results["spec"], results["runs"], results["chosen_lr"]
    assert results["finished"]
    first, later = SPEC["seeds"][0], SPEC["seeds"][1:]
    sweeps = [r for r in runs if r["phase"] == "sweep" and r["method"] in SPEC["methods"]]
    variants = [key(r) for r in runs if r["method"] in SPEC["variants"] and r["phase"] == "sweep"]
    seeds = [key(r) for r in runs if r["phase"] == "seeds"]
    stress = [key(r) for r in runs if r["phase"] == "stress"]
    assert [key(r) for r in runs] == [key(r) for r in sweeps] + variants + seeds + stress  # in that order
    for arm in SPEC["arms"]:  # the starting rates first, every method at each
        starts = [(m, lr) for lr in SPEC[f"{arm}_lrs"] for m in SPEC["methods"]]
        assert [(r["method"], r["lr"]) for r in sweeps if r["arm"] == arm][: len(starts)] == starts
    assert variants == [("sweep", a, v, chosen[a]["gndpo"], first) for a in SPEC["arms"] for v in SPEC["variants"]]
    assert seeds == [("seeds", arm, m, chosen[arm][m], s) for s in later for arm in SPEC["arms"]
                     for m in dict.fromkeys([*SPEC["methods"], results["recommended"][arm]])]  # fmt: skip
    assert stress == [("stress", "full", m, spec["stress_lr"], s) for s in SPEC["stress_seeds"]
                      for m in quality.STRESS_METHODS]  # fmt: skip
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
def test_each_best_rate_is_inside_its_sweep_or_at_the_ladders_end(measured):
    _, results = measured
    ladder = SPEC["ladder"]
    for arm in SPEC["arms"]:
        for method in SPEC["methods"]:
            sweep = {r["lr"]: r["final_kl"] for r in render.sweep_runs(results["runs"], arm, method)}
            best = results["chosen_lr"][arm][method]
            assert best == min(sweep, key=sweep.get)
            rates = sorted(sweep)  # a contiguous stretch of the ladder, from the starting rates outwards
            assert rates == ladder[ladder.index(rates[0]) : ladder.index(rates[-1]) + 1]
            assert rates[0] < best < rates[-1] or best in (ladder[0], ladder[-1])
        # the recommended recipe is the lowest of GNDPO and its variants at GNDPO's rate, on the first seed
        rate = results["chosen_lr"][arm]["gndpo"]
        runs = [r for m in ("gndpo", *SPEC["variants"]) for r in render.sweep_runs(results["runs"], arm, m)]
        at = {r["method"]: r["final_kl"] for r in runs if r["lr"] == rate}
        assert set(at) == {"gndpo", *SPEC["variants"]} and results["recommended"][arm] == min(at, key=at.get)


@pytest.mark.slow
def test_the_arms_and_variants_train_what_they_say(tmp_path):
    import torch

    from benchmarks.models import build
    from benchmarks.worker import make_trainer

    built = build({"size": "tiny"}, with_teacher=True)
    work = dict(SPEC, grad_accum=1, warmup=0, lr=1e-3, seed=0)
    full = make_trainer(dict(work, trainer="distill_rkl"), built, torch.device("cpu"), str(tmp_path))
    every = sum(p.numel() for p in full.model.parameters())
    for kind in ("gndpo", "distill_rkl"):  # both trainers get the same adapter: every linear layer, not the head
        fresh = build({"size": "tiny"}, with_teacher=True)  # PEFT adapts the model it is given in place
        lora = make_trainer(dict(work, trainer=kind, lora="all-linear"), fresh, torch.device("cpu"), str(tmp_path))
        named = lora.model.named_parameters()
        trained = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in named if p.requires_grad}
        assert trained == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert lora.model.peft_config["default"].r == 16
        assert all("lora_" in n for n, p in lora.model.named_parameters() if p.requires_grad)  # the base is frozen
        assert sum(p.numel() for p in lora.model.parameters() if not p.requires_grad) == every
    args = {kind: make_trainer(dict(work, trainer=kind), built, torch.device("cpu"), str(tmp_path)).args
            for kind in quality.VARIANTS}  # fmt: skip
    assert (args["gndpo_vopd"].value_baseline, args["gndpo_vopd"].value_baseline_top_k) == (True, 32)
    assert args["gndpo_tip"].token_selection == "quadrant"
    assert (args["gndpo_g4"].num_generations, args["gndpo_g4"].per_device_train_batch_size) == (4, SPEC["batch_size"])
    assert args["gndpo_tip"].num_generations == SPEC["num_generations"]


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
    for arm in SPEC["arms"]:
        for method in SPEC["methods"]:
            name = render.QUALITY_METHODS[method] + (" (recommended)" if results["recommended"][arm] == method else "")
            row = f"| {render.ARMS[arm]} | {name} | {results['chosen_lr'][arm][method]:g} | {len(SPEC['seeds'])} |"
            assert row in text
    for run in results["runs"]:
        if run["phase"] == "sweep":
            assert f"| {render.ARMS[run['arm']]} | {render.QUALITY_METHODS[run['method']]} | {run['lr']:g} | " in text
            assert render.fmt(run["final_kl"]) in text
    images = [line[line.index("(") + 1 : -1] for line in text.splitlines() if line.startswith("![")]
    assert len(images) == 4 and all((out / name).stat().st_size > 0 for name in images)
    assert "AT THE EDGE OF THE SWEEP" not in text.replace("AT THE EDGE OF THE SWEEP (the ladder's end)", "")

    # the summary is written by hand between the markers and survives a re-render
    written = text.replace("(not written yet)", "GNDPO wins here; it loses there.")
    (out / "QUALITY.md").write_text(written)
    render.write(results, out / "QUALITY.md")
    assert (out / "QUALITY.md").read_text() == written


@pytest.mark.slow
def test_a_partial_json_renders(measured, tmp_path):
    _, results = measured
    partial = dict(results, runs=results["runs"][:4], chosen_lr={}, recommended={}, finished=False)
    text = render.render_quality(partial, tmp_path)
    assert "INCOMPLETE: 4 runs recorded so far" in text
    # the best rate swept so far stands in for the chosen one; the arm not yet run is in no table
    first = results["runs"][0]
    assert f"| {render.ARMS['full']} | {render.QUALITY_METHODS[first['method']]}" in text
    assert f"| {render.ARMS['lora']} |" not in text


@pytest.mark.slow
def test_resume_runs_only_what_is_missing(measured, tmp_path):
    _, results = measured
    kept = results["runs"][:-3]
    (tmp_path / "quality.json").write_text(json.dumps(dict(results, runs=kept, finished=False)))
    resumed = quality.main([*arguments(tmp_path), "--resume"])
    assert resumed["finished"] and resumed["runs"][: len(kept)] == kept
    assert [key(r) for r in resumed["runs"]] == [key(r) for r in results["runs"]]
    assert "resumed with:" in resumed["command"]
    # more stress seeds: only their clean and corrupted runs are added
    more = quality.main([*arguments(tmp_path), "--resume", "--stress-seeds", "0", "1"])
    assert [key(r) for r in more["runs"][len(resumed["runs"]) :]] == [
        (phase, "full", m, more["spec"]["stress_lr"], 1) for m in quality.STRESS_METHODS
        for phase in ("stress-clean", "stress")
    ]  # fmt: skip
    with pytest.raises(SystemExit, match="another spec"):
        quality.main([*arguments(tmp_path), "--resume", "--steps", "3"])

"""Quality: how close each trainer brings the student to the teacher, per step and per second, and how stable it is.

    python benchmarks/quality.py --size smollm2 --json benchmarks/quality.json --markdown benchmarks/QUALITY.md
    python benchmarks/quality.py --render-only --json benchmarks/quality.json --markdown benchmarks/QUALITY.md
    python benchmarks/quality.py --size smollm2 --resume ...  # run only what a cut-short run left out

Methods, on identical models, prompts, completions per step, completion length and optimizer (full fine-tuning, no
LoRA, for all): ``gndpo`` (GNDPOTrainer, global whitening), ``opd`` (the same trainer with
``normalization_scope="none"``: the clamped log-ratio as the advantage, plain on-policy distillation), and TRL's
``DistillationTrainer`` with ``beta=1`` (``distill_rkl``: full-vocabulary reverse KL on student samples) and
``beta=0.5`` (``distill_jsd``). Every run measures the held-out exact reverse KL (`trl_gndpo.ReverseKLCallback`, fixed
seed, prompts never trained on) every ``eval_every`` steps, against steps and training seconds, and logs the gradient
norm (before clipping) of every step.

Phases, in this order so that a run cut short leaves the most telling records; each run's record is written to the
JSON as soon as it ends (a partial file renders):
1. ``sweep`` at the stress rate (the middle of the swept rates unless ``--stress-lr``): every method, first seed.
2. ``stress``: GNDPO and plain OPD at the stress rate with teacher log-probs corrupted on purpose: on a share
   ``corrupt_fraction`` of completion tokens the teacher's log-prob is lowered by ``corrupt_nats`` (a teacher that
   wrongly rules a token out: a tokenizer mismatch, an fp16 overflow); the evaluation still uses the true teacher.
   Each stressed run is compared with the clean run of the same method, rate and seed (a stress seed other than the
   first gets its clean run here too).
3. ``sweep`` at the other rates; each method's rate is then the one with the lowest final held-out KL.
4. ``seeds``: every method at its chosen rate on the other seeds.

The Markdown keeps the hand-written summary between its two summary markers; everything else in it is generated.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # this checkout's trl_gndpo, not an installed one

from render import fmt, table  # noqa: E402

METHODS = {
    "gndpo": "GNDPO (global whitening)",
    "opd": "plain OPD (scope none)",
    "distill_rkl": "DistillationTrainer beta=1 (reverse KL)",
    "distill_jsd": "DistillationTrainer beta=0.5 (JSD)",
}
STRESS_METHODS = ("gndpo", "opd")
SUMMARY_START, SUMMARY_END = "<!-- summary: written by hand -->", "<!-- end of summary -->"

# Per size: completions per step (per-device batch; one micro-step per optimizer step), completions per prompt,
# completion length, optimizer steps, evaluation interval, held-out prompts x samples, learning rates, seeds, and the
# stress test's corruption.
SIZES = {
    "tiny": dict(
        batch_size=4,
        num_generations=2,
        completion_length=8,
        steps=2,
        eval_every=1,
        heldout_prompts=4,
        heldout_samples=1,
        lrs=[1e-3, 1e-2],
        seeds=[0, 1],
        stress_seeds=[0],
        stress_lr=None,
        corrupt_fraction=0.1,
        corrupt_nats=20.0,
        threads=1,
    ),
    "smollm2": dict(
        batch_size=8,
        num_generations=2,
        completion_length=16,
        steps=12,
        eval_every=4,
        heldout_prompts=8,
        heldout_samples=2,
        lrs=[3e-5, 1e-4, 3e-4],
        seeds=[0, 1, 2],
        stress_seeds=[0, 1, 2],
        stress_lr=None,
        corrupt_fraction=0.05,
        corrupt_nats=20.0,
        threads=1,
    ),
}


def build_models(spec: dict) -> dict:
    """Fresh student and teacher (so every run starts from the same weights), tokenizer, train and held-out prompts."""
    import torch

    if spec["size"] == "smollm2":
        from models import SMOLLM2_PRUNE_FRACTION
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from trl_gndpo.demo import demo_prompts, prepare_models

        teacher_dir, student_dir = prepare_models(spec.get("cache_dir"), SMOLLM2_PRUNE_FRACTION)
        load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # noqa: E731
        student, teacher = load(student_dir), load(teacher_dir)
        tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
        train, heldout = demo_prompts()
        heldout = [[{"role": "user", "content": q}] for q in heldout]
        description = (
            f"SmolLM2-135M-Instruct teacher ({teacher.config.num_hidden_layers} layers), student with "
            f"{student.config.num_hidden_layers} of its layers, vocabulary {student.config.vocab_size:,}, "
            "float32"
        )
        return dict(
            student=student,
            teacher=teacher,
            tokenizer=tokenizer,
            train=list(train["prompt"]),
            heldout=heldout[: spec["heldout_prompts"]],
            description=description,
        )
    tests = Path(__file__).resolve().parent.parent / "tests"
    if str(tests) not in sys.path:
        sys.path.insert(0, str(tests))
    import tiny_models as tiny

    prompts = [row["prompt"] for row in tiny.make_text_dataset(64 + spec["heldout_prompts"])]
    return dict(
        student=tiny.make_text_model("qwen2", seed=0),
        teacher=tiny.make_text_model("qwen2", seed=1, hidden_size=128, num_hidden_layers=3),
        tokenizer=tiny.make_tokenizer(),
        train=prompts[:64],
        heldout=prompts[64:],
        description="tiny Qwen2: student hidden 64 x 2 layers, teacher hidden 128 x 3 layers, vocabulary 320",
    )


def corrupt_teacher(trainer, fraction: float, nats: float, seed: int) -> dict:
    """Lower the teacher's log-prob by `nats` on a random share `fraction` of completion tokens, on this trainer
    instance only (its `_score_tokens` is wrapped; library code is unchanged). Returns the running counts."""
    import torch

    original, generator = trainer._score_tokens, torch.Generator().manual_seed(10_000 + seed)
    counts = {"corrupted": 0, "tokens": 0}

    def scored(batch, inputs, mode):
        scores = original(batch, inputs, mode)
        mask = batch["completion_mask"].bool()
        hit = (torch.rand(mask.shape, generator=generator) < fraction).to(mask.device) & mask
        scores["teacher"] = torch.where(hit, scores["teacher"] - nats, scores["teacher"])
        counts["corrupted"] += int(hit.sum())
        counts["tokens"] += int(mask.sum())
        return scores

    trainer._score_tokens = scored
    return counts


def make_trainer(method: str, spec: dict, built: dict, lr: float, seed: int, output_dir: str):
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    from trl_gndpo import GNDPOConfig, GNDPOTrainer

    prompts = built["train"]
    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        max_steps=spec["steps"],
        learning_rate=lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        seed=seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        max_completion_length=spec["completion_length"],
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        disable_dropout=True,
        activation_checkpointing=False,
        use_cpu=True,
        bf16=False,
    )
    if method in ("gndpo", "opd"):
        args = GNDPOConfig(
            **common,
            num_generations=spec["num_generations"],
            normalization_scope="global" if method == "gndpo" else "none",
        )
        return GNDPOTrainer(
            model=built["student"],
            teacher_model=built["teacher"],
            args=args,
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            processing_class=built["tokenizer"],
            teacher_processing_class=built["tokenizer"],
        )
    # DistillationTrainer samples one completion per dataset row: each prompt repeated num_generations times, so a step
    # sees the same prompts and completion count as GRPO-style grouping
    repeated = [p for p in prompts for _ in range(spec["num_generations"])]
    fields = {f.name for f in dataclasses.fields(DistillationConfig)}
    args = DistillationConfig(
        **{k: v for k, v in common.items() if k in fields}, beta=1.0 if method == "distill_rkl" else 0.5
    )
    return DistillationTrainer(
        model=built["student"],
        teacher_model=built["teacher"],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": repeated}),
        processing_class=built["tokenizer"],
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def grad_stats(norms: list[float]) -> dict:
    norms = [n for n in norms if n is not None and math.isfinite(n)]
    if not norms:
        return {"median": None, "p99": None, "max": None}
    return {"median": statistics.median(norms), "p99": percentile(norms, 0.99), "max": max(norms)}


def run_one(method: str, spec: dict, lr: float, seed: int, phase: str, stress: bool = False) -> dict:
    import torch
    from transformers import TrainerCallback

    from trl_gndpo import ReverseKLCallback

    torch.manual_seed(seed)
    built = build_models(spec)
    trainer = make_trainer(method, spec, built, lr, seed, tempfile.mkdtemp(prefix="gndpo-quality-"))
    counts = corrupt_teacher(trainer, spec["corrupt_fraction"], spec["corrupt_nats"], seed) if stress else None
    evaluation = ReverseKLCallback(
        trainer,
        built["teacher"],
        built["heldout"],
        eval_steps=spec["eval_every"],
        num_samples=spec["heldout_samples"],
        max_new_tokens=spec["completion_length"],
        seed=1234,
        batch_size=16,
    )

    class StepClock(TrainerCallback):
        """Wall-clock seconds of each optimizer step, evaluations excluded (they run after on_step_end's clock)."""

        def __init__(self):
            self.seconds, self._start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._start)

    clock = StepClock()
    trainer.add_callback(clock)  # before the evaluation callback: its step clock stops before an evaluation starts
    trainer.add_callback(evaluation)
    began = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - began
    keys = ("grad_norm", "loss", "gndpo/clamped_frac", "gndpo/reverse_kl", "gndpo/advantage_abs_max")
    steps = [{"step": e["step"], **{k: e.get(k) for k in keys}} for e in trainer.state.log_history if "grad_norm" in e]
    history = evaluation.history
    record = {
        "method": method,
        "lr": lr,
        "seed": seed,
        "phase": phase,
        "stress": stress,
        "evals": history,
        "steps": steps,
        "step_seconds": clock.seconds,
        "grad_norm": grad_stats([s["grad_norm"] for s in steps]),
        "initial_kl": history[0]["reverse_kl"],
        "final_kl": history[-1]["reverse_kl"],
        "train_seconds": history[-1]["train_seconds"],
        "wall_seconds": wall,
        "corrupted_tokens": counts,
        "description": built["description"],
    }
    del trainer, built
    return record


def environment() -> dict:
    import os
    import platform

    import torch
    import transformers
    import trl

    import trl_gndpo

    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.machine(),
    )
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "trl_gndpo": trl_gndpo.__version__,
        },
    }


def choose_lrs(runs: list[dict], methods) -> dict:
    """Per method, the learning rate whose sweep run ends with the lowest held-out KL."""
    chosen = {}
    for method in methods:
        sweep = [r for r in runs if r["method"] == method and r["phase"] == "sweep"]
        if sweep:
            chosen[method] = min(sweep, key=lambda r: r["final_kl"])["lr"]
    return chosen


def measure(spec: dict, json_path: Path, markdown: Path | None, command: str, resume: bool = False) -> dict:
    """Run every phase; with `resume`, keep the runs already in `json_path` and run only the others.

    A resumed spec may list other seeds or stress seeds (each record is keyed by its seed), nothing else may change.
    """
    import torch
    from transformers.utils import logging

    logging.set_verbosity_error()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    results = {
        "spec": spec,
        "command": command,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "environment": environment(),
        "runs": [],
        "chosen_lr": {},
        "finished": False,
    }
    if resume and json_path.exists():
        previous = json.loads(json_path.read_text())
        free = {"cache_dir": None, "seeds": None, "stress_seeds": None}
        if {**previous["spec"], **free} != {**spec, **free}:
            raise SystemExit(f"--resume: {json_path} was measured with another spec: {previous['spec']}")
        results["runs"] = previous["runs"]
        results["command"] = f"{previous['command']}; resumed with: {command}"
    done = {(r["method"], r["lr"], r["seed"], r["phase"]) for r in results["runs"]}

    def run(method, lr, seed, phase, stress=False):
        if (method, lr, seed, phase) not in done:
            add(run_one(method, spec, lr, seed, phase, stress))

    def add(record):
        results["runs"].append(record)
        print(
            f"{record['phase']:>6} {record['method']:<12} lr {record['lr']:g} seed {record['seed']}"
            f"{' stress' if record['stress'] else ''}: KL {record['initial_kl']:.4f} -> {record['final_kl']:.4f}, "
            f"grad norm median {fmt(record['grad_norm']['median'])} max {fmt(record['grad_norm']['max'])}, "
            f"{record['wall_seconds']:.0f} s",
            flush=True,
        )
        save(results, json_path, markdown)

    methods, first, stress_lr = spec["methods"], spec["seeds"][0], spec["stress_lr"]
    for method in methods:
        run(method, stress_lr, first, "sweep")
    for seed in spec["stress_seeds"]:
        for method in (m for m in STRESS_METHODS if m in methods):
            if seed != first:
                run(method, stress_lr, seed, "stress-clean")
            run(method, stress_lr, seed, "stress", stress=True)
    for lr in (x for x in spec["lrs"] if x != stress_lr):  # methods interleaved: a drift of the machine hits all alike
        for method in methods:
            run(method, lr, first, "sweep")
    results["chosen_lr"] = choose_lrs(results["runs"], methods)
    for seed in spec["seeds"][1:]:
        for method in methods:
            run(method, results["chosen_lr"][method], seed, "seeds")
    results["finished"] = True
    save(results, json_path, markdown)
    return results


def save(results: dict, json_path: Path, markdown: Path | None) -> None:
    json_path.write_text(json.dumps(results, indent=1))
    if markdown is not None:
        write_markdown(results, markdown)


# ---------------------------------------------------------------------------------------------------------------------
# Rendering: numbers and plots only; the judgement is the hand-written summary the Markdown keeps.


def main_runs(results: dict, method: str) -> list[dict]:
    """The runs of `method` at its chosen rate: the sweep's run on the first seed and the `seeds` phase's."""
    lr = results["chosen_lr"].get(method)
    return [r for r in results["runs"] if r["method"] == method and r["lr"] == lr and r["phase"] in ("sweep", "seeds")]


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return fmt(values[0])
    return (
        f"{fmt(statistics.mean(values))} ± {fmt(statistics.stdev(values))} ({fmt(min(values))} to {fmt(max(values))})"
    )


def mean_curve(runs: list[dict], x: str) -> tuple[list[float], list[float], list[float]]:
    """Per evaluation index: mean x, mean KL, and the KL's spread (min, max) over runs of equal length."""
    n = min(len(r["evals"]) for r in runs)
    xs = [statistics.mean(r["evals"][i][x] for r in runs) for i in range(n)]
    ys = [[r["evals"][i]["reverse_kl"] for r in runs] for i in range(n)]
    return xs, [statistics.mean(y) for y in ys], [(min(y), max(y)) for y in ys]


def plots(results: dict, outdir: Path, stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, methods = [], [m for m in results["spec"]["methods"] if main_runs(results, m)]
    for x, label in (("step", "optimizer step"), ("train_seconds", "training seconds (evaluations excluded)")):
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, method in enumerate(methods):
            runs = main_runs(results, method)
            xs, ys, band = mean_curve(runs, x)
            ax.plot(
                xs,
                ys,
                marker="o",
                color=plt.cm.tab10(i),
                label=f"{METHODS[method]}, lr {results['chosen_lr'][method]:g} ({len(runs)} seeds)",
            )
            ax.fill_between(xs, [b[0] for b in band], [b[1] for b in band], color=plt.cm.tab10(i), alpha=0.15)
        ax.set_xlabel(label)
        ax.set_ylabel("held-out reverse KL (nats/token)")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
        name = f"{stem}-kl-{'step' if x == 'step' else 'seconds'}.png"
        fig.savefig(outdir / name, dpi=100, bbox_inches="tight")
        plt.close(fig)
        names.append(name)
    groups = [(METHODS[m], main_runs(results, m)) for m in methods]
    groups += [
        (f"{METHODS[m]}, {label} teacher, lr {results['spec']['stress_lr']:g}", stress_runs(results, m, stress))
        for m in STRESS_METHODS
        for stress, label in ((False, "clean"), (True, "corrupted"))
    ]
    groups = [(label, [s["grad_norm"] for r in runs for s in r["steps"]]) for label, runs in groups if runs]
    fig, ax = plt.subplots(figsize=(7, 1 + 0.6 * len(groups)))
    ax.boxplot([g[1] for g in groups], orientation="horizontal", whis=(0, 100))
    ax.set_yticks(range(1, len(groups) + 1), [g[0] for g in groups], fontsize="small")
    ax.set_xscale("log")
    ax.set_xlabel("gradient norm before clipping, every step of every run (whiskers: min, max)")
    ax.invert_yaxis()
    name = f"{stem}-grad-norm.png"
    fig.savefig(outdir / name, dpi=100, bbox_inches="tight")
    plt.close(fig)
    names.append(name)
    stressed = [m for m in STRESS_METHODS if any(r["method"] == m and r["stress"] for r in results["runs"])]
    if stressed:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for i, method in enumerate(stressed):
            for stress, style in ((False, "-"), (True, "--")):
                runs = stress_runs(results, method, stress)
                if not runs:
                    continue
                label = f"{METHODS[method]}{', corrupted' if stress else ''}"
                xs, ys, _ = mean_curve(runs, "step")
                axes[0].plot(xs, ys, style, marker="o", color=plt.cm.tab10(i), label=label)
                steps = [s["step"] for s in runs[0]["steps"]]
                norms = [statistics.mean(r["steps"][j]["grad_norm"] for r in runs) for j in range(len(steps))]
                axes[1].plot(steps, norms, style, color=plt.cm.tab10(i), label=label)
        axes[0].set(xlabel="optimizer step", ylabel="held-out reverse KL (nats/token)")
        axes[1].set(xlabel="optimizer step", ylabel="gradient norm (mean over seeds)", yscale="log")
        for ax in axes:
            ax.legend(fontsize="small")
            ax.grid(alpha=0.3)
        name = f"{stem}-stress.png"
        fig.savefig(outdir / name, dpi=100, bbox_inches="tight")
        plt.close(fig)
        names.append(name)
    return names


def stress_runs(results: dict, method: str, stress: bool) -> list[dict]:
    """The stress runs of `method`, or (stress=False) its clean runs on the same seeds at the same rate."""
    stressed = [r for r in results["runs"] if r["method"] == method and r["stress"]]
    if stress:
        return stressed
    pairs, clean = {(r["seed"], r["lr"]) for r in stressed}, {}
    for r in results["runs"]:  # one clean run per seed: a `seeds` run at the stress rate is also a stress-clean one
        if r["method"] == method and not r["stress"] and (r["seed"], r["lr"]) in pairs:
            clean.setdefault((r["seed"], r["lr"]), r)
    return [clean[key] for key in sorted(clean)]


def render(results: dict, outdir: Path, stem: str = "QUALITY", summary: str = "") -> str:
    spec, runs = results["spec"], results["runs"]
    swept = {(r["method"], r["lr"]) for r in runs if r["phase"] == "sweep"}
    complete_sweep = swept == {(m, lr) for m in spec["methods"] for lr in spec["lrs"]}
    if not results["chosen_lr"]:  # a partial file: the best rate among those swept so far
        results = dict(results, chosen_lr=choose_lrs(runs, spec["methods"]))
    env = results["environment"]
    lines = [
        "# Quality: GNDPO vs plain OPD vs TRL's DistillationTrainer",
        "",
        "<!-- Generated by benchmarks/quality.py from benchmarks/quality.json, except the summary between the "
        "markers: do not edit the rest. -->",
        "",
        "## Summary",
        "",
        SUMMARY_START,
        summary.strip() or "(not written yet)",
        SUMMARY_END,
        "",
    ]
    status = "finished" if results.get("finished") else f"INCOMPLETE: {len(runs)} runs recorded so far"
    first = runs[0]["description"] if runs else "-"
    lines += [
        "## Set-up",
        "",
        f"Command: `{results['command']}` (started {results['started']}, {status}).",
        "",
        f"Models: {first}. Machine: {env['cpu']}, {env['cpu_cores']} cores, {env['torch_threads']} torch threads; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
        + ".",
        "",
        f"Work per optimizer step, identical for every method: {spec['batch_size']} sampled completions of at most "
        f"{spec['completion_length']} tokens ({spec['batch_size'] // spec['num_generations']} prompts x "
        f"{spec['num_generations']}), temperature 1, no top-p/top-k, one micro-step, AdamW at a constant rate, "
        "no weight "
        f"decay, gradient clipping at 1 (TRL's default), full fine-tuning (no LoRA), {spec['steps']} steps. Held-out "
        f"evaluation every {spec['eval_every']} steps: {spec['heldout_prompts']} prompts never trained on x "
        f"{spec['heldout_samples']} samples of at most {spec['completion_length']} tokens, seed fixed, exact reverse "
        "KL(student || teacher) over the full vocabulary per sampled token (`trl_gndpo.ReverseKLCallback`).",
        "",
        f"Learning rates swept on seed {spec['seeds'][0]}: {', '.join(f'{x:g}' for x in spec['lrs'])}; each method's "
        f"rate is the one with the lowest final held-out KL there, then run on seeds "
        f"{', '.join(map(str, spec['seeds'][1:])) or '-'} (the sweep's run is reused as the first seed)."
        + (
            "" if complete_sweep else " THE SWEEP IS NOT COMPLETE: the rates below are the best of those swept so far."
        ),
        "",
    ]
    methods = [m for m in spec["methods"] if main_runs(results, m)]
    rows = []
    for m in methods:
        rs = main_runs(results, m)
        norms = [s["grad_norm"] for r in rs for s in r["steps"]]
        g = grad_stats(norms)
        step_s = statistics.median(s for r in rs for s in r["step_seconds"])
        rows.append(
            [
                METHODS[m],
                f"{results['chosen_lr'][m]:g}",
                len(rs),
                spread([r["initial_kl"] for r in rs]),
                spread([r["final_kl"] for r in rs]),
                spread([100 * (1 - r["final_kl"] / r["initial_kl"]) for r in rs]),
                fmt(step_s),
                spread([r["train_seconds"] for r in rs]),
                fmt(g["median"]),
                fmt(g["p99"]),
                fmt(g["max"]),
                fmt(g["max"] / g["median"]) if g["median"] else "-",
            ]
        )
    lines += [
        "## Each method at its best learning rate",
        "",
        "Held-out reverse KL (nats/token): mean ± standard deviation over seeds (min to max). Gradient norms: "
        "every step of every seed pooled; the losses differ in scale, so compare the spread (p99, max over "
        "the median) across methods rather than the level. Seconds are wall-clock time on the machine above, "
        "evaluations excluded: work running beside the benchmark inflates them (the step median is the least "
        "affected).",
        "",
    ]
    lines += table(
        [
            "method",
            "lr",
            "seeds",
            "KL at step 0",
            f"KL at step {spec['steps']}",
            "KL reduction (%)",
            "step median (s)",
            "training seconds",
            "grad-norm median",
            "p99",
            "max",
            "max / median",
        ],
        rows,
    )
    names = plots(results, outdir, stem) if methods else []
    lines += [f"![{n}]({n})" for n in names if "kl-" in n] + [""]
    if methods:
        steps = [e["step"] for e in main_runs(results, methods[0])[0]["evals"]]
        curve = [[METHODS[m], *(fmt(y) for y in mean_curve(main_runs(results, m), "step")[1])] for m in methods]
        lines += ["Mean held-out reverse KL over seeds at each evaluation:", ""]
        lines += table(["method", *(f"step {s}" for s in steps)], curve)
    sweep = [
        [
            METHODS[r["method"]],
            f"{r['lr']:g}",
            fmt(r["initial_kl"]),
            fmt(r["final_kl"]),
            fmt(r["grad_norm"]["median"]),
            fmt(r["grad_norm"]["max"]),
            "yes" if results["chosen_lr"].get(r["method"]) == r["lr"] else "",
        ]
        for r in sorted(
            (r for r in runs if r["phase"] == "sweep"), key=lambda r: (list(METHODS).index(r["method"]), r["lr"])
        )
    ]
    lines += ["## Learning-rate sweep", "", f"Seed {spec['seeds'][0]}, held-out reverse KL (nats/token).", ""]
    lines += table(
        ["method", "lr", "KL at step 0", f"KL at step {spec['steps']}", "grad-norm median", "grad-norm max", "chosen"],
        sweep,
    )
    lines += [
        "## Stability stress test: a corrupted teacher",
        "",
        f"GNDPO and plain OPD at the same rate, {spec['stress_lr']:g}; "
        f"on {100 * spec['corrupt_fraction']:g}% of the completion "
        f"tokens (drawn at random) the teacher's log-prob is lowered by {spec['corrupt_nats']:g} nats before the "
        "token signal is computed (which then clamps it at -5); the held-out evaluation uses the true teacher. "
        "Each stressed run is set beside the clean run of the same method, rate and seed.",
        "",
    ]
    rows = []
    for m in STRESS_METHODS:
        for stress in (False, True):
            rs = stress_runs(results, m, stress)
            if not rs:
                continue
            g = grad_stats([s["grad_norm"] for r in rs for s in r["steps"]])
            clamped = [
                s["gndpo/clamped_frac"] for r in rs for s in r["steps"] if s.get("gndpo/clamped_frac") is not None
            ]
            corrupted = [r["corrupted_tokens"] for r in rs if r["corrupted_tokens"]]
            share = (
                (sum(c["corrupted"] for c in corrupted) / max(sum(c["tokens"] for c in corrupted), 1))
                if corrupted
                else 0
            )
            rows.append(
                [
                    METHODS[m],
                    "corrupted" if stress else "clean",
                    ", ".join(str(r["seed"]) for r in rs),
                    f"{100 * share:.1f}",
                    spread([r["final_kl"] for r in rs]),
                    fmt(g["median"]),
                    fmt(g["p99"]),
                    fmt(g["max"]),
                    fmt(g["max"] / g["median"]) if g["median"] else "-",
                    fmt(statistics.mean(clamped)) if clamped else "-",
                ]
            )
    if rows:
        lines += table(
            [
                "method",
                "teacher",
                "seeds",
                "tokens corrupted (%)",
                f"KL at step {spec['steps']}",
                "grad-norm median",
                "p99",
                "max",
                "max / median",
                "clamped fraction (mean)",
            ],
            rows,
        )
    else:
        lines += ["Not measured yet.", ""]
    lines += [f"![{n}]({n})" for n in names if "kl-" not in n] + [""]
    return "\n".join(lines)


def existing_summary(path: Path) -> str:
    if not path.exists():
        return ""
    text = path.read_text()
    if SUMMARY_START not in text or SUMMARY_END not in text:
        return ""
    summary = text.split(SUMMARY_START, 1)[1].split(SUMMARY_END, 1)[0].strip()
    return "" if summary == "(not written yet)" else summary


def write_markdown(results: dict, path: Path) -> None:
    path.write_text(render(results, path.parent, path.stem, existing_summary(path)))


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="smollm2")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "quality.json")
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--render-only", action="store_true", help="render the JSON without measuring")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already in --json (measured with the same settings), run the missing ones",
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--cache-dir", default=None, help="where the converted SmolLM2 models are kept")
    for key, value in SIZES["smollm2"].items():  # every size parameter can be overridden
        if value is None:
            parser.add_argument(f"--{key.replace('_', '-')}", type=float)
            continue
        kind = type(value[0]) if isinstance(value, list) else type(value)
        parser.add_argument(f"--{key.replace('_', '-')}", type=kind, nargs="*" if isinstance(value, list) else None)
    args = parser.parse_args(argv)
    if args.render_only:
        results = json.loads(args.json.read_text())
        write_markdown(results, args.markdown)
        return results
    spec = {"size": args.size, **SIZES[args.size], "methods": args.methods, "cache_dir": args.cache_dir}
    spec.update({k: v for k in SIZES[args.size] if (v := getattr(args, k)) is not None})
    if spec["stress_lr"] is None:
        spec["stress_lr"] = spec["lrs"][len(spec["lrs"]) // 2]
    if spec["batch_size"] % spec["num_generations"]:
        parser.error("--batch-size must be a multiple of --num-generations")
    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    return measure(spec, args.json, args.markdown, command, args.resume)


if __name__ == "__main__":
    main()

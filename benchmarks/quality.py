"""Quality: how close each trainer brings the student to the teacher, per step and per second, and how stable it is.

    python -m benchmarks.quality --size smollm2 --json benchmarks/quality.json --markdown benchmarks/QUALITY.md
    python -m benchmarks.quality --size smollm2 --resume ...  # run only what a cut-short run left out
    python -m benchmarks.render benchmarks/quality.json benchmarks/QUALITY.md  # re-render only

Methods, on identical models, prompts, completions per step, completion length and optimizer: ``gndpo``
(GNDPOTrainer), ``opd`` (``normalization_scope="none"``: plain on-policy distillation), TRL's ``DistillationTrainer``
with ``beta=1`` (``distill_rkl``) or ``beta=0.5`` (``distill_jsd``), and GNDPO variants (`worker.KINDS`):
``gndpo_vopd`` (vOPD value baseline, top-32), ``gndpo_tip`` (TIP, quadrant), ``gndpo_g4`` (4 completions per prompt,
same batch).
Two arms: ``full`` fine-tuning and ``lora`` (r=16, alpha 32, every linear layer). Every run measures the held-out exact
reverse KL (`trl_gndpo.ReverseKLCallback`, fixed seed, prompts never trained on) every ``eval_every`` steps, against
steps and training seconds, and logs the gradient norm (before clipping) of every step.

Phases, in this order so that a run cut short leaves the most telling records (each record is written to the JSON as
soon as its run ends; a partial file renders):
1. ``sweep``, per arm, first seed: every method at the arm's starting rates; then, while a method's best rate is the
   lowest or the highest it has run, the next rate of ``ladder`` beyond it (so the best ends inside, or at the ladder's
   end, which the Markdown says).
2. ``sweep`` of the variants at GNDPO's best rate of the arm only; the arm's recommended recipe is the lowest final KL
   of GNDPO and its variants there.
3. ``seeds``: every method and the recommended recipe at its rate on the other seeds.
4. ``stress`` (full fine-tuning, ``stress_lr``: the middle starting rate unless set): GNDPO and plain OPD with the
   teacher's log-prob lowered by ``corrupt_nats`` on a share ``corrupt_fraction`` of completion tokens (a teacher that
   wrongly rules a token out), beside the clean run of the same method, rate and seed (run here for other seeds).

Models and trainers are the trainer comparison's (`models.build`, `worker.make_trainer`), at this file's sizes; the
Markdown (`render.py`, rewritten after every run) keeps the hand-written summary between its two summary markers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

from . import render
from .models import build
from .worker import StepTimer, environment, make_trainer

METHODS = ("gndpo", "opd", "distill_rkl", "distill_jsd")
VARIANTS = ("gndpo_vopd", "gndpo_tip", "gndpo_g4")
STRESS_METHODS = ("gndpo", "opd")

# Per size: completions per step (per-device batch; one micro-step per optimizer step), completions per prompt,
# completion length, optimizer steps, evaluation interval, held-out prompts x samples, the arms, their starting
# rates and the ladder a sweep extends along, methods, variants, seeds, and the stress test's rate, seeds, corruption.
SIZES = {
    "tiny": dict(batch_size=4, num_generations=2, completion_length=8, steps=2, eval_every=1, heldout_prompts=4,
                 heldout_samples=1, arms=["full", "lora"], full_lrs=[1e-3, 1e-2], lora_lrs=[1e-2],
                 ladder=[1e-4, 1e-3, 1e-2], methods=["gndpo", "opd", "distill_rkl"], variants=list(VARIANTS),
                 seeds=[0, 1], stress_seeds=[0],
                 stress_lr=None, corrupt_fraction=0.1, corrupt_nats=20.0, threads=1),
    "smollm2": dict(batch_size=8, num_generations=2, completion_length=16, steps=8, eval_every=4, heldout_prompts=8,
                    heldout_samples=2, arms=["lora", "full"], full_lrs=[3e-5, 1e-4, 3e-4],
                    lora_lrs=[1e-4, 3e-4, 1e-3, 3e-3], ladder=[1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
                    methods=["gndpo", "opd", "distill_rkl"], variants=list(VARIANTS), seeds=[0, 1, 2],
                    stress_seeds=[0], stress_lr=None, corrupt_fraction=0.05, corrupt_nats=20.0, threads=1),
}  # fmt: skip


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


def run_one(arm: str, method: str, spec: dict, lr: float, seed: int, phase: str, stress: bool = False) -> dict:
    import torch

    from trl_gndpo import ReverseKLCallback

    torch.manual_seed(seed)
    built = build(spec, with_teacher=True)
    work = dict(spec, trainer=method, grad_accum=1, warmup=0, lr=lr, seed=seed, lora=arm == "lora" and "all-linear")
    # unlike the trainer comparison: completions of at most completion_length tokens, shuffled prompts, no weight decay
    trainer = make_trainer(work, built, torch.device("cpu"), tempfile.mkdtemp(prefix="gndpo-quality-"),
                           weight_decay=0.0, shuffle_dataset=True, generation_kwargs=None)  # fmt: skip
    counts = corrupt_teacher(trainer, spec["corrupt_fraction"], spec["corrupt_nats"], seed) if stress else None
    evaluation = ReverseKLCallback(trainer, built["teacher"], built["heldout"][: spec["heldout_prompts"]],
                                   eval_steps=spec["eval_every"], num_samples=spec["heldout_samples"],
                                   max_new_tokens=spec["completion_length"], seed=1234, batch_size=16)  # fmt: skip
    clock = StepTimer()
    trainer.add_callback(clock)  # before the evaluation callback: its step clock stops before an evaluation starts
    trainer.add_callback(evaluation)
    began = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - began
    keys = ("grad_norm", "loss", "entropy", "gndpo/clamped_frac", "gndpo/reverse_kl", "gndpo/advantage_abs_max")
    steps = [{"step": e["step"], **{k: e.get(k) for k in keys}} for e in trainer.state.log_history if "grad_norm" in e]
    history = evaluation.history
    return dict(arm=arm, method=method, lr=lr, seed=seed, phase=phase, stress=stress, evals=history, steps=steps,
                step_seconds=clock.seconds, grad_norm=render.grad_stats([s["grad_norm"] for s in steps]),
                initial_kl=history[0]["reverse_kl"], final_kl=history[-1]["reverse_kl"],
                train_seconds=history[-1]["train_seconds"], wall_seconds=wall, corrupted_tokens=counts,
                description=built["description"])  # fmt: skip


def measure(spec: dict, json_path: Path, markdown: Path | None, command: str, resume: bool = False) -> dict:
    """Run every phase; with `resume`, keep the runs already in `json_path` and run only the others.

    A resumed spec may list other seeds or stress seeds (each record is keyed by its seed), nothing else may change.
    """
    import torch
    from transformers.utils import logging

    logging.set_verbosity_error()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    machine, now = environment(torch.device("cpu")), datetime.datetime.now(datetime.UTC)
    results = dict(spec=spec, command=command, started=now.isoformat(timespec="seconds"), runs=[], chosen_lr={},
                   environment={**machine["machine"], "versions": machine["versions"]}, recommended={},
                   finished=False)  # fmt: skip
    if resume and json_path.exists():
        previous = json.loads(json_path.read_text())
        free = {"cache_dir": None, "seeds": None, "stress_seeds": None}
        if {**previous["spec"], **free} != {**spec, **free}:
            raise SystemExit(f"--resume: {json_path} was measured with another spec: {previous['spec']}")
        results["runs"] = previous["runs"]
        results["command"] = f"{previous['command']}; resumed with: {command}"
    done = {(r["arm"], r["method"], r["lr"], r["seed"], r["phase"]) for r in results["runs"]}

    def run(arm, method, lr, seed, phase, stress=False):
        if (arm, method, lr, seed, phase) not in done:
            add(run_one(arm, method, spec, lr, seed, phase, stress))

    def add(record):
        results["runs"].append(record)
        norms = {k: render.fmt(v) for k, v in record["grad_norm"].items()}
        print(f"{record['phase']:>6} {record['arm']:<4} {record['method']:<12} lr {record['lr']:g} seed "
              f"{record['seed']}{' stress' if record['stress'] else ''}: KL {record['initial_kl']:.4f} -> "
              f"{record['final_kl']:.4f}, grad norm median {norms['median']} max {norms['max']}, "
              f"{record['wall_seconds']:.0f} s", flush=True)  # fmt: skip
        save(results, json_path, markdown)

    methods, first, ladder = spec["methods"], spec["seeds"][0], spec["ladder"]
    for arm in spec["arms"]:
        for lr in spec[f"{arm}_lrs"]:  # methods interleaved: a drift of the machine hits all alike
            for method in methods:
                run(arm, method, lr, first, "sweep")
        for method in methods:  # walk the ladder while the best rate is at an edge of those run
            while True:
                swept = sorted(r["lr"] for r in results["runs"] if (r["arm"], r["method"], r["phase"]) ==
                               (arm, method, "sweep"))  # fmt: skip
                best = ladder.index(render.choose_lrs(results["runs"], arm, [method])[method])
                if ladder[best] == swept[0] and best > 0:
                    run(arm, method, ladder[best - 1], first, "sweep")
                elif ladder[best] == swept[-1] and best < len(ladder) - 1:
                    run(arm, method, ladder[best + 1], first, "sweep")
                else:
                    break
    for arm in spec["arms"]:
        for variant in spec["variants"]:
            run(arm, variant, render.choose_lrs(results["runs"], arm, ["gndpo"])["gndpo"], first, "sweep")
    results["chosen_lr"] = {arm: render.choose_lrs(results["runs"], arm, [*methods, *spec["variants"]])
                            for arm in spec["arms"]}  # fmt: skip
    results["recommended"] = {arm: render.recommended(results["runs"], arm) for arm in spec["arms"]}
    for seed in spec["seeds"][1:]:
        for arm in spec["arms"]:
            for method in dict.fromkeys([*methods, results["recommended"][arm]]):
                run(arm, method, results["chosen_lr"][arm][method], seed, "seeds")
    for seed in spec["stress_seeds"]:
        for method in (m for m in STRESS_METHODS if m in methods):
            if seed != first:
                run("full", method, spec["stress_lr"], seed, "stress-clean")
            run("full", method, spec["stress_lr"], seed, "stress", stress=True)
    results["finished"] = True
    save(results, json_path, markdown)
    return results


def save(results: dict, json_path: Path, markdown: Path | None) -> None:
    json_path.write_text(json.dumps(results, indent=1))
    if markdown is not None:
        render.write(results, markdown)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="smollm2")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "quality.json")
    parser.add_argument("--markdown", type=Path, help="(re)write this Markdown from the JSON after every run")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --json (measured with the "
                        "same settings), run the missing ones")  # fmt: skip
    parser.add_argument("--cache-dir", default=None, help="where the converted SmolLM2 models are kept")
    for key, value in SIZES["smollm2"].items():  # every size parameter can be overridden
        if value is None:
            parser.add_argument(f"--{key.replace('_', '-')}", type=float)
            continue
        kind = type(value[0]) if isinstance(value, list) else type(value)
        choices = {"arms": ["full", "lora"], "methods": METHODS, "variants": VARIANTS}.get(key)
        parser.add_argument(f"--{key.replace('_', '-')}", type=kind, nargs="*" if isinstance(value, list) else None,
                            choices=choices)  # fmt: skip
    args = parser.parse_args(argv)
    spec = {"size": args.size, **SIZES[args.size], "cache_dir": args.cache_dir}
    spec.update({k: v for k in SIZES[args.size] if (v := getattr(args, k)) is not None})
    if spec["stress_lr"] is None:
        spec["stress_lr"] = spec["full_lrs"][len(spec["full_lrs"]) // 2]
    if spec["variants"] and "gndpo" not in spec["methods"]:
        parser.error("the variants run at GNDPO's best rate: add gndpo to --methods")
    if not set(spec["full_lrs"] + spec["lora_lrs"]) <= set(spec["ladder"]):
        parser.error("every starting rate (--full-lrs, --lora-lrs) must be on the --ladder")
    if spec["batch_size"] % spec["num_generations"]:
        parser.error("--batch-size must be a multiple of --num-generations")
    command = "python -m benchmarks.quality " + " ".join(sys.argv[1:] if argv is None else argv)
    return measure(spec, args.json, args.markdown, command, args.resume)


if __name__ == "__main__":
    main()

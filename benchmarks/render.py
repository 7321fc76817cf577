"""Markdown tables and PNG plots from the JSON the benchmarks write; numbers only.

    python -m benchmarks.render benchmarks/results.json benchmarks/RESULTS.md     # run.py's comparisons
    python -m benchmarks.render benchmarks/quality.json benchmarks/QUALITY.md     # quality.py's runs

What the figures mean and what earlier investigations found is written by hand in `benchmarks/README.md` and in
QUALITY.md's summary (kept between its two markers when the file is re-rendered); this file generates no explanation.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

NAMES = {
    "gndpo": "GNDPOTrainer",
    "gndpo_sampler": "GNDPOTrainer, p_old from the sampler",
    "distillation": "DistillationTrainer",
    "grpo": "GRPOTrainer (floor)",
    "gndpo_vgs": "GNDPOTrainer + VGS",
    "gndpo_cross": "GNDPOTrainer, cross_tokenizer_distillation",
}
SHORT = {
    "gndpo": "GNDPO",
    "gndpo_sampler": "GNDPO with `old_logps_from_sampler`",
    "distillation": "DistillationTrainer",
    "grpo": "GRPO floor",
    "gndpo_vgs": "GNDPO + VGS",
    "gndpo_cross": "GNDPO, cross-tokenizer path",
}
MIB = 2**20
SUMMARY_ENTRIES = 9  # plus the line pointing to the README: at most ten lines


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if abs(x) >= 10 ** (digits - 1) else f"{x:.{digits}g}"


def roles(entry: dict) -> tuple[str, str]:
    """(the trainer measured, the one it is compared against) of an entry."""
    main = entry["main"]
    for variant in ("gndpo_vgs", "gndpo_cross"):  # a GNDPO option against GNDPO without it
        if variant in main:
            return variant, "gndpo"
    return "gndpo", "distillation" if "distillation" in main else next(iter(main))


def same_batches(entry: dict) -> bool | None:
    hashes = [h for record in entry["main"].values() for h in record.get("batch_hashes", [])]
    return None if not hashes else all(h == hashes[0] for h in hashes)


def summary_line(key: str, entry: dict) -> str:
    main = entry["main"]
    subject, reference = roles(entry)
    s, r = main[subject], main[reference]
    per_round = lambda rec: ", ".join(fmt(x["step_time_median"]) for x in rec.get("rounds", []))  # noqa: E731
    line = (f"- `{key}`: {SHORT[subject]} {fmt(s['step_time_median'])} s/step = "
            f"**{s['step_time_median'] / r['step_time_median']:.2f}x** {SHORT[reference]}'s "
            f"{fmt(r['step_time_median'])} s (per round: {per_round(s)} vs {per_round(r)}); peak RSS "
            f"{s['peak_rss_bytes'] / r['peak_rss_bytes']:.2f}x")  # fmt: skip
    if subject == "gndpo_vgs":
        return line + f"; same sampled batches: {'yes' if same_batches(entry) else 'NO'}."
    if "gndpo_sampler" in main:
        x = main["gndpo_sampler"]
        line += (f"; {SHORT['gndpo_sampler']} {fmt(x['step_time_median'])} s/step = "
                 f"**{x['step_time_median'] / r['step_time_median']:.2f}x** (per round: {per_round(x)})")  # fmt: skip
    passes = " vs ".join(fmt(main[t].get("teacher_scoring_passes_per_generation_batch")) for t in (subject, reference))
    floor = f"; {SHORT['grpo']} {fmt(main['grpo']['step_time_median'])} s/step" if "grpo" in main else ""
    return line + f"; teacher scoring passes per generation batch {passes}{floor}."


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows] + [""]


def phases_of(entry: dict) -> list[str]:
    """Phases in their order in the records, without those no trainer of the entry spent time in."""
    names = list(next(iter(entry["main"].values()))["phases_mean"])
    return [p for p in names if any(r["phases_mean"].get(p, 0) > 0 for r in entry["main"].values())]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> str:
    fig.savefig(path, dpi=100, bbox_inches="tight")
    pyplot().close(fig)
    return path.name


def plot(entry: dict, path: Path) -> None:
    """One horizontal bar per trainer: mean seconds per optimizer step, split into phases."""
    plt = pyplot()
    trainers, phases = list(entry["main"]), phases_of(entry)
    order = list(next(iter(entry["main"].values()))["phases_mean"])  # a phase keeps its colour in every figure
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.5 * len(trainers)))
    left = [0.0] * len(trainers)
    for phase in phases:
        widths = [entry["main"][t]["phases_mean"].get(phase, 0.0) for t in trainers]
        colour = plt.cm.tab10(order.index(phase) % 10)
        ax.barh([NAMES[t] for t in trainers], widths, left=left, label=phase, color=colour)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("mean seconds per optimizer step")
    ax.legend(ncol=5, fontsize="small", loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    save(fig, path)


def render_entry(key: str, entry: dict, outdir: Path, stem: str) -> list[str]:
    main, spec = entry["main"], entry["spec"]
    subject, reference = roles(entry)
    first = next(iter(main.values()))
    work = (f"{spec['batch_size'] * spec['grad_accum']} completions of exactly {spec['completion_length']} tokens per "
            f"optimizer step ({spec['batch_size']} per micro-step x {spec['grad_accum']} micro-steps, "
            f"{spec['num_generations']} per prompt), learning rate {spec['lr']:g}, seed {spec['seed']}; median over "
            f"{len(first['step_times'])} measured steps after {spec['warmup']} warm-up step(s) per process, "
            f"{len(first.get('rounds', [1]))} round(s) of fresh processes, interleaved")  # fmt: skip
    other = [r.get("other_processes_cpu_share", 0.0) for rec in main.values() for r in rec.get("rounds", [])]
    fingerprints = {str(r["student_fingerprint"]) for r in main.values()}
    lines = [f"## `{key}`", "", f"Command: `{entry.get('command')}` (started {entry.get('started')}).", "",
             f"Models: {first['description']}. Work: {work}. Same starting student weights in every process: "
             f"{'yes' if len(fingerprints) == 1 else 'NO'}. CPU used by other processes during the workers: up to "
             f"{100 * max(other, default=0):.0f}% of the machine.", ""]  # fmt: skip
    if subject == "gndpo_vgs":
        lines += [f"Same sampled batches in every process: {'yes' if same_batches(entry) else 'NO'}.", ""]
    rows = [[NAMES[t], fmt(r["step_time_median"]),
             f"{r['step_time_median'] / main[reference]['step_time_median']:.2f}",
             ", ".join(fmt(x["step_time_median"]) for x in r.get("rounds", [])),
             fmt(r["completion_tokens_per_step"] / r["step_time_median"]), fmt(r["peak_rss_bytes"] / MIB),
             f"{r['peak_rss_bytes'] / main[reference]['peak_rss_bytes']:.2f}",
             fmt(r.get("teacher_scoring_passes_per_generation_batch")),
             fmt(r.get("teacher_forward_calls_per_generation_batch")), fmt(r.get("head_rows_per_step"))]
            for t, r in main.items()]  # fmt: skip
    lines += table(["trainer", "step median (s)", f"x {SHORT[reference]}", "per round (s)", "completion tok/s",
                    "peak RSS (MiB)", f"x {SHORT[reference]}", "teacher scoring passes / generation batch",
                    "teacher forwards / generation batch", "vocabulary-head rows / step"], rows)  # fmt: skip
    phases = phases_of(entry)
    png = f"{stem}-{key.replace('/', '-')}.png"
    plot(entry, outdir / png)
    lines += ["Mean seconds per optimizer step, by phase (exclusive times; they sum to the mean step):", ""]
    lines += table(["trainer", *phases, "mean step"],
                   [[NAMES[t], *(fmt(r["phases_mean"].get(p, 0.0)) for p in phases),
                     fmt(sum(r["phases_mean"].values()))] for t, r in main.items()])  # fmt: skip
    lines += [f"![step-time split]({png})", ""]
    kind = first.get("memory_kind", first.get("phase_memory_kind", "memory"))
    lines += [f"Peak growth of {kind} in each phase (MiB over the phase's start, nested phases excluded, max over "
              "measured steps):", ""]  # fmt: skip
    peaks = [[NAMES[t], *(f"{r['phase_own_peak_delta_bytes'].get(p, 0) / MIB:,.1f}" for p in phases)]
             for t, r in main.items()]  # fmt: skip
    return lines + table(["trainer", *phases], peaks)


def vocabulary_table(results: dict) -> list[str]:
    """Entries of one size and family at several vocabularies: teacher-phase and step memory against the vocabulary."""
    sweep = [(e["spec"]["vocab_size"], e) for e in results.values() if "main" in e and e["spec"].get("vocab_size")]
    if len(sweep) < 2:
        return []
    rows = [[f"{vocab:,}", NAMES[t], fmt(r["step_time_median"]),
             f"{r['phase_own_peak_delta_bytes'].get('teacher', 0) / MIB:,.1f}",
             f"{max(r['phase_own_peak_delta_bytes'].values()) / MIB:,.1f}", fmt(r.get("head_rows_per_step"))]
            for vocab, e in sorted(sweep, key=lambda x: x[0]) for t, r in e["main"].items()]  # fmt: skip
    header = ["vocabulary", "trainer", "step median (s)", "teacher phase peak growth (MiB)",
              "largest phase peak growth (MiB)", "vocabulary-head rows / step"]  # fmt: skip
    return ["## Vocabulary sweep", ""] + table(header, rows)


def render(results: dict, outdir: Path, stem: str = "RESULTS") -> str:
    measured = {k: e for k, e in results.items() if "main" in e}
    vgs = measured and all("gndpo_vgs" in e["main"] for e in measured.values())
    title = ("GNDPOTrainer with and without Visual Gradient Steering" if vgs
             else "GNDPOTrainer vs TRL's DistillationTrainer and GRPOTrainer")  # fmt: skip
    lines = [f"# Benchmarks: {title}", "",
             "<!-- Generated by benchmarks/render.py from the JSON that benchmarks/run.py writes: do not edit. -->",
             "", "## Summary", ""]  # fmt: skip
    lines += [summary_line(k, e) for k, e in list(measured.items())[:SUMMARY_ENTRIES]]
    lines += ["", "How these are measured, what the figures mean, and what earlier investigations found: "
              "[README.md](README.md).", ""]  # fmt: skip
    environments = {json.dumps([r.get("machine"), r.get("versions")]) for e in measured.values()
                    for r in e["main"].values()}  # fmt: skip
    lines += ["## Machines and versions", ""]
    for machine, versions in map(json.loads, sorted(environments)):
        described = ", ".join(f"{k}: {v}" for k, v in (machine or {}).items() if v is not None)
        lines.append(f"- {described}; " + ", ".join(f"{k} {v}" for k, v in (versions or {}).items()))
    lines.append("")
    for key, entry in results.items():
        lines += (
            render_entry(key, entry, outdir, stem) if key in measured else [f"## `{key}`", "", "Not measured.", ""]
        )
    return "\n".join(lines + vocabulary_table(results))


# ---------------------------------------------------------------------------------------------------------------------
# quality.py's runs: held-out reverse KL, gradient norms, the learning-rate sweep and the stress test.

QUALITY_METHODS = {
    "gndpo": "GNDPO (global whitening)",
    "gndpo_vopd": "GNDPO + vOPD value baseline (top-32)",
    "gndpo_tip": "GNDPO + TIP (quadrant, ratio 0.5)",
    "gndpo_g4": "GNDPO, 4 completions per prompt",
    "opd": "plain OPD (scope none)",
    "distill_rkl": "DistillationTrainer beta=1 (reverse KL)",
    "distill_jsd": "DistillationTrainer beta=0.5 (JSD)",
}
ARMS = {"full": "full fine-tuning", "lora": "LoRA r=16, all linear layers"}
SUMMARY_START, SUMMARY_END = "<!-- summary: written by hand -->", "<!-- end of summary -->"


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


def sweep_runs(runs: list[dict], arm: str, method: str) -> list[dict]:
    return [r for r in runs if (r["arm"], r["method"], r["phase"]) == (arm, method, "sweep")]


def choose_lrs(runs: list[dict], arm: str, methods) -> dict:
    """Per method of `arm`, the learning rate whose sweep run ends with the lowest held-out KL."""
    return {m: min(rs, key=lambda r: r["final_kl"])["lr"] for m in methods if (rs := sweep_runs(runs, arm, m))}


def recommended(runs: list[dict], arm: str) -> str | None:
    """GNDPO or the variant of it with the lowest final KL at GNDPO's best rate (first seed)."""
    lr = choose_lrs(runs, arm, ["gndpo"]).get("gndpo")
    at = [r for r in runs if r["arm"] == arm and r["method"].startswith("gndpo") and r["lr"] == lr
          and r["phase"] == "sweep"]  # fmt: skip
    return min(at, key=lambda r: r["final_kl"])["method"] if at else None


def main_runs(results: dict, arm: str, method: str) -> list[dict]:
    """The runs of `method` at its chosen rate in `arm`: the sweep's run on the first seed and the `seeds` phase's."""
    lr = results["chosen_lr"].get(arm, {}).get(method)
    return [r for r in results["runs"] if (r["arm"], r["method"], r["lr"]) == (arm, method, lr)
            and r["phase"] in ("sweep", "seeds")]  # fmt: skip


def stress_runs(results: dict, method: str, stress: bool) -> list[dict]:
    """The stress runs of `method`, or (stress=False) its clean runs on the same seeds at the same rate."""
    stressed = [r for r in results["runs"] if r["method"] == method and r["stress"]]
    if stress:
        return stressed
    pairs, clean = {(r["seed"], r["lr"]) for r in stressed}, {}
    for r in results["runs"]:  # one clean run per seed: a `seeds` run at the stress rate is also a stress-clean one
        if r["arm"] == "full" and r["method"] == method and not r["stress"] and (r["seed"], r["lr"]) in pairs:
            clean.setdefault((r["seed"], r["lr"]), r)
    return [clean[key] for key in sorted(clean)]


def stressed_methods(results: dict) -> list[str]:
    return [m for m in results["spec"]["methods"] if any(r["method"] == m and r["stress"] for r in results["runs"])]


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return fmt(values[0]) if values else "-"
    mean, sd = statistics.mean(values), statistics.stdev(values)
    return f"{fmt(mean)} ± {fmt(sd)} ({fmt(min(values))} to {fmt(max(values))})"


def mean_curve(runs: list[dict], x: str) -> tuple[list[float], list[float], list[float]]:
    """Per evaluation index: mean x, mean KL, and the KL's spread (min, max) over runs of equal length."""
    n = min(len(r["evals"]) for r in runs)
    xs = [statistics.mean(r["evals"][i][x] for r in runs) for i in range(n)]
    ys = [[r["evals"][i]["reverse_kl"] for r in runs] for i in range(n)]
    return xs, [statistics.mean(y) for y in ys], [(min(y), max(y)) for y in ys]


def last_entropy(runs: list[dict]) -> str:
    """The student's mean entropy over its sampled training tokens at the last step (near 0: a collapsed student)."""
    values = [r["steps"][-1].get("entropy") for r in runs]
    return spread([float(v) for v in values]) if None not in values else "-"


def norm_figures(runs: list[dict]) -> list[str]:
    """Median, p99, max and max / median of the gradient norms of every step of `runs`, pooled."""
    g = grad_stats([s["grad_norm"] for r in runs for s in r["steps"]])
    return [fmt(g["median"]), fmt(g["p99"]), fmt(g["max"]), fmt(g["max"] / g["median"]) if g["median"] else "-"]


def quality_plots(results: dict, shown: list[tuple[str, str]], outdir: Path, stem: str) -> list[str]:
    """Held-out KL against steps and against seconds (a panel per arm), gradient-norm box plots, the stress test."""
    plt, names = pyplot(), []
    colour, order = plt.cm.tab10, list(QUALITY_METHODS)
    arms = list(dict.fromkeys(arm for arm, _ in shown))
    for x, label in (("step", "optimizer step"), ("train_seconds", "training seconds (evaluations excluded)")):
        fig, axes = plt.subplots(1, len(arms), figsize=(6.5 * len(arms), 4.5), squeeze=False)
        for ax, arm in zip(axes[0], arms, strict=True):
            for arm_, method in shown:
                if arm_ == arm:
                    runs = main_runs(results, arm, method)
                    xs, ys, band = mean_curve(runs, x)
                    legend = f"{QUALITY_METHODS[method]}, lr {results['chosen_lr'][arm][method]:g} ({len(runs)} seeds)"
                    ax.plot(xs, ys, marker="o", color=colour(order.index(method)), label=legend)
                    ax.fill_between(xs, [b[0] for b in band], [b[1] for b in band], color=colour(order.index(method)),
                                    alpha=0.15)  # fmt: skip
            ax.set(title=ARMS[arm], xlabel=label, ylabel="held-out reverse KL (nats/token)")
            ax.legend(fontsize="x-small")
            ax.grid(alpha=0.3)
        names.append(save(fig, outdir / f"{stem}-kl-{'step' if x == 'step' else 'seconds'}.png"))
    groups = [(f"{QUALITY_METHODS[m]}, {arm}", main_runs(results, arm, m)) for arm, m in shown]
    groups += [(f"{QUALITY_METHODS[m]}, full, {label} teacher, lr {results['spec']['stress_lr']:g}",
                stress_runs(results, m, stress)) for m in stressed_methods(results)
               for stress, label in ((False, "clean"), (True, "corrupted"))]  # fmt: skip
    groups = [(label, [s["grad_norm"] for r in runs for s in r["steps"]]) for label, runs in groups if runs]
    fig, ax = plt.subplots(figsize=(7, 1 + 0.4 * len(groups)))
    ax.boxplot([g[1] for g in groups], orientation="horizontal", whis=(0, 100))
    ax.set_yticks(range(1, len(groups) + 1), [g[0] for g in groups], fontsize="small")
    ax.set(xscale="log", xlabel="gradient norm before clipping, every step of every run (whiskers: min, max)")
    ax.invert_yaxis()
    names.append(save(fig, outdir / f"{stem}-grad-norm.png"))
    if stressed_methods(results):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for i, method in enumerate(stressed_methods(results)):
            for stress, style in ((False, "-"), (True, "--")):
                runs = stress_runs(results, method, stress)
                if not runs:
                    continue
                label = f"{QUALITY_METHODS[method]}{', corrupted' if stress else ''}"
                xs, ys, _ = mean_curve(runs, "step")
                axes[0].plot(xs, ys, style, marker="o", color=colour(i), label=label)
                steps = [s["step"] for s in runs[0]["steps"]]
                norms = [statistics.mean(r["steps"][j]["grad_norm"] for r in runs) for j in range(len(steps))]
                axes[1].plot(steps, norms, style, color=colour(i), label=label)
        axes[0].set(xlabel="optimizer step", ylabel="held-out reverse KL (nats/token)")
        axes[1].set(xlabel="optimizer step", ylabel="gradient norm (mean over seeds)", yscale="log")
        for ax in axes:
            ax.legend(fontsize="small")
            ax.grid(alpha=0.3)
        names.append(save(fig, outdir / f"{stem}-stress.png"))
    return names


def sweep_notes(results: dict) -> list[str]:
    """Per arm and method: the rates swept, and where the best one sits in them."""
    spec, notes = results["spec"], []
    for arm in spec["arms"]:
        for m in spec["methods"]:
            lrs = sorted(r["lr"] for r in sweep_runs(results["runs"], arm, m))
            best = results["chosen_lr"].get(arm, {}).get(m)
            if lrs:
                end = " (the ladder's end)" if best in (spec["ladder"][0], spec["ladder"][-1]) else ""
                where = "inside the sweep" if lrs[0] < best < lrs[-1] else f"AT THE EDGE OF THE SWEEP{end}"
                notes.append(f"- {ARMS[arm]}, {QUALITY_METHODS[m]}: {', '.join(f'{x:g}' for x in lrs)}; best "
                             f"{best:g}, {where}.")  # fmt: skip
    return notes + [""]


def render_quality(results: dict, outdir: Path, stem: str = "QUALITY", summary: str = "") -> str:
    spec, runs, env = results["spec"], results["runs"], results["environment"]
    if not results.get("finished"):  # a partial file: the best rate among those swept so far
        results = dict(results, chosen_lr={arm: choose_lrs(runs, arm, [*spec["methods"], *spec["variants"]])
                                           for arm in spec["arms"]},
                       recommended={arm: recommended(runs, arm) for arm in spec["arms"]})  # fmt: skip
    status = "finished" if results.get("finished") else f"INCOMPLETE: {len(runs)} runs recorded so far"
    lines = ["# Quality: GNDPO vs plain OPD vs TRL's DistillationTrainer, full fine-tuning and LoRA", "",
             "<!-- Generated by benchmarks/render.py from benchmarks/quality.json, except the summary between the "
             "markers: do not edit the rest. -->", "", "## Summary", "", SUMMARY_START,
             summary.strip() or "(not written yet)", SUMMARY_END, "", "## Set-up", "",
             f"Command: `{results['command']}` (started {results['started']}, {status}).", "",
             f"Models: {runs[0]['description'] if runs else '-'}. Machine: {env['cpu']}, {env['cpu_cores']} cores, "
             f"{env['torch_threads']} torch threads; " + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
             + ".", "",
             f"Work per optimizer step, identical for every method: {spec['batch_size']} sampled completions of at "
             f"most {spec['completion_length']} tokens ({spec['batch_size'] // spec['num_generations']} prompts x "
             f"{spec['num_generations']}; the 4-completions variant: {spec['batch_size'] // 4} prompts x 4), "
             "temperature 1, no top-p/top-k, one micro-step, AdamW at a constant rate, no weight decay, gradient "
             f"clipping at 1 (TRL's default), {spec['steps']} steps. Two arms: full fine-tuning, and a LoRA adapter "
             "(r=16, alpha 32, every linear layer but the output head, `target_modules=\"all-linear\"`) for every "
             f"method. Held-out evaluation every {spec['eval_every']} steps: {spec['heldout_prompts']} prompts never "
             f"trained on x {spec['heldout_samples']} samples of at most {spec['completion_length']} tokens, seed "
             "fixed, exact reverse KL(student || teacher) over the full vocabulary per sampled token "
             "(`trl_gndpo.ReverseKLCallback`).", "",
             f"Learning rates swept on seed {spec['seeds'][0]}, starting at "
             + "; ".join(f"{ARMS[a]}: {', '.join(f'{x:g}' for x in spec[f'{a}_lrs'])}" for a in spec["arms"])
             + f", extended along {', '.join(f'{x:g}' for x in spec['ladder'])} while a method's best rate was at "
             "an edge of those run. Each method's rate is the one with the lowest final held-out KL there. The "
             "GNDPO variants ran at GNDPO's best rate of their arm only (not swept); the recommended GNDPO recipe of "
             "an arm is the lowest of GNDPO and its variants there. Every method and the recommended recipe then ran "
             f"at its rate on seeds {', '.join(map(str, spec['seeds'][1:])) or '-'} (the sweep's run is reused as the "
             "first seed). Rates swept:", "", *sweep_notes(results),
             "## Each method at its best learning rate", "",
             "Held-out reverse KL (nats/token): mean ± standard deviation over seeds (min to max). Gradient norms: "
             "every step of every seed pooled; the losses differ in scale, so compare the spread (p99, max over the "
             "median) across methods rather than the level. Seconds are wall-clock time on the machine above, "
             "evaluations excluded: work running beside the benchmark inflates them (the step median is the least "
             "affected). Entropy, last step: the student's mean entropy (nats) over its sampled training tokens at "
             "the last step, as the trainer logs it; near 0 the student has collapsed onto few continuations, which "
             "the mode-seeking reverse KL does not penalise.", ""]  # fmt: skip
    shown = [(arm, m) for arm in spec["arms"] for m in [*spec["methods"], *spec["variants"]]
             if main_runs(results, arm, m)]  # fmt: skip
    rows = [[ARMS[arm], QUALITY_METHODS[m] + (" (recommended)" if results["recommended"].get(arm) == m else ""),
             f"{results['chosen_lr'][arm][m]:g}", len(rs), spread([r["initial_kl"] for r in rs]),
             spread([r["final_kl"] for r in rs]), spread([100 * (1 - r["final_kl"] / r["initial_kl"]) for r in rs]),
             fmt(statistics.median(s for r in rs for s in r["step_seconds"])),
             spread([r["train_seconds"] for r in rs]), last_entropy(rs), *norm_figures(rs)]
            for arm, m in shown for rs in [main_runs(results, arm, m)]]  # fmt: skip
    lines += table(["arm", "method", "lr", "seeds", "KL at step 0", f"KL at step {spec['steps']}",
                    "KL reduction (%)", "step median (s)", "training seconds", "entropy, last step",
                    "grad-norm median", "p99", "max", "max / median"], rows)  # fmt: skip
    names = quality_plots(results, shown, outdir, stem) if shown else []
    lines += [f"![{n}]({n})" for n in names if "kl-" in n] + [""]
    if shown:
        steps = [e["step"] for e in main_runs(results, *shown[0])[0]["evals"]]
        curve = [[ARMS[arm], QUALITY_METHODS[m], *map(fmt, mean_curve(main_runs(results, arm, m), "step")[1])]
                 for arm, m in shown]  # fmt: skip
        lines += ["Mean held-out reverse KL over seeds at each evaluation:", ""]
        lines += table(["arm", "method", *(f"step {s}" for s in steps)], curve)
    order = list(QUALITY_METHODS)
    sweep = [[ARMS[r["arm"]], QUALITY_METHODS[r["method"]], f"{r['lr']:g}", fmt(r["initial_kl"]), fmt(r["final_kl"]),
              fmt(statistics.median(r["step_seconds"])), last_entropy([r]), fmt(r["grad_norm"]["median"]),
              fmt(r["grad_norm"]["max"]),
              "yes" if results["chosen_lr"].get(r["arm"], {}).get(r["method"]) == r["lr"] else ""]
             for r in sorted((r for r in runs if r["phase"] == "sweep"),
                             key=lambda r: (spec["arms"].index(r["arm"]), order.index(r["method"]),
                                            r["lr"]))]  # fmt: skip
    lines += ["## Learning-rate sweep", "", f"Seed {spec['seeds'][0]}, held-out reverse KL (nats/token).", ""]
    lines += table(["arm", "method", "lr", "KL at step 0", f"KL at step {spec['steps']}", "step median (s)",
                    "entropy, last step", "grad-norm median", "grad-norm max", "chosen"], sweep)  # fmt: skip
    lines += ["## Stability stress test: a corrupted teacher", "",
              f"GNDPO and plain OPD, full fine-tuning, at the same rate, {spec['stress_lr']:g}; on "
              f"{100 * spec['corrupt_fraction']:g}% of the completion tokens (drawn at random) the teacher's log-prob "
              f"is lowered by {spec['corrupt_nats']:g} nats before the token signal is computed (which then clamps it "
              "at -5); the held-out evaluation uses the true teacher. Each stressed run is set beside the clean run "
              "of the same method, rate and seed.", ""]  # fmt: skip
    rows = []
    for m in stressed_methods(results):
        for stress in (False, True):
            rs = stress_runs(results, m, stress)
            if not rs:
                continue
            clamped = [s["gndpo/clamped_frac"] for r in rs for s in r["steps"]
                       if s.get("gndpo/clamped_frac") is not None]  # fmt: skip
            counts = [r["corrupted_tokens"] for r in rs if r["corrupted_tokens"]]
            share = sum(c["corrupted"] for c in counts) / max(sum(c["tokens"] for c in counts), 1)
            rows.append([QUALITY_METHODS[m], "corrupted" if stress else "clean", ", ".join(str(r["seed"]) for r in rs),
                         f"{100 * share:.1f}", spread([r["final_kl"] for r in rs]), *norm_figures(rs),
                         fmt(statistics.mean(clamped)) if clamped else "-"])  # fmt: skip
    header = ["method", "teacher", "seeds", "tokens corrupted (%)", f"KL at step {spec['steps']}", "grad-norm median",
              "p99", "max", "max / median", "clamped fraction (mean)"]  # fmt: skip
    lines += table(header, rows) if rows else ["Not measured yet.", ""]
    return "\n".join(lines + [f"![{n}]({n})" for n in names if "kl-" not in n] + [""])


def written_summary(path: Path) -> str:
    """The hand-written summary between the markers of an existing QUALITY.md, or ""."""
    text = path.read_text() if path.exists() else ""
    if SUMMARY_START not in text or SUMMARY_END not in text:
        return ""
    summary = text.split(SUMMARY_START, 1)[1].split(SUMMARY_END, 1)[0].strip()
    return "" if summary == "(not written yet)" else summary


def write(results: dict, path: Path) -> None:
    """(Re)write the Markdown of `results` (a comparison file or quality runs) at `path`, its PNGs beside it."""
    if "runs" in results:
        path.write_text(render_quality(results, path.parent, path.stem, written_summary(path)))
    else:
        path.write_text(render(results, path.parent, path.stem))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="results.json, vgs_results.json or quality.json")
    parser.add_argument("markdown", type=Path, help="the Markdown to (re)write, its PNGs beside it")
    args = parser.parse_args()
    write(json.loads(args.json.read_text()), args.markdown)
    print(f"wrote {args.markdown}")

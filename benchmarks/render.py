"""Markdown tables and one step-time PNG per comparison, from the JSON that `run.py` writes; numbers only.

    python benchmarks/render.py benchmarks/results.json benchmarks/RESULTS.md

What the figures mean and what earlier investigations found is written by hand in `benchmarks/README.md`; this file
generates no explanation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

NAMES = {
    "gndpo": "GNDPOTrainer",
    "gndpo_sampler": "GNDPOTrainer, p_old from the sampler",
    "distillation": "DistillationTrainer",
    "grpo": "GRPOTrainer (floor)",
    "gndpo_vgs": "GNDPOTrainer + VGS",
}
SHORT = {
    "gndpo": "GNDPO",
    "gndpo_sampler": "GNDPO with `old_logps_from_sampler`",
    "distillation": "DistillationTrainer",
    "grpo": "GRPO floor",
    "gndpo_vgs": "GNDPO + VGS",
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
    if "gndpo_vgs" in main:
        return "gndpo_vgs", "gndpo"
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


def plot(entry: dict, path: Path) -> None:
    """One horizontal bar per trainer: mean seconds per optimizer step, split into phases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trainers, phases = list(entry["main"]), phases_of(entry)
    order = list(next(iter(entry["main"].values()))["phases_mean"])  # a phase keeps its colour in every figure
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.5 * len(trainers)))
    left = [0.0] * len(trainers)
    for phase in phases:
        widths = [entry["main"][t]["phases_mean"].get(phase, 0.0) for t in trainers]
        ax.barh(
            [NAMES[t] for t in trainers], widths, left=left, label=phase, color=plt.cm.tab10(order.index(phase) % 10)
        )
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("mean seconds per optimizer step")
    ax.legend(ncol=5, fontsize="small", loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


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
    rows = []
    for t, r in main.items():
        rounds = ", ".join(fmt(x["step_time_median"]) for x in r.get("rounds", []))
        rows.append(
            [
                NAMES[t],
                fmt(r["step_time_median"]),
                f"{r['step_time_median'] / main[reference]['step_time_median']:.2f}",
                rounds,
                fmt(r["completion_tokens_per_step"] / r["step_time_median"]),
                fmt(r["peak_rss_bytes"] / MIB),
                f"{r['peak_rss_bytes'] / main[reference]['peak_rss_bytes']:.2f}",
                fmt(r.get("teacher_scoring_passes_per_generation_batch")),
                fmt(r.get("teacher_forward_calls_per_generation_batch")),
                fmt(r.get("head_rows_per_step")),
            ]
        )
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


if __name__ == "__main__":
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    target.write_text(render(json.loads(source.read_text()), target.parent, target.stem))
    print(f"wrote {target}")

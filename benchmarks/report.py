"""Tables, the console summary and the Markdown report (`RESULTS.md`), all rendered from the measured JSON records.

Every number in the report comes from a worker record; the prose around it is fixed text about how the benchmark
and the trainers work, chosen by comparing measured values (e.g. which phase holds a gap).
"""

from __future__ import annotations

import json
import math
import statistics

TRAINERS = ("gndpo", "distillation", "grpo")
LABELS = {"gndpo": "GNDPOTrainer", "distillation": "DistillationTrainer", "grpo": "GRPOTrainer (floor)"}
PHASES = ("generation", "teacher", "student_scoring", "prep_other", "loss_forward", "backward", "optimizer_other")
PHASE_LABELS = {
    "generation": "generation",
    "teacher": "teacher",
    "student_scoring": "student re-score",
    "prep_other": "other prep",
    "loss_forward": "loss fwd",
    "backward": "backward",
    "optimizer_other": "optim + rest",
}
SAME_WORK_PHASES = ("generation", "optimizer_other")  # identical work in every trainer
MIB = 2**20
SIZE_ORDER = ("tiny", "smollm2", "gpu-qwen", "gpu-qwen/qwen2.5-vl", "gpu-qwen/qwen3-vl")


# ---------------------------------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------------------------------
def ok(record) -> bool:
    return isinstance(record, dict) and "error" not in record and "skipped" not in record


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, int):
        return f"{x:,}"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def mib(x) -> str:
    return "n/a" if x is None else f"{x / MIB:,.1f}"


def pct(a: float, b: float) -> str:
    return f"{100 * (a - b) / b:+.1f}%" if b else "n/a"


def memory_headline(record: dict) -> tuple[str, float]:
    """(label, bytes): CUDA max allocated when the run had a GPU, else the process's peak RSS."""
    if "cuda_max_allocated_bytes" in record:
        return "CUDA max allocated", record["cuda_max_allocated_bytes"]
    return "peak RSS", record["peak_rss_bytes"]


def memory_kind(record: dict) -> str:
    kinds = {
        "glibc_heap_in_use": "CPU: glibc heap in use, sampled",
        "rss": "CPU: RSS, sampled",
        "cuda_max_allocated": "CUDA memory allocated",
    }
    return kinds.get(record.get("phase_memory_kind"), str(record.get("phase_memory_kind")))


def generation_median(record: dict) -> float:
    return statistics.median(s["time"].get("generation", 0.0) for s in record["per_step"])


def speed_adjusted(record: dict, ref: dict) -> float:
    """Median step time scaled by ref's / record's median generation time. Generation is the same work in every
    trainer, so the ratio of the two generation times measures how fast the machine ran each process; the estimate
    assumes the whole step was slowed alike."""
    gen, ref_gen = generation_median(record), generation_median(ref)
    return record["step_time_median"] * ref_gen / gen if gen > 0 else math.nan


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _records(main: dict):
    return [(t, main[t]) for t in TRAINERS if t in main]


# ---------------------------------------------------------------------------------------------------------------------
# Main-comparison tables
# ---------------------------------------------------------------------------------------------------------------------
def headline_rows(main: dict) -> list[list[str]]:
    ref = main.get("distillation")
    rows = []
    for t, r in _records(main):
        if not ok(r):
            rows.append([LABELS[t], "failed: " + r.get("error", "?")] + [""] * 10)
            continue
        mem = memory_headline(r)[1]
        rows.append(
            [
                LABELS[t],
                fmt(r["step_time_median"]),
                fmt(ratio(r["step_time_median"], ref["step_time_median"])) if ok(ref) else "n/a",
                f"{fmt(r['step_time_min'])}-{fmt(r['step_time_max'])}",
                fmt(generation_median(r)),
                fmt(ratio(speed_adjusted(r, ref), ref["step_time_median"])) if ok(ref) else "n/a",
                fmt(r["completion_tokens_per_s"]),
                fmt(r["tokens_per_s"]),
                fmt(ratio(r["completion_tokens_per_s"], ref["completion_tokens_per_s"])) if ok(ref) else "n/a",
                mib(mem),
                fmt(ratio(mem, memory_headline(ref)[1])) if ok(ref) else "n/a",
                mib(r["peak_rss_bytes"] - r["rss_after_setup_bytes"]),
            ]
        )
    return rows


def round_rows(main: dict) -> list[list[str]]:
    rows = []
    for t, r in _records(main):
        for index, summary in enumerate(r.get("rounds", []), 1):
            if "error" in summary:
                rows.append([LABELS[t], str(index), "failed: " + summary["error"], "", "", ""])
                continue
            memory = summary.get("cuda_max_allocated_bytes", summary.get("peak_rss_bytes"))
            rows.append(
                [
                    LABELS[t],
                    str(index),
                    fmt(summary["step_time_median"]),
                    fmt(summary["generation_mean"]),
                    mib(memory),
                    f"{100 * summary.get('other_processes_cpu_share', math.nan):.0f}%",
                ]
            )
    return rows


def phase_rows(main: dict) -> list[list[str]]:
    rows = []
    for t, r in _records(main):
        if not ok(r):
            continue
        phases = r["phases_mean"]
        total = sum(phases.values())
        rows.append(
            [LABELS[t]]
            + [f"{fmt(phases[p])} ({100 * phases[p] / total:.0f}%)" for p in PHASES]
            + [fmt(total), fmt(r["step_time_mean"])]
        )
    return rows


def teacher_rows(main: dict) -> list[list[str]]:
    rows = []
    for t, r in _records(main):
        if not ok(r):
            continue
        rows.append(
            [
                LABELS[t],
                fmt(r["optimizer_steps_per_generation_batch"]),
                fmt(r["micro_steps_per_step"]),
                fmt(r["completions_per_generation_batch"]),
                fmt(r["teacher_scoring_passes_per_generation_batch"]),
                fmt(r["teacher_forward_calls_per_generation_batch"]),
                fmt(r["teacher_rows_per_generation_batch"]),
                fmt(r["head_rows_per_step"]),
                fmt(ratio(r["head_rows_per_step"], r["completion_tokens_per_step"])),
            ]
        )
    return rows


def phase_memory_rows(main: dict) -> list[list[str]]:
    rows = []
    for t, r in _records(main):
        if not ok(r):
            continue
        own = r["phase_own_peak_delta_bytes"]
        rows.append([LABELS[t]] + [mib(own.get(p)) for p in PHASES] + [mib(r["phase_peak_delta_bytes"]["step"])])
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Gaps and their causes
# ---------------------------------------------------------------------------------------------------------------------
CAUSE_STUDENT_SCORING = (
    "GNDPO needs log p_old of every sampled token for its token signal and gets it from a no-grad student pass in "
    "`_score_tokens` (GRPOTrainer skips `old_per_token_logps` when one generation batch feeds one optimizer step); "
    "DistillationTrainer has no such pass, its loss compares the two full distributions inside the update"
)
CAUSE_HEAD_CPU = (
    "TRL's fused log-prob head (`add_fused_lm_head`, used by GRPOTrainer's `_get_per_token_logps_and_entropies`, "
    "which GNDPO calls for the student re-score, the teacher and the loss) projects only the scored positions when "
    "Triton is available and otherwise every position of the prompt and completion (`compact = _use_triton(device)`), "
    "so on this CPU the prompt positions pass through the vocabulary head three times per completion; "
    "DistillationTrainer cuts the hidden states to the completion positions (`logits_to_keep`) before its one JSD "
    "kernel, which projects each row through both heads. This work lands in GNDPO's teacher, student re-score, loss "
    "fwd and backward phases"
)
CAUSE_HEAD_GPU = (
    "with Triton TRL's fused head projects only the scored completion positions; GNDPO still projects them three "
    "times (student re-score, teacher, loss), DistillationTrainer once through both heads in its JSD kernel"
)


def explain_gaps(main: dict, probe_check: dict | None = None, entry: dict | None = None) -> list[str]:
    """Every metric where GNDPO is slower or heavier than DistillationTrainer, with its measured cause.

    `probe_check`: the runs of `--probe-check` (memory probes off; uncapped heap sampler), when there are some;
    `entry`: the size's whole entry, for the runs of `--memory-cause`."""
    g, d = main.get("gndpo"), main.get("distillation")
    if not (ok(g) and ok(d)):
        return ["GNDPO or DistillationTrainer failed in this run; no comparison."]
    out = []
    gap = g["step_time_median"] - d["step_time_median"]
    mean_gap = g["step_time_mean"] - d["step_time_mean"]
    deltas = {p: g["phases_mean"][p] - d["phases_mean"][p] for p in PHASES}
    order = sorted(PHASES, key=lambda p: -deltas[p])
    if gap > 0:
        parts = ", ".join(f"{PHASE_LABELS[p]} {deltas[p]:+.3g} s" for p in order)
        text = (
            f"**Step time: GNDPO is slower**: {fmt(g['step_time_median'])} s vs {fmt(d['step_time_median'])} s "
            f"median ({pct(g['step_time_median'], d['step_time_median'])}). Phase differences, GNDPO minus "
            f"Distillation, mean s per step (they sum to the mean-step difference, {mean_gap:+.3g} s): {parts}."
        )
        causes = []
        if deltas["student_scoring"] > 0:
            causes.append(
                f"(1) the student re-score, {fmt(deltas['student_scoring'])} s/step "
                f"({100 * deltas['student_scoring'] / mean_gap:.0f}% of the mean gap): {CAUSE_STUDENT_SCORING}"
                if mean_gap > 0
                else f"(1) the student re-score, {fmt(deltas['student_scoring'])} s/step: {CAUSE_STUDENT_SCORING}"
            )
        hg, hd = g["head_rows_per_step"], d["head_rows_per_step"]
        if hg > hd:
            cause = CAUSE_HEAD_GPU if g.get("fused_head_compact") else CAUSE_HEAD_CPU
            causes.append(
                f"({len(causes) + 1}) vocabulary projections: GNDPO projects {fmt(hg)} rows x heads per step against "
                f"DistillationTrainer's {fmt(hd)} ({fmt(ratio(hg, hd))}x) for the same "
                f"{fmt(g['completion_tokens_per_step'])} completion tokens (counted): {cause}"
            )
        if causes:
            text += " Measured causes: " + "; ".join(causes) + "."
        specific = sum(deltas[p] for p in PHASES if p not in SAME_WORK_PHASES and deltas[p] > 0)
        noise = sum(deltas[p] for p in SAME_WORK_PHASES)
        text += (
            f" Phases with a GNDPO-specific cause add {specific:+.3g} s/step; the phases that do the same work in "
            f"every trainer (generation, optim + rest) differ by {noise:+.3g} s/step, which no GNDPO-specific work "
            "explains (between-process variation; see the note on generation speed, when there is one)."
        )
        if not causes:
            text += " The gap is not yet explained."
        out.append(text)
    else:
        out.append(
            f"Step time: GNDPO is not slower ({fmt(g['step_time_median'])} s vs {fmt(d['step_time_median'])} s "
            f"median, {pct(g['step_time_median'], d['step_time_median'])}): the target (GNDPO <= Distillation) is met."
        )
    out += explain_generation(g, d, probe_check)
    if g["completion_tokens_per_s"] < d["completion_tokens_per_s"]:
        out.append(
            f"**Tokens per second: GNDPO is lower** ({fmt(g['completion_tokens_per_s'])} vs "
            f"{fmt(d['completion_tokens_per_s'])} completion tokens/s): the same tokens per step "
            f"({fmt(g['completion_tokens_per_step'])} vs {fmt(d['completion_tokens_per_step'])}) divided by the "
            "slower step above; same causes."
        )
    label, gm = memory_headline(g)
    dm = memory_headline(d)[1]
    if gm > dm:
        go, do = g["phase_own_peak_delta_bytes"], d["phase_own_peak_delta_bytes"]
        bigger = [p for p in PHASES if go.get(p, 0) - do.get(p, 0) > MIB]
        parts = ", ".join(f"{PHASE_LABELS[p]} {mib(go.get(p, 0))} vs {mib(do.get(p, 0))} MiB" for p in bigger)
        text = (
            f"**Memory: GNDPO's {label} is higher**: {mib(gm)} vs {mib(dm)} MiB ({pct(gm, dm)}, "
            f"{mib(gm - dm)} MiB). After set-up the two processes differ by "
            f"{mib(g['rss_after_setup_bytes'] - d['rss_after_setup_bytes'])} MiB of RSS."
        )
        gs, ds = g.get("rss_split_after_setup_bytes", {}), d.get("rss_split_after_setup_bytes", {})
        if "RssAnon" in gs and "RssAnon" in ds:
            text = text[:-1] + (
                f" (anonymous {mib(gs['RssAnon'] - ds['RssAnon'])}, file-backed {mib(gs['RssFile'] - ds['RssFile'])})."
            )
        if bigger:
            text += f" Phases whose own peak growth is larger under GNDPO (GNDPO vs Distillation): {parts}."
            if not g.get("fused_head_compact") and ("teacher" in bigger or "student_scoring" in bigger):
                columns = f"{min(g['vocab_size'], 32_768):,}" if "vocab_size" in g else "up to 32,768"
                text += (
                    " In the teacher and student re-score phases that is TRL's fused log-prob head, which allocates a "
                    f"(positions x {columns}-column) float32 tile per call and, on this CPU, covers every prompt and "
                    "completion position (see the vocabulary-projection count)."
                )
        text += " " + explain_rss_peak(g, d)
        cause = memory_cause_findings(entry or {})
        text += " " + (
            cause["text"]
            if cause
            else "Not run here: the allocator and prompt-length check (`--memory-cause`) that measures the cause."
        )
        out.append(text)
    else:
        out.append(f"Memory: GNDPO's {label} is not higher ({mib(gm)} vs {mib(dm)} MiB, {pct(gm, dm)}).")
    return out


# `--memory-cause`: glibc settings under which every allocation of 128 KiB or more is its own mmap, unmapped when freed
# (fixed thresholds turn off glibc's dynamic mmap threshold), and the heap's free top is trimmed: freed tensors leave
# the RSS at once, so the peak RSS follows the peak of live memory instead of what the allocator keeps after frees
RETURNING = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
ALLOCATOR_LABELS = {
    "default": "glibc defaults",
    "returning": "freed memory returned at once",
}


def _memory_cause_table(entry: dict) -> dict:
    """{(allocator, prompt words added): {trainer: record}} of the `--memory-cause` runs that succeeded."""
    out = {}
    for r in entry.get("memory_cause", []):
        if ok(r):
            out.setdefault((r["allocator"], r["prompt_extra_words"]), {})[r["trainer"]] = r
    return {k: v for k, v in out.items() if "gndpo" in v and "distillation" in v}


def _rows_per_call(r: dict) -> float:
    return r["head_rows_per_step"] / max(r["head_calls_per_step"], 1)


def _kernel_slope(entry: dict) -> tuple[float, float, list] | None:
    """(bytes of peak RSS per row, bytes of one float32 row of a tile, records) of TRL's fused-head kernel alone,
    from the smallest and largest row counts measured, or None."""
    runs = sorted((r for r in entry.get("head_kernel", []) if "error" not in r), key=lambda r: r["head_kernel_rows"])
    if len(runs) < 2:
        return None
    lo, hi = runs[0], runs[-1]
    slope = (hi["backward_peak_growth_bytes"] - lo["backward_peak_growth_bytes"]) / (
        hi["head_kernel_rows"] - lo["head_kernel_rows"]
    )
    return slope, 4 * hi["chunk_columns"], runs


def memory_cause_findings(entry: dict) -> dict | None:
    """What the `--memory-cause` runs show about GNDPO's higher peak RSS: a sentence and the figures behind it."""
    runs = _memory_cause_table(entry)
    base = {a: runs.get((a, 0)) for a in ALLOCATOR_LABELS}
    if not (base["default"] and base["returning"]):
        return None
    extra = max((w for _, w in runs), default=0)

    def gap(pair):
        return pair["gndpo"]["peak_rss_bytes"] - pair["distillation"]["peak_rss_bytes"]

    gap_default, gap_returning = gap(base["default"]), gap(base["returning"])
    kept = {
        t: base["default"][t]["peak_rss_bytes"] - base["returning"][t]["peak_rss_bytes"]
        for t in ("gndpo", "distillation")
    }
    parts = [
        f"Measured cause (allocator and prompt-length check below): with glibc set to return freed memory to the "
        f"kernel at once, GNDPO's peak RSS is {mib(gap_returning)} MiB above DistillationTrainer's, against "
        f"{mib(gap_default)} MiB with glibc's defaults in the same check"
    ]
    if gap_returning > 0 and gap_returning >= 0.5 * gap_default:
        parts.append(
            f"so the gap is live memory, not memory the allocator keeps after frees (that retained memory raises "
            f"DistillationTrainer's peak by {mib(kept['distillation'])} MiB and GNDPO's by {mib(kept['gndpo'])} MiB: "
            + ("it narrows the gap" if kept["distillation"] > kept["gndpo"] else "it widens the gap")
            + ")"
        )
    elif gap_returning <= 0.5 * gap_default:
        parts.append(
            "so most of the gap is memory glibc keeps after frees (RSS that no live tensor holds), not live memory"
        )
    result = {"gap_default": gap_default, "gap_returning": gap_returning, "kept": kept}
    longer = runs.get(("returning", extra)) if extra else None
    if longer:
        g0, g1 = base["returning"]["gndpo"], longer["gndpo"]
        d0 = base["returning"]["distillation"]
        completions = g0["completion_tokens_per_step"] / g0["config"]["completion_length"]
        per_completion = (g1["prompt_tokens_per_step"] - g0["prompt_tokens_per_step"]) / completions
        added_rows = _rows_per_call(g1) - _rows_per_call(g0)
        growth = gap(longer) - gap_returning
        slope = growth / added_rows if added_rows > 0 else math.nan
        prompt_rows = _rows_per_call(g0) - d0["completion_tokens_per_step"] / d0["micro_steps_per_step"]
        result.update(slope=slope, prompt_rows=prompt_rows, added_rows=added_rows)
        text = (
            f"Longer prompts ({fmt(per_completion)} more prompt tokens per completion, completions unchanged) widen "
            f"it by {mib(growth)} MiB: GNDPO's fused-head calls grow by {fmt(added_rows)} rows each, "
            f"DistillationTrainer's JSD rows not at all, and the gap grows by {fmt(slope / MIB)} MiB per added row"
        )
        kernel = _kernel_slope(entry)
        if kernel:
            k_slope, row_bytes, runs = kernel
            result.update(kernel_slope=k_slope, row_bytes=row_bytes)
            text += (
                f"; TRL's fused log-prob kernel alone (`ChunkedLogProbFunction`, forward and backward on "
                f"{'/'.join(fmt(r['head_kernel_rows']) for r in runs)} rows) peaks {fmt(k_slope / MIB)} MiB higher "
                f"per row in its backward, {fmt(k_slope / row_bytes)} float32 rows of {fmt(row_bytes // 4)} columns "
                "(on a device without Triton its backward folds each (rows x columns) tile in torch, several "
                "full-tile temporaries at once)"
            )
        text += (
            f". At the size's own prompts GNDPO puts {fmt(prompt_rows)} prompt positions per call through that head "
            f"(rows per call minus the completion rows DistillationTrainer projects): at {fmt(slope / MIB)} MiB per "
            f"row, {mib(prompt_rows * slope)} MiB, against the measured gap of {mib(gap_returning)} MiB (freed memory "
            f"returned) and {mib(gap_default)} MiB (glibc defaults; the main comparison: "
            f"{mib(entry['main']['gndpo']['peak_rss_bytes'] - entry['main']['distillation']['peak_rss_bytes'])} MiB)"
        )
        kernel_match = bool(kernel) and abs(kernel[0] - slope) <= 0.25 * max(kernel[0], slope)
        accounted = abs(prompt_rows * slope - gap_returning) <= 0.35 * max(gap_returning, prompt_rows * slope)
        if accounted and not kernel_match:
            text += (
                ". So the gap tracks the prompt positions GNDPO projects, and they account for it; but the gap's "
                "growth per row differs from the fused kernel's own per-row peak by more than 25%, so which of "
                "GNDPO's per-position memory (the head's tiles or other per-position tensors) makes it is not "
                "separated at this size"
            )
        elif accounted:
            text += (
                ". So the peak RSS gap is the backward of TRL's fused log-prob head over the prompt positions, "
                "which on this CPU it projects with every completion (`compact = _use_triton(device)` is false), "
                "while DistillationTrainer's kernel sees completion rows only; the allocator's retained memory only "
                "shifts it"
            )
        else:
            text += (
                ". The prompt rows account for a different amount than the gap; the remainder is not explained by "
                "this check"
            )
        parts.append(text)
    result["text"] = "; ".join(parts[:2]) + ". " + " ".join(p + "." for p in parts[2:])
    return result


def render_memory_cause(entry: dict) -> list[str]:
    runs = _memory_cause_table(entry)
    rows = []
    for (allocator, words), pair in sorted(runs.items(), key=lambda kv: (kv[0][0] != "default", kv[0][1])):
        g, d = pair["gndpo"], pair["distillation"]
        completions = g["completion_tokens_per_step"] / g["config"]["completion_length"]
        rows.append(
            [
                ALLOCATOR_LABELS[allocator],
                fmt(words),
                fmt(g["prompt_tokens_per_step"] / completions),
                f"{fmt(_rows_per_call(g))} / {fmt(d['completion_tokens_per_step'] / d['micro_steps_per_step'])}",
                mib(g["peak_rss_bytes"]),
                mib(d["peak_rss_bytes"]),
                mib(g["peak_rss_bytes"] - d["peak_rss_bytes"]),
                mib(g["rss_after_setup_bytes"] - d["rss_after_setup_bytes"]),
                mib(
                    (g["peak_rss_bytes"] - g["rss_after_setup_bytes"])
                    - (d["peak_rss_bytes"] - d["rss_after_setup_bytes"])
                ),
            ]
        )
    failed = [r for r in entry.get("memory_cause", []) if not ok(r)]
    lines = [
        "### Peak RSS: allocator settings and prompt length (`--memory-cause`)",
        "",
        "GNDPO and DistillationTrainer, each in its own process, with glibc's default allocator settings and with "
        f"freed memory returned to the kernel at once ({', '.join(f'`{k}={v}`' for k, v in RETURNING.items())}: every "
        "allocation of 128 KiB or more is its own mapping, unmapped when freed; fixed thresholds switch off glibc's "
        "dynamic mmap threshold), each at the size's prompts and with the same filler words put before every prompt "
        "(completions unchanged). With freed memory returned, the peak RSS follows the peak of live memory. "
        f"{fmt(entry['memory_cause'][0]['config']['steps'])} measured step(s) after "
        f"{fmt(entry['memory_cause'][0]['config']['warmup'])} warm-up step(s) per process.",
        "",
        table(
            [
                "allocator",
                "prompt words added",
                "prompt tokens / completion",
                "fused-head rows per call: GNDPO / Distillation completion rows",
                "GNDPO peak RSS (MiB)",
                "Distillation peak RSS (MiB)",
                "gap (MiB)",
                "gap after set-up (MiB)",
                "gap in training growth (MiB)",
            ],
            rows,
        ),
        "",
    ]
    kernel = _kernel_slope(entry)
    if kernel:
        k_slope, row_bytes, runs = kernel
        lines += [
            "TRL's fused log-prob kernel alone, freed memory returned (random rows of the student's hidden width "
            f"against a {fmt(runs[0]['vocab_size'])}-row head, forward and backward once after a warm-up call; peak "
            "RSS growth over the warm-up's peak): "
            + "; ".join(
                f"{fmt(r['head_kernel_rows'])} rows: forward +{mib(r['forward_peak_growth_bytes'])} MiB, backward "
                f"+{mib(r['backward_peak_growth_bytes'])} MiB"
                for r in runs
            )
            + f"; {fmt(k_slope / MIB)} MiB per row in the backward, {fmt(k_slope / row_bytes)} float32 rows of "
            f"{fmt(row_bytes // 4)} columns.",
            "",
        ]
    if memory_cause_findings(entry):
        lines += ["What these runs show is stated with the memory gap in the section above.", ""]
    if failed:
        lines += [f"Failed runs: {len(failed)} ({', '.join(r.get('error', '?') for r in failed)}).", ""]
    return lines


def _check_records(probe_check: dict | None, mode: str) -> dict:
    return {t: r for t, r in ((probe_check or {}).get(mode) or {}).items() if ok(r)}


def explain_generation(g: dict, d: dict, probe_check: dict | None) -> list[str]:
    """Generation is the same work in every trainer: its speed in the two processes, and what the probe check shows
    (the same work with the memory probes off, and with the former uncapped heap sampler)."""
    gen_g, gen_d = generation_median(g), generation_median(d)
    off, uncapped = _check_records(probe_check, "off"), _check_records(probe_check, "uncapped")

    def close(a: float, b: float) -> bool:
        return b > 0 and abs(a / b - 1) <= 0.05

    same = close(gen_g, gen_d)
    text = (
        f"**Generation, the same work in both trainers**: {fmt(gen_g)} s/step in GNDPO's processes and "
        f"{fmt(gen_d)} s/step in DistillationTrainer's (medians, {pct(gen_g, gen_d)}"
        + (", within 5%)." if same else "; per step in results.json).")
    )
    have_off = "gndpo" in off and "distillation" in off
    have_uncapped = "gndpo" in uncapped and "distillation" in uncapped
    if have_uncapped:
        ug, ud = uncapped["gndpo"], uncapped["distillation"]
        og, od = ug["memory_probe_overhead"], ud["memory_probe_overhead"]
        gu, du = generation_median(ug), generation_median(ud)
        text += (
            f" With the heap sampler uncapped (a read every 2 ms whatever it costs, as this benchmark sampled "
            f"before): generation {fmt(gu)} vs {fmt(du)} s/step ({pct(gu, du)}), step {fmt(ug['step_time_median'])} "
            f"vs {fmt(ud['step_time_median'])} s ({fmt(ratio(ug['step_time_median'], ud['step_time_median']))}x); "
            f"a read (glibc's `mallinfo2`, which walks every free chunk of every arena under the arena's lock, and "
            f"the RSS) took {1e3 * og['sampler_mean_s']:.2g} ms of wall time in GNDPO's process and "
            f"{1e3 * od['sampler_mean_s']:.2g} ms in DistillationTrainer's, so the sampler was busy "
            f"{100 * og['sampler_share']:.0f}% and {100 * od['sampler_share']:.0f}% of the time, beside "
            f"{g['machine']['torch_threads']} torch thread(s) on {g['machine']['cpu_cores']} cores."
        )
    if have_off:
        fg, fd = off["gndpo"], off["distillation"]
        go, do = generation_median(fg), generation_median(fd)
        text += (
            f" With the memory probes off: generation {fmt(go)} vs {fmt(do)} s/step ({pct(go, do)}), step "
            f"{fmt(fg['step_time_median'])} vs {fmt(fd['step_time_median'])} s "
            f"({fmt(ratio(fg['step_time_median'], fd['step_time_median']))}x, against "
            f"{fmt(ratio(g['step_time_median'], d['step_time_median']))}x in the main runs)."
        )
        slower_off = go > 1.05 * do
        if have_uncapped and gu > 1.05 * du and not slower_off:
            text += (
                " Measured cause of the generation gap this benchmark reported before: its own heap sampler. "
                "Uncapped, it slows GNDPO's generation more than DistillationTrainer's (a read takes longer on "
                "GNDPO's heap, see the read times above, and reads take CPU time and the allocator's lock from the "
                "training threads); without probes GNDPO's generation is not slower. "
                "The sampler now sleeps at least 49 times its last read (at most 2% of the wall time), as in the "
                "main runs above."
            )
        elif not slower_off:
            text += " Without probes GNDPO's generation is not slower: nothing GNDPO-specific here."
        else:
            text += (
                " Without probes GNDPO's generation is still more than 5% slower; whether that is variation between "
                "processes (each check is one process) or GNDPO's is not established; scaling each step time by its "
                f"generation time puts GNDPO's step at {fmt(ratio(speed_adjusted(g, d), d['step_time_median']))}x "
                "DistillationTrainer's."
            )
        floor, floor_off = (probe_check or {}).get("floor"), off.get("grpo")
        if ok(floor) and floor_off is not None:
            text += (
                f" The check runs are single processes at another time than the main runs: GRPO's generation, the "
                f"same work again, took {fmt(generation_median(floor))} s/step in the main runs and "
                f"{fmt(generation_median(floor_off))} s/step in its check run without probes, which shows how much "
                "the machine's speed drifts between runs."
            )
    elif not same:
        text += (
            " Why is not established here (run with `--probe-check` to compare with the memory probes off): "
            "scaling each step time by its generation time puts GNDPO's step at "
            f"{fmt(ratio(speed_adjusted(g, d), d['step_time_median']))}x DistillationTrainer's instead of "
            f"{fmt(ratio(g['step_time_median'], d['step_time_median']))}x."
        )
    return [text] if (not same or have_off or have_uncapped) else []


def _where(peak: dict) -> str:
    phase = peak.get("phase")
    if phase == "step":
        phase = "optim + rest"
    elif phase == "outside":
        phase = "between optimizer steps"
    else:
        phase = PHASE_LABELS.get(phase, phase)
    return f"{phase} of optimizer step {peak['step']}" if peak.get("step") else f"{phase}, outside training steps"


def explain_rss_peak(g: dict, d: dict) -> str:
    """Where each process's RSS peaked (sampled with the heap), and how much of the difference is heap in use."""
    pg, pd = g.get("rss_peak_sampled"), d.get("rss_peak_sampled")
    if not (pg and pd):
        return (
            "How these phase peaks combine into the process-level peak is not established (this run did not sample "
            "the RSS)."
        )
    d_rss, d_heap = g["peak_rss_bytes"] - d["peak_rss_bytes"], pg["heap"] - pd["heap"]
    text = (
        f"Where the RSS peaked (sampled with the heap, every boundary and sampler read): GNDPO at {mib(pg['rss'])} "
        f"MiB in {_where(pg)}, with {mib(pg['heap'])} MiB of heap in use; DistillationTrainer at {mib(pd['rss'])} "
        f"MiB in {_where(pd)}, with {mib(pd['heap'])} MiB in use (the kernel's peaks: {mib(g['peak_rss_bytes'])} "
        f"and {mib(d['peak_rss_bytes'])} MiB). At the two peaks the heap in use differs by {mib(d_heap)} MiB, "
        f"the peak RSS by {mib(d_rss)} MiB."
    )
    if d_rss > 0 and abs(d_heap - d_rss) <= max(0.25 * d_rss, 2 * MIB):
        text += " The RSS difference is the heap in use at the peak: " + (
            "GNDPO's loss forward and backward run TRL's fused head over every prompt and completion position "
            "(see the vocabulary-projection count), whose saved activations and tiles make the extra heap."
            if pg.get("phase") in ("backward", "loss_forward") and not g.get("fused_head_compact")
            else "the memory GNDPO's phases hold at that moment."
        )
    else:
        missed = [
            f"{name}'s by {mib(r['peak_rss_bytes'] - peak['rss'])} MiB"
            for name, r, peak in (("GNDPO", g, pg), ("DistillationTrainer", d, pd))
            if r["peak_rss_bytes"] - peak["rss"] > 0.01 * r["peak_rss_bytes"]
        ]
        text += (
            " The two do not match: the process-level difference also holds memory the allocator keeps after frees "
            "(RSS that is not heap in use)"
            + (
                f", and the sampled peaks fall short of the kernel's ({', '.join(missed)}: the peak came between two "
                "reads)"
                if missed
                else ""
            )
            + "; the sampled peaks cannot place the process-level difference (the check below measures it)."
        )
    return text


def probe_check_rows(entry: dict) -> list[list[str]]:
    """Step and generation times with the capped memory probes (main runs), without probes, with the uncapped
    sampler."""
    main, check = entry["main"], entry.get("probe_check") or {}
    rows = []
    for mode, label in (("main", "capped (main runs)"), ("off", "off"), ("uncapped", "uncapped, every 2 ms")):
        records = main if mode == "main" else check.get(mode) or {}
        for t, r in _records(records):
            if not ok(r):
                rows.append([label, LABELS[t], "failed: " + r.get("error", "?"), "", "", "", "", ""])
                continue
            o = r.get("memory_probe_overhead") or {}
            probes = o.get("memory_probes", True)
            rows.append(
                [
                    label,
                    LABELS[t],
                    fmt(r["step_time_median"]),
                    fmt(generation_median(r)),
                    f"{o.get('sampler_reads', 0):,}" if probes else "-",
                    f"{1e3 * o.get('sampler_mean_s', 0):.3g}" if probes and o.get("sampler_reads") else "-",
                    f"{100 * o.get('sampler_share', 0):.1f}%" if probes else "-",
                    f"{1e3 * o.get('boundary_mean_s', 0):.3g}" if probes and o.get("boundary_reads") else "-",
                ]
            )
    return rows


def render_probe_check(entry: dict) -> list[str]:
    return [
        "### What the memory probes cost (`--probe-check`)",
        "",
        "The main comparison once more per trainer with the CPU memory probes off (timings only), and for GNDPO and "
        "DistillationTrainer with the heap sampler uncapped (a read every 2 ms whatever it costs, as this benchmark "
        "sampled before). Each check is one process per trainer, so between-process variation applies.",
        "",
        table(
            [
                "memory probes",
                "trainer",
                "step time median (s)",
                "generation median (s/step)",
                "sampler reads",
                "mean read (ms of wall time)",
                "sampler busy (share of wall time)",
                "mean boundary read (ms)",
            ],
            probe_check_rows(entry),
        ),
        "",
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------------
def render_not_run(entry: dict) -> list[str]:
    spec = entry["spec"]
    rows = [
        [
            c["pair"],
            f"{c['student_params'] / 1e9:.2f} B ({c['student_layers']} layers, hidden {c['student_hidden']})",
            f"{c['teacher_params'] / 1e9:.2f} B ({c['teacher_layers']} layers, hidden {c['teacher_hidden']})",
            f"{c['vocab_size']:,}",
        ]
        for c in entry["configs"]
    ]
    return [
        f"**{entry['status']}.** No figure exists for this size: its configurations were only built, and the models "
        "instantiated on PyTorch's meta device (no memory) to count their parameters.",
        "",
        f"Planned work: per-device batch {spec['batch_size']}, gradient accumulation {spec['grad_accum']}, "
        f"{spec['num_generations']} completions per prompt, completion length {spec['completion_length']}, bf16, "
        "activation checkpointing on, a 32x32 image per prompt (the test suite's Qwen-VL processor), random weights.",
        "",
        table(["pair", "student", "teacher", "vocabulary"], rows),
        "",
    ]


def render_size(entry: dict) -> str:
    lines = [f"## Size `{entry['size']}`", "", f"Command: `{entry['command']}`"]
    if "wall_s" in entry:
        lines[-1] += (
            f" (started {entry['started']}; {entry['wall_s'] / 60:.1f} min in all, including any wait for an idle "
            "machine and repeated measurements)"
        )
    lines.append("")
    if entry.get("status"):
        return "\n".join(lines + render_not_run(entry))
    main, spec = entry["main"], entry["spec"]
    first = next((r for _, r in _records(main) if ok(r)), None)
    if first is None:
        lines += ["Every trainer failed in this run.", ""]
        for t, r in _records(main):
            lines += [f"{LABELS[t]}: {r.get('error')}", "", "```", r.get("log_tail", "")[-1500:], "```", ""]
        return "\n".join(lines)
    gen_batch = spec["batch_size"] * spec["grad_accum"]
    good = [r for _, r in _records(main) if ok(r)]
    students = {r["student_fingerprint"] for r in good}
    teachers = {r["teacher_fingerprint"] for r in good if r["teacher_fingerprint"]}
    others = [r.get("other_processes_cpu_share", math.nan) for r in good]
    lines += [
        f"Models: {first['description']}.",
        "",
        f"Work per optimizer step: one generation batch of {gen_batch} completions "
        f"({gen_batch // spec['num_generations']} prompts x {spec['num_generations']}), per-device batch "
        f"{spec['batch_size']} x {spec['grad_accum']} micro-steps, every completion exactly "
        f"{spec['completion_length']} tokens, seed {spec['seed']}, learning rate {spec['lr']}. Step time: median of "
        f"{first['steps_measured']} optimizer steps after {spec['warmup']} warm-up step(s); torch threads "
        f"{first['machine']['torch_threads']}.",
        "",
        f"Same starting weights in every process: student {'yes' if len(students) == 1 else 'NO'} "
        f"({len(students)} weight fingerprint), teacher {'yes' if len(teachers) <= 1 else 'NO'} ({len(teachers)} "
        f"fingerprint; GRPO loads none). CPU time used by other processes while the workers ran: "
        f"{100 * min(others):.0f}-{100 * max(others):.0f}% of the machine"
        + (
            f" (runs repeated because the machine was busy: {sum(r.get('attempts', 1) - 1 for r in good)})."
            if any(r.get("attempts", 1) > 1 for r in good)
            else "."
        ),
        "",
        "### Headline: per optimizer step, ratios against DistillationTrainer",
        "",
        table(
            [
                "trainer",
                "step time median (s)",
                "x Distillation",
                "min-max (s)",
                "generation median, same work (s)",
                "x Distillation, speed-adjusted",
                "completion tok/s",
                "prompt+completion tok/s",
                "tok/s x Distillation",
                f"{memory_headline(first)[0]} (MiB)",
                "x Distillation",
                "RSS growth in training (MiB)",
            ],
            headline_rows(main),
        ),
        "",
        *(
            [
                "Each trainer ran in one fresh process per round, the rounds interleaved (gndpo, distillation, grpo, "
                "gndpo, ...); the figures above pool the measured steps of all rounds. Per round:",
                "",
                table(
                    [
                        "trainer",
                        "round",
                        "step time median (s)",
                        "generation, same work (s/step)",
                        f"{memory_headline(first)[0]} (MiB)",
                        "CPU used by other processes",
                    ],
                    round_rows(main),
                ),
                "",
            ]
            if any(len(r.get("rounds", [])) > 1 for _, r in _records(main))
            else []
        ),
        "### Where the step goes (mean seconds per optimizer step, share of the step)",
        "",
        table(["trainer"] + [PHASE_LABELS[p] for p in PHASES] + ["sum of phases", "mean step"], phase_rows(main)),
        "",
        "### Teacher forwards and vocabulary projections",
        "",
        table(
            [
                "trainer",
                "optimizer steps / generation batch",
                "micro-steps / optimizer step",
                "completions / generation batch",
                "teacher scoring passes / generation batch",
                "teacher backbone calls / generation batch",
                "teacher rows scored / generation batch",
                "vocabulary-head rows projected / step",
                "per completion token",
            ],
            teacher_rows(main),
        ),
        "",
        "A teacher scoring pass is one call of GNDPO's `_score_tokens`, or one `_get_last_hidden_state` call on the "
        "teacher in DistillationTrainer's loss. GNDPO's single pass runs the teacher over the generation batch in "
        f"chunks of the per-device batch ({spec['grad_accum']} backbone calls); DistillationTrainer runs the teacher "
        "in the loss of every micro-step. In both, every completion is scored by the teacher once (rows scored = "
        "completions). Vocabulary-head rows: rows of hidden states projected through a vocabulary head (a JSD row "
        "counts twice: student and teacher heads), counted at TRL's two kernels.",
        "",
        f"### Peak memory growth of each phase (MiB over the phase's start, nested phases excluded; max over measured "
        f"steps; {memory_kind(first)})",
        "",
        table(["trainer"] + [PHASE_LABELS[p] for p in PHASES] + ["whole step"], phase_memory_rows(main)),
        "",
        "### GNDPO vs DistillationTrainer: gaps and their measured causes",
        "",
    ]
    check = dict(entry["probe_check"], floor=main.get("grpo")) if entry.get("probe_check") else None
    lines += [f"- {text}" for text in explain_gaps(main, check, entry)] + [""]
    if entry.get("memory_cause"):
        lines += render_memory_cause(entry)
    if entry.get("probe_check"):
        lines += render_probe_check(entry)
    if entry.get("scaling"):
        lines += render_scaling(entry)
    if entry.get("variants"):
        lines += render_variants(entry)
    if entry.get("vocab_sweep"):
        lines += render_vocab(entry)
    for t, r in _records(main):
        if not ok(r):
            lines += [f"{LABELS[t]} failed: {r.get('error')}", "", "```", r.get("log_tail", "")[-1500:], "```", ""]
    return "\n".join(lines)


def render_scaling(entry: dict) -> list[str]:
    spec = entry["spec"]
    points = {(spec["batch_size"], spec["completion_length"]): {t: entry["main"].get(t) for t in TRAINERS}}
    failed = []
    for r in entry["scaling"]:
        if not ok(r):
            failed.append(r)
            continue
        points.setdefault((r["config"]["batch_size"], r["config"]["completion_length"]), {})[r["trainer"]] = r
    base = points[(spec["batch_size"], spec["completion_length"])]
    rows = []
    for (batch, length), records in points.items():
        row = [str(batch), str(length)]
        for t in ("gndpo", "distillation"):
            r, b = records.get(t), base.get(t)
            if ok(r):
                row += [
                    fmt(r["step_time_median"]),
                    fmt(ratio(r["step_time_median"], b["step_time_median"])) if ok(b) else "n/a",
                    mib(memory_headline(r)[1]),
                    mib(r["phase_peak_delta_bytes"]["step"]),
                    mib(r["phase_own_peak_delta_bytes"]["teacher"]),
                ]
            else:
                row += ["n/a"] * 5
        g, d = records.get("gndpo"), records.get("distillation")
        row.append(fmt(ratio(g["step_time_median"], d["step_time_median"])) if ok(g) and ok(d) else "n/a")
        rows.append(row)
    steps = "/".join(str(n) for n in sorted({r["steps_measured"] for r in entry["scaling"] if ok(r)}))
    label = memory_headline(base["gndpo"])[0] if ok(base.get("gndpo")) else "memory"
    out = [
        "### Scaling: completion length and per-device batch doubled",
        "",
        f"Same work per point for both trainers (a generation batch is the per-device batch x {spec['grad_accum']} "
        f"micro-steps). The first row is the main comparison; the other rows are medians of {steps} measured step(s) "
        "after the same warm-up. Time ratios are against the first row of the same trainer.",
        "",
        table(
            [
                "per-device batch",
                "completion length",
                "GNDPO step (s)",
                "x first row",
                f"GNDPO {label} (MiB)",
                "GNDPO step peak growth (MiB)",
                "GNDPO teacher peak growth (MiB)",
                "Distillation step (s)",
                "x first row",
                f"Distillation {label} (MiB)",
                "Distillation step peak growth (MiB)",
                "Distillation teacher peak growth (MiB)",
                "GNDPO / Distillation time",
            ],
            rows,
        ),
        "",
    ]
    for r in failed:
        out += [f"A scaling point failed: {r.get('error')} ({json.dumps(r.get('spec', {}))[:300]})", ""]
    return out


def variant_row(name: str, r: dict, ref: dict) -> list[str]:
    reuse = r.get("reuse_check")
    step = r["step_time_mean"] if reuse else r["step_time_median"]
    ref_step = ref["step_time_median"] if ok(ref) else math.nan
    label, mem = memory_headline(r)
    split = r.get("rss_split_after_setup_bytes", {})
    return [
        name,
        fmt(step) + (" (mean)" if reuse else ""),
        fmt(ratio(step, ref_step)),
        fmt(r["phases_mean"]["teacher"]),
        mib(r["phase_own_peak_delta_bytes"]["teacher"]),
        f"{mib(mem)} ({label})",
        mib(r.get("cuda_after_setup_bytes")) if "cuda_after_setup_bytes" in r else "-",
        f"{mib(r['rss_after_setup_bytes'])} ({mib(split.get('RssAnon'))} + {mib(split.get('RssFile'))})",
        fmt(r["optimizer_steps_per_generation_batch"]),
        fmt(r["teacher_scoring_passes_per_generation_batch"]),
    ]


def render_variants(entry: dict) -> list[str]:
    ref = entry["main"].get("gndpo")
    rows, notes, deltas = [], [], []
    if ok(ref):
        rows.append(variant_row("full-precision teacher (default)", ref, ref))
    base = ref.get("rss_split_after_setup_bytes", {}) if ok(ref) else {}
    for r in entry["variants"]:
        if "skipped" in r:
            rows.append([r["variant"], "not measured: " + r["skipped"]] + [""] * 8)
        elif not ok(r):
            name = (r.get("spec", {}).get("variant") or {}).get("name", "?")
            rows.append([name, "failed: " + r.get("error", "?")] + [""] * 8)
            notes.append(f"{name} failed; end of its log:\n\n```\n{r.get('log_tail', '')[-1200:]}\n```\n")
        else:
            rows.append(variant_row(r["variant"], r, ref))
            split = r.get("rss_split_after_setup_bytes", {})
            if "teacher_model_init_kwargs" in json.dumps(r.get("config", {}).get("variant", {})) and base and split:
                deltas.append(
                    f"{r['variant']}: anonymous {mib(split['RssAnon'] - base['RssAnon'])} MiB, file-backed "
                    f"{mib(split['RssFile'] - base['RssFile'])} MiB"
                )
    return [
        "### GNDPO teacher memory options",
        "",
        "GNDPOTrainer only, same work as the main comparison, each in its own process. The quantized teachers are "
        "loaded by GNDPO from the saved teacher with `teacher_model_init_kwargs={'quantization_config': {...}}` "
        "(bitsandbytes `load_in_8bit`, or `load_in_4bit` with nf4). `num_iterations=2` is not a memory option: it "
        "reuses each generation batch for two optimizer steps, and shows that the teacher still scores it once (its "
        "step time is the mean over whole generation batches, steps with and without generation). RSS after set-up "
        "(both models loaded, libraries imported) is split into anonymous memory (the heap: tensors the process "
        "allocated) and file-backed pages (mostly the safetensors checkpoints, which transformers memory-maps when "
        "loading).",
        "",
        table(
            [
                "variant",
                "step time (s)",
                "x default",
                "teacher phase (s/step)",
                "teacher phase peak growth (MiB)",
                "memory (MiB)",
                "CUDA allocated after set-up (MiB)",
                "RSS after set-up: anonymous + file-backed (MiB)",
                "optimizer steps / generation batch",
                "teacher scoring passes / generation batch",
            ],
            rows,
        ),
        "",
        *(
            [
                "RSS after set-up against the full-precision teacher: "
                + "; ".join(deltas)
                + ". A model that transformers loads from disk is memory-mapped: file-backed pages, which the kernel "
                "can drop and re-read. Quantized weights are anonymous memory, and a quantized run's file-backed "
                "column also holds whatever of the full-precision checkpoint stays mapped after quantizing. (The tiny "
                "models are built in memory, so their weights are anonymous in every run.)",
                "",
            ]
            if deltas
            else []
        ),
        *notes,
    ]


def render_vocab(entry: dict) -> list[str]:
    rows = []
    for r in entry["vocab_sweep"]:
        if not ok(r):
            spec = r.get("spec", {})
            rows.append([fmt(spec.get("vocab_size")), spec.get("trainer", "?"), "failed: " + r.get("error", "?")])
            rows[-1] += [""] * 6
            continue
        own = r["phase_own_peak_delta_bytes"]
        rows.append(
            [
                fmt(r["config"]["vocab_size"]),
                LABELS[r["trainer"]],
                fmt(r["step_time_median"]),
                mib(own["teacher"]),
                mib(own["student_scoring"]),
                mib(own["loss_forward"]),
                mib(own["backward"]),
                mib(r["phase_peak_delta_bytes"]["step"]),
                fmt(r["head_rows_per_step"]),
            ]
        )
    notes = []
    by_key = {(r["trainer"], r["config"]["vocab_size"]): r for r in entry["vocab_sweep"] if ok(r)}
    for vocab in sorted({v for _, v in by_key}):
        g, d = by_key.get(("gndpo", vocab)), by_key.get(("distillation", vocab))
        if g and d:
            notes.append(
                f"{vocab:,} columns: GNDPO's step is {fmt(ratio(g['step_time_median'], d['step_time_median']))}x "
                f"DistillationTrainer's, with {fmt(ratio(g['head_rows_per_step'], d['head_rows_per_step']))}x its "
                "vocabulary-head rows"
            )
    summary = (
        [
            "Step time against the vocabulary (same causes as in the main comparison: the student re-score and, on "
            "this CPU, vocabulary projections over the prompt positions, whose cost grows with the vocabulary): "
            + "; ".join(notes)
            + ".",
            "",
        ]
        if notes
        else []
    )
    return [
        "### Vocabulary size at tiny width: does teacher-scoring memory grow with it?",
        "",
        "The tiny student and teacher with their embedding and head raised to each vocabulary size (the extra ids "
        "are never in a prompt but can be sampled); otherwise the same work as the main comparison. TRL's kernels "
        "project a vocabulary 32,768 columns at a time, so scoring memory that is independent of the vocabulary "
        "beyond one chunk shows as equal peaks at 32,768 and at Qwen's 151,936. The sweep measures memory, so its "
        "workers sample the heap every 2 ms without the main comparison's duty cap (a capped sampler misses the "
        "short scoring phases' peaks); their step times therefore include the sampler's cost.",
        "",
        table(
            [
                "vocabulary",
                "trainer",
                "step time median (s)",
                "teacher peak growth (MiB)",
                "student re-score peak growth (MiB)",
                "loss fwd peak growth (MiB)",
                "backward peak growth (MiB)",
                "whole step peak growth (MiB)",
                "vocabulary-head rows / step",
            ],
            rows,
        ),
        "",
        "DistillationTrainer's teacher phase is the teacher backbone only; its teacher head is projected inside the "
        "JSD kernel, so its vocabulary-dependent memory shows in its loss fwd and backward columns. The backward and "
        "whole-step peaks also grow with the gradients of the larger embedding and head.",
        "",
        *summary,
    ]


METHOD = """## How it is measured

- **One process per trainer.** `benchmarks/run.py` starts `benchmarks/worker.py` once per trainer (and per variant,
  scaling point or vocabulary size), one after another, so each peak memory belongs to one trainer and no two runs
  share the CPU. The worker builds its own copies of the student and teacher from the same files or the same seeded
  initialization (the weight fingerprints are compared above), builds the trainer, and times it by wrapping a few of
  the trainer's own methods on the instance; no library code is modified.
- **Same work.** The same prompts in the same order (`shuffle_dataset=False`), per-device batch, gradient
  accumulation, completions per prompt, seed, AdamW learning rate (constant schedule, weight decay 0.01, gradient
  clipping 1.0), sampling at temperature 1 with top-p 1 and top-k 0, dropout disabled, activation checkpointing off
  on CPU (on for `gpu-qwen`), float32 on CPU and bf16 on GPU. One generation batch (per-device batch x gradient
  accumulation) feeds exactly one optimizer step in all three: GRPOTrainer and GNDPO use `steps_per_generation =
  gradient_accumulation_steps` and `num_iterations = 1`; DistillationTrainer generates once per accumulation window by
  design. Every completion is exactly `max_completion_length` tokens (`generation_kwargs={"min_new_tokens": L}`), so
  the trainers process the same number of tokens although they sample different tokens.
- **What cannot be identical, by design.**
  - TRL 1.16's `DistillationTrainer` has no `lmbda` (the older GKD trainer's mix of on-policy and dataset
    completions): it always samples its completions from the student, i.e. it is fully on-policy, like GNDPO. It has
    no `num_generations` either and samples one completion per dataset row; it is given each prompt repeated
    `num_generations` times in a row, so its generation batches hold the same prompts and as many completions as
    GNDPO's and GRPO's.
  - The losses differ by design. DistillationTrainer: generalized JSD with `beta=1` (the reverse KL, whose
    per-token sample is GNDPO's signal) over the full vocabulary at every completion position, with the teacher's
    forward inside the loss of each micro-step. GNDPO: the teacher scores the sampled tokens once per generation
    batch, a no-grad student pass gives log p_old, and the loss is a clipped policy gradient (GSPO-token,
    sequence-mean-token-mean) on the whitened signal. GRPO (the floor, no teacher): a trivial reward (completion
    length in characters), `beta=0` (no reference model), `loss_type="grpo"`, `importance_sampling_level="sequence"`
    as in GNDPO.
  - The sampled tokens differ between trainers (each consumes the random stream differently); their number does not.
- **Phases** are exclusive times within an optimizer step (`on_step_begin` to `on_step_end` of the transformers
  loop), so they sum to the step: generation (`_generate`); teacher (GNDPO: `_score_tokens` minus the student pass in
  it; DistillationTrainer: `_get_last_hidden_state` on the teacher, the backbone only); student re-score (a no-grad
  student log-prob pass outside the loss); other prep (the rest of `_generate_and_score_completions`); loss fwd
  (`compute_loss`); backward (`accelerator.backward`); optim + rest (the remainder: clipping, optimizer step, buffer
  slicing, callbacks). Tokens per second: completion tokens (or prompt + completion tokens) per optimizer step
  divided by the median step time.
- **Memory.** Headline: the process's peak RSS (`getrusage`), or CUDA max allocated when a GPU is used. Per phase:
  the peak of the memory in use while the phase is the innermost one, minus its value when the phase began (CPU:
  glibc's bytes in live allocations from `mallinfo2`, which falls when a tensor is freed, unlike RSS, read at every
  phase boundary and by a sampling thread; GPU: `max_memory_allocated`, reset at every boundary). On CPU a phase
  lasting only a few milliseconds (tiny size) may peak between two samples, so its figure is a lower bound. A
  `mallinfo2` read walks every free chunk of the allocator under its lock and takes milliseconds on a large heap,
  more on some trainers' heaps than others', so the sampler reads every 2 ms but sleeps at least 49 times its last
  read (at most 2% of the wall time); the probes' own time is recorded per run (`memory_probe_overhead`), and
  `--probe-check` measures the step with the probes off and with the former uncapped sampler.
- **Counts.** Teacher backbone calls and rows come from a forward pre-hook on the teacher's backbone; scoring passes
  from the wrapped methods; vocabulary-head rows from rebinding, inside the worker process only, the names under
  which TRL's trainers call their two vocabulary kernels (`trl.trainer.utils._ChunkedLogProbFunction`,
  `trl.trainer.distillation_trainer.ChunkedDivergenceFunction`) to counting stand-ins that call the kernels
  unchanged. Per generation batch counts cover every step, warm-up included.
- **Machine load.** Before and during each worker, the CPU time used by other processes is recorded (machine busy
  time from `/proc/stat` minus the worker's own CPU time); timings taken while something else runs are not
  comparable on a 2-core machine, and `--idle-wait` makes the runner wait for an idle machine.
"""


def targets(entries: list[dict]) -> list[str]:
    """The issue's targets, each checked against the measured records."""
    out = []
    for e in entries:
        if e.get("status"):
            continue
        g, d = e["main"].get("gndpo"), e["main"].get("distillation")
        if not (ok(g) and ok(d)):
            continue
        x = ratio(g["step_time_median"], d["step_time_median"])
        verdict = "met" if x <= 1 else "**not met**"
        adjusted = ratio(speed_adjusted(g, d), d["step_time_median"])
        out.append(
            f"- GNDPO step time no more than DistillationTrainer's on the same work (`{e['size']}`): {verdict}, "
            f"{fmt(x)}x ({fmt(adjusted)}x if the difference in generation speed is the machine's; causes in that "
            "section)."
        )
    passes = []
    for e in entries:
        if e.get("status"):
            continue
        runs = [(f"`{e['size']}`", e["main"].get("gndpo"))]
        runs += [(f"`{e['size']}` {r['variant']}", r) for r in e.get("variants", []) if ok(r)]
        passes += [(name, r["teacher_scoring_passes_per_generation_batch"]) for name, r in runs if ok(r)]
    if passes:
        verdict = "met" if all(p == 1 for _, p in passes) else "**not met**"
        detail = ", ".join(f"{name}: {fmt(p)}" for name, p in passes)
        out.append(f"- Teacher run once per generation batch, not per micro-step or iteration: {verdict} ({detail}).")
    for e in entries:
        sweep = [r for r in e.get("vocab_sweep", []) if ok(r) and r["trainer"] == "gndpo"]
        by_vocab = {r["config"]["vocab_size"]: r["phase_own_peak_delta_bytes"]["teacher"] for r in sweep}
        big = sorted(v for v in by_vocab if v >= 32_768)
        if len(big) >= 2:
            lo, hi = by_vocab[big[0]], by_vocab[big[-1]]
            flat = abs(hi - lo) <= max(MIB, 0.05 * lo)
            verdict = "met" if flat else "**not met**"
            out.append(
                f"- Teacher-scoring peak memory independent of the vocabulary beyond one chunk (`{e['size']}` sweep): "
                f"{verdict}: {mib(lo)} MiB at {big[0]:,} columns, {mib(hi)} MiB at {big[-1]:,}."
            )
    return out


def render(results: dict) -> str:
    entries = [results[s] for s in SIZE_ORDER if s in results]
    any_run = next((r for e in entries for _, r in _records(e.get("main", {})) if ok(r)), None)
    lines = [
        "# Benchmarks: GNDPOTrainer vs TRL DistillationTrainer vs GRPOTrainer",
        "",
        "<!-- Generated by benchmarks/run.py from benchmarks/results.json: do not edit by hand. Re-run the commands "
        "below, or re-render with `python benchmarks/run.py --render-only --json benchmarks/results.json --markdown "
        "benchmarks/RESULTS.md`. -->",
        "",
        "Every figure here was measured by `benchmarks/run.py` (commands per size below) and rendered from "
        "`benchmarks/results.json`. Ratios are against TRL's `DistillationTrainer`; `GRPOTrainer` with a trivial "
        "reward is the no-teacher floor.",
        "",
    ]
    if any_run:
        m, v = any_run["machine"], any_run["versions"]
        device = f"{m['device']} ({m['gpu']}, {m['gpu_memory_gib']} GiB)" if "gpu" in m else f"{m['device']} (no GPU)"
        lines += [
            "## Machine and versions",
            "",
            f"- CPU: {m['cpu']}, {m['cpu_cores']} cores, {m['ram_gib']} GiB RAM; {m['os']}",
            f"- Device: {device}",
            "- " + ", ".join(f"{k} {val}" for k, val in v.items()),
            "",
        ]
    lines += ["## Summary", ""]
    for e in entries:
        if e.get("status"):
            lines.append(f"- `{e['size']}`: {e['status']}.")
            continue
        g, d, r = (e["main"].get(t) for t in TRAINERS)
        if ok(g) and ok(d):
            label, gm = memory_headline(g)
            text = (
                f"- `{e['size']}`: GNDPO step time {fmt(ratio(g['step_time_median'], d['step_time_median']))}x "
                f"DistillationTrainer's ({fmt(g['step_time_median'])} vs {fmt(d['step_time_median'])} s), completion "
                f"tokens/s {fmt(ratio(g['completion_tokens_per_s'], d['completion_tokens_per_s']))}x, {label} "
                f"{fmt(ratio(gm, memory_headline(d)[1]))}x; teacher scoring passes per generation batch: GNDPO "
                f"{fmt(g['teacher_scoring_passes_per_generation_batch'])}, Distillation "
                f"{fmt(d['teacher_scoring_passes_per_generation_batch'])}"
            )
            if ok(r):
                text += f"; the no-teacher GRPO floor: {fmt(r['step_time_median'])} s/step"
            lines.append(text + ".")
        else:
            lines.append(f"- `{e['size']}`: a trainer failed (see below).")
    checked = targets(entries)
    if checked:
        lines += ["", "Targets, as measured:", "", *checked]
    lines += ["", METHOD]
    for e in entries:
        lines.append(render_size(e))
    return "\n".join(lines).rstrip() + "\n"


def print_summary(entry: dict) -> None:
    if entry.get("status"):
        print(f"\n[{entry['size']}] {entry['status']}")
        for c in entry["configs"]:
            print(
                f"  {c['pair']}: student {c['student_params'] / 1e9:.2f} B, teacher "
                f"{c['teacher_params'] / 1e9:.2f} B, vocab {c['vocab_size']:,}"
            )
        return
    main = entry["main"]
    ref = main.get("distillation")
    print(f"\n[{entry['size']}] per optimizer step (ratios vs DistillationTrainer); phases: mean s/step")
    header = f"{'trainer':<22}{'step s':>9}{'x dist':>8}{'tok/s':>9}{'x dist':>8}{'mem MiB':>10}{'x dist':>8}"
    print(header + "  " + " ".join(f"{PHASE_LABELS[p][:9]:>9}" for p in PHASES))
    for t, r in _records(main):
        if not ok(r):
            print(f"{LABELS[t]:<22} FAILED: {r.get('error')}")
            continue
        mem = memory_headline(r)[1]
        x_time = ratio(r["step_time_median"], ref["step_time_median"]) if ok(ref) else math.nan
        x_tok = ratio(r["completion_tokens_per_s"], ref["completion_tokens_per_s"]) if ok(ref) else math.nan
        x_mem = ratio(mem, memory_headline(ref)[1]) if ok(ref) else math.nan
        line = f"{LABELS[t]:<22}{r['step_time_median']:>9.3f}{x_time:>8.2f}{r['completion_tokens_per_s']:>9.1f}"
        line += f"{x_tok:>8.2f}{mem / MIB:>10.1f}{x_mem:>8.2f}  "
        print(line + " ".join(f"{r['phases_mean'][p]:>9.3f}" for p in PHASES))
    for r in entry.get("variants", []):
        if ok(r):
            print(
                f"  variant {r['variant']}: {r['step_time_median']:.3f} s/step, teacher scoring passes per "
                f"generation batch {r['teacher_scoring_passes_per_generation_batch']:g}"
            )
        else:
            print(f"  variant {r.get('variant', '?')}: {r.get('skipped') or r.get('error')}")

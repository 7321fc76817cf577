"""GNDPOTrainer vs TRL's DistillationTrainer vs GRPOTrainer, side by side on the same work.

One command measures the three trainers on identical student and teacher copies, prompts, per-device batch,
completions per prompt, completion length, seed and learning rate, one optimizer step per generation batch, each
trainer in a fresh process (so peak memories do not mix), and prints a table, writes JSON and (re)writes the Markdown
report from the measured data::

    python benchmarks/run.py --size tiny --json benchmarks/results.json --markdown benchmarks/RESULTS.md
    python benchmarks/run.py --size smollm2 --scaling --teacher-variants \\
        --json benchmarks/results.json --markdown benchmarks/RESULTS.md

``--json`` merges this run into the file (one entry per size); ``--markdown`` renders every entry of that file.
``--render-only`` re-renders the Markdown from the JSON without measuring. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from models import GPU_PAIRS, QWEN_VOCAB, SIZES  # noqa: E402
from report import RETURNING, TRAINERS, ok, print_summary, render  # noqa: E402
from worker import step_summary  # noqa: E402

VOCAB_SWEEP = (320, 32_768, QWEN_VOCAB)
HEAD_KERNEL_ROWS = (128, 256, 512)  # `--memory-cause`: rows put through TRL's fused log-prob kernel alone
PROMPT_EXTRA_WORDS = 48  # `--memory-cause`: words added before every prompt (completion length unchanged)


# ---------------------------------------------------------------------------------------------------------------------
# Running workers
# ---------------------------------------------------------------------------------------------------------------------
def worker_env() -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine from /proc/stat, in clock ticks."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def busy_fraction(seconds: float = 1.0) -> float:
    """Share of the machine's CPU time used (by anyone) over `seconds`."""
    b0, t0 = cpu_jiffies()
    time.sleep(seconds)
    b1, t1 = cpu_jiffies()
    return (b1 - b0) / max(t1 - t0, 1)


def wait_until_idle(limit: float, threshold: float = 0.25) -> float:
    """Wait (up to `limit` seconds) until other processes use less than `threshold` of the CPU; return the last
    measured busy share. Timings taken while something else runs on a 2-core machine are meaningless."""
    deadline = time.monotonic() + limit
    busy = busy_fraction()
    while busy > threshold and time.monotonic() < deadline:
        print(f" (machine {100 * busy:.0f}% busy, waiting)", end="", flush=True)
        time.sleep(10)
        busy = busy_fraction()
    return busy


def run_worker(
    spec: dict, logdir: Path, tag: str, timeout: float, idle_wait: float = 0, busy_retries: int = 0
) -> dict:
    """`run_worker_once`, repeated (up to `busy_retries` times) while other processes took more than
    `BUSY_THRESHOLD` of the CPU during the run; the record keeps the number of attempts."""
    for attempt in range(busy_retries + 1):
        record = run_worker_once(spec, logdir, tag, timeout, idle_wait)
        record["attempts"] = attempt + 1
        share = record.get("other_processes_cpu_share", 0.0)
        if "error" in record or share <= BUSY_THRESHOLD or attempt == busy_retries:
            return record
        print(f"  {tag}: other processes used {100 * share:.0f}% of the CPU during the run; measuring again")
        time.sleep(5)
    return record


BUSY_THRESHOLD = 0.10


def run_worker_once(spec: dict, logdir: Path, tag: str, timeout: float, idle_wait: float = 0) -> dict:
    """One trainer in a fresh process; returns its record, or {"error": ...} when it failed.

    Also records how busy the machine was: before the start, and during the run the CPU time used by processes
    other than the worker (machine busy time minus the worker's own CPU time), as a share of all cores.
    """
    spec_path, out_path, log_path = logdir / f"{tag}.spec.json", logdir / f"{tag}.json", logdir / f"{tag}.log"
    spec_path.write_text(json.dumps(spec))
    print(f"  {tag} ...", end="", flush=True)
    busy_before = wait_until_idle(idle_wait) if idle_wait > 0 else busy_fraction(0.5)
    load_before = os.getloadavg()
    children_before = os.times()
    jiffies_before = cpu_jiffies()
    started = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(
                [sys.executable, str(HERE / "worker.py"), str(spec_path), str(out_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(worker_env(), **spec.get("env", {})),
                timeout=timeout,
            )
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    wall = time.perf_counter() - started
    jiffies_after, children_after = cpu_jiffies(), os.times()
    ticks = os.sysconf("SC_CLK_TCK")
    machine_busy_s = (jiffies_after[0] - jiffies_before[0]) / ticks
    worker_cpu_s = (children_after.children_user + children_after.children_system) - (
        children_before.children_user + children_before.children_system
    )
    other_share = max(machine_busy_s - worker_cpu_s, 0.0) / max(wall * (os.cpu_count() or 1), 1e-9)
    if code != 0 or not out_path.exists():
        tail = log_path.read_text(errors="replace")[-3000:]
        print(f" FAILED ({code}) after {wall:.0f} s")
        return {"error": f"worker exit {code}", "log_tail": tail, "spec": spec}
    record = json.loads(out_path.read_text())
    record["worker_wall_s"] = wall
    record["loadavg_1min_before"] = load_before[0]
    record["loadavg_1min_after"] = os.getloadavg()[0]
    record["machine_busy_before"] = busy_before
    record["other_processes_cpu_share"] = other_share
    print(f" {record['step_time_median']:.3f} s/step, {wall:.0f} s, other processes {100 * other_share:.0f}% CPU")
    return record


def run_kernel(spec: dict, logdir: Path, tag: str) -> dict:
    """One `head_kernel_peak` measurement in a fresh process (its peak RSS is the process's own)."""
    spec_path, out_path, log_path = logdir / f"{tag}.spec.json", logdir / f"{tag}.json", logdir / f"{tag}.log"
    spec_path.write_text(json.dumps(spec))
    with open(log_path, "w") as log:
        code = subprocess.run(
            [sys.executable, str(HERE / "worker.py"), str(spec_path), str(out_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(worker_env(), **spec.get("env", {})),
        ).returncode
    if code != 0 or not out_path.exists():
        return {"error": f"worker exit {code}", "log_tail": log_path.read_text(errors="replace")[-3000:], "spec": spec}
    record = json.loads(out_path.read_text())
    print(f"  {tag}: backward peak +{record['backward_peak_growth_bytes'] / 2**20:.1f} MiB")
    return record


def base_spec(args) -> dict:
    defaults = SIZES["tiny" if args.shrink else args.size]
    spec = {"size": args.size, "seed": args.seed}
    for key in (
        "batch_size",
        "grad_accum",
        "num_generations",
        "completion_length",
        "warmup",
        "steps",
        "lr",
        "threads",
    ):
        value = getattr(args, key)
        spec[key] = defaults[key] if value is None else value
    if args.sample_interval is not None:
        spec["sample_interval"] = args.sample_interval
    if args.sample_duty is not None:
        spec["sample_duty"] = args.sample_duty
    if args.cpu:
        spec["cpu"] = True
    if args.size == "gpu-qwen" and not args.shrink:
        spec["activation_checkpointing"] = True  # TRL's default; the pairs need it on one GPU
    if (spec["batch_size"] * spec["grad_accum"]) % spec["num_generations"]:
        raise SystemExit("batch_size * grad_accum must be a multiple of num_generations")
    return spec


def available_variants(has_gpu: bool) -> list[dict]:
    """GNDPO teacher memory options; `skip` says why one is not measured here."""
    import dataclasses

    from trl_gndpo import GNDPOConfig

    fields = {f.name for f in dataclasses.fields(GNDPOConfig)}
    compute = '"bfloat16"' if has_gpu else '"float32"'
    variants = [
        {
            "key": "int8",
            "name": "int8 teacher",
            "config": {"teacher_model_init_kwargs": {"quantization_config": {"load_in_8bit": True}}},
        },
        {
            "key": "nf4",
            "name": "nf4 teacher",
            "config": {
                "teacher_model_init_kwargs": {
                    "quantization_config": {
                        "load_in_4bit": True,
                        "bnb_4bit_quant_type": "nf4",
                        "bnb_4bit_compute_dtype": json.loads(compute),
                    }
                }
            },
        },
    ]
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        for v in variants:
            v["skip"] = "bitsandbytes is not installed"
    device_variant = {"key": "teacher_device", "name": "teacher_device", "config": {}}
    offload_variant = {"key": "teacher_offload", "name": "teacher_offload", "config": {"teacher_offload": True}}
    if "teacher_device" not in fields:
        device_variant["skip"] = "GNDPOConfig has no `teacher_device` in this checkout"
    elif not has_gpu:
        device_variant["skip"] = "needs a GPU (on a CPU-only machine the teacher is already on the CPU)"
    else:
        import torch

        device_variant["config"] = {"teacher_device": "cuda:1" if torch.cuda.device_count() > 1 else "cpu"}
        device_variant["name"] = f"teacher_device={device_variant['config']['teacher_device']}"
    if "teacher_offload" not in fields:
        offload_variant["skip"] = "GNDPOConfig has no `teacher_offload` in this checkout"
    elif not has_gpu:
        offload_variant["skip"] = "needs a GPU (offloading to the CPU is a no-op on a CPU-only machine)"
    variants += [device_variant, offload_variant]
    # not a memory option: the teacher must still run once per generation batch when it is reused for 2 updates
    variants.append({"key": "reuse", "name": "num_iterations=2", "config": {"num_iterations": 2}, "reuse_check": True})
    return variants


def measure(args, spec: dict, logdir: Path) -> dict:
    """All the runs one invocation asks for; returns this size's JSON entry."""

    def run(point: dict, tag: str) -> dict:
        return run_worker(point, logdir, tag, args.timeout, args.idle_wait, args.busy_retries)

    started = time.perf_counter()
    entry = {"size": args.size, "command": command_line(), "spec": spec, "started": time.strftime("%Y-%m-%d %H:%M")}
    trainers = args.trainers or list(TRAINERS)
    print(f"[{args.size}] main comparison: {', '.join(trainers)}, {args.rounds} round(s)")
    rounds = {t: [] for t in trainers}
    for index in range(args.rounds):  # interleaved, so slow drifts of the machine hit every trainer alike
        for t in trainers:
            rounds[t].append(run(dict(spec, trainer=t), f"main-{t}-round{index + 1}"))
    entry["main"] = {t: combine_rounds(records) for t, records in rounds.items()}
    compared = [t for t in ("gndpo", "distillation") if t in trainers]
    short = max(1, spec["steps"] - 1)  # measured steps of the extra runs unless given

    if args.probe_check:
        # What the CPU memory probes cost: each trainer once more without them (timings only), and GNDPO and
        # DistillationTrainer once with the sampler reading the heap every 2 ms whatever a read costs (no duty cap)
        print(f"[{args.size}] timing check of the memory probes: off ({', '.join(trainers)}), uncapped sampler")
        check = dict(spec, steps=spec["steps"] * args.rounds)  # as many measured steps as the pooled rounds
        entry["probe_check"] = {
            "off": {t: run(dict(check, trainer=t, memory_probes=False), f"probes-off-{t}") for t in trainers},
            "uncapped": {
                t: run(dict(check, trainer=t, sample_duty=1.0, sample_interval=0.002), f"probes-uncapped-{t}")
                for t in compared
            },
        }

    if args.scaling:
        print(f"[{args.size}] scaling: completion length and batch size doubled")
        entry["scaling"] = []
        steps = args.scaling_steps if args.scaling_steps is not None else short
        for mb, ml in SIZES[args.size]["scaling"]:
            batch, length = spec["batch_size"] * mb, spec["completion_length"] * ml
            for t in compared:
                point = dict(spec, trainer=t, batch_size=batch, completion_length=length, steps=steps)
                entry["scaling"].append(run(point, f"scale-{t}-b{batch}-l{length}"))

    if args.teacher_variants:
        print(f"[{args.size}] GNDPO teacher variants")
        entry["variants"] = []
        for variant in available_variants(spec_has_gpu(spec)):
            if args.variants and variant["key"] not in args.variants:
                continue
            if "skip" in variant:
                entry["variants"].append({"variant": variant["name"], "skipped": variant["skip"]})
                print(f"  {variant['name']}: skipped ({variant['skip']})")
                continue
            point = dict(spec, trainer="gndpo", variant=variant)
            if args.variant_steps is not None:
                point["steps"] = args.variant_steps
            if variant.get("reuse_check"):  # whole generation batches, each spanning two optimizer steps
                point["warmup"] += point["warmup"] % 2
                point["steps"] = max(2, point["steps"] + point["steps"] % 2)
            record = run(point, f"variant-{slug(variant['name'])}")
            record.setdefault("variant", variant["name"])
            record["reuse_check"] = bool(variant.get("reuse_check"))
            entry["variants"].append(record)

    if args.memory_cause:
        # GNDPO's and DistillationTrainer's peak RSS with glibc's default settings and with freed memory returned to
        # the kernel at once, each at the size's prompts and at longer prompts (same completions): whether the peak
        # RSS gap is memory the allocator keeps after frees, and whether it grows with the prompt positions
        print(f"[{args.size}] peak RSS cause: allocator settings x prompt length, {', '.join(compared)}")
        entry["memory_cause"] = []
        for allocator, env in (("default", {}), ("returning", RETURNING)):
            for extra in (0, PROMPT_EXTRA_WORDS):
                for t in compared:
                    point = dict(spec, trainer=t, steps=short, env=env, prompt_extra_words=extra)
                    record = run(point, f"memcause-{t}-{allocator}-prompt{extra}")
                    record.update(allocator=allocator, prompt_extra_words=extra)
                    entry["memory_cause"].append(record)
        widths = next((r for r in entry["memory_cause"] if "hidden_size" in r), None)
        entry["head_kernel"] = []
        for rows in HEAD_KERNEL_ROWS if widths else ():  # the fused head's kernel alone, freed memory returned
            point = {"head_kernel_rows": rows, "env": RETURNING, "threads": spec["threads"]}
            point.update(hidden_size=widths["hidden_size"], vocab_size=widths["vocab_size"])
            entry["head_kernel"].append(run_kernel(point, logdir, f"head-kernel-{rows}"))

    if args.vocab_sweep:
        print(f"[{args.size}] vocabulary sweep at tiny width")
        entry["vocab_sweep"] = []
        for vocab in VOCAB_SWEEP:
            for t in compared:
                # memory is what the sweep measures: the heap is sampled every 2 ms, uncapped, so short phases'
                # peaks are not missed (its step times carry the sampler's cost)
                point = dict(spec, trainer=t, vocab_size=vocab, steps=short, sample_duty=1.0, sample_interval=0.002)
                entry["vocab_sweep"].append(run(point, f"vocab-{t}-{vocab}"))
    entry["finished"] = time.strftime("%Y-%m-%d %H:%M")
    entry["wall_s"] = time.perf_counter() - started
    return entry


VARIANT_KEYS = ("int8", "nf4", "teacher_device", "teacher_offload", "reuse")


def combine_rounds(records: list[dict]) -> dict:
    """One record for a trainer measured in several processes: steps pooled (median, mean, phase means), peaks
    maximal; each round's own figures are kept under `rounds`."""
    good = [r for r in records if "error" not in r]
    if not good:
        return records[0]
    if len(records) == 1:
        return dict(records[0], rounds=[round_summary(records[0])])
    if len(good) < len(records):  # a failed round fails the trainer: the others are not comparable
        failed = next(r for r in records if "error" in r)
        return dict(failed, rounds=[round_summary(r) if "error" not in r else {"error": r["error"]} for r in records])
    steps = [s for r in good for s in r["per_step"]]
    completion = sum(r["completion_tokens_per_step"] * r["steps_measured"] for r in good) / len(steps)
    prompt = sum(r["prompt_tokens_per_step"] * r["steps_measured"] for r in good) / len(steps)
    combined = dict(good[0])
    combined.update(
        step_summary(steps, completion, prompt),
        other_processes_cpu_share=max(r["other_processes_cpu_share"] for r in good),
        attempts=sum(r.get("attempts", 1) for r in good) - len(good) + 1,
        rounds=[round_summary(r) for r in good],
    )
    for key in ("peak_rss_bytes", "rss_after_setup_bytes", "cuda_max_allocated_bytes"):
        if key in good[0]:
            combined[key] = max(r[key] for r in good)
    for key in ("phase_peak_delta_bytes", "phase_own_peak_delta_bytes", "phase_peak_bytes"):
        combined[key] = {p: max(r[key][p] for r in good) for p in good[0][key]}
    for key in ("student_fingerprint", "teacher_fingerprint"):
        values = {r[key] for r in good}
        combined[key] = values.pop() if len(values) == 1 else "differs between rounds: " + ", ".join(map(str, values))
    return combined


def round_summary(record: dict) -> dict:
    keys = ("step_time_median", "peak_rss_bytes", "cuda_max_allocated_bytes", "other_processes_cpu_share")
    out = {k: record[k] for k in keys if k in record}
    out["generation_mean"] = record["phases_mean"]["generation"]
    return out


def spec_has_gpu(spec: dict) -> bool:
    if spec.get("cpu"):
        return False
    import torch

    return torch.cuda.is_available()


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


def command_line() -> str:
    argv = [Path(sys.argv[0]).as_posix()]
    try:
        argv[0] = Path(sys.argv[0]).resolve().relative_to(REPO).as_posix()
    except ValueError:
        pass
    return "python " + " ".join(shlex.quote(a) for a in argv + sys.argv[1:])


def gpu_qwen_entry(args) -> dict:
    """On a machine without a GPU: build the gpu-qwen configs (meta device) and record that nothing was run."""
    from models import describe_gpu_qwen_configs

    return {
        "size": "gpu-qwen",
        "command": command_line(),
        "status": "not run here (no GPU)",
        "configs": describe_gpu_qwen_configs(),
        "spec": {k: v for k, v in SIZES["gpu-qwen"].items()},
        "started": time.strftime("%Y-%m-%d %H:%M"),
    }


def load_results(path: Path | None) -> dict:
    if path is not None and path.exists():
        return json.loads(path.read_text())
    return {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny")
    parser.add_argument("--steps", type=int, help="measured optimizer steps (after warm-up)")
    parser.add_argument("--warmup", type=int, help="optimizer steps run before measuring")
    parser.add_argument("--batch-size", dest="batch_size", type=int, help="per-device train batch size")
    parser.add_argument("--grad-accum", dest="grad_accum", type=int, help="micro-steps per optimizer step")
    parser.add_argument("--num-generations", dest="num_generations", type=int, help="completions per prompt")
    parser.add_argument("--completion-length", dest="completion_length", type=int, help="tokens per completion")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads per worker (0: torch's default)")
    parser.add_argument("--trainers", nargs="+", choices=TRAINERS, help="subset of trainers (default: all three)")
    parser.add_argument("--scaling", action="store_true", help="also double completion length and batch size")
    parser.add_argument("--scaling-steps", type=int, help="measured steps per scaling point (default steps - 1)")
    parser.add_argument("--teacher-variants", action="store_true", help="also GNDPO's teacher memory options")
    parser.add_argument("--variant-steps", type=int, help="measured steps per teacher variant (default --steps)")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANT_KEYS,
        help="which teacher variants (default: all): int8, nf4, teacher_device, teacher_offload, and reuse "
        "(num_iterations=2, checking that the teacher scores each generation batch once)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the main comparison this many times, interleaved; steps of all rounds are pooled",
    )
    parser.add_argument(
        "--memory-cause",
        action="store_true",
        help="also GNDPO and DistillationTrainer with freed memory returned to the kernel, and with longer prompts",
    )
    parser.add_argument("--vocab-sweep", action="store_true", help="(tiny) raise the vocabulary to Qwen's 151,936")
    parser.add_argument("--json", type=Path, help="merge this run's results into this JSON file")
    parser.add_argument("--markdown", type=Path, help="(re)write this Markdown report from the JSON data")
    parser.add_argument("--render-only", action="store_true", help="only re-render --markdown from --json")
    parser.add_argument("--pairs", nargs="+", choices=GPU_PAIRS, help="gpu-qwen pairs to run (default: both)")
    parser.add_argument(
        "--shrink",
        action="store_true",
        help="(gpu-qwen) the same Qwen-VL families at tiny width, on any device: checks the code path; such entries "
        "are stored as gpu-qwen-shrunk/<pair> and left out of the report",
    )
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    parser.add_argument("--sample-interval", type=float, help="CPU memory sampling interval in seconds")
    parser.add_argument(
        "--sample-duty",
        type=float,
        help="most of the wall time the CPU memory sampler may spend reading (default 0.02)",
    )
    parser.add_argument(
        "--probe-check",
        action="store_true",
        help="also run each trainer once with the CPU memory probes off, and GNDPO and DistillationTrainer once with "
        "an uncapped 2 ms heap sampler, to measure what the probes cost in step time",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per worker process")
    parser.add_argument(
        "--busy-retries",
        type=int,
        default=0,
        help="measure a worker again (up to this many times) when other processes used over 10%% of the CPU meanwhile",
    )
    parser.add_argument(
        "--idle-wait",
        type=float,
        default=0,
        help="before each worker, wait up to this many seconds for other processes to leave the CPU idle",
    )
    parser.add_argument("--logdir", type=Path, help="keep worker specs, logs and raw records here")
    args = parser.parse_args(argv)

    if args.render_only:
        if not (args.json and args.markdown):
            parser.error("--render-only needs --json and --markdown")
        args.markdown.write_text(render(load_results(args.json)))
        print(f"wrote {args.markdown}")
        return 0

    if args.vocab_sweep and args.size != "tiny":
        parser.error("--vocab-sweep runs at tiny width (--size tiny); gpu-qwen already has Qwen's vocabulary")
    results = load_results(args.json)
    entries, status = [], 0
    if args.size == "gpu-qwen" and (args.cpu or not _has_cuda()) and not args.shrink:
        entries.append(gpu_qwen_entry(args))
    else:
        spec = base_spec(args)
        logdir = args.logdir or Path(tempfile.mkdtemp(prefix="gndpo-bench-logs-"))
        if args.size == "gpu-qwen":  # one entry per pair: "gpu-qwen/<pair>"
            results.pop("gpu-qwen", None)
            for pair in args.pairs or GPU_PAIRS:
                (logdir / slug(pair)).mkdir(parents=True, exist_ok=True)
                entry = measure(args, dict(spec, pair=pair, shrink=args.shrink), logdir / slug(pair))
                entry["size"] = f"gpu-qwen{'-shrunk' if args.shrink else ''}/{pair}"
                entries.append(entry)
        else:
            logdir.mkdir(parents=True, exist_ok=True)
            entries.append(measure(args, spec, logdir))
        status = int(not all(ok(r) for e in entries for r in e["main"].values()))
        print(f"worker logs: {logdir}")
    for entry in entries:
        print_summary(entry)
        if entry.get("status") and any(k.startswith("gpu-qwen/") for k in results):
            print("  (kept the gpu-qwen measurements already in the JSON file)")
            continue
        results[entry["size"]] = entry
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))
        print(f"wrote {args.json}")
    if args.markdown:
        args.markdown.write_text(render(results))
        print(f"wrote {args.markdown}")
    return status


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())

"""Run a benchmark comparison: each trainer in a fresh process per round, rounds interleaved, on the same work.

    python -m benchmarks.run --size smollm2 --rounds 3 --json benchmarks/results.json --markdown benchmarks/RESULTS.md
    python -m benchmarks.run --vgs --family qwen2_vl qwen2_5_vl qwen3_vl --rounds 2 \\
        --json benchmarks/vgs_results.json --markdown benchmarks/VGS_RESULTS.md

The trainer comparison runs GNDPOTrainer (default, and ``gndpo_sampler``: with ``old_logps_from_sampler``), TRL's
DistillationTrainer and GRPOTrainer (trivial reward: the no-teacher floor); ``--vgs`` runs GNDPO with
``visual_gradient_steering`` off and on, at learning rate 0 so that both sample the same batches (checked by a hash
of the sampled ids). ``--json`` merges the entries of this run into the file (one per size, family, vocabulary);
``--markdown`` renders every entry of it (``render.py``). See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .models import FAMILIES, SIZES
from .render import write

REPO = Path(__file__).resolve().parent.parent

TRAINERS = ("gndpo", "gndpo_sampler", "distillation", "grpo")
VGS_TRAINERS = ("gndpo", "gndpo_vgs")
CHOICES = (*TRAINERS, "gndpo_vgs", "gndpo_cross")


def cpu_busy_ticks() -> int:
    """Busy CPU time of the whole machine since boot, in clock ticks (/proc/stat, idle and iowait excluded)."""
    values = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return sum(values) - values[3] - values[4]


def run_worker(spec: dict, logdir: Path, tag: str, timeout: float) -> dict:
    """One trainer in a fresh process. Also records the share of the machine's CPU that other processes used
    meanwhile (machine busy time minus the worker's own), since timings taken beside other work are not comparable."""
    spec_path, out_path, log_path = (logdir / f"{tag}.{ext}" for ext in ("spec.json", "json", "log"))
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    print(f"  {tag} ...", end="", flush=True)
    busy0, own0, started = cpu_busy_ticks(), os.times(), time.perf_counter()
    with open(log_path, "w") as log:
        command = [sys.executable, "-m", "benchmarks.worker", str(spec_path), str(out_path)]
        code = subprocess.run(command, stdout=log, stderr=log, env=env, cwd=REPO, timeout=timeout).returncode
    wall, own1 = time.perf_counter() - started, os.times()
    if code != 0:
        raise SystemExit(f"\nworker {tag} failed (exit {code}):\n{log_path.read_text(errors='replace')[-3000:]}")
    machine_s = (cpu_busy_ticks() - busy0) / os.sysconf("SC_CLK_TCK")
    own_s = (own1.children_user + own1.children_system) - (own0.children_user + own0.children_system)
    record = json.loads(out_path.read_text())
    record["other_processes_cpu_share"] = max(machine_s - own_s, 0.0) / (wall * (os.cpu_count() or 1))
    print(f" {statistics.median(record['step_times']):.3g} s/step, {wall:.0f} s")
    return record


def combine_rounds(records: list[dict]) -> dict:
    """One trainer's rounds: measured steps pooled (median, phase means), peaks maximal, each round's own figures
    under ``rounds``."""
    combined = dict(records[0])
    combined["step_times"] = [t for r in records for t in r["step_times"]]
    combined["phases"] = [p for r in records for p in r["phases"]]
    combined["step_time_median"] = statistics.median(combined["step_times"])
    combined["phases_mean"] = {p: statistics.fmean(s.get(p, 0.0) for s in combined["phases"])
                               for p in records[0]["phase_own_peak_delta_bytes"]}  # fmt: skip
    combined["phase_own_peak_delta_bytes"] = {p: max(r["phase_own_peak_delta_bytes"][p] for r in records)
                                              for p in records[0]["phase_own_peak_delta_bytes"]}  # fmt: skip
    combined["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in records)
    combined["batch_hashes"] = [r["batch_hashes"] for r in records]
    for key in ("student_fingerprint", "teacher_fingerprint"):
        values = {str(r[key]) for r in records}
        combined[key] = sorted(values) if len(values) > 1 else records[0][key]
    combined["rounds"] = [{"step_time_median": statistics.median(r["step_times"]),
                           "peak_rss_bytes": r["peak_rss_bytes"],
                           "other_processes_cpu_share": r["other_processes_cpu_share"]} for r in records]  # fmt: skip
    return combined


def entry_key(size: str, family: str | None, vocab: int | None, lora: bool) -> str:
    return "/".join([size] + ([family] if family else []) + ([f"vocab{vocab}"] if vocab else []) + (["lora"] * lora))


def measure(args, spec: dict, logdir: Path) -> dict:
    """The comparison for one spec: every trainer once per round, rounds interleaved."""
    started = time.strftime("%Y-%m-%d %H:%M")
    key = entry_key(spec["size"], spec.get("family"), spec.get("vocab_size"), spec.get("lora", False))
    print(f"[{key}] {', '.join(args.trainers)}, {args.rounds} round(s)")
    rounds = {t: [] for t in args.trainers}
    for index in range(args.rounds):  # interleaved, so a slow drift of the machine hits every trainer alike
        for trainer in args.trainers:
            tag = f"{key.replace('/', '-')}-{trainer}-round{index + 1}"
            rounds[trainer].append(run_worker(dict(spec, trainer=trainer), logdir, tag, args.timeout))
    return {
        "key": key,
        "kind": "vgs" if args.vgs else "trainers",
        "command": "python -m benchmarks.run " + shlex.join(sys.argv[1:]),
        "started": started,
        "spec": spec,
        "main": {t: combine_rounds(records) for t, records in rounds.items()},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny")
    parser.add_argument("--vgs", action="store_true", help="GNDPO with visual_gradient_steering off vs on (tiny VLMs)")
    parser.add_argument("--family", nargs="+", choices=FAMILIES, help="tiny Qwen-VL families (default with --vgs: "
                        "qwen2_vl); one comparison each")  # fmt: skip
    parser.add_argument("--vocab", nargs="+", type=int, help="(tiny) vocabulary sizes: one comparison each")
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter on the language model's q/v")
    parser.add_argument("--trainers", nargs="+", choices=CHOICES, help="default: "
                        "all of the mode; gndpo_cross: cross_tokenizer_distillation on one tokenizer")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1, help="fresh processes per trainer, interleaved, steps pooled")
    for name in ("steps", "warmup", "batch-size", "grad-accum", "num-generations", "completion-length", "threads"):
        parser.add_argument(f"--{name}", type=int, help="default: the size's (benchmarks/models.py)")
    parser.add_argument("--lr", type=float, help="default: the size's (0 with --vgs: same batches in both runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is present")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per worker process")
    parser.add_argument("--json", type=Path, help="merge this run's entries into this JSON file")
    parser.add_argument("--markdown", type=Path, help="(re)write this Markdown from the JSON (PNGs beside it)")
    parser.add_argument("--logdir", type=Path, help="keep worker specs, logs and raw records here")
    args = parser.parse_args(argv)
    if args.json is None and args.markdown:
        parser.error("--markdown renders from --json: give both")
    if args.vgs and args.size != "tiny" or args.vocab and args.size != "tiny":
        parser.error("--vgs and --vocab run at --size tiny")
    results = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    args.trainers = args.trainers or list(VGS_TRAINERS if args.vgs else TRAINERS)
    spec = {"size": args.size, "seed": args.seed, "lora": args.lora, "cpu": args.cpu}
    for key, default in SIZES[args.size].items():
        value = getattr(args, key)
        spec[key] = default if value is None else value
    if args.vgs and args.lr is None:
        spec["lr"] = 0.0
    if (spec["batch_size"] * spec["grad_accum"]) % spec["num_generations"]:
        parser.error("batch size x gradient accumulation must be a multiple of --num-generations")
    logdir = args.logdir or Path(tempfile.mkdtemp(prefix="gndpo-bench-"))
    logdir.mkdir(parents=True, exist_ok=True)
    for family in args.family or (["qwen2_vl"] if args.vgs else [None]):
        for vocab in args.vocab or [None]:
            entry = measure(args, dict(spec, family=family, vocab_size=vocab), logdir)
            results[entry.pop("key")] = entry
    print(f"worker logs: {logdir}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.markdown:
        write(results, args.markdown)
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

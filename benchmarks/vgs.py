"""Visual Gradient Steering: extra time and peak memory per optimizer step, against plain GNDPO on the same batch.

    python benchmarks/vgs.py --size tiny         # the CI smoke size (tests/test_vgs_benchmark.py)
    python benchmarks/vgs.py --size qwen-vocab --rounds 1 --steps 2 \\
        --json benchmarks/vgs_results.json --markdown benchmarks/VGS_RESULTS.md   # see benchmarks/README.md

For each Qwen-VL family, GNDPOTrainer runs with `visual_gradient_steering` off and on, each in its own fresh process
(rounds interleaved), on the same tiny student/teacher pair, image prompts, batch and seed. The learning rate is 0, so
the weights never change and both runs sample exactly the same completions at every step: the same batches (checked
by a hash of the sampled ids). Every completion is exactly `--completion-length` tokens long.

Per optimizer step: wall time (median over the measured steps, after warm-up), its split into the generation batch
(generation and scoring, once per optimizer step here) and the update (loss, backward, optimizer), VGS's own parts
(the text-only teacher pass with the VDS, and the VGS loss with its text-only student pass), and peak memory: on CPU
the growth of glibc's heap in use over the step's start (`mallinfo2`, sampled every 2 ms or less often, so that the
sampler takes at most 2% of the time), on a GPU the CUDA max allocated during the step; plus the process's peak RSS.
Figures are written by this script, never by hand.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from worker import CPU_MEMORY_KIND, cpu_memory_bytes, machine, versions  # the benchmark's own probes

REPO = Path(__file__).resolve().parent.parent
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# size: (student / teacher text widths and depths, vocabulary rows; None keeps the tokenizer's 320)
SIZES = {
    "tiny": dict(student=(64, 2), teacher=(128, 3), vocab_size=None),
    "qwen-vocab": dict(student=(64, 2), teacher=(128, 3), vocab_size=151_936),
}


# ---------------------------------------------------------------------------------------------------------------------
# Worker: one trainer, one process.
# ---------------------------------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak bytes in use since `reset()`: CUDA max allocated, or glibc's heap in use sampled by a thread."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"
        self.kind = "cuda_max_allocated" if self.cuda else CPU_MEMORY_KIND
        if not self.cuda:
            self._peak, self._stop = 0, threading.Event()
            threading.Thread(target=self._sample, daemon=True).start()

    def now(self) -> int:
        return self.torch.cuda.memory_allocated() if self.cuda else cpu_memory_bytes()

    def _sample(self):
        # A mallinfo2 read walks glibc's free lists under the arena lock (milliseconds on a large heap): sleep at least
        # 49 times the last read, so the sampler takes at most 2% of the time from the threads it measures.
        pause = 0.002
        while not self._stop.wait(pause):
            start = time.perf_counter()
            self._peak = max(self._peak, self.now())
            pause = max(0.002, 49 * (time.perf_counter() - start))

    def reset(self) -> int:
        start = self.now()
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        else:
            self._peak = start
        return start

    def peak(self) -> int:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated()
        self._peak = max(self._peak, self.now())
        return self._peak


def run_worker(spec: dict) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from peft import LoraConfig
    from tiny_models import install_video_processor_workaround, make_image_dataset, make_vlm
    from transformers import TrainerCallback

    from trl_gndpo import GNDPOConfig, GNDPOTrainer

    install_video_processor_workaround()
    torch.set_num_threads(spec["threads"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = SIZES[spec["size"]]
    vocab = {"vocab_size": size["vocab_size"]} if size["vocab_size"] else {}
    (hidden, layers), (t_hidden, t_layers) = size["student"], size["teacher"]
    student, processor = make_vlm(spec["family"], seed=0, hidden_size=hidden, num_hidden_layers=layers, **vocab)
    teacher, teacher_processor = make_vlm(
        spec["family"], seed=1, hidden_size=t_hidden, num_hidden_layers=t_layers, **vocab
    )
    length = spec["completion_length"]
    steps = spec["warmup"] + spec["steps"]
    config = GNDPOConfig(
        output_dir=spec["output_dir"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=spec["grad_accum"],
        num_generations=spec["num_generations"],
        max_completion_length=length,
        generation_kwargs={"min_new_tokens": length},  # identical work per step
        max_steps=steps,
        learning_rate=0.0,  # the weights never move: both runs sample the same batches
        seed=spec["seed"],
        shuffle_dataset=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        visual_gradient_steering=spec["vgs"],
        activation_checkpointing=False,
        **({"bf16": True} if device.type == "cuda" else {"use_cpu": True, "bf16": False}),
    )
    prompts_needed = steps * spec["batch_size"] * spec["grad_accum"] // spec["num_generations"]
    trainer = GNDPOTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=make_image_dataset(n=prompts_needed),
        processing_class=processor,
        teacher_processing_class=teacher_processor,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=r".*language_model.*\.(q|v)_proj")
        if spec["lora"]
        else None,
    )
    memory = PeakMemory(device)
    steps_out, current = [], {}

    def timed(name):
        original = getattr(trainer, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = original(*args, **kwargs)
            current[name] = current.get(name, 0.0) + time.perf_counter() - start
            if name == "_generate_and_score_completions":
                current.setdefault("batch_hash", []).append(
                    hashlib.sha256(result["completion_ids"].cpu().numpy().tobytes()).hexdigest()[:16]
                )
            return result

        setattr(trainer, name, wrapper)

    for name in ("_generate_and_score_completions", "_add_text_view", "_vgs_loss"):
        timed(name)

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            current.clear()
            current["memory_start"] = memory.reset()
            current["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - current.pop("start")
            start = current.pop("memory_start")
            steps_out.append({"seconds": seconds, "peak_growth": memory.peak() - start, **current})

    trainer.add_callback(Steps())
    started = time.perf_counter()
    trainer.train()
    completion_tokens = spec["batch_size"] * spec["grad_accum"] * length
    return {
        "spec": spec,
        "steps": steps_out,
        "measured": steps_out[spec["warmup"] :],
        "completion_tokens_per_step": completion_tokens,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "memory_kind": memory.kind,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "vocab_size": student.config.get_text_config().vocab_size,
        "train_seconds": time.perf_counter() - started,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Runner and report.
# ---------------------------------------------------------------------------------------------------------------------
def median(records: list[dict], key: str) -> float:
    return statistics.median(step.get(key, 0.0) for record in records for step in record["measured"])


def summarize(records: list[dict]) -> dict:
    """One row per (size, family): GNDPO vs GNDPO + VGS, steps pooled over rounds."""
    by_mode = {vgs: [r for r in records if r["spec"]["vgs"] is vgs] for vgs in (False, True)}
    hashes = [[step.get("batch_hash") for step in record["steps"]] for record in records]
    row = {"same_batches": all(h == hashes[0] for h in hashes)}
    for vgs, rs in by_mode.items():
        key = "vgs" if vgs else "gndpo"
        row[key] = {
            "step": median(rs, "seconds"),
            "batch": median(rs, "_generate_and_score_completions"),
            "text_teacher": median(rs, "_add_text_view"),
            "vgs_loss": median(rs, "_vgs_loss"),
            "peak_growth": max(step["peak_growth"] for r in rs for step in r["measured"]),
            "peak_rss": max(r["peak_rss"] for r in rs),
            "steps": sum(len(r["measured"]) for r in rs),
        }
        row[key]["update"] = row[key]["step"] - row[key]["batch"]
    row["time_ratio"] = row["vgs"]["step"] / row["gndpo"]["step"]
    row["memory_ratio"] = row["vgs"]["peak_growth"] / max(row["gndpo"]["peak_growth"], 1)
    return row


def render(results: dict) -> str:
    mib = 2**20
    lines = [
        "# Visual Gradient Steering: cost per optimizer step against plain GNDPO",
        "",
        "<!-- Generated by benchmarks/vgs.py from its JSON results: do not edit by hand. -->",
        "",
        __doc__.split("\n\n", 2)[2].strip(),
        "",
    ]
    for entry in results.values():
        spec, size = entry["spec"], entry["spec"]["size"]
        lora = spec.get("lora", False)
        lines += [
            f"## Size `{size}`" + (", student with LoRA" if lora else ""),
            "",
            f"Command: `{entry['command']}` ({entry['date']}).",
            "",
            f"Machine: {entry['machine']}; device: {entry['device']}; "
            + ", ".join(f"{k} {v}" for k, v in entry["versions"].items())
            + ".",
            "",
            f"Models: tiny Qwen-VL pairs of each family, student text hidden {SIZES[size]['student'][0]} x "
            f"{SIZES[size]['student'][1]} layers, teacher {SIZES[size]['teacher'][0]} x {SIZES[size]['teacher'][1]}, "
            f"vocabulary {entry['vocab_size']:,} rows, one 32x32 image per prompt, float32 on CPU"
            + (", LoRA r=8 on the language model's q/v projections (head frozen)" if lora else ", full fine-tuning")
            + f". Work per optimizer "
            f"step: {spec['batch_size'] * spec['grad_accum']} completions ({spec['batch_size']} per micro-step x "
            f"{spec['grad_accum']} micro-steps, {spec['num_generations']} per prompt) of exactly "
            f"{spec['completion_length']} tokens; median of {spec['steps']} steps after {spec['warmup']} warm-up, "
            f"{entry['rounds']} round(s); torch threads {spec['threads']}. Memory: {entry['memory_kind']}.",
            "",
            "| family | same batches | GNDPO step (s) | + VGS step (s) | x GNDPO | extra (s) "
            "| generation batch: GNDPO / + VGS (s) | of which text-view teacher + VDS (s) "
            "| update: GNDPO / + VGS (s) | of which VGS loss fwd (s) "
            "| peak growth per step: GNDPO / + VGS (MiB) | x GNDPO | peak RSS: GNDPO / + VGS (MiB) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for family, row in entry["rows"].items():
            g, v = row["gndpo"], row["vgs"]
            lines.append(
                f"| {family} | {'yes' if row['same_batches'] else 'NO'} | {g['step']:.3g} | {v['step']:.3g} | "
                f"{row['time_ratio']:.2f} | {v['step'] - g['step']:+.3g} | {g['batch']:.3g} / {v['batch']:.3g} | "
                f"{v['text_teacher']:.3g} | {g['update']:.3g} / {v['update']:.3g} | {v['vgs_loss']:.3g} | "
                f"{g['peak_growth'] / mib:.1f} / {v['peak_growth'] / mib:.1f} | {row['memory_ratio']:.2f} | "
                f"{g['peak_rss'] / mib:.0f} / {v['peak_rss'] / mib:.0f} |"
            )
        lines += [
            "",
            "Where the extra time goes, by design: one more teacher forward per generation batch (the text-only "
            "view) and the VDS from both views' hidden states; one more student forward per micro-step (text-only "
            "view, with gradients for `l_LP`) and its backward; the four full-vocabulary distributions recomputed "
            "tile by tile in the VGS loss's forward and backward. Extra memory: the teacher's hidden states of both "
            "views kept with the generation batch, the text-only pass's activations, the divergence tiles (about 12 "
            "float32 tiles of up to 1,024 positions x 4,096 columns, independent of the vocabulary size)"
            + (
                "; with LoRA the head is frozen and gets no gradient."
                if lora
                else ", and VGS's own float32 gradient of the student's head (it trains here), which autograd adds to "
                "the policy loss's: about 2 x vocabulary x hidden x 4 bytes at the peak "
                f"({2 * entry['vocab_size'] * SIZES[size]['student'][0] * 4 / mib:.1f} MiB here; none with LoRA)."
            ),
            "",
        ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", action="append", choices=sorted(SIZES), help="repeatable; default tiny")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--num-generations", type=int, default=2)
    parser.add_argument("--completion-length", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="merge the results into this file (one entry per size)")
    parser.add_argument("--markdown", type=Path, help="render every entry of --json into this file")
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter (q/v projections) instead")
    parser.add_argument("--render-only", action="store_true", help="re-render --markdown from --json, no runs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        Path(spec["result"]).write_text(json.dumps(run_worker(spec)))
        return

    results = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    for size in [] if args.render_only else args.size or ["tiny"]:
        rows, records, started = {}, [], time.strftime("%Y-%m-%d %H:%M")
        for family in args.families:
            family_records = []
            for round_index in range(args.rounds):
                for vgs in (False, True):
                    with tempfile.TemporaryDirectory() as tmp:
                        spec = dict(
                            size=size, family=family, vgs=vgs, lora=args.lora, batch_size=args.batch_size,
                            grad_accum=args.grad_accum, num_generations=args.num_generations,
                            completion_length=args.completion_length, warmup=args.warmup, steps=args.steps,
                            threads=args.threads, seed=args.seed, output_dir=f"{tmp}/out", result=f"{tmp}/result.json",
                        )  # fmt: skip
                        Path(f"{tmp}/spec.json").write_text(json.dumps(spec))
                        command = [sys.executable, __file__, "--worker", f"{tmp}/spec.json"]
                        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
                        if done.returncode:
                            sys.exit(f"worker {family} vgs={vgs} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
                        family_records.append(json.loads(Path(spec["result"]).read_text()))
                    print(f"{size} {family} round {round_index + 1} vgs={vgs}: done", flush=True)
            rows[family] = summarize(family_records)
            records += family_records
        first = records[0]
        import torch

        host = machine(torch.device("cpu" if first["device"] == "cpu" else "cuda"))
        results[size + ("-lora" if args.lora else "")] = {
            "command": "python benchmarks/vgs.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": started,
            "machine": f"{host['cpu']}, {host['cpu_cores']} cores, {host['os']}",
            "device": first["device"],
            "versions": versions(),
            "spec": {k: v for k, v in first["spec"].items() if k not in ("output_dir", "result", "family", "vgs")},
            "vocab_size": first["vocab_size"],
            "memory_kind": first["memory_kind"],
            "rounds": args.rounds,
            "rows": rows,
            "records": records,
        }
        for family, row in rows.items():
            print(
                f"{size} {family}: GNDPO {row['gndpo']['step']:.3g} s/step, + VGS {row['vgs']['step']:.3g} s/step "
                f"(x{row['time_ratio']:.2f}); peak growth {row['gndpo']['peak_growth'] / 2**20:.1f} -> "
                f"{row['vgs']['peak_growth'] / 2**20:.1f} MiB; same batches: {row['same_batches']}"
            )
    if args.json and not args.render_only:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(render(results) + "\n")


if __name__ == "__main__":
    main()

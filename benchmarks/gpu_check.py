"""One-command GPU validation of GNDPO on one GPU (written to take well under 8 minutes on an H200; not yet run there).

    python -m benchmarks.gpu_check                      # a CUDA GPU: one JSON line per case on stdout
    python -m benchmarks.gpu_check --dry-run            # the same cases at the test suite's tiny width on CPU
    python -m benchmarks.gpu_check --cases lora qlora   # a subset

Student and teacher are Qwen2.5-VL-3B / 7B shaped (benchmarks/models.py) with random weights, the real 151,936-token
vocabulary and bf16, cut to 2 / 4 decoder layers and a 2-block vision tower so that every case takes seconds; the
processor is the test suite's offline tiny Qwen2.5-VL one (tests/tiny_models.py). Both are saved once and each case
loads them by path, as a user's run does. Cases (one warm-up and two measured optimizer steps each, a 32x32 image per
prompt, activation checkpointing on):

- `lora`: LoRA on the student's language model;
- `qlora`: the student loaded in 4-bit nf4 (bitsandbytes), with LoRA;
- `teacher_device`: LoRA; the teacher on the second GPU if there is one, else kept and run in CPU memory;
- `teacher_offload`: LoRA; the teacher kept in CPU memory and moved to the GPU for its scoring pass;
- `vllm`: LoRA; generation by vLLM in colocate mode, if `vllm` imports (else skipped, with the reason);
- `served_vlm`, `served_text`: LoRA; the teacher served by vLLM on the same GPU (`teacher_model_server_url`, 25% of its
  memory, bf16, `--enable-scale-out` for the vision-language student; tests/vllm_server.py starts and stops it), for
  the vision-language student and for a text student of the same widths. Skipped in the dry run; the served and local
  teachers' log-probs are compared on CPU in float32 by tests/test_real_vllm.py.

Each line: `case`, `status` (ok / skipped / failed, with `reason`), `step_time_s` (mean over the measured steps),
`peak_gpu_memory_gib` (`torch.cuda.max_memory_allocated` over the case), `finite_weights` (every floating-point weight
of the student finite after training), `adapter_moved` (a LoRA B matrix left zero) and the case's settings. The exit
status is 1 if any case failed. `--dry-run` trains the tiny pair in bf16 on CPU (`use_cpu=True`) and builds the GPU
pair on the meta device: it checks the script and the code paths it drives, not the GPU (the teacher then stays on
the CPU in every case, and vLLM is skipped).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import BitsAndBytesConfig, PrinterCallback, Qwen2_5_VLForConditionalGeneration

from tests import tiny_models as tiny
from trl_gndpo import GNDPOConfig, GNDPOTrainer

from .worker import StepTimer

CASES = ("lora", "qlora", "teacher_device", "teacher_offload", "vllm", "served_vlm", "served_text")
LAYERS = {"student": 2, "teacher": 4}
LORA_TARGETS = r".*language_model.*\.(q|k|v|o|gate|up|down)_proj"
TEXT_LORA_TARGETS = r".*\.(q|k|v|o|gate|up|down)_proj"
SKIP_MODULES = ["model.visual", "lm_head"]  # kept in bf16 under 4-bit loading, as examples/qlora.py does
QWEN_VOCAB = 151_936
# The text widths of the published Qwen2.5-VL-3B (student) and 7B (teacher) checkpoints, with few layers.
TEXT = {
    "student": dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2),
    "teacher": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4),
}
VISION = dict(depth=2, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1])  # fmt: skip


def qwen2_5_vl_shaped(device: str) -> dict:
    """Student and teacher of the GPU run, bf16, built on `device` ("meta": shapes only, no memory)."""
    from transformers import Qwen2_5_VLConfig

    tokenizer = tiny.make_processor("qwen2_5_vl").tokenizer
    token = tokenizer.convert_tokens_to_ids
    ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
               bos_token_id=token("<|endoftext|>"))  # fmt: skip
    special = dict(image_token_id=token("<|image_pad|>"), video_token_id=token("<|video_pad|>"),
                   vision_start_token_id=token("<|vision_start|>"),
                   vision_end_token_id=token("<|vision_end|>"))  # fmt: skip
    rope = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]}
    models = {}
    for seed, role in enumerate(("student", "teacher")):
        text = dict(TEXT[role], num_hidden_layers=LAYERS[role], vocab_size=QWEN_VOCAB, max_position_embeddings=32768,
                    rope_parameters=rope, **ids)  # fmt: skip
        vision = dict(VISION, out_hidden_size=text["hidden_size"])
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=role == "student",
                                  **special)  # fmt: skip
        torch.manual_seed(seed)
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
        model.generation_config.eos_token_id = ids["eos_token_id"]
        model.generation_config.pad_token_id = ids["pad_token_id"]
        models[role] = model
    return models


def save_models(workdir: Path, dry_run: bool) -> tuple[str, str, dict]:
    """Save the student and teacher (random weights, bf16) with the processor; their paths and parameter counts.

    The dry run saves the tiny pair, and builds the GPU pair on the meta device to check its configuration."""
    processor = tiny.make_processor("qwen2_5_vl")
    gpu_pair = qwen2_5_vl_shaped("meta" if dry_run else "cuda")
    counts = {role: sum(p.numel() for p in model.parameters()) for role, model in gpu_pair.items()}
    models = gpu_pair
    if dry_run:
        models = {"student": tiny.make_vlm("qwen2_5_vl", seed=0)[0],
                  "teacher": tiny.make_vlm("qwen2_5_vl", seed=1, hidden_size=128, num_hidden_layers=3)[0]}  # fmt: skip
    paths = [str(tiny.save_tiny(m.to(torch.bfloat16), processor, workdir / role)) for role, m in models.items()]
    del models, gpu_pair
    gc.collect()
    if not dry_run:
        torch.cuda.empty_cache()
    return paths[0], paths[1], counts


def text_student(workdir: Path) -> str:
    """The GPU student's language model alone (a text student of the same widths and vocabulary), saved."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tiny.make_processor("qwen2_5_vl").tokenizer
    config = Qwen2Config(**TEXT["student"], num_hidden_layers=LAYERS["student"], vocab_size=QWEN_VOCAB,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return str(tiny.save_tiny(Qwen2ForCausalLM(config).to(torch.bfloat16), tokenizer, workdir / "text"))


def run_case(case: str, student: str, teacher: str, workdir: Path, dry_run: bool) -> dict:
    cuda = not dry_run
    settings = dict(
        output_dir=str(workdir / case), use_cpu=dry_run, bf16=True, activation_checkpointing=True,
        model_init_kwargs={"dtype": "bfloat16"}, teacher_model_init_kwargs={"dtype": "bfloat16"},
        per_device_train_batch_size=4 if dry_run else 8, num_generations=4,
        max_completion_length=8 if dry_run else 128, max_steps=3, learning_rate=1e-4, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
    )  # fmt: skip
    quantization, server, dataset, targets = None, None, tiny.make_image_dataset(64), LORA_TARGETS
    if case == "qlora":
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.bfloat16,
                                          llm_int8_skip_modules=SKIP_MODULES)  # fmt: skip
    elif case == "teacher_device":
        settings["teacher_device"] = "cuda:1" if cuda and torch.cuda.device_count() > 1 else "cpu"
    elif case == "teacher_offload":
        settings["teacher_offload"] = True
    elif case.startswith("served"):
        if dry_run:
            return {"case": case, "status": "skipped", "reason": "needs vLLM on a GPU (CPU: tests/test_real_vllm.py)"}
        from tests.vllm_server import Server

        flags = ["--dtype", "bfloat16", "--gpu-memory-utilization", "0.25", "--max-model-len", "4096"]
        flags += ["--enable-scale-out"] if case == "served_vlm" else []
        server = Server(teacher, *flags, log_path=workdir / f"{case}-server.log", python=sys.executable)
        settings.pop("teacher_model_init_kwargs")
        settings["teacher_model_server_url"], teacher = server.url, None
        if case == "served_text":
            student, dataset, targets = text_student(workdir), tiny.make_text_dataset(64), TEXT_LORA_TARGETS
    elif case == "vllm":
        try:
            import vllm  # noqa: F401
        except Exception as error:  # not installed, or installed without a matching CUDA / torch
            return {"case": case, "status": "skipped", "reason": f"vllm does not import: {error!r}"}
        settings.update(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.3)
        # The tiny tokenizer has 320 tokens, the model 151,936 rows: vLLM must not detokenize ids the tokenizer lacks
        # (TRL decodes the completions itself).
        settings.update(vllm_max_model_length=2048, generation_kwargs={"detokenize": False})
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    timer = StepTimer(cuda)
    try:
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets)
        trainer = GNDPOTrainer(model=student, teacher_model=teacher, args=GNDPOConfig(**settings),
                               train_dataset=dataset, peft_config=lora, quantization_config=quantization,
                               callbacks=[timer])  # fmt: skip
        trainer.remove_callback(PrinterCallback)  # keep the trainer's log lines off stdout
        trainer.train()
    finally:
        if server is not None:
            server.stop()
    model = trainer.accelerator.unwrap_model(trainer.model)
    floating = [p for p in model.parameters() if p.is_floating_point()]
    record = {
        "case": case, "status": "ok", "steps": len(timer.seconds),
        "step_time_s": sum(timer.seconds[1:]) / max(len(timer.seconds) - 1, 1),
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "finite_weights": all(torch.isfinite(p).all().item() for p in floating),
        "adapter_moved": any(p.abs().max().item() > 0 for n, p in model.named_parameters() if "lora_B" in n),
        "student_4bit": getattr(model.get_base_model(), "is_loaded_in_4bit", False),
        "teacher_device": "served" if teacher is None else str(next(trainer.teacher_model.parameters()).device),
        "settings": {k: v for k, v in settings.items() if k in ("teacher_device", "teacher_offload") or "vllm" in k},
        **({"server_start_s": server.start_seconds} if server is not None else {}),
    }  # fmt: skip
    del trainer, model, floating
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny models on CPU: check the script, not the GPU")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run on a GPU machine, or pass --dry-run")
    failed = False
    with tempfile.TemporaryDirectory(prefix="gndpo-gpu-check-") as tmp:
        workdir = Path(tmp)
        start = time.perf_counter()
        student, teacher, counts = save_models(workdir, args.dry_run)
        device = "cpu" if args.dry_run else torch.cuda.get_device_name()
        setup = {"case": "setup", "seconds": time.perf_counter() - start, "dry_run": args.dry_run, "device": device}
        print(json.dumps({**setup, "gpu_pair_parameters": counts, "vocab_size": QWEN_VOCAB}), flush=True)
        for case in args.cases:
            start = time.perf_counter()
            try:
                record = run_case(case, student, teacher, workdir, args.dry_run)
            except Exception as error:
                record = {"case": case, "status": "failed", "reason": repr(error), "trace": traceback.format_exc()}
            failed |= record["status"] == "failed" or record.get("finite_weights") is False
            print(json.dumps({**record, "seconds": time.perf_counter() - start}), flush=True)
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())

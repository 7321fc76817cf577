"""GNDPO under a sharding engine, two CPU processes (launched by tests/test_engines.py with `accelerate launch` and the
project's own config: examples/accelerate/zero2.yaml, zero3.yaml or fsdp2.yaml).

`engine_run.py OUT ENGINE` (ENGINE: zero2, zero3, fsdp2 or zero3_bf16) trains several tiny runs in one launch and
saves, per rank, what the test compares (`OUT/<ENGINE>_rank<r>.pt`: a dict run name -> record):

- `base` (every engine): text student and bigger text teacher, full fine-tune, two steps. Under ZeRO-3 this run is
  stopped right after its step-2 checkpoint (`resumed` continues it from there, `full` runs the same 4 steps without
  interruption);
- `lora` (ZeRO-3, FSDP2): the same with a LoRA adapter;
- `vgs` (ZeRO-2): tiny Qwen2-VL student and teacher with Visual Gradient Steering;
- `zero3_bf16`: `base` alone, launched with the config's bf16 and `bf16=True` (DeepSpeed holds both models in bf16).

A record holds the engine's wrapping of student and teacher (types, ZeRO stage, how much of each parameter a rank
holds), the fused log-prob kernel's calls and every vocabulary-head output shape (a (B, T, V) logits tensor would show
there), the whitening's inputs and statistics, and full (gathered) weights of student and teacher before and after.
"""

import sys
from pathlib import Path

import deepspeed
import deepspeed.ops
import torch
import trl.trainer.utils as trl_utils
from peft import LoraConfig
from tiny_models import (
    cpu_grpo_kwargs,
    make_image_dataset,
    make_text_dataset,
    make_text_model,
    make_tokenizer,
    make_vlm,
)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from transformers import TrainerCallback

import trl_gndpo.functional as F
from trl_gndpo import GNDPOConfig, GNDPOTrainer

# DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce (about a minute, once per machine) when a C++
# compiler is present; gloo serves the same collectives, so the test skips the build.
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
torch.set_num_threads(1)
out_dir, engine = Path(sys.argv[1]), sys.argv[2]
calls = {"whitening": [], "kernel": []}


def recording_whitening(signal, mask, *args, **kwargs):
    advantages, mean, var = whitened_advantages(signal, mask, *args, **kwargs)
    calls["whitening"].append({"signal": signal, "mask": mask, "mean": mean, "var": var, "advantages": advantages})
    return advantages, mean, var


class RecordingKernel:
    """TRL's fused log-prob kernel, recording the head it projects through (rows x hidden) and the input dtype."""

    @staticmethod
    def apply(hidden_states, weight, *args):
        calls["kernel"].append({"head": tuple(weight.shape), "dtype": hidden_states.dtype, "weight": weight.dtype})
        return fused_kernel.apply(hidden_states, weight, *args)


whitened_advantages, F.whitened_advantages = F.whitened_advantages, recording_whitening
fused_kernel, trl_utils._ChunkedLogProbFunction = trl_utils._ChunkedLogProbFunction, RecordingKernel


class StopAfterCheckpoint(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def full_weights(model) -> dict[str, torch.Tensor]:
    """Every parameter in full on this rank (ZeRO-3 gathers partitions, FSDP2 gathers DTensor shards)."""
    named = dict(model.named_parameters())
    if any(hasattr(p, "ds_id") for p in named.values()):
        with deepspeed.zero.GatheredParameters(list(named.values())):
            return {n: p.detach().clone() for n, p in named.items()}
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in named.items()}


def held_fraction(model) -> float:
    """Share of the model's elements this rank stores: 1 when replicated, about 1/2 when sharded over two ranks."""
    held = total = 0
    for p in model.parameters():
        if hasattr(p, "ds_id"):
            held, total = held + p.ds_tensor.numel(), total + p.ds_numel
        elif isinstance(p, DTensor):
            held, total = held + p.to_local().numel(), total + p.numel()
        else:
            held, total = held + p.numel(), total + p.numel()
    return held / total


def wrapping(trainer) -> dict:
    student, teacher = trainer.model_wrapped, trainer.teacher_model
    inner = getattr(teacher, "module", teacher)
    facts = {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "num_processes": trainer.accelerator.num_processes,
        "student": type(student).__name__,
        "teacher": type(teacher).__name__,
        "ddp": any(isinstance(m, DistributedDataParallel) for m in (student, trainer.model, teacher)),
        "student_held": held_fraction(trainer.model),
        "teacher_held": held_fraction(inner),
        "teacher_trainable": sum(p.requires_grad for p in teacher.parameters()),
        "teacher_training": inner.training,
        "fsdp2": [isinstance(m, FSDPModule) for m in (trainer.model, inner)],
    }
    if isinstance(student, deepspeed.DeepSpeedEngine):
        facts["stages"] = [student.zero_optimization_stage(), teacher.zero_optimization_stage()]
        facts["ds_params"] = [all(hasattr(p, "ds_id") for p in m.parameters()) for m in (trainer.model, inner)]
    return facts


def train(name: str, student, teacher, processor, dataset, stop=None, resume=None, output=None, **overrides) -> dict:
    for recorded in calls.values():
        recorded.clear()
    peft_config = overrides.pop("peft_config", None)
    output_dir = str(out_dir / (output or name))
    args = GNDPOConfig(**cpu_grpo_kwargs(output_dir=output_dir, per_device_train_batch_size=2, **overrides))
    trainer = GNDPOTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        teacher_processing_class=processor,
        peft_config=peft_config,
    )
    if stop is not None:
        trainer.add_callback(StopAfterCheckpoint(stop))
    record = {"before": wrapping(trainer)}
    unwrapped_teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    heads = {"student": [], "teacher": []}
    for role, model in (("student", trainer.accelerator.unwrap_model(trainer.model)), ("teacher", unwrapped_teacher)):
        model = model.get_base_model() if hasattr(model, "get_base_model") else model
        model.get_output_embeddings().register_forward_hook(lambda m, a, out, r=role: heads[r].append(out.shape))
    teacher_before = full_weights(unwrapped_teacher)
    compute_loss, loss_dtypes = trainer._compute_loss, []

    def recording_loss(*args):
        loss = compute_loss(*args)
        loss_dtypes.append(loss.dtype)
        return loss

    trainer._compute_loss = recording_loss
    trainer.train(resume_from_checkpoint=resume)
    record.update(
        after=wrapping(trainer),
        steps=trainer.state.global_step,
        heads=heads,
        kernel=list(calls["kernel"]),
        whitening=list(calls["whitening"]),
        teacher_before=teacher_before,
        teacher_after=full_weights(unwrapped_teacher),
        student=full_weights(trainer.accelerator.unwrap_model(trainer.model)),
        loss_dtypes=loss_dtypes,
        eta=None if trainer.steering is None else trainer.steering.eta,
    )
    facts = record["after"]
    print(
        f"rank {trainer.accelerator.process_index}, {engine} run {name!r}: student {facts['student']} holding "
        f"{facts['student_held']:.0%} of its weights, teacher {facts['teacher']} holding {facts['teacher_held']:.0%}"
        + (f", ZeRO stages {facts['stages']}" if "stages" in facts else ""),
        flush=True,
    )
    return record


def text_models():
    return make_text_model(seed=0), make_text_model(seed=1, hidden_size=128), make_tokenizer(), make_text_dataset()


records = {}
if engine == "zero3":
    resume = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    records["base"] = train("base", *text_models(), stop=2, **resume)
    checkpoint = str(out_dir / "base" / "checkpoint-2")
    records["resumed"] = train("resumed", *text_models(), resume=checkpoint, output="base", **resume)
    records["full"] = train("full", *text_models(), **resume)
else:
    records["base"] = train("base", *text_models(), bf16=engine == "zero3_bf16")
if engine in ("zero3", "fsdp2"):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    records["lora"] = train("lora", *text_models(), peft_config=lora)
if engine == "zero2":
    (student, processor), (teacher, _) = make_vlm(seed=0), make_vlm(seed=1, hidden_size=128)
    vgs = {"visual_gradient_steering": True, "vgs_adaptive_gamma": True, "vgs_eta_measure_steps": 1}
    records["vgs"] = train("vgs", student, teacher, processor, make_image_dataset(), **vgs)
rank = torch.distributed.get_rank()
torch.save(records, out_dir / f"{engine}_rank{rank}.pt")

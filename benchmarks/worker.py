"""Measure one trainer in this process: ``python -m benchmarks.worker SPEC.json OUT.json`` (started by `run.py`).

The worker builds the models (`models.build`) and one trainer, wraps a few of the trainer's own methods on the instance
to time them (library code is not modified), trains ``warmup + steps`` optimizer steps and writes one JSON record.
Phases of an optimizer step (``on_step_begin`` to ``on_step_end``) are exclusive times, so they sum to the step:

* ``generation``: ``_generate`` (tokenizing the prompts and sampling the completions).
* ``teacher``: GNDPO: ``_score_tokens`` minus the nested phases (the teacher's forward and log-prob head).
  DistillationTrainer: ``_get_last_hidden_state`` on the teacher (its backbone; its head is fused into the JSD loss).
* ``student_scoring``: a no-grad student log-prob pass outside the loss (GNDPO's log p_old).
* ``vgs_text_view``, ``vgs_loss``: VGS's text-view teacher pass and loss (``Steering.add_text_view``, ``.loss``).
* ``prep_other``: the rest of ``_generate_and_score_completions``.
* ``loss_forward``: ``compute_loss`` minus the nested phases; ``backward``: ``accelerator.backward``.
* ``optimizer_other``: the remainder (clipping, optimizer step, callbacks).

Memory: the process's peak RSS (``getrusage``), and per phase the peak growth of the memory in use while the phase is
the innermost one: on CUDA ``max_memory_allocated``; on CPU glibc's heap in use (``mallinfo2``, which unlike RSS falls
when a tensor is freed), read at every phase boundary and by a thread that sleeps at least 49 times its last read
(a read walks the allocator's free lists and takes milliseconds on a large heap), so it takes at most 2% of the time.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from transformers import TrainerCallback

PHASES = ("generation", "teacher", "student_scoring", "vgs_text_view", "prep_other", "loss_forward", "vgs_loss",
          "backward", "optimizer_other")  # fmt: skip


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip


def _cpu_memory_probe():
    """(kind, reader): glibc's bytes in live allocations, or the RSS where ``mallinfo2`` is missing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        return "glibc heap in use", lambda: (lambda i: i.uordblks + i.hblkhd)(libc.mallinfo2())
    except (OSError, AttributeError):
        page = os.sysconf("SC_PAGE_SIZE")
        return "RSS", lambda: int(open("/proc/self/statm").read().split()[1]) * page


class Probe:
    """Nested phase timer with each phase's own peak memory growth, per optimizer step."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"
        self.kind, self.read = ("CUDA max allocated", None) if self.cuda else _cpu_memory_probe()
        self.stack: list[dict] = []  # open phases: name, start time, time of nested phases, memory at start, peak
        self.lock = threading.Lock()
        self.step, self.steps, self.cuda_peak = None, [], 0
        self.counters = defaultdict(int)
        self.batch_hashes: list[str] = []
        if not self.cuda:
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while True:
            start = time.perf_counter()
            value = self.read()
            with self.lock:
                if self.stack:
                    self.stack[-1]["peak"] = max(self.stack[-1]["peak"], value)
            time.sleep(max(0.002, 49 * (time.perf_counter() - start)))

    def _boundary(self) -> int:
        """Charge the peak since the last boundary to the innermost phase; return the memory in use now."""
        if self.cuda:
            self.torch.cuda.synchronize()
            peak, now = self.torch.cuda.max_memory_allocated(), self.torch.cuda.memory_allocated()
            self.torch.cuda.reset_peak_memory_stats()
            self.cuda_peak = max(self.cuda_peak, peak)
        else:
            peak = now = self.read()
        with self.lock:
            if self.stack:
                self.stack[-1]["peak"] = max(self.stack[-1]["peak"], peak)
        return now

    def push(self, name: str) -> None:
        memory = self._boundary()
        with self.lock:
            self.stack.append({"name": name, "t0": time.perf_counter(), "nested": 0.0, "start": memory,
                               "peak": memory})  # fmt: skip

    def pop(self) -> tuple[str, float, int]:
        """Close the innermost phase: (name, exclusive seconds, own peak growth in bytes)."""
        self._boundary()
        with self.lock:
            frame = self.stack.pop()
            elapsed = time.perf_counter() - frame["t0"]
            if self.stack:
                self.stack[-1]["nested"] += elapsed
        return frame["name"], elapsed - frame["nested"], frame["peak"] - frame["start"]

    def timed(self, name: str, function):
        def wrapper(*args, **kwargs):
            self.push(name)
            try:
                return function(*args, **kwargs)
            finally:
                _, seconds, growth = self.pop()
                if self.step is not None:
                    self.step["time"][name] += seconds
                    self.step["peak"][name] = max(self.step["peak"][name], growth)

        return wrapper

    def begin_step(self):
        self.step = {"time": defaultdict(float), "peak": defaultdict(int)}
        self.push("step")

    def end_step(self):
        _, total_exclusive, growth = self.pop()
        step, self.step = self.step, None
        step["time"]["optimizer_other"] += total_exclusive
        step["peak"]["optimizer_other"] = max(step["peak"]["optimizer_other"], growth)
        step["total"] = sum(step["time"].values())
        self.steps.append({"total": step["total"], "time": dict(step["time"]), "peak": dict(step["peak"])})


def length_reward(completions, **kwargs) -> list[float]:
    """GRPO's trivial reward (the no-teacher floor): the completion's length in characters."""
    return [float(len(str(c))) for c in completions]


# Trainer kinds: (trainer class, its config's own options). `quality.py` measures some of them by other names.
KINDS = {
    "gndpo": ("gndpo", {}),
    "gndpo_sampler": ("gndpo", {"old_logps_from_sampler": True}),
    "gndpo_vgs": ("gndpo", {"visual_gradient_steering": True}),
    "gndpo_cross": ("gndpo", {"cross_tokenizer_distillation": True}),  # forced on with the student's own tokenizer
    "gndpo_vopd": ("gndpo", {"value_baseline": True, "value_baseline_top_k": 32}),
    "gndpo_tip": ("gndpo", {"token_selection": "quadrant"}),
    "gndpo_g4": ("gndpo", {"num_generations": 4}),  # at the spec's batch: half the prompts, twice the completions
    "opd": ("gndpo", {"normalization_scope": "none"}),
    "distillation": ("distillation", {"beta": 1.0}),
    "distill_rkl": ("distillation", {"beta": 1.0}),
    "distill_jsd": ("distillation", {"beta": 0.5}),
    "grpo": ("grpo", {"beta": 0.0, "loss_type": "grpo", "importance_sampling_level": "sequence"}),
}


def make_trainer(spec: dict, built: dict, device, output_dir: str, **config):
    """The trainer of kind ``spec["trainer"]`` (`KINDS`) on the spec's work: one generation batch per optimizer step,
    sampling at temperature 1 without top-p/k, and by default every completion exactly ``completion_length`` tokens
    in dataset order; `config` overrides these training arguments."""
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer, GRPOConfig, GRPOTrainer

    from trl_gndpo import GNDPOConfig, GNDPOTrainer

    kind, options = KINDS[spec["trainer"]]
    length = spec["completion_length"]
    columns = {"prompt": built["prompts"]} | ({"image": built["images"]} if built["images"] else {})
    if kind == "distillation":  # one completion per dataset row by design: each prompt repeated num_generations times
        columns = {k: [x for x in v for _ in range(spec["num_generations"])] for k, v in columns.items()}
    common = dict(
        output_dir=output_dir, per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=spec["grad_accum"], max_steps=spec["warmup"] + spec["steps"],
        learning_rate=spec["lr"], lr_scheduler_type="constant", weight_decay=0.01, seed=spec["seed"],
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        max_completion_length=length, temperature=1.0, top_p=1.0, top_k=0, shuffle_dataset=False,
        disable_dropout=True, generation_kwargs={"min_new_tokens": length}, activation_checkpointing=False,
        **({"bf16": True} if device.type == "cuda" else {"use_cpu": True, "bf16": False}),
    ) | options | config  # fmt: skip
    data = dict(model=built["student"], train_dataset=Dataset.from_dict(columns))
    data["processing_class"] = built["processing_class"]
    peft = None
    if spec.get("lora"):  # "all-linear": r=16 on every linear layer (TRL's ModelConfig defaults); else VGS's q/v
        from peft import LoraConfig

        peft = (LoraConfig(r=16, lora_alpha=32, target_modules="all-linear") if spec["lora"] == "all-linear" else
                LoraConfig(r=8, lora_alpha=16, target_modules=r".*language_model.*\.(q|v)_proj"))  # fmt: skip
    if kind == "gndpo":
        args = GNDPOConfig(**{"num_generations": spec["num_generations"]} | common)
        return GNDPOTrainer(teacher_model=built["teacher"], args=args, peft_config=peft,
                            teacher_processing_class=built["processing_class"], **data)  # fmt: skip
    if kind == "distillation":
        fields = {f.name for f in dataclasses.fields(DistillationConfig)}
        args = DistillationConfig(**{k: v for k, v in common.items() if k in fields})
        return DistillationTrainer(teacher_model=built["teacher"], args=args, peft_config=peft, **data)
    args = GRPOConfig(**common, num_generations=spec["num_generations"])
    return GRPOTrainer(reward_funcs=length_reward, args=args, **data)


class StepTimer(TrainerCallback):
    """Wall-clock seconds of each optimizer step (``on_step_begin`` to ``on_step_end``), CUDA synchronized."""

    def __init__(self, cuda: bool = False):
        self.cuda, self.seconds = cuda, []

    def _now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(self._now() - self.start)


def instrument(trainer, probe: Probe) -> None:
    """Wrap the trainer's own methods on the instance; count teacher forwards, generation batches, head rows."""
    import torch
    import trl.trainer.distillation_trainer as distillation_module
    import trl.trainer.utils as utils_module

    def wrap(name, phase, before=None, after=None, owner=trainer):
        original = getattr(owner, name)
        timed = probe.timed(phase, original)

        def wrapper(*args, **kwargs):
            if before is not None and not before(*args):
                return original(*args, **kwargs)
            out = timed(*args, **kwargs)
            if after is not None:
                after(out)
            return out

        setattr(owner, name, wrapper)

    def generated(out):  # (prompt_ids, completion_ids, ...): lists of token-id lists
        probe.counters["generation_batches"] += 1
        probe.counters["completion_tokens"] += sum(len(c) for c in out[1])
        probe.batch_hashes.append(hashlib.sha256(json.dumps([list(map(int, c)) for c in out[1]]).encode()).hexdigest())

    def count(key: str) -> bool:
        probe.counters[key] += 1
        return True

    teacher = getattr(trainer, "teacher_model", None)
    wrap("_generate", "generation", after=generated)
    wrap("_generate_and_score_completions", "prep_other")
    wrap("compute_loss", "loss_forward")
    if hasattr(trainer, "_score_tokens"):
        wrap("_score_tokens", "teacher", before=lambda *a: count("teacher_passes"))
    if getattr(trainer, "steering", None) is not None:  # GNDPO with VGS: its part's two steps
        wrap("add_text_view", "vgs_text_view", owner=trainer.steering)
        wrap("loss", "vgs_loss", owner=trainer.steering)
    if hasattr(trainer, "_get_per_token_logps_and_entropies"):  # GRPOTrainer's and GNDPO's
        no_grad_student = lambda model, *a: model is not teacher and not torch.is_grad_enabled()  # noqa: E731
        wrap("_get_per_token_logps_and_entropies", "student_scoring", before=no_grad_student)
    if hasattr(trainer, "_get_last_hidden_state"):  # DistillationTrainer: teacher backbone inside the loss
        unwrapped = trainer.accelerator.unwrap_model(teacher)
        is_teacher = lambda model, *a: model is unwrapped and count("teacher_passes")  # noqa: E731
        wrap("_get_last_hidden_state", "teacher", before=is_teacher)
    trainer.accelerator.backward = probe.timed("backward", trainer.accelerator.backward)
    if teacher is not None:
        backbone = trainer.accelerator.unwrap_model(teacher).base_model
        backbone.register_forward_pre_hook(lambda *a: count("teacher_forwards") and None)

    class CountingKernel:  # stands in, in this process only, for the names TRL's trainers call their head kernels by
        def __init__(self, kernel, heads):
            self.kernel, self.heads = kernel, heads

        def apply(self, hidden, *args):
            probe.counters["head_rows"] += int(hidden.shape[0]) * self.heads  # rows x vocabulary heads projected
            return self.kernel.apply(hidden, *args)

    utils_module._ChunkedLogProbFunction = CountingKernel(utils_module._ChunkedLogProbFunction, 1)
    distillation_module.ChunkedDivergenceFunction = CountingKernel(distillation_module.ChunkedDivergenceFunction, 2)

    class StepWindow(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            probe.begin_step()

        def on_step_end(self, args, state, control, **kwargs):
            probe.end_step()

    trainer.add_callback(StepWindow())


def fingerprint(model) -> str | None:
    """A checksum of the weights (sum of |w| and of w * (index + 1) over all parameters, float64)."""
    import torch

    if model is None:
        return None
    with torch.no_grad():
        total = sum(torch.stack([p.double().abs().sum(), p.double().sum() * (i + 1)]) for i, p in
                    enumerate(model.parameters()))  # fmt: skip
    return f"{total[0].item():.12g}/{total[1].item():.12g}"


def environment(device) -> dict:
    import accelerate
    import torch
    import transformers
    import trl

    import trl_gndpo

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.machine())  # fmt: skip
    gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "trl": trl.__version__,
                     "transformers": transformers.__version__, "accelerate": accelerate.__version__,
                     "trl_gndpo": trl_gndpo.__version__},
        "machine": {"cpu": cpu, "cpu_cores": os.cpu_count(), "ram_gib": round(gib, 1), "device": str(device),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "torch_threads": torch.get_num_threads()},
    }  # fmt: skip


def main(spec_path: str, out_path: str) -> None:
    import torch
    from transformers.utils import logging

    from .models import build

    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    logging.set_verbosity_error()
    device = torch.device("cuda" if torch.cuda.is_available() and not spec.get("cpu") else "cpu")
    built = build(spec, with_teacher=spec["trainer"] != "grpo")  # the no-teacher floor keeps no teacher in memory
    fingerprints = {"student_fingerprint": fingerprint(built["student"]),
                    "teacher_fingerprint": fingerprint(built["teacher"])}  # fmt: skip
    for key in ("student", "teacher"):
        built[key] = None if built[key] is None else built[key].to(device)
    trainer = make_trainer(spec, built, device, tempfile.mkdtemp(prefix="gndpo-bench-"))
    probe = Probe(device)
    instrument(trainer, probe)
    rss_setup = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    trainer.train()
    measured = probe.steps[spec["warmup"] :]
    if not measured:
        raise RuntimeError(f"no measured step: {len(probe.steps)} steps ran, warm-up {spec['warmup']}")
    batches, steps = probe.counters["generation_batches"], len(probe.steps)
    record = {
        "trainer": spec["trainer"],
        "description": built["description"],
        **fingerprints,
        "step_times": [s["total"] for s in measured],
        "phases": [s["time"] for s in measured],
        "phase_own_peak_delta_bytes": {p: max(s["peak"].get(p, 0) for s in measured) for p in PHASES},
        "memory_kind": probe.kind,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_setup_bytes": rss_setup,
        "cuda_max_allocated_bytes": probe.cuda_peak if device.type == "cuda" else None,
        # counts over every step, warm-up included (a generation batch may span several optimizer steps)
        "optimizer_steps_per_generation_batch": steps / batches,
        "completion_tokens_per_step": probe.counters["completion_tokens"] / steps,
        "teacher_scoring_passes_per_generation_batch": probe.counters["teacher_passes"] / batches,
        "teacher_forward_calls_per_generation_batch": probe.counters["teacher_forwards"] / batches,
        "head_rows_per_step": probe.counters["head_rows"] / steps,
        "batch_hashes": probe.batch_hashes,
        **environment(device),
    }
    Path(out_path).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""Measure one trainer in this process: ``python benchmarks/worker.py SPEC.json OUT.json``.

`run.py` starts one worker per trainer (and per variant), so each process's peak memory belongs to one trainer. The
worker builds the models (`models.build`), the trainer, wraps a few of the trainer's own methods on the instance to
time them (library code is not modified), trains ``warmup + steps`` optimizer steps and writes one JSON record.

Phases of an optimizer step (``on_step_begin`` to ``on_step_end`` of the transformers training loop), as exclusive
times, so they sum to the step:

* ``generation``: ``_generate`` (tokenizing the prompts and sampling the completions with the student).
* ``teacher``: GNDPO: ``_score_tokens`` minus the student's pass inside it (the teacher's forward and log-prob head,
  plus anything the trainer does around it, e.g. moving an offloaded teacher). DistillationTrainer:
  ``_get_last_hidden_state`` called with the teacher (its backbone; the teacher's vocabulary projection is fused with
  the student's into the JSD kernel and is counted in ``loss_forward``).
* ``student_scoring``: a no-grad log-prob pass of the student outside the loss (GNDPO's ``log p_old``; GRPO's
  ``old_per_token_logps`` when it computes them).
* ``prep_other``: the rest of ``_generate_and_score_completions`` (padding, rewards, advantages, metrics).
* ``loss_forward``: ``compute_loss`` (minus a teacher forward nested in it); ``backward``: ``accelerator.backward``.
* ``optimizer_other``: the remainder: gradient clipping, optimizer step, zero_grad, buffer slicing, callbacks.

Memory: the process's peak RSS (``getrusage``) and its RSS after set-up. Per phase, the peak of the memory in use
minus its value at the phase's start: on CPU, glibc's heap in use (``mallinfo2``: bytes held by live allocations,
which, unlike RSS, falls when a tensor is freed), read by a sampling thread every ``sample_interval`` seconds and at
every phase boundary (RSS where ``mallinfo2`` is missing); on CUDA, ``max_memory_allocated`` (the peak statistic is
reset at each phase boundary and folded into the enclosing phases).

``mallinfo2`` is not free: it walks every free chunk of every glibc arena while holding the arena's lock, about
0.05 ms on the tiny size's heap and 0.5-1.3 ms on the SmolLM2 size's (about 20,000 free chunks), and its cost differs
between processes with the heap's layout. Read every 2 ms regardless, it took a third or more of a core from a
process whose torch threads fill the machine, and slowed even generation (the same work in every trainer) unequally
between trainers. The sampler therefore keeps its own share of the wall time under ``sample_duty`` (it sleeps at least
``(1 / sample_duty - 1)`` times its last read), and the worker records the time the probes spent reading memory
(``memory_probe_overhead``). ``memory_probes=False`` in the spec turns all CPU memory reads off (timings only), which
``run.py --probe-check`` uses to measure what the probes cost.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PHASES = ("generation", "teacher", "student_scoring", "prep_other", "loss_forward", "backward", "optimizer_other")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def rss_split() -> dict:
    """RSS split into anonymous memory (heap, tensors) and file-backed pages (e.g. memory-mapped checkpoints)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")
    ]  # fmt: skip


def _heap_probe():
    """glibc's bytes in use (arenas + mmapped chunks), which, unlike RSS, falls when tensors are freed; else RSS."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return "rss", rss_bytes

    def heap_in_use() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    return "glibc_heap_in_use", heap_in_use


CPU_MEMORY_KIND, cpu_memory_bytes = _heap_probe()


# ---------------------------------------------------------------------------------------------------------------------
# Memory and time probes
# ---------------------------------------------------------------------------------------------------------------------
class _Frame:
    __slots__ = ("name", "t0", "child", "start", "peak", "own_peak")

    def __init__(self, name, t0, start):
        self.name, self.t0, self.child, self.start = name, t0, 0.0, start
        self.peak = self.own_peak = start  # own_peak: only while no nested phase runs


class Probe:
    """Nested phase timer with per-phase peak memory (heap sampling on CPU, CUDA peak statistics on a GPU).

    Each phase keeps its inclusive peak and its own peak (reached while it is the innermost phase, so a nested
    phase's memory is not charged to its parent). Times are exclusive: a nested phase's time is subtracted.
    """

    def __init__(self, device, sample_interval: float = 0.002, sample_duty: float = 0.02, memory: bool = True):
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"
        self.device = device
        # CPU memory reads can be turned off (timings only); CUDA statistics cost nothing and stay on
        self.memory = memory or self.cuda
        self.sample_duty = sample_duty
        # time spent reading CPU memory: by the sampling thread, and on the main thread at phase boundaries
        self.overhead = {"sampler_reads": 0, "sampler_s": 0.0, "boundary_reads": 0, "boundary_s": 0.0}
        self.frames: list[_Frame] = []
        self.lock = threading.Lock()
        self.step = None  # the current optimizer step's record
        self.steps: list[dict] = []
        self.outside = self._new_record()  # anything measured outside a step window (should stay empty)
        self.overall_peak = 0
        # where the process's RSS peaked (sampled with the heap): phase, optimizer step, RSS and heap in use then
        self.rss_peak = {"rss": 0}
        self._stop = threading.Event()
        self._started = time.perf_counter()
        if not self.cuda and self.memory:
            self._thread = threading.Thread(target=self._sample, args=(sample_interval,), daemon=True)
            self._thread.start()

    @staticmethod
    def _new_record() -> dict:
        return {
            "time": defaultdict(float),
            "peak_delta": defaultdict(int),
            "own_peak_delta": defaultdict(int),
            "peak": defaultdict(int),
            "calls": defaultdict(int),
            "counters": defaultdict(int),
        }

    def close(self):
        self._stop.set()
        self.sync()
        self._fold_peak()
        self.overhead["wall_s"] = time.perf_counter() - self._started

    def overhead_summary(self) -> dict:
        """The probes' own cost: reads, seconds, and the sampler's share of the wall time since the probe started."""
        out = dict(self.overhead)
        wall = out.get("wall_s") or (time.perf_counter() - self._started)
        out["sampler_share"] = out["sampler_s"] / wall if wall > 0 else 0.0
        out["boundary_mean_s"] = out["boundary_s"] / out["boundary_reads"] if out["boundary_reads"] else 0.0
        out["sampler_mean_s"] = out["sampler_s"] / out["sampler_reads"] if out["sampler_reads"] else 0.0
        out["memory_probes"] = self.memory
        return out

    def _update(self, value: int, rss: int | None = None) -> None:
        with self.lock:
            if rss is not None and rss > self.rss_peak["rss"]:
                step = len(self.steps) + 1 if self.step is not None else None  # 1-based, warm-up included
                phase = self.frames[-1].name if self.frames else "outside"
                self.rss_peak = {"rss": rss, "heap": value, "phase": phase, "step": step}
            self.overall_peak = max(self.overall_peak, value)
            for frame in self.frames:
                if value > frame.peak:
                    frame.peak = value
            if self.frames and value > self.frames[-1].own_peak:
                self.frames[-1].own_peak = value

    def _sample(self, interval):
        # sleep at least (1 / duty - 1) times the last read, so the sampler's share of the wall time stays <= duty
        stretch = 1.0 / self.sample_duty - 1.0
        while not self._stop.is_set():
            t0 = time.perf_counter()
            value, rss = cpu_memory_bytes(), rss_bytes()
            cost = time.perf_counter() - t0
            self.overhead["sampler_reads"] += 1
            self.overhead["sampler_s"] += cost
            self._update(value, rss)
            time.sleep(max(interval, cost * stretch))

    def sync(self):
        if self.cuda:
            for index in range(self.torch.cuda.device_count()):
                self.torch.cuda.synchronize(index)

    def _cpu_read(self) -> int:
        t0 = time.perf_counter()
        value, rss = cpu_memory_bytes(), rss_bytes()
        self.overhead["boundary_reads"] += 1
        self.overhead["boundary_s"] += time.perf_counter() - t0
        self._update(value, rss)
        return value

    def _fold_peak(self) -> int:
        """At a phase boundary: charge the peak since the last boundary to the open phases (CUDA: then reset it).
        Returns the memory in use now (0 with the CPU memory probes off)."""
        if self.cuda:
            self._update(self.torch.cuda.max_memory_allocated(self.device))
            self.torch.cuda.reset_peak_memory_stats(self.device)
            return self.torch.cuda.memory_allocated(self.device)
        return self._cpu_read() if self.memory else 0

    def push(self, name: str) -> _Frame:
        self.sync()
        now = self._fold_peak()
        frame = _Frame(name, time.perf_counter(), now)
        with self.lock:
            self.frames.append(frame)
        return frame

    def pop(self, frame: _Frame) -> tuple[float, float]:
        self.sync()
        elapsed = time.perf_counter() - frame.t0
        self._fold_peak()
        with self.lock:
            self.frames.remove(frame)
            if self.frames:
                self.frames[-1].child += elapsed
        return elapsed, elapsed - frame.child

    @contextmanager
    def phase(self, name: str):
        frame = self.push(name)
        try:
            yield
        finally:
            _, exclusive = self.pop(frame)
            record = self.step if self.step is not None else self.outside
            record["time"][name] += exclusive
            record["calls"][name] += 1
            record["peak_delta"][name] = max(record["peak_delta"][name], frame.peak - frame.start)
            record["own_peak_delta"][name] = max(record["own_peak_delta"][name], frame.own_peak - frame.start)
            record["peak"][name] = max(record["peak"][name], frame.peak)

    def count(self, key: str, n: int = 1):
        record = self.step if self.step is not None else self.outside
        record["counters"][key] += n

    # optimizer-step window (a TrainerCallback forwards to these)
    def begin_step(self):
        self.step = self._new_record()
        self.step["frame"] = self.push("step")

    def end_step(self):
        record, self.step = self.step, None
        frame = record.pop("frame")
        total, _ = self.pop(frame)
        timed = sum(record["time"].values())
        record["time"]["optimizer_other"] = max(total - timed, 0.0)
        record["total"] = total
        record["peak_delta"]["step"] = frame.peak - frame.start
        record["own_peak_delta"]["optimizer_other"] = frame.own_peak - frame.start
        record["peak"]["step"] = frame.peak
        self.steps.append({k: dict(v) if isinstance(v, defaultdict) else v for k, v in record.items()})


# ---------------------------------------------------------------------------------------------------------------------
# Trainers
# ---------------------------------------------------------------------------------------------------------------------
def length_reward(completions, **kwargs) -> list[float]:
    """GRPO's trivial reward (the no-teacher floor): the completion's length in characters."""
    return [float(len(str(c))) for c in completions]


def _common_args(config_class, spec: dict, device, output_dir: str) -> dict:
    fields = {f.name for f in dataclasses.fields(config_class)}
    length = spec["completion_length"]
    kwargs = dict(
        output_dir=output_dir,
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=spec["grad_accum"],
        max_steps=spec["warmup"] + spec["steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        weight_decay=0.01,
        seed=spec["seed"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        max_completion_length=length,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        shuffle_dataset=False,
        disable_dropout=True,
        # every completion is exactly `completion_length` tokens: identical work for the three trainers
        generation_kwargs={"min_new_tokens": length},
    )
    if device.type == "cuda":
        kwargs.update(bf16=True)
    else:
        kwargs.update(use_cpu=True, bf16=False)
    checkpointing = bool(spec.get("activation_checkpointing", False))
    if "activation_checkpointing" in fields:
        kwargs["activation_checkpointing"] = checkpointing
    else:  # transformers < 5.23
        kwargs["gradient_checkpointing"] = checkpointing
    return {k: v for k, v in kwargs.items() if k in fields}


def make_trainer(spec: dict, built: dict, device, output_dir: str):
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer, GRPOConfig, GRPOTrainer

    from trl_gndpo import GNDPOConfig, GNDPOTrainer

    kind, variant = spec["trainer"], spec.get("variant") or {}
    columns = {"prompt": built["prompts"]}
    if built["images"] is not None:
        columns["image"] = built["images"]
    if kind == "distillation":  # one completion per prompt by design: repeat each prompt num_generations times
        repeat = spec["num_generations"]
        columns = {k: [x for x in v for _ in range(repeat)] for k, v in columns.items()}
    dataset = Dataset.from_dict(columns)
    processing_class = built["processing_class"]

    if kind == "gndpo":
        extra = dict(variant.get("config", {}))
        teacher = built["teacher"]
        if "teacher_model_init_kwargs" in extra:  # a quantized teacher: loaded by GNDPO from the saved files
            teacher = built["teacher_path"]
        args = GNDPOConfig(
            **_common_args(GNDPOConfig, spec, device, output_dir), num_generations=spec["num_generations"], **extra
        )
        return GNDPOTrainer(
            model=built["student"],
            teacher_model=teacher,
            args=args,
            train_dataset=dataset,
            processing_class=processing_class,
            teacher_processing_class=processing_class,
        )
    if kind == "distillation":
        args = DistillationConfig(**_common_args(DistillationConfig, spec, device, output_dir), beta=1.0)
        return DistillationTrainer(
            model=built["student"],
            teacher_model=built["teacher"],
            args=args,
            train_dataset=dataset,
            processing_class=processing_class,
        )
    if kind == "grpo":
        args = GRPOConfig(
            **_common_args(GRPOConfig, spec, device, output_dir),
            num_generations=spec["num_generations"],
            beta=0.0,
            loss_type="grpo",
            importance_sampling_level="sequence",
        )
        return GRPOTrainer(
            model=built["student"],
            reward_funcs=length_reward,
            args=args,
            train_dataset=dataset,
            processing_class=processing_class,
        )
    raise ValueError(f"unknown trainer {kind!r}")


def _backbone(model):
    while hasattr(model, "module"):  # DDP / DeepSpeed / accelerate wrappers
        model = model.module
    return model.base_model


def instrument(trainer, probe: Probe, kind: str):
    """Wrap the trainer's own methods on the instance; count teacher forwards with a hook on its backbone."""
    import torch
    from transformers import TrainerCallback

    def wrap(name, make):
        setattr(trainer, name, make(getattr(trainer, name)))

    def timed(phase):
        def make(original):
            def wrapper(*args, **kwargs):
                with probe.phase(phase):
                    return original(*args, **kwargs)

            return wrapper

        return make

    def generate(original):
        def wrapper(*args, **kwargs):
            with probe.phase("generation"):
                out = original(*args, **kwargs)
            prompt_ids, completion_ids = out[0], out[1]
            probe.count("generation_batches")
            probe.count("completions", len(completion_ids))
            probe.count("prompt_tokens", sum(len(p) for p in prompt_ids))
            probe.count("completion_tokens", sum(len(c) for c in completion_ids))
            return out

        return wrapper

    wrap("_generate", generate)
    wrap("_generate_and_score_completions", timed("prep_other"))
    wrap("compute_loss", timed("loss_forward"))
    accelerator = trainer.accelerator
    original_backward = accelerator.backward

    def backward(*args, **kwargs):
        with probe.phase("backward"):
            return original_backward(*args, **kwargs)

    accelerator.backward = backward

    teacher = getattr(trainer, "teacher_model", None)
    if kind == "gndpo":

        def score(original):
            def wrapper(*args, **kwargs):
                probe.count("teacher_scoring_passes")
                with probe.phase("teacher"):
                    return original(*args, **kwargs)

            return wrapper

        wrap("_score_tokens", score)
    if kind in ("gndpo", "grpo"):

        def logps(original):
            def wrapper(model, *args, **kwargs):
                if model is not teacher and not torch.is_grad_enabled():
                    with probe.phase("student_scoring"):
                        return original(model, *args, **kwargs)
                return original(model, *args, **kwargs)

            return wrapper

        wrap("_get_per_token_logps_and_entropies", logps)
    if kind == "distillation":
        unwrapped_teacher = accelerator.unwrap_model(teacher)

        def hidden(original):
            def wrapper(unwrapped_model, *args, **kwargs):
                if unwrapped_model is unwrapped_teacher:
                    probe.count("teacher_scoring_passes")
                    with probe.phase("teacher"):
                        return original(unwrapped_model, *args, **kwargs)
                return original(unwrapped_model, *args, **kwargs)

            return wrapper

        wrap("_get_last_hidden_state", hidden)
    if teacher is not None:

        def pre_hook(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            probe.count("teacher_forward_calls")
            probe.count("teacher_rows", 0 if ids is None else int(ids.shape[0]))

        _backbone(teacher).register_forward_pre_hook(pre_hook, with_kwargs=True)

    count_vocab_projections(probe)

    original_training_step = trainer.training_step

    def training_step(*args, **kwargs):
        probe.count("micro_steps")
        return original_training_step(*args, **kwargs)

    trainer.training_step = training_step

    class StepWindow(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            probe.begin_step()

        def on_step_end(self, args, state, control, **kwargs):
            probe.end_step()

    trainer.add_callback(StepWindow())


class _CountingKernel:
    """Stands in for a TRL vocabulary-projection kernel class in this process: counts the rows it projects."""

    def __init__(self, kernel, probe: Probe, heads: int):
        self.kernel, self.probe, self.heads = kernel, probe, heads

    def apply(self, hidden, *args):
        self.probe.count("head_calls")
        self.probe.count("head_rows", int(hidden.shape[0]) * self.heads)  # rows x vocabulary heads projected
        return self.kernel.apply(hidden, *args)


def count_vocab_projections(probe: Probe) -> None:
    """Count the rows every vocabulary projection covers: TRL's fused log-prob head (GRPO, GNDPO's student and
    teacher) and the chunked divergence kernel (DistillationTrainer's JSD, student and teacher heads on each row).

    Only the module-level names the trainers look up at call time are rebound in this worker process; the kernels
    themselves run unchanged.
    """
    import trl.trainer.distillation_trainer as distillation_module
    import trl.trainer.utils as utils_module

    utils_module._ChunkedLogProbFunction = _CountingKernel(utils_module._ChunkedLogProbFunction, probe, 1)
    distillation_module.ChunkedDivergenceFunction = _CountingKernel(
        distillation_module.ChunkedDivergenceFunction, probe, 2
    )


def fingerprint(model) -> str:
    """A checksum of the weights (sum of |w| and of w*i over all parameters, float64)."""
    import torch

    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            if not p.is_floating_point():  # a quantized (packed) weight
                p = p.to(torch.float64)
            q = p.detach().to(torch.float64)
            total += torch.stack([q.abs().sum(), q.sum() * (i + 1)]).cpu()
    return f"{total[0].item():.12g}/{total[1].item():.12g}"


def versions() -> dict:
    import accelerate
    import datasets
    import torch
    import transformers
    import trl

    import trl_gndpo

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "trl_gndpo": trl_gndpo.__version__,
    }
    try:
        import bitsandbytes

        out["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    return out


def machine(device) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "os": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


def step_summary(steps: list[dict], completion_tokens: float, prompt_tokens: float) -> dict:
    """Step-time figures of measured optimizer steps (one process's, or several rounds' pooled): median, mean, min,
    max, the mean time of each phase, and tokens per second (tokens per step divided by the median step time)."""
    import statistics

    totals = [s["total"] for s in steps]
    median = statistics.median(totals)
    return dict(
        per_step=steps,
        steps_measured=len(steps),
        step_times=totals,
        step_time_median=median,
        step_time_mean=sum(totals) / len(totals),
        step_time_min=min(totals),
        step_time_max=max(totals),
        phases_mean={p: sum(s["time"].get(p, 0.0) for s in steps) / len(steps) for p in PHASES},
        completion_tokens_per_step=completion_tokens,
        prompt_tokens_per_step=prompt_tokens,
        completion_tokens_per_s=completion_tokens / median,
        tokens_per_s=(completion_tokens + prompt_tokens) / median,
    )


def summarize(spec: dict, probe: Probe, result: dict) -> dict:
    measured = probe.steps[spec["warmup"] :]
    if not measured:
        raise RuntimeError(f"no measured step: {len(probe.steps)} steps ran, warm-up {spec['warmup']}")
    counters = defaultdict(int)  # measured steps: tokens per step
    for step in measured:
        for k, v in step["counters"].items():
            counters[k] += v
    # Counts per generation batch over every step, warm-up included: with num_iterations > 1 a generation batch spans
    # several optimizer steps, which a window of measured steps would cut.
    everything = defaultdict(int)
    for step in probe.steps:
        for k, v in step["counters"].items():
            everything[k] += v
    n_steps, n_all = len(measured), len(probe.steps)
    batches = everything["generation_batches"]
    peak_delta = {p: max(s["peak_delta"].get(p, 0) for s in measured) for p in (*PHASES, "step")}
    own_peak_delta = {p: max(s["own_peak_delta"].get(p, 0) for s in measured) for p in PHASES}
    peak = {p: max(s["peak"].get(p, 0) for s in measured) for p in (*PHASES, "step")}
    completion_tokens = counters["completion_tokens"] / n_steps
    prompt_tokens = counters["prompt_tokens"] / n_steps
    per_batch = (lambda key: everything[key] / batches) if batches else (lambda key: math.nan)
    result.update(
        step_summary(measured, completion_tokens, prompt_tokens),
        generation_batches_per_step=batches / n_all,
        optimizer_steps_per_generation_batch=n_all / batches if batches else math.nan,
        micro_steps_per_step=everything["micro_steps"] / n_all,
        completions_per_generation_batch=per_batch("completions"),
        teacher_scoring_passes_per_generation_batch=per_batch("teacher_scoring_passes"),
        teacher_forward_calls_per_generation_batch=per_batch("teacher_forward_calls"),
        teacher_rows_per_generation_batch=per_batch("teacher_rows"),
        head_rows_per_step=everything["head_rows"] / n_all,
        head_calls_per_step=everything["head_calls"] / n_all,
        phase_peak_delta_bytes=peak_delta,
        phase_own_peak_delta_bytes=own_peak_delta,
        phase_peak_bytes=peak,
        outside_steps={k: dict(v) for k, v in probe.outside.items()},
    )
    return result


def head_kernel_peak(spec: dict) -> dict:
    """`--memory-cause`: TRL's fused log-prob kernel alone (`ChunkedLogProbFunction`, the one GNDPO's student
    re-score, teacher and loss run through on this device) on `rows` random rows of the size's hidden width against a
    head of its vocabulary, forward and backward once after a warm-up call; the growth of the process's peak RSS."""
    import torch
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    rows, hidden, vocab = spec["head_kernel_rows"], spec["hidden_size"], spec["vocab_size"]
    weight = torch.randn(vocab, hidden, requires_grad=True)
    states = torch.randn(rows, hidden, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,))

    def call(n):
        args = (None, targets[:n], 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs",))
        return ChunkedLogProbFunction.apply(states[:n], weight, *args)[0]

    call(8).sum().backward()  # warm-up: the weight gradient is allocated here (and freed), so it is in the base
    weight.grad = states.grad = None
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # noqa: E731
    base = peak()
    logps = call(rows)
    forward = peak()
    logps.sum().backward()
    return {
        "head_kernel_rows": rows,
        "hidden_size": hidden,
        "vocab_size": vocab,
        "chunk_columns": min(vocab, _CHUNKED_LOGPROB_CHUNK_SIZE),
        "base_peak_rss_bytes": base,
        "forward_peak_growth_bytes": forward - base,
        "backward_peak_growth_bytes": peak() - base,
        "config": spec,
    }


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("head_kernel_rows"):
        Path(out_path).write_text(json.dumps(head_kernel_peak(spec), indent=1, default=str))
        return
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    device = torch.device("cuda" if torch.cuda.is_available() and not spec.get("cpu") else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(0)
    workdir = tempfile.mkdtemp(prefix="gndpo-bench-")
    spec["workdir"] = workdir
    variant = spec.get("variant") or {}
    if spec["trainer"] == "grpo":
        spec["teacher_mode"] = "none"  # the no-teacher floor keeps no teacher in memory
    elif "teacher_model_init_kwargs" in variant.get("config", {}):
        spec["teacher_mode"] = "path"  # GNDPO loads the quantized teacher from the saved files itself
    else:
        spec["teacher_mode"] = "model"

    t0 = time.perf_counter()
    built = models_build(spec, device)
    if spec.get("prompt_extra_words"):  # `--memory-cause`: the same prompts made longer, completions unchanged
        built["prompts"] = lengthen_prompts(built["prompts"], spec["prompt_extra_words"])
    student_fp = fingerprint(built["student"])
    text_config = built["student"].config.get_text_config()
    widths = {"hidden_size": text_config.hidden_size, "vocab_size": text_config.vocab_size}
    teacher_fp = None if built["teacher"] is None else fingerprint(built["teacher"])
    trainer = make_trainer(spec, built, device, os.path.join(workdir, "out"))
    del built["student"], built["teacher"]
    probe = Probe(
        device,
        spec.get("sample_interval", 0.002),
        spec.get("sample_duty", 0.02),
        memory=spec.get("memory_probes", True),
    )
    instrument(trainer, probe, spec["trainer"])
    setup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_setup, split_setup = rss_bytes(), rss_split()
    cuda_setup = torch.cuda.memory_allocated() if device.type == "cuda" else None
    trainer.train()
    probe.close()
    result = {
        "trainer": spec["trainer"],
        "variant": variant.get("name", "default"),
        "size": spec["size"],
        "setup_s": setup_s,
        "description": built["description"],
        "student_fingerprint": student_fp,
        "teacher_fingerprint": teacher_fp,
        "rss_after_setup_bytes": rss_setup,
        **widths,
        "rss_split_after_setup_bytes": split_setup,
        "rss_split_at_end_bytes": rss_split(),
        "phase_memory_kind": "cuda_max_allocated" if device.type == "cuda" else CPU_MEMORY_KIND,
        "memory_probe_overhead": probe.overhead_summary(),
        "rss_peak_sampled": probe.rss_peak if probe.rss_peak["rss"] else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "versions": versions(),
        "machine": machine(device),
        "config": {k: v for k, v in spec.items() if k != "workdir"},
    }
    from trl.kernels.chunked_logprob import _use_triton

    # TRL's fused log-prob head projects only the scored positions with Triton, every position without it
    result["fused_head_compact"] = bool(_use_triton(device))
    if device.type == "cuda":
        result["cuda_after_setup_bytes"] = cuda_setup
        # the probe resets the peak statistic at phase boundaries and keeps the overall maximum itself
        result["cuda_max_allocated_bytes"] = probe.overall_peak
        result["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
    summarize(spec, probe, result)
    Path(out_path).write_text(json.dumps(result, indent=1, default=str))


PROMPT_FILLER = "Answer the question below briefly."


def lengthen_prompts(prompts: list, words: int) -> list:
    """Each prompt with `words` filler words put before its first user message (conversational or plain text)."""
    filler = " ".join((PROMPT_FILLER.split() * (words // 5 + 1))[:words])
    out = []
    for prompt in prompts:
        if isinstance(prompt, str):
            out.append(f"{filler}\n{prompt}")
            continue
        messages = [dict(m) for m in prompt]
        for m in messages:
            if m.get("role") == "user":
                if isinstance(m["content"], str):
                    m["content"] = f"{filler}\n{m['content']}"
                else:  # multimodal content blocks
                    m["content"] = [{"type": "text", "text": filler}, *m["content"]]
                break
        out.append(messages)
    return out


def models_build(spec, device):
    from models import build

    return build(spec, device)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

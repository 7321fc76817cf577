"""Held-out evaluation of a student against its teacher: the exact full-vocabulary reverse KL on the student's samples.

`heldout_reverse_kl` measures it once; `ReverseKLCallback` measures it every `eval_steps` optimizer steps of any
transformers `Trainer` (`GNDPOTrainer`, TRL's `DistillationTrainer`, ...), logs it as `eval/reverse_kl` and, with
`plot=True`, draws it against the step in `output_dir/reverse_kl.png` (`plot_reverse_kl`, with matplotlib).
The vocabulary is processed chunk by chunk (`teacher.reverse_kl_per_token`): no batch x length x vocabulary tensor.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import torch
from transformers import GenerationConfig, Trainer, TrainerCallback

from .hidden_states import completion_states, reverse_kl_per_token


def _tokenizer(processing_class):
    return getattr(processing_class, "tokenizer", processing_class)


@torch.no_grad()
def sample_completions(
    student,
    processing_class,
    prompts: Sequence,
    num_samples: int = 1,
    max_new_tokens: int = 32,
    seed: int = 0,
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """Sample `num_samples` completions per prompt from `student` at temperature 1 (no top-p / top-k), seeded.

    `prompts`: conversations (lists of messages, given the chat template's generation prompt) or plain strings.
    Returns `input_ids` and `attention_mask` (left-padded prompt + completion), `completion_mask` (every completion
    token up to and including the first end-of-sequence) and `prompt_length`. The global RNG state is restored.
    """
    tokenizer = _tokenizer(processing_class)
    rows = [p for p in prompts for _ in range(num_samples)]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        if isinstance(rows[0], str):
            inputs = tokenizer(rows, padding=True, return_tensors="pt")
        else:
            inputs = tokenizer.apply_chat_template(
                rows, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
            )
    finally:
        tokenizer.padding_side = side
    device = next(student.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    devices = [device] if device.type == "cuda" else []
    sequences = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, len(rows), batch_size):
            chunk = {k: v[start : start + batch_size] for k, v in inputs.items()}
            out = student.generate(**chunk, generation_config=config)
            sequences.append(
                torch.nn.functional.pad(
                    out, (0, inputs["input_ids"].size(1) + max_new_tokens - out.size(1)), value=pad
                )
            )
    prompt_length = inputs["input_ids"].size(1)
    input_ids = torch.cat(sequences)
    is_eos = input_ids[:, prompt_length:] == eos
    # after its first end-of-sequence a row holds only padding (also where a whole chunk stopped early)
    completion_mask = ((is_eos.cumsum(1) - is_eos.long()) == 0).long()
    return {
        "input_ids": input_ids,
        "attention_mask": torch.cat([inputs["attention_mask"], completion_mask], dim=1),
        "completion_mask": completion_mask,
        "prompt_length": prompt_length,
    }


@torch.no_grad()
def reverse_kl_sum(student, teacher, samples: dict, batch_size: int = 8) -> tuple[float, int]:
    r"""Sum over the masked completion tokens of the exact reverse KL, and the number of those tokens.

    .. math:: \sum_{i,t} m_{i,t}\, \mathrm{KL}\big(p(\cdot \mid y_{i,<t}) \,\|\, q(\cdot \mid y_{i,<t})\big)
          = \sum_{i,t} m_{i,t} \sum_{v} p(v \mid y_{i,<t}) (\log p(v \mid y_{i,<t}) - \log q(v \mid y_{i,<t}))

    `p` the student, `q` the teacher, both at temperature 1, over the student's vocabulary rows (a teacher may pad
    its head further); `samples` as `sample_completions` returns them.
    """
    mask = samples["completion_mask"].bool()
    length = mask.size(1)
    if not mask.any():
        return 0.0, 0
    states = []
    for model in (student, teacher):
        device = next(model.parameters()).device
        ids, attention = samples["input_ids"].to(device), samples["attention_mask"].to(device)
        states.append(completion_states(model, ids, attention, length, batch_size)[mask.to(device)])
    kl = reverse_kl_per_token(student, states[0], teacher, states[1])
    return kl.double().sum().item(), int(mask.sum())


def heldout_reverse_kl(
    student,
    teacher,
    processing_class,
    prompts: Sequence,
    num_samples: int = 1,
    max_new_tokens: int = 32,
    seed: int = 0,
    batch_size: int = 8,
) -> float:
    r"""Exact reverse KL to the teacher per token, averaged over the student's own sampled completion tokens.

    .. math:: \frac{1}{N} \sum_{i,t} \mathrm{KL}\big(p(\cdot \mid y_{i,<t}) \,\|\, q(\cdot \mid y_{i,<t})\big),
              \qquad y_i \sim p \text{ (temperature 1, seeded)}

    Both models score the same token ids, so they must share the tokenizer (as distillation requires). The student
    and teacher are switched to eval mode for the measurement and restored.
    """
    modes = [student.training, teacher.training]
    student.eval(), teacher.eval()
    try:
        samples = sample_completions(student, processing_class, prompts, num_samples, max_new_tokens, seed, batch_size)
        total, count = reverse_kl_sum(student, teacher, samples, batch_size)
    finally:
        student.train(modes[0]), teacher.train(modes[1])
    return total / max(count, 1)


PLOT_NAME = "reverse_kl.png"


def require_matplotlib() -> None:
    """matplotlib is an optional dependency: say how to get it before any training step needs it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "Plotting the held-out reverse KL needs matplotlib: `pip install matplotlib` (the `demo` and `test` "
            "extras include it), or leave `plot=False`."
        ) from error


def plot_reverse_kl(history: Sequence[dict], path: str | os.PathLike, title: str | None = None) -> str:
    """Draw the held-out reverse KL (`history` records of `ReverseKLCallback`: `step`, `reverse_kl`) against the
    optimizer step and save it as a PNG at `path`; returns the path. Uses matplotlib's object API (no pyplot state)."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [record["step"] for record in history]
    values = [record["reverse_kl"] for record in history]
    figure = Figure(figsize=(6, 3.6), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(steps, values, marker="o", color="tab:blue")
    for step, value in ((steps[0], values[0]), (steps[-1], values[-1])):
        axes.annotate(f"{value:.3f}", (step, value), textcoords="offset points", xytext=(0, 7), ha="center")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("KL(student || teacher), nats/token")
    axes.set_title(title or "Held-out reverse KL to the teacher")
    axes.grid(alpha=0.3)
    axes.margins(x=0.05, y=0.15)
    figure.savefig(path)
    return str(path)


class ReverseKLCallback(TrainerCallback):
    """Log the held-out exact reverse KL of the student to the teacher every `eval_steps` optimizer steps.

    ```python
    trainer = GNDPOTrainer(...)  # or trl.DistillationTrainer, or any Trainer whose model is the student
    trainer.add_callback(ReverseKLCallback(trainer, teacher, heldout_prompts, eval_steps=50))
    ```

    At the start of training (step 0, unless `at_start=False`), every `eval_steps` steps and at the last step, the
    student samples `num_samples` completions of at most `max_new_tokens` tokens for each held-out prompt with the
    fixed `seed` (the same draws at every evaluation for an unchanged student), and the mean per-token KL(student ||
    teacher) over the full vocabulary is logged as `eval/reverse_kl`, with `eval/reverse_kl_tokens` (the tokens it
    averages). With several processes, the prompts are split between them and the sums reduced. `history` keeps one
    record per evaluation: `step`, `reverse_kl`, `tokens`, and `train_seconds` (wall-clock seconds of training since it
    began, without the time spent in these evaluations).

    Args:
        trainer: the trainer the callback is attached to (its model is the student; its log receives the values).
        teacher: the teacher model; defaults to `trainer.teacher_model`.
        prompts: held-out prompts (conversations or plain strings), or a dataset with a `prompt` column. Prompts the
            student trains on would measure memorization, not distillation.
        eval_steps: evaluate every this many optimizer steps.
        num_samples, max_new_tokens, seed, batch_size: as in `heldout_reverse_kl` (`batch_size`: rows per generation
            and per scoring pass).
        at_start: also evaluate before the first step.
        plot: after each evaluation, redraw `history` as a PNG in the trainer's `output_dir` (`reverse_kl.png`, on
            the main process; its path is `plot_path`). Needs matplotlib, checked here.
    """

    def __init__(
        self,
        trainer: Trainer,
        teacher=None,
        prompts: Sequence = (),
        eval_steps: int = 50,
        num_samples: int = 1,
        max_new_tokens: int = 32,
        seed: int = 0,
        batch_size: int = 8,
        at_start: bool = True,
        plot: bool = False,
    ):
        if plot:
            require_matplotlib()
        if hasattr(prompts, "column_names"):
            prompts = list(prompts["prompt"])
        if not prompts:
            raise ValueError("ReverseKLCallback needs at least one held-out prompt.")
        if eval_steps < 1:
            raise ValueError(f"eval_steps must be >= 1, got {eval_steps}.")
        teacher = teacher if teacher is not None else getattr(trainer, "teacher_model", None)
        if teacher is None:
            raise ValueError(
                "ReverseKLCallback needs a teacher: pass `teacher=` (the trainer has no `teacher_model`)."
            )
        self.trainer, self.teacher, self.prompts = trainer, teacher, list(prompts)
        self.eval_steps, self.at_start = eval_steps, at_start
        self.sampling = dict(num_samples=num_samples, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
        self.history: list[dict] = []
        self.plot_path = os.path.join(trainer.args.output_dir, PLOT_NAME) if plot else None
        self._start, self._eval_seconds, self._last_step = None, 0.0, None

    def evaluate(self, step: int) -> dict:
        """Measure now, log through the trainer and append to `history`; returns the record."""
        from trl.models import unwrap_model_for_generation

        began = time.perf_counter()
        trainer, accelerator = self.trainer, self.trainer.accelerator
        teacher = accelerator.unwrap_model(self.teacher)
        with accelerator.split_between_processes(self.prompts) as prompts:
            with unwrap_model_for_generation(trainer.model_wrapped, accelerator) as student:
                modes = [student.training, teacher.training]
                student.eval(), teacher.eval()
                try:
                    if prompts:
                        s = self.sampling
                        samples = sample_completions(
                            student,
                            trainer.processing_class,
                            prompts,
                            s["num_samples"],
                            s["max_new_tokens"],
                            s["seed"],
                            s["batch_size"],
                        )
                        total, count = reverse_kl_sum(student, teacher, samples, s["batch_size"])
                    else:
                        total, count = 0.0, 0
                finally:
                    student.train(modes[0]), teacher.train(modes[1])
        sums = accelerator.reduce(torch.tensor([total, count], dtype=torch.float64, device=accelerator.device), "sum")
        total, count = sums[0].item(), int(sums[1].item())
        record = {
            "step": step,
            "reverse_kl": total / max(count, 1),
            "tokens": count,
            "train_seconds": (began - self._start - self._eval_seconds) if self._start is not None else 0.0,
        }
        self.history.append(record)
        # The base class's log: a subclass's `log` (GRPOTrainer's, DistillationTrainer's) would flush the metrics it
        # is accumulating for the step into this entry. Logging clears `should_log`, which the step's own log needs.
        should_log = trainer.control.should_log
        Trainer.log(trainer, {"eval/reverse_kl": record["reverse_kl"], "eval/reverse_kl_tokens": float(count)})
        trainer.control.should_log = should_log
        if self.plot_path is not None and accelerator.is_main_process:
            os.makedirs(os.path.dirname(self.plot_path) or ".", exist_ok=True)
            plot_reverse_kl(self.history, self.plot_path)
        self._eval_seconds += time.perf_counter() - began
        self._last_step = step
        return record

    def on_train_begin(self, args, state, control, **kwargs):
        self._start, self._eval_seconds = time.perf_counter(), 0.0
        if self.at_start and self._last_step != state.global_step:
            self.evaluate(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        due = state.global_step % self.eval_steps == 0 or state.global_step >= state.max_steps
        if due and self._last_step != state.global_step:
            self.evaluate(state.global_step)

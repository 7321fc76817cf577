"""Helpers shared by the test modules (test modules import them from here, never from each other).

References computed here from plain logits in float64, the spies that record what a trainer hands to its loss, the
two-process launch of tests/distributed_run.py, small datasets and reward functions, and fresh random seeds. The tiny
offline models themselves are built by tests/tiny_models.py.
"""

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import requests
import torch
from datasets import Dataset
from tiny_models import make_image, make_text_dataset, make_text_model, make_tokenizer, save_tiny

from trl_gndpo import GNDPOConfig, GNDPOTrainer

TESTS = Path(__file__).parent
IMAGE_KEYS = ("pixel_values", "image_grid_thw", "mm_token_type_ids")


# Drawn anew each session from TRL_GNDPO_TEST_SEED, which conftest.py sets once in the main process, so that every
# pytest-xdist worker collects the same seeds; set it yourself to replay a session's seeds (the header shows it).
_SESSION_RANDOM = random.Random(os.environ.get("TRL_GNDPO_TEST_SEED"))


def fresh_seeds(n: int) -> list[int]:
    """`n` distinct seeds drawn anew each session (parametrize with them: a failing test's id shows its seed)."""
    return _SESSION_RANDOM.sample(range(2**31), n)


# ---------------------------------------------------------------------------------------------------------------------
# float64 references from plain logits


def completion_log_softmax(model, batch, temperature: float = 1.0):
    """log softmax(logits / temperature) at the completion positions, from one plain forward, in float64."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    extra = {k: batch[k] for k in IMAGE_KEYS if k in batch}
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention_mask, **extra).logits.double()
    length = batch["completion_ids"].size(1)
    return (logits[:, -length - 1 : -1] / temperature).log_softmax(-1)


def reference_logps(model, batch, temperature: float = 1.0):
    """log p(y_t) of the completion tokens (at `temperature`), from the model's plain logits, in float64."""
    logps = completion_log_softmax(model, batch, temperature)
    return logps.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)


def whiten(signal, mask, eps: float = 1e-8):
    """(signal - mean) / sqrt(var + eps) over the masked tokens (unbiased variance), zero elsewhere."""
    values = signal[mask.bool()]
    return (signal - values.mean()) / torch.sqrt(values.var() + eps) * mask


def expected_advantages(student_logps, teacher_logps, mask, config):
    """GNDPO's advantage from its definition (docs/method.md, arXiv 2606.09091), in float64, single process."""
    r = (teacher_logps - student_logps).clamp(-config.token_signal_clamp, config.token_signal_clamp)
    return r * mask if config.normalization_scope == "none" else whiten(r, mask, config.whitening_eps)


# ---------------------------------------------------------------------------------------------------------------------
# Spies on a trainer


def record_batches(trainer) -> list[dict]:
    """Keep every generation batch the trainer hands to its loss."""
    batches, generate = [], trainer._generate_and_score_completions

    def spy(inputs):
        batches.append(generate(inputs))
        return batches[-1]

    trainer._generate_and_score_completions = spy
    return batches


def record_references(trainer, teacher=None, full=False) -> list[tuple]:
    """Keep each generation batch with the student's and the teacher's float64 references at generation time:
    (batch, student, teacher), as log-probs of the sampled tokens or, with `full`, full log-softmax."""
    records, generate = [], trainer._generate_and_score_completions
    reference = completion_log_softmax if full else reference_logps

    def spy(inputs):
        batch = generate(inputs)
        student = trainer.accelerator.unwrap_model(trainer.model)
        frozen = teacher if teacher is not None else trainer.accelerator.unwrap_model(trainer.teacher_model)
        records.append((batch, reference(student, batch), reference(frozen, batch)))
        return batch

    trainer._generate_and_score_completions = spy
    return records


def routed_dataset(values, column="teacher") -> Dataset:
    dataset = make_text_dataset(8)
    return dataset.add_column(column, [values[i % len(values)] for i in range(len(dataset))])


def record(trainer, extra=None) -> list[dict]:
    """Each generation batch with its inputs and the float64 log-probs of the student (and `extra` models)."""
    records, generate = [], trainer._generate_and_score_completions

    def spy(inputs):
        batch = generate(inputs)
        student = trainer.accelerator.unwrap_model(trainer.model)
        entry = {"inputs": inputs, "batch": batch, "p": reference_logps(student, batch)}
        entry.update({name: reference_logps(model, batch) for name, model in (extra or {}).items()})
        records.append(entry)
        return batch

    trainer._generate_and_score_completions = spy
    return records


def snapshot(model):
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def changed(before, model, names=None):
    after = snapshot(model)
    return [n for n in (names or before) if not torch.equal(before[n], after[n])]


def assert_same_state(expected, actual, path: str = "") -> None:
    """Recursive exact equality of (optimizer / scheduler) state dicts holding tensors."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and torch.equal(actual, expected), path
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), path
        for key in expected:
            assert_same_state(expected[key], actual[key], f"{path}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), path
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_same_state(e, a, f"{path}[{i}]")
    else:
        assert actual == expected, path


# ---------------------------------------------------------------------------------------------------------------------
# Two processes (gloo on CPU)


def free_port() -> int:
    with socket.socket() as s:  # torchrun's static rendezvous hangs on --master_port 0
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(out: Path, *modes: str, env: dict | None = None) -> dict[str, list]:
    """The modes of distributed_run.py, in one two-process launch: {mode: [rank 0's records, rank 1's]}."""
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(TESTS / "distributed_run.py"), str(out), *modes]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {mode: [torch.load(out / f"{mode}-rank{r}.pt") for r in range(2)] for mode in modes}


def calls(records, name):
    """The records of one recorded function (distributed_run.py's `recording`)."""
    return [r for r in records if r["function"] == name]


# ---------------------------------------------------------------------------------------------------------------------
# A teacher served over HTTP by tests/teacher_server_app.py (conftest.py's `teacher_server`)


def served_teacher():
    """The tiny teacher the server serves, as tests/distributed_run.py builds its local one."""
    return make_text_model(seed=1, hidden_size=128)


def serve_teacher(directory: Path):
    """Save `served_teacher()` to `directory` and serve it; yields the server's URL, stops it after."""
    save_tiny(served_teacher(), make_tokenizer(), directory)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    app = str(TESTS / "teacher_server_app.py")
    process = subprocess.Popen([sys.executable, app, str(directory)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        yield f"http://127.0.0.1:{int(process.stdout.readline())}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def configure_server(url, **settings):
    requests.post(f"{url}/_test/configure", json=settings, timeout=30).raise_for_status()


def served_requests(url):
    return requests.get(f"{url}/_test/requests", timeout=30).json()["requests"]


# ---------------------------------------------------------------------------------------------------------------------
# Datasets, rewards, a text trainer

QUESTIONS = ["Colour?", "What colour is the square in this small picture, and where is it?", "Describe it briefly."]


def mixed_dataset(n: int = 8) -> Dataset:
    """Image prompts of different lengths, one with a system prompt."""
    prompts = []
    for i in range(n):
        turn = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        prompts.append(([{"role": "system", "content": "Answer in one word."}] if i % 4 == 1 else []) + turn)
    return Dataset.from_dict({"prompt": prompts, "image": [make_image(i) for i in range(n)]})


def unpadded(ids, mask):
    return [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]


def without_vision_spans(ids: list[int], start: int, end: int) -> list[int]:
    out, inside = [], False
    for token in ids:
        inside = inside or token == start
        if not inside:
            out.append(token)
        inside = inside and token != end
    return out


def length_reward(completions, **kwargs):
    return [float(len(str(c))) for c in completions]


def parity_reward(completions, **kwargs):
    """'Correct' when the completion text has an even number of characters: a mix within most groups."""
    return [float(len(str(c)) % 2 == 0) for c in completions]


def build_text_trainer(cpu_config_kwargs, config=None, **kwargs) -> GNDPOTrainer:
    """GNDPO on the tiny text student and teacher, `config` on the CPU config, `kwargs` replacing trainer arguments."""
    defaults = dict(
        model=make_text_model(seed=0),
        teacher_model=make_text_model(seed=1),
        args=GNDPOConfig(**cpu_config_kwargs(**(config or {}))),
        train_dataset=make_text_dataset(),
        processing_class=make_tokenizer(),
    )
    return GNDPOTrainer(**{**defaults, **kwargs})


def keep_generation_batches(monkeypatch) -> list[dict]:
    """A list that receives a copy of every batch GRPOTrainer's own `_generate_and_score_completions` returns (before
    GNDPO's part), for one test."""
    from trl import GRPOTrainer

    kept, original = [], GRPOTrainer._generate_and_score_completions

    def generate_once(self, inputs):
        batch = original(self, inputs)
        kept.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        return batch

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", generate_once)
    return kept


def text_trainer(cpu_config_kwargs, reward_funcs=None, **overrides):
    """`build_text_trainer` with `reward_funcs`, the teacher's tokenizer given, and `overrides` on the CPU config."""
    return build_text_trainer(cpu_config_kwargs, overrides, reward_funcs=reward_funcs,
                              teacher_processing_class=make_tokenizer())  # fmt: skip

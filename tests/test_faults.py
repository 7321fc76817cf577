"""Killed mid-run, nothing lost (issue 22): a training process killed with SIGKILL during a step or while a checkpoint
is being written resumes with `resume_from_checkpoint=True` to the uninterrupted run's exact end state.

Each case trains tiny models (CPU, one thread, float32) for 4 steps with a checkpoint every 2. The killed run is a
real child process (forked from the test process, so it costs no second import of torch, transformers and peft) that
kills itself with SIGKILL at a fixed point, which makes the kill reproducible: inside the loss of a step, or in the
middle of a checkpoint save (right after the weights, or right after `trainer_state.json`, the last file Trainer
writes, before GNDPO's own files). The parent then builds a fresh trainer on fresh models, resumes, and compares
with an uninterrupted run: final weights, optimizer state (AdamW moments and step counts), LR scheduler and every
logged value, each bit-equal (`torch.equal`; one thread, the same ops in the same order).

A save interrupted half-way leaves a newest `checkpoint-N` that Trainer's `get_last_checkpoint` would pick; GNDPO
skips it with a warning naming it (tests/test_faults.py::test_resume_skips_an_incomplete_newest_checkpoint).
Two processes: tests/test_faults.py::test_a_killed_rank_stops_the_other_within_a_timeout.
"""

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from helpers import assert_same_state, free_port
from peft import LoraConfig
from tiny_models import (
    cpu_grpo_kwargs,
    make_image_dataset,
    make_text_dataset,
    make_text_model,
    make_tokenizer,
    make_vlm,
)
from transformers import TrainerState
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from trl_gndpo import GNDPOConfig, GNDPOTrainer
from trl_gndpo.resume import COMPLETE_MARKER

TESTS = Path(__file__).parent
MAX_STEPS, SAVE_STEPS = 4, 2
STOP_TIMEOUT = 120  # seconds rank 0 may take to fail once rank 1 is dead


def build(kind: str, output_dir: Path, **overrides) -> GNDPOTrainer:
    """A trainer on fresh tiny models (same seeds every call): `kind` is text, lora, vgs (a Qwen2-VL student with VGS
    and a measured eta) or teachers (two teachers routed by a `teacher` column)."""
    options = {"max_steps": MAX_STEPS, "save_strategy": "steps", "save_steps": SAVE_STEPS, "max_completion_length": 6}
    if kind == "vgs":
        options.update(visual_gradient_steering=True, vgs_eta_measure_steps=1)
    config = GNDPOConfig(**cpu_grpo_kwargs(output_dir=str(output_dir), **{**options, **overrides}))
    extra = {}
    if kind == "vgs":
        (student, processor), (teacher, _) = make_vlm("qwen2_vl", 0), make_vlm("qwen2_vl", 1, 128)
        dataset = make_image_dataset(8)
    else:
        student, processor, dataset = make_text_model(seed=0), make_tokenizer(), make_text_dataset(8)
        teacher = make_text_model(seed=1, hidden_size=128)
    if kind == "lora":
        extra["peft_config"] = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False
        )
    if kind == "teachers":
        teacher = {"a": teacher, "b": make_text_model(seed=2, num_hidden_layers=3)}
        dataset = dataset.add_column("teacher", ["a", "b"] * 4)
    return GNDPOTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=dataset,
        processing_class=processor,
        **extra,
    )


def kill_in_step(trainer, step: int) -> None:
    """SIGKILL inside the loss of optimizer step `step` (1-based), after its generation batch was scored."""
    compute_loss = trainer._compute_loss

    def killing(model, inputs):
        if trainer.state.global_step == step - 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return compute_loss(model, inputs)

    trainer._compute_loss = killing


def kill_in_save(trainer, step: int, after: str) -> None:
    """SIGKILL while `checkpoint-{step}` is written: right after its `weights`, or after its `trainer_state`."""
    if after == "weights":
        save_model = trainer.save_model

        def killing(*args, **kwargs):
            save_model(*args, **kwargs)
            if trainer.state.global_step == step:
                os.kill(os.getpid(), signal.SIGKILL)

        trainer.save_model = killing
    else:  # the child process dies: patching the class here touches no other test
        save_to_json = TrainerState.save_to_json

        def killing(state, path):
            save_to_json(state, path)
            if state.global_step == step:
                os.kill(os.getpid(), signal.SIGKILL)

        TrainerState.save_to_json = killing


def kill_after_rotation(trainer) -> None:
    """SIGKILL right after Trainer deleted a checkpoint over `save_total_limit`."""
    rmtree = shutil.rmtree

    def killing(path, *args, **kwargs):
        rmtree(path, *args, **kwargs)
        if Path(path).name.startswith("checkpoint-"):
            os.kill(os.getpid(), signal.SIGKILL)

    shutil.rmtree = killing  # the child process dies: patching the module here touches no other test


def run_killed(kind: str, output_dir: Path, kill, resume: bool = False, timeout: float = 300, **overrides) -> None:
    """Train `kind` (`overrides`: its config's) in a child process that `kill(trainer)` arranges to die by SIGKILL;
    fail unless it does."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 1
        try:
            trainer = build(kind, output_dir, **overrides)
            kill(trainer)
            trainer.train(resume_from_checkpoint=True if resume else None)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the {kind} run was not killed within {timeout} s")
        time.sleep(0.05)
    status = done[1]
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"the {kind} run ended with {status}"


def end_state(trainer) -> dict:
    student = trainer.accelerator.unwrap_model(trainer.model)
    return {
        "weights": {n: p.detach().clone() for n, p in student.named_parameters()},
        "optimizer": trainer.optimizer.state_dict(),
        "lr_scheduler": trainer.lr_scheduler.state_dict(),
        "log": [h for h in trainer.state.log_history if "train_runtime" not in h],  # not the timing summary
        "global_step": trainer.state.global_step,
    }


def same_value(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def assert_same_end_state(expected: dict, actual: dict) -> None:
    assert actual["global_step"] == expected["global_step"] == MAX_STEPS
    assert [h["step"] for h in actual["log"]] == [h["step"] for h in expected["log"]], "logged steps differ"
    for e, a in zip(expected["log"], actual["log"], strict=True):
        assert e.keys() == a.keys(), f"step {e['step']} logs other values"
        differing = [k for k in e if k != "step_time" and not same_value(e[k], a[k])]  # step_time: wall-clock time
        assert not differing, f"step {e['step']} logs other {differing}"
    assert expected["weights"].keys() == actual["weights"].keys()
    differing = [n for n, w in expected["weights"].items() if not torch.equal(w, actual["weights"][n])]
    assert not differing, f"weights differ after resuming: {differing[:5]}"
    assert_same_state(expected["optimizer"], actual["optimizer"], "optimizer")
    assert_same_state(expected["lr_scheduler"], actual["lr_scheduler"], "lr_scheduler")


def resume(kind: str, output_dir: Path) -> tuple[dict, str]:
    """Resume `kind` in this process with `resume_from_checkpoint=True`; its end state and the warnings logged."""
    trainer = build(kind, output_dir)
    logger = logging.get_logger("trl_gndpo.resume")
    with CaptureLogger(logger) as captured:
        trainer.train(resume_from_checkpoint=True)
    return end_state(trainer), captured.out


def uninterrupted(kind: str, output_dir: Path) -> dict:
    trainer = build(kind, output_dir)
    trainer.train()
    return end_state(trainer)


def test_text_run_killed_in_a_step_then_in_a_save_resumes_exactly(tmp_path):
    """Killed in step 3 (after checkpoint-2), resumed and killed again while checkpoint-4 is written (after its
    weights, before its optimizer): the final resume skips the half-written checkpoint-4, naming it, and ends where
    the uninterrupted run ends."""
    run = tmp_path / "killed"
    run_killed("text", run, lambda t: kill_in_step(t, 3))
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    run_killed("text", run, lambda t: kill_in_save(t, 4, after="weights"), resume=True)
    assert (run / "checkpoint-4" / "model.safetensors").is_file()
    assert (
        not (run / "checkpoint-4" / COMPLETE_MARKER).exists() and not (run / "checkpoint-4" / "optimizer.pt").exists()
    )
    resumed, warnings = resume("text", run)
    assert f"Skipping {run / 'checkpoint-4'}" in warnings and f"Resuming from {run / 'checkpoint-2'}" in warnings
    assert_same_end_state(uninterrupted("text", tmp_path / "full"), resumed)
    assert (run / "checkpoint-4" / COMPLETE_MARKER).is_file(), "the re-saved checkpoint is complete"


@pytest.mark.parametrize(
    "kind, kill",
    [
        pytest.param("lora", lambda t: kill_in_save(t, 4, after="weights"), id="lora-killed-in-save"),
        pytest.param("teachers", lambda t: kill_in_step(t, 4), id="two-teachers-killed-in-step"),
        pytest.param(
            "vgs", lambda t: kill_in_save(t, 4, after="trainer_state"), id="vgs-killed-in-save", marks=pytest.mark.slow
        ),
    ],
)
def test_killed_run_resumes_exactly(tmp_path, kind, kill):
    """LoRA (adapter checkpoints), two teachers, and VGS on a Qwen2-VL student (full fine-tune, whose checkpoint keys
    need the model's key conversion) with its measured eta in `vgs_eta.json`, written after `trainer_state.json`:
    killed between the two, checkpoint-4 looks complete to Trainer but has no eta (resuming from it failed: "has no
    vgs_eta.json"); GNDPO resumes from checkpoint-2."""
    run = tmp_path / "killed"
    run_killed(kind, run, kill)
    resumed, _ = resume(kind, run)
    assert_same_end_state(uninterrupted(kind, tmp_path / "full"), resumed)


def test_a_kill_after_save_total_limit_deleted_the_older_checkpoint_leaves_a_complete_one(tmp_path):
    """With `save_total_limit=1`, Trainer deletes checkpoint-2 at the end of checkpoint-4's save; GNDPO holds that back
    until checkpoint-4 is marked complete, so a kill right after the deletion resumes from checkpoint-4 (it used to
    leave only an unmarked checkpoint-4, and no checkpoint to resume from)."""
    run = tmp_path / "killed"
    run_killed("text", run, kill_after_rotation, save_total_limit=1)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-4"]
    assert (run / "checkpoint-4" / COMPLETE_MARKER).is_file()
    resumed, warnings = resume("text", run)
    assert "Skipping" not in warnings
    assert_same_end_state(uninterrupted("text", tmp_path / "full"), resumed)


def test_resume_skips_an_incomplete_newest_checkpoint(tmp_path):
    """Without any complete checkpoint, `resume_from_checkpoint=True` fails naming the folders, not resuming from a
    half-written one; a checkpoint saved again over an older one is unmarked while it is rewritten."""
    run = tmp_path / "killed"
    run_killed("text", run, lambda t: kill_in_save(t, 2, after="trainer_state"))
    assert (run / "checkpoint-2" / "trainer_state.json").is_file()  # complete by Trainer's files, not by GNDPO's
    with pytest.raises(ValueError, match=rf"No complete checkpoint in {run}: {run / 'checkpoint-2'} lack"):
        build("text", run).train(resume_from_checkpoint=True)


@pytest.mark.slow
def test_a_killed_rank_stops_the_other_within_a_timeout(tmp_path):
    """Two processes started without an agent that would clean up (as a scheduler starts them, one `python` per
    rank): rank 1 is killed with SIGKILL inside step 2. Rank 0, waiting for it in a collective, must fail with an
    error naming the lost peer instead of waiting forever, and checkpoint-1 (saved by both) stays complete."""
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "MASTER_ADDR": "127.0.0.1"}
    env.update(MASTER_PORT=str(free_port()), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    command = [sys.executable, str(TESTS / "distributed_run.py"), str(tmp_path), "killed"]
    ranks = [
        subprocess.Popen(
            command,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    try:
        ranks[1].wait(timeout=600)
        killed_at = time.monotonic()
        output0 = ranks[0].communicate(timeout=STOP_TIMEOUT)[0]
        stopped_after = time.monotonic() - killed_at
        outputs = [output0, ranks[1].communicate()[0]]
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    print(f"rank 0 stopped {stopped_after:.1f} s after rank 1 was killed")
    assert stopped_after < STOP_TIMEOUT
    assert ranks[1].returncode == -signal.SIGKILL, outputs[1][-3000:]
    assert ranks[0].returncode not in (0, None), outputs[0][-3000:]
    assert "Connection closed by peer" in outputs[0] or "Connection reset by peer" in outputs[0], outputs[0][-3000:]
    assert (tmp_path / "killed" / "checkpoint-1" / COMPLETE_MARKER).is_file()
    assert {p.name for p in (tmp_path / "killed" / "checkpoint-1").glob("rng_state_*.pth")} == {
        "rng_state_0.pth",
        "rng_state_1.pth",
    }


def test_every_test_named_in_the_faults_page_exists():
    root = TESTS.parent
    page = (root / "docs" / "faults.md").read_text()
    named = re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", page)
    assert len(named) >= 15
    for path, name in named:
        assert re.search(rf"^def {name}\(", (root / path).read_text(), re.M), f"{path}::{name} is named in faults.md"
    rows = [line for line in page.splitlines() if line.startswith("| ") and not line.startswith(("| Fault", "| Case"))]
    assert all("`tests/" in row for row in rows if not set(row) <= set("|- ")), "every row names its test"

"""Checkpoint and resume: an interrupted GNDPO run resumed from its checkpoint must equal the uninterrupted run.

Each case trains tiny text models (full fine-tune, deterministic CPU) three times with the same seeds:

* ``full``: ``max_steps=4`` without interruption (saving every ``save_steps`` like the others);
* ``interrupted``: the same 4-step configuration, stopped by a callback right after the checkpoint at ``stop``
  is written. Stopping a 4-step run (rather than running ``max_steps=stop``) is what a real interruption looks
  like: the checkpoint holds a 4-step LR schedule and ``max_steps=4`` in its trainer state, so a wrong schedule
  or epoch/data position after resuming shows up;
* ``resumed``: a NEW trainer on fresh models, ``train(resume_from_checkpoint=<checkpoint-stop>)``.

The generation step is wrapped to record, for every generation batch, the global step, the dataset rows it used
(an ``idx`` column), the sampled completion ids and the advantages. ``interrupted + resumed`` must reproduce the
records of ``full`` exactly, and ``resumed`` must end with bit-identical student parameters, optimizer state
(AdamW moments and step counts), LR scheduler state and logged learning rates.

Bit-exactness (``torch.equal``) is justified: one CPU thread, float32, the same ops in the same order, and the
checkpoint stores float32 weights and the CPU/python/numpy RNG states, so no tolerance is needed.

The cases cover a resume in the middle of the first epoch, exactly at an epoch boundary and inside the second
epoch (the trainer's ``RepeatSampler`` draws a new permutation each epoch), the constant (GNDPO default) and the
linear LR schedule, and GRPO's generation buffer: ``gradient_accumulation_steps=2`` (one generation per optimizer
step, split into two buffered micro-batches) and ``steps_per_generation=2`` with one micro-batch per step (one
generation buffered across two optimizer steps, the checkpoint falling between two generations).
"""

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_same_state
from tiny_models import (
    VLM_FAMILIES,
    cpu_grpo_kwargs,
    make_image_dataset,
    make_text_dataset,
    make_text_model,
    make_tokenizer,
    make_vlm,
)
from transformers import TrainerCallback

from trl_gndpo import GNDPOConfig, GNDPOTrainer

MAX_STEPS = 4
LINEAR_LRS = [1e-2, 7.5e-3, 5e-3, 2.5e-3]  # learning_rate=1e-2 decayed linearly over 4 steps, no warmup


class StopAfterCheckpoint(TrainerCallback):
    """Simulates an interruption: stop training right after the checkpoint of ``step`` has been written."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def make_trainer(output_dir, num_prompts: int, family: str = "text", **overrides) -> tuple[GNDPOTrainer, list[dict]]:
    """A GNDPO trainer on fresh tiny models (same seeds every call) and the list its generation batches go to.

    `family`: "text" (Qwen2) or a Qwen-VL family (one image per prompt)."""
    kwargs = {"save_strategy": "steps", "save_steps": 2, **overrides}
    config = GNDPOConfig(
        **cpu_grpo_kwargs(output_dir=str(output_dir), max_steps=MAX_STEPS, max_completion_length=6, **kwargs)
    )
    if family == "text":
        student, processor = make_text_model(seed=0), make_tokenizer()
        teacher, teacher_processor = make_text_model(seed=1, hidden_size=128), make_tokenizer()
        dataset = make_text_dataset(num_prompts)
    else:
        (student, processor), (teacher, teacher_processor) = make_vlm(family, 0), make_vlm(family, 1, 128)
        dataset = make_image_dataset(num_prompts)
    dataset = dataset.add_column("idx", list(range(num_prompts)))  # passed through to the generation batch
    trainer = GNDPOTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=dataset,
        processing_class=processor,
        teacher_processing_class=teacher_processor,
    )
    records = []
    generate = trainer._generate_and_score_completions

    def recording_generate(inputs):
        batch = generate(inputs)
        records.append(
            {
                "step": trainer.state.global_step,
                "rows": [example["idx"] for example in inputs],
                "completion_ids": batch["completion_ids"].clone(),
                "advantages": batch["advantages"].clone(),
            }
        )
        return batch

    trainer._generate_and_score_completions = recording_generate
    return trainer, records


def assert_same_records(expected: list[dict], actual: list[dict]) -> None:
    assert [r["step"] for r in actual] == [r["step"] for r in expected]
    for e, a in zip(expected, actual, strict=True):
        assert a["rows"] == e["rows"], f"data order differs at step {e['step']}"
        assert torch.equal(a["completion_ids"], e["completion_ids"]), f"completions differ at step {e['step']}"
        assert torch.equal(a["advantages"], e["advantages"]), f"advantages differ at step {e['step']}"


def logged_learning_rates(trainer) -> list[float]:
    return [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]


def epoch_rows(records: list[dict], steps_per_epoch: int, epoch: int) -> list[int]:
    return [row for r in records if r["step"] // steps_per_epoch == epoch for row in r["rows"]]


@pytest.mark.parametrize(
    "num_prompts, stop, overrides",
    [
        pytest.param(8, 2, {}, id="mid-epoch-constant-lr"),
        pytest.param(8, 2, {"lr_scheduler_type": "linear"}, id="mid-epoch-linear-lr"),
        pytest.param(4, 2, {"lr_scheduler_type": "linear"}, id="epoch-boundary-linear-lr"),
        pytest.param(4, 3, {"save_steps": 3}, id="inside-second-epoch"),
        pytest.param(
            16, 2, {"gradient_accumulation_steps": 2, "lr_scheduler_type": "linear"}, id="grad-accum-2-mid-epoch"
        ),
        pytest.param(
            8, 2, {"gradient_accumulation_steps": 2, "lr_scheduler_type": "linear"}, id="grad-accum-2-epoch-boundary"
        ),
        pytest.param(8, 2, {"steps_per_generation": 2}, id="generation-buffered-over-2-steps"),
    ],
)
def test_resume_matches_uninterrupted_run(tmp_path, num_prompts, stop, overrides):
    full, full_records = make_trainer(tmp_path / "full", num_prompts, **overrides)
    full.train()
    assert full.state.global_step == MAX_STEPS

    interrupted, interrupted_records = make_trainer(tmp_path / "resumed", num_prompts, **overrides)
    interrupted.add_callback(StopAfterCheckpoint(stop))
    interrupted.train()
    assert interrupted.state.global_step == stop
    checkpoint = tmp_path / "resumed" / f"checkpoint-{stop}"
    saved_state = json.loads(Path(checkpoint, "trainer_state.json").read_text())
    assert saved_state["global_step"] == stop and saved_state["max_steps"] == MAX_STEPS
    del interrupted  # nothing of the interrupted trainer may leak into the resumed one

    resumed, resumed_records = make_trainer(tmp_path / "resumed", num_prompts, **overrides)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == MAX_STEPS
    assert resumed_records and all(r["step"] >= stop for r in resumed_records), "the resumed run restarted"

    # Generation side: one generation per generation batch, same rows, completions and advantages.
    generations_per_step = full.args.gradient_accumulation_steps / full.args.steps_per_generation
    assert len(full_records) == MAX_STEPS * generations_per_step
    assert_same_records(full_records, interrupted_records + resumed_records)

    # Optimizer side: parameters, AdamW state, LR schedule position and epoch.
    full_params, resumed_params = dict(full.model.named_parameters()), dict(resumed.model.named_parameters())
    assert full_params.keys() == resumed_params.keys()
    differing = [name for name in full_params if not torch.equal(full_params[name], resumed_params[name])]
    assert not differing, f"student parameters differ after resuming: {differing[:5]}"
    assert_same_state(full.optimizer.state_dict(), resumed.optimizer.state_dict(), "optimizer")
    assert_same_state(full.lr_scheduler.state_dict(), resumed.lr_scheduler.state_dict(), "lr_scheduler")
    assert resumed.lr_scheduler.get_last_lr() == full.lr_scheduler.get_last_lr()
    assert logged_learning_rates(resumed) == logged_learning_rates(full)
    if overrides.get("lr_scheduler_type") == "linear":  # the resumed steps continue the 4-step decay
        assert logged_learning_rates(resumed) == pytest.approx(LINEAR_LRS)
    assert resumed.state.epoch == full.state.epoch

    # The cases that resume in the second epoch only test something if its order differs from the first epoch's.
    steps_per_epoch = len(full.get_train_dataloader()) // full.args.gradient_accumulation_steps
    if stop >= steps_per_epoch:
        assert epoch_rows(full_records, steps_per_epoch, 1) != epoch_rows(full_records, steps_per_epoch, 0)


@pytest.mark.slow
@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_vision_language_full_finetune_resume_restores_every_trained_tensor(tmp_path, family):
    """Qwen2-VL / Qwen2.5-VL checkpoints store their weights under the checkpoint layout (`model.embed_tokens`,
    `visual.*`) that transformers 5.x loads back into `model.language_model.*` / `model.visual.*` only through the
    model's key conversion; a resume that misses it silently restores just `lm_head` (upstream transformers#43701)."""
    initial = dict(make_vlm(family, 0)[0].named_parameters())
    full, _ = make_trainer(tmp_path / "full", 8, family)
    full.train()
    interrupted, _ = make_trainer(tmp_path / "resumed", 8, family)
    interrupted.add_callback(StopAfterCheckpoint(2))
    interrupted.train()
    del interrupted
    resumed, _ = make_trainer(tmp_path / "resumed", 8, family)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))

    full_params, resumed_params = dict(full.model.named_parameters()), dict(resumed.model.named_parameters())
    trained = [name for name, p in full_params.items() if not torch.equal(p, initial[name])]
    assert len(trained) > len(full_params) // 2, "the test needs most tensors to train"
    differing = [name for name in full_params if not torch.equal(full_params[name], resumed_params[name])]
    assert not differing, f"{len(differing)} of {len(trained)} trained tensors were not restored: {differing[:5]}"
    assert_same_state(full.optimizer.state_dict(), resumed.optimizer.state_dict(), "optimizer")

"""What makes a resumed GNDPO run continue exactly where the uninterrupted one would be: the student's weights
(whatever key layout their checkpoint uses) and the data order; and a warning naming each part of the training state
that a checkpoint lacks, which `Trainer` would otherwise start afresh without a word."""

import json
import os
import re
from contextlib import contextmanager
from unittest import mock

import torch
from transformers import PreTrainedModel
from transformers.trainer import OPTIMIZER_NAME, OPTIMIZER_NAME_BIN, SCHEDULER_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, logging
from trl.trainer.utils import RepeatSampler

logger = logging.get_logger(__name__)

_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_FULL_WEIGHTS = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)


def has_full_weights(folder: str, model) -> bool:
    """A checkpoint of a whole `PreTrainedModel` (not an adapter, not an engine's own shards)."""
    return isinstance(model, PreTrainedModel) and any(os.path.isfile(os.path.join(folder, n)) for n in _FULL_WEIGHTS)


def load_full_weights(model: PreTrainedModel, folder: str) -> None:
    """Load a full-model checkpoint into `model` through `from_pretrained`, and fail unless every tensor matches.

    `Trainer` loads the raw state dict with `strict=False`, which skips the key conversion that transformers 5 applies
    when it loads a model: a Qwen2-VL / Qwen2.5-VL checkpoint stores `model.embed_tokens.*` / `visual.*` while the live
    model has `model.language_model.*` / `model.visual.*`, so a resume restored only `lm_head` and kept every other
    trained tensor at its initial value, with a warning as the only sign (upstream transformers#43701). Loading
    through `from_pretrained` applies the model's own conversion; it holds a second copy of the weights in CPU memory
    while it copies them in.
    """
    dtype = next(model.parameters()).dtype
    saved = type(model).from_pretrained(folder, dtype=dtype, device_map="cpu").state_dict()
    missing, unexpected = model.load_state_dict(saved, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"The checkpoint {folder} does not match the student: missing {missing[:5]}, unexpected {unexpected[:5]}. "
            "Resume with the model (and model class) that wrote it."
        )


def warn_missing_checkpoint_parts(trainer, checkpoint: str | None) -> None:
    """Warn, naming each file and what starts afresh, when the checkpoint lacks part of the training state.

    `Trainer` resumes from such a checkpoint with only an info-level note (RNG) or none at all (optimizer, scheduler);
    it loads the optimizer and the scheduler only together: if either file is missing, both restart. (A missing
    `trainer_state.json` already fails in `Trainer.train` with a `FileNotFoundError` naming it.)
    Under DeepSpeed the optimizer and scheduler live in DeepSpeed's own folder and are not checked here.
    """
    if checkpoint is None:
        return
    args, missing = trainer.args, []

    def absent(name: str) -> bool:
        return not os.path.isfile(os.path.join(checkpoint, name))

    if not trainer.is_deepspeed_enabled:
        has_optimizer = (
            not absent(OPTIMIZER_NAME)
            or not absent(OPTIMIZER_NAME_BIN)
            or any(
                "optimizer" in entry and os.path.isdir(os.path.join(checkpoint, entry))
                for entry in os.listdir(checkpoint)
            )
        )  # FSDP saves a folder
        files = [OPTIMIZER_NAME] * (not has_optimizer) + [SCHEDULER_NAME] * absent(SCHEDULER_NAME)
        if files:
            missing.append(
                f"{' and '.join(files)} (the optimizer's moments and the learning-rate schedule restart from step 0; "
                "Trainer loads neither unless both are there)"
            )
    rng = "rng_state.pth" if args.world_size <= 1 else f"rng_state_{args.process_index}.pth"
    if absent(rng):
        missing.append(f"{rng} (random states start fresh: sampling differs from the uninterrupted run)")
    if missing:
        logger.warning(
            f"Resuming from {checkpoint}, which lacks " + "; ".join(missing) + ". The run continues with those parts "
            "reset; resume from a complete checkpoint (saved without save_only_model) for an exact continuation."
        )


class EpochRepeatSampler(RepeatSampler):
    """TRL's `RepeatSampler` with `set_epoch`, so that a run resumed from a checkpoint keeps the epoch's data order.

    `RepeatSampler` seeds its generator once and draws a new permutation on every pass, so a trainer resumed in epoch
    `e >= 1` (with a fresh sampler) would replay epoch 0's order. `Trainer` calls `set_epoch(epoch)` before each
    epoch: re-seed and skip the earlier epochs' permutations, so the order is the uninterrupted run's.
    """

    @classmethod
    def like(cls, sampler: RepeatSampler) -> "EpochRepeatSampler":
        return cls(
            sampler.data_source,
            mini_repeat_count=sampler.mini_repeat_count,
            batch_size=sampler.batch_size,
            repeat_count=sampler.repeat_count,
            shuffle=sampler.shuffle,
            seed=sampler.seed,
        )

    def set_epoch(self, epoch: int) -> None:
        if self.shuffle and self.seed is not None:
            self.generator.manual_seed(self.seed)
            for _ in range(epoch):
                torch.randperm(self.num_samples, generator=self.generator)


# ---------------------------------------------------------------------------------------------------------------------
# Crash-safe checkpoints. transformers 5.x's `Trainer._save_checkpoint` writes straight into `checkpoint-N` (weights,
# optimizer, scheduler, RNG states, then `trainer_state.json`, none through a temporary name), and
# `get_last_checkpoint` returns the highest-numbered `checkpoint-N` folder whatever it holds: a process killed while
# saving leaves a half-written newest folder that `resume_from_checkpoint=True` picks. GNDPO marks a checkpoint
# complete once every process has written its part, and resumes only from marked folders.

COMPLETE_MARKER = "gndpo_checkpoint.json"
# Arguments a resumed run must share with the checkpoint: the data order (Trainer skips the batches already trained,
# counted in generation batches of this size and grouping) and the teachers that score it.
_DATA_ORDER_ARGUMENTS = ("num_generations", "generation_batch_size", "steps_per_generation", "seed")
_TEACHER_ARGUMENTS = ("teacher_model_name_or_path", "teacher_models", "teacher_model_server_url")


def saved_arguments(args) -> dict:
    """The arguments a checkpoint records for `check_resumed_arguments` (a JSON dict; no server URL is written: a
    flag says whether one was set)."""
    saved = {name: getattr(args, name) for name in (*_DATA_ORDER_ARGUMENTS, *_TEACHER_ARGUMENTS[:2])}
    saved["teacher_model_server_url"] = args.teacher_model_server_url is not None
    return json.loads(json.dumps(saved, default=str))  # as read back from the file


def unmark_checkpoint(folder: str) -> None:
    """Before a save into `folder`: drop an earlier marker, so that a folder overwritten in part is never complete."""
    if os.path.isfile(os.path.join(folder, COMPLETE_MARKER)):
        os.remove(os.path.join(folder, COMPLETE_MARKER))


def mark_checkpoint_complete(folder: str, step: int, args) -> None:
    """Write the completion marker (atomically: a temporary file renamed over it) once `folder` is fully saved."""
    path = os.path.join(folder, COMPLETE_MARKER)
    with open(path + ".tmp", "w") as f:
        json.dump({"global_step": step, "arguments": saved_arguments(args)}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


@contextmanager
def rotation_after_marking():
    """Trainer deletes the checkpoints over `save_total_limit` at the end of its save, before GNDPO marks the new one
    complete: a kill in between (with `save_total_limit=1`, or while other ranks still write their parts) would leave
    no complete checkpoint. Inside, Trainer's call to `rotate_checkpoints` is held back (the saved arguments stay
    untouched); the context gives `rotate()`, which makes that call, for after the marker is written."""
    import transformers.trainer

    held = []
    with mock.patch.object(transformers.trainer, "rotate_checkpoints", lambda **kwargs: held.append(kwargs)):
        yield lambda: [rotate_checkpoints(**kwargs) for kwargs in held]


def is_complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, COMPLETE_MARKER))


def last_complete_checkpoint(output_dir: str) -> str:
    """What `resume_from_checkpoint=True` resumes from: the newest `checkpoint-N` with GNDPO's completion marker.

    Newer folders without it (a save that was interrupted) are skipped with a warning naming them. Fails, saying why,
    when no folder is complete.
    """
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    steps = {int(m.group(1)): os.path.join(output_dir, n) for n in names if (m := _CHECKPOINT.match(n))}
    folders = [steps[step] for step in sorted(steps, reverse=True) if os.path.isdir(steps[step])]
    incomplete = []
    for folder in folders:
        if is_complete(folder):
            if incomplete:
                logger.warning(
                    f"Skipping {', '.join(incomplete)}: no {COMPLETE_MARKER}, so the save was interrupted (or the "
                    f"folder was not written by GNDPOTrainer). Resuming from {folder}, the newest complete checkpoint."
                )
            return folder
        incomplete.append(folder)
    if incomplete:
        raise ValueError(
            f"No complete checkpoint in {output_dir}: {', '.join(incomplete)} lack {COMPLETE_MARKER}, which "
            "GNDPOTrainer writes once a save has finished (an interrupted save, or a checkpoint written by another "
            "trainer). To resume from one anyway, pass its path as resume_from_checkpoint."
        )
    raise ValueError(f"No valid checkpoint found in output directory ({output_dir})")


def check_resumed_arguments(args, checkpoint: str) -> None:
    """Refuse a resume whose data order differs from the checkpoint's; warn when its teachers differ.

    Compares with the arguments GNDPO records in the checkpoint's completion marker (`training_args.bin` holds them
    too, but only as a pickle, which loading would let run code; Trainer itself loads none). A checkpoint without the
    marker is not checked, with a warning.
    """
    path = os.path.join(checkpoint, COMPLETE_MARKER)
    if not os.path.isfile(path):
        logger.warning(
            f"Resuming from {checkpoint}, which has no {COMPLETE_MARKER}: it may be incomplete (an interrupted save), "
            "and its arguments cannot be compared with this run's."
        )
        return
    with open(path) as f:
        saved = json.load(f)["arguments"]
    current = saved_arguments(args)

    def differing(names):
        return [
            f"{n} (checkpoint: {saved.get(n)!r}, now: {current[n]!r})" for n in names if saved.get(n) != current[n]
        ]

    if data_order := differing(_DATA_ORDER_ARGUMENTS):
        raise ValueError(
            f"Resuming from {checkpoint} with other arguments than it was trained with: {'; '.join(data_order)}. "
            "The resumed run skips the batches already trained by counting them, so these change which prompts it "
            "trains on and how they are grouped: resume with the checkpoint's values, or start a new run in another "
            "output_dir."
        )
    if teachers := differing(_TEACHER_ARGUMENTS):
        logger.warning(
            f"Resuming from {checkpoint} with another teacher than it was trained with: {'; '.join(teachers)}. The "
            "run continues; the steps after it distil another teacher."
        )

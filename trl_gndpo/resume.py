"""What makes a resumed GNDPO run continue exactly where the uninterrupted one would be: the student's weights
(whatever key layout their checkpoint uses) and the data order; and a warning naming each part of the training state
that a checkpoint lacks, which `Trainer` would otherwise start afresh without a word."""

import os

import torch
from transformers import PreTrainedModel
from transformers.trainer import OPTIMIZER_NAME, OPTIMIZER_NAME_BIN, SCHEDULER_NAME
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, logging
from trl.trainer.utils import RepeatSampler

logger = logging.get_logger(__name__)

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

"""What makes a resumed GNDPO run continue exactly where the uninterrupted one would be: the data order."""

import torch
from trl.trainer.utils import RepeatSampler


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

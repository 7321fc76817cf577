"""The `gndpo/` token metrics of a generation batch (docs/metrics.md), each over every process's tokens: the trainer
hands in its tensors, these functions reduce them once and append to its metrics."""

import torch
from transformers.utils import logging

from . import functional

logger = logging.get_logger(__name__)


def log_token_statistics(
    metrics, mask, finite, valid, scores, signal, signal_moments, advantages, args, accelerator
) -> tuple[float, float, float]:
    """Log-ratio, log-probs, signal, clamp share and advantage statistics over the valid tokens (one sum and one max
    reduction); returns the counts of completion tokens, finite ones and valid ones, for the invalid-batch guard.

    `signal_moments`: the mean and unbiased variance of the token signal, as the whitening used them.
    """

    def valid_sum(x: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, x, 0).to(torch.float64).sum()

    student_logps, teacher_logps = scores["student"], scores["teacher"]
    sums = torch.stack(
        [
            valid_sum(student_logps - teacher_logps),
            valid_sum(teacher_logps),
            valid_sum(student_logps),
            valid_sum((signal.abs() >= args.token_signal_clamp).float()),
            mask.sum().to(torch.float64),
            finite.sum().to(torch.float64),
            *functional.masked_moments(advantages, valid),
        ]
    )
    kl, teacher, student, clamped, n_mask, n_finite, *advantage_moments = accelerator.reduce(sums, reduction="sum")
    advantage_mean, advantage_var = functional.mean_and_unbiased_var(torch.stack(advantage_moments))
    abs_max = accelerator.reduce(torch.where(valid, advantages.abs(), 0).amax().to(torch.float64), "max")
    n = advantage_moments[0]
    counts = (n_mask.item(), n_finite.item(), n.item())
    if n_mask > 0:
        metrics["gndpo/nonfinite_frac"].append(((n_mask - n_finite) / n_mask).item())
        metrics["gndpo/valid_token_frac"].append((n / n_mask).item())
    if n == 0:  # nothing to average: the averages stay unlogged rather than read 0
        return counts
    signal_mean, signal_var = signal_moments
    metrics["gndpo/reverse_kl"].append((kl / n).item())
    metrics["gndpo/teacher_logp"].append((teacher / n).item())
    metrics["gndpo/student_logp"].append((student / n).item())
    metrics["gndpo/signal_mean"].append(signal_mean.item())
    metrics["gndpo/signal_std"].append(signal_var.sqrt().item())
    metrics["gndpo/clamped_frac"].append((clamped / n).item())
    metrics["gndpo/advantage_mean"].append(advantage_mean.item())
    metrics["gndpo/advantage_std"].append(advantage_var.sqrt().item())
    metrics["gndpo/advantage_abs_max"].append(abs_max.item())
    if n_finite < n_mask:
        logger.warning(f"GNDPO: {int(n_mask - n_finite)} completion tokens with a non-finite log-prob were masked.")
    return counts


def log_unaligned(metrics, completion_mask, placement, reduce_sum) -> None:
    """`gndpo/unaligned_token_frac`: the share of completion tokens (all processes) in spans that could not be
    aligned with the teacher's tokens (`cross_tokenizer_distillation`); they are masked, never given a zero signal."""
    counts = torch.stack([(placement.unaligned & completion_mask.bool()).sum(), completion_mask.sum()])
    unaligned, total = reduce_sum(counts.to(torch.float64)).tolist()
    if total > 0:
        metrics["gndpo/unaligned_token_frac"].append(unaligned / total)

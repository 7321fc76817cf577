"""Uni-OPD's steps on a generation batch, which need every completion's outcome reward: online correctness-aware
balancing of the responses, and margin calibration of the advantages (shift, greedy mask or prompt-group mask).

Plain functions over the rewards GRPOTrainer gathers from all processes (`_calculate_rewards`, passed in by the
trainer); the math is in `uniopd.py`. They log `uniopd/` metrics into the `metrics` dict they are given.
"""

from typing import NamedTuple

import torch

from . import uniopd


class Responses(NamedTuple):
    """Every completion of the generation batch, all processes: correct (outcome reward at least the threshold) and
    present (a valid token and a reward); `local`: this process's rows."""

    correct: torch.Tensor
    present: torch.Tensor
    local: slice


def responses(rewards, reward_weights, threshold: float, valid: torch.Tensor, accelerator) -> Responses:
    """Correctness and presence of every completion from the gathered `rewards` (completions x reward functions)."""
    total = (rewards * reward_weights.to(rewards.device)).nansum(1)
    present = accelerator.gather(valid.any(1)).bool() & ~torch.isnan(rewards).all(1)
    index = accelerator.process_index
    local = slice(index * len(valid), (index + 1) * len(valid))
    return Responses((total >= threshold).cpu(), present.cpu(), local)


def log_correct_frac(metrics, answers: Responses) -> None:
    correct, present = answers.correct, answers.present
    metrics["uniopd/correct_frac"].append((correct & present).sum().item() / max(present.sum().item(), 1))


def balanced_responses(answers: Responses, group_size: int, ratio: float, generator, metrics) -> torch.Tensor:
    """Uni-OPD online balancing: this process's rows to keep. Every process draws the same responses to drop (same
    `generator` seed, same gathered inputs)."""
    correct, present = answers.correct, answers.present
    keep = uniopd.balance_classes(correct, present, group_size, ratio, generator)
    log_correct_frac(metrics, answers)
    metrics["uniopd/balance_dropped_frac"].append((present & ~keep).sum().item() / max(present.sum().item(), 1))
    return keep[answers.local]


def calibrate_margins(advantages, valid, answers: Responses, group_size: int, args, accelerator, metrics):
    """Uni-OPD margin shift or mask on the normalized advantages, per prompt group or over the whole batch
    (`args.margin_*`); returns the calibrated advantages of this process's rows."""
    correct, present, local = answers
    if args.balance_ratio is None:  # else logged, before balancing, by `balanced_responses`
        log_correct_frac(metrics, answers)
    means, _ = uniopd.response_means(advantages, valid)
    means = accelerator.gather(means.float()).cpu()
    group = group_size if args.margin_scope == "group" else len(means)
    groups = (means, correct, present, group, args.margin_delta, args.margin_mode)
    if args.margin_calibration == "shift":
        shift, gap = uniopd.margin_shift(*groups, direction=args.margin_direction)
        after = means + shift
        advantages = advantages + shift[local].to(advantages)[:, None] * valid
    else:
        if args.margin_calibration == "group_mask":  # the paper: discard prompt groups below the margin
            keep, gap = uniopd.margin_group_mask(*groups)
        else:
            keep, gap = uniopd.margin_mask(*groups, min_retain_ratio=args.margin_min_retain_ratio)
        after, present = means, present & keep
        advantages = advantages * keep[local].to(advantages)[:, None]
    gap_after = uniopd.margin_gap(
        after.view(-1, group), correct.view(-1, group), present.view(-1, group), args.margin_mode
    )
    eligible, kept = ~torch.isnan(gap), ~torch.isnan(gap_after)  # a discarded group has no margin after
    metrics["uniopd/margin_before"].append(gap[eligible].mean().item() if eligible.any() else float("nan"))
    metrics["uniopd/margin_after"].append(gap_after[kept].mean().item() if kept.any() else float("nan"))
    metrics["uniopd/calibrated_group_frac"].append((gap < args.margin_delta).float().mean().item())
    return advantages

"""Uni-OPD's steps of `GNDPOTrainer` that need the whole generation batch's outcome rewards: online
correctness-aware balancing of the responses, and margin calibration of the advantages (shift, greedy mask or
prompt-group mask). The math is in `uniopd.py`; this mixin gathers correctness across processes and logs `uniopd/`."""

import torch

from . import uniopd


class CalibrationMixin:
    """Correctness of every completion (all processes), online balancing and margin calibration."""

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._rewards_per_func = rewards  # (all processes' completions, reward functions): Uni-OPD's correctness
        return rewards

    def _gathered_responses(self, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, slice]:
        """Correctness and presence of every completion of the generation batch (all processes), and our rows."""
        rewards = self._rewards_per_func
        total = (rewards * self.reward_weights.to(rewards.device)).nansum(1)
        present = self.accelerator.gather(valid.any(1)).bool() & ~torch.isnan(rewards).all(1)
        local = slice(self.accelerator.process_index * len(valid), (self.accelerator.process_index + 1) * len(valid))
        return (total >= self.args.correctness_threshold).cpu(), present.cpu(), local

    def _balanced_responses(self, valid: torch.Tensor, metrics) -> torch.Tensor:
        """Uni-OPD online balancing; every process draws the same responses to drop (same seed, same inputs)."""
        correct, present, local = self._gathered_responses(valid)
        # seeded by the step, so a resumed run draws what the uninterrupted one would have
        generator = torch.Generator().manual_seed(self.args.seed * 1_000_003 + self.state.global_step)
        group_size = self.num_generations if self.model.training else self.num_generations_eval
        keep = uniopd.balance_classes(correct, present, group_size, self.args.balance_ratio, generator)
        metrics["uniopd/correct_frac"].append((correct & present).sum().item() / max(present.sum().item(), 1))
        metrics["uniopd/balance_dropped_frac"].append((present & ~keep).sum().item() / max(present.sum().item(), 1))
        return keep[local].to(valid.device)

    def _calibrate_margins(self, advantages: torch.Tensor, valid: torch.Tensor, metrics) -> torch.Tensor:
        """Uni-OPD margin shift or mask on the normalized advantages, per prompt group or over the whole batch."""
        correct, present, local = self._gathered_responses(valid)
        if self.args.balance_ratio is None:  # else logged, before balancing, by `_balanced_responses`
            metrics["uniopd/correct_frac"].append((correct & present).sum().item() / max(present.sum().item(), 1))
        means, _ = uniopd.response_means(advantages, valid)
        means = self.accelerator.gather(means.float()).cpu()
        group_size = self.num_generations if self.model.training else self.num_generations_eval
        group = group_size if self.args.margin_scope == "group" else len(means)
        groups = (means, correct, present, group, self.args.margin_delta, self.args.margin_mode)
        if self.args.margin_calibration == "shift":
            shift, gap = uniopd.margin_shift(*groups, direction=self.args.margin_direction)
            after = means + shift
            advantages = advantages + shift[local].to(advantages)[:, None] * valid
        else:
            if self.args.margin_calibration == "group_mask":  # the paper: discard prompt groups below the margin
                keep, gap = uniopd.margin_group_mask(*groups)
            else:
                keep, gap = uniopd.margin_mask(*groups, min_retain_ratio=self.args.margin_min_retain_ratio)
            after, present = means, present & keep
            advantages = advantages * keep[local].to(advantages)[:, None]
        gap_after = uniopd.margin_gap(
            after.view(-1, group), correct.view(-1, group), present.view(-1, group), self.args.margin_mode
        )
        eligible, kept = ~torch.isnan(gap), ~torch.isnan(gap_after)  # a discarded group has no margin after
        metrics["uniopd/margin_before"].append(gap[eligible].mean().item() if eligible.any() else float("nan"))
        metrics["uniopd/margin_after"].append(gap_after[kept].mean().item() if kept.any() else float("nan"))
        metrics["uniopd/calibrated_group_frac"].append((gap < self.args.margin_delta).float().mean().item())
        return advantages

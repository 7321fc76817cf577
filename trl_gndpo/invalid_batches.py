"""Run-time guard of GNDPOTrainer: a generation batch without a single valid completion token trains on a zero loss,
so each one is reported, and a run of them stops training with an error that says why the tokens were invalid."""

from transformers.utils import logging

logger = logging.get_logger(__name__)


class InvalidBatchGuard:
    """Counts consecutive training generation batches without a valid token; raises at `limit` (None: never)."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.count = 0

    def update(self, n_tokens: float, n_finite: float, n_valid: float) -> None:
        """Counts over the whole generation batch, all processes: completion tokens (after masking), those with finite
        log-probs, and those left for the loss. Every process sees the same counts, so all raise together."""
        if n_valid > 0:
            self.count = 0
            return
        self.count += 1
        if n_tokens == 0:
            why = "every completion token is masked: empty completions, or every prompt over max_prompt_length"
        elif n_finite == 0:
            why = (
                "every completion token has a non-finite log-prob: the teacher or the student outputs NaN or inf "
                "(check their weights and dtype, e.g. float16 overflow)"
            )
        else:
            why = "the token filters (max_abs_log_ratio, token_selection, balance_ratio) dropped every finite token"
        logger.warning(f"GNDPO: a generation batch has no valid completion token ({why}); its loss is 0.")
        if self.limit is not None and self.count >= self.limit:
            raise RuntimeError(
                f"{self.count} consecutive generation batches had no valid completion token ({why}), so training "
                f"stopped (max_invalid_generation_batches={self.limit}). Fix the cause, or raise "
                "max_invalid_generation_batches (None never stops)."
            )

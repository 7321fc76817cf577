"""The sampled tokens' log-probs, recorded during transformers generation (`GNDPOConfig.old_logps_from_sampler`).

With `old_logps_from_sampler`, log p_old of the token signal comes from the sampler instead of a no-grad re-score pass
of the student. vLLM returns these log-probs itself (TRL's `sampling_per_token_logps`). For transformers `generate`,
`SampledTokenLogProbs` is a logits processor put first in the list `generate` builds: at each step it keeps the
log-softmax of the step's logits divided by the temperature (one batch x vocabulary tensor) and, at the next step,
gathers the log-prob of the token that was drawn; the last step's token is gathered from the returned completions.
Nothing batch x length x vocabulary is kept.

Being first, it sees the model's logits before any processor or warper, so the recorded value is
`log softmax(logits / temperature)(y_t)`: what the re-score computes, by the same operations, on the KV-cached
forward instead of one full forward. `GNDPOConfig` refuses the option where the sampler draws from another
distribution (top-k, top-p, min-p, repetition penalty).
"""

from contextlib import contextmanager

import torch
from transformers import LogitsProcessor


class SampledTokenLogProbs(LogitsProcessor):
    """Records `log softmax(logits / temperature)(y_t)` of each sampled token `y_t`; returns the scores unchanged."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self._pending: torch.Tensor | None = None  # (batch, vocab) log-softmax of the last step, its token unseen
        self._steps: list[torch.Tensor] = []  # (batch,) per step whose token was seen

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._pending is not None:  # input_ids now ends with the token drawn at the previous step
            self._steps.append(self._pending.gather(-1, input_ids[:, -1:]).squeeze(-1))
        logits = scores.float()
        self._pending = (logits if self.temperature == 1.0 else logits / self.temperature).log_softmax(-1)
        return scores

    def per_completion(self, completion_ids: list[list[int]]) -> list[list[float]]:
        """The log-probs of each completion's tokens (TRL's `logprobs` format); the last step's from its ids."""
        calls = len(self._steps) + (self._pending is not None)
        steps = torch.stack(self._steps, 1).cpu() if self._steps else torch.zeros(len(completion_ids), 0)
        logps = []
        for i, ids in enumerate(completion_ids):
            if len(ids) > calls:
                raise RuntimeError(f"{len(ids)} sampled tokens but {calls} recorded sampling steps.")
            row = steps[i, : len(ids)].tolist()
            if len(ids) == calls and calls:
                row.append(self._pending[i, ids[-1]].item())
            logps.append(row)
        self._pending, self._steps = None, []
        return logps


@contextmanager
def recording(model: torch.nn.Module, temperature: float):
    """Within the context, `model.generate` also records the sampled tokens' log-probs; yields the recorder.

    `model` is the transformers model (not a PEFT or engine wrapper, whose `generate` calls the model's).
    """
    recorder = SampledTokenLogProbs(temperature)
    own, build = vars(model).get("_get_logits_processor"), model._get_logits_processor

    def first_records(*args, **kwargs):
        processors = build(*args, **kwargs)
        processors.insert(0, recorder)
        return processors

    model._get_logits_processor = first_records  # an instance attribute, over the class's method
    try:
        yield recorder
    finally:
        if own is None:
            del model._get_logits_processor
        else:
            model._get_logits_processor = own

"""Only the completion positions go through the vocabulary head, on every device.

TRL's fused log-prob head (`trl.trainer.utils.add_fused_lm_head`) scores the positions whose label is not -100, but
outside Triton devices it projects every prompt and completion position and masks afterwards (`compact =
_use_triton(device)`), so on CPU a long prompt costs vocabulary-head work on every scoring pass and in the loss. The
wrapper below cuts the backbone's hidden states to the positions that predict a labelled token before the head sees
them, through the head's own `shift_labels` path, and pads the per-token outputs back to the width TRL's callers
slice from. The values are the same rows of the same kernel, so log-probs and entropies do not change.
"""

import functools

import torch
import torch.nn.functional as F  # noqa: N812

from .hidden_states import backbone


def project_completions_only(model: torch.nn.Module) -> None:
    """Wrap `model.forward` (already patched by `add_fused_lm_head`) so fused calls project labelled positions only.

    `model` is the transformers model itself (not a PEFT or engine wrapper, which call its `forward`).
    """
    fused_forward = model.forward

    @functools.wraps(fused_forward)
    def forward(*args, fused_lm_head=False, labels=None, **kwargs):
        if not fused_lm_head or labels is None or "shift_labels" in kwargs:
            return fused_forward(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        labelled = (labels[:, 1:] != -100).any(0).nonzero()
        if len(labelled) == 0:  # nothing to score: TRL's path gives the all-zero outputs
            return fused_forward(*args, fused_lm_head=True, labels=labels, **kwargs)
        first = int(labelled[0])  # hidden state t predicts token t + 1: keep states first .. L-2, labels first+1 ..

        def cut(module, inputs, output):
            output.last_hidden_state = output.last_hidden_state[:, first:-1]
            return output

        handle = backbone(model).register_forward_hook(cut)
        try:
            outputs = fused_forward(*args, fused_lm_head=True, shift_labels=labels[:, first + 1 :], **kwargs)
        finally:
            handle.remove()
        for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"):
            value = getattr(outputs, name, None)
            if value is not None:  # back to TRL's width, L - 1, zeros where nothing was scored
                setattr(outputs, name, F.pad(value, (first, 0)))
        return outputs

    model.forward = forward

"""The student's and the teachers' last hidden states at the completion positions, and what is computed from them
with the vocabulary heads: vOPD's full-vocabulary reverse KL. VGS (`vgs_steering.py`) reads the same states.

`backbone` and `vocabulary_head` find the decoder and the head under any DDP / DeepSpeed / accelerate wrapper and PEFT
adapter.
"""

from contextlib import contextmanager

import torch
from accelerate.utils import is_peft_model
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

from . import functional


def backbone(model) -> torch.nn.Module:
    """The decoder without its vocabulary head, under any DDP / DeepSpeed / accelerate wrapper and PEFT adapter."""
    while hasattr(model, "module"):
        model = model.module
    return (model.get_base_model() if is_peft_model(model) else model).base_model


def vocabulary_head(model) -> torch.nn.Module:
    """The model's vocabulary head, under any wrapper and PEFT adapter."""
    while hasattr(model, "module"):
        model = model.module
    return (model.get_base_model() if is_peft_model(model) else model).get_output_embeddings()


@contextmanager
def capture_completion_states(model, completion_length: int, enabled: bool = True, detach: bool = True):
    """Collect the backbone's last hidden states at the positions that predict the completion tokens.

    A forward hook on the backbone that TRL's fused head calls, so the batch chunking and image slicing of
    `_get_per_token_logps_and_entropies` apply unchanged; keeps `(chunk, completion_length, hidden)` per call,
    detached unless `detach=False` (a loss then backpropagates through them into the model).
    """
    states = []
    if not enabled:
        yield states
        return

    def keep(module, inputs, output):
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        hidden = hidden[:, -completion_length - 1 : -1]
        states.append(hidden.detach() if detach else hidden)

    handle = backbone(model).register_forward_hook(keep)
    try:
        yield states
    finally:
        handle.remove()


def completion_states(model, input_ids, attention_mask, completion_length: int, batch_size: int) -> torch.Tensor:
    """Last hidden states at the positions that predict the completion tokens, from the backbone alone (no vocabulary
    head), `batch_size` rows at a time. Text-only inputs: the model derives its (Qwen: 3-D) rotary positions itself."""
    decoder = backbone(model)
    states = []
    for start in range(0, len(input_ids), batch_size):
        rows = slice(start, start + batch_size)
        hidden = decoder(input_ids=input_ids[rows], attention_mask=attention_mask[rows]).last_hidden_state
        states.append(hidden[:, -completion_length - 1 : -1])
    return torch.cat(states)


def reverse_kl_per_token(student, student_states, teacher, teacher_states, top_k: int | None = None) -> torch.Tensor:
    """KL(p || q) per position from both models' hidden states, vocabulary chunk by vocabulary chunk (TRL's kernel),
    or with `top_k` its approximation on the student's top-k tokens (`functional.top_k_reverse_kl`).

    The teacher's head is cut to the student's vocabulary rows (a teacher may pad its embedding further).
    """
    heads = [vocabulary_head(student), vocabulary_head(teacher)]
    rows, device = heads[0].weight.shape[0], student_states.device
    teacher_states = teacher_states.to(device)  # a teacher on its own device, or offloaded
    scale_and_cap = []
    for m in (student, teacher):
        config = m.config.get_text_config()
        scale_and_cap += [
            getattr(config, "logit_scale", None) or 1.0,
            getattr(config, "final_logit_softcapping", None),
        ]
    if top_k is not None:
        s_scale, s_cap, t_scale, t_cap = scale_and_cap
        teacher_bias = heads[1].bias
        return functional.top_k_reverse_kl(
            student_states,
            heads[0].weight,
            teacher_states,
            heads[1].weight[:rows],
            top_k,
            heads[0].bias,
            None if teacher_bias is None else teacher_bias[:rows],
            student_scale=s_scale,
            student_softcap=s_cap,
            teacher_scale=t_scale,
            teacher_softcap=t_cap,
        )
    kl, _ = ChunkedDivergenceFunction.apply(
        student_states,
        heads[0].weight,
        heads[0].bias,
        teacher_states,
        heads[1].weight[:rows].to(device),
        None if heads[1].bias is None else heads[1].bias[:rows].to(device),
        1.0,  # beta = 1: reverse KL(student || teacher)
        1.0,
        *scale_and_cap,
    )
    return kl

"""The teacher side of GNDPO: loading, freezing and placing scoring-only models, and reading their hidden states.

A scoring-only model (the teacher, ExOPD's reference) is frozen, given TRL's fused log-prob head and prepared like
TRL's reference model, or kept on its own device (`teacher_device`) or in CPU memory between scoring passes
(`teacher_offload`). The hidden-state helpers serve the estimators that need the full distribution (vOPD's KL, VGS).
"""

import os
from contextlib import contextmanager

import torch
from transformers import AutoProcessor, BitsAndBytesConfig, PreTrainedModel
from transformers.utils import logging
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.trainer.utils import add_fused_lm_head, create_model_from_path, disable_dropout_in_model

from . import functional
from .completion_head import project_completions_only
from .config import GNDPOConfig
from .modules import backbone, vocabulary_head

logger = logging.get_logger(__name__)

# A folder holding any of these has a tokenizer to load.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")


def load_teacher(name: str, args: GNDPOConfig, revision: bool = True) -> PreTrainedModel:
    """Load the teacher with `args.teacher_model_init_kwargs`, in half precision where the device supports it.

    `revision`: apply `args.teacher_model_revision` (False for another scoring model loaded like the teacher).
    """
    kwargs = dict(args.teacher_model_init_kwargs or {})
    kwargs.setdefault("dtype", default_teacher_dtype(args))
    if isinstance(kwargs.get("quantization_config"), dict):
        kwargs["quantization_config"] = BitsAndBytesConfig.from_dict(kwargs["quantization_config"])
    if revision and args.teacher_model_revision is not None:
        kwargs.setdefault("revision", args.teacher_model_revision)
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        kwargs["device_map"] = None  # "auto" fails under distributed training
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    return create_model_from_path(name, **kwargs)


def default_teacher_dtype(args: GNDPOConfig) -> str:
    """Half precision where the training device supports it: the teacher only runs forward passes."""
    if args.device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if args.device.type in ("xpu", "npu", "hpu"):
        return "bfloat16"
    return "float32"


def load_teacher_processing_class(name: str, args: GNDPOConfig):
    """The teacher's processor or tokenizer, or None (the set-up checks then warn) if it ships none."""
    if os.path.isdir(name) and not any(os.path.isfile(os.path.join(name, f)) for f in _TOKENIZER_FILES):
        # AutoProcessor would build an empty tokenizer from the model config instead of failing
        logger.warning(
            f"The teacher's folder {name!r} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}): save the "
            "tokenizer with the teacher, or pass `teacher_processing_class`."
        )
        return None
    try:
        return AutoProcessor.from_pretrained(
            name, revision=args.teacher_model_revision, trust_remote_code=args.trust_remote_code
        )
    except (OSError, ValueError) as error:
        logger.warning(f"Could not load the teacher's tokenizer from {name!r}: {error}")
        return None


def prepare_scoring_model(trainer, model: PreTrainedModel, temperature: float, placed: bool = False, device=None):
    """Freeze a scoring-only model, give it TRL's fused log-prob head and prepare it like TRL's reference model.

    `placed`: the model honours `teacher_device` / `teacher_offload` (then it is not handed to accelerate);
    `device` replaces `teacher_device` (one teacher among several).
    """
    args = trainer.args
    model.requires_grad_(False)
    model.eval()
    if args.disable_dropout:
        disable_dropout_in_model(model)
    add_fused_lm_head(model, temperature=temperature, cast_lm_head_to_fp32=args.cast_lm_head_to_fp32)
    project_completions_only(model)
    device = args.teacher_device if device is None and isinstance(args.teacher_device, str) else device
    if placed and (device is not None or args.teacher_offload):
        return model.to(device or "cpu")
    if trainer.is_deepspeed_enabled:
        return prepare_deepspeed(model, trainer.accelerator)
    if trainer.is_fsdp_enabled:
        return prepare_fsdp(model, trainer.accelerator)
    return trainer.accelerator.prepare_model(model, evaluation_mode=True)


@contextmanager
def placed(model: torch.nn.Module, offload_to: "torch.device | None"):
    """Yield the device `model` scores on; with `offload_to`, move it there for the pass and back to CPU after."""
    if offload_to is not None:
        model.to(offload_to)
    try:
        yield next(model.parameters()).device
    finally:
        if offload_to is not None:
            model.to("cpu")


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

"""Frozen scoring models (the teachers, G-OPD's reference): loading, freezing, placing, and scoring on their device.

A scoring-only model is frozen, given TRL's fused log-prob head and prepared like TRL's reference model, or kept on its
own device (`teacher_device`) or in CPU memory between scoring passes (`teacher_offload`).
"""

import copy
import os
from contextlib import contextmanager

import torch
from transformers import AutoProcessor, BitsAndBytesConfig, PreTrainedModel
from transformers.utils import logging
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.trainer.utils import add_fused_lm_head, create_model_from_path, disable_dropout_in_model

from .completion_head import project_completions_only
from .config import GNDPOConfig

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


def load_reference(reference_model, model, args: GNDPOConfig, peft: bool):
    """ExOPD's reference, before `GRPOTrainer.__init__`: the given reference model (G-OPD's reward correction; a name
    or path is loaded like the teacher), else a frozen copy of the initial student (`model`, a name or a model), taken
    before training touches it, when `reward_extrapolation != 1`. With a PEFT adapter (`peft`), the base weights with
    the adapter disabled serve instead: no copy.

    Returns (the model or None, whether it was given, its processor or None).
    """
    reference = reference_model if reference_model is not None else args.reference_model_name_or_path
    processing = None
    if isinstance(reference, str):
        processing = load_teacher_processing_class(reference, args)
        reference = load_teacher(reference, args, revision=False)
    if reference is not None:
        return reference, True, processing
    if args.reward_extrapolation == 1.0 or peft:
        return None, False, None
    if isinstance(model, str):
        return create_model_from_path(model, **dict(args.model_init_kwargs or {})), False, None
    return copy.deepcopy(model), False, None


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


def placed_log_probs(log_probs, model, offload_to, input_ids, attention_mask, completion_length, model_inputs, device):
    """Log-probs of the sampled tokens under a frozen scoring model (a teacher, or G-OPD's reference) on the device it
    is placed on (`placed`), returned on `device` (the training device). `log_probs`: GRPOTrainer's
    `_get_per_token_logps_and_entropies`."""
    with placed(model, offload_to) as at:
        moved = {k: v.to(at) if isinstance(v, torch.Tensor) else v for k, v in model_inputs.items()}
        logps, _, _ = log_probs(model, input_ids.to(at), attention_mask.to(at), completion_length, **moved)
    return logps.to(device)

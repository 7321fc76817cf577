"""Where the parts of a model live under any DDP / DeepSpeed / accelerate wrapper and PEFT adapter."""

import torch
from accelerate.utils import is_peft_model


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

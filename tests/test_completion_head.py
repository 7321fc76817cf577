"""`project_completions_only`: TRL's fused head projects only the positions that predict completion tokens, with the
same log-probs, entropies and gradients as TRL's own path (float64, random models and batches from a fresh seed per
run, shown in the test id)."""

import copy

import pytest
import torch
import trl.trainer.utils as trl_utils
from helpers import fresh_seeds
from tiny_models import make_image, make_text_model, make_vlm
from trl.trainer.utils import add_fused_lm_head

from trl_gndpo.completion_head import project_completions_only


def scored(model, input_ids, attention_mask, completion_length, **extra):
    """TRL's call (GRPOTrainer._get_per_token_logps_and_entropies): labels only on the completion columns."""
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :-completion_length] = -100
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True, **extra)
    return out.log_probs[:, -completion_length:], out.entropy[:, -completion_length:]


def pair(model):
    """The model with TRL's fused head, and a copy that also projects completions only."""
    model = model.double()
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    wrapped = copy.deepcopy(model)
    add_fused_lm_head(wrapped, outputs=("log_probs", "entropy"))
    project_completions_only(wrapped)
    return model, wrapped


def batch(vocab, rows=3, prompt=7, completion=5):
    """Left-padded prompts, right-padded completions (one empty), as GRPOTrainer builds them."""
    ids = torch.randint(3, vocab, (rows, prompt + completion))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a shorter prompt
    mask[1, prompt + 2 :] = 0  # a shorter completion
    mask[2, prompt:] = 0  # an empty completion
    return ids, mask, completion


@pytest.mark.parametrize("seed", fresh_seeds(2))
def test_same_log_probs_entropies_and_gradients_as_trls_path(seed):
    torch.manual_seed(seed)
    reference, wrapped = pair(make_text_model(seed=int(torch.randint(0, 1000, ())), hidden_size=64))
    ids, mask, completion = batch(reference.config.vocab_size)
    results = []
    for model in (reference, wrapped):
        logps, entropy = scored(model, ids, mask, completion)
        (logps * mask[:, -completion:]).sum().backward()
        results.append((logps, entropy, model.lm_head.weight.grad.clone(), model.model.embed_tokens.weight.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_vision_language_model_scores_the_same():
    model, processor = make_vlm(seed=0)
    reference, wrapped = pair(model)
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Describe {i}."}]}]
                for i in range(2)]  # fmt: skip
    inputs = processor.apply_chat_template(
        messages, images=[[make_image(0)], [make_image(1)]], add_generation_prompt=True, tokenize=True,
        return_dict=True, processor_kwargs={"padding": True, "return_tensors": "pt"},
    )  # fmt: skip
    completion = torch.randint(8, 300, (2, 4))  # above the special ids: an image pad token would want an image
    ids = torch.cat([inputs["input_ids"], completion], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(completion)], 1)
    extra = {k: inputs[k] for k in ("pixel_values", "image_grid_thw")}
    extra["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(completion)], 1)
    extra["pixel_values"] = extra["pixel_values"].double()
    with torch.no_grad():
        for a, b in zip(scored(reference, ids, mask, 4, **extra), scored(wrapped, ids, mask, 4, **extra), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_the_head_projects_completion_rows_only(monkeypatch):
    rows = []
    apply = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(
        trl_utils._ChunkedLogProbFunction,
        "apply",
        lambda hidden, *args: rows.append(len(hidden)) or apply(hidden, *args),
    )
    reference, wrapped = pair(make_text_model(seed=0))
    ids, mask, completion = batch(reference.config.vocab_size, rows=3, prompt=20, completion=5)
    with torch.no_grad():
        scored(reference, ids, mask, completion)
        scored(wrapped, ids, mask, completion)
    assert rows == [3 * (20 + 5 - 1), 3 * 5]  # TRL's path on CPU projects every position; the wrapper the completions

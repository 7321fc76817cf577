"""bf16 models (CPU, `bf16=True`): the token signal, the whitening statistics and the loss reductions stay float32."""

import torch
import trl.trainer.utils as trl_utils
from tiny_models import make_text_dataset, make_text_model, make_tokenizer

import trl_gndpo.functional as F
from trl_gndpo import GNDPOConfig, GNDPOTrainer


def test_bf16_models_keep_the_signal_statistics_and_loss_in_float32(cpu_config_kwargs, monkeypatch):
    seen = {}

    def spy(name, function):
        def wrapper(*args, **kwargs):
            result = function(*args, **kwargs)
            tensors = [x for x in (*args, *(result if isinstance(result, tuple) else [result])) if torch.is_tensor(x)]
            seen.setdefault(name, set()).update(x.dtype for x in tensors if x.is_floating_point())
            return result

        return wrapper

    for name in ("clamped_log_ratio", "whitened_advantages", "clipped_policy_loss", "seq_mean_token_mean"):
        monkeypatch.setattr(F, name, spy(name, getattr(F, name)))
    kernel = trl_utils._ChunkedLogProbFunction
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", type("Spy", (), {"apply": spy("kernel", kernel.apply)}))
    student = make_text_model(seed=0).to(torch.bfloat16)
    teacher = make_text_model(seed=1, hidden_size=128).to(torch.bfloat16)
    trainer = GNDPOTrainer(
        model=student,
        teacher_model=teacher,
        args=GNDPOConfig(**cpu_config_kwargs(bf16=True)),
        train_dataset=make_text_dataset(),
        processing_class=make_tokenizer(),
    )
    losses = []
    compute_loss = trainer._compute_loss
    monkeypatch.setattr(trainer, "_compute_loss", lambda *a: losses.append(compute_loss(*a)) or losses[-1])
    trainer.train()

    assert torch.bfloat16 in seen["kernel"], "the models did not run in bf16"
    assert seen["clamped_log_ratio"] == {torch.float32}  # teacher and student log-probs in, signal out
    assert seen["whitened_advantages"] == {torch.float32, torch.float64}  # signal/advantages; mean/var in float64
    assert seen["clipped_policy_loss"] == seen["seq_mean_token_mean"] == {torch.float32}
    assert len(losses) == 2 and all(loss.dtype == torch.float32 for loss in losses)
    assert all(p.dtype == torch.bfloat16 for p in trainer.model.parameters())

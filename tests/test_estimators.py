"""ExOPD reward extrapolation, vOPD value baseline and TIP token selection, against float64 references."""

import copy

import pytest
import torch
from helpers import completion_log_softmax, record_references, reference_logps, text_trainer, whiten
from peft import LoraConfig
from tiny_models import make_text_dataset, make_text_model, make_tokenizer

from trl_gndpo import GNDPOConfig, GNDPOTrainer
from trl_gndpo import functional as F


def random_logps(seed, shape=(5, 7)):
    g = torch.Generator().manual_seed(seed)
    return [-torch.rand(shape, generator=g, dtype=torch.float64) * 8 for _ in range(3)], torch.rand(shape, generator=g)


@pytest.mark.parametrize("seed", range(3))
def test_extrapolation_of_one_is_plain_opd_bit_for_bit(seed):
    (teacher, student, base), u = random_logps(seed)
    mask = u < 0.8
    plain = F.clamped_log_ratio(teacher.float(), student.float(), mask, 5.0)
    extrapolated = F.clamped_log_ratio(teacher.float(), student.float(), mask, 5.0, base_logps=base.float())
    assert torch.equal(plain[0], extrapolated[0]) and torch.equal(plain[1], extrapolated[1])


@pytest.mark.parametrize("lam", [0.5, 1.25, 2.0])
def test_extrapolation_and_baseline_match_reference(lam):
    (teacher, student, base), u = random_logps(int(lam * 4))
    mask = u < 0.8
    kl = torch.rand(teacher.shape, dtype=torch.float64)
    r, valid = F.clamped_log_ratio(teacher, student, mask, 5.0, base_logps=base, extrapolation=lam, value_baseline=kl)
    expected = (lam * (teacher - base) - (student - base) + kl).clamp(-5, 5) * mask
    torch.testing.assert_close(r, expected)
    base[0, 0] = float("-inf")
    mask[0, 0] = True
    _, valid = F.clamped_log_ratio(teacher, student, mask, 5.0, base_logps=base, extrapolation=lam)
    assert not valid[0, 0], "a non-finite reference log-prob masks the token"


def reference_entropy_and_kl(student, teacher, batch):
    """Full-vocabulary student entropy and KL(p || q) per completion position, from plain logits in float64."""
    p, q = (completion_log_softmax(m, batch) for m in (student, teacher))
    return -(p.exp() * p).sum(-1), (p.exp() * (p - q)).sum(-1)


def train_and_record(config_kwargs, peft_config=None, **overrides):
    student, teacher = make_text_model(seed=0), make_text_model(seed=1, hidden_size=128)
    initial = copy.deepcopy(student)
    trainer = GNDPOTrainer(
        model=student,
        teacher_model=teacher,
        args=GNDPOConfig(**config_kwargs(**overrides)),
        train_dataset=make_text_dataset(),
        processing_class=make_tokenizer(),
        peft_config=peft_config,
    )
    records = []
    generate = trainer._generate_and_score_completions

    def spy(inputs):
        batch = generate(inputs)
        model = trainer.accelerator.unwrap_model(trainer.model)
        record = {"batch": batch, "p": reference_logps(model, batch), "q": reference_logps(teacher, batch)}
        if peft_config is not None:
            with model.disable_adapter():
                record["base"] = reference_logps(model, batch)
        else:
            record["base"] = reference_logps(initial, batch)
        record["entropy"], record["kl"] = reference_entropy_and_kl(model, teacher, batch)
        records.append(record)
        return batch

    trainer._generate_and_score_completions = spy
    trainer.train()
    return trainer, records


@pytest.mark.parametrize("lora", [False, True])
def test_exopd_uses_the_initial_student_as_reference(lora, cpu_config_kwargs):
    peft_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False) if lora else None
    trainer, records = train_and_record(cpu_config_kwargs, peft_config, reward_extrapolation=1.25)
    assert (trainer.base_model is None) == lora, "LoRA reuses the base weights, full fine-tuning keeps a copy"
    for r in records:
        mask = r["batch"]["completion_mask"].bool()
        signal = (1.25 * (r["q"] - r["base"]) - (r["p"] - r["base"])).clamp(-5, 5)
        torch.testing.assert_close(r["batch"]["advantages"].double(), whiten(signal, mask), rtol=1e-4, atol=1e-4)
    # the reference really is the initial student: after the first update it differs from the current one
    assert not torch.allclose(records[1]["p"], records[1]["base"])


def test_vopd_adds_the_full_vocabulary_reverse_kl(cpu_config_kwargs):
    trainer, records = train_and_record(cpu_config_kwargs, value_baseline=True)
    for r in records:
        mask = r["batch"]["completion_mask"].bool()
        assert (r["kl"][mask] > 0).all()
        signal = (r["q"] - r["p"] + r["kl"]).clamp(-5, 5)
        torch.testing.assert_close(r["batch"]["advantages"].double(), whiten(signal, mask), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["entropy", "quadrant"])
def test_tip_keeps_the_informative_tokens(mode, cpu_config_kwargs):
    trainer, records = train_and_record(cpu_config_kwargs, token_selection=mode, token_selection_ratio=0.5)
    kept_fractions = []
    for r in records:
        mask = r["batch"]["completion_mask"].bool()
        keep = r["entropy"] >= torch.quantile(r["entropy"][mask], 0.5)
        if mode == "quadrant":
            divergence = (r["p"] - r["q"]).abs()
            keep = keep | (divergence >= torch.quantile(divergence[mask], 0.5))
        kept = r["batch"]["loss_mask"].bool()
        # entropies near the threshold may flip between the fused head (float32) and this float64 reference
        assert (kept != (keep & mask)).sum() <= 2
        assert (r["batch"]["advantages"][~kept] == 0).all()
        signal = (r["q"] - r["p"]).clamp(-5, 5)
        torch.testing.assert_close(r["batch"]["advantages"].double(), whiten(signal, kept), rtol=1e-4, atol=1e-4)
        kept_fractions.append(kept.sum().item() / mask.sum().item())
    logged = [log["gndpo/tip_kept_frac"] for log in trainer.state.log_history if "gndpo/tip_kept_frac" in log]
    assert logged == pytest.approx(kept_fractions)
    assert (
        all(0.45 <= f <= 0.55 for f in kept_fractions) if mode == "entropy" else all(f > 0.55 for f in kept_fractions)
    )


# ---------------------------------------------------------------------------------------------------------------------
# vOPD's top-k baseline and TIP's Q3-only selection and entropy sampling, end to end against float64 references


@pytest.mark.parametrize("lora", [False, True])
def test_vopd_top_k_baseline_end_to_end(lora, cpu_config_kwargs):
    peft_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False) if lora else None
    student, teacher = make_text_model(seed=0), make_text_model(seed=1, hidden_size=128)
    trainer = GNDPOTrainer(
        model=student,
        teacher_model=teacher,
        args=GNDPOConfig(**cpu_config_kwargs(value_baseline=True, value_baseline_top_k=8)),
        train_dataset=make_text_dataset(),
        processing_class=make_tokenizer(),
        peft_config=peft_config,
    )
    records = record_references(trainer, full=True)
    trainer.train()
    for batch, p, q in records:
        mask = batch["completion_mask"].bool()
        top = p.topk(8, dim=-1).indices
        log_p, log_q = p.gather(-1, top).log_softmax(-1), q.gather(-1, top).log_softmax(-1)
        top_kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        full_kl = (p.exp() * (p - q)).sum(-1)
        assert not torch.allclose(top_kl[mask], full_kl[mask]), "an approximation, not the exact KL"
        sampled = batch["completion_ids"].unsqueeze(-1)
        signal = (q.gather(-1, sampled) - p.gather(-1, sampled)).squeeze(-1) + top_kl
        torch.testing.assert_close(
            batch["advantages"].double(), whiten(signal.clamp(-5, 5), mask), rtol=1e-4, atol=1e-4
        )


def test_tip_q3_only_keeps_low_entropy_high_divergence_tokens(cpu_config_kwargs):
    trainer = text_trainer(cpu_config_kwargs, token_selection="q3", token_selection_ratio=0.5)
    records = record_references(trainer, full=True)
    trainer.train()
    for batch, p, q in records:
        mask = batch["completion_mask"].bool()
        sampled = batch["completion_ids"].unsqueeze(-1)
        log_p, log_q = p.gather(-1, sampled).squeeze(-1), q.gather(-1, sampled).squeeze(-1)
        entropy, divergence = -(p.exp() * p).sum(-1), (log_p - log_q).abs()
        q3 = (entropy < torch.quantile(entropy[mask], 0.5)) & (divergence >= torch.quantile(divergence[mask], 0.5))
        kept = batch["loss_mask"].bool()
        assert kept.any() and (kept != (q3 & mask)).sum() <= 2  # float32 head vs float64 near the thresholds
        torch.testing.assert_close(
            batch["advantages"].double(), whiten((log_q - log_p).clamp(-5, 5), kept), rtol=1e-4, atol=1e-4
        )


def test_tip_entropy_sampling_draws_the_share_by_entropy(cpu_config_kwargs):
    trainer = text_trainer(
        cpu_config_kwargs, token_selection="entropy_sampling", token_selection_ratio=0.5, max_steps=4
    )
    records = record_references(trainer, full=True)
    trainer.train()
    kept_entropy, dropped_entropy = [], []
    for batch, p, q in records:
        mask, kept = batch["completion_mask"].bool(), batch["loss_mask"].bool()
        assert abs(kept.sum().item() - 0.5 * mask.sum().item()) <= 1
        entropy = -(p.exp() * p).sum(-1)
        kept_entropy.append(entropy[kept])
        dropped_entropy.append(entropy[mask & ~kept])
        sampled = batch["completion_ids"].unsqueeze(-1)
        signal = (q.gather(-1, sampled) - p.gather(-1, sampled)).squeeze(-1).clamp(-5, 5)
        torch.testing.assert_close(batch["advantages"].double(), whiten(signal, kept), rtol=1e-4, atol=1e-4)
    # a random draw, not the deterministic top share: some dropped tokens out-rank kept ones (the tiny random
    # student's entropies are nearly uniform, so the bias towards entropy is checked on the keys, above)
    kept_entropy, dropped_entropy = torch.cat(kept_entropy), torch.cat(dropped_entropy)
    assert dropped_entropy.max() > kept_entropy.min()

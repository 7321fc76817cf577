"""Paper settings beyond the GNDPO core: the one-step-per-rollout warning, VGS modes, the vOPD top-k baseline, TIP's
Q3-only selection and entropy sampling, Uni-OPD prompt-group masking, and the table in docs/papers.md."""

import ast
import logging
import math
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from test_distributed import calls
from test_trainer import changed, snapshot
from test_vgs_trainer import mixed_dataset, record_batches
from tiny_models import make_text_dataset, make_text_model, make_tokenizer, make_vlm
from trl import GRPOTrainer

from trl_gndpo import GNDPOConfig, GNDPOTrainer, checks, vgs
from trl_gndpo import functional as F
from trl_gndpo import uniopd as U


def text_trainer(cpu_config_kwargs, reward_funcs=None, **overrides):
    return GNDPOTrainer(
        model=make_text_model(seed=0),
        teacher_model=make_text_model(seed=1),
        reward_funcs=reward_funcs,
        args=GNDPOConfig(**cpu_config_kwargs(**overrides)),
        train_dataset=make_text_dataset(),
        processing_class=make_tokenizer(),
        teacher_processing_class=make_tokenizer(),
    )


@pytest.mark.parametrize(
    ("overrides", "steps"),
    [
        ({}, None),  # steps_per_generation = gradient_accumulation_steps: one step per rollout
        ({"gradient_accumulation_steps": 2}, None),
        ({"normalization_scope": "none", "generation_batch_size": 16}, None),  # plain OPD: no rollout statistics
        ({"generation_batch_size": 16}, "4"),  # 16 completions / 4 per step
        ({"steps_per_generation": 2}, "2"),
        ({"num_iterations": 2}, "2"),
        ({"gradient_accumulation_steps": 2, "steps_per_generation": 4, "num_iterations": 3}, "6"),
    ],
)
def test_warns_when_a_global_rollout_feeds_several_optimizer_steps(overrides, steps, cpu_config_kwargs, caplog):
    config = GNDPOConfig(**cpu_config_kwargs(**overrides))
    with caplog.at_level(logging.WARNING, logger="trl_gndpo.checks"):
        checks.warn_if_rollout_feeds_several_steps(config)
    warnings = [r.getMessage() for r in caplog.records if "optimizer steps" in r.getMessage()]
    if steps is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and f"feeds {steps} optimizer steps" in warnings[0]
        assert "num_iterations=1" in warnings[0]


def test_the_trainer_warns_at_start_up(cpu_config_kwargs, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_gndpo.checks"):
        text_trainer(cpu_config_kwargs, generation_batch_size=8)
    assert any("feeds 2 optimizer steps" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------------------------------
# VGS as the paper runs it: alone, or GRPO + VGS.


def test_vgs_mixed_loss_of_each_mode():
    policy, steering = torch.tensor(2.0), torch.tensor(10.0)
    assert vgs.mixed_loss("alone", 0.3, policy, steering).item() == 10.0
    assert vgs.mixed_loss("alone", 0.3, torch.tensor(float("nan")), steering).item() == 10.0  # not 0 * NaN
    assert vgs.mixed_loss("grpo", 0.3, policy, steering).item() == pytest.approx(0.7 * 2 + 0.3 * 10)
    assert vgs.mixed_loss("gndpo", 0.25, policy, steering).item() == pytest.approx(0.75 * 2 + 0.25 * 10)
    with pytest.raises(ValueError, match="vgs mode"):
        vgs.mixed_loss("grpo+kd", 0.3, policy, steering)


def test_vgs_policy_advantages_of_each_mode():
    distillation = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]])
    outcome = torch.tensor([0.75, -2.0])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    grpo = vgs.policy_advantages("grpo", distillation, outcome, mask)
    assert grpo.tolist() == [[0.75, 0.75, 0.0], [0.0, -2.0, -2.0]]  # no teacher signal left
    for mode in ("alone", "gndpo"):
        assert torch.equal(vgs.policy_advantages(mode, distillation, outcome, mask), distillation)


def test_turning_vgs_on_gives_the_papers_main_configuration(cpu_config_kwargs):
    config = GNDPOConfig(**cpu_config_kwargs(visual_gradient_steering=True))
    # VGS alone, eta of the paper's 2B student (not the no-normalization ablation's 1.0), gamma 2, lambda 0.01, Q_0.7
    assert (config.vgs_mode, config.vgs_eta, config.vgs_gamma, config.vgs_lambda) == ("alone", 0.41, 2.0, 0.01)
    assert (config.vgs_lp_quantile, config.vgs_adaptive_gamma, config.vgs_alpha) == (0.7, False, 0.3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"vgs_mode": "kd"}, "vgs_mode must be"),
        ({"vgs_mode": "grpo", "margin_calibration": "shift"}, "margin_calibration='none'"),
        ({"vgs_mode": "grpo", "outcome_advantage_weight": 1.0}, "outcome_advantage_weight=0"),
    ],
)
def test_vgs_mode_is_validated(overrides, message, cpu_config_kwargs):
    with pytest.raises(ValueError, match=message):
        GNDPOConfig(**cpu_config_kwargs(visual_gradient_steering=True, **overrides))


def test_grpo_plus_vgs_needs_outcome_rewards(cpu_config_kwargs):
    student, processor = make_vlm("qwen2_vl", seed=0)
    with pytest.raises(ValueError, match="needs `reward_funcs`"):
        GNDPOTrainer(
            model=student,
            teacher_model=make_vlm("qwen2_vl", seed=1)[0],
            args=GNDPOConfig(**cpu_config_kwargs(visual_gradient_steering=True, vgs_mode="grpo")),
            train_dataset=mixed_dataset(),
            processing_class=processor,
        )


def length_reward(completions, **kwargs):
    return [float(len(str(c))) for c in completions]


@pytest.mark.parametrize("lora", [False, True])
def test_grpo_plus_vgs_trains_on_the_outcome_advantage_mixed_with_vgs(lora, cpu_config_kwargs, monkeypatch):
    outcome, grpo_generate = [], GRPOTrainer._generate_and_score_completions

    def grpo_spy(self, inputs):
        batch = grpo_generate(self, inputs)
        outcome.append(batch["advantages"].clone())
        return batch

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", grpo_spy)
    student, processor = make_vlm("qwen2_vl", seed=0)
    teacher, _ = make_vlm("qwen2_vl", seed=1, hidden_size=128)
    trainer = GNDPOTrainer(
        model=student,
        teacher_model=teacher,
        reward_funcs=length_reward,
        args=GNDPOConfig(**cpu_config_kwargs(visual_gradient_steering=True, vgs_mode="grpo", vgs_alpha=0.3)),
        train_dataset=mixed_dataset(),
        processing_class=processor,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False) if lora else None,
    )
    records = record_batches(trainer)
    before = snapshot(trainer.model)
    trainer.train()
    moved = changed(before, trainer.model)
    assert moved and (not lora or all("lora_" in name for name in moved))
    batch, sequence = records[-1], outcome[-1]
    assert sequence.abs().sum() > 0
    mask = batch["loss_mask"]
    # the policy-gradient term sees GRPO's outcome advantage on every valid token, nothing from the teacher
    torch.testing.assert_close(batch["advantages"], sequence[:, None] * mask)
    with torch.no_grad():
        mixed = trainer._compute_loss(trainer.model, batch)
        trainer.args.vgs_mode = "alone"
        alone = trainer._compute_loss(trainer.model, batch)
    # on-policy (one step per rollout) the ratio is 1, so the policy loss is -mean_i A_i over sequences with tokens
    has_tokens = mask.sum(1) > 0
    policy = -(sequence * has_tokens).sum() / len(sequence)
    assert mixed.item() == pytest.approx(0.7 * policy.item() + 0.3 * alone.item(), rel=1e-4, abs=1e-6)
    assert trainer.state.log_history[0]["vgs/eta"] == pytest.approx(0.41)


# ---------------------------------------------------------------------------------------------------------------------
# vOPD top-k baseline, TIP Q3-only and entropy sampling, Uni-OPD prompt-group masking: the pure functions.


def test_top_k_reverse_kl_by_hand():
    # identity heads: the hidden state is the logit vector
    log_p = torch.tensor([[0.5, 0.3, 0.2]]).log()
    log_q = torch.tensor([[0.2, 0.2, 0.6]]).log()
    eye = torch.eye(3)
    got = F.top_k_reverse_kl(log_p, eye, log_q, eye, k=2)
    # S = {0, 1}: p_k = (0.625, 0.375), q_k = (0.5, 0.5)
    expected = 0.625 * math.log(0.625 / 0.5) + 0.375 * math.log(0.375 / 0.5)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    exact = (log_p.exp() * (log_p - log_q)).sum()
    assert F.top_k_reverse_kl(log_p, eye, log_q, eye, k=3).item() == pytest.approx(exact.item(), rel=1e-6)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [1, 4, 37])
def test_top_k_reverse_kl_matches_a_float64_reference(seed, k):
    g = torch.Generator().manual_seed(seed)
    n, vocab, h_s, h_t = 11, 37, 6, 9
    h_p, h_q = torch.randn(n, h_s, generator=g), torch.randn(n, h_t, generator=g)
    w_s, w_t = torch.randn(vocab, h_s, generator=g), torch.randn(vocab, h_t, generator=g)
    b_s, b_t = torch.randn(vocab, generator=g), torch.randn(vocab, generator=g)
    caps = {"student_scale": 0.7, "teacher_scale": 1.3, "teacher_softcap": 3.0}
    got = F.top_k_reverse_kl(h_p, w_s, h_q, w_t, k, b_s, b_t, token_chunk=4, vocab_chunk=5, **caps)
    z_p = (h_p.double() @ w_s.double().T + b_s.double()) * 0.7
    z_q = 3.0 * torch.tanh((h_q.double() @ w_t.double().T + b_t.double()) * 1.3 / 3.0)
    top = z_p.topk(k, dim=1).indices
    log_p, log_q = z_p.gather(1, top).log_softmax(-1), z_q.gather(1, top).log_softmax(-1)
    expected = (log_p.exp() * (log_p - log_q)).sum(-1)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    assert (got >= -1e-6).all()


def test_top_k_reverse_kl_gathers_the_teacher_rows_in_pieces(monkeypatch):
    g = torch.Generator().manual_seed(5)
    h_p, h_q, w_s, w_t = (torch.randn(shape, generator=g) for shape in ((9, 4), (9, 6), (30, 4), (30, 6)))
    whole = F.top_k_reverse_kl(h_p, w_s, h_q, w_t, 5)
    monkeypatch.setattr(F, "_GATHER_ELEMENTS", 1)  # one position at a time
    torch.testing.assert_close(F.top_k_reverse_kl(h_p, w_s, h_q, w_t, 5), whole)


def test_tip_rules_by_hand():
    high_entropy = torch.tensor([True, True, False, False])
    high_divergence = torch.tensor([True, False, True, False])
    assert F.tip_keep("entropy", high_entropy).tolist() == [True, True, False, False]
    assert F.tip_keep("quadrant", high_entropy, high_divergence).tolist() == [True, True, True, False]
    assert F.tip_keep("q3", high_entropy, high_divergence).tolist() == [False, False, True, False]
    with pytest.raises(ValueError, match="TIP rule"):
        F.tip_keep("q5", high_entropy, high_divergence)


def test_entropy_sampling_keys_by_hand_and_in_distribution():
    keys = F.entropy_sampling_keys(torch.tensor([2.0, 0.5, 0.0]), torch.tensor([0.25, 0.25, 0.9]))
    assert keys[:2].tolist() == pytest.approx([math.log(0.25) / 2, math.log(0.25) / 0.5])
    assert keys[2] == torch.finfo(torch.float32).min  # no entropy: drawn last, and finite
    # keeping the largest key draws one token with probability proportional to entropy: 3:1:0
    g = torch.Generator().manual_seed(0)
    entropy = torch.tensor([3.0, 1.0, 0.0])
    first = torch.stack([F.entropy_sampling_keys(entropy, torch.rand(3, generator=g)).argmax() for _ in range(4000)])
    assert (first == 0).float().mean().item() == pytest.approx(0.75, abs=0.03)
    assert (first == 2).sum() == 0
    # keeping two: the second draw is from what is left (P(token 1 kept) = 1/4 + 3/4 * 1 = 1 with a zero third)
    pairs = [F.entropy_sampling_keys(entropy, torch.rand(3, generator=g)).topk(2).indices for _ in range(200)]
    assert all(set(p.tolist()) == {0, 1} for p in pairs)


def test_prompt_group_mask_by_hand():
    # group 0: correct means 0.9, 0.5; incorrect 0.2, 0.4 -> minmax margin 0.1 < 0.3: discarded
    # group 1: correct 1.0; incorrect -0.5, 0.0 (one absent) -> margin 1.0: kept
    # group 2: all correct -> no margin: kept
    means = torch.tensor([0.9, 0.5, 0.2, 0.4, 1.0, -0.5, 0.0, 7.0, 0.1, 0.2, 0.3, 0.4])
    correct = torch.tensor([1, 1, 0, 0, 1, 0, 0, 0, 1, 1, 1, 1]).bool()
    present = torch.ones(12, dtype=torch.bool)
    present[7] = False
    keep, gap = U.margin_group_mask(means, correct, present, 4, 0.3)
    assert keep.tolist() == [False] * 4 + [True] * 8
    assert gap[:2].tolist() == pytest.approx([0.1, 1.0]) and math.isnan(gap[2])
    # the class means: group 0's gap is 0.7 - 0.3 = 0.4 >= 0.3, kept
    keep, _ = U.margin_group_mask(means, correct, present, 4, 0.3, mode="mean")
    assert keep.all()


# ---------------------------------------------------------------------------------------------------------------------
# The same options end to end on tiny text models, against float64 references from plain logits.


def completion_log_softmax(model, batch):
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    length = batch["completion_ids"].size(1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention_mask).logits.double()
    return logits[:, -length - 1 : -1].log_softmax(-1)


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
    records = text_records(trainer)
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


def text_records(trainer):
    """Each generation batch with the student's and teacher's full float64 log-softmax at generation time."""
    records, generate = [], trainer._generate_and_score_completions

    def spy(inputs):
        batch = generate(inputs)
        student = trainer.accelerator.unwrap_model(trainer.model)
        records.append(
            (batch, completion_log_softmax(student, batch), completion_log_softmax(teacher_of(trainer), batch))
        )
        return batch

    trainer._generate_and_score_completions = spy
    return records


def teacher_of(trainer):
    return trainer.accelerator.unwrap_model(trainer.teacher_model)


def whiten(signal, mask):
    values = signal[mask]
    return (signal - values.mean()) / torch.sqrt(values.var() + 1e-8) * mask


def test_tip_q3_only_keeps_low_entropy_high_divergence_tokens(cpu_config_kwargs):
    trainer = text_trainer(cpu_config_kwargs, token_selection="q3", token_selection_ratio=0.5)
    records = text_records(trainer)
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
    records = text_records(trainer)
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


def parity_reward(completions, **kwargs):
    return [float(len(str(c)) % 2 == 0) for c in completions]


def test_uniopd_prompt_group_mask_end_to_end(cpu_config_kwargs):
    trainer = text_trainer(
        cpu_config_kwargs,
        reward_funcs=parity_reward,
        margin_calibration="group_mask",
        margin_mode="minmax",
        margin_delta=0.3,
        per_device_train_batch_size=8,
        num_generations=4,
        max_steps=3,
    )
    records, rewards = [], []
    generate, calculate_rewards = trainer._generate_and_score_completions, trainer._calculate_rewards

    def spy(inputs):
        batch = generate(inputs)
        student = trainer.accelerator.unwrap_model(trainer.model)
        p, q = completion_log_softmax(student, batch), completion_log_softmax(teacher_of(trainer), batch)
        records.append((batch, p, q, rewards[-1][:, 0] >= 0.5))
        return batch

    trainer._generate_and_score_completions = spy
    trainer._calculate_rewards = lambda *args: rewards.append(calculate_rewards(*args)) or rewards[-1]
    trainer.train()
    discarded = 0
    for batch, p, q, correct in records:
        mask = batch["completion_mask"].bool()
        sampled = batch["completion_ids"].unsqueeze(-1)
        signal = (q.gather(-1, sampled) - p.gather(-1, sampled)).squeeze(-1).clamp(-5, 5)
        before = whiten(signal, mask)
        means = (before * mask).sum(1) / mask.sum(1).clamp(min=1)
        expected_keep = torch.ones(len(means), dtype=torch.bool)
        for g in range(len(means) // 4):
            rows = slice(4 * g, 4 * g + 4)
            good, bad = correct[rows] & mask[rows].any(1), ~correct[rows] & mask[rows].any(1)
            if good.any() and bad.any():  # the paper's margin: min over correct - max over incorrect
                margin = means[rows][good].min() - means[rows][bad].max()
                expected_keep[rows] = bool(margin >= 0.3)
                discarded += int(margin < 0.3)
        torch.testing.assert_close(batch["advantages"].double(), before * expected_keep[:, None], rtol=1e-4, atol=1e-4)
    assert discarded > 0, "some groups should fail the margin"


# ---------------------------------------------------------------------------------------------------------------------
# docs/papers.md: every row's config builds, and its "Needs" column says when reward functions are required.

PAPERS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "papers.md"


def paper_rows() -> list[dict]:
    """The rows of the settings table, as {paper, setting, config (keyword arguments), needs}."""
    lines = PAPERS_PAGE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Paper | Setting | Config |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        paper, setting, config, needs, source = (cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1]))
        assert config.startswith("`") and config.endswith("`"), f"{setting}: the config is one code span"
        call = ast.parse(f"GNDPOConfig({config.strip('`')})", mode="eval").body
        assert not call.args, f"{setting}: keywords only"
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        rows.append({"paper": paper, "setting": setting, "config": kwargs, "needs": needs, "source": source})
    return rows


def test_the_papers_table_covers_every_named_setting():
    settings = {(row["paper"], row["setting"]) for row in paper_rows()}
    names = " ; ".join(f"{paper}: {setting}" for paper, setting in settings)
    for expected in (
        "GNDPO: GNDPO",
        "GNDPO: OPD baseline",
        "Uni-OPD: Margin shift",
        "Uni-OPD: Margin mask",
        "Uni-OPD: Prompt-group masking",
        "Uni-OPD: Online correctness-aware balancing",
        "ExOPD / G-OPD: Reward extrapolation",
        "ExOPD / G-OPD: Reward correction",
        "ExOPD / G-OPD: Multi-teacher ExOPD",
        "Uni-OPD / G-OPD: Several domain teachers",
        "Uni-OPD: Cross-modal",
        "vOPD: Value baseline, full vocabulary",
        "vOPD: Value baseline, top-k",
        "TIP: Entropy, top 50%",
        "TIP: Entropy-based sampling",
        "TIP: Two axes",
        "TIP: Q3 only",
        "VGS: VGS alone",
        "VGS: GRPO + VGS",
    ):
        assert expected in names, f"docs/papers.md has no row for {expected}"


@pytest.mark.parametrize("row", paper_rows(), ids=lambda row: f"{row['paper']}: {row['setting']}")
def test_each_papers_setting_builds_its_config(row, cpu_config_kwargs):
    config = GNDPOConfig(**cpu_config_kwargs(**row["config"]))
    for name, value in row["config"].items():
        assert getattr(config, name) == value, name
    # the "Needs" column is right about reward functions: the trainer's argument check agrees
    if "reward_funcs" in row["needs"]:
        with pytest.raises(ValueError, match="reward_funcs"):
            checks.check_arguments(config, None, "teacher")
        checks.check_arguments(config, [length_reward], "teacher")
    else:
        checks.check_arguments(config, None, "teacher")
    assert ("a vision-language student and teacher" in row["needs"]) == config.visual_gradient_steering


@pytest.mark.slow
def test_prompt_group_mask_and_entropy_sampling_span_two_processes(two_process_runs):
    """Groups of 4 split 2 + 2 across the ranks: both ranks discard the same groups, and TIP's entropy sampling keeps
    half of the generation batch's tokens, with the vOPD top-k baseline on as well."""
    ranks = two_process_runs["papers"]
    decisions = [calls(r, "margin_group_mask") for r in ranks]
    assert len(decisions[0]) == len(decisions[1]) == 3
    discarded = 0
    batches = zip(calls(ranks[0], "batch"), calls(ranks[1], "batch"), decisions[0], decisions[1], strict=True)
    for batch0, batch1, call0, call1 in batches:
        for a, b in zip(call0["args"], call1["args"], strict=True):
            assert a == b if not isinstance(a, torch.Tensor) else torch.equal(a, b)
        keep, _ = call0["result"]
        assert torch.equal(keep, call1["result"][0])
        advantages = torch.cat([batch0["advantages"], batch1["advantages"]])
        assert (advantages[~keep] == 0).all()
        discarded += (~keep).sum().item() // 4
        kept = torch.cat([batch0["mask"], batch1["mask"]]).sum().item()
        tokens = torch.cat([batch0["completion_mask"], batch1["completion_mask"]]).sum().item()
        assert abs(kept - 0.5 * tokens) <= 1
    assert discarded > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"value_baseline_top_k": 8}, "set value_baseline=True too"),
        ({"value_baseline": True, "value_baseline_top_k": 0}, "value_baseline_top_k must be >= 1"),
        ({"token_selection": "q4"}, "'q3' or 'entropy_sampling'"),
        ({"margin_calibration": "group_mask", "margin_scope": "global"}, "set margin_scope='group'"),
        ({"margin_calibration": "groups"}, "'group_mask'"),
    ],
)
def test_new_estimator_options_are_validated(overrides, message, cpu_config_kwargs):
    with pytest.raises(ValueError, match=message):
        GNDPOConfig(**cpu_config_kwargs(**overrides))


# ---------------------------------------------------------------------------------------------------------------------
# Issue 24: the papers' settings as the pages and the config's help state them.

DOCS = PAPERS_PAGE.parent


def row_named(paper: str, setting: str) -> dict:
    (row,) = [r for r in paper_rows() if r["paper"] == paper and r["setting"].startswith(setting)]
    return row


def code_block(page: str, heading: str, language: str) -> str:
    """The first ```language block after `heading` in docs/<page>."""
    text = (DOCS / page).read_text()
    after = text[text.index(f"\n{heading}\n") :]
    return re.search(rf"```{language}\n(.*?)```", after, re.S)[1]


def uniopd_reference_kwargs() -> dict:
    """The keywords of the `GNDPOConfig(...)` call of docs/uniopd.md's reference settings."""
    tree = ast.parse(code_block("uniopd.md", "## Reference settings", "python"))
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "GNDPOConfig")
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords}


def test_uniopd_reference_settings_are_one_config_on_both_pages(cpu_config_kwargs):
    """docs/uniopd.md's example, its command line and docs/papers.md's "Reference recipe" row describe one config,
    which reproduces the reference: the raw log-ratio (no whitening), no effective clamp under the guard."""
    row = row_named("Uni-OPD", "Reference recipe")["config"]
    example = uniopd_reference_kwargs()
    batch = {"output_dir", "num_generations", "per_device_train_batch_size", "gradient_accumulation_steps"}
    from_row = GNDPOConfig(**cpu_config_kwargs(**row))
    from_example = GNDPOConfig(**cpu_config_kwargs(**{k: v for k, v in example.items() if k not in batch}))
    for name in sorted(set(row) | set(example) - batch):
        assert getattr(from_row, name) == getattr(from_example, name), name
    assert from_row.normalization_scope == "none" and from_row.token_signal_clamp == 10.0
    assert from_row.max_abs_log_ratio == 10.0 and from_row.token_signal_clamp >= from_row.max_abs_log_ratio
    assert (from_row.margin_mode, from_row.margin_delta, from_row.balance_ratio) == ("mean", 0.4, 1.0)
    flags = dict(re.findall(r"--(\w+) (\S+)", code_block("uniopd.md", "## Reference settings", "bash")))
    for name, value in row.items():
        assert name in flags and type(value)(flags[name]) == value, f"the command line lacks --{name} {value}"


def test_margin_delta_states_its_units_in_the_help_and_the_generated_page():
    field = GNDPOConfig.__dataclass_fields__["margin_delta"]
    assert "standard deviations" in field.metadata["help"] and "'none'" in field.metadata["help"]
    (line,) = [x for x in (DOCS / "configuration.md").read_text().splitlines() if x.startswith("| `margin_delta`")]
    assert "standard deviations" in line and 'normalization_scope="none"' in line and "token_signal_clamp=10.0" in line


@pytest.mark.parametrize(
    ("calibration", "mode", "expected"),
    [
        ("group_mask", None, "minmax"),  # the paper's m(q) with its prompt-group mask
        ("shift", None, "mean"),  # the reference scripts
        ("mask", None, "mean"),
        ("none", None, "mean"),
        ("group_mask", "mean", "mean"),  # an explicit choice is kept
        ("shift", "minmax", "minmax"),
    ],
)
def test_margin_mode_defaults_to_each_calibrations_pairing(calibration, mode, expected, cpu_config_kwargs):
    overrides = {"margin_calibration": calibration} | ({} if mode is None else {"margin_mode": mode})
    assert GNDPOConfig(**cpu_config_kwargs(**overrides)).margin_mode == expected


def test_the_papers_group_mask_row_gets_the_papers_margin(cpu_config_kwargs):
    row = row_named("Uni-OPD", "Prompt-group masking")["config"]
    assert "margin_mode" not in row and GNDPOConfig(**cpu_config_kwargs(**row)).margin_mode == "minmax"


def test_vgs_refuses_a_sampling_temperature_it_would_not_apply(cpu_config_kwargs):
    with pytest.raises(ValueError, match="set temperature=1.0, or visual_gradient_steering=False"):
        GNDPOConfig(**cpu_config_kwargs(visual_gradient_steering=True, temperature=0.7))
    GNDPOConfig(**cpu_config_kwargs(visual_gradient_steering=True, temperature=1.0))
    GNDPOConfig(**cpu_config_kwargs(temperature=0.7))  # GNDPO itself applies it


def test_vgs_eta_says_which_pair_it_was_measured_for():
    help_text = GNDPOConfig.__dataclass_fields__["vgs_eta"].metadata["help"]
    assert "Qwen3-VL-8B -> 2B" in help_text and "vgs_eta_measure_steps" in help_text
    (line,) = [x for x in (DOCS / "vgs.md").read_text().splitlines() if x.startswith("| `vgs_eta` |")]
    assert "Qwen3-VL-8B -> 2B" in line and "vgs_eta_measure_steps" in line
    assert "one pair" in row_named("VGS", "VGS alone (main results")["source"]


def tip_share(rule: str, ratio: float, n: int = 200_000) -> float:
    """The share of tokens a TIP rule keeps when entropy and divergence are drawn independently."""
    g = torch.Generator().manual_seed(0)
    entropy, divergence = torch.rand(n, generator=g), torch.rand(n, generator=g)
    if rule == "entropy_sampling":
        return ratio  # exactly that share is drawn
    high_entropy = entropy >= torch.quantile(entropy, 1 - ratio)
    high_divergence = divergence >= torch.quantile(divergence, 1 - ratio)
    return F.tip_keep(rule, high_entropy, high_divergence).float().mean().item()


@pytest.mark.parametrize("row", [r for r in paper_rows() if r["paper"] == "TIP"], ids=lambda r: r["setting"])
def test_each_tip_row_states_the_share_it_keeps(row):
    stated = re.search(r"keeps (?:about )?(\d+)%", row["source"])
    assert stated, f"{row['setting']}: say the share of tokens it keeps"
    share = tip_share(row["config"]["token_selection"], row["config"]["token_selection_ratio"])
    assert abs(100 * share - int(stated[1])) <= 1.5, (row["setting"], share)
    # and the paper's bound, where the setting quotes one
    bound = re.search(r"(?:<|under |fewer than )(\d+)%", row["setting"] + " " + row["source"])
    if bound and row["config"]["token_selection"] == "q3":
        assert 100 * share < int(bound[1])


def test_g_opd_rows_aggregate_like_its_code():
    """G-OPD's `token-mean` runs on micro-batches of one sequence in its scripts: sequence-mean-token-mean."""
    rows = [r for r in paper_rows() if r["paper"] == "ExOPD / G-OPD"]
    assert len(rows) == 3 and all(r["config"].get("loss_type") == "grpo" for r in rows)


@pytest.mark.parametrize(
    ("overrides", "hinted"),
    [({}, True), ({"vgs_eta": 0.36}, True), ({"vgs_eta_measure_steps": 2}, False), ({"vgs_eta": 1.0}, False)],
)
def test_a_fixed_vgs_eta_gets_a_one_time_hint_to_measure_it(overrides, hinted, cpu_config_kwargs, caplog):
    student, processor = make_vlm("qwen2_vl", seed=0)
    with caplog.at_level(logging.WARNING):
        GNDPOTrainer(
            model=student,
            teacher_model=make_vlm("qwen2_vl", seed=1)[0],
            args=GNDPOConfig(**cpu_config_kwargs(visual_gradient_steering=True, **overrides)),
            train_dataset=mixed_dataset(),
            processing_class=processor,
        )
    assert caplog.text.count("set vgs_eta_measure_steps") == (1 if hinted else 0)
    if hinted:
        assert "one pair only" in caplog.text and f"vgs_eta={overrides.get('vgs_eta', 0.41)}" in caplog.text

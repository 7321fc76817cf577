"""Paper settings beyond the GNDPO core: the one-step-per-rollout warning, VGS modes, the vOPD top-k baseline, TIP's
Q3-only selection and entropy sampling, Uni-OPD prompt-group masking, and the table in docs/papers.md."""

import logging

import pytest
import torch
from test_trainer import changed, snapshot
from test_vgs_trainer import mixed_dataset, record_batches
from tiny_models import make_text_dataset, make_text_model, make_tokenizer, make_vlm
from trl import GRPOTrainer

from trl_gndpo import GNDPOConfig, GNDPOTrainer, checks, vgs


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


def test_grpo_plus_vgs_trains_on_the_outcome_advantage_mixed_with_vgs(cpu_config_kwargs, monkeypatch):
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
    )
    records = record_batches(trainer)
    before = snapshot(trainer.model)
    trainer.train()
    assert changed(before, trainer.model)
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

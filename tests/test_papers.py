"""Paper settings beyond the GNDPO core: the one-step-per-rollout warning, VGS modes, the vOPD top-k baseline, TIP's
Q3-only selection and entropy sampling, Uni-OPD prompt-group masking, and the table in docs/papers.md."""

import logging

import pytest

from tiny_models import make_text_dataset, make_text_model, make_tokenizer

from trl_gndpo import GNDPOConfig, GNDPOTrainer, checks


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

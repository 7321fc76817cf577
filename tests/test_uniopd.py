"""Uni-OPD: margin calibration and balancing on hand-checkable inputs, then end to end on tiny models."""

import math
import warnings

import pytest
import torch
from tiny_models import make_text_dataset, make_text_model, make_tokenizer

from trl_gndpo import GNDPOConfig, GNDPOTrainer
from trl_gndpo import uniopd as U

T, F_ = True, False


def test_response_means_and_presence():
    advantages = torch.tensor([[1.0, 3.0, 9.0], [2.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    means, present = U.response_means(advantages, mask)
    assert means.tolist() == [2.0, 2.0, 0.0] and present.tolist() == [T, T, F_]


def test_margin_gap_by_hand():
    means = torch.tensor([[1.0, 0.5, 0.2, -0.1], [1.0, 2.0, 3.0, 4.0]])
    correct = torch.tensor([[T, T, F_, F_], [T, T, T, T]])
    present = torch.ones(2, 4, dtype=torch.bool)
    mean_gap = U.margin_gap(means, correct, present, "mean")
    assert mean_gap[0].item() == pytest.approx(0.75 - 0.05) and math.isnan(mean_gap[1])
    assert U.margin_gap(means, correct, present, "minmax")[0].item() == pytest.approx(0.5 - 0.2)


@pytest.mark.parametrize(
    "mode, direction, expected",
    [
        # mean gap 0.2 - 0.1 = 0.1 -> shift 0.3
        ("mean", "both", [0.15, 0.15, -0.15, -0.15]),
        ("mean", "correct_up", [0.3, 0.3, 0.0, 0.0]),
        ("mean", "incorrect_down", [0.0, 0.0, -0.3, -0.3]),
        # minmax gap min(0.3, 0.1) - max(0.2, 0.0) = -0.1 -> shift 0.5
        ("minmax", "both", [0.25, 0.25, -0.25, -0.25]),
    ],
)
def test_margin_shift_by_hand(mode, direction, expected):
    means = torch.tensor([0.3, 0.1, 0.2, 0.0, 0.9, 0.8, 0.1, 0.0, 0.5, 0.5, 0.5, 0.5])
    correct = torch.tensor([T, T, F_, F_, T, T, F_, F_, T, T, T, T])
    present = torch.ones(12, dtype=torch.bool)
    shift, gap = U.margin_shift(means, correct, present, 4, delta=0.4, mode=mode, direction=direction)
    torch.testing.assert_close(shift[:4], torch.tensor(expected))
    assert (shift[4:] == 0).all(), "a group already past the margin, and an all-correct group, are left alone"
    assert math.isnan(gap[2])
    after = U.margin_gap((means + shift).view(3, 4), correct.view(3, 4), present.view(3, 4), mode)
    assert after[0].item() == pytest.approx(0.4)


def test_margin_shift_ignores_absent_responses():
    means = torch.tensor([0.3, 0.1, 0.2, 7.0])
    correct = torch.tensor([T, T, F_, F_])
    present = torch.tensor([T, T, T, F_])  # the last one has no valid token: not in the incorrect class
    shift, gap = U.margin_shift(means, correct, present, 4, delta=0.4)
    assert gap[0].item() == pytest.approx(0.2 - 0.2) and shift[3] == 0
    torch.testing.assert_close(shift[:3], torch.tensor([0.2, 0.2, -0.2]))


def test_margin_mask_greedy_order():
    # mean_c = 0.325, mean_i = 0.1, gap 0.225. Dropping the lowest correct (-0.5) gives 0.6 - 0.1 = 0.5; dropping
    # the highest incorrect (0.7) gives 0.325 - (-0.1) = 0.425: the correct one goes, and 0.5 >= 0.4 stops.
    means = torch.tensor([0.9, 0.8, 0.1, -0.5, 0.7, 0.0, -0.1, -0.2])
    correct = torch.tensor([T, T, T, T, F_, F_, F_, F_])
    keep, gap = U.margin_mask(means, correct, torch.ones(8, dtype=torch.bool), 8, delta=0.4)
    assert gap.item() == pytest.approx(0.225)
    assert keep.tolist() == [T, T, T, F_, T, T, T, T]


def test_margin_mask_retain_floor_and_alternation():
    # Unreachable delta. Step 1: dropping correct -1.0 -> gap -0.45, dropping incorrect 0.5 -> -0.9: drop the correct.
    # Step 2: the correct class is at its floor (1 of 2 with ratio 0.5); dropping incorrect 0.5 -> -0.4: drop it.
    # Step 3: both classes at their floor: stop.
    means = torch.tensor([0.0, -1.0, 0.5, 0.4])
    correct = torch.tensor([T, T, F_, F_])
    keep, _ = U.margin_mask(means, correct, torch.ones(4, dtype=torch.bool), 4, delta=5.0, min_retain_ratio=0.5)
    assert keep.tolist() == [T, F_, F_, T]


def test_margin_mask_stops_when_no_removal_helps():
    means = torch.tensor([0.0, 0.0, 0.5, 0.5])
    correct = torch.tensor([T, T, F_, F_])
    keep, _ = U.margin_mask(means, correct, torch.ones(4, dtype=torch.bool), 4, delta=0.4, mode="minmax")
    assert keep.all()


def test_balance_classes():
    correct = torch.tensor([T, T, T, T, T, T, F_, F_] + [T] * 8 + [F_, T, F_, F_, F_, F_, F_, F_])
    present = torch.ones(24, dtype=torch.bool)
    keep = U.balance_classes(correct, present, 8, ratio=1.0, generator=torch.Generator().manual_seed(0))
    assert keep[:8].sum() == 4 and keep[6:8].all(), "6 correct : 2 incorrect -> 2 : 2, incorrect ones all kept"
    assert keep[8:16].all(), "an all-correct group is untouched"
    assert keep[16:].sum() == 2 and keep[17], "1 correct : 7 incorrect -> 1 : 1"
    again = U.balance_classes(correct, present, 8, ratio=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(keep, again), "same seed, same drops (every process agrees)"
    keep2 = U.balance_classes(correct, present, 8, ratio=2.0, generator=torch.Generator().manual_seed(0))
    assert keep2[:6].sum() == 4 and keep2[6:8].all()
    assert keep2[16:].all(), "1 correct : 7 incorrect at 2:1 targets floor(1 / 2) = 0 incorrect: not reduced"


def test_difficulty_balanced_indices():
    rates = torch.tensor([0.0, 1.0, 0.1, 0.15, 0.5, 0.9, 0.95, 0.92])
    indices = U.difficulty_balanced_indices(rates, num_bins=5, seed=0)
    counts = torch.bincount(indices, minlength=8)
    assert (counts >= 1).all() and counts[0] == 1 and counts[1] == 1, "every prompt once; 0 and 1 not up-sampled"
    # bins of the mid rates: [0.1, 0.15] -> 0, [0.5] -> 2, [0.9, 0.95, 0.92] -> 4: each brought to 3
    assert counts[2] + counts[3] == 3 and counts[4] == 3 and counts[5:].sum() == 3
    assert torch.equal(indices, U.difficulty_balanced_indices(rates, num_bins=5, seed=0))
    assert not torch.equal(indices, U.difficulty_balanced_indices(rates, num_bins=5, seed=1))


# ----------------------------------------------------------------------------------------------------------------
# End to end: a rule reward on tiny models


def parity_reward(completions, **kwargs):
    """'Correct' when the completion text has an even number of characters: a mix within most groups."""
    return [float(len(str(c)) % 2 == 0) for c in completions]


def train_recording(cpu_config_kwargs, **overrides):
    trainer = GNDPOTrainer(
        model=make_text_model(seed=0),
        teacher_model=make_text_model(seed=1, hidden_size=128),
        reward_funcs=parity_reward,
        args=GNDPOConfig(
            **cpu_config_kwargs(per_device_train_batch_size=8, num_generations=4, max_steps=3, **overrides)
        ),
        train_dataset=make_text_dataset(16),
        processing_class=make_tokenizer(),
    )
    records, rewards = [], []
    generate, calculate_rewards = trainer._generate_and_score_completions, trainer._calculate_rewards

    def spy(inputs):
        batch = generate(inputs)
        records.append((batch, rewards[-1][:, 0] >= 0.5))
        return batch

    trainer._generate_and_score_completions = spy
    trainer._calculate_rewards = lambda *args: rewards.append(calculate_rewards(*args)) or rewards[-1]
    trainer.train()
    return trainer, records


@pytest.mark.parametrize("scope", ["global", "none"])
def test_shift_reaches_the_margin_on_the_advantages_the_loss_sees(scope, cpu_config_kwargs):
    """Calibration runs after normalization, so the margin holds in the units of the final advantages."""
    trainer, records = train_recording(cpu_config_kwargs, margin_calibration="shift", normalization_scope=scope)
    eligible = 0
    for batch, correct in records:
        means, present = U.response_means(batch["advantages"].double(), batch["loss_mask"])
        gap = U.margin_gap(means.view(-1, 4), correct.view(-1, 4), present.view(-1, 4), "mean")
        ok = ~torch.isnan(gap)
        eligible += ok.sum().item()
        assert (gap[ok] >= 0.4 - 1e-5).all()
    assert eligible > 0, "the reward should give mixed groups"
    logs = trainer.state.log_history[0]
    assert logs["uniopd/margin_after"] >= 0.4 - 1e-5 and "uniopd/margin_before" in logs


def test_mask_zeroes_whole_responses(cpu_config_kwargs):
    trainer, records = train_recording(cpu_config_kwargs, margin_calibration="mask", margin_delta=2.0)
    dropped = 0
    for batch, _ in records:
        mask = batch["loss_mask"].bool()
        row_zero = ((batch["advantages"] == 0) | ~mask).all(1) & mask.any(1)
        dropped += row_zero.sum().item()
    assert dropped > 0, "an unreachable margin must drop responses"
    assert trainer.state.log_history[0]["uniopd/calibrated_group_frac"] > 0


def test_balancing_and_guard(cpu_config_kwargs):
    trainer, records = train_recording(cpu_config_kwargs, balance_ratio=1.0, max_abs_log_ratio=0.5)
    mixed = 0
    for batch, correct in records:
        kept = batch["loss_mask"].bool().any(1).view(-1, 4)
        kept_correct, kept_incorrect = (kept & correct.view(-1, 4)).sum(1), (kept & ~correct.view(-1, 4)).sum(1)
        both = (kept_correct > 0) & (kept_incorrect > 0)
        mixed += both.sum().item()
        assert torch.equal(kept_correct[both], kept_incorrect[both]), "1:1 within every mixed group"
    assert mixed > 0
    assert any(log.get("uniopd/balance_dropped_frac", 0) > 0 for log in trainer.state.log_history)
    logs = trainer.state.log_history[0]
    assert 0 < logs["gndpo/valid_token_frac"] < 1, "the 0.5-nat guard must drop some tokens, not all"
    assert "uniopd/balance_dropped_frac" in logs and "uniopd/correct_frac" in logs


def test_uniopd_needs_rewards(cpu_config_kwargs):
    with pytest.raises(ValueError, match="need `reward_funcs`"):
        GNDPOTrainer(
            model=make_text_model(seed=0),
            teacher_model=make_text_model(seed=1),
            args=GNDPOConfig(**cpu_config_kwargs(margin_calibration="shift")),
            train_dataset=make_text_dataset(),
            processing_class=make_tokenizer(),
        )


def test_shift_and_mask_together_are_rejected(cpu_config_kwargs):
    with pytest.raises(ValueError, match="alternatives: pick one"):
        GNDPOConfig(**cpu_config_kwargs(margin_calibration="shift+mask"))


def test_offline_difficulty_balancing_with_sampled_pass_rates():
    from trl_gndpo.uniopd_dataset import difficulty_balanced_dataset, estimate_pass_rates

    dataset = make_text_dataset(6)
    model, tokenizer = make_text_model(seed=0), make_tokenizer()
    with pytest.warns(UserWarning, match="unfinished"):  # a random model never ends within 5 tokens
        rates = estimate_pass_rates(model, tokenizer, dataset, parity_reward, num_samples=4, max_new_tokens=5, seed=0)
        again = estimate_pass_rates(model, tokenizer, dataset, parity_reward, num_samples=4, max_new_tokens=5)
    assert len(rates) == 6 and all(r in (0.0, 0.25, 0.5, 0.75, 1.0) for r in rates)
    assert rates == again
    assert 0 < sum(rates) < 6, "a parity reward on random text gives mixed outcomes"

    balanced = difficulty_balanced_dataset(dataset.add_column("pass_rate", rates), "pass_rate", num_bins=4, seed=0)
    expected = U.difficulty_balanced_indices(torch.tensor(rates), num_bins=4, seed=0)
    assert balanced["prompt"] == [dataset[i]["prompt"] for i in expected.tolist()]
    assert {str(p) for p in balanced["prompt"]} == {str(p) for p in dataset["prompt"]}
    with pytest.raises(ValueError, match="must lie in"):
        difficulty_balanced_dataset(dataset, [1.5] * 6)


def test_pass_rates_sample_with_the_training_cap_and_warn_when_it_truncates(cpu_config_kwargs, monkeypatch):
    from trl_gndpo.uniopd_dataset import estimate_pass_rates

    dataset = make_text_dataset(2)
    model, tokenizer = make_text_model(seed=0), make_tokenizer()
    with pytest.raises(ValueError, match="max_completion_length"):  # no silent 256-token default
        estimate_pass_rates(model, tokenizer, dataset, parity_reward)
    calls, generate = [], model.generate

    def spy(**kwargs):
        calls.append(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    args = GNDPOConfig(**cpu_config_kwargs(max_completion_length=3, temperature=0.7))
    with pytest.warns(UserWarning, match="reached max_new_tokens=3 unfinished"):  # a random model never stops in 3
        estimate_pass_rates(model, tokenizer, dataset, parity_reward, args=args, num_samples=2)
    assert {(c["max_new_tokens"], c["temperature"]) for c in calls} == {(3, 0.7)}

    def finished(**kwargs):  # every sample ends with eos at once: nothing truncated, no warning
        prompt = kwargs["input_ids"].repeat(kwargs["num_return_sequences"], 1)
        return torch.cat([prompt, torch.full((len(prompt), 1), tokenizer.eos_token_id)], 1)

    monkeypatch.setattr(model, "generate", finished)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        estimate_pass_rates(model, tokenizer, dataset, parity_reward, args=args, num_samples=2)

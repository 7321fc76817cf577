"""The GNDPO math, vOPD's top-k baseline and TIP's token rules against float64 references written here, on random
inputs and masks."""

import math

import pytest
import torch

from trl_gndpo import functional as F


def random_batch(seed, batch=6, length=9, p_valid=0.7, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    teacher = -torch.rand(batch, length, generator=g, dtype=torch.float64) * 12
    student = -torch.rand(batch, length, generator=g, dtype=torch.float64) * 12
    mask = torch.rand(batch, length, generator=g) < p_valid
    return teacher.to(dtype), student.to(dtype), mask


def reference_whiten(signal, mask, eps):
    """Straight from the definition, one valid token at a time, in float64."""
    values = [float(signal[i, j]) for i in range(signal.shape[0]) for j in range(signal.shape[1]) if mask[i, j]]
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    out = torch.zeros(signal.shape, dtype=torch.float64)
    for i in range(signal.shape[0]):
        for j in range(signal.shape[1]):
            if mask[i, j]:
                out[i, j] = (float(signal[i, j]) - mean) / math.sqrt(var + eps)
    return out, mean, var


@pytest.mark.parametrize("seed", range(5))
def test_clamped_log_ratio_matches_reference(seed):
    teacher, student, mask = random_batch(seed)
    r, valid = F.clamped_log_ratio(teacher, student, mask, bound=5.0)
    expected = ((teacher.double() - student.double()).clamp(-5, 5)) * mask
    assert torch.equal(valid, mask)
    torch.testing.assert_close(r.double(), expected, rtol=1e-6, atol=1e-6)
    assert (r.abs() == 5).any(), "the random inputs should exercise the clamp"


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_whitened_advantages_match_reference(seed, dtype):
    teacher, student, mask = random_batch(seed, dtype=dtype)
    signal, valid = F.clamped_log_ratio(teacher, student, mask, 5.0)
    adv, mean, var = F.whitened_advantages(signal, valid, eps=1e-8)
    expected, ref_mean, ref_var = reference_whiten(signal, valid, 1e-8)
    assert adv.dtype == dtype
    torch.testing.assert_close(adv.double(), expected, rtol=1e-5, atol=1e-5)
    assert mean.item() == pytest.approx(ref_mean, rel=1e-6, abs=1e-9)
    assert var.item() == pytest.approx(ref_var, rel=1e-6)
    # whitened: zero mean and unit (unbiased) variance over the valid tokens, exactly zero elsewhere
    assert adv[valid].double().mean().item() == pytest.approx(0.0, abs=1e-5)
    assert adv[valid].double().var().item() == pytest.approx(1.0, rel=1e-4)
    assert (adv[~valid] == 0).all()


def test_whitening_is_global_not_per_row():
    """The statistics are those of all valid tokens pooled, not of each sequence or prompt group."""
    signal = torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]])
    mask = torch.ones_like(signal, dtype=torch.bool)
    adv, mean, _ = F.whitened_advantages(signal, mask)
    assert mean.item() == pytest.approx(11.0)
    assert (adv[0] < 0).all() and (adv[1, 1:] > 0).all()


def test_split_moments_summed_equal_concatenated_batch():
    """What the all-reduce does: moments of shards add up to the moments of the whole batch."""
    teacher, student, mask = random_batch(7, batch=8)
    signal, valid = F.clamped_log_ratio(teacher, student, mask, 5.0)
    shards = [(signal[:3], valid[:3]), (signal[3:], valid[3:])]
    calls = []

    def fake_all_reduce(local):
        calls.append(local)
        return sum(F.masked_moments(s, m) for s, m in shards)

    adv_shard0, mean, var = F.whitened_advantages(*shards[0], all_reduce_sum=fake_all_reduce)
    adv_full, full_mean, full_var = F.whitened_advantages(signal, valid)
    assert len(calls) == 1
    torch.testing.assert_close(mean, full_mean)
    torch.testing.assert_close(var, full_var)
    torch.testing.assert_close(adv_shard0, adv_full[:3])


def test_all_masked_gives_zero_advantages():
    signal = torch.randn(3, 4)
    adv, mean, var = F.whitened_advantages(signal, torch.zeros(3, 4, dtype=torch.bool))
    assert torch.equal(adv, torch.zeros(3, 4))
    assert mean.item() == 0 and var.item() == 0


def test_single_valid_token_gives_zero_not_nan():
    signal = torch.randn(2, 3)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    mask[1, 2] = True
    adv, _, var = F.whitened_advantages(signal, mask)
    assert torch.equal(adv, torch.zeros(2, 3))
    assert var.item() == 0


def test_constant_signal_gives_zero_advantages():
    signal = torch.full((3, 5), 2.5)
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(0)) < 0.6
    adv, _, var = F.whitened_advantages(signal, mask)
    assert var.item() == pytest.approx(0.0, abs=1e-12)
    assert torch.isfinite(adv).all() and adv.abs().max().item() < 1e-3


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_log_probs_are_masked_not_propagated(bad):
    teacher, student, mask = random_batch(3)
    mask[0, 0] = mask[2, 4] = True
    teacher[0, 0] = bad
    student[2, 4] = bad
    signal, valid = F.clamped_log_ratio(teacher, student, mask, 5.0)
    assert not valid[0, 0] and not valid[2, 4]
    assert valid.sum() == mask.sum() - 2
    adv, _, _ = F.whitened_advantages(signal, valid)
    assert torch.isfinite(adv).all()
    assert adv[0, 0] == 0 and adv[2, 4] == 0
    # the statistics are those of the finite tokens alone
    expected, _, _ = reference_whiten(signal, valid, 1e-8)
    torch.testing.assert_close(adv.double(), expected, rtol=1e-5, atol=1e-5)


def reference_policy_loss(logps, old, adv, mask, eps_low, eps_high, level, max_log_ratio):
    """Per-token loss values and, via autograd in float64, the gradient the GSPO-token form must produce."""
    m = mask.double()
    if level == "sequence":
        s = torch.exp(((logps.detach() - old) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1))
        ratio_value = s.expand_as(logps)
    else:
        ratio_value = torch.exp(logps.detach() - old)
    ratio_value = ratio_value.clamp(max=math.exp(max_log_ratio))
    unclipped = -adv * ratio_value
    clipped = -adv * ratio_value.clamp(1 - eps_low, 1 + eps_high)
    # gradient flows only where the unclipped branch is the active one; d ratio_t / d logp_t = ratio_t
    active = (unclipped >= clipped).double()
    grad = -adv * ratio_value * active
    return torch.maximum(unclipped, clipped), grad


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("level", ["sequence", "token"])
def test_clipped_policy_loss_matches_reference(seed, level):
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(5, 7, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = logps.detach() + torch.randn(5, 7, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(5, 7, generator=g, dtype=torch.float64)
    mask = torch.rand(5, 7, generator=g) < 0.8
    loss, ratio = F.clipped_policy_loss(logps, old, adv, mask, 0.2, 0.28, level=level)
    expected, expected_grad = reference_policy_loss(logps, old, adv, mask, 0.2, 0.28, level, 10.0)
    torch.testing.assert_close(loss.detach(), expected)
    (loss * mask).sum().backward()
    torch.testing.assert_close(logps.grad, expected_grad * mask)


def test_sequence_ratio_keeps_per_token_credit():
    """On-policy, each token's gradient is its own advantage: the sequence ratio must not average them away."""
    logps = torch.tensor([[-1.0, -2.0, -3.0]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, ratio = F.clipped_policy_loss(logps, logps.detach(), adv, mask, 0.2, 0.2)
    assert torch.equal(ratio, torch.ones(1, 3, dtype=torch.float64))
    F.seq_mean_token_mean(loss, mask).backward()
    torch.testing.assert_close(logps.grad, -adv / 3)


def test_log_ratio_is_clamped():
    logps = torch.zeros(1, 2, dtype=torch.float64)
    old = torch.full((1, 2), -50.0, dtype=torch.float64)
    _, ratio = F.clipped_policy_loss(logps, old, torch.ones(1, 2), torch.ones(1, 2), 0.2, 0.2, level="token")
    torch.testing.assert_close(ratio, torch.full((1, 2), math.exp(10.0), dtype=torch.float64))


def test_seq_mean_token_mean_matches_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=g) < 0.5
    mask[2] = False  # an empty row counts as zero loss
    rows = [x[i][mask[i]].mean().item() if mask[i].any() else 0.0 for i in range(4)]
    assert F.seq_mean_token_mean(x, mask).item() == pytest.approx(sum(rows) / 4)


# ---------------------------------------------------------------------------------------------------------------------
# vOPD's top-k baseline and TIP's token rules and entropy sampling


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

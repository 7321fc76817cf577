"""Visual Gradient Steering math (trl_gndpo/vgs.py) against float64 references from full logits.

Inputs are fresh random tensors (a new seed per run, shown in the test id on failure). The reference builds every
distribution over the whole vocabulary with `log_softmax`, as docs/vgs.md writes it; the library computes the same
from hidden states and heads, tile by tile.
"""

import pytest
import torch
from helpers import fresh_seeds
from torch.utils._python_dispatch import TorchDispatchMode

from trl_gndpo import vgs

SEEDS = fresh_seeds(3)


def kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def reference(h_p, h_pt, h_q, h_qt, w_s, w_t, b_s=None, b_t=None):
    """(l_Std, l_Vis, l_LP, VDS, log q*) from full float64 logits, by the definitions of docs/vgs.md (the VGS
    paper)."""

    def log_probs(h, w, b):
        return torch.log_softmax(h @ w.T + (0 if b is None else b), -1)

    log_p, log_pt = log_probs(h_p, w_s, b_s), log_probs(h_pt, w_s, b_s)
    log_q, log_qt = log_probs(h_q, w_t, b_t), log_probs(h_qt, w_t, b_t)
    log_star = torch.log_softmax(log_pt.detach() + log_q - log_qt, -1)
    return kl(log_p, log_q), kl(log_p, log_star), kl(log_pt, log_qt), kl(log_q, log_qt), log_star


def random_inputs(seed, n=11, hidden_s=6, hidden_t=9, vocab=37, dtype=torch.float64, bias=True):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    student = [randn(n, hidden_s).requires_grad_(), randn(n, hidden_s).requires_grad_()]
    teacher = [randn(n, hidden_t), randn(n, hidden_t)]
    w_s, w_t = randn(vocab, hidden_s).requires_grad_(), randn(vocab, hidden_t)
    b_s = randn(vocab, scale=0.5).requires_grad_() if bias else None
    b_t = randn(vocab, scale=0.5) if bias else None
    return student, teacher, w_s, w_t, b_s, b_t


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("bias", [True, False])
def test_divergences_and_gradients_match_float64_reference(seed, bias):
    (h_p, h_pt), (h_q, h_qt), w_s, w_t, b_s, b_t = random_inputs(seed, bias=bias)
    # chunks that divide neither the 11 positions nor the 37 columns
    got = vgs.vgs_divergences(h_p, h_pt, h_q, h_qt, w_s, w_t, b_s, b_t, token_chunk=4, vocab_chunk=10)
    want = reference(h_p, h_pt, h_q, h_qt, w_s, w_t, b_s, b_t)
    for name, a, b in zip(("l_Std", "l_Vis", "l_LP"), got, want, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
        assert (a > 0).all(), name  # a KL between distinct random distributions

    # gradients of a random weighting of the three terms: into both student views and the student head only
    weights = torch.randn(3, len(h_p), dtype=torch.float64)
    params = [h_p, h_pt, w_s] + ([b_s] if bias else [])
    grads = torch.autograd.grad(sum((w * x).sum() for w, x in zip(weights, got, strict=True)), params)
    expected = torch.autograd.grad(sum((w * x).sum() for w, x in zip(weights, want[:3], strict=True)), params)
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_language_prior_trains_the_text_view_and_the_target_holds_it_constant(seed):
    (h_p, h_pt), (h_q, h_qt), w_s, w_t, b_s, b_t = random_inputs(seed)
    l_std, l_vis, l_lp = vgs.vgs_divergences(h_p, h_pt, h_q, h_qt, w_s, w_t, b_s, b_t, 5, 8)
    # l_Std and l_Vis: the image view only; q* holds p_text detached
    assert not torch.autograd.grad((l_std + l_vis).sum(), h_pt, retain_graph=True, allow_unused=True)[0].abs().any()
    # l_LP: the text view only
    assert not torch.autograd.grad(l_lp.sum(), h_p, allow_unused=True, materialize_grads=True)[0].abs().any()


@pytest.mark.parametrize("seed", SEEDS)
def test_target_is_a_distribution_and_visual_term_vanishes_on_it(seed):
    """With identity heads the hidden states are the logits: a student whose image-view logits are q*'s (up to any
    per-row constant) has l_Vis = 0, which holds only if q* is normalized; the reference q* sums to one."""
    g = torch.Generator().manual_seed(seed)
    n, vocab = 6, 23
    z_pt, z_q, z_qt = (torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    shift = torch.randn(n, 1, generator=g, dtype=torch.float64) * 10
    eye = torch.eye(vocab, dtype=torch.float64)
    z_p = z_pt + z_q - z_qt + shift
    _, l_vis, _ = vgs.vgs_divergences(z_p, z_pt, z_q, z_qt, eye, eye, token_chunk=4, vocab_chunk=5)
    torch.testing.assert_close(l_vis, torch.zeros(n, dtype=torch.float64), atol=1e-10, rtol=0)
    log_star = reference(z_p, z_pt, z_q, z_qt, eye, eye)[4]
    torch.testing.assert_close(log_star.exp().sum(-1), torch.ones(n, dtype=torch.float64))
    torch.testing.assert_close(log_star, torch.log_softmax(z_p, -1))
    # and away from q*, l_Vis is positive
    _, l_vis, _ = vgs.vgs_divergences(
        z_p + torch.randn(n, vocab, generator=g, dtype=torch.float64), z_pt, z_q, z_qt, eye, eye
    )
    assert (l_vis > 0).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_visual_dependency_score_matches_reference_and_is_zero_without_visual_effect(seed):
    (h_p, h_pt), (h_q, h_qt), w_s, w_t, b_s, b_t = random_inputs(seed)
    got = vgs.visual_dependency_scores(h_q, h_qt, w_t, b_t, token_chunk=3, vocab_chunk=7)
    torch.testing.assert_close(got, reference(h_p, h_pt, h_q, h_qt, w_s, w_t, b_s, b_t)[3], rtol=1e-10, atol=1e-12)
    # a teacher that ignores the image (same state in both views) has VDS 0
    torch.testing.assert_close(
        vgs.visual_dependency_scores(h_q, h_q, w_t, b_t, 3, 7),
        torch.zeros(len(h_q), dtype=torch.float64),
        atol=1e-12,
        rtol=0,
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_chunked_equals_unchunked_in_float32(seed):
    (h_p, h_pt), (h_q, h_qt), w_s, w_t, b_s, b_t = random_inputs(seed, n=33, vocab=301, dtype=torch.float32)
    args = (h_p, h_pt, h_q, h_qt, w_s, w_t, b_s, b_t)
    whole = vgs.vgs_divergences(*args, token_chunk=10_000, vocab_chunk=10_000)
    tiled = vgs.vgs_divergences(*args, token_chunk=8, vocab_chunk=64)
    for a, b in zip(whole, tiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    weights = torch.rand(3, 33)
    params = [h_p, h_pt, w_s, b_s]
    g_whole = torch.autograd.grad(sum((w * x).sum() for w, x in zip(weights, whole, strict=True)), params)
    g_tiled = torch.autograd.grad(sum((w * x).sum() for w, x in zip(weights, tiled, strict=True)), params)
    for a, b in zip(g_whole, g_tiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    vds = vgs.visual_dependency_scores(h_q, h_qt, w_t, b_t, 10_000, 10_000)
    torch.testing.assert_close(vds, vgs.visual_dependency_scores(h_q, h_qt, w_t, b_t, 8, 64), rtol=1e-4, atol=1e-5)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_positions_by_vocabulary_tensor_is_ever_created():
    n, hidden, vocab, rows, cols = 64, 8, 1000, 16, 128
    (h_p, h_pt), (h_q, h_qt), w_s, w_t, b_s, b_t = random_inputs(0, n, hidden, hidden, vocab, torch.float32)
    with _LargestTensor() as forward:
        terms = vgs.vgs_divergences(h_p, h_pt, h_q, h_qt, w_s, w_t, b_s, b_t, token_chunk=rows, vocab_chunk=cols)
        vgs.visual_dependency_scores(h_q, h_qt, w_t, b_t, token_chunk=rows, vocab_chunk=cols)
    with _LargestTensor() as backward:
        sum(t.sum() for t in terms).backward()
    # one tile at most, or the head itself and its gradient (vocab x hidden); never the 64 x 1000 logits
    assert forward.largest <= max(rows * cols, vocab * hidden) < n * vocab
    assert backward.largest <= max(rows * cols, vocab * hidden)


@pytest.mark.parametrize("seed", fresh_seeds(1))
def test_gates_and_adaptive_gamma_follow_the_quantiles(seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(200, generator=g)
    low, high, lp = vgs.quantile_thresholds(values, (0.4, 0.7, 0.7))
    sorted_values = values.double().sort().values
    assert (sorted_values <= low).float().mean() == pytest.approx(0.4, abs=0.01)
    assert high == lp and (values.double() > high).float().mean() == pytest.approx(0.3, abs=0.01)
    gate = vgs.language_prior_gate(values, lp)
    assert torch.equal(gate, values > lp)
    gamma = vgs.adaptive_gamma(values, low, high, 2.0)
    assert torch.equal(gamma[values > high], torch.full_like(gamma[values > high], 2.0))
    assert torch.equal(
        gamma[(values > low) & (values <= high)], torch.full_like(gamma[(values > low) & (values <= high)], 1.0)
    )
    assert not gamma[values <= low].any()
    assert vgs.quantile_thresholds(values[:0], (0.7,)) == [float("inf")]


def test_no_valid_position_gives_empty_terms_and_zero_gradients():
    (h_p, h_pt), (h_q, h_qt), w_s, w_t, b_s, b_t = random_inputs(0)
    empty = [h[:0] for h in (h_p, h_pt, h_q, h_qt)]
    terms = vgs.vgs_divergences(*empty, w_s, w_t, b_s, b_t)
    assert all(t.shape == (0,) for t in terms)
    (grad,) = torch.autograd.grad(sum(t.sum() for t in terms), w_s)
    assert not grad.any()
    assert vgs.visual_dependency_scores(empty[2], empty[3], w_t, b_t).shape == (0,)


# ---------------------------------------------------------------------------------------------------------------------
# VGS as the paper runs it (alone, or GRPO + VGS): the loss mix and the policy-gradient advantages of each mode


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

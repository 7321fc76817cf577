"""Property-based tests (hypothesis) of the GNDPO advantage math in :mod:`trl_gndpo.functional`.

``tests/test_functional.py`` checks the functions against float64 references on a few seeded batches; here each
property is checked on every shape ``(B, T)`` with ``B, T`` in 1..8, on masks that include all-false and single-true,
and in float32 and float64.

Tolerances are derived, not tuned. With ``u`` the unit roundoff of the tensor dtype (2**-24 for float32, 2**-53 for
float64), ``n`` the number of valid tokens, ``sigma^2`` the variance of the signal and ``M`` the largest magnitude the
computation handles, a whitened advantage ``|A_t| <= (n - 1) / sqrt(n) < sqrt(n)`` moves by at most

- ``(2 + 2 sqrt(2) sqrt(n)) u M / sigma`` when every input moves by ``u M`` (rounding ``r + c`` or ``a r`` to the
  dtype: the centred value moves by ``2 u M``, the sample standard deviation by ``2 sqrt(2) u M``);
- ``2 n u64 M / sigma + sqrt(n) * 24 n u64 M^2 / (2 sigma^2)`` from the float64 moments (``sum x`` and ``sum x^2`` are
  each off by at most ``n u64`` relative, and ``sum x^2 - n mu^2`` cancels ``M^2 / sigma^2``);
- ``2 u sqrt(n)`` from rounding the result back to the dtype.

The bound is what :func:`whitening_tolerance` returns (times 2 for safety). It is small only while ``M / sigma`` is, so
the strategies keep the signal in ``[-10, 10]`` (the reference clamp is 5) with a variance of at least 1e-3, and the
shift ``|c|`` at most 10 in float32 (``r + c`` keeps about ``24 - log2(|c| / sigma)`` bits of the signal, so
``|c| = 1e4`` would leave about 5 bits) and at most 1e3 in float64 (the moments lose ``log2(M^2 / sigma^2) ~ 30`` of
53 bits; at ``|c| = 1e8`` nothing would be left). Every such test also asserts its tolerance is below 1e-2, so none of
them can pass vacuously.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from trl_gndpo import functional as F

# No example database: nothing is written under the repository (.hypothesis/ is not git-ignored).
fast = settings(max_examples=40, deadline=None, database=None)

DTYPES = [torch.float32, torch.float64]
NUMPY = {torch.float32: np.float32, torch.float64: np.float64}
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}
U64 = 2.0**-53
NON_FINITE = [math.nan, math.inf, -math.inf]
SIGNAL = 10.0  # |r| bound of the signals in the invariance tests
MIN_VAR = 1e-3  # variance floor of those signals: keeps the statements out of the eps and ill-conditioned regimes
MEANINGFUL = 1e-2  # every derived tolerance must stay below this, or the test would say nothing

shapes = st.tuples(st.integers(1, 8), st.integers(1, 8))


def floats(dtype, lo, hi):
    """Finite floats in [lo, hi], exactly representable in ``dtype`` (the bounds rounded inwards to it)."""
    if dtype == torch.float32:
        lo32, hi32 = np.float32(lo), np.float32(hi)
        lo = float(lo32 if lo32 >= lo else np.nextafter(lo32, np.float32(np.inf)))
        hi = float(hi32 if hi32 <= hi else np.nextafter(hi32, np.float32(-np.inf)))
    return st.floats(lo, hi, width=32 if dtype == torch.float32 else 64, allow_subnormal=False)


def any_floats(dtype):
    """Anything ``dtype`` can hold: finite of any magnitude, NaN, +inf, -inf."""
    return st.one_of(st.floats(width=32 if dtype == torch.float32 else 64), st.sampled_from(NON_FINITE))


def tensors(dtype, shape, elements):
    # fill=nothing: every entry drawn on its own (the default fill repeats one value across most of the array)
    return arrays(NUMPY[dtype], shape, elements=elements, fill=st.nothing()).map(torch.from_numpy)


@st.composite
def masks(draw, shape, kinds=("random", "none", "one", "all"), dtypes=(torch.bool,)):
    """Random masks, plus the edge cases drawn on purpose: all-false, single-true, all-true; bool or 0/1."""
    kind = draw(st.sampled_from(kinds))
    if kind == "random":
        mask = draw(arrays(np.bool_, shape, elements=st.booleans(), fill=st.nothing()))
    else:
        mask = np.full(shape, kind == "all")
        if kind == "one":
            mask[draw(st.integers(0, shape[0] - 1)), draw(st.integers(0, shape[1] - 1))] = True
    return torch.from_numpy(mask).to(draw(st.sampled_from(dtypes)))


@st.composite
def spread_signals(draw, dtype):
    """``(r, mask)`` with ``|r| <= SIGNAL`` and at least two valid tokens whose variance is at least ``MIN_VAR``."""
    shape = draw(shapes)
    r = draw(tensors(dtype, shape, floats(dtype, -SIGNAL, SIGNAL)))
    mask = draw(masks(shape, kinds=("random", "all")))
    values = r.double()[mask]
    assume(values.numel() >= 2 and values.var().item() >= MIN_VAR)
    return r, mask


def whitening_tolerance(dtype, n, var, magnitude, eps_term=0.0):
    """Bound on ``|A(x') - A(x)|`` when every entry of ``x'`` is an exact transform of ``x`` rounded to ``dtype``,
    ``magnitude`` bounds the entries in the units of ``x`` and ``var`` is the variance of ``x`` (see module docstring);
    ``eps_term`` is any deviation the transform causes in exact arithmetic.
    """
    u, amax, sd = UNIT_ROUNDOFF[dtype], math.sqrt(n), math.sqrt(var)
    input_rounding = (2 + 2 * math.sqrt(2) * amax) * u * magnitude / sd
    moments = 2 * n * U64 * magnitude / sd + amax * 24 * n * U64 * magnitude**2 / (2 * var)
    output_rounding = 2 * u * amax
    return 2 * (input_rounding + 2 * moments + output_rounding + eps_term)


def assert_within(actual, expected, tol):
    __tracebackhide__ = True
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    assert err <= tol, f"max |difference| {err:.3g} > tolerance {tol:.3g}"


# ---------------------------------------------------------------------------------------------------------------------
# Global whitening: invariances.


@pytest.mark.parametrize(("dtype", "c_max"), [(torch.float32, 10.0), (torch.float64, 1e3)])
@fast
@given(data=st.data())
def test_whitening_is_invariant_to_a_constant_shift(dtype, c_max, data):
    """A(r + c) == A(r) on the valid tokens (and both are 0 elsewhere); the mean moves by c, the variance stays."""
    r, mask = data.draw(spread_signals(dtype), label="r, mask")
    c = data.draw(floats(dtype, -c_max, c_max), label="c")
    values = r.double()[mask]
    tol = whitening_tolerance(dtype, values.numel(), values.var().item(), abs(c) + values.abs().max().item())
    assert tol < MEANINGFUL

    adv, mean, var = F.whitened_advantages(r, mask)
    shifted_adv, shifted_mean, shifted_var = F.whitened_advantages(r + c, mask)
    assert_within(shifted_adv[mask], adv[mask], tol)
    assert (shifted_adv[~mask] == 0).all() and (adv[~mask] == 0).all()
    # r + c is rounded to dtype (u M per entry) and summed in float64 (n u64 M): the mean moves by c within that
    mean_tol = 2 * (UNIT_ROUNDOFF[dtype] + values.numel() * U64) * (abs(c) + SIGNAL)
    assert abs(shifted_mean.item() - (mean.item() + c)) <= mean_tol
    assert abs(shifted_var.item() - var.item()) <= tol * var.item()


@pytest.mark.parametrize("dtype", DTYPES)
@fast
@given(data=st.data())
def test_whitening_is_equivariant_to_a_positive_scale(dtype, data):
    """A(a r) == A(r) for a > 0 while a^2 var dominates eps; the eps deviation is in the tolerance explicitly."""
    r, mask = data.draw(spread_signals(dtype), label="r, mask")
    a = data.draw(floats(dtype, 0.1, 100.0), label="a")
    values = r.double()[mask]
    n, var = values.numel(), values.var().item()
    eps = 1e-8
    # in exact arithmetic A(a r) = A(r) sqrt((var + eps) / (var + eps / a^2)): about eps |1 - 1/a^2| / (2 var)
    # relative, at most 5e-4 here (a >= 0.1, var >= 1e-3), times |A| < sqrt(n)
    eps_term = math.sqrt(n) * abs(math.sqrt((var + eps) / (var + eps / a**2)) - 1)
    tol = whitening_tolerance(dtype, n, var, values.abs().max().item(), eps_term)
    assert tol < MEANINGFUL

    adv, _, _ = F.whitened_advantages(r, mask, eps=eps)
    scaled_adv, _, _ = F.whitened_advantages(a * r, mask, eps=eps)
    assert_within(scaled_adv[mask], adv[mask], tol)
    assert (scaled_adv[~mask] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@fast
@given(data=st.data())
def test_masked_tokens_get_exactly_zero_advantage(dtype, data):
    """Whatever the signal holds (any finite value, NaN, +-inf, anywhere), a masked token's advantage is 0."""
    shape = data.draw(shapes, label="shape")
    signal = data.draw(tensors(dtype, shape, any_floats(dtype)), label="signal")
    mask = data.draw(masks(shape, dtypes=(torch.bool, torch.float32, torch.int64)), label="mask")
    adv, _, _ = F.whitened_advantages(signal, mask)
    assert adv.shape == signal.shape and adv.dtype == dtype
    assert (adv[~mask.bool()] == 0).all()


# ---------------------------------------------------------------------------------------------------------------------
# Finite in, finite out.


@pytest.mark.parametrize("dtype", DTYPES)
@fast
@given(data=st.data())
def test_signal_and_whitening_are_finite_for_finite_inputs(dtype, data):
    """Any finite log-probs up to +-1e4, any shape and mask (all-false, single-true, bool or 0/1), clamp and eps."""
    shape = data.draw(shapes, label="shape")
    teacher = data.draw(tensors(dtype, shape, floats(dtype, -1e4, 1e4)), label="teacher")
    student = data.draw(tensors(dtype, shape, floats(dtype, -1e4, 1e4)), label="student")
    mask = data.draw(masks(shape, dtypes=(torch.bool, torch.float32, torch.int64)), label="mask")
    bound = data.draw(st.floats(1e-3, 1e4), label="bound")
    eps = data.draw(st.sampled_from([1e-8, 1e-12, 1e-4, 1.0]), label="eps")

    signal, valid = F.clamped_log_ratio(teacher, student, mask, bound)
    assert torch.equal(valid, mask.bool())
    for x in (signal, teacher):  # the clamped signal and an unclamped one of magnitude 1e4
        adv, mean, var = F.whitened_advantages(x, valid, eps=eps)
        assert torch.isfinite(adv).all() and torch.isfinite(mean) and torch.isfinite(var)
        assert var.item() >= 0


@pytest.mark.parametrize("level", ["sequence", "token"])
@pytest.mark.parametrize("dtype", DTYPES)
@fast
@given(data=st.data())
def test_policy_loss_and_aggregation_are_finite_for_finite_inputs(dtype, level, data):
    """clipped_policy_loss and seq_mean_token_mean (value and gradient) on any finite inputs up to +-1e4."""
    shape = data.draw(shapes, label="shape")
    values = floats(dtype, -1e4, 1e4)
    logps = data.draw(tensors(dtype, shape, values), label="logps").requires_grad_()
    old_logps = data.draw(tensors(dtype, shape, values), label="old_logps")
    advantages = data.draw(tensors(dtype, shape, values), label="advantages")
    mask = data.draw(masks(shape, dtypes=(torch.bool, torch.float32, torch.int64)), label="mask")
    eps_low = data.draw(st.floats(0.0, 1.0), label="epsilon_low")
    eps_high = data.draw(st.floats(0.0, 10.0), label="epsilon_high")
    max_log_ratio = data.draw(st.floats(0.0, 20.0), label="max_log_ratio")

    loss, ratio = F.clipped_policy_loss(logps, old_logps, advantages, mask, eps_low, eps_high, level, max_log_ratio)
    assert loss.shape == ratio.shape == shape
    assert torch.isfinite(loss).all() and torch.isfinite(ratio).all()
    assert (ratio >= 0).all() and (ratio <= math.exp(max_log_ratio) * (1 + 1e-6)).all()
    total = F.seq_mean_token_mean(loss, mask)
    assert total.ndim == 0 and torch.isfinite(total)
    total.backward()
    assert torch.isfinite(logps.grad).all()
    assert torch.isfinite(F.seq_mean_token_mean(advantages, mask))


# ---------------------------------------------------------------------------------------------------------------------
# Non-finite log-probs and the clamp.


@pytest.mark.parametrize("dtype", DTYPES)
@fast
@given(data=st.data())
def test_non_finite_log_probs_are_dropped_and_never_reach_the_advantages(dtype, data):
    """NaN/+-inf anywhere in either log-prob: dropped from ``valid``, advantages finite everywhere, and exactly those
    of the same batch with the bad entries replaced by any finite values and masked out."""
    shape = data.draw(shapes, label="shape")
    entries = st.one_of(floats(dtype, -30.0, 0.0), st.sampled_from(NON_FINITE))
    teacher = data.draw(tensors(dtype, shape, entries), label="teacher")
    student = data.draw(tensors(dtype, shape, entries), label="student")
    mask = data.draw(masks(shape), label="mask")
    filler = data.draw(tensors(dtype, shape, floats(dtype, -30.0, 0.0)), label="replacement")

    finite = torch.isfinite(teacher) & torch.isfinite(student)
    signal, valid = F.clamped_log_ratio(teacher, student, mask, 5.0)
    assert torch.equal(valid, mask & finite)
    assert torch.isfinite(signal).all() and (signal[~valid] == 0).all()
    adv, mean, var = F.whitened_advantages(signal, valid)
    assert torch.isfinite(adv).all() and torch.isfinite(mean) and torch.isfinite(var)
    assert (adv[~valid] == 0).all()

    clean_signal, clean_valid = F.clamped_log_ratio(
        torch.where(finite, teacher, filler), torch.where(finite, student, filler), valid, 5.0
    )
    assert torch.equal(clean_valid, valid) and torch.equal(clean_signal, signal)
    clean_adv, clean_mean, clean_var = F.whitened_advantages(clean_signal, clean_valid)
    assert torch.equal(adv, clean_adv) and torch.equal(mean, clean_mean) and torch.equal(var, clean_var)


@pytest.mark.parametrize("dtype", DTYPES)
@fast
@given(data=st.data())
def test_clamp_bound_holds_everywhere(dtype, data):
    """|r| <= bound on every token, for log-probs of any magnitude (differences may overflow to inf) or non-finite.

    The bound is compared in the tensor's dtype: in float32 a bound like 0.1 is the float32 0.1 (1.49e-9 above it).
    """
    shape = data.draw(shapes, label="shape")
    teacher = data.draw(tensors(dtype, shape, any_floats(dtype)), label="teacher")
    student = data.draw(tensors(dtype, shape, any_floats(dtype)), label="student")
    mask = data.draw(masks(shape), label="mask")
    bound = data.draw(st.floats(1e-6, 1e6), label="bound")

    signal, valid = F.clamped_log_ratio(teacher, student, mask, bound)
    assert torch.isfinite(signal).all()
    assert (signal.abs() <= torch.tensor(bound, dtype=dtype)).all()
    assert (signal[~valid] == 0).all()
    # the clamp saturates exactly where the difference reaches the bound, with its sign
    diff, limit = teacher - student, torch.tensor(bound, dtype=dtype)  # as the function sees them, in dtype
    saturated = valid & (diff.abs() >= limit)
    assert torch.equal(signal[saturated], limit * diff[saturated].sign())


# ---------------------------------------------------------------------------------------------------------------------
# What the cross-process all-reduce relies on.


def split_and_whiten(signal, mask, k, eps=1e-8):
    """Whiten rows [:k] and [k:] as two processes would: each all-reduces (sums) its local moments with the other's."""
    parts = [(signal[:k], mask[:k]), (signal[k:], mask[k:])]
    part_moments = [F.masked_moments(s, m) for s, m in parts]
    results = []
    for (s, m), local in zip(parts, part_moments, strict=True):
        calls = []

        def all_reduce_sum(t, local=local, calls=calls):
            calls.append(t)
            return part_moments[0] + part_moments[1]

        results.append(F.whitened_advantages(s, m, eps=eps, all_reduce_sum=all_reduce_sum))
        assert len(calls) == 1, "all_reduce_sum must be called exactly once"
        assert torch.equal(calls[0], local), "all_reduce_sum must receive this part's own moments"
    return part_moments, results


def dyadic():
    """Multiples of 2**-8 up to 1024: n, sum x and sum x^2 of <= 64 of them are exact in float64 (<= 42 bits)."""
    return st.integers(-(2**18), 2**18).map(lambda k: k / 256.0)


@pytest.mark.parametrize("dtype", DTYPES)
@fast
@given(data=st.data())
def test_split_batch_moments_and_whitening_are_exact_on_a_dyadic_grid(dtype, data):
    """Any split along the batch (empty parts included): moments add up bit for bit, and each part's advantages, mean
    and variance are bit for bit those of whitening the whole batch."""
    shape = data.draw(shapes, label="shape")
    signal = data.draw(tensors(dtype, shape, dyadic()), label="signal")
    mask = data.draw(masks(shape), label="mask")
    k = data.draw(st.integers(0, shape[0]), label="split")

    part_moments, results = split_and_whiten(signal, mask, k)
    assert torch.equal(part_moments[0] + part_moments[1], F.masked_moments(signal, mask))
    whole_adv, whole_mean, whole_var = F.whitened_advantages(signal, mask)
    for rows, (adv, mean, var) in zip((slice(None, k), slice(k, None)), results, strict=True):
        assert torch.equal(adv, whole_adv[rows])
        assert torch.equal(mean, whole_mean) and torch.equal(var, whole_var)


@pytest.mark.parametrize("dtype", DTYPES)
@fast
@given(data=st.data())
def test_split_batch_moments_and_whitening_agree_within_rounding(dtype, data):
    """Same on arbitrary floats: the parts' moments sum to the whole's within float64 summation error, and each part
    is whitened like the whole batch within the derived tolerance."""
    # whitening is compared only where the variance is not swamped by the rounding of the moments (drawn first: the
    # filter then rejects before any work is done)
    r, r_mask = data.draw(spread_signals(dtype), label="r, r_mask")
    r_split = data.draw(st.integers(0, r.shape[0]), label="split of r")
    shape = data.draw(shapes, label="shape")
    signal = data.draw(tensors(dtype, shape, floats(dtype, -1e4, 1e4)), label="signal")
    mask = data.draw(masks(shape), label="mask")
    k = data.draw(st.integers(0, shape[0]), label="split")

    part_moments, _ = split_and_whiten(signal, mask, k)
    whole = F.masked_moments(signal, mask)
    summed = part_moments[0] + part_moments[1]
    x = signal.double()[mask]
    n = x.numel()
    assert summed[0] == whole[0] == n
    assert abs(summed[1] - whole[1]).item() <= 2 * n * U64 * x.abs().sum().item()
    assert abs(summed[2] - whole[2]).item() <= 2 * n * U64 * (x * x).sum().item()

    values = r.double()[r_mask]
    tol = whitening_tolerance(dtype, values.numel(), values.var().item(), values.abs().max().item())
    assert tol < MEANINGFUL
    _, results = split_and_whiten(r, r_mask, r_split)
    whole_adv, whole_mean, whole_var = F.whitened_advantages(r, r_mask)
    for rows, (adv, mean, var) in zip((slice(None, r_split), slice(r_split, None)), results, strict=True):
        assert_within(adv, whole_adv[rows], tol)
        assert abs(mean - whole_mean).item() <= tol and abs(var - whole_var).item() <= tol * whole_var.item()


# ---------------------------------------------------------------------------------------------------------------------
# The on-policy gradient.


@pytest.mark.parametrize("level", ["sequence", "token"])
@pytest.mark.parametrize("dtype", DTYPES)
@fast
@given(data=st.data())
def test_on_policy_ratio_is_one_and_each_token_keeps_its_own_credit(dtype, level, data):
    """old_logps == logps.detach(): ratio == 1 exactly, and d seq_mean_token_mean(loss) / d logps_t equals
    -A_t m_t / (B n_i), n_i the row's valid count (rows without a valid token get no gradient)."""
    shape = data.draw(shapes, label="shape")
    logps = data.draw(tensors(dtype, shape, floats(dtype, -50.0, 0.0)), label="logps").requires_grad_()
    advantages = data.draw(tensors(dtype, shape, floats(dtype, -1e3, 1e3)), label="advantages")
    mask = data.draw(masks(shape, dtypes=(torch.bool, torch.float32)), label="mask")
    eps_low = data.draw(st.floats(0.0, 1.0), label="epsilon_low")
    eps_high = data.draw(st.floats(0.0, 10.0), label="epsilon_high")

    loss, ratio = F.clipped_policy_loss(logps, logps.detach(), advantages, mask, eps_low, eps_high, level=level)
    assert torch.equal(ratio, torch.ones_like(ratio))
    F.seq_mean_token_mean(loss, mask).backward()

    m = mask.double()
    n_i = m.sum(-1, keepdim=True).clamp(min=1)
    expected = -advantages.double() * m / (shape[0] * n_i)
    rtol = 8 * UNIT_ROUNDOFF[dtype]  # a handful of roundings (1/B, 1/n_i, the product) in dtype
    torch.testing.assert_close(logps.grad.double(), expected, rtol=rtol, atol=1e-30)


# ---------------------------------------------------------------------------------------------------------------------
# Masked positions may hold anything (the trainer keeps NaN/inf log-probs in place and only drops them from the mask):
# they must not reach the valid outputs. Multiplying by the mask fails this (NaN * 0 is NaN); masking with
# torch.where passes.


@pytest.mark.parametrize("dtype", DTYPES)
@fast
@given(data=st.data())
def test_masked_garbage_does_not_change_valid_advantages(dtype, data):
    """NaN/inf/huge values on masked positions leave the advantages, mean and variance bit for bit unchanged."""
    shape = data.draw(shapes, label="shape")
    signal = data.draw(tensors(dtype, shape, floats(dtype, -SIGNAL, SIGNAL)), label="signal")
    mask = data.draw(masks(shape, dtypes=(torch.bool, torch.float32)), label="mask")
    garbage = data.draw(tensors(dtype, shape, any_floats(dtype)), label="garbage")
    adv, mean, var = F.whitened_advantages(torch.where(mask.bool(), signal, garbage), mask)
    clean_adv, clean_mean, clean_var = F.whitened_advantages(torch.where(mask.bool(), signal, 0), mask)
    assert torch.equal(adv, clean_adv) and torch.equal(mean, clean_mean) and torch.equal(var, clean_var)


@pytest.mark.parametrize("level", ["sequence", "token"])
@pytest.mark.parametrize("dtype", DTYPES)
@fast
@given(data=st.data())
def test_non_finite_old_logps_on_masked_tokens_reach_neither_loss_nor_gradient(dtype, level, data):
    """The trainer drops a token whose old log-prob is NaN/inf from the mask but still passes the old log-probs to
    the loss: the aggregated loss and d loss / d logps must be those of the same batch with finite old log-probs."""
    shape = data.draw(shapes, label="shape")
    logps = data.draw(tensors(dtype, shape, floats(dtype, -30.0, 0.0)), label="logps")
    old_logps = data.draw(tensors(dtype, shape, any_floats(dtype)), label="old_logps")
    advantages = data.draw(tensors(dtype, shape, floats(dtype, -5.0, 5.0)), label="advantages")
    mask = data.draw(masks(shape), label="mask") & torch.isfinite(old_logps)

    def loss_and_grad(old):
        x = logps.clone().requires_grad_()
        loss, _ = F.clipped_policy_loss(x, old, advantages, mask, 0.2, 0.28, level=level)
        total = F.seq_mean_token_mean(loss, mask)
        total.backward()
        return total, x.grad

    total, grad = loss_and_grad(old_logps)
    clean_total, clean_grad = loss_and_grad(torch.where(mask, old_logps, -1.0))
    assert torch.isfinite(total) and torch.isfinite(grad).all()
    assert torch.equal(total, clean_total) and torch.equal(grad, clean_grad)

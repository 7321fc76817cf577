"""Pure tensor functions of GNDPO: the token signal, its global whitening and the clipped policy loss.

Nothing here imports a model or a trainer. Every function reads like the equation in its docstring, works on any
device and dtype, and is tested against a float64 reference in ``tests/test_functional.py``.

Notation: ``p`` is the student, ``q`` the teacher, ``y_t`` the sampled completion token and ``m_t`` the mask of valid
completion tokens (padding, masked truncated completions and tool tokens are 0). Tensors are ``(batch, completion)``.

Two different "global normalizations" exist in this field and are kept apart here:

- *advantage whitening* (GNDPO, :func:`whiten`): the advantage is standardized with the mean and variance of the token
  signal over every valid token of the whole generation batch, on all processes;
- *loss aggregation* (DAPO, ``loss_type="dapo"``): the loss is divided by the global number of tokens. This changes
  the weight of each token in the gradient, not the advantage values.
"""

from collections.abc import Callable

import torch

__all__ = [
    "clamped_log_ratio",
    "clipped_policy_loss",
    "masked_moments",
    "mean_and_unbiased_var",
    "entropy_sampling_keys",
    "seq_mean_token_mean",
    "tip_keep",
    "top_k_reverse_kl",
    "whiten",
    "whitened_advantages",
]


def clamped_log_ratio(
    teacher_logps: torch.Tensor,
    student_logps: torch.Tensor,
    mask: torch.Tensor,
    bound: float,
    *,
    base_logps: torch.Tensor | None = None,
    extrapolation: float = 1.0,
    value_baseline: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Token signal of on-policy distillation, clamped.

    .. math:: r_t = \mathrm{clamp}\big(\log q(y_t) - \log p_\text{old}(y_t),\ -b,\ b\big)

    Two estimators extend the raw log-ratio before the clamp:

    - ExOPD / G-OPD reward extrapolation (arXiv 2602.12125), with ``base_logps`` :math:`\log p_\text{base}` (the
      initial student) and ``extrapolation`` :math:`\lambda`:
      :math:`\lambda (\log q - \log p_\text{base}) - (\log p_\text{old} - \log p_\text{base})
      = (\log q - \log p_\text{old}) + (\lambda - 1)(\log q - \log p_\text{base})`, computed in the second form
      so that :math:`\lambda = 1` gives plain OPD bit for bit;
    - vOPD's closed-form value baseline (arXiv 2605.07865): ``value_baseline`` :math:`\mathrm{KL}_t(p \| q)` (the
      full-distribution reverse KL at the position, detached) is added.

    Tokens where any input is not finite (a NaN or an infinite log-prob on a valid token) carry no usable signal: they
    are dropped from the returned mask, so they neither count in the statistics nor receive an advantage. The caller
    logs how many were dropped.

    Args:
        teacher_logps: ``log q(y_t)``, shape ``(B, T)``.
        student_logps: ``log p_old(y_t)``, shape ``(B, T)``.
        mask: valid completion tokens, shape ``(B, T)``, bool or 0/1.
        bound: the clamp ``b > 0`` (5.0 in the GNDPO reference).
        base_logps: ``log p_base(y_t)`` for reward extrapolation, shape ``(B, T)``.
        extrapolation: :math:`\lambda` (1.25 in ExOPD); ignored without ``base_logps``.
        value_baseline: per-token :math:`\mathrm{KL}(p \| q)`, shape ``(B, T)``.

    Returns:
        ``(r, valid)``: the clamped signal (0 where ``valid`` is False) and the mask of tokens with a finite signal.
    """
    raw = teacher_logps - student_logps
    if base_logps is not None:
        raw = raw + (extrapolation - 1.0) * (teacher_logps - base_logps)
    if value_baseline is not None:
        raw = raw + value_baseline
    valid = mask.bool() & torch.isfinite(raw) & torch.isfinite(teacher_logps) & torch.isfinite(student_logps)
    return torch.where(valid, raw, torch.zeros_like(raw)).clamp(-bound, bound), valid


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r"""Sufficient statistics ``[n, \sum x, \sum x^2]`` of the valid entries of ``x``, in float64.

    Moments add across processes, so one all-reduce (sum) of this 3-vector gives the statistics of the concatenated
    batch. float64 keeps :math:`\sum x^2 - n\mu^2` exact enough for millions of tokens.
    """
    valid = mask.bool()
    x = torch.where(valid, x.to(torch.float64), 0.0)  # not x * mask: NaN * 0 is NaN
    return torch.stack([valid.sum().to(torch.float64), x.sum(), (x * x).sum()])


def mean_and_unbiased_var(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Mean and Bessel-corrected variance from ``[n, \sum x, \sum x^2]``.

    .. math:: \mu = \frac{\sum x}{n}, \qquad \sigma^2 = \frac{\sum x^2 - n \mu^2}{n - 1}

    With ``n = 0`` both are 0; with ``n = 1`` the variance is 0 (a single token carries no spread), so the whitened
    advantage is 0 instead of NaN.
    """
    n, s, ss = moments.unbind()
    mean = s / n.clamp(min=1)
    var = ((ss - n * mean * mean) / (n - 1).clamp(min=1)).clamp(min=0)
    return mean, torch.where(n > 1, var, torch.zeros_like(var))


def whiten(x: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float) -> torch.Tensor:
    r"""Standardize with given statistics, zero off the mask.

    .. math:: A_t = m_t \, \frac{x_t - \mu}{\sqrt{\sigma^2 + \epsilon}}
    """
    out = (x.to(torch.float64) - mean) * torch.rsqrt(var + eps)
    return torch.where(mask.bool(), out, torch.zeros_like(out)).to(x.dtype)


def whitened_advantages(
    signal: torch.Tensor,
    mask: torch.Tensor,
    eps: float = 1e-8,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""GNDPO global normalization: whiten the token signal over every valid token of the generation batch.

    .. math:: A_t = m_t \, \frac{r_t - \mu}{\sqrt{\sigma^2 + \epsilon}}, \qquad
              \mu, \sigma^2 = \text{mean, unbiased variance of } \{ r_t : m_t = 1 \} \text{ over all processes}

    Args:
        signal: token signal ``r``, shape ``(B, T)``.
        mask: valid tokens, shape ``(B, T)``.
        eps: added to the variance inside the square root (1e-8 in the reference).
        all_reduce_sum: sums a tensor over processes (e.g. ``accelerator.reduce(t, "sum")``); called exactly once,
            on the 3-vector of :func:`masked_moments`. ``None`` for a single process.

    Returns:
        ``(advantages, mean, var)``; every process gets the same ``mean`` and ``var``.
    """
    moments = masked_moments(signal, mask)
    if all_reduce_sum is not None:
        moments = all_reduce_sum(moments)
    mean, var = mean_and_unbiased_var(moments)
    return whiten(signal, mask, mean, var, eps), mean, var


def clipped_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    level: str = "sequence",
    max_log_ratio: float = 10.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-token clipped surrogate loss with a sequence-level (GSPO, token form) or token-level (PPO) ratio.

    ``level="sequence"`` (GSPO-token, the GNDPO reference):

    .. math:: \log s_i = \frac{1}{|y_i|} \sum_t m_t (\log p_t - \log p_{\text{old},t}), \qquad
              \rho_{i,t} = \mathrm{sg}[s_i] \, \frac{p_t}{\mathrm{sg}[p_t]}

    so the ratio's value is the sequence ratio while each token keeps its own gradient
    :math:`A_{i,t} \nabla \log p_t` (a plain sequence ratio would average the per-token advantages away).
    ``level="token"``: :math:`\rho_{i,t} = p_t / p_{\text{old},t}`. In both, :math:`\log\rho` is clamped above at
    ``max_log_ratio`` and

    .. math:: \ell_{i,t} = \max\big(-A_{i,t}\,\rho_{i,t},\ -A_{i,t}\,\mathrm{clip}(\rho_{i,t}, 1-\epsilon_\text{low},
              1+\epsilon_\text{high})\big)

    Returns:
        ``(per_token_loss, ratio)``, both ``(B, T)``; aggregate with the mask (e.g. :func:`seq_mean_token_mean`).
    """
    if level == "sequence":
        valid = mask.bool()
        token_log_ratio = torch.where(valid, logps - old_logps, 0.0)  # masked garbage (NaN) must not leak in
        seq_log_ratio = token_log_ratio.sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)
        log_ratio = logps - logps.detach() + seq_log_ratio.detach()
    elif level == "token":
        log_ratio = logps - old_logps
    else:
        raise ValueError(f"level must be 'sequence' or 'token', got {level!r}")
    ratio = torch.exp(log_ratio.clamp(max=max_log_ratio))
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    return torch.maximum(-advantages * ratio, -advantages * clipped), ratio


def seq_mean_token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r"""Average over the tokens of each sequence, then over sequences.

    .. math:: \frac{1}{B} \sum_i \frac{\sum_t m_{i,t} x_{i,t}}{\max(1, \sum_t m_{i,t})}
    """
    valid = mask.bool()
    return (torch.where(valid, x, 0.0).sum(-1) / valid.sum(-1).clamp(min=1)).mean()


# Elements of gathered teacher head rows (positions x k x hidden) alive at once in `top_k_reverse_kl` (64 MiB float32).
_GATHER_ELEMENTS = 1 << 24


def _transformed_logits(hidden, weight, bias, scale: float, softcap: float | None) -> torch.Tensor:
    """Logits `h W^T + b` in float32 (float64 for float64 inputs), scaled and soft-capped like TRL's kernels:
    `z -> cap * tanh(scale * z / cap)`."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    z = hidden.to(dtype) @ weight.to(dtype).T
    z = (z if bias is None else z + bias.to(dtype)) * scale
    return z if not softcap else softcap * torch.tanh(z / softcap)


@torch.no_grad()
def top_k_reverse_kl(
    student_states: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_states: torch.Tensor,
    teacher_weight: torch.Tensor,
    k: int,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    *,
    student_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_scale: float = 1.0,
    teacher_softcap: float | None = None,
    token_chunk: int = 256,
    vocab_chunk: int = 4096,
) -> torch.Tensor:
    r"""vOPD's top-k approximation of its value baseline: the reverse KL on the student's k most likely tokens.

    With :math:`S_t` the k tokens of highest student probability at position t, and both distributions renormalized
    on it,

    .. math:: p_k(v) = \frac{p(v)}{\sum_{u \in S_t} p(u)}, \quad q_k(v) = \frac{q(v)}{\sum_{u \in S_t} q(u)},
              \qquad \mathrm{KL}_k = \sum_{v \in S_t} p_k(v) \big(\log p_k(v) - \log q_k(v)\big)

    (``k`` at least the vocabulary size gives the exact :math:`\mathrm{KL}(p \| q)`). Detached: it only enters the
    token signal as a baseline.

    Args:
        student_states, teacher_states: ``(N, H_s)`` and ``(N, H_t)`` last hidden states of the same N positions.
        student_weight, teacher_weight: vocabulary heads ``(V, H_s)`` and ``(V, H_t)`` over the same V tokens; biases
            ``(V,)`` or None. Scale and soft-cap as the models' configs say (``logit_scale``,
            ``final_logit_softcapping``).

    Returns:
        ``(N,)`` float32 (float64 for float64 inputs). Memory: the student's logits one ``token_chunk x vocab_chunk``
        tile at a time (a running top-k across tiles), then the teacher's logits of the k tokens only, from at most
        ``2**24`` gathered head elements at once; no ``N x V`` tensor.
    """
    vocab, device = student_weight.shape[0], student_states.device
    k = min(k, vocab)
    dtype = torch.promote_types(student_states.dtype, torch.float32)
    teacher_weight = teacher_weight.to(device)  # once: a teacher may live on another device
    teacher_bias = None if teacher_bias is None else teacher_bias.to(device)
    gather_rows = max(1, _GATHER_ELEMENTS // (k * teacher_weight.shape[1]))
    out = []
    for start in range(0, len(student_states), token_chunk):
        rows = slice(start, start + token_chunk)
        h_s, h_t = student_states[rows], teacher_states[rows].to(device)
        top_values = top_index = None
        for col in range(0, vocab, vocab_chunk):  # a running top-k of the student's logits over vocabulary tiles
            cols = slice(col, min(col + vocab_chunk, vocab))
            bias = None if student_bias is None else student_bias[cols]
            z = _transformed_logits(h_s, student_weight[cols], bias, student_scale, student_softcap)
            index = torch.arange(cols.start, cols.stop, device=device).expand_as(z)
            if top_values is not None:
                z, index = torch.cat([top_values, z], 1), torch.cat([top_index, index], 1)
            top_values, chosen = z.topk(min(k, z.size(1)), dim=1)
            top_index = index.gather(1, chosen)
        # the teacher's logits of the chosen tokens only, from its gathered head rows, a few positions at a time
        z_t = torch.cat(
            [
                torch.einsum("nkh,nh->nk", teacher_weight[top_index[sub]].to(dtype), h_t[sub].to(dtype))
                for sub in (slice(i, i + gather_rows) for i in range(0, len(top_index), gather_rows))
            ]
        )
        if teacher_bias is not None:
            z_t = z_t + teacher_bias[top_index].to(dtype)
        z_t = z_t * teacher_scale
        if teacher_softcap:
            z_t = teacher_softcap * torch.tanh(z_t / teacher_softcap)
        log_p, log_q = top_values.log_softmax(-1), z_t.log_softmax(-1)
        out.append((log_p.exp() * (log_p - log_q)).sum(-1))
    return torch.cat(out) if out else student_states.new_zeros(0, dtype=dtype)


def tip_keep(rule: str, high_entropy: torch.Tensor, high_divergence: torch.Tensor | None = None) -> torch.Tensor:
    r"""TIP (arXiv 2604.14084) token selection from its two axes, student entropy :math:`H_t` and teacher-student
    divergence :math:`D_t = |\log p(y_t) - \log q(y_t)|`, each split at a quantile of the generation batch
    (``high_entropy`` = :math:`H_t \ge \tau_H`, ``high_divergence`` = :math:`D_t \ge \tau_D`):

    - ``"entropy"``: :math:`H_t \ge \tau_H` (uncertain student);
    - ``"quadrant"``: :math:`H_t \ge \tau_H \ \lor\ D_t \ge \tau_D` (uncertain, or overconfident and wrong);
    - ``"q3"``: :math:`H_t < \tau_H \ \land\ D_t \ge \tau_D`, TIP's Q3 alone (low entropy, high divergence: the
      overconfident-and-wrong tokens).
    """
    if rule == "entropy":
        return high_entropy
    if high_divergence is None:
        raise ValueError(f"TIP rule {rule!r} needs the high-divergence mask.")
    if rule == "quadrant":
        return high_entropy | high_divergence
    if rule == "q3":
        return ~high_entropy & high_divergence
    raise ValueError(f"TIP rule must be 'entropy', 'quadrant' or 'q3', got {rule!r}")


def entropy_sampling_keys(entropy: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    r"""Keys of TIP's entropy-based sampling: weighted sampling of tokens without replacement, probability
    proportional to the student's entropy (Efraimidis-Spirakis).

    .. math:: \kappa_t = \frac{\log u_t}{H_t}, \qquad u_t \sim U(0, 1)

    Keeping the ``n`` largest keys draws ``n`` tokens one after another, each with probability proportional to
    :math:`H_t` among those not yet drawn. Tokens with :math:`H_t \le 0` get the lowest finite key (drawn last);
    a finite key keeps quantiles and masking free of NaN.
    """
    lowest = torch.finfo(torch.promote_types(entropy.dtype, torch.float32)).min
    keys = torch.log(uniform.to(entropy.dtype)) / entropy
    return torch.where(entropy > 0, keys, lowest).clamp(min=lowest)

"""Visual Gradient Steering (VGS, arXiv 2606.00564): decomposed on-policy distillation for vision-language students.

Pure tensor functions, no model or trainer imports. Four next-token distributions per completion position, each given
by a last hidden state and a vocabulary head (logits `z = h W^T + b`):

    p       student, image view (the sample as trained)      q       teacher, image view
    p_text  student, text-only view (images removed)          q_text  teacher, text-only view

and the visually steered target

    log q*(v) = sg[log p_text(v)] + log q(v) - log q_text(v) - log Z*,      Z* normalizes q* over the vocabulary,

the student's text-only belief moved by the teacher's image-minus-text log-prob gain. Per token:

    l_Std = KL(p || q)          l_Vis = KL(p || q*)          VDS = KL(q || q_text)          l_LP = KL(p_text || q_text)

The VGS loss is `eta * (l_Std + gamma_t * l_Vis + lambda * 1[VDS_t > quantile] * l_LP)`, token-averaged; the
weights are applied by the caller. Gradients flow into the student only: `p` through `l_Std` and `l_Vis`, `p_text`
through `l_LP` (q* holds p_text detached).

Every full-vocabulary quantity is computed tile by tile, `token_chunk` rows by `vocab_chunk` columns, with an online
log-sum-exp: no `(positions, vocabulary)` tensor exists at once. Peak extra memory of `vgs_divergences`, forward or
backward: about `TILE_FLOATS` = 12 float32 tiles, `12 * min(N, token_chunk) * vocab_chunk * 4` bytes (192 MiB at the
defaults, 1024 x 4096), whatever the vocabulary size; `visual_dependency_scores` needs about 5 tiles.
"""

import math
from collections.abc import Callable

import torch

TOKEN_CHUNK = 1024
VOCAB_CHUNK = 4096
# float32 tiles alive at once in the forward and backward of `vgs_divergences` (the four views' logits, the steered
# ones, their exponentials and products); the peak is `TILE_FLOATS * rows * columns * 4` bytes.
TILE_FLOATS = 12


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cols: slice) -> torch.Tensor:
    """One `(rows, columns)` tile of logits, in float32 (float64 for float64 inputs)."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    z = hidden.to(dtype) @ weight[cols].to(dtype).T
    return z if bias is None else z + bias[cols].to(dtype)


def _online_divergences(
    tiles: Callable[[slice], dict[str, torch.Tensor]],
    pairs: tuple[tuple[str, str], ...],
    vocab: int,
    vocab_chunk: int,
) -> tuple[dict[str, torch.Tensor], dict[tuple[str, str], torch.Tensor]]:
    """Log-normalizers `log Z_a` of every distribution `tiles` yields, and `KL(a || b)` for each pair, in one sweep.

    With running max `m_a`, `S_a = sum_v exp(z_a - m_a)` and `W_ab = sum_v exp(z_a - m_a) (z_a - z_b)`, both rescaled
    by `exp(m_old - m_new)` when the max grows: `log Z_a = m_a + log S_a` and
    `KL(a || b) = sum_v a_v (log a_v - log b_v) = W_ab / S_a - log Z_a + log Z_b`.
    """
    state, gaps = {}, {}
    for start in range(0, vocab, vocab_chunk):
        z = tiles(slice(start, min(start + vocab_chunk, vocab)))
        for name, logits in z.items():
            high = logits.amax(-1)
            if name not in state:
                state[name] = (high, torch.zeros_like(high))
            old_high, total = state[name]
            high = torch.maximum(old_high, high)
            rescale = torch.exp(old_high - high)
            weights = torch.exp(logits - high[:, None])
            state[name] = (high, total * rescale + weights.sum(-1))
            for a, b in pairs:
                if a == name:
                    gap = (weights * (logits - z[b])).sum(-1)
                    gaps[a, b] = gap if (a, b) not in gaps else gaps[a, b] * rescale + gap
    log_z = {name: high + torch.log(total) for name, (high, total) in state.items()}
    kl = {(a, b): gaps[a, b] / state[a][1] - log_z[a] + log_z[b] for a, b in pairs}
    return log_z, kl


def _rows(n: int, token_chunk: int):
    return (slice(start, min(start + token_chunk, n)) for start in range(0, n, token_chunk))


@torch.no_grad()
def visual_dependency_scores(
    teacher_image: torch.Tensor,
    teacher_text: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    token_chunk: int = TOKEN_CHUNK,
    vocab_chunk: int = VOCAB_CHUNK,
) -> torch.Tensor:
    """VDS_t = KL(q(. | I, x) || q(. | x)): how much the image moves the teacher's next-token distribution.

    Args:
        teacher_image, teacher_text: `(N, H)` teacher hidden states of the same N completion positions in the image
            and the text-only view.
        weight, bias: the teacher's vocabulary head, `(V, H)` and `(V,)` or None.

    Returns: `(N,)` float32 (float64 for float64 inputs). Peak extra memory: about 5 tiles of
    `min(N, token_chunk) x vocab_chunk` floats.
    """
    out = []
    for rows in _rows(len(teacher_image), token_chunk):

        def tiles(cols, rows=rows):
            return {
                "q": _logits(teacher_image[rows], weight, bias, cols),
                "qt": _logits(teacher_text[rows], weight, bias, cols),
            }

        _, kl = _online_divergences(tiles, (("q", "qt"),), weight.shape[0], vocab_chunk)
        out.append(kl["q", "qt"])
    return torch.cat(out) if out else teacher_image.new_zeros(0, dtype=torch.float32)


class _VGSDivergences(torch.autograd.Function):
    """(l_Std, l_Vis, l_LP) per position from hidden states and heads; gradients to the student's states and head."""

    @staticmethod
    def forward(ctx, h_p, h_pt, h_q, h_qt, w_s, b_s, w_t, b_t, token_chunk, vocab_chunk):
        pairs = (("p", "q"), ("p", "s"), ("pt", "qt"))
        out, log_zs = [], []
        for rows in _rows(len(h_p), token_chunk):

            def tiles(cols, rows=rows):
                z = {
                    "p": _logits(h_p[rows], w_s, b_s, cols),
                    "pt": _logits(h_pt[rows], w_s, b_s, cols),
                    "q": _logits(h_q[rows], w_t, b_t, cols),
                    "qt": _logits(h_qt[rows], w_t, b_t, cols),
                }
                z["s"] = z["pt"] + z["q"] - z["qt"]  # log q* up to its normalizer (log p_text's cancels)
                return z

            log_z, kl = _online_divergences(tiles, pairs, w_s.shape[0], vocab_chunk)
            out.append(torch.stack([kl[pair] for pair in pairs]))
            log_zs.append(torch.stack([log_z[name] for name in ("p", "pt", "q", "qt", "s")]))
        divergences = torch.cat(out, dim=1) if out else h_p.new_zeros(3, 0, dtype=torch.float32)
        ctx.save_for_backward(h_p, h_pt, h_q, h_qt, w_s, b_s, w_t, b_t, divergences, *log_zs)
        ctx.chunks = token_chunk, vocab_chunk
        return divergences[0], divergences[1], divergences[2]

    @staticmethod
    def backward(ctx, g_std, g_vis, g_lp):
        h_p, h_pt, h_q, h_qt, w_s, b_s, w_t, b_t, divergences, *log_zs = ctx.saved_tensors
        token_chunk, vocab_chunk = ctx.chunks
        zeros = torch.zeros_like(divergences[0])
        g_std, g_vis, g_lp = (zeros if g is None else g.to(zeros.dtype) for g in (g_std, g_vis, g_lp))
        dtype = divergences.dtype
        want_h, want_ht, want_w, want_b = (ctx.needs_input_grad[i] for i in (0, 1, 4, 5))
        grad_h = torch.zeros(h_p.shape, dtype=dtype, device=h_p.device) if want_h else None
        grad_ht = torch.zeros(h_pt.shape, dtype=dtype, device=h_p.device) if want_ht else None
        grad_w = torch.zeros(w_s.shape, dtype=dtype, device=w_s.device) if want_w else None
        grad_b = torch.zeros(b_s.shape, dtype=dtype, device=w_s.device) if want_b else None
        vocab = w_s.shape[0]
        for rows, log_z in zip(_rows(len(h_p), token_chunk), log_zs, strict=True):
            l_std, l_vis, l_lp = divergences[:, rows]
            hp, hpt = h_p[rows].to(dtype), h_pt[rows].to(dtype)
            for start in range(0, vocab, vocab_chunk):
                cols = slice(start, min(start + vocab_chunk, vocab))
                z_p, z_pt = _logits(hp, w_s, b_s, cols), _logits(hpt, w_s, b_s, cols)
                z_q, z_qt = _logits(h_q[rows], w_t, b_t, cols), _logits(h_qt[rows], w_t, b_t, cols)
                log_p, log_pt = z_p - log_z[0, :, None], z_pt - log_z[1, :, None]
                log_qt = z_qt - log_z[3, :, None]
                log_q, log_s = z_q - log_z[2, :, None], z_pt + z_q - z_qt - log_z[4, :, None]
                # d KL(a || b) / d z_a = a * (log a - log b - KL(a || b)), b held fixed
                grad_z = torch.exp(log_p) * (
                    g_std[rows, None] * (log_p - log_q - l_std[:, None])
                    + g_vis[rows, None] * (log_p - log_s - l_vis[:, None])
                )
                grad_zt = torch.exp(log_pt) * g_lp[rows, None] * (log_pt - log_qt - l_lp[:, None])
                if grad_h is not None:
                    grad_h[rows] += grad_z @ w_s[cols].to(dtype)
                if grad_ht is not None:
                    grad_ht[rows] += grad_zt @ w_s[cols].to(dtype)
                if grad_w is not None:
                    grad_w[cols] += grad_z.T @ hp + grad_zt.T @ hpt
                if grad_b is not None:
                    grad_b[cols] += grad_z.sum(0) + grad_zt.sum(0)
        return (
            None if grad_h is None else grad_h.to(h_p.dtype),
            None if grad_ht is None else grad_ht.to(h_pt.dtype),
            None,
            None,
            None if grad_w is None else grad_w.to(w_s.dtype),
            None if grad_b is None else grad_b.to(b_s.dtype),
            *(None,) * 4,
        )


def vgs_divergences(
    student_image: torch.Tensor,
    student_text: torch.Tensor,
    teacher_image: torch.Tensor,
    teacher_text: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_weight: torch.Tensor,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    token_chunk: int = TOKEN_CHUNK,
    vocab_chunk: int = VOCAB_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-position `(l_Std, l_Vis, l_LP)` = `(KL(p || q), KL(p || q*), KL(p_text || q_text))`, differentiable.

    Args:
        student_image, student_text: `(N, H_s)` student hidden states of N completion positions in the image and the
            text-only view (with gradients for training).
        teacher_image, teacher_text: `(N, H_t)` teacher hidden states of the same positions (no gradient).
        student_weight, teacher_weight: `(V, H_s)` and `(V, H_t)` vocabulary heads over the same V tokens; biases
            `(V,)` or None. The student's head receives gradients when it requires them.

    Returns: three `(N,)` tensors, float32 (float64 for float64 inputs). Gradients: `l_Std` and `l_Vis` into
    `student_image`, `l_LP` into `student_text`, and all into the student's head; `q*` treats `p_text` as constant.
    Peak extra memory: about `TILE_FLOATS` float32 tiles of `min(N, token_chunk) x vocab_chunk` (forward and
    backward recompute the logits tile by tile), whatever V is.
    """
    if not (student_image.shape == student_text.shape and teacher_image.shape == teacher_text.shape):
        raise ValueError("The image and text views must hold the same positions (same shapes).")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"Vocabulary heads differ: {student_weight.shape[0]} vs {teacher_weight.shape[0]} rows.")
    return _VGSDivergences.apply(
        student_image,
        student_text,
        teacher_image.detach(),
        teacher_text.detach(),
        student_weight,
        student_bias,
        teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
        token_chunk,
        vocab_chunk,
    )


def quantile_thresholds(values: torch.Tensor, quantiles: tuple[float, ...]) -> list[float]:
    """The `quantiles` of a 1-D tensor of values (all valid positions of the batch); `inf` when it is empty."""
    if values.numel() == 0:
        return [math.inf] * len(quantiles)
    return torch.quantile(values.double(), torch.tensor(quantiles, dtype=torch.float64)).tolist()


def language_prior_gate(vds: torch.Tensor, threshold: float) -> torch.Tensor:
    """1[VDS_t > threshold]: the visually dependent tokens whose text-only prediction l_LP trains."""
    return vds > threshold


def adaptive_gamma(vds: torch.Tensor, low: float, high: float, gamma: float) -> torch.Tensor:
    """gamma_t = 0 below `low`, gamma / 2 from `low` to `high`, gamma above `high` (the paper's 40th / 70th VDS
    percentiles): the visual term weighs most where the teacher relies on the image."""
    return torch.where(vds > high, gamma, torch.where(vds > low, gamma / 2, 0.0)).to(vds.dtype)


# What VGS is trained with (`vgs_mode`): the weights (policy-gradient term, VGS term) given alpha.
VGS_MODES = ("alone", "grpo", "gndpo")


def mixed_loss(mode: str, alpha: float, policy_loss: torch.Tensor, vgs_loss: torch.Tensor) -> torch.Tensor:
    """The training loss of each VGS setting of the paper:

        "alone":           L = L_VGS                                   (the paper's main results)
        "grpo", "gndpo":   L = (1 - alpha) * L_PG + alpha * L_VGS      (the paper's GRPO + VGS uses alpha = 0.3)

    `L_PG` is the clipped policy-gradient loss on the advantages of the mode (`policy_advantages`). Under "alone" it
    is left out of the graph entirely (not multiplied by 0, which would turn a non-finite value into NaN).
    """
    if mode == "alone":
        return vgs_loss
    if mode not in VGS_MODES:
        raise ValueError(f"vgs mode must be one of {VGS_MODES}, got {mode!r}")
    return (1 - alpha) * policy_loss + alpha * vgs_loss


def policy_advantages(
    mode: str, distillation: torch.Tensor, outcome: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Per-token advantages of the policy-gradient term in each VGS setting, `(B, T)`:

        "grpo":             A_t = m_t * A_seq      GRPO's sequence-level outcome advantage on every valid token,
                                                   no teacher signal (the paper's GRPO + VGS)
        "alone", "gndpo":   A_t = distillation_t   GNDPO's teacher advantage (under "alone" only logged)

    Args:
        distillation: `(B, T)` GNDPO advantages. outcome: `(B,)` GRPO advantages from the outcome rewards.
        mask: `(B, T)` tokens in the loss.
    """
    if mode == "grpo":
        return outcome.to(distillation.dtype)[:, None] * mask.to(distillation.dtype)
    if mode not in VGS_MODES:
        raise ValueError(f"vgs mode must be one of {VGS_MODES}, got {mode!r}")
    return distillation

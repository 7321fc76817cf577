"""Uni-OPD (arXiv 2605.03677, code WenjinHou/Uni-OPD): outcome-guided margin calibration and data balancing.

Pure tensor functions, no model or trainer imports; tested in ``tests/test_uniopd.py``. Responses are laid out as in
GRPO: ``N = num_groups x group_size`` rows, the ``group_size`` samples of one prompt contiguous. "Global" scope is the
same computation with a single group spanning the batch.

A response is *present* when it has at least one valid token, *correct* when its outcome reward passes the
threshold. ``Abar_i`` is the mean token advantage of response ``i`` over its valid tokens.
"""

import math

import torch

# Share of the shift given to the correct (up) and incorrect (down) responses.
_DIRECTIONS = {"both": (0.5, 0.5), "correct_up": (1.0, 0.0), "incorrect_down": (0.0, 1.0)}

__all__ = [
    "balance_classes",
    "difficulty_balanced_indices",
    "margin_gap",
    "margin_group_mask",
    "margin_mask",
    "margin_shift",
    "response_means",
]


def response_means(advantages: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-response mean token advantage :math:`\bar A_i = \sum_t m_{i,t} A_{i,t} / \sum_t m_{i,t}` and presence."""
    m = mask.to(advantages.dtype)
    count = m.sum(-1)
    return (advantages * m).sum(-1) / count.clamp(min=1), count > 0


def margin_gap(means: torch.Tensor, correct: torch.Tensor, present: torch.Tensor, mode: str) -> torch.Tensor:
    r"""Per-group margin between the classes, ``(G, n)`` inputs -> ``(G,)``; NaN where a class is absent.

    ``mean``: :math:`\text{mean}_{c}(\bar A) - \text{mean}_{i}(\bar A)`; ``minmax``: :math:`\min_c(\bar A) -
    \max_i(\bar A)`, over the correct (c) and incorrect (i) present responses of the group.
    """
    good, bad = present & correct, present & ~correct
    if mode == "mean":
        stat_good = (means * good).sum(-1) / good.sum(-1)
        stat_bad = (means * bad).sum(-1) / bad.sum(-1)
    elif mode == "minmax":
        stat_good = means.masked_fill(~good, math.inf).amin(-1)
        stat_bad = means.masked_fill(~bad, -math.inf).amax(-1)
    else:
        raise ValueError(f"margin mode must be 'mean' or 'minmax', got {mode!r}")
    eligible = good.any(-1) & bad.any(-1)
    return torch.where(eligible, stat_good - stat_bad, torch.full_like(stat_good, math.nan))


def margin_shift(
    means: torch.Tensor,
    correct: torch.Tensor,
    present: torch.Tensor,
    group_size: int,
    delta: float,
    mode: str = "mean",
    direction: str = "both",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Uni-OPD margin shift: the constant added to every valid token of each response.

    In each group holding both classes with :math:`\text{gap} < \delta`, :math:`s = \delta - \text{gap}` (that is,
    :math:`(\text{stat}_i - \text{stat}_c) + \delta`) is split by ``direction``: ``both`` adds :math:`+s/2` to correct
    and :math:`-s/2` to incorrect responses, ``correct_up`` adds :math:`+s` to correct ones, ``incorrect_down``
    :math:`-s` to incorrect ones. Afterwards the gap is exactly :math:`\delta`. All-correct or all-incorrect groups
    are left alone.

    Returns:
        ``(shift, gap)``: ``(N,)`` per-response shifts and ``(G,)`` gaps before the shift (NaN: class missing).
    """
    shape = (-1, group_size)
    gap = margin_gap(means.view(shape), correct.view(shape), present.view(shape), mode)
    s = torch.where(gap < delta, delta - gap, torch.zeros_like(gap)).unsqueeze(-1)  # NaN < delta is False
    if direction not in _DIRECTIONS:
        raise ValueError(f"margin direction must be one of {tuple(_DIRECTIONS)}, got {direction!r}")
    up, down = _DIRECTIONS[direction]
    c = correct.view(shape)
    shift = torch.where(c, up * s, -down * s) * present.view(shape)
    return shift.reshape(-1), gap


def margin_mask(
    means: torch.Tensor,
    correct: torch.Tensor,
    present: torch.Tensor,
    group_size: int,
    delta: float,
    mode: str = "mean",
    min_retain_ratio: float = 0.25,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Uni-OPD margin mask: greedily drop responses until the gap reaches ``delta``.

    In each group holding both classes, repeat: candidates are the lowest-:math:`\bar A` kept correct response and the
    highest-:math:`\bar A` kept incorrect one; drop the candidate whose removal raises the gap more (the correct one on
    a tie). Stop when the gap is at least ``delta``, when no removal raises it, or when a removal would leave fewer
    than :math:`\max(1, \lfloor r n_\text{class} \rfloor)` responses of that class (``r = min_retain_ratio``, rounded
    down as in the reference code).

    Returns:
        ``(keep, gap)``: ``(N,)`` bool, False for dropped responses (their advantages become 0), and the ``(G,)`` gaps
        before masking.
    """
    shape = (-1, group_size)
    means_g, correct_g, present_g = means.view(shape), correct.view(shape), present.view(shape)
    gap = margin_gap(means_g, correct_g, present_g, mode)
    keep = present_g.clone()
    for g in torch.nonzero(~torch.isnan(gap)).flatten().tolist():
        floors = {
            cls: max(1, math.floor(min_retain_ratio * int((present_g[g] & (correct_g[g] == cls)).sum())))
            for cls in (True, False)
        }
        current = gap[g].item()
        while current < delta:
            best = None
            for cls in (True, False):
                members = torch.nonzero(keep[g] & (correct_g[g] == cls)).flatten()
                if len(members) - 1 < floors[cls]:
                    continue
                values = means_g[g, members]
                candidate = members[values.argmin() if cls else values.argmax()]
                trial = keep[g].clone()
                trial[candidate] = False
                new = margin_gap(means_g[g : g + 1], correct_g[g : g + 1], trial[None], mode).item()
                if new > current and (best is None or new > best[0]):
                    best = (new, candidate)
            if best is None:
                break
            current, dropped = best
            keep[g, dropped] = False
    return keep.reshape(-1) | ~present, gap


def margin_group_mask(
    means: torch.Tensor,
    correct: torch.Tensor,
    present: torch.Tensor,
    group_size: int,
    delta: float,
    mode: str = "minmax",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Uni-OPD margin mask as the paper words it: discard the prompt groups that fail the margin condition.

    A group q holding both classes is kept when :math:`m(q) \ge \delta`, with the paper's margin
    :math:`m(q) = \min_{\tau \in S_+(q)} \bar A_\tau - \max_{\tau \in S_-(q)} \bar A_\tau` (``mode="minmax"``;
    ``"mean"`` compares the class means instead); otherwise every response of the group is dropped. All-correct and
    all-incorrect groups have no margin and are kept, as the shift leaves them alone.

    Returns:
        ``(keep, gap)``: ``(N,)`` bool, False for every response of a discarded group, and the ``(G,)`` gaps (NaN:
        a class is missing).
    """
    shape = (-1, group_size)
    gap = margin_gap(means.view(shape), correct.view(shape), present.view(shape), mode)
    failed = gap < delta  # NaN < delta is False: groups without both classes stay
    return (~failed).unsqueeze(-1).expand(-1, group_size).reshape(-1), gap


def balance_classes(
    correct: torch.Tensor, present: torch.Tensor, group_size: int, ratio: float, generator: torch.Generator
) -> torch.Tensor:
    r"""Online correctness-aware balancing: in each group, randomly drop the majority class's surplus.

    A group with :math:`n_c` correct and :math:`n_i` incorrect present responses keeps at most
    :math:`\lfloor r\, n_i \rfloor` correct and :math:`\lfloor n_c / r \rfloor` incorrect ones (``r = ratio``,
    correct:incorrect = r:1); as in the reference code, a class whose target is below one response is not reduced.
    All-correct and all-incorrect groups are untouched. Draws from
    ``generator`` only, so every process holding the same inputs and seed drops the same responses.

    Returns:
        ``(N,)`` bool, False for dropped responses.
    """
    shape = (-1, group_size)
    keep = torch.ones_like(present).view(shape).clone()
    correct_g, present_g = correct.view(shape), present.view(shape)
    for g in range(keep.size(0)):
        good = torch.nonzero(present_g[g] & correct_g[g]).flatten()
        bad = torch.nonzero(present_g[g] & ~correct_g[g]).flatten()
        if len(good) == 0 or len(bad) == 0:
            continue
        for members, allowed in ((good, math.floor(ratio * len(bad))), (bad, math.floor(len(good) / ratio))):
            if 1 <= allowed < len(members):
                order = torch.randperm(len(members), generator=generator)
                keep[g, members[order[allowed:]]] = False
    return keep.reshape(-1)


def difficulty_balanced_indices(pass_rates: torch.Tensor, num_bins: int = 5, seed: int = 0) -> torch.Tensor:
    r"""Offline difficulty-aware balancing: row indices that flatten the pass-rate histogram.

    Pass rates in (0, 1) (mid difficulty) fall into ``num_bins`` equal-width bins; each non-empty bin is up-sampled,
    with replacement and deterministically from ``seed``, to the size of the largest bin. Prompts that are always
    solved (1) or never solved (0) carry no contrast between classes and are kept once, as is every other prompt.

    Returns:
        Indices into the original rows: each row at least once, then the added copies, shuffled.
    """
    generator = torch.Generator().manual_seed(seed)
    rates = pass_rates.double()
    mid = (rates > 0) & (rates < 1)
    bins = (rates * num_bins).long().clamp(max=num_bins - 1)
    members = [torch.nonzero(mid & (bins == b)).flatten() for b in range(num_bins)]
    target = max((len(m) for m in members), default=0)
    extra = [m[torch.randint(len(m), (target - len(m),), generator=generator)] for m in members if len(m)]
    indices = torch.cat([torch.arange(len(rates)), *extra])
    return indices[torch.randperm(len(indices), generator=generator)]

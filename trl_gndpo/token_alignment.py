r"""Aligning a student's and a teacher's tokens of the same text by character spans, and the span signal.

A teacher with its own tokenizer scores its own tokens of the student's completion text. Both token sequences cover
the same characters, so they are grouped into the smallest spans whose boundaries coincide: a character position is
a span boundary when it is a token boundary in both tokenizations. Over a span :math:`k` both models give the
probability of the same string, one as the product of its teacher tokens', the other of its student tokens':

.. math:: \log q(k) = \sum_{u \in k} \log q(u), \qquad \log p(k) = \sum_{t \in k} \log p(t)

**Placement.** The span's signal :math:`r_k = \mathrm{clamp}(\log q(k) - \log p(k), -b, b)` is computed, and whitened
(one sample per span: the statistics count a span once, however many student tokens it has), on the span's *last*
student token, the representative; every student token of the span then receives the representative's advantage.
Why: the span's reward depends on the joint choice of its student tokens, and the policy gradient of that choice is
:math:`A_k \nabla \log p(k) = A_k \sum_{t \in k} \nabla \log p(t)`, i.e. the same advantage on each of them (putting
it on the last token only drops the earlier tokens' gradients; spreading it evenly divides a span's reward by its
length). With identical tokenizations every span is a single token, the representative is the token itself and the
broadcast is the identity, so the signal, the statistics and the advantages are today's, bit for bit.

**Unaligned spans.** A span is unaligned when one side has no token in it, when a side's tokens leave a character of
it uncovered (offsets with gaps, or not reaching the ends of the text), or when a token in it is flagged (e.g. the
student's bytes did not decode to text, or the teacher's tokenizer mapped it to an unknown token). A zero-width token
(no characters) is a span of its own with no counterpart, hence unaligned. Offsets that are not non-decreasing or fall
outside the text make the whole row unaligned. Unaligned spans are masked (no signal, no statistics, no loss) and
counted by the caller, never given a zero signal.

Offsets are ``(start, end)`` character positions as fast tokenizers' ``return_offsets_mapping`` gives them: tokens
that split one multi-byte character all carry that character's offsets (so no boundary falls inside it).

Nothing here imports a model, a tokenizer or a trainer; tested against float64 references in
``tests/test_token_alignment.py``.
"""

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch

__all__ = [
    "SpanAlignment",
    "SpanPlacement",
    "align_spans",
    "from_representatives",
    "place_spans",
    "student_span_sums",
    "teacher_span_sums",
]

Offsets = Sequence[tuple[int, int]]


@dataclass(frozen=True)
class SpanAlignment:
    """One row's spans: the span of each student and teacher token, and whether each span is aligned."""

    student_span: list[int]
    teacher_span: list[int]
    aligned: list[bool]


def _valid_offsets(offsets: Offsets, length: int) -> bool:
    previous = (0, 0)
    for start, end in offsets:
        if not (0 <= start <= end <= length) or start < previous[0] or end < previous[1]:
            return False
        previous = (start, end)
    return True


def _boundaries(offsets: Offsets) -> set[int]:
    """Certain token boundaries of one tokenization: positions where a token ends and the next one starts."""
    wide = [(s, e) for s, e in offsets if e > s]
    return {e for (_, e), (s, _) in pairwise(wide) if e == s}


def _covered(offsets: Offsets, start: int, end: int) -> bool:
    """Whether tokens (non-decreasing, non-empty, all inside [start, end)) cover every character of [start, end)."""
    reached = start
    for s, e in offsets:
        if s > reached:
            return False
        reached = max(reached, e)
    return reached == end


def align_spans(
    student_offsets: Offsets,
    teacher_offsets: Offsets,
    length: int,
    student_ok: Sequence[bool] | None = None,
    teacher_ok: Sequence[bool] | None = None,
) -> SpanAlignment:
    """Group the tokens of two tokenizations of one text of ``length`` characters into the smallest common spans.

    Span boundaries are 0, ``length`` and every position that is a boundary of both tokenizations (a token ends
    there and the next one starts there). A token of positive width belongs to the span containing its characters;
    a zero-width token is a span of its own. Spans are numbered in text order, zero-width ones after the others.

    Args:
        student_offsets, teacher_offsets: ``(start, end)`` character offsets of each token, in token order.
        length: number of characters of the text.
        student_ok, teacher_ok: per-token flags; a span holding a token flagged False is unaligned.

    Returns:
        A :class:`SpanAlignment`. Every token gets a span; see the module docstring for when a span is unaligned.
    """
    student_ok = [True] * len(student_offsets) if student_ok is None else list(student_ok)
    teacher_ok = [True] * len(teacher_offsets) if teacher_ok is None else list(teacher_ok)
    if not (_valid_offsets(student_offsets, length) and _valid_offsets(teacher_offsets, length)):
        n = len(student_offsets) + len(teacher_offsets)  # each token alone, all unaligned
        return SpanAlignment(list(range(len(student_offsets))), list(range(len(student_offsets), n)), [False] * n)
    cuts = sorted({0, length} | (_boundaries(student_offsets) & _boundaries(teacher_offsets)))
    num_text_spans = len(cuts) - 1
    extra = []  # zero-width tokens: one span each

    def assign(offsets):
        spans = []
        for start, end in offsets:
            if end > start:
                spans.append(bisect.bisect_left(cuts, end) - 1)  # the span [cuts[k], cuts[k+1]) holding `end - 1`
            else:
                spans.append(num_text_spans + len(extra))
                extra.append(None)
        return spans

    student_span, teacher_span = assign(student_offsets), assign(teacher_offsets)
    aligned = [True] * num_text_spans + [False] * len(extra)
    seen = [[False, False] for _ in range(num_text_spans)]
    for side, (spans, offsets, ok) in enumerate(
        [(student_span, student_offsets, student_ok), (teacher_span, teacher_offsets, teacher_ok)]
    ):
        members = [[] for _ in range(num_text_spans)]
        for span, offset, good in zip(spans, offsets, ok, strict=True):
            if span < num_text_spans:
                members[span].append(offset)
                seen[span][side] = True
                aligned[span] = aligned[span] and good
        for k in range(num_text_spans):
            aligned[k] = aligned[k] and _covered(members[k], cuts[k], cuts[k + 1])
    aligned = [a and (k >= num_text_spans or all(seen[k])) for k, a in enumerate(aligned)]
    return SpanAlignment(student_span, teacher_span, aligned)


@dataclass(frozen=True)
class SpanPlacement:
    """Where a batch's span signals live on the student's ``(B, T)`` completion grid.

    Attributes:
        last: ``(B, T)`` long, for each student token the position of its span's last student token (the
            representative); a token in no aligned span points at itself.
        representative: ``(B, T)`` bool, the last student token of each aligned span.
        member: ``(B, T)`` bool, the student tokens of aligned spans.
        teacher_target: ``(B, T_q)`` long, for each teacher token the representative of its span, or ``T`` (no
            aligned span, or padding).
        unaligned: ``(B, T)`` bool, the student tokens of unaligned spans (the count that is logged).
    """

    last: torch.Tensor
    representative: torch.Tensor
    member: torch.Tensor
    teacher_target: torch.Tensor
    unaligned: torch.Tensor


def place_spans(alignments: Sequence[SpanAlignment], length: int, teacher_length: int, device=None) -> SpanPlacement:
    """Batch the rows' alignments onto a ``(B, length)`` student grid and a ``(B, teacher_length)`` teacher grid.

    Row ``i``'s student tokens are positions ``0 .. len(student_span) - 1`` of row ``i`` (the valid completion
    tokens; the rest is padding), its teacher tokens positions ``0 .. len(teacher_span) - 1`` of the teacher grid.
    """
    batch = len(alignments)
    last = torch.arange(length).repeat(batch, 1)
    member = torch.zeros(batch, length, dtype=torch.bool)
    unaligned = torch.zeros(batch, length, dtype=torch.bool)
    teacher_target = torch.full((batch, teacher_length), length, dtype=torch.long)
    for i, row in enumerate(alignments):
        last_of = {}
        for t, span in enumerate(row.student_span):
            last_of[span] = t  # tokens come in order: the final assignment is the span's last student token
        for t, span in enumerate(row.student_span):
            if row.aligned[span]:
                last[i, t], member[i, t] = last_of[span], True
            else:
                unaligned[i, t] = True
        for u, span in enumerate(row.teacher_span):
            if row.aligned[span]:
                teacher_target[i, u] = last_of[span]
    representative = member & (last == torch.arange(length))
    return SpanPlacement(*(x.to(device) for x in (last, representative, member, teacher_target, unaligned)))


def student_span_sums(logps: torch.Tensor, placement: SpanPlacement) -> torch.Tensor:
    r"""The student's span log-probs on the representatives, 0 elsewhere.

    .. math:: S_t = \sum_{u \,:\, \mathrm{last}(u) = t} \log p(u) \quad (t \text{ a representative})

    A single-token span gives ``0 + logp``, i.e. ``logp`` itself (NaN and infinities pass through unchanged).
    """
    members = torch.where(placement.member, logps, torch.zeros_like(logps))
    sums = torch.zeros_like(logps).scatter_add_(1, placement.last, members)
    return torch.where(placement.representative, sums, torch.zeros_like(sums))


def teacher_span_sums(teacher_logps: torch.Tensor, placement: SpanPlacement) -> torch.Tensor:
    r"""The teacher's span log-probs ``(B, T_q) -> (B, T)`` on the student's representatives, 0 elsewhere.

    .. math:: Q_t = \sum_{u \,:\, \mathrm{target}(u) = t} \log q(u)
    """
    batch, length = placement.last.shape
    target = placement.teacher_target
    values = torch.where(target < length, teacher_logps, torch.zeros_like(teacher_logps))
    sums = teacher_logps.new_zeros(batch, length + 1).scatter_add_(1, target, values)[:, :length]
    return torch.where(placement.representative, sums, torch.zeros_like(sums))


def from_representatives(x: torch.Tensor, placement: SpanPlacement) -> torch.Tensor:
    """Give every student token of an aligned span its representative's value: ``x[i, last[i, t]]``.

    Tokens in no aligned span keep their own value (``last`` points at themselves), so the identity placement
    returns ``x`` unchanged.
    """
    return x.gather(1, placement.last)

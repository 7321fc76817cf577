"""Character-span alignment of two tokenizations, against references written here: a union-find over overlapping
tokens for the spans, float64 loops for the span signal, real byte-level BPE tokenizers (two different ones) on
text with multi-byte characters, and the reduction to today's per-token path, bit for bit."""

import math
import random
from itertools import pairwise

import pytest
import torch
from helpers import fresh_seeds
from tiny_models import make_tokenizer

from trl_gndpo import functional as F
from trl_gndpo import token_alignment as A


# --------------------------------------------------------------------------------------------------------------------
# Random tokenizations of one text
# --------------------------------------------------------------------------------------------------------------------
def random_tokenization(rng: random.Random, length: int, p_cut: float, p_split: float = 0.2, p_empty: float = 0.0):
    """Tokens tiling [0, length): random cuts; some one-character tokens split into 2-4 byte tokens sharing its
    offsets (like byte-level BPE on a multi-byte character); optionally zero-width tokens inserted."""
    cuts = [0] + [c for c in range(1, length) if rng.random() < p_cut] + [length]
    offsets = []
    for s, e in pairwise(cuts):
        copies = rng.randint(2, 4) if e - s == 1 and rng.random() < p_split else 1
        offsets += [(s, e)] * copies
        if rng.random() < p_empty:
            offsets.append((e, e))
    return offsets


def reference_spans(student, teacher):
    """Union-find: tokens (of either side) whose character ranges intersect are in one span; a zero-width token is
    alone. Returns the partition as a set of frozensets of ('s', i) / ('t', j)."""
    nodes = [("s", i, o) for i, o in enumerate(student)] + [("t", j, o) for j, o in enumerate(teacher)]
    parent = list(range(len(nodes)))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, (_, _, (s1, e1)) in enumerate(nodes):
        for b, (_, _, (s2, e2)) in enumerate(nodes):
            if e1 > s1 and e2 > s2 and max(s1, s2) < min(e1, e2):
                parent[find(a)] = find(b)
    groups = {}
    for a, (side, i, _) in enumerate(nodes):
        groups.setdefault(find(a), set()).add((side, i))
    return {frozenset(g) for g in groups.values()}


def partition(alignment: A.SpanAlignment):
    groups = {}
    for i, k in enumerate(alignment.student_span):
        groups.setdefault(k, set()).add(("s", i))
    for j, k in enumerate(alignment.teacher_span):
        groups.setdefault(k, set()).add(("t", j))
    return {frozenset(g) for g in groups.values()}


@pytest.mark.parametrize("seed", fresh_seeds(40))
def test_spans_are_the_smallest_common_ones(seed):
    rng = random.Random(seed)
    length = rng.randint(1, 40)
    student = random_tokenization(rng, length, rng.random(), p_empty=0.1)
    teacher = random_tokenization(rng, length, rng.random(), p_empty=0.1)
    alignment = A.align_spans(student, teacher, length)
    assert partition(alignment) == reference_spans(student, teacher)
    for k, aligned in enumerate(alignment.aligned):  # a span is aligned iff it has characters, i.e. tokens of both
        members = [student[i] for i, s in enumerate(alignment.student_span) if s == k]
        members += [teacher[j] for j, s in enumerate(alignment.teacher_span) if s == k]
        has_both = k in alignment.student_span and k in alignment.teacher_span
        assert aligned == (has_both and all(e > s for s, e in members))


def test_identical_tokenizations_give_one_span_per_token():
    rng = random.Random(0)
    offsets = random_tokenization(rng, 30, 0.6, p_split=0.0)
    alignment = A.align_spans(offsets, offsets, 30)
    assert alignment.student_span == alignment.teacher_span == list(range(len(offsets)))
    assert all(alignment.aligned)


def test_a_split_character_is_never_cut():
    # "é" as two byte tokens on the student side, one token on the teacher side, plus one common boundary
    alignment = A.align_spans([(0, 1), (0, 1), (1, 3)], [(0, 2), (2, 3)], 3)
    assert alignment.student_span == [0, 0, 0] and alignment.teacher_span == [0, 0]
    alignment = A.align_spans([(0, 1), (0, 1), (1, 3)], [(0, 1), (1, 2), (2, 3)], 3)
    assert alignment.student_span == [0, 0, 1] and alignment.teacher_span == [0, 1, 1]
    assert alignment.aligned == [True, True]


def test_unaligned_spans():
    # a gap in the teacher's offsets (character 2 uncovered): no boundary is certain around it, so the span around
    # it is unaligned; the next one is not
    alignment = A.align_spans([(0, 2), (2, 4), (4, 6)], [(0, 2), (3, 4), (4, 6)], 6)
    assert alignment.student_span == [0, 0, 1] and alignment.aligned == [False, True]
    # offsets that stop short of the end of the text
    alignment = A.align_spans([(0, 2), (2, 4)], [(0, 2), (2, 3)], 4)
    assert alignment.aligned == [True, False]
    # a flagged token (e.g. an unknown token) spoils its span only
    alignment = A.align_spans([(0, 2), (2, 4)], [(0, 1), (1, 2), (2, 4)], 4, teacher_ok=[True, False, True])
    assert alignment.aligned == [False, True]
    # a zero-width token is a span of its own, unaligned, and does not disturb the others
    alignment = A.align_spans([(0, 2), (2, 2), (2, 4)], [(0, 2), (2, 4)], 4)
    assert alignment.student_span == [0, 2, 1] and alignment.aligned == [True, True, False]
    # offsets outside the text or going backwards: the whole row is unaligned
    for student in ([(0, 2), (2, 5)], [(0, 2), (1, 1), (2, 4)]):
        alignment = A.align_spans(student, [(0, 4)], 4)
        assert not any(alignment.aligned)
        assert len(set(alignment.student_span + alignment.teacher_span)) == len(student) + 1


# --------------------------------------------------------------------------------------------------------------------
# The span signal on the student's grid
# --------------------------------------------------------------------------------------------------------------------
def random_batch(seed, batch=5, length=12, teacher_length=16):
    """Random rows of random lengths with random tokenizations and random log-probs; some teacher tokens flagged
    (always the first of the first row), so some spans are unaligned."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    alignments = []
    for _ in range(batch):
        chars = rng.randint(1, 20)
        while True:
            student = random_tokenization(rng, chars, rng.random())
            teacher = random_tokenization(rng, chars, rng.random())
            if len(student) <= length and len(teacher) <= teacher_length:
                break
        teacher_ok = [rng.random() > 0.1 and not (u == 0 and not alignments) for u in range(len(teacher))]
        alignments.append(A.align_spans(student, teacher, chars, teacher_ok=teacher_ok))
    student_logps = -torch.rand(batch, length, generator=g, dtype=torch.float64) * 6
    teacher_logps = -torch.rand(batch, teacher_length, generator=g, dtype=torch.float64) * 6
    return alignments, student_logps, teacher_logps


def reference_advantages(alignments, student_logps, teacher_logps, bound, eps):
    """Span by span in float64: r_k = clamp(sum log q - sum log p), whitened over aligned spans, given to every
    student token of the span; 0 elsewhere."""
    spans = []  # (row, student tokens, r_k)
    for i, row in enumerate(alignments):
        for k, aligned in enumerate(row.aligned):
            if not aligned:
                continue
            tokens = [t for t, s in enumerate(row.student_span) if s == k]
            q = sum(float(teacher_logps[i, u]) for u, s in enumerate(row.teacher_span) if s == k)
            p = sum(float(student_logps[i, t]) for t in tokens)
            spans.append((i, tokens, min(max(q - p, -bound), bound)))
    values = [r for _, _, r in spans]
    mean = sum(values) / max(len(values), 1)
    # Bessel's variance; one span carries no spread (0, as functional.mean_and_unbiased_var defines it)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    out = torch.zeros(student_logps.shape, dtype=torch.float64)
    for i, tokens, r in spans:
        out[i, tokens] = (r - mean) / math.sqrt(var + eps)
    return out, len(values)


def span_advantages(alignments, student_logps, teacher_logps, bound, eps, length=None):
    """The library's path: span sums on the representatives, then today's functional.py, then the broadcast."""
    placement = A.place_spans(alignments, student_logps.shape[1], teacher_logps.shape[1])
    teacher = A.teacher_span_sums(teacher_logps, placement)
    student = A.student_span_sums(student_logps, placement)
    signal, valid = F.clamped_log_ratio(teacher, student, placement.representative, bound)
    advantages, _, _ = F.whitened_advantages(signal, valid, eps)
    return A.from_representatives(advantages, placement), A.from_representatives(valid, placement), placement


@pytest.mark.parametrize("seed", fresh_seeds(20))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_span_advantages_match_reference(seed, dtype):
    alignments, student_logps, teacher_logps = random_batch(seed)
    expected, num_spans = reference_advantages(alignments, student_logps, teacher_logps, 5.0, 1e-8)
    advantages, loss_mask, placement = span_advantages(
        alignments, student_logps.to(dtype), teacher_logps.to(dtype), 5.0, 1e-8
    )
    assert advantages.dtype == dtype
    torch.testing.assert_close(advantages.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(loss_mask, placement.member)  # every token of an aligned span is trained, nothing else
    assert placement.representative.sum() == num_spans
    unaligned = sum(
        sum(not row.aligned[s] for s in row.student_span) for row in alignments
    )  # counted, not silently zero
    assert placement.unaligned.sum() == unaligned > 0
    assert (placement.member.sum(1) < torch.tensor([len(r.student_span) for r in alignments])).any()


@pytest.mark.parametrize("seed", fresh_seeds(10))
def test_span_sums_match_reference(seed):
    alignments, student_logps, teacher_logps = random_batch(seed)
    placement = A.place_spans(alignments, student_logps.shape[1], teacher_logps.shape[1])
    student = A.student_span_sums(student_logps.float(), placement)
    teacher = A.teacher_span_sums(teacher_logps.float(), placement)
    for i, row in enumerate(alignments):
        last = {k: t for t, k in enumerate(row.student_span)}
        for k, aligned in enumerate(row.aligned):
            if aligned:
                t = last[k]
                p = sum(float(student_logps[i, u]) for u, s in enumerate(row.student_span) if s == k)
                q = sum(float(teacher_logps[i, u]) for u, s in enumerate(row.teacher_span) if s == k)
                assert student[i, t].item() == pytest.approx(p, rel=1e-5)
                assert teacher[i, t].item() == pytest.approx(q, rel=1e-5)
    assert (student[~placement.representative] == 0).all() and (teacher[~placement.representative] == 0).all()


@pytest.mark.parametrize("seed", fresh_seeds(10))
def test_identical_tokenizations_reduce_to_the_token_path_bit_for_bit(seed):
    """Same offsets on both sides: the span path gives today's advantages exactly (torch.equal, not close), through
    the same functional.py calls, including padding, non-finite log-probs and clamped tokens."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    batch, length = 6, 14
    teacher_logps = -torch.rand(batch, length, generator=g) * 12
    student_logps = -torch.rand(batch, length, generator=g) * 12
    teacher_logps[0, 1] = float("nan")
    student_logps[1, 2] = float("-inf")
    alignments, mask = [], torch.zeros(batch, length, dtype=torch.bool)
    for i in range(batch):
        n = rng.randint(1, length)
        offsets, chars = [], 0
        for _ in range(n):  # n tokens of random widths
            width = rng.randint(1, 3)
            offsets.append((chars, chars + width))
            chars += width
        alignments.append(A.align_spans(offsets, list(offsets), chars))
        mask[i, :n] = True
    assert all(all(a.aligned) for a in alignments)

    signal, valid = F.clamped_log_ratio(teacher_logps, student_logps, mask, 5.0)
    today, _, _ = F.whitened_advantages(signal, valid, 1e-8)

    spans, loss_mask, placement = span_advantages(alignments, student_logps, teacher_logps, 5.0, 1e-8)
    assert torch.equal(placement.representative, mask) and torch.equal(placement.member, mask)
    assert torch.equal(spans, today)
    assert torch.equal(loss_mask, valid)
    assert (today.abs() > 0).sum() > 10


# --------------------------------------------------------------------------------------------------------------------
# Two real, different byte-level BPE tokenizers
# --------------------------------------------------------------------------------------------------------------------
TEXTS = [
    "The answer is 19. Größe: naïve café, ça fait 19!",
    "日本語のテキスト and emoji 🦄🙂 in one line.\n\n  two spaces, a tab\tand more",
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "é",
]


@pytest.mark.parametrize("text", TEXTS)
def test_real_tokenizers_align_on_unicode_text(text):
    student, teacher = make_tokenizer(), make_tokenizer(variant="other")
    encoded = [tok(text, return_offsets_mapping=True, add_special_tokens=False) for tok in (student, teacher)]
    (s_ids, s_offsets), (t_ids, t_offsets) = [(e["input_ids"], e["offset_mapping"]) for e in encoded]
    alignment = A.align_spans(s_offsets, t_offsets, len(text))
    assert all(alignment.aligned)
    num_spans = len(alignment.aligned)
    assert sorted(set(alignment.student_span)) == list(range(num_spans))  # spans in text order, each non-empty
    position = 0
    for k in range(num_spans):
        s_span = [i for i, s in zip(s_ids, alignment.student_span, strict=True) if s == k]
        t_span = [i for i, s in zip(t_ids, alignment.teacher_span, strict=True) if s == k]
        piece = student.decode(s_span)
        # both tokenizations decode to the same characters, in order, covering the text
        assert piece == teacher.decode(t_span) == text[position : position + len(piece)] and piece
        position += len(piece)
        # smallest: no shorter prefix of the span ends on a boundary of both tokenizations
        for j in range(1, len(s_span)):
            prefix = student.decode(s_span[:j])
            assert "\ufffd" in prefix or all(teacher.decode(t_span[:m]) != prefix for m in range(1, len(t_span)))
    assert position == len(text)
    if len(text) > 1:
        assert s_ids != t_ids and num_spans < max(len(s_ids), len(t_ids))  # the tokenizations really differ

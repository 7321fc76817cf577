"""A teacher with its own tokenizer and processor: the student's sampled ids decoded with character offsets, the
teacher's own inputs (prompt through its chat template and image processor, completion through its tokenizer), and
the alignment of both on real, different tiny tokenizers."""

import random

import pytest
import torch
from tiny_models import make_image, make_processor, make_tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from trl_gndpo import cross_tokenizer as X

TEXTS = [
    "The answer is 19. Größe: naïve café, ça fait 19!",
    "日本語のテキスト and emoji 🦄🙂 in one line.\n\n  two spaces",
]


def sampled_ids(tokenizer, text: str, rng: random.Random) -> list[int]:
    """A tokenization of `text` as a sampler may produce it: canonical pieces, some words split into their bytes
    (non-canonical, still decoding to the same text)."""
    ids = []
    for word in text.split(" "):
        piece = word if not ids else " " + word
        if rng.random() < 0.4:
            ids += byte_ids(tokenizer, piece)
        else:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


def byte_ids(tokenizer, piece: str) -> list[int]:
    """One token per byte (byte-level BPE: every byte is in the vocabulary)."""
    table = bytes_to_unicode()
    return [tokenizer.convert_tokens_to_ids(table[b]) for b in piece.encode()]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("text", TEXTS)
def test_decode_with_offsets_on_sampled_ids(text, seed):
    tokenizer = make_tokenizer()
    ids = sampled_ids(tokenizer, text, random.Random(seed))
    decoded = X.decode_with_offsets(tokenizer, ids, {tokenizer.eos_token_id})
    assert decoded.text == text == tokenizer.decode(ids)
    assert all(decoded.ok) and not decoded.ends_with_eos
    # tokens sharing offsets are the bytes of the characters they decode to together; the ranges tile the text
    groups = {}
    for token, offset in zip(ids, decoded.offsets, strict=True):
        groups.setdefault(offset, []).append(token)
    position = 0
    for (start, end), tokens in sorted(groups.items()):
        assert start == position < end
        assert tokenizer.decode(tokens) == text[start:end]
        position = end
    assert position == len(text)
    if seed:  # some words went in as single bytes: multi-byte characters are shared by several tokens
        assert any(len(tokens) > 1 for tokens in groups.values()) or text.isascii()


def test_decode_with_offsets_flags_specials_unreadable_bytes_and_pairs_eos():
    tokenizer = make_tokenizer()
    hello = tokenizer("Hi", add_special_tokens=False)["input_ids"]
    lone = byte_ids(tokenizer, "é")[1:]  # a continuation byte without its lead byte: not text
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    eos = tokenizer.eos_token_id
    decoded = X.decode_with_offsets(tokenizer, [*hello, start, *lone, *hello, eos], {eos})
    n = len(hello)
    assert decoded.ends_with_eos and decoded.text.endswith("Hi")
    assert decoded.ok[: n + 1] == [True] * n + [False]  # the special token is flagged
    assert not any(decoded.ok[n + 1 : n + 2 + len(lone)])  # the bad byte, and the chunk it is decoded with
    assert "\ufffd" in decoded.text and decoded.ok[-1]
    assert decoded.offsets[n] == (n, n)  # the special token: zero width
    assert decoded.offsets[-1] == (len(decoded.text), len(decoded.text) + 1)  # the EOS slot after the text
    unfinished = X.decode_with_offsets(tokenizer, [*hello, *byte_ids(tokenizer, "é")[:1]], {eos})
    assert unfinished.ok == [True] * n + [False] and unfinished.text == "Hi"


@pytest.mark.parametrize("text", TEXTS)
def test_alignment_of_a_sampled_completion_with_another_tokenizer(text):
    student, teacher = make_tokenizer(), make_tokenizer(variant="other")
    ids = [*sampled_ids(student, text, random.Random(1)), student.eos_token_id]
    decoded = X.decode_with_offsets(student, ids, {student.eos_token_id})
    batch = X.teacher_batch(teacher, [{"prompt": [{"role": "user", "content": "Hi"}]}], [decoded], {}, "cpu")
    alignment = X.align(decoded, batch.offsets[0], batch.ok[0])
    assert all(alignment.aligned)
    teacher_ids = batch.input_ids[0, -batch.completion_length :].tolist()
    assert teacher_ids[-1] == teacher.eos_token_id and teacher.decode(teacher_ids[:-1]) == text
    for k in range(len(alignment.aligned)):  # each span: the same string on both sides
        s = [i for i, span in zip(ids, alignment.student_span, strict=True) if span == k]
        t = [i for i, span in zip(teacher_ids, alignment.teacher_span, strict=True) if span == k]
        assert student.decode(s) == teacher.decode(t)
    assert alignment.student_span[-1] == alignment.teacher_span[-1] == len(alignment.aligned) - 1  # EOS with EOS


def test_teacher_batch_renders_the_prompt_with_the_teachers_template_and_pads_like_trl():
    student, teacher = make_tokenizer(), make_tokenizer("qwen3", variant="other")
    rows = [{"prompt": [{"role": "user", "content": c}]} for c in ("Hi", "What is 12 + 7, please?")]
    completions = [X.decode_with_offsets(student, student(t)["input_ids"], set()) for t in ("19", "It is 19.")]
    batch = X.teacher_batch(teacher, rows, completions, {"enable_thinking": False}, "cpu")
    for i, row in enumerate(rows):
        prompt = teacher.apply_chat_template(
            row["prompt"], add_generation_prompt=True, enable_thinking=False, return_dict=True
        )["input_ids"]
        completion = teacher(completions[i].text, add_special_tokens=False)["input_ids"]
        mask = batch.attention_mask[i].bool()
        assert batch.input_ids[i][mask].tolist() == list(prompt) + completion
        width = batch.input_ids.size(1) - batch.completion_length
        assert mask[:width].tolist() == [False] * (width - len(prompt)) + [True] * len(prompt)  # left-padded prompt
    assert "<think>" in teacher.decode(batch.input_ids[0])  # the teacher's own template (qwen3)


def test_teacher_batch_uses_the_teachers_image_processor():
    """Qwen3-VL teacher (patch 16) for rows a Qwen2-VL student (patch 14) would render: the teacher's pixel values,
    grid and image tokens come from its own processor."""
    student_processor, teacher_processor = make_processor("qwen2_vl"), make_processor("qwen3_vl")
    rows = [{"prompt": [{"role": "user", "content": "What colour?"}], "image": make_image(i)} for i in range(2)]
    completions = [X.decode_with_offsets(student_processor.tokenizer, [40, 41], set()) for _ in rows]
    batch = X.teacher_batch(teacher_processor, rows, completions, {}, "cpu")
    own = teacher_processor.image_processor(images=[make_image(0), make_image(1)])
    torch.testing.assert_close(batch.model_inputs["pixel_values"], torch.as_tensor(own["pixel_values"]))
    assert batch.model_inputs["pixel_values"].shape[-1] == 3 * 2 * 16 * 16  # channels x temporal x patch^2
    assert batch.model_inputs["num_images"] == [1, 1]
    image_token = teacher_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    tokens_per_image = int(own["image_grid_thw"][0].prod()) // 4  # merge 2x2
    assert ((batch.input_ids == image_token).sum(1) == tokens_per_image).all()
    mm = batch.model_inputs["mm_token_type_ids"]
    assert mm.shape == batch.input_ids.shape and torch.equal(mm.bool(), batch.input_ids == image_token)

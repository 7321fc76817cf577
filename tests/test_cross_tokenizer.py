"""A teacher with its own tokenizer and processor: the student's sampled ids decoded with character offsets, the
teacher's own inputs (prompt through its chat template and image processor, completion through its tokenizer), and
the alignment of both on real, different tiny tokenizers."""

import copy
import random

import pytest
import torch
from helpers import fresh_seeds, reference_logps
from tiny_models import (
    make_image,
    make_image_dataset,
    make_processor,
    make_text_dataset,
    make_text_model,
    make_tokenizer,
    make_vlm,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode
from trl.data_utils import prepare_multimodal_messages

from trl_gndpo import GNDPOConfig, GNDPOTrainer
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


@pytest.mark.parametrize("seed", fresh_seeds(4))
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


# --------------------------------------------------------------------------------------------------------------------
# The trainer with teachers that keep their own tokenizers
# --------------------------------------------------------------------------------------------------------------------
def no_specials(tokenizer) -> dict:
    """Generation that samples no special token but the end of sequence (a random tiny model otherwise samples
    `<|im_start|>` and the like, which carry no text)."""
    return {"suppress_tokens": [i for i in tokenizer.all_special_ids if i != tokenizer.eos_token_id]}


def train(cpu_config_kwargs, student, teacher, processing_class, dataset, teacher_processing=None, **options):
    trainer = GNDPOTrainer(
        model=student,
        teacher_model=teacher,
        args=GNDPOConfig(**cpu_config_kwargs(**options)),
        train_dataset=dataset,
        processing_class=processing_class,
        teacher_processing_class=teacher_processing,
    )
    batches, generate = [], trainer._generate_and_score_completions

    def spy(inputs):
        weights = {k: v.clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}
        batch = generate(inputs)
        batches.append({"inputs": inputs, "batch": {k: v for k, v in batch.items()}, "weights": weights})
        return batch

    trainer._generate_and_score_completions = spy
    trainer.train()
    return trainer, batches


def reference_span_advantages(batches_entry, student, teachers, student_tok, eos_ids, config, base=None):
    """From the definitions, in float64: decode each completion, let its teacher read its own rendering of the row
    (one unpadded sequence per row, plain logits), sum both sides' log-probs over the spans, whiten over the aligned
    spans, and give each student token its span's advantage. `teachers(row) -> (teacher, processing class)`;
    `base`: ExOPD's reference model, whose span log-probs enter as `(lambda - 1) (log q - log p_base)`."""
    batch, inputs = batches_entry["batch"], batches_entry["inputs"]
    p = reference_logps(student, batch)
    p_base = None if base is None else reference_logps(base, batch)
    spans, tokens = [], []
    for i, row in enumerate(inputs):
        teacher, teacher_processing = teachers(row)
        teacher_tok = getattr(teacher_processing, "tokenizer", teacher_processing)
        ids = batch["completion_ids"][i][batch["completion_mask"][i].bool()].tolist()
        decoded = X.decode_with_offsets(student_tok, ids, eos_ids)
        prompt = row["prompt"]
        if hasattr(teacher_processing, "image_processor"):
            prompt = prepare_multimodal_messages(prompt, images=[row["image"]] if "image" in row else None)
        rendered = teacher_processing.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        own = teacher_tok(decoded.text, add_special_tokens=False, return_offsets_mapping=True)
        completion = own["input_ids"] + [teacher_tok.eos_token_id] * decoded.ends_with_eos
        offsets = [tuple(o) for o in own["offset_mapping"]] + [(len(decoded.text), len(decoded.text) + 1)] * (
            decoded.ends_with_eos
        )
        input_ids = torch.cat([rendered["input_ids"][0], torch.tensor(completion, dtype=torch.long)])[None]
        extra = {k: v for k, v in rendered.items() if k in ("pixel_values", "image_grid_thw")}
        if "mm_token_type_ids" in rendered:
            extra["mm_token_type_ids"] = torch.cat([rendered["mm_token_type_ids"][0], torch.zeros(len(completion))])[
                None
            ].long()
        with torch.no_grad():
            logits = teacher(input_ids=input_ids, **extra).logits.double()
        length = len(completion)
        q = logits[0, -length - 1 : -1].log_softmax(-1).gather(-1, input_ids[0, -length:, None]).squeeze(-1)
        alignment = X.align(decoded, offsets, [True] * len(offsets))
        for k, aligned in enumerate(alignment.aligned):
            if aligned:
                s = [t for t, span in enumerate(alignment.student_span) if span == k]
                u = [t for t, span in enumerate(alignment.teacher_span) if span == k]
                r = float(q[u].sum() - p[i, s].sum())
                if p_base is not None:
                    r += (config.reward_extrapolation - 1) * float(q[u].sum() - p_base[i, s].sum())
                spans.append(max(-config.token_signal_clamp, min(config.token_signal_clamp, r)))
                tokens.append((i, s))
    values = torch.tensor(spans, dtype=torch.float64)
    whitened = (values - values.mean()) / torch.sqrt(values.var() + config.whitening_eps)
    expected = torch.zeros(batch["completion_ids"].shape, dtype=torch.float64)
    for (i, s), a in zip(tokens, whitened, strict=True):
        expected[i, s] = a
    return expected


def ascii_only(tokenizer) -> dict:
    """Generation that samples only tokens of ASCII text or the end of sequence: the completions are then text,
    aligned everywhere except where the two tokenizations never meet."""
    return {
        "suppress_tokens": [
            i
            for token, i in tokenizer.get_vocab().items()
            if i != tokenizer.eos_token_id
            and (
                i in tokenizer.all_special_ids
                or not tokenizer.decode([i]).isascii()
                or "\ufffd" in tokenizer.decode([i])
            )
        ]
    }


@pytest.mark.parametrize("text_only", [True, False], ids=["ascii-text", "any-bytes"])
def test_a_teacher_with_another_tokenizer_trains_on_its_span_signal(text_only, cpu_config_kwargs):
    """Student: the default tiny BPE (Qwen2); teacher: another BPE (other merges, ids, vocabulary size) and another
    chat template (Qwen3). The advantages are the float64 span signal of the definitions; sampled bytes that are not
    text leave their spans unaligned, masked and counted. By default the teacher is refused with today's message."""
    student_tok, teacher_tok = make_tokenizer(), make_tokenizer("qwen3", variant="other")
    student = make_text_model(seed=0)
    teacher = make_text_model("qwen3", seed=1, hidden_size=128, tokenizer_variant="other")
    with pytest.raises(ValueError, match="tokenizer differs from the student's"):
        GNDPOTrainer(
            model=copy.deepcopy(student),
            teacher_model=teacher,
            args=GNDPOConfig(**cpu_config_kwargs()),
            train_dataset=make_text_dataset(8),
            processing_class=make_tokenizer(),
            teacher_processing_class=teacher_tok,
        )
    before = copy.deepcopy(student)
    trainer, batches = train(
        cpu_config_kwargs,
        student,
        teacher,
        student_tok,
        make_text_dataset(8),
        teacher_tok,
        cross_tokenizer_distillation=True,
        max_completion_length=12,
        generation_kwargs=ascii_only(student_tok) if text_only else None,
    )
    first, eos = batches[0], set(trainer.eos_token_ids)
    teachers = lambda row: (teacher, teacher_tok)  # noqa: E731
    expected = reference_span_advantages(first, before, teachers, student_tok, eos, trainer.args)
    advantages, loss_mask = first["batch"]["advantages"], first["batch"]["loss_mask"].bool()
    torch.testing.assert_close(advantages.double(), expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(loss_mask, expected != 0)
    spread = loss_mask[:, 1:] & loss_mask[:, :-1] & (advantages[:, 1:] == advantages[:, :-1])
    assert spread.any() or not text_only, "some span has several student tokens, all with the span's advantage"
    logged = [e["gndpo/unaligned_token_frac"] for e in trainer.state.log_history if "gndpo/unaligned_token_frac" in e]
    assert len(logged) == 2 and all(0 <= v < 1 for v in logged)
    assert (max(logged) > 0) != text_only
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), student.parameters(), strict=True))


def tiny_pair(vlm: bool, variant: str):
    """(student, teacher, processing class, dataset) sharing one tokenizer variant: a Qwen2-VL pair with images, or
    a Qwen2 pair."""
    if vlm:
        student, processor = make_vlm("qwen2_vl", seed=0, tokenizer_variant=variant)
        teacher, _ = make_vlm("qwen2_vl", seed=1, hidden_size=128, tokenizer_variant=variant)
        return student, teacher, processor, make_image_dataset(8)
    student = make_text_model(seed=0, tokenizer_variant=variant)
    teacher = make_text_model(seed=1, hidden_size=128, tokenizer_variant=variant)
    return student, teacher, make_tokenizer(variant=variant), make_text_dataset(8)


@pytest.mark.parametrize("vlm", [False, True], ids=["text", "vlm"])
def test_the_same_tokenizer_through_the_cross_tokenizer_path_gives_todays_training_bit_for_bit(vlm, cpu_config_kwargs):
    """The cross-tokenizer path forced on with the student's own tokenizer and processor: the teacher re-renders the
    prompts (and images) and re-tokenizes the completion text, every span is one token, and the advantages, loss
    masks and trained weights equal today's path exactly (`torch.equal`). The ASCII tokenizer without merges makes
    every sampled completion its own tokenization (a sampler may otherwise emit a non-canonical one, which another
    tokenizer would group into spans)."""
    runs = []
    for cross in (False, True):
        student, teacher, processor, dataset = tiny_pair(vlm, "ascii")
        tokenizer = getattr(processor, "tokenizer", processor)
        trainer, batches = train(
            cpu_config_kwargs,
            student,
            teacher,
            processor,
            dataset,
            processor,
            cross_tokenizer_distillation=cross,
            generation_kwargs=no_specials(tokenizer),
        )
        runs.append((trainer, batches, student))
    (today, today_batches, today_student), (cross, cross_batches, cross_student) = runs
    assert len(today_batches) == len(cross_batches) == 2
    for a, b in zip(today_batches, cross_batches, strict=True):
        assert torch.equal(a["batch"]["completion_ids"], b["batch"]["completion_ids"])
        assert torch.equal(a["batch"]["advantages"], b["batch"]["advantages"])
        assert torch.equal(a["batch"]["loss_mask"], b["batch"]["loss_mask"])
        assert (a["batch"]["advantages"] != 0).sum() > 8
    for p, q in zip(today_student.parameters(), cross_student.parameters(), strict=True):
        assert torch.equal(p, q)
    unaligned = [e["gndpo/unaligned_token_frac"] for e in cross.state.log_history if "gndpo/unaligned_token_frac" in e]
    assert unaligned == [0.0, 0.0]


def test_a_vision_language_teacher_with_its_own_processor(cpu_config_kwargs):
    """Qwen2-VL student (patch 14, default tokenizer) and a Qwen3-VL teacher (patch 16, another tokenizer and chat
    template): refused by default; with the option the teacher reads the images through its own processor and the
    advantages are the float64 span signal of the definitions."""
    student, processor = make_vlm("qwen2_vl", seed=0)
    teacher, teacher_processor = make_vlm("qwen3_vl", seed=1, hidden_size=128, tokenizer_variant="other")
    with pytest.raises(ValueError, match="tokenizer differs from the student's"):
        GNDPOTrainer(
            model=copy.deepcopy(student),
            teacher_model=teacher,
            args=GNDPOConfig(**cpu_config_kwargs()),
            train_dataset=make_image_dataset(8),
            processing_class=processor,
            teacher_processing_class=teacher_processor,
        )
    before = copy.deepcopy(student)
    trainer, batches = train(
        cpu_config_kwargs,
        student,
        teacher,
        processor,
        make_image_dataset(8),
        teacher_processor,
        cross_tokenizer_distillation=True,
        generation_kwargs=ascii_only(processor.tokenizer),
    )
    teachers = lambda row: (teacher, teacher_processor)  # noqa: E731
    first, eos = batches[0], set(trainer.eos_token_ids)
    expected = reference_span_advantages(first, before, teachers, processor.tokenizer, eos, trainer.args)
    torch.testing.assert_close(first["batch"]["advantages"].double(), expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(first["batch"]["loss_mask"].bool(), expected != 0) and (expected != 0).sum() > 4
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), student.parameters(), strict=True))


def test_several_teachers_each_with_its_own_tokenizer(cpu_config_kwargs):
    """Two teachers routed by a column: one with another tokenizer (Qwen3), one with the student's (Qwen2); each
    row's span signal comes from its own teacher, and one whitening covers both."""
    student_tok = make_tokenizer()
    other_tok = make_tokenizer("qwen3", variant="other")
    other = make_text_model("qwen3", seed=1, hidden_size=128, tokenizer_variant="other")
    same = make_text_model(seed=2, num_hidden_layers=3)
    dataset = make_text_dataset(8)
    dataset = dataset.add_column("teacher", [["other", "same"][i % 2] for i in range(len(dataset))])
    student = make_text_model(seed=0)
    before = copy.deepcopy(student)
    trainer, batches = train(
        cpu_config_kwargs,
        student,
        {"other": other, "same": same},
        student_tok,
        dataset,
        {"other": other_tok, "same": make_tokenizer()},
        cross_tokenizer_distillation=True,
        generation_kwargs=ascii_only(student_tok),
        per_device_train_batch_size=8,
        max_steps=1,
    )
    models = {"other": (other, other_tok), "same": (same, make_tokenizer())}
    first, eos = batches[0], set(trainer.eos_token_ids)
    assert {row["teacher"] for row in first["inputs"]} == {"other", "same"}, "the batch mixes both teachers"
    expected = reference_span_advantages(
        first, before, lambda row: models[row["teacher"]], student_tok, eos, trainer.args
    )
    torch.testing.assert_close(first["batch"]["advantages"].double(), expected, rtol=1e-4, atol=1e-4)
    logged = [e for e in trainer.state.log_history if "gndpo/teacher/other/token_frac" in e]
    assert len(logged) == 1 and 0 < logged[0]["gndpo/teacher/other/token_frac"] < 1


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("teacher_model_server_url", "http://localhost:8000"),
        ("token_selection", "entropy"),
        ("value_baseline", True),
        ("visual_gradient_steering", True),
    ],
)
def test_options_that_need_the_students_tokens_are_refused(option, value, cpu_config_kwargs):
    with pytest.raises(ValueError, match=f"cross_tokenizer_distillation.*{option}|{option}.*cross_tokenizer"):
        GNDPOConfig(**cpu_config_kwargs(cross_tokenizer_distillation=True, **{option: value}))


def test_a_teacher_without_its_processor_is_refused(cpu_config_kwargs):
    """The teacher's own tokenizer renders its inputs: a teacher built in memory needs `teacher_processing_class`."""
    with pytest.raises(ValueError, match="none was given or found for teacher"):
        GNDPOTrainer(
            model=make_text_model(seed=0),
            teacher_model=make_text_model("qwen3", seed=1, tokenizer_variant="other"),
            args=GNDPOConfig(**cpu_config_kwargs(cross_tokenizer_distillation=True)),
            train_dataset=make_text_dataset(8),
            processing_class=make_tokenizer(),
        )


def test_reward_extrapolation_sums_the_reference_over_the_spans(cpu_config_kwargs):
    """ExOPD with a teacher of another tokenizer: the reference (the initial student) is summed over the same spans.
    Checked on the second generation batch, where the student has moved away from its initial weights."""
    student_tok, teacher_tok = make_tokenizer(), make_tokenizer("qwen3", variant="other")
    student = make_text_model(seed=0)
    initial = copy.deepcopy(student)
    teacher = make_text_model("qwen3", seed=1, hidden_size=128, tokenizer_variant="other")
    trainer, batches = train(
        cpu_config_kwargs,
        student,
        teacher,
        student_tok,
        make_text_dataset(8),
        teacher_tok,
        cross_tokenizer_distillation=True,
        reward_extrapolation=1.25,
        generation_kwargs=ascii_only(student_tok),
    )
    second, eos = batches[1], set(trainer.eos_token_ids)
    sampler = copy.deepcopy(initial)  # the policy that sampled the second batch
    sampler.load_state_dict(second["weights"])
    teachers = lambda row: (teacher, teacher_tok)  # noqa: E731
    expected = reference_span_advantages(second, sampler, teachers, student_tok, eos, trainer.args, base=initial)
    without = reference_span_advantages(second, sampler, teachers, student_tok, eos, trainer.args)
    torch.testing.assert_close(second["batch"]["advantages"].double(), expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(expected, without, atol=1e-3), "the reference term matters on this batch"


def test_a_text_only_teacher_with_its_own_tokenizer_for_a_vision_language_student(cpu_config_kwargs):
    """Cross-modal and cross-tokenizer at once: a text-only Qwen3 teacher with another tokenizer reads each row's
    conversation without its image, in its own chat template."""
    student, processor = make_vlm("qwen2_vl", seed=0)
    teacher_tok = make_tokenizer("qwen3", variant="other")
    teacher = make_text_model("qwen3", seed=1, hidden_size=128, tokenizer_variant="other")
    before = copy.deepcopy(student)
    trainer, batches = train(
        cpu_config_kwargs,
        student,
        teacher,
        processor,
        make_image_dataset(8),
        teacher_tok,
        cross_tokenizer_distillation=True,
        cross_modal_distillation=True,
        generation_kwargs=ascii_only(processor.tokenizer),
    )
    teachers = lambda row: (teacher, teacher_tok)  # noqa: E731
    first, eos = batches[0], set(trainer.eos_token_ids)
    expected = reference_span_advantages(first, before, teachers, processor.tokenizer, eos, trainer.args)
    torch.testing.assert_close(first["batch"]["advantages"].double(), expected, rtol=1e-4, atol=1e-4)
    assert (expected != 0).sum() > 4

"""A teacher with its own tokenizer, chat template and processor (`cross_tokenizer_distillation`).

For each row of a generation batch, the teacher reads the row's prompt (text and images) rendered by its own processor
and chat template, followed by the student's completion *text* tokenized by its own tokenizer; it scores its own
tokens, and the character-span alignment of `token_alignment.py` brings the scores back onto the student's tokens.

- The student's completion text and each sampled token's character offsets come from incremental decoding (the
  tokenizers library's `DecodeStream`): the tokens of one multi-byte character share its offsets; a token whose bytes
  never form valid text (the decoder's U+FFFD) is flagged, so its span is unaligned. The student's special tokens
  carry no text: a terminating end-of-sequence token is paired with the teacher's own end-of-sequence token (a span of
  one token on each side); any other special token is a zero-width, unaligned span.
- The teacher's tokens and offsets come from its fast tokenizer (`return_offsets_mapping`); an unknown token is
  flagged.
"""

from dataclasses import dataclass

import torch
from tokenizers.decoders import DecodeStream
from trl.data_utils import prepare_multimodal_messages
from trl.trainer.utils import pad

from .token_alignment import SpanAlignment, align_spans, place_spans, teacher_span_sums


def tokenizer_of(processing_class):
    """The tokenizer of a processor, or the tokenizer itself."""
    return getattr(processing_class, "tokenizer", processing_class)


def check_fast_tokenizer(processing_class, whose: str) -> None:
    """Offsets and incremental decoding need a fast (Rust-backed) tokenizer."""
    tokenizer = tokenizer_of(processing_class)
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError(
            f"cross_tokenizer_distillation reads character offsets from the {whose}'s tokenizer, which needs a fast "
            f"tokenizer (tokenizers library); got {type(tokenizer).__name__}. Load it with `use_fast=True`."
        )


@dataclass(frozen=True)
class DecodedCompletion:
    """The text of a sampled completion and the character offsets of its tokens (`ok` False: flagged)."""

    text: str
    offsets: list[tuple[int, int]]
    ok: list[bool]
    ends_with_eos: bool


def decode_with_offsets(tokenizer, ids: list[int], eos_ids: set[int]) -> DecodedCompletion:
    """Decode sampled ids incrementally: the text and each token's ``(start, end)`` characters.

    Tokens that only complete a character together (bytes of one character) all get the characters decoded when the
    last of them arrives. A terminating token in `eos_ids` is left out of the text and given ``(L, L + 1)``, the slot
    of the teacher's end-of-sequence token; other special tokens get a zero-width range and are flagged.
    """
    backend, special = tokenizer.backend_tokenizer, set(tokenizer.all_special_ids)
    stream = DecodeStream(skip_special_tokens=False)
    ends_with_eos = bool(ids) and ids[-1] in eos_ids
    body = ids[:-1] if ends_with_eos else ids
    chunks, offsets, ok, pending, position = [], [], [], [], 0
    for index, token in enumerate(body):
        if token in special:
            offsets.append((position, position))
            ok.append(False)
            continue
        offsets.append((position, position))
        ok.append(True)
        pending.append(index)
        chunk = stream.step(backend, token)
        if chunk is None:
            continue
        readable = "\ufffd" not in chunk
        for i in pending:
            offsets[i], ok[i] = (position, position + len(chunk)), readable
        chunks.append(chunk)
        position += len(chunk)
        pending = []
    for i in pending:  # bytes of an unfinished character at the end
        ok[i] = False
    if ends_with_eos:
        offsets.append((position, position + 1))
        ok.append(True)
    return DecodedCompletion("".join(chunks), offsets, ok, ends_with_eos)


@dataclass
class TeacherBatch:
    """The teacher's own inputs for some rows: prompt and completion ids, the model's multimodal inputs, and each
    row's completion token offsets (with flags) over the student's completion text."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_length: int
    model_inputs: dict
    offsets: list[list[tuple[int, int]]]
    ok: list[list[bool]]


def row_images(row: dict) -> "list | None":
    """A dataset row's images, as TRL reads them (`images`, or one `image`)."""
    if row.get("images") is not None:
        return list(row["images"]) or None
    if row.get("image") is not None:
        return [row["image"]]
    return None


def text_only_messages(messages: list[dict]) -> list[dict]:
    """A conversation without its image and video parts (content lists keep their text parts)."""
    return [
        {**m, "content": [part for part in m["content"] if part.get("type") not in ("image", "video")]}
        if isinstance(m.get("content"), list)
        else m
        for m in messages
    ]


def teacher_batch(
    processing_class, rows: list[dict], completions: list[DecodedCompletion], chat_template_kwargs: dict, device
) -> TeacherBatch:
    """Render the rows' prompts with the teacher's processor and chat template (images included: the teacher's own
    image tokens and pixel values), and append each completion's text as the teacher's tokens (plus its end-of-sequence
    token where the student's completion ended). Prompts are left-padded, completions right-padded, as TRL does."""
    tokenizer = tokenizer_of(processing_class)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    images = [row_images(row) for row in rows]
    if isinstance(rows[0]["prompt"], str):  # a plain-text prompt: no chat template, as TRL does
        rendered = dict(tokenizer([row["prompt"] for row in rows]))
        rendered.pop("attention_mask", None)
    else:
        prompts = [row["prompt"] for row in rows]
        if hasattr(processing_class, "image_processor"):  # VLM processors want content blocks (with the images)
            prompts = [prepare_multimodal_messages(p, images=im) for p, im in zip(prompts, images, strict=True)]
        else:  # a text-only teacher reads the text of the conversation (cross-modal distillation)
            prompts = [text_only_messages(p) for p in prompts]
        rendered = processing_class.apply_chat_template(
            conversation=prompts, add_generation_prompt=True, tokenize=True, return_dict=True, **chat_template_kwargs
        )
    prompt_rows = [torch.as_tensor(ids) for ids in rendered["input_ids"]]
    encoded = tokenizer([c.text for c in completions], add_special_tokens=False, return_offsets_mapping=True)
    completion_rows, offsets, ok = [], [], []
    for ids, spans, completion in zip(encoded["input_ids"], encoded["offset_mapping"], completions, strict=True):
        spans = [tuple(s) for s in spans]
        flags = [i != tokenizer.unk_token_id or tokenizer.unk_token_id is None for i in ids]
        if completion.ends_with_eos:
            ids = [*ids, tokenizer.eos_token_id]
            spans.append((len(completion.text), len(completion.text) + 1))
            flags.append(True)
        completion_rows.append(torch.tensor(ids, dtype=torch.long))
        offsets.append(spans)
        ok.append(flags)
    prompt_ids = pad(prompt_rows, padding_value=pad_id, padding_side="left")
    prompt_mask = pad([torch.ones_like(r) for r in prompt_rows], padding_value=0, padding_side="left")
    completion_ids = pad(completion_rows, padding_value=pad_id, padding_side="right")
    completion_mask = pad([torch.ones_like(r) for r in completion_rows], padding_value=0, padding_side="right")
    model_inputs = {}
    for key, value in rendered.items():
        if key in ("input_ids", "attention_mask"):
            continue
        if key in ("token_type_ids", "mm_token_type_ids"):  # per token: pad like the prompt, zeros on the completion
            value = pad([torch.as_tensor(v) for v in value], padding_value=0, padding_side="left")
            value = torch.cat([value, value.new_zeros(completion_ids.shape)], dim=1)
        model_inputs[key] = torch.as_tensor(value).to(device)
    if "pixel_values" in model_inputs:
        model_inputs["num_images"] = [len(im) if im else 0 for im in images]
    return TeacherBatch(
        torch.cat([prompt_ids, completion_ids], 1).to(device),
        torch.cat([prompt_mask, completion_mask], 1).to(device),
        completion_ids.size(1),
        model_inputs,
        offsets,
        ok,
    )


def align(completion: DecodedCompletion, teacher_offsets, teacher_ok) -> SpanAlignment:
    """The spans of one row: the student's decoded tokens against the teacher's tokens of the same text."""
    length = len(completion.text) + completion.ends_with_eos
    return align_spans(completion.offsets, teacher_offsets, length, completion.ok, teacher_ok)


class OwnTokenizers:
    """Scores a generation batch with teachers that keep their own tokenizers, chat templates and processors.

    Args:
        student_tokenizer: the student's (fast) tokenizer, to decode the sampled ids.
        processing_classes: name -> each teacher's tokenizer or processor.
        eos_token_ids: the student's end-of-sequence ids (a completion ending with one pairs it with the teacher's).
        chat_template_kwargs: passed to the teachers' chat templates, as to the student's.
    """

    def __init__(self, student_tokenizer, processing_classes: dict, eos_token_ids, chat_template_kwargs: dict):
        self.student_tokenizer, self.processing_classes = tokenizer_of(student_tokenizer), processing_classes
        self.eos_token_ids, self.chat_template_kwargs = set(eos_token_ids), chat_template_kwargs

    def score(self, names: list[str], routes, completion_ids, completion_mask, inputs: list[dict], log_probs):
        """The teachers' span log-probs on the student's ``(B, T)`` completion grid (on each aligned span's last
        student token, 0 elsewhere) and the :class:`~trl_gndpo.token_alignment.SpanPlacement` of the batch.

        Args:
            names: the teachers, in routing order; `routes`: each row's index into them, or None (one teacher).
            completion_ids, completion_mask: the student's sampled tokens, ``(B, T)``.
            inputs: the dataset rows behind the batch (their prompts and images).
            log_probs: ``(name, input_ids, attention_mask, completion_length, model_inputs) -> (rows, length)``,
                the sampled-token log-probs under the named teacher on the training device.
        """
        device = completion_ids.device
        decoded = [
            decode_with_offsets(self.student_tokenizer, ids[mask.bool()].tolist(), self.eos_token_ids)
            for ids, mask in zip(completion_ids.cpu(), completion_mask.cpu(), strict=True)
        ]
        alignments, scored = [None] * len(decoded), [None] * len(decoded)
        for index, name in enumerate(names):
            rows = list(range(len(decoded))) if routes is None else (routes == index).nonzero().squeeze(1).tolist()
            if not rows:
                continue
            batch = teacher_batch(
                self.processing_classes[name],
                [inputs[i] for i in rows],
                [decoded[i] for i in rows],
                self.chat_template_kwargs,
                device,
            )
            if batch.completion_length == 0:  # nothing to score (all these completions empty or masked)
                logps = torch.zeros(len(rows), 0, device=device)
            else:
                logps = log_probs(
                    name, batch.input_ids, batch.attention_mask, batch.completion_length, batch.model_inputs
                )
            for j, i in enumerate(rows):
                alignments[i] = align(decoded[i], batch.offsets[j], batch.ok[j])
                scored[i] = logps[j].float()
        teacher_length = max(1, max(len(s) for s in scored))
        grid = torch.zeros(len(scored), teacher_length, device=device)
        for i, logps in enumerate(scored):
            grid[i, : len(logps)] = logps
        placement = place_spans(alignments, completion_ids.size(1), teacher_length, device)
        return teacher_span_sums(grid, placement), placement

"""Tiny, deterministic, offline stand-ins for Qwen text and vision-language models.

The tests of ``trl_gndpo`` must run on a laptop CPU without network access or the model hub, yet exercise the real
transformers/TRL code paths (Qwen2/Qwen3 causal LMs, Qwen2-VL / Qwen2.5-VL / Qwen3-VL with their processors and chat
templates, 4-bit loading). Everything here is built from configs with seeded random weights in well under a second:

* a byte-level BPE tokenizer (~320 tokens) trained on a few lines of text, carrying the real Qwen special tokens and a
  chat template shipped with TRL (``trl/chat_templates``), wrapped as the stock ``Qwen2Tokenizer``;
* tiny models (hidden 64, 2 layers, 4 heads / 2 KV heads, a 2-layer vision tower) whose special token ids come from
  that tokenizer, so student and a bigger teacher (``hidden_size=128``, ``num_hidden_layers=3``) share one
  tokenizer / processor;
* small conversational datasets (text only, or with 32x32 PIL images);
* ``cpu_grpo_kwargs()``: config flags that make a GRPO-style trainer run a couple of steps on CPU in about a second.

Qwen-VL processors in transformers 5.23 insist on a video processor, which needs torchvision. Test code (conftest, or
a script run in a subprocess) calls :func:`install_video_processor_workaround` first; ``make_vlm`` also calls it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import torch
import trl
from datasets import Dataset
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    BitsAndBytesConfig,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.utils import is_torchvision_available

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
CHAT_TEMPLATES_DIR = Path(trl.__file__).parent / "chat_templates"

_CORPUS = [
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>",
    "<|im_start|>user\nWhat colour is this picture? Describe the image.<|im_end|>",
    "<|im_start|>assistant\nThe picture is red, green, blue and white.<|im_end|>",
    "The quick brown fox jumps over the lazy dog. Hello world!",
    "What is 12 + 7? The answer is 19. Count: 0 1 2 3 4 5 6 7 8 9.",
]


# --------------------------------------------------------------------------------------------------------------------
# Test-only patch
# --------------------------------------------------------------------------------------------------------------------
def install_video_processor_workaround() -> None:
    """Let Qwen-VL processors build, save and reload without torchvision (test-only, idempotent).

    In transformers 5.23 every Qwen-VL processor lists ``video_processor`` as a required attribute and video
    processors need torchvision (huggingface/transformers#48558). Dropping it from ``ProcessorMixin.get_attributes()``
    makes the stock classes work for images. No-op when torchvision is installed. Never use this in library code.
    """
    if is_torchvision_available() or getattr(ProcessorMixin, "_tiny_no_video_patch", False):
        return
    original = ProcessorMixin.get_attributes.__func__

    def get_attributes(cls):
        return [name for name in original(cls) if name != "video_processor"]

    ProcessorMixin.get_attributes = classmethod(get_attributes)
    ProcessorMixin._tiny_no_video_patch = True


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------------
# A second tokenizer "from another family": other text, other size, so other merges and ids (cross-tokenizer tests).
_OTHER_CORPUS = [
    "Une réponse: the answer is nineteen, ça fait 19. Größe, naïve café, 日本語のテキスト, emoji 🦄🙂.",
    "Describe the colour of the picture in one sentence; then count 10 9 8 7 6 5 4 3 2 1.",
    "Hello hello world world quick quick fox fox lazy lazy dog dog.",
]
TOKENIZER_VARIANTS = ("default", "other", "ascii")


@functools.cache
def _trained_bpe(variant: str = "default") -> tuple[str, str]:
    """Train the byte-level BPE once; return (vocab, merges) as JSON strings so callers can't mutate the cache.

    ``"ascii"`` is not trained: the specials and the 128 ASCII bytes, no merges, so every sequence of its non-special
    tokens is valid text and the tokenizer's own tokenization of it (a sampled completion round-trips exactly)."""
    if variant == "ascii":
        table = bytes_to_unicode()
        vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + [table[b] for b in range(128)])}
        return json.dumps(vocab), json.dumps([])
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size={"default": 320, "other": 400}[variant],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS if variant == "default" else _OTHER_CORPUS, trainer)
    model = json.loads(bpe.to_str())["model"]
    return json.dumps(model["vocab"]), json.dumps(model["merges"])


@functools.cache
def _read_template(name: str) -> str:
    return (CHAT_TEMPLATES_DIR / f"{name}.jinja").read_text()


def make_tokenizer(chat_template: str = "qwen2_5", variant: str = "default") -> Qwen2Tokenizer:
    """A fresh ``Qwen2Tokenizer`` (vocab 320) with the Qwen specials; eos ``<|im_end|>``, pad ``<|endoftext|>``.

    ``chat_template`` names a file in ``trl/chat_templates`` (``qwen2_5``, ``qwen3``, ``qwen2_5_vl``, ``qwen3_vl``).
    ``variant="other"`` is a different byte-level BPE (vocab 400, other text: other merges, other ids, multi-byte
    characters merged) for a teacher with its own tokenizer.
    The BPE training is cached; each call returns a new object, so trainers may set ``padding_side`` etc. freely.
    """
    vocab_json, merges_json = _trained_bpe(variant)
    tokenizer = Qwen2Tokenizer(
        vocab=json.loads(vocab_json),
        merges=[tuple(m) for m in json.loads(merges_json)],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=SPECIAL_TOKENS[1:],
        padding_side="left",
    )
    tokenizer.chat_template = _read_template(chat_template)
    return tokenizer


def _token_ids(tokenizer) -> dict:
    """eos/pad/bos ids as the real Qwen checkpoints set them (bos = ``<|endoftext|>``, Qwen has no bos token)."""
    return {
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    }


def _finish(model, ids: dict):
    """float32, eval mode (like ``from_pretrained``) and matching generation config."""
    for key, value in ids.items():
        setattr(model.generation_config, key, value)
    return model.to(torch.float32).eval()


# --------------------------------------------------------------------------------------------------------------------
# Text models
# --------------------------------------------------------------------------------------------------------------------
def make_text_model(
    family: str = "qwen2",
    seed: int = 0,
    num_hidden_layers: int = 2,
    vocab_size: int | None = None,
    hidden_size: int = 64,
    tokenizer_variant: str = "default",
    **overrides,
):
    """A tiny random ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` matching :func:`make_tokenizer`.

    hidden 64, intermediate 2*hidden, 4 heads / 2 KV heads, vocab ``len(tokenizer)`` unless ``vocab_size`` is given.
    ``tokenizer_variant``: the tokenizer it matches (``make_tokenizer(variant=...)``).
    ``overrides`` go to the config. The global RNG state is left untouched.
    """
    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    config_class, model_class = classes[family]
    tokenizer = make_tokenizer(variant=tokenizer_variant)
    ids = _token_ids(tokenizer)
    kwargs = dict(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        **ids,
    )
    kwargs.update(overrides)
    if family == "qwen3":
        kwargs.setdefault("head_dim", kwargs["hidden_size"] // kwargs["num_attention_heads"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config_class(**kwargs))
    return _finish(model, ids)


# --------------------------------------------------------------------------------------------------------------------
# Vision-language models
# --------------------------------------------------------------------------------------------------------------------
_VLM = {
    # family: (config, model, processor, chat template, vision patch size)
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, "qwen2_5_vl", 14),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, "qwen2_5_vl", 14),
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, "qwen3_vl", 16),
}
VLM_FAMILIES = tuple(_VLM)
TEXT_FAMILIES = ("qwen2", "qwen3")


def _vision_config(family: str, out_hidden: int) -> dict:
    """A 2-layer vision tower (width 64, 4 heads) projecting to the text width ``out_hidden``."""
    common = dict(depth=2, num_heads=4, in_channels=3, spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2_vl":
        return dict(common, embed_dim=64, mlp_ratio=2, hidden_size=out_hidden, patch_size=14)
    if family == "qwen2_5_vl":
        return dict(
            common,
            hidden_size=64,
            intermediate_size=128,
            out_hidden_size=out_hidden,
            patch_size=14,
            window_size=112,
            fullatt_block_indexes=[1],
        )
    return dict(  # qwen3_vl
        common,
        hidden_size=64,
        intermediate_size=128,
        out_hidden_size=out_hidden,
        patch_size=16,
        num_position_embeddings=64,  # must be a perfect square (8x8 grid of learned positions)
        deepstack_visual_indexes=[1],
    )


def make_processor(family: str = "qwen2_vl", tokenizer_variant: str = "default"):
    """The family's stock processor: PIL image processor + tokenizer with the family's chat template.

    Images are resized to between 2x2 and 4x4 merged patches, so a 32x32 image gives 4 image tokens. Where
    torchvision is installed, the family's default video processor is added (untested here: no torchvision).
    ``tokenizer_variant``: see :func:`make_tokenizer`.
    """
    install_video_processor_workaround()
    _, _, processor_class, template, patch = _VLM[family]
    factor = patch * 2  # patch_size * merge_size
    mean_std = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3} if family == "qwen3_vl" else {}
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=(2 * factor) ** 2,
        max_pixels=(4 * factor) ** 2,
        **mean_std,
    )
    tokenizer = make_tokenizer(template, variant=tokenizer_variant)
    video = {}
    if is_torchvision_available():  # the processors then require a video processor (e.g. a GPU machine with vLLM)
        from transformers import Qwen2VLVideoProcessor, Qwen3VLVideoProcessor

        video["video_processor"] = Qwen3VLVideoProcessor() if family == "qwen3_vl" else Qwen2VLVideoProcessor()
    return processor_class(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template, **video
    )


def make_vlm(
    family: str = "qwen2_vl",
    seed: int = 0,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    vision_config: dict | None = None,
    tokenizer_variant: str = "default",
    **overrides,
):
    """``(model, processor)``: a tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL and its processor.
    ``tokenizer_variant``: the processor's tokenizer (see :func:`make_tokenizer`).

    Text part: ``hidden_size`` (multiple of 64), intermediate 2*hidden, 4 heads / 2 KV heads, M-RoPE sections summing
    to head_dim/2. ``overrides`` go to the text config, ``vision_config`` updates the vision config. The vision layout
    (patches, merge size) does not depend on ``hidden_size``, so a bigger teacher shares the student's processor.
    """
    config_class, model_class, _, _, _ = _VLM[family]
    processor = make_processor(family, tokenizer_variant)
    tokenizer = processor.tokenizer
    ids = _token_ids(tokenizer)
    num_heads = overrides.get("num_attention_heads", 4)
    half = hidden_size // num_heads // 2  # mrope_section (t, h, w) must sum to head_dim / 2
    mrope_section = [half // 2, half // 4, half - half // 2 - half // 4]  # [4, 2, 2] for head_dim 16
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section}
    if family == "qwen3_vl":
        rope["mrope_interleaved"] = True
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_parameters=rope,
        **ids,
    )
    if family == "qwen3_vl":
        text_config["head_dim"] = hidden_size // num_heads
    text_config.update(overrides)
    config = config_class(
        text_config=text_config,
        vision_config={**_vision_config(family, hidden_size), **(vision_config or {})},
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return _finish(model, ids), processor


# --------------------------------------------------------------------------------------------------------------------
# Saving / 4-bit loading
# --------------------------------------------------------------------------------------------------------------------
def save_tiny(model, processing_class, path) -> Path:
    """Save model and tokenizer/processor side by side so ``from_pretrained(path)`` works offline."""
    path = Path(path)
    model.save_pretrained(path)
    processing_class.save_pretrained(path)
    return path


def load_tiny_4bit(path, model_class=None):
    """Load a saved tiny model in nf4 on CPU (bitsandbytes 0.50 ships a CPU backend)."""
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    quantization_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    return model_class.from_pretrained(path, quantization_config=quantization_config, device_map="cpu")


# --------------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------------
_QUESTIONS = [
    "What is {a} + {b}?",
    "Say hello to the world.",
    "Count from {a} to {b}.",
    "Describe the quick brown fox.",
]
_COLOURS = [
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 255),
    (0, 0, 0),
    (255, 255, 0),
    (0, 255, 255),
    (128, 0, 128),
]


def make_text_dataset(n: int = 8) -> Dataset:
    """``n`` conversational prompts: ``prompt = [{"role": "user", "content": str}]``."""
    prompts = [[{"role": "user", "content": _QUESTIONS[i % len(_QUESTIONS)].format(a=i, b=i + 7)}] for i in range(n)]
    return Dataset.from_dict({"prompt": prompts})


def make_image(i: int, size: int = 32) -> Image.Image:
    """A deterministic RGB image: solid colour ``i`` with a contrasting square whose position depends on ``i``."""
    image = Image.new("RGB", (size, size), _COLOURS[i % len(_COLOURS)])
    corner = (i * size // 8) % (size // 2)
    box = [corner, corner, corner + size // 2, corner + size // 4]
    ImageDraw.Draw(image).rectangle(box, fill=_COLOURS[(i + 3) % len(_COLOURS)])
    return image


def make_image_dataset(n: int = 8, column: str = "image", size: int = 32) -> Dataset:
    """``n`` conversational prompts plus an ``image`` column (PIL) or an ``images`` column (list of one PIL image)."""
    if column not in ("image", "images"):
        raise ValueError(f"column must be 'image' or 'images', got {column!r}")
    prompts = [[{"role": "user", "content": "What colour is this picture?"}] for _ in range(n)]
    images = [make_image(i, size) for i in range(n)]
    return Dataset.from_dict({"prompt": prompts, column: images if column == "image" else [[im] for im in images]})


# --------------------------------------------------------------------------------------------------------------------
# Trainer flags
# --------------------------------------------------------------------------------------------------------------------
def cpu_grpo_kwargs(**overrides) -> dict:
    """Kwargs for a ``GRPOConfig``-like config that runs 2 quick steps on CPU; the caller adds ``output_dir``.

    4 completions per step (2 prompts x 2 generations) of at most 8 tokens; a learning rate of 1e-2 so parameters
    visibly move; bf16 and activation checkpointing off (TRL defaults both on, neither works/helps on CPU).
    """
    kwargs = dict(
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        num_generations=2,
        max_completion_length=8,
        max_steps=2,
        logging_steps=1,
        learning_rate=1e-2,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(trl.GRPOConfig)}:
        kwargs["activation_checkpointing"] = False
    else:  # transformers < 5.23
        kwargs["gradient_checkpointing"] = False
    kwargs.update(overrides)
    return kwargs


__all__ = [
    "CHAT_TEMPLATES_DIR",
    "SPECIAL_TOKENS",
    "TEXT_FAMILIES",
    "TOKENIZER_VARIANTS",
    "VLM_FAMILIES",
    "cpu_grpo_kwargs",
    "install_video_processor_workaround",
    "load_tiny_4bit",
    "make_image",
    "make_image_dataset",
    "make_processor",
    "make_text_dataset",
    "make_text_model",
    "make_tokenizer",
    "make_vlm",
    "save_tiny",
]


def frozen_fingerprint(model) -> dict[str, torch.Tensor]:
    """What must not change in a frozen model: its weights, or for a 4-bit model its logits on a probe, since
    bitsandbytes repacks 4-bit weights into another layout at their first forward on CPU (same values)."""
    if getattr(model, "is_loaded_in_4bit", False):
        with torch.no_grad():
            return {"logits": model(input_ids=torch.arange(1, 9).view(1, -1)).logits.float()}
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def same_fingerprint(before: dict, after: dict) -> bool:
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

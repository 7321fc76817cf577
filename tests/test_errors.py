"""Bad configurations and inputs fail at construction, before any training step, with a message saying what to do."""

import dataclasses
import json

import pytest
from datasets import Dataset
from tiny_models import (
    _trained_bpe,
    make_image_dataset,
    make_processor,
    make_text_dataset,
    make_text_model,
    make_tokenizer,
    make_vlm,
)
from transformers import Qwen2Tokenizer

from trl_gndpo import GNDPOConfig, GNDPOTrainer


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"normalization_scope": "group"}, "normalization_scope"),
        ({"token_signal_clamp": 0.0}, "token_signal_clamp"),
        ({"whitening_eps": 0.0}, "whitening_eps"),
        ({"outcome_advantage_weight": -1.0}, "outcome_advantage_weight"),
        ({"max_log_ratio": -1.0}, "max_log_ratio"),
        ({"beta": 0.04}, r"in GNDPO `beta` is GRPO's KL coefficient .* must be 0 .* DistillationConfig `beta` picks"),
        ({"loss_type": "cispo"}, "loss_type"),
        ({"importance_sampling_level": "sentence"}, "importance_sampling_level"),
        ({"entropy_coef": 0.01}, "entropy_coef"),
        ({"top_entropy_quantile": 0.2}, "top_entropy_quantile"),
        ({"outcome_advantage_weight": float("inf")}, "outcome_advantage_weight must be a finite number"),
        ({"whitening_eps": float("inf")}, "whitening_eps must be a finite number"),
        ({"token_signal_clamp": float("inf")}, "token_signal_clamp must be a finite number"),
        ({"vgs_eta": float("inf")}, "vgs_eta must be a finite number"),
        ({"correctness_threshold": float("nan")}, "correctness_threshold must be a finite number"),
        ({"epsilon": -0.1}, "epsilon .* must be >= 0"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"temperature": -1.0}, "temperature must be > 0"),
        ({"num_generations": 1}, "GNDPO's whitening needs no prompt groups"),
    ],
)
def test_config_rejects_bad_values(overrides, message, cpu_config_kwargs):
    with pytest.raises(ValueError, match=message):
        GNDPOConfig(**cpu_config_kwargs(**overrides))


def test_config_defaults_follow_the_reference_recipe(cpu_config_kwargs):
    defaults = {f.name: f.default for f in dataclasses.fields(GNDPOConfig)}
    assert {k: defaults[k] for k in ("temperature", "top_p", "beta", "epsilon", "learning_rate", "weight_decay")} == {
        "temperature": 1.0,
        "top_p": 1.0,
        "beta": 0.0,
        "epsilon": 0.2,
        "learning_rate": 1e-6,
        "weight_decay": 0.01,
    }
    assert defaults["disable_dropout"] and defaults["loss_type"] == "grpo"
    assert defaults["importance_sampling_level"] == "sequence" and defaults["lr_scheduler_type"] == "constant"
    assert (defaults["token_signal_clamp"], defaults["normalization_scope"], defaults["whitening_eps"]) == (
        5.0,
        "global",
        1e-8,
    )
    assert defaults["outcome_advantage_weight"] == 0.0
    parsed = GNDPOConfig(**cpu_config_kwargs(teacher_model_init_kwargs=json.dumps({"dtype": "bfloat16"})))
    assert parsed.teacher_model_init_kwargs == {"dtype": "bfloat16"}


def build(cpu_config_kwargs, **kwargs):
    defaults = dict(
        model=make_text_model(seed=0),
        teacher_model=make_text_model(seed=1),
        args=GNDPOConfig(**cpu_config_kwargs()),
        train_dataset=make_text_dataset(),
        processing_class=make_tokenizer(),
    )
    return GNDPOTrainer(**{**defaults, **kwargs})


def test_missing_teacher(cpu_config_kwargs):
    with pytest.raises(ValueError, match="needs a teacher"):
        build(cpu_config_kwargs, teacher_model=None)


def test_init_kwargs_with_an_instantiated_teacher(cpu_config_kwargs):
    args = GNDPOConfig(**cpu_config_kwargs(teacher_model_init_kwargs={"dtype": "float32"}))
    with pytest.raises(ValueError, match="already instantiated"):
        build(cpu_config_kwargs, args=args)


def test_outcome_weight_without_rewards(cpu_config_kwargs):
    with pytest.raises(ValueError, match="reward_funcs"):
        build(cpu_config_kwargs, args=GNDPOConfig(**cpu_config_kwargs(outcome_advantage_weight=1.0)))


def test_teacher_with_a_different_vocabulary_of_the_same_size(cpu_config_kwargs):
    vocab_json, merges_json = _trained_bpe()
    vocab = json.loads(vocab_json)
    a, b = list(vocab)[-2:]  # two merged tokens, swapped: same size, different vocabulary
    vocab[a], vocab[b] = vocab[b], vocab[a]
    other = Qwen2Tokenizer(
        vocab=vocab,
        merges=[tuple(m) for m in json.loads(merges_json)],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    assert len(other) == len(make_tokenizer())
    with pytest.raises(ValueError, match="tokenizer differs"):
        build(cpu_config_kwargs, teacher_processing_class=other)


def test_teacher_with_a_smaller_vocabulary(cpu_config_kwargs):
    with pytest.raises(ValueError, match="vocabulary"):
        build(cpu_config_kwargs, teacher_model=make_text_model(seed=1, vocab_size=300))


def test_dataset_without_prompt_column(cpu_config_kwargs):
    with pytest.raises(ValueError, match="`prompt` column"):
        build(cpu_config_kwargs, train_dataset=Dataset.from_dict({"question": ["What is 1 + 1?"] * 4}))


def test_image_column_on_a_text_student(cpu_config_kwargs):
    with pytest.raises(ValueError, match="image column"):
        build(cpu_config_kwargs, train_dataset=make_image_dataset())


def test_text_teacher_for_a_vision_student(cpu_config_kwargs):
    student, processor = make_vlm("qwen2_vl")
    with pytest.raises(ValueError, match="no vision tower"):
        build(cpu_config_kwargs, model=student, processing_class=processor, train_dataset=make_image_dataset())


def test_teacher_with_another_image_layout(cpu_config_kwargs):
    student, processor = make_vlm("qwen2_5_vl")
    teacher, _ = make_vlm("qwen3_vl", seed=1)  # 16-pixel patches against the student's 14
    with pytest.raises(ValueError, match="patch_size: student 14, teacher 16"):
        build(
            cpu_config_kwargs,
            model=student,
            teacher_model=teacher,
            processing_class=processor,
            train_dataset=make_image_dataset(),
        )


def test_teacher_processor_with_other_image_sizes(cpu_config_kwargs):
    student, processor = make_vlm("qwen2_vl")
    teacher, _ = make_vlm("qwen2_vl", seed=1)
    teacher_processor = make_processor("qwen2_vl")
    size = teacher_processor.image_processor.size
    teacher_processor.image_processor.size = dataclasses.replace(size, longest_edge=4 * size.longest_edge)
    with pytest.raises(ValueError, match="image_processor.size"):
        build(
            cpu_config_kwargs,
            model=student,
            teacher_model=teacher,
            processing_class=processor,
            teacher_processing_class=teacher_processor,
            train_dataset=make_image_dataset(),
        )


@pytest.mark.parametrize("column", ["image", "images"])
def test_images_that_fail_to_decode(column, cpu_config_kwargs):
    dataset = make_image_dataset(4, column=column)
    broken = {"bytes": b"not an image", "path": None}
    rows = dataset.cast_column(column, dataset.features[column]).to_dict()
    rows[column][2] = broken if column == "image" else [broken]
    dataset = Dataset.from_dict(rows, features=dataset.features)
    student, processor = make_vlm("qwen2_vl")
    teacher, _ = make_vlm("qwen2_vl", seed=1)
    with pytest.raises(ValueError, match=rf"1 images of column '{column}' cannot be decoded, at rows 2 \("):
        build(
            cpu_config_kwargs, model=student, teacher_model=teacher, processing_class=processor, train_dataset=dataset
        )


def test_fsdp1_on_a_cpu_run_is_refused_instead_of_falling_back_to_ddp(monkeypatch):
    """accelerate turns an FSDP launch on CPU into DDP; GNDPO selects FSDP2 there (tests/test_engines.py) and refuses
    FSDP1. Called on accelerate's CPU state directly: a single process never reaches it."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from trl_gndpo.fsdp2_on_cpu import select_fsdp2_on_cpu

    accelerator = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, state=SimpleNamespace())
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        select_fsdp2_on_cpu(accelerator, None)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert not select_fsdp2_on_cpu(accelerator, None)  # no FSDP asked for: DDP it is
    assert not hasattr(accelerator.state, "fsdp_plugin")

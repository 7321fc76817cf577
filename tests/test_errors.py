"""Bad configurations and inputs fail at construction, before any training step, with a message saying what to do:
every setting the config refuses (one table), the trainer's checks of models, datasets and teachers, and the start-up
warning when one global rollout feeds several optimizer steps."""

import dataclasses
import json
import logging
import math

import pytest
from datasets import Dataset
from helpers import (
    text_trainer,
)
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

from trl_gndpo import GNDPOConfig, GNDPOTrainer, checks

# Every setting GNDPOConfig refuses, in one table: the options given on top of the tests' CPU config, what the message
# must say, and (where the refusal is about a combination) an option without which the same settings are accepted.
VGS, SAMPLER = {"visual_gradient_steering": True}, {"old_logps_from_sampler": True}
SERVED = {"teacher_model_server_url": "http://127.0.0.1:8000"}
REFUSED = [
    # GNDPO's own options, and the GRPO options it fixes
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
    ({"max_checked_rows": 0}, "max_checked_rows must be >= 1"),
    ({"max_invalid_generation_batches": 0}, "max_invalid_generation_batches must be >= 1"),
    # TrainingArguments numbers (`learning_rate=inf` used to train a step and leave NaN in every weight)
    ({"learning_rate": math.inf}, "learning_rate must be a finite number"),
    ({"learning_rate": math.nan}, "learning_rate must be a finite number"),
    ({"learning_rate": -1e-5}, "learning_rate must be >= 0"),
    ({"weight_decay": math.inf}, "weight_decay must be a finite number"),
    ({"adam_epsilon": math.nan}, "adam_epsilon must be a finite number"),
    ({"adam_beta2": math.inf}, "adam_beta2 must be a finite number"),
    ({"max_grad_norm": math.nan}, "max_grad_norm must be a number"),
    ({"warmup_steps": math.inf}, "warmup_steps must be a finite number"),
    # estimators: ExOPD, vOPD, TIP, Uni-OPD
    ({"reward_extrapolation": float("inf")}, "reward_extrapolation"),
    ({"reference_model_name_or_path": "base"}, "reward_extrapolation"),
    ({"value_baseline": True, "temperature": 0.7}, "temperature=1.0"),
    ({"value_baseline_top_k": 8}, "set value_baseline=True too"),
    ({"value_baseline": True, "value_baseline_top_k": 0}, "value_baseline_top_k must be a whole number >= 1"),
    ({"value_baseline": True, "value_baseline_top_k": 2.5}, "value_baseline_top_k must be a whole number >= 1"),
    ({"value_baseline": True, "value_baseline_top_k": True}, "value_baseline_top_k must be a whole number >= 1"),
    ({"value_baseline": True, "value_baseline_top_k": "8"}, "value_baseline_top_k must be a whole number >= 1"),
    ({"reward_extrapolation": 0.0}, r"reward_extrapolation must be in \(0, 10.0\]"),
    ({"reward_extrapolation": -1.25}, r"reward_extrapolation must be in \(0, 10.0\]"),
    ({"reward_extrapolation": 1e6}, r"reward_extrapolation must be in \(0, 10.0\]"),
    ({"token_selection": "top"}, "token_selection"),
    ({"token_selection": "q4"}, "'q3' or 'entropy_sampling'"),
    ({"token_selection_ratio": 0.0}, "token_selection_ratio"),
    ({"margin_calibration": "shift+mask"}, "alternatives: pick one"),
    ({"margin_calibration": "groups"}, "'group_mask'"),
    ({"margin_calibration": "group_mask", "margin_scope": "global"}, "set margin_scope='group'"),
    # VGS
    ({**VGS, "vgs_mode": "kd"}, "vgs_mode must be"),
    ({**VGS, "vgs_mode": "grpo", "margin_calibration": "shift"}, "margin_calibration='none'"),
    ({**VGS, "vgs_mode": "grpo", "outcome_advantage_weight": 1.0}, "outcome_advantage_weight=0"),
    ({**VGS, "vgs_alpha": 1.5}, "vgs_alpha"),
    ({**VGS, "vgs_gamma": -1.0}, "vgs_gamma"),
    ({**VGS, "vgs_lambda": -0.1}, "vgs_lambda"),
    ({**VGS, "vgs_lp_quantile": 1.0}, "vgs_lp_quantile"),
    ({**VGS, "vgs_eta": 0.0}, "vgs_eta"),
    ({**VGS, "temperature": 0.7}, "set temperature=1.0, or visual_gradient_steering", "visual_gradient_steering"),
    # teachers: several, placed, served
    ({"teacher_models": {"a": "m"}, "teacher_model_name_or_path": "t"}, "alternatives"),
    ({"teacher_models": {"a": "m"}, "teacher_device": {"b": "cpu"}}, "teacher_device names teachers"),
    ({"teacher_device": "cpu", "teacher_offload": True}, "alternatives"),
    ({**SERVED, "teacher_model_name_or_path": "t"}, "teacher_model_name_or_path configure a local one"),
    ({**SERVED, "teacher_offload": True}, "teacher_offload configure a local one"),
    ({**SERVED, "value_baseline": True}, "value_baseline needs the full next-token distributions"),
    ({**SERVED, "visual_gradient_steering": True}, "visual_gradient_steering needs"),
    ({**SERVED, "teacher_model_server_timeout": 0.0}, "teacher_model_server_timeout must be > 0"),
    ({**SERVED, "teacher_model_server_chunk_size": 0}, "teacher_model_server_chunk_size must be >= 1"),
    # old_logps_from_sampler: settings under which the sampler's log-probs are not the re-score's (fine without it)
    *(({**SAMPLER, **o}, m, "old_logps_from_sampler") for o, m in [
        ({"top_k": 5}, "top_k"),
        ({"top_p": 0.9}, "top_p"),
        ({"min_p": 0.1}, "min_p"),
        ({"repetition_penalty": 1.1}, "repetition_penalty"),
        ({"generation_kwargs": {"top_k": 5}}, "top_k"),
        ({"generation_kwargs": {"temperature": 0.5}}, "temperature"),
        ({"token_selection": "entropy"}, "token_selection"),
        ({"value_baseline": True}, "value_baseline"),
        ({"use_transformers_continuous_batching": True}, "continuous_batching"),
        ({"use_vllm": True}, "vllm_importance_sampling_correction"),  # on by default: TRL re-scores anyway
    ]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "message", "accepted_without"),
    [(*row, None)[:3] for row in REFUSED],
    ids=["-".join(r[0]) for r in REFUSED],
)
def test_config_refuses(overrides, message, accepted_without, cpu_config_kwargs):
    with pytest.raises(ValueError, match=message):
        GNDPOConfig(**cpu_config_kwargs(**overrides))
    if accepted_without:
        GNDPOConfig(**cpu_config_kwargs(**{k: v for k, v in overrides.items() if k != accepted_without}))


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


# ---------------------------------------------------------------------------------------------------------------------
# Warnings at start-up: one global rollout feeding several optimizer steps


@pytest.mark.parametrize(
    ("overrides", "steps"),
    [
        ({}, None),  # steps_per_generation = gradient_accumulation_steps: one step per rollout
        ({"gradient_accumulation_steps": 2}, None),
        ({"normalization_scope": "none", "generation_batch_size": 16}, None),  # plain OPD: no rollout statistics
        ({"generation_batch_size": 16}, "4"),  # 16 completions / 4 per step
        ({"steps_per_generation": 2}, "2"),
        ({"num_iterations": 2}, "2"),
        ({"gradient_accumulation_steps": 2, "steps_per_generation": 4, "num_iterations": 3}, "6"),
    ],
)
def test_warns_when_a_global_rollout_feeds_several_optimizer_steps(overrides, steps, cpu_config_kwargs, caplog):
    config = GNDPOConfig(**cpu_config_kwargs(**overrides))
    with caplog.at_level(logging.WARNING, logger="trl_gndpo.checks"):
        checks.warn_if_rollout_feeds_several_steps(config)
    warnings = [r.getMessage() for r in caplog.records if "optimizer steps" in r.getMessage()]
    if steps is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and f"feeds {steps} optimizer steps" in warnings[0]
        assert "num_iterations=1" in warnings[0]


def test_the_trainer_warns_at_start_up(cpu_config_kwargs, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_gndpo.checks"):
        text_trainer(cpu_config_kwargs, generation_batch_size=8)
    assert any("feeds 2 optimizer steps" in r.getMessage() for r in caplog.records)

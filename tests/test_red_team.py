"""Defects found by a red-team sweep of the newer features (issue 22, items 5 and 6): each now ends in a clear error
before the first step, or a masked and logged skip. Listed with their tests in docs/faults.md."""

import math
import textwrap
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers import build_text_trainer as build
from tiny_models import make_image, make_text_dataset, make_text_model, make_tokenizer, make_vlm, save_tiny
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from trl_gndpo import GNDPOConfig, GNDPOTrainer

# ---------------------------------------------------------------------------------------------------------------------
# Configuration


def test_an_infinite_max_grad_norm_still_means_no_clipping(cpu_config_kwargs):
    assert GNDPOConfig(**cpu_config_kwargs(max_grad_norm=math.inf)).max_grad_norm == math.inf


# ---------------------------------------------------------------------------------------------------------------------
# Remote code (item 5)


def folder_with_remote_code(path: Path, marker: Path) -> Path:
    """A tiny Qwen2 saved with an `auto_map` to a module that leaves `marker` behind when it is run."""
    save_tiny(make_text_model(seed=1), make_tokenizer(), path)
    (path / "remote.py").write_text(
        textwrap.dedent(f"""\
            from pathlib import Path
            from transformers import Qwen2Config, Qwen2ForCausalLM
            Path({str(marker)!r}).write_text("remote code ran")

            class RemoteConfig(Qwen2Config):
                pass

            class RemoteModel(Qwen2ForCausalLM):
                config_class = RemoteConfig
            """)
    )
    config = (path / "config.json").read_text()
    auto_map = '"auto_map": {"AutoConfig": "remote.RemoteConfig", "AutoModelForCausalLM": "remote.RemoteModel"}, '
    (path / "config.json").write_text(config.replace("{", "{" + auto_map, 1))
    return path


def test_teacher_and_reference_run_no_remote_code_unless_asked(cpu_config_kwargs, tmp_path):
    marker = tmp_path / "ran"
    teacher = str(folder_with_remote_code(tmp_path / "teacher", marker))
    config = {"reward_extrapolation": 1.25, "reference_model_name_or_path": teacher}
    build(cpu_config_kwargs, config, teacher_model=teacher)
    assert not marker.exists(), "the teacher or the reference model ran the folder's code"
    # the same folder with trust_remote_code=True runs it: the check above can fail
    trusting = folder_with_remote_code(tmp_path / "trusted", marker)
    build(cpu_config_kwargs, {"trust_remote_code": True}, teacher_model=str(trusting))
    assert marker.exists()


def test_demo_runs_no_remote_code(tmp_path):
    from trl_gndpo.demo import prepare_models

    marker = tmp_path / "ran"
    folder_with_remote_code(tmp_path / "cache" / "smollm2-135m" / "teacher", marker)
    teacher_dir, student_dir = prepare_models(tmp_path / "cache", prune_fraction=0.5)
    assert (student_dir / "config.json").is_file() and not marker.exists()


# ---------------------------------------------------------------------------------------------------------------------
# Resume with other arguments than the checkpoint's


def trained_checkpoint(cpu_config_kwargs, **config) -> str:
    trainer = build(cpu_config_kwargs, {"save_strategy": "steps", "save_steps": 1, "max_steps": 1, **config})
    trainer.train()
    return trainer.args.output_dir


def test_resume_with_another_num_generations_is_refused(cpu_config_kwargs):
    """The resumed run skips the trained batches by counting them: another grouping trains on other prompts."""
    output_dir = trained_checkpoint(cpu_config_kwargs)
    resumed = build(cpu_config_kwargs, {"num_generations": 4, "max_steps": 2})
    with pytest.raises(ValueError, match=r"num_generations \(checkpoint: 2, now: 4\)"):
        resumed.train(resume_from_checkpoint=True)
    with pytest.raises(ValueError, match=r"num_generations \(checkpoint: 2, now: 4\)"):
        resumed.train(resume_from_checkpoint=f"{output_dir}/checkpoint-1")


def test_resume_with_another_teacher_warns_naming_it(cpu_config_kwargs, tmp_path):
    teacher_a = str(save_tiny(make_text_model(seed=1), make_tokenizer(), tmp_path / "a"))
    teacher_b = str(save_tiny(make_text_model(seed=2), make_tokenizer(), tmp_path / "b"))
    trained_checkpoint(cpu_config_kwargs, teacher_model_name_or_path=teacher_a)
    resumed = build(cpu_config_kwargs, {"teacher_model_name_or_path": teacher_b, "max_steps": 2}, teacher_model=None)
    with CaptureLogger(logging.get_logger("trl_gndpo.resume")) as captured:
        resumed.train(resume_from_checkpoint=True)
    assert f"teacher_model_name_or_path (checkpoint: {teacher_a!r}, now: {teacher_b!r})" in captured.out
    assert resumed.state.global_step == 2 and all(torch.isfinite(p).all() for p in resumed.model.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# Very long prompts: handled before the student generates


def with_long_prompt(n_chars: int = 100_000):
    """The tiny text dataset (prompts of about 72 tokens) with a question of `n_chars` characters in rows 1-3, 5-7."""
    rows = make_text_dataset(8).to_dict()
    for row in (1, 2, 3, 5, 6, 7):
        rows["prompt"][row] = [{"role": "user", "content": "Count: 0 1 2 3 4 5 6 7 8 9. " * (n_chars // 28)}]
    return Dataset.from_dict(rows)


def generated_prompt_lengths(trainer) -> list[int]:
    """Record the prompt lengths the student generates from."""
    lengths, generate = [], trainer._generate_single_turn

    def recording(prompt_ids, *args, **kwargs):
        lengths.extend(len(ids) for ids in prompt_ids)
        return generate(prompt_ids, *args, **kwargs)

    trainer._generate_single_turn = recording
    return lengths


def test_long_prompts_refused_before_generating(cpu_config_kwargs):
    """A 100k-character prompt with max_prompt_length=128 used to be prefilled whole (minutes on CPU) before its
    completions were masked."""
    config = {"max_prompt_length": 128, "long_prompts": "error"}
    trainer = build(cpu_config_kwargs, config, train_dataset=with_long_prompt())
    lengths = generated_prompt_lengths(trainer)
    with pytest.raises(ValueError, match=r"longer than max_prompt_length=128: row \d \(\d{5,} tokens\)"):
        trainer.train()
    assert max(lengths, default=0) <= 128, "no over-long prompt reached the generation"


def test_long_prompts_truncated_before_generating(cpu_config_kwargs):
    trainer = build(
        cpu_config_kwargs, {"max_prompt_length": 128, "long_prompts": "truncate"}, train_dataset=with_long_prompt()
    )
    lengths = generated_prompt_lengths(trainer)
    with CaptureLogger(logging.get_logger("trl_gndpo.long_prompts")) as captured:
        trainer.train()
    assert lengths and max(lengths) == 128, "the long prompt is cut to its last 128 tokens, before generation"
    assert "each keeps its last 128 tokens" in captured.out
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    logged = [h["gndpo/long_prompt_frac"] for h in trainer.state.log_history if "gndpo/long_prompt_frac" in h]
    assert logged == [0.0, 0.0], "truncated prompts train: none is masked"
    assert min(lengths) < 128, "short prompts are kept whole"


def test_long_prompts_masked_with_a_warning_before_generating(cpu_config_kwargs):
    trainer = build(cpu_config_kwargs, {"max_prompt_length": 128}, train_dataset=with_long_prompt(2_000))
    lengths = generated_prompt_lengths(trainer)
    with CaptureLogger(logging.get_logger("trl_gndpo.long_prompts")) as captured:
        trainer.train()
    assert max(lengths) > 128 and "they are generated in full" in captured.out
    assert any(h.get("gndpo/long_prompt_frac", 0) > 0 for h in trainer.state.log_history)


# ---------------------------------------------------------------------------------------------------------------------
# Text views of prompts that carry `{"type": "image"}` parts (TRL's standard vision-language format)

QUESTION = "What colour is this picture?"


def image_part_dataset(n: int = 8) -> Dataset:
    prompts = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]] * n
    return Dataset.from_dict({"prompt": prompts, "image": [make_image(i) for i in range(n)]})


def vlm_trainer(cpu_config_kwargs, teacher, **config) -> GNDPOTrainer:
    student, processor = make_vlm("qwen2_vl", seed=0)
    return GNDPOTrainer(
        model=student,
        teacher_model=teacher,
        args=GNDPOConfig(**cpu_config_kwargs(max_steps=1, **config)),
        train_dataset=image_part_dataset(),
        processing_class=processor,
        teacher_processing_class=make_tokenizer() if "cross_modal_distillation" in config else None,
    )


def assert_text_view_without_images(trainer) -> None:
    """The text view of an image-part prompt is that of the same question as plain text."""
    text_view = trainer.teachers.text_view
    with_parts = text_view.prompts([{"prompt": image_part_dataset(1)[0]["prompt"]}])[0]
    plain = text_view.prompts([{"prompt": [{"role": "user", "content": QUESTION}]}])[0]
    assert torch.equal(with_parts, plain)
    image_pad = trainer.processing_class.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert not (with_parts == image_pad).any()


def test_cross_modal_distillation_with_image_parts(cpu_config_kwargs):
    """Used to crash at step 1 in TRL's data_utils: "Number of images provided (0) does not match number of image
    placeholders": the text view was built from the prompt with its image parts still in it."""
    trainer = vlm_trainer(cpu_config_kwargs, make_text_model(seed=1, hidden_size=128), cross_modal_distillation=True)
    trainer.train()
    assert trainer.state.global_step == 1 and all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert_text_view_without_images(trainer)


def test_visual_gradient_steering_with_image_parts(cpu_config_kwargs):
    trainer = vlm_trainer(cpu_config_kwargs, make_vlm("qwen2_vl", 1, 128)[0], visual_gradient_steering=True)
    trainer.train()
    assert trainer.state.global_step == 1 and all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert_text_view_without_images(trainer)


# ---------------------------------------------------------------------------------------------------------------------
# A streamed dataset whose teacher column names no teacher


def test_streamed_row_with_an_unknown_teacher_is_named(cpu_config_kwargs):
    """A bad teacher name at row 40 of a stream used to crash after 28 steps without saying which row."""
    rows = make_text_dataset(8).add_column("teacher", ["a", "b", "a", "b", "a", "c", "a", "b"])
    stream = rows.to_iterable_dataset()
    teachers = {"a": make_text_model(seed=1), "b": make_text_model(seed=2)}
    trainer = build(cpu_config_kwargs, {"max_steps": 4}, teacher_model=teachers, train_dataset=stream)
    with pytest.raises(ValueError, match=r"Row 5 of the streamed training dataset's 'teacher' is 'c', which names"):
        trainer.train()

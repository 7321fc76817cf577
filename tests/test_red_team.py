"""Defects found by a red-team sweep of the newer features (issue 22, items 5 and 6): each now ends in a clear error
before the first step, or a masked and logged skip. Listed with their tests in docs/faults.md."""

import math
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import make_text_dataset, make_text_model, make_tokenizer, save_tiny
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from trl_gndpo import GNDPOConfig, GNDPOTrainer


def build(cpu_config_kwargs, config=None, **kwargs) -> GNDPOTrainer:
    defaults = dict(
        model=make_text_model(seed=0),
        teacher_model=make_text_model(seed=1),
        args=GNDPOConfig(**cpu_config_kwargs(**(config or {}))),
        train_dataset=make_text_dataset(),
        processing_class=make_tokenizer(),
    )
    return GNDPOTrainer(**{**defaults, **kwargs})


# ---------------------------------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"learning_rate": math.inf}, "learning_rate must be a finite number"),
        ({"learning_rate": math.nan}, "learning_rate must be a finite number"),
        ({"learning_rate": -1e-5}, "learning_rate must be >= 0"),
        ({"weight_decay": math.inf}, "weight_decay must be a finite number"),
        ({"adam_epsilon": math.nan}, "adam_epsilon must be a finite number"),
        ({"adam_beta2": math.inf}, "adam_beta2 must be a finite number"),
        ({"max_grad_norm": math.nan}, "max_grad_norm must be a number"),
        ({"warmup_steps": math.inf}, "warmup_steps must be a finite number"),
    ],
)
def test_non_finite_training_numbers_are_refused(cpu_config_kwargs, overrides, message):
    """`learning_rate=inf` used to train a step and leave NaN in every weight."""
    with pytest.raises(ValueError, match=message):
        GNDPOConfig(**cpu_config_kwargs(**overrides))


def test_an_infinite_max_grad_norm_still_means_no_clipping(cpu_config_kwargs):
    assert GNDPOConfig(**cpu_config_kwargs(max_grad_norm=math.inf)).max_grad_norm == math.inf


@pytest.mark.parametrize("value", [0.0, -1.25, 1e6])
def test_reward_extrapolation_out_of_range(cpu_config_kwargs, value):
    """0 ignored the teacher, a negative value trained away from it, 1e6 put every token at the clamp."""
    with pytest.raises(ValueError, match=r"reward_extrapolation must be in \(0, 10.0\]"):
        GNDPOConfig(**cpu_config_kwargs(reward_extrapolation=value))
    assert GNDPOConfig(**cpu_config_kwargs(reward_extrapolation=0.5)).reward_extrapolation == 0.5


@pytest.mark.parametrize("value", [2.5, True, "8"])
def test_value_baseline_top_k_must_be_a_whole_number(cpu_config_kwargs, value):
    """2.5 used to pass the config and fail in `torch.topk` at step 1."""
    with pytest.raises(ValueError, match="value_baseline_top_k must be a whole number >= 1"):
        GNDPOConfig(**cpu_config_kwargs(value_baseline=True, value_baseline_top_k=value))


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

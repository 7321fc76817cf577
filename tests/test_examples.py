"""The examples build, the single-GPU ones train, and every launch line in examples/README.md parses.

Each example is imported from examples/ and called with the paths of tiny Qwen2.5-VL checkpoints saved by
tests/tiny_models (student hidden 64, teacher hidden 128, one tokenizer and processor) and with a local dataset that
has Geometry3K's columns, so the examples' own model loading, data mapping, LoRA / QLoRA and trainer code runs. The
only overrides are the CPU flags and tiny batch sizes of `cpu_grpo_kwargs` (use_cpu, bf16 and activation
checkpointing off, 2 x 2 completions of 8 tokens, one step). The examples' GPU defaults are checked on their own: the
config each example asks for is built unchanged, with only `use_cpu=True` added.

The notebook must work when opened on its own, so it repeats the script, and a copy rots silently unless checked.
Hence: (1) the notebook's code cells, concatenated, must be the script statement for statement (equal ASTs, with the
script's `if __name__ == "__main__":` block unwrapped and the notebook's `%pip` install cell aside), so a change to
one fails here until the other gets it too; (2) every cell compiles on its own, and the notebook is committed without
outputs; (3) every code cell but the install one is executed in order in one namespace, with only the defaults of
`build_trainer` bound to the tiny models: the notebook's own cells build the trainer, train a step and print the
gndpo/ metrics. Not covered: the `%pip` line and the hub downloads of the real models and dataset.

Multi-GPU: each accelerate YAML goes through accelerate's own `launch_command` with the process-spawning functions
stubbed, and the environment that the launcher would hand to the training processes is turned into accelerate's
`DeepSpeedPlugin` / `FullyShardedDataParallelPlugin`. Nothing here runs on several GPUs or with DeepSpeed (not
installed); tests/test_distributed.py runs the trainer on two CPU processes. vLLM is not installed either: the
README's vLLM colocate line is parsed and must select vLLM in colocate mode, then its trainer is built with
`use_vllm` forced off, so vLLM generation itself is not tested here.
"""

import configparser
import importlib.util
import json
import math
import re
import shlex
import sys
from pathlib import Path

import accelerate.commands.launch as accelerate_launch
import datasets
import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from bitsandbytes.nn import Linear4bit
from datasets import Dataset, Features, Image, List, Value
from peft import PeftModel
from tiny_models import cpu_grpo_kwargs, frozen_fingerprint, make_image, make_vlm, same_fingerprint, save_tiny
from torch.distributed.fsdp import CPUOffloadPolicy
from transformers import BitsAndBytesConfig, Qwen2_5_VLForConditionalGeneration

from trl_gndpo import GNDPOConfig, GNDPOTrainer, cli

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
NOTEBOOK = EXAMPLES / "qwen2_5_vl_lora.ipynb"
LANGUAGE_MODEL_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


# --------------------------------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[str, str]:
    """Tiny Qwen2.5-VL student and bigger teacher, saved with their processor so examples load them by path."""
    root = tmp_path_factory.mktemp("checkpoints")
    student, processor = make_vlm("qwen2_5_vl", seed=0)
    teacher, teacher_processor = make_vlm("qwen2_5_vl", seed=1, hidden_size=128)
    save_tiny(student, processor, root / "student")
    save_tiny(teacher, teacher_processor, root / "teacher")
    return str(root / "student"), str(root / "teacher")


@pytest.fixture(scope="module")
def geometry3k(tmp_path_factory) -> str:
    """A local dataset laid out like hiyouga/geometry3k (parquet shards; images / problem / answer columns)."""
    root = tmp_path_factory.mktemp("geometry3k")
    n = 32  # one generation batch of the README launch lines (32 prompts per step), which the trainer checks
    rows = {
        "images": [[make_image(i)] for i in range(n)],
        "problem": [f"<image>Find x if AB = {i + 2}." for i in range(n)],
        "answer": [str(i) for i in range(n)],
    }
    features = Features({"images": List(Image()), "problem": Value("string"), "answer": Value("string")})
    (root / "data").mkdir()
    Dataset.from_dict(rows, features=features).to_parquet(root / "data" / "train-00000-of-00001.parquet")
    return str(root)


@pytest.fixture(autouse=True)
def isolated(tmp_path_factory, monkeypatch):
    """Examples importable by name (they import each other, as when run from examples/); datasets cached in tmp."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "datasets-cache")
    yield
    for name in ("qwen2_5_vl_lora", "qlora", "multi_gpu"):
        sys.modules.pop(name, None)


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def cpu_overrides(tmp_path, **overrides) -> dict:
    return cpu_grpo_kwargs(output_dir=str(tmp_path / "output"), max_steps=1, **overrides)


def parse(example, argv: list[str]) -> tuple:
    """An example's flags, parsed as its `__main__` does (TRL's script structure: `make_parser()`)."""
    return example.make_parser().parse_args_and_config(argv)


def as_flags(kwargs: dict) -> list[str]:
    return [item for key, value in kwargs.items() for item in (f"--{key}", str(value))]


def lora_modules(model) -> set[str]:
    return {name for name, module in model.named_modules() if hasattr(module, "lora_A") and module.lora_A}


def check_language_model_lora(model) -> None:
    """LoRA on every attention / MLP projection of the language model, nowhere else; only the adapter trains."""
    assert isinstance(model, PeftModel)
    adapted = lora_modules(model)
    assert adapted and all(".language_model." in name for name in adapted), sorted(adapted)
    assert {name.rsplit(".", 1)[-1] for name in adapted} == LANGUAGE_MODEL_PROJECTIONS
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in name for name in trainable), trainable


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if ".lora_" in n}


def train_one_step(trainer) -> dict:
    """Train, check that the adapter moved and the teacher did not; return the step's logs."""
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    teacher_before = frozen_fingerprint(teacher)
    before = lora_weights(trainer.model)
    trainer.train()
    after = lora_weights(trainer.model)
    assert any(not torch.equal(before[n], after[n]) for n in before), "the adapter did not train"
    assert same_fingerprint(teacher_before, frozen_fingerprint(teacher)), "the teacher must stay frozen"
    logs = trainer.state.log_history[0]
    for name in ("reverse_kl", "teacher_logp", "student_logp", "advantage_std"):
        assert math.isfinite(logs[f"gndpo/{name}"]), name
    return logs


# --------------------------------------------------------------------------------------------------------------------
# qwen2_5_vl_lora.py and its notebook
# --------------------------------------------------------------------------------------------------------------------
def test_geometry3k_rows_become_conversational_prompts(geometry3k):
    lora = load_example("qwen2_5_vl_lora")
    dataset = lora.load_prompts(geometry3k, "train")
    assert sorted(dataset.column_names) == ["images", "prompt"]  # the reference answer is dropped
    assert dataset[0]["prompt"] == [{"role": "user", "content": f"Find x if AB = 2.\n{lora.INSTRUCTION}"}]
    assert len(dataset[0]["images"]) == 1 and dataset[0]["images"][0].size == (32, 32)


def test_lora_script_trains_a_language_model_adapter(checkpoints, geometry3k, tmp_path):
    lora = load_example("qwen2_5_vl_lora")
    student, teacher = checkpoints
    trainer = lora.build_trainer(
        student, teacher, dataset=lora.load_prompts(geometry3k, "train"), **cpu_overrides(tmp_path)
    )
    check_language_model_lora(trainer.model)
    base = trainer.model.get_base_model()
    assert base.model.language_model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert trainer.processing_class.tokenizer.padding_side == "left"  # GRPOTrainer's own processor loading
    teacher_model = trainer.accelerator.unwrap_model(trainer.teacher_model)
    assert teacher_model.config.get_text_config().hidden_size == 128 and not teacher_model.training  # by path
    train_one_step(trainer)


def notebook_code_cells() -> tuple[list[str], list[str]]:
    """(install cells, other code cells) as source strings, after checking the nbformat 4 structure."""
    notebook = json.loads(NOTEBOOK.read_text())
    assert notebook["nbformat"] == 4 and notebook["metadata"]["kernelspec"]["language"] == "python"
    install, code = [], []
    for cell in notebook["cells"]:
        assert cell["cell_type"] in ("code", "markdown") and isinstance(cell["source"], list)
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, "commit the notebook without outputs"
            source = "".join(cell["source"])
            (install if "%pip" in source else code).append(source)
    return install, code


def test_notebook_installs_the_package_as_trls_notebooks_do():
    """`%pip install "trl-gndpo[quantization]" trackio`: the package by its distribution name (no clone), with
    extras that setup.cfg defines, and the tracker it logs to."""
    install, _ = notebook_code_cells()
    assert len(install) == 1
    commands = [line for line in install[0].splitlines() if line and not line.startswith("#")]
    assert len(commands) == 1 and commands[0].startswith("%pip install")
    requirements = [word.strip('"') for word in commands[0].split()[2:] if not word.startswith("-")]
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    package = re.fullmatch(r"([\w-]+)\[([\w,]+)\]", requirements[0])
    assert package and package[1] == setup["metadata"]["name"], requirements
    assert set(package[2].split(",")) <= set(setup["options.extras_require"]) and "quantization" in package[2]
    assert "trackio" in requirements[1:]


def run_notebook(checkpoints, geometry3k, tmp_path, monkeypatch, push: bool) -> dict:
    """Every code cell but the install one, in order, in one namespace: the tiny models bound to `build_trainer`'s
    defaults, the local Geometry3K to `load_prompts`, and `PUSH_TO_HUB` set to `push` (a fake Hub receives it)."""
    import transformers.trainer
    from test_cli import FakeHub

    hub = FakeHub()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    pushed = []
    for owner in ("transformers.PreTrainedModel", "transformers.ProcessorMixin"):  # each has its own copy of it
        monkeypatch.setattr(f"{owner}.push_to_hub", lambda self, repo, **kw: pushed.append(repo))
    _, cells = notebook_code_cells()
    namespace = {"__name__": "__main__", "trainers": []}
    for i, source in enumerate(cells):
        exec(compile(source, f"{NOTEBOOK.name} code cell {i}", "exec"), namespace)
        if "PUSH_TO_HUB" in namespace and "defaults" not in namespace:
            namespace["defaults"] = {
                "PUSH_TO_HUB": namespace["PUSH_TO_HUB"],
                "HUB_MODEL_ID": namespace["HUB_MODEL_ID"],
            }
            namespace.update(PUSH_TO_HUB=push, HUB_MODEL_ID="someone/tiny-vl-qlora" if push else None)
        load = namespace.get("load_prompts")
        if load is not None and not hasattr(load, "tiny"):
            namespace["load_prompts"] = lambda name=None, split=None, load=load: load(geometry3k, "train")
            namespace["load_prompts"].tiny = True
        build = namespace.get("build_trainer")
        if build is not None and not hasattr(build, "tiny"):  # bind the tiny models as soon as it is defined
            student, teacher = checkpoints

            def tiny_build(build=build, student=student, teacher=teacher):
                overrides = cpu_overrides(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2)
                trainer = build(student, teacher, dataset=namespace["load_prompts"](), **overrides)
                namespace["trainers"].append(trainer)
                return trainer

            tiny_build.tiny = True
            namespace["build_trainer"] = tiny_build
    namespace["hub"], namespace["pushed"] = hub, pushed
    return namespace


@pytest.mark.slow
def test_notebook_runs_with_tiny_models(checkpoints, geometry3k, tmp_path, monkeypatch, capsys):
    namespace = run_notebook(checkpoints, geometry3k, tmp_path, monkeypatch, push=False)
    assert namespace["defaults"] == {"PUSH_TO_HUB": False, "HUB_MODEL_ID": None}, "the notebook pushes on request only"
    (trainer,) = namespace["trainers"]
    assert trainer.state.global_step == 1 and namespace["hub"].uploads == [] and namespace["pushed"] == []
    assert trainer.model.get_base_model().is_loaded_in_4bit  # QLoRA student
    assert trainer.accelerator.unwrap_model(trainer.teacher_model).is_loaded_in_4bit  # 4-bit teacher
    check_language_model_lora(trainer.model)
    assert (tmp_path / "output" / "adapter_model.safetensors").exists()  # the notebook's save_model()
    # The held-out evaluation ran before and after the step, printed and plotted
    out = capsys.readouterr().out
    assert re.search(r"^step +0 +held-out reverse KL \d+\.\d{4}", out, re.M)
    assert re.search(r"^step +1 +held-out reverse KL \d+\.\d{4}", out, re.M)
    assert f"curve: {tmp_path / 'output' / 'reverse_kl.png'}" in out
    assert (tmp_path / "output" / "reverse_kl.png").exists()
    # The merged student (bf16 base + adapter) loads without peft and differs in the language model's projections only
    merged = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "output" / "merged").state_dict()
    initial = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoints[0]).state_dict()
    assert merged.keys() == initial.keys()
    changed = {name for name in merged if not torch.equal(merged[name], initial[name].to(merged[name].dtype))}
    assert changed and all(".language_model." in name and name.endswith("_proj.weight") for name in changed), changed


@pytest.mark.slow
def test_notebook_pushes_when_asked(checkpoints, geometry3k, tmp_path, monkeypatch):
    namespace = run_notebook(checkpoints, geometry3k, tmp_path, monkeypatch, push=True)
    repo, message, card = namespace["hub"].uploads[-1]
    assert (repo, message) == ("someone/tiny-vl-qlora", "End of training")
    assert "datasets: hiyouga/geometry3k" in card  # push_to_hub(dataset_name=DATASET) names the Hub dataset
    assert namespace["pushed"] == ["someone/tiny-vl-qlora-merged"] * 2  # the merged model and its processor


def test_notebook_defaults_fit_the_stated_budget():
    """The notebook's config, as written, is a valid GPU config for QLoRA on one 16 GB GPU: 4-bit student and teacher,
    trackio, a small generation batch; the markdown states the budget."""
    _, cells = notebook_code_cells()
    namespace = {}
    for source in cells:
        if "CONFIG = dict(" in source:
            source = source[: source.index("def build_trainer")]
            exec("PUSH_TO_HUB, HUB_MODEL_ID = False, None\n" + source, namespace)
    config = namespace["CONFIG"]
    assert config["report_to"] == "trackio" and config["push_to_hub"] is False
    quantization = BitsAndBytesConfig(**namespace["QUANTIZATION"])
    assert quantization.load_in_4bit and quantization.bnb_4bit_quant_type == "nf4"
    assert config["teacher_model_init_kwargs"]["quantization_config"] is namespace["QUANTIZATION"]
    args = GNDPOConfig(**config, use_cpu=True)
    assert args.generation_batch_size == 16 and args.steps_per_generation == args.gradient_accumulation_steps
    text = NOTEBOOK.read_text()
    assert "16 GB" in text and "about 13 GB" in text


# --------------------------------------------------------------------------------------------------------------------
# qlora.py
# --------------------------------------------------------------------------------------------------------------------
def test_qlora_trains_a_4bit_student_with_a_4bit_teacher(checkpoints, geometry3k, tmp_path):
    qlora = load_example("qlora")
    student, teacher = checkpoints
    dataset = qlora.load_prompts(geometry3k, "train")
    trainer = qlora.build_trainer(student, teacher, dataset=dataset, **cpu_overrides(tmp_path))
    check_language_model_lora(trainer.model)
    for model in (trainer.model.get_base_model(), trainer.accelerator.unwrap_model(trainer.teacher_model)):
        assert model.is_loaded_in_4bit
        layer = model.model.language_model.layers[0].mlp.down_proj
        layer = getattr(layer, "base_layer", layer)  # the student's is wrapped by LoRA
        assert isinstance(layer, Linear4bit) and layer.weight.quant_type == "nf4"
        assert layer.compute_dtype == torch.bfloat16
        # the vision tower and lm_head stay unquantized, in bf16
        for kept in (model.model.visual.blocks[0].mlp.down_proj, model.lm_head):
            assert type(kept) is torch.nn.Linear and kept.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for n, p in trainer.model.named_parameters() if ".lora_" in n)
    train_one_step(trainer)


@pytest.mark.parametrize("name", ["qwen2_5_vl_lora", "qlora"])
def test_single_gpu_defaults_are_a_valid_gpu_recipe(name, monkeypatch):
    """`build_trainer()` as `python examples/<name>.py` calls it, minus the hub: the config is valid unchanged."""
    example = load_example(name)
    calls = {}
    monkeypatch.setattr(example, "load_prompts", lambda: calls.setdefault("dataset", object()))
    monkeypatch.setattr(example, "GNDPOTrainer", lambda **kwargs: calls.setdefault("trainer", kwargs))
    monkeypatch.setattr(example, "GNDPOConfig", lambda **kwargs: calls.setdefault("config", kwargs))
    example.build_trainer()

    trainer, requested = calls["trainer"], calls["config"]
    assert trainer["model"] == example.STUDENT and trainer["teacher_model"] == example.TEACHER
    assert trainer["model"].startswith("Qwen/Qwen2.5-VL-") and trainer["teacher_model"].startswith("Qwen/Qwen2.5-VL-")
    assert trainer["train_dataset"] is calls["dataset"]  # Geometry3K from the hub when no dataset is given
    assert requested["bf16"] and requested["activation_checkpointing"]
    assert requested["model_init_kwargs"]["dtype"] == "bfloat16"
    config = GNDPOConfig(**requested, use_cpu=True)  # valid as written: batch sizes, GNDPO and GRPO checks
    assert config.generation_batch_size == config.per_device_train_batch_size * config.gradient_accumulation_steps
    assert config.steps_per_generation == config.gradient_accumulation_steps  # one optimizer step per generation
    assert config.generation_batch_size // config.num_generations >= 8  # enough prompts to whiten over
    assert trainer["peft_config"].lora_dropout == 0.0
    target = re.compile(trainer["peft_config"].target_modules)
    vlm, _ = make_vlm("qwen2_5_vl")
    matched = {n for n, m in vlm.named_modules() if isinstance(m, torch.nn.Linear) and target.fullmatch(n)}
    assert matched and all(".language_model." in n for n in matched)
    if name == "qlora":
        student = trainer["quantization_config"]
        teacher = BitsAndBytesConfig.from_dict(requested["teacher_model_init_kwargs"]["quantization_config"])
        for quantization in (student, teacher):
            assert quantization.load_in_4bit and quantization.bnb_4bit_quant_type == "nf4"
            assert quantization.bnb_4bit_compute_dtype == torch.bfloat16
        assert student.bnb_4bit_use_double_quant


@pytest.mark.parametrize("name", ["qwen2_5_vl_lora", "qlora"])
def test_single_gpu_flags_default_to_the_recipe(name):
    """`python examples/<name>.py` with no flag trains the recipe; flags replace single fields, as in TRL's scripts."""
    example = load_example(name)
    script_args, args = parse(example, ["--use_cpu", "--bf16", "false"])
    assert (script_args.dataset_name, script_args.dataset_train_split) == ("hiyouga/geometry3k", "train[:1024]")
    expected = GNDPOConfig(**{**example.RECIPE, "use_cpu": True, "bf16": False})
    assert args.to_dict() == expected.to_dict()
    _, args = parse(example, ["--use_cpu", "--bf16", "false", "--max_steps", "10", "--resume_from_checkpoint", "c"])
    assert (args.max_steps, args.resume_from_checkpoint, args.num_generations) == (10, "c", expected.num_generations)


@pytest.mark.slow
def test_lora_script_resumes_and_pushes_with_the_dataset_name(checkpoints, geometry3k, tmp_path, monkeypatch):
    """`main()` as `python examples/qwen2_5_vl_lora.py --resume_from_checkpoint ... --push_to_hub` runs it (fake Hub):
    the run continues from the checkpoint's step, the card names the dataset, the adapter is merged."""
    import transformers.trainer
    from test_cli import FakeHub

    hub = FakeHub()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    lora = load_example("qwen2_5_vl_lora")
    student, teacher = checkpoints
    flags = ["--dataset_name", geometry3k, "--dataset_train_split", "train", "--save_strategy", "steps"]
    flags += [
        "--save_steps",
        "1",
        *as_flags({k: v for k, v in cpu_overrides(tmp_path).items() if k != "save_strategy"}),
    ]
    first = lora.main(*parse(lora, flags), student=student, teacher=teacher)
    assert first.state.global_step == 1 and hub.uploads == []
    checkpoint = str(tmp_path / "output" / "checkpoint-1")
    resumed_flags = flags + ["--max_steps", "2", "--resume_from_checkpoint", checkpoint]
    resumed_flags += ["--push_to_hub", "--hub_model_id", "someone/tiny-vl-gndpo"]
    trainer = lora.main(*parse(lora, resumed_flags), student=student, teacher=teacher)
    steps = [entry["step"] for entry in trainer.state.log_history if "gndpo/reverse_kl" in entry]
    assert trainer.state.global_step == 2 and steps == [1, 2], "step 1 comes from the checkpoint, step 2 is trained"
    repo, message, card = hub.uploads[-1]
    assert (repo, message) == ("someone/tiny-vl-gndpo", "End of training") and geometry3k in card
    assert (tmp_path / "output" / "merged" / "model.safetensors").exists()


def test_multi_gpu_main_pushes_with_the_dataset_name(checkpoints, geometry3k, tmp_path, monkeypatch):
    import transformers.trainer
    from test_cli import FakeHub

    hub = FakeHub()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    multi_gpu = load_example("multi_gpu")
    student, teacher = checkpoints
    argv = ["--model_name_or_path", student, "--teacher_model_name_or_path", teacher, "--dataset_name", geometry3k]
    argv += [
        "--use_peft",
        "--lora_target_modules",
        "q_proj",
        "v_proj",
        "--push_to_hub",
        "--hub_model_id",
        "someone/vl",
    ]
    trainer = multi_gpu.main(*parse(multi_gpu, argv + as_flags(cpu_overrides(tmp_path))))
    assert trainer.state.global_step == 1 and (tmp_path / "output" / "adapter_model.safetensors").exists()
    repo, _, card = hub.uploads[-1]
    assert repo == "someone/vl" and geometry3k in card


# --------------------------------------------------------------------------------------------------------------------
# multi_gpu.py
# --------------------------------------------------------------------------------------------------------------------
def test_multi_gpu_parses_and_builds_lora(checkpoints, geometry3k, tmp_path):
    multi_gpu = load_example("multi_gpu")
    student, teacher = checkpoints
    target = r".*language_model.*\.(q|k|v|o|gate|up|down)_proj"
    argv = ["--model_name_or_path", student, "--teacher_model_name_or_path", teacher, "--dataset_name", geometry3k]
    argv += ["--use_peft", "--lora_target_modules", target, "--teacher_model_init_kwargs", '{"dtype": "bfloat16"}']
    script_args, args, model_args = parse(multi_gpu, argv + as_flags(cpu_overrides(tmp_path)))
    assert isinstance(args, GNDPOConfig) and args.teacher_model_name_or_path == teacher and args.max_steps == 1
    assert args.teacher_model_init_kwargs == {"dtype": "bfloat16"}  # JSON on the command line
    assert (model_args.dtype, model_args.lora_dropout, model_args.lora_target_modules) == ("bfloat16", 0.0, target)
    assert script_args.dataset_name == geometry3k and script_args.dataset_train_split == "train"

    trainer = multi_gpu.build_trainer(script_args, args, model_args)
    check_language_model_lora(trainer.model)
    base = trainer.model.get_base_model()
    assert base.model.language_model.layers[0].mlp.up_proj.base_layer.weight.dtype == torch.bfloat16
    assert trainer.accelerator.unwrap_model(trainer.teacher_model).dtype == torch.bfloat16
    assert sorted(trainer.train_dataset.column_names) == ["images", "prompt"]
    assert trainer.train_dataset[0]["prompt"][0]["content"].startswith("Find x if AB = 2.")


def test_multi_gpu_defaults_and_4bit_student(checkpoints, geometry3k, tmp_path):
    multi_gpu = load_example("multi_gpu")
    script_args, args, model_args = parse(multi_gpu, ["--model_name_or_path", "m", "--use_cpu"])
    assert script_args.dataset_name == "hiyouga/geometry3k" and not model_args.use_peft  # full fine-tune by default
    assert not model_args.load_in_4bit and args.teacher_model_name_or_path is None

    student, teacher = checkpoints
    argv = ["--model_name_or_path", student, "--teacher_model_name_or_path", teacher, "--dataset_name", geometry3k]
    argv += ["--load_in_4bit", "--use_peft", "--lora_target_modules", "q_proj", "v_proj"]
    trainer = multi_gpu.build_trainer(*parse(multi_gpu, argv + as_flags(cpu_overrides(tmp_path))))
    base = trainer.model.get_base_model()
    assert base.is_loaded_in_4bit and isinstance(base.model.language_model.layers[0].mlp.up_proj, Linear4bit)
    assert {name.rsplit(".", 1)[-1] for name in lora_modules(trainer.model)} == {"q_proj", "v_proj"}


# --------------------------------------------------------------------------------------------------------------------
# accelerate YAMLs and README launch lines
# --------------------------------------------------------------------------------------------------------------------
def launch(argv: list[str], monkeypatch):
    """Run accelerate's own `launch_command` on `argv`, spawning nothing: (launcher, its args, worker env)."""
    launched = []
    for launcher in ("deepspeed_launcher", "multi_gpu_launcher", "simple_launcher"):
        monkeypatch.setattr(accelerate_launch, launcher, lambda args, name=launcher: launched.append((name, args)))
    accelerate_launch.launch_command(accelerate_launch.launch_command_parser().parse_args(argv))
    ((launcher, args),) = launched
    if launcher == "deepspeed_launcher":
        env = prepare_deepspeed_cmd_env(args)[1]
    else:
        env = prepare_multi_gpu_env(args)
    return launcher, args, {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


EXPECTED_YAML = {  # named as TRL names the configs it ships (trl/accelerate_configs)
    "multi_gpu.yaml": ("multi_gpu_launcher", DistributedType.MULTI_GPU),
    "zero2.yaml": ("deepspeed_launcher", DistributedType.DEEPSPEED),
    "zero3.yaml": ("deepspeed_launcher", DistributedType.DEEPSPEED),
    "fsdp2.yaml": ("multi_gpu_launcher", DistributedType.FSDP),
}


def test_every_accelerate_config_is_tested():
    import importlib.resources

    assert sorted(p.name for p in (EXAMPLES / "accelerate").iterdir()) == sorted(EXPECTED_YAML)
    shipped = {p.name for p in importlib.resources.files("trl.accelerate_configs").iterdir()}
    assert set(EXPECTED_YAML) <= shipped, "each config carries the name of TRL's config for the same engine"


@pytest.mark.parametrize("name", sorted(EXPECTED_YAML))
def test_accelerate_config(name, monkeypatch):
    path = str(EXAMPLES / "accelerate" / name)
    config = load_config_from_file(path)  # what `accelerate launch --config_file` reads; rejects unknown keys
    assert isinstance(config, ClusterConfig) and config.distributed_type == EXPECTED_YAML[name][1]
    assert (config.mixed_precision, config.num_processes, config.num_machines, config.use_cpu) == ("bf16", 8, 1, False)
    # accelerate ignores unknown keys inside deepspeed_config / fsdp_config: each must be a launcher flag
    flags = {action.dest for action in accelerate_launch.launch_command_parser()._actions}
    for key in config.deepspeed_config:
        assert key in flags, f"{name}: unknown deepspeed_config key {key}"
    for key in config.fsdp_config:
        assert (key if key.startswith("fsdp_") else f"fsdp_{key}") in flags, f"{name}: unknown fsdp_config key {key}"

    launcher, args, env = launch(["--config_file", path, "examples/multi_gpu.py", "--output_dir", "x"], monkeypatch)
    assert launcher == EXPECTED_YAML[name][0] and args.num_processes == 8
    assert args.training_script_args == ["--output_dir", "x"]
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    for key, value in env.items():  # the worker processes build accelerate's plugins from this environment
        monkeypatch.setenv(key, value)
    if name == "multi_gpu.yaml":
        assert "ACCELERATE_USE_DEEPSPEED" not in env and "ACCELERATE_USE_FSDP" not in env
    elif name.startswith("zero"):
        plugin = DeepSpeedPlugin()
        zero = plugin.deepspeed_config["zero_optimization"]
        assert plugin.zero_stage == zero["stage"] == int(name[4])
        assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "none"
        assert plugin.zero3_init_flag == (name == "zero3.yaml")  # ZeRO-3 shards both models while they load
        assert zero["stage3_gather_16bit_weights_on_model_save"] == (name == "zero3.yaml")
    else:
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
        assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
        assert plugin.cpu_ram_efficient_loading is False  # the teacher would load empty weights on ranks > 0
        assert plugin.activation_checkpointing is False  # checkpointing comes from GNDPOConfig
        assert not isinstance(plugin.cpu_offload, CPUOffloadPolicy)


def readme_commands() -> list[str]:
    """Every command in the bash blocks of examples/README.md, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", (EXAMPLES / "README.md").read_text(), re.S)
    return [command.strip() for block in blocks for command in block.replace("\\\n", " ").splitlines() if command]


def test_readme_lists_every_example_and_config():
    readme = (EXAMPLES / "README.md").read_text()
    files = [p.relative_to(EXAMPLES).as_posix() for p in EXAMPLES.rglob("*") if p.is_file() and p.name != "README.md"]
    files = [f for f in files if "__pycache__" not in f and ".ipynb_checkpoints" not in f]
    assert files and all(f"`{f}`" in readme for f in files), files
    commands = " ".join(readme_commands())
    for file in files:  # every script, the notebook and every accelerate config has a command line
        assert f"examples/{file}" in commands, file
    assert "--use_vllm" in commands and "--vllm_mode colocate" in commands


def command_id(command: str) -> str:
    """`zero3.yaml` (the accelerate config) or `qlora.py`, plus `-vllm` or `-vgs`: a failing line is easy to find."""
    words = shlex.split(command)
    flag = next((f for f in ("--config_file", "--accelerate_config", "--config") if f in words), None)
    target = words[words.index(flag) + 1] if flag else words[-1]
    return Path(target).name + ("-vllm" if "--use_vllm" in words else "") + ("-vgs" if "--vgs_eta" in words else "")


def test_vlm_recipe_trains_on_geometry3k_as_the_hub_serves_it(checkpoints, geometry3k, tmp_path):
    """recipes/vlm_lora.yaml with only the models, the dataset path and the CPU flags replaced: Geometry3K's own
    columns (problem, images, answer) are mapped by the recipe's prompt_column / image_column, and a step trains."""
    student, teacher = checkpoints
    cpu = {k: v for k, v in cpu_overrides(tmp_path).items() if not k.startswith(("per_device", "gradient_acc"))}
    argv = ["--config", str(EXAMPLES / "recipes" / "vlm_lora.yaml"), "--model_name_or_path", student]
    argv += ["--teacher_model_name_or_path", teacher, "--dataset_name", geometry3k, "--dtype", "float32"]
    argv += ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--num_generations", "2"]
    script_args, _, _, dataset_args = cli.parse(argv + as_flags(cpu))
    assert (script_args.prompt_column, script_args.image_column) == ("problem", "images")
    row = cli.load_datasets(script_args, dataset_args)["train"][0]
    assert row["prompt"] == [{"role": "user", "content": "Find x if AB = 2."}] and len(row["images"]) == 1
    trainer = cli.run(argv + as_flags(cpu))
    assert trainer.state.global_step == 1 and math.isfinite(trainer.state.log_history[0]["gndpo/reverse_kl"])
    check_language_model_lora(trainer.model)


@pytest.mark.parametrize("command", readme_commands(), ids=command_id)
def test_readme_launch_line(command, checkpoints, geometry3k, tmp_path, monkeypatch):
    words = shlex.split(command)
    if words[0] in ("python", "jupyter"):
        script = next(w for w in words if w.startswith("examples/"))
        assert (ROOT / script).is_file()
        if script.endswith(".py"):  # its flags parse with the script's own parser (TRL's script structure)
            flags = words[words.index(script) + 1 :]
            _, args = parse(load_example(Path(script).stem), flags + ["--use_cpu", "--bf16", "false"])
            assert args.resume_from_checkpoint == (flags[1] if "--resume_from_checkpoint" in flags else None)
            assert args.push_to_hub == ("--push_to_hub" in flags)
        return
    if words[0] == "trl-gndpo":  # the CLI: launch options resolve, values parse and validate (and test_cli.py)
        launch_args, training_args = cli.split_launch_args(words[1:])
        if "--accelerate_config" in words:  # resolved by TRL to a config file that accelerate reads
            assert launch_args[0] == "--config_file" and load_config_from_file(launch_args[1]).num_processes == 8
        else:
            assert launch_args == []
        script_args, config, model_args, _ = cli.parse(training_args + ["--output_dir", str(tmp_path)])
        assert model_args.model_name_or_path and config.teacher_model_name_or_path
        if "--config" not in words:  # the full command line: its dataset mapping and the reference batch
            assert (script_args.prompt_column, script_args.image_column) == ("problem", "images")
            assert config.generation_batch_size * 8 // config.num_generations == 32
        return
    assert words[:2] == ["accelerate", "launch"], command
    launcher, args, _ = launch(words[2:], monkeypatch)
    assert Path(args.training_script) == Path("examples/multi_gpu.py")
    multi_gpu = load_example("multi_gpu")
    script_args, config, model_args = parse(multi_gpu, args.training_script_args + ["--use_cpu"])  # no GPU here
    assert model_args.model_name_or_path.startswith("Qwen/Qwen2.5-VL-")
    assert config.teacher_model_name_or_path.startswith("Qwen/Qwen2.5-VL-")
    assert config.output_dir and script_args.dataset_name == "hiyouga/geometry3k"
    assert config.generation_batch_size * 8 // config.num_generations == 32  # 32 prompts per step on 8 GPUs
    if "--use_vllm" in words:
        assert config.use_vllm and config.vllm_mode == "colocate"

    # The same line with the tiny models, the local dataset and CPU flags; vLLM (not installed here) is forced off.
    student, teacher = checkpoints
    cpu = {k: v for k, v in cpu_overrides(tmp_path).items() if not k.startswith(("per_device", "gradient_acc"))}
    argv = args.training_script_args + ["--model_name_or_path", student, "--teacher_model_name_or_path", teacher]
    argv += ["--dataset_name", geometry3k, "--use_vllm", "false", *as_flags(cpu)]
    trainer = multi_gpu.build_trainer(*parse(multi_gpu, argv))
    assert isinstance(trainer, GNDPOTrainer) and not trainer.use_vllm
    assert isinstance(trainer.model, PeftModel) == ("--use_peft" in words)
    if "--use_peft" in words:
        check_language_model_lora(trainer.model)
    assert trainer.args.visual_gradient_steering == ("--visual_gradient_steering" in words)

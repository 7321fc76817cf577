"""QLoRA GNDPO on one GPU: a 4-bit Qwen2.5-VL-7B-Instruct student with LoRA, taught by a 4-bit Qwen2.5-VL-32B-Instruct.

    python examples/qlora.py
    python examples/qlora.py --resume_from_checkpoint Qwen2.5-VL-7B-Instruct-GNDPO-QLoRA/checkpoint-32
    python examples/qlora.py --push_to_hub --hub_model_id <user>/Qwen2.5-VL-7B-Instruct-GNDPO-QLoRA

Weights take about 7 GB (student) + 20 GB (teacher) in 4-bit, so the run suits one 48 GB GPU; drop the teacher's
`quantization_config` for a bf16 teacher (65 GB, an 80 GB GPU with a smaller batch), or use `{"load_in_8bit": True}`.
Both models are Qwen2.5-VL: one tokenizer, one image layout. Data: Geometry3K, as in `qwen2_5_vl_lora.py`.
Structured like TRL's scripts: `make_parser()` (every `GNDPOConfig` field and the dataset as flags, this recipe as
defaults) and `main()` (train, resuming with `--resume_from_checkpoint`; save; push with the dataset name).
"""

import torch
from peft import LoraConfig
from qwen2_5_vl_lora import DATASET, load_prompts  # Geometry3K as conversational prompts + images (from examples/)
from transformers import BitsAndBytesConfig
from trl import ScriptArguments, TrlParser

from trl_gndpo import GNDPOConfig, GNDPOTrainer

STUDENT = "Qwen/Qwen2.5-VL-7B-Instruct"
TEACHER = "Qwen/Qwen2.5-VL-32B-Instruct"

# nf4 weights with double quantization, bf16 compute. The vision tower (0.7B) stays in bf16 so the image features
# keep full precision; `llm_int8_skip_modules` replaces transformers' default skip list, so lm_head is listed too.
SKIP_MODULES = ["model.visual", "lm_head"]
STUDENT_QUANTIZATION = BitsAndBytesConfig(
    load_in_4bit=True,
    bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.bfloat16,
    llm_int8_skip_modules=SKIP_MODULES,
)


RECIPE = dict(
    output_dir="Qwen2.5-VL-7B-Instruct-GNDPO-QLoRA",
    model_init_kwargs={"dtype": "bfloat16"},  # the student's modules that stay unquantized
    # The teacher is loaded from its name with these kwargs; the trainer turns a dict `quantization_config` into
    # a BitsAndBytesConfig (a JSON string works too, e.g. on the command line). It only runs forward passes.
    teacher_model_init_kwargs={
        "dtype": "bfloat16",
        "quantization_config": {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_compute_dtype": "bfloat16",
            "llm_int8_skip_modules": SKIP_MODULES,
        },
    },
    bf16=True,
    activation_checkpointing=True,
    # 8 prompts x 8 samples per generation batch, whitened together, one optimizer step each (on-policy).
    per_device_train_batch_size=8,
    gradient_accumulation_steps=8,
    num_generations=8,
    max_completion_length=1024,
    learning_rate=3e-3,  # LoRA's rate measured in benchmarks/QUALITY.md (docs/choosing.md); lower it if entropy falls
    num_train_epochs=1,
    logging_steps=1,
    save_steps=32,
)


def build_trainer(
    student: str = STUDENT, teacher: str = TEACHER, dataset=None, args: GNDPOConfig | None = None, **config_overrides
) -> GNDPOTrainer:
    """The trainer for this recipe: `args`, or `RECIPE` with `config_overrides` replacing any field (the tests pass
    CPU flags)."""
    return GNDPOTrainer(
        model=student,
        teacher_model=teacher,
        args=args if args is not None else GNDPOConfig(**{**RECIPE, **config_overrides}),
        train_dataset=load_prompts() if dataset is None else dataset,
        quantization_config=STUDENT_QUANTIZATION,  # GRPOTrainer loads the student in 4-bit from its name
        # LoRA on the language model only (the vision tower's MLP also has gate/up/down_proj); TRL keeps the adapter
        # weights in bf16 on a quantized base, as the QLoRA paper does.
        peft_config=LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules=r".*language_model.*\.(q|k|v|o|gate|up|down)_proj"
        ),
    )


def main(script_args: ScriptArguments, training_args: GNDPOConfig, student: str = STUDENT, teacher: str = TEACHER):
    dataset = load_prompts(script_args.dataset_name, script_args.dataset_train_split)
    trainer = build_trainer(student, teacher, dataset, args=training_args)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)  # the LoRA adapter; merge it into the bf16 (not the 4-bit) base
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")
    trainer.end()  # finish the trackers, as TRL's scripts do
    return trainer


def make_parser(prog: str | None = None) -> TrlParser:
    """Every `GNDPOConfig` field and `trl.ScriptArguments` as a flag, this recipe's values as defaults."""
    parser = TrlParser((ScriptArguments, GNDPOConfig), prog=prog)
    parser.set_defaults_with_config(dataset_name=DATASET, dataset_train_split="train[:1024]", **RECIPE)
    return parser


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())

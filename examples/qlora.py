"""QLoRA GNDPO on one GPU: a 4-bit Qwen2.5-VL-7B-Instruct student with LoRA, taught by a 4-bit Qwen2.5-VL-32B-Instruct.

    python examples/qlora.py

Weights take about 7 GB (student) + 20 GB (teacher) in 4-bit, so the run suits one 48 GB GPU; drop the teacher's
`quantization_config` for a bf16 teacher (65 GB, an 80 GB GPU with a smaller batch), or use `{"load_in_8bit": True}`.
Both models are Qwen2.5-VL: one tokenizer, one image layout. Data: Geometry3K, as in `qwen2_5_vl_lora.py`.
"""

import torch
from peft import LoraConfig
from qwen2_5_vl_lora import load_prompts  # Geometry3K as conversational prompts + images (run from examples/)
from transformers import BitsAndBytesConfig

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


def build_trainer(student: str = STUDENT, teacher: str = TEACHER, dataset=None, **config_overrides) -> GNDPOTrainer:
    """The trainer for this recipe; `config_overrides` replace any `GNDPOConfig` field (the tests pass CPU flags)."""
    config = dict(
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
        learning_rate=1e-5,  # LoRA: larger than the full fine-tune recipe's 1e-6
        num_train_epochs=1,
        logging_steps=1,
        save_steps=32,
    )
    config.update(config_overrides)
    return GNDPOTrainer(
        model=student,
        teacher_model=teacher,
        args=GNDPOConfig(**config),
        train_dataset=load_prompts() if dataset is None else dataset,
        quantization_config=STUDENT_QUANTIZATION,  # GRPOTrainer loads the student in 4-bit from its name
        # LoRA on the language model only (the vision tower's MLP also has gate/up/down_proj); TRL keeps the adapter
        # weights in bf16 on a quantized base, as the QLoRA paper does.
        peft_config=LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules=r".*language_model.*\.(q|k|v|o|gate|up|down)_proj"
        ),
    )


if __name__ == "__main__":
    trainer = build_trainer()
    trainer.train()
    trainer.save_model()  # the LoRA adapter; merge it into the bf16 (not the 4-bit) base model for inference

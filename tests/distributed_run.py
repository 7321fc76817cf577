"""Two-process GNDPO runs (launched by tests/test_distributed.py with torchrun on CPU).

`whitening` mode: each rank records what it handed to and got back from the whitening (local token signal and mask,
mean/variance used). `uniopd` mode (Uni-OPD margin shift per prompt group, groups split across the ranks): each rank
records the inputs and output of the margin shift and its final advantages. The test compares the ranks.
"""

import sys

import torch
import torch.distributed as dist
from tiny_models import cpu_grpo_kwargs, make_text_dataset, make_text_model, make_tokenizer

import trl_gndpo.functional as F
import trl_gndpo.uniopd as U
from trl_gndpo import GNDPOConfig, GNDPOTrainer

out_dir, mode = sys.argv[1], sys.argv[2]
records = []


def recording(function, name):
    def wrapper(*args, **kwargs):
        result = function(*args, **kwargs)
        records.append({"function": name, "args": [a for a in args if not callable(a)], "result": result})
        return result

    return wrapper


def parity_reward(completions, **kwargs):
    return [float(len(str(c)) % 2 == 0) for c in completions]


F.whitened_advantages = recording(F.whitened_advantages, "whitened_advantages")
U.margin_shift = recording(U.margin_shift, "margin_shift")
torch.set_num_threads(1)
options = {"margin_calibration": "shift", "num_generations": 4, "max_steps": 3} if mode == "uniopd" else {}
trainer = GNDPOTrainer(
    model=make_text_model(seed=0),
    teacher_model=make_text_model(seed=1, hidden_size=128),
    reward_funcs=parity_reward if mode == "uniopd" else None,
    args=GNDPOConfig(**cpu_grpo_kwargs(output_dir=f"{out_dir}/output", per_device_train_batch_size=2, **options)),
    train_dataset=make_text_dataset(),
    processing_class=make_tokenizer(),
)
assert dist.is_initialized() and trainer.accelerator.num_processes == 2, "expected two processes"
generate = trainer._generate_and_score_completions


def record_batch(inputs):
    batch = generate(inputs)
    records.append({"function": "batch", "advantages": batch["advantages"], "mask": batch["tool_mask"]})
    return batch


trainer._generate_and_score_completions = record_batch
trainer.train()
torch.save(records, f"{out_dir}/rank{trainer.accelerator.process_index}.pt")

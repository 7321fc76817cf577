"""Two-process GNDPO run (launched by tests/test_distributed.py with torchrun on CPU).

Each rank records what it handed to and got back from the whitening: its local token signal and mask, and the
mean/variance it used. The test then checks that both ranks used the same statistics and that they are those of the
concatenated batch.
"""

import sys

import torch
import torch.distributed as dist
from tiny_models import cpu_grpo_kwargs, make_text_dataset, make_text_model, make_tokenizer

import trl_gndpo.functional as F
from trl_gndpo import GNDPOConfig, GNDPOTrainer

out_dir = sys.argv[1]
records = []
whitened_advantages = F.whitened_advantages


def recording_whitened_advantages(signal, mask, eps=1e-8, all_reduce_sum=None):
    advantages, mean, var = whitened_advantages(signal, mask, eps, all_reduce_sum)
    records.append({"signal": signal, "mask": mask, "advantages": advantages, "mean": mean, "var": var})
    return advantages, mean, var


F.whitened_advantages = recording_whitened_advantages
torch.set_num_threads(1)
trainer = GNDPOTrainer(
    model=make_text_model(seed=0),
    teacher_model=make_text_model(seed=1, hidden_size=128),
    args=GNDPOConfig(**cpu_grpo_kwargs(output_dir=f"{out_dir}/output", per_device_train_batch_size=2)),
    train_dataset=make_text_dataset(),
    processing_class=make_tokenizer(),
)
assert dist.is_initialized() and trainer.accelerator.num_processes == 2, "expected two processes"
trainer.train()
torch.save(records, f"{out_dir}/rank{trainer.accelerator.process_index}.pt")

"""Two-process GNDPO runs (launched by tests/test_distributed.py with torchrun on CPU).

`whitening` mode: each rank records what it handed to and got back from the whitening (local token signal and mask,
mean/variance used). `uniopd` mode (Uni-OPD margin shift per prompt group, groups split across the ranks): each rank
records the inputs and output of the margin shift and its final advantages. `vgs` mode (Visual Gradient Steering on a
tiny Qwen2-VL, GRPO + VGS): each rank records its local VDS, the values its quantiles were taken over, the thresholds,
its gates and the measured eta. `papers` mode (prompt-group masking, TIP entropy sampling and the vOPD top-k baseline
together): each rank records the group-mask decisions and its batches. `teachers` mode (two teachers routed by the
dataset's `teacher` column): each rank records its rows' teacher names and the teacher log-probs it scored, and its
logged metrics. `server` mode (the teacher served at `$GNDPO_TEACHER_SERVER_URL`, tests/test_teacher_server.py): each
rank records the token scores of its share. The tests compare the ranks.

`python distributed_run.py OUT_DIR MODE [MODE ...]` runs the modes one after the other in the same two processes.
"""

import os
import sys

import torch
import torch.distributed as dist
from tiny_models import (
    cpu_grpo_kwargs,
    make_image_dataset,
    make_text_dataset,
    make_text_model,
    make_tokenizer,
    make_vlm,
)

import trl_gndpo.functional as F
import trl_gndpo.uniopd as U
import trl_gndpo.vgs as V
from trl_gndpo import GNDPOConfig, GNDPOTrainer

records = []


def recording(function, name):
    def wrapper(*args, **kwargs):
        result = function(*args, **kwargs)
        records.append({"function": name, "args": [a for a in args if not callable(a)], "result": result})
        return result

    return wrapper


def parity_reward(completions, **kwargs):
    return [float(len(str(c)) % 2 == 0) for c in completions]


def run(out_dir: str, mode: str) -> None:
    """Train in `mode` and save this rank's records to `{out_dir}/{mode}-rank{r}.pt`."""
    records.clear()
    options = {"margin_calibration": "shift", "num_generations": 4, "max_steps": 3} if mode == "uniopd" else {}
    if mode == "papers":
        options = {
            "margin_calibration": "group_mask",
            "margin_mode": "minmax",
            "margin_delta": 0.3,
            "num_generations": 4,
        }
        options.update(token_selection="entropy_sampling", value_baseline=True, value_baseline_top_k=8, max_steps=3)
    if mode == "vgs":
        options = {"visual_gradient_steering": True, "vgs_adaptive_gamma": True, "vgs_eta_measure_steps": 1}
        options["vgs_mode"] = "grpo"  # GRPO + VGS: the outcome advantage in the policy-gradient term
        (student, processor), (teacher, _) = make_vlm(seed=0), make_vlm(seed=1, hidden_size=128)
        dataset = make_image_dataset()
    else:
        student, teacher = make_text_model(seed=0), make_text_model(seed=1, hidden_size=128)
        processor, dataset = make_tokenizer(), make_text_dataset()
    if mode == "teachers":
        teacher = {"a": make_text_model(seed=1, hidden_size=128), "b": make_text_model(seed=2, num_hidden_layers=3)}
        dataset, options = dataset.add_column("teacher", ["a", "b"] * 4), {"max_steps": 3}
    if mode == "server":
        teacher, options = None, {"teacher_model_server_url": os.environ["GNDPO_TEACHER_SERVER_URL"]}
    trainer = GNDPOTrainer(
        model=student,
        teacher_model=teacher,
        reward_funcs=parity_reward if mode in ("uniopd", "papers", "vgs") else None,
        args=GNDPOConfig(**cpu_grpo_kwargs(output_dir=f"{out_dir}/{mode}", per_device_train_batch_size=2, **options)),
        train_dataset=dataset,
        processing_class=processor,
    )
    assert dist.is_initialized() and trainer.accelerator.num_processes == 2, "expected two processes"
    generate = trainer._generate_and_score_completions

    def record_batch(inputs):
        batch = generate(inputs)
        record = {"function": "batch", "advantages": batch["advantages"], "mask": batch["loss_mask"]}
        record["completion_mask"] = batch["completion_mask"]
        record.update({k: batch[k] for k in ("vgs_lp_gate", "vgs_gamma") if k in batch})
        records.append(record)
        return batch

    trainer._generate_and_score_completions = record_batch
    score_tokens = trainer._score_tokens

    def record_scores(batch, inputs, mode):
        scores = score_tokens(batch, inputs, mode)
        ids = {k: batch[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
        names = [x.get("teacher") for x in inputs]
        records.append(
            {"function": "scores", "student": scores["student"], "teacher": scores["teacher"], "names": names, **ids}
        )
        return scores

    trainer._score_tokens = record_scores
    trainer.train()
    records.append({"function": "log_history", "result": trainer.state.log_history})
    eta = (None, None) if trainer.steering is None else (trainer.steering.eta, trainer.steering.eta_samples)
    records.append({"function": "eta", "result": eta[0], "samples": eta[1]})
    student = trainer.accelerator.unwrap_model(trainer.model)
    records.append({"function": "weights", "result": {n: p.detach().clone() for n, p in student.named_parameters()}})
    torch.save(records, f"{out_dir}/{mode}-rank{trainer.accelerator.process_index}.pt")


F.whitened_advantages = recording(F.whitened_advantages, "whitened_advantages")
U.margin_shift = recording(U.margin_shift, "margin_shift")
U.margin_group_mask = recording(U.margin_group_mask, "margin_group_mask")
V.visual_dependency_scores = recording(V.visual_dependency_scores, "visual_dependency_scores")
V.quantile_thresholds = recording(V.quantile_thresholds, "quantile_thresholds")
torch.set_num_threads(1)
for mode in sys.argv[2:]:  # one launch runs every mode the tests ask for: a launch costs more than a run
    run(sys.argv[1], mode)

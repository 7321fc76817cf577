"""DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 on two CPU processes (gloo), launched as a user does: `accelerate launch` with
the project's own config (examples/accelerate/*.yaml) and command-line overrides for a CPU machine
(`--num_processes 2`, `--mixed_precision no` except in the bf16 launch; the training arguments say `use_cpu=True`).

One launch per engine runs several tiny trainings (tests/engine_run.py says which) and saves what each rank saw.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import make_text_model

TESTS = Path(__file__).parent
CONFIGS = TESTS.parent / "examples" / "accelerate"
ENGINES = {"zero2": "zero2.yaml", "zero3": "zero3.yaml", "fsdp2": "fsdp2.yaml", "zero3_bf16": "zero3.yaml"}
RUNS = {"zero2": ("base", "vgs"), "zero3": ("base", "resumed", "full", "lora"), "fsdp2": ("base", "lora")}
RUNS["zero3_bf16"] = ("base",)
TEACHER_HEAD, STUDENT_HEAD = (320, 128), (320, 64)  # vocabulary rows x hidden size of the tiny teacher / student

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """`launch(engine)`: `accelerate launch --config_file examples/accelerate/<engine>.yaml`, two CPU processes, once
    per engine for this module; both ranks' records."""
    launched = {}

    def records(engine: str) -> list[dict]:
        if engine not in launched:
            out_dir = tmp_path_factory.mktemp(engine)
            path = os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
            precision = [] if engine.endswith("bf16") else ["--mixed_precision", "no"]  # else the config's bf16
            command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                       str(CONFIGS / ENGINES[engine]), "--num_processes", "2", *precision, "--main_process_port", "0",
                       str(TESTS / "engine_run.py"), str(out_dir), engine]  # fmt: skip
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
            launched[engine] = [torch.load(out_dir / f"{engine}_rank{r}.pt", weights_only=False) for r in range(2)]
        return launched[engine]

    return records


@pytest.fixture(params=list(ENGINES))
def engine(request, launch):
    return request.param, launch(request.param)


def runs(engine, names=None):
    name, ranks = engine
    for run in names or RUNS[name]:
        yield run, ranks[0][run], ranks[1][run]


def initial_student() -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in make_text_model(seed=0).named_parameters()}


def test_student_is_wrapped_by_the_engine_and_the_teacher_prepared_like_trls_reference(engine):
    name, _ = engine
    for run, record, _ in runs(engine):
        facts = record["after"]
        assert facts["num_processes"] == 2 and not facts["ddp"], run
        assert facts["teacher_trainable"] == 0 and not facts["teacher_training"], run
        if name == "fsdp2":
            assert facts["distributed_type"] == "DistributedType.FSDP"
            assert facts["fsdp2"] == [True, True] and facts["student"].startswith("FSDP"), run
        else:
            assert facts["distributed_type"] == "DistributedType.DEEPSPEED"
            assert facts["student"] == facts["teacher"] == "DeepSpeedEngine", run
        if name == "zero2":  # trl.models.prepare_deepspeed: below ZeRO-3 the teacher is a full copy, ZeRO disabled
            assert facts["stages"] == [2, 0] and facts["ds_params"] == [False, False], run
            assert facts["student_held"] == facts["teacher_held"] == 1.0, run
        else:  # ZeRO-3 and FSDP2 shard both models: each rank stores about half of every model
            assert name == "fsdp2" or (facts["stages"] == [3, 3] and facts["ds_params"] == [True, True]), run
            assert 0.45 < facts["student_held"] < 0.6 and 0.45 < facts["teacher_held"] < 0.6, run
        # the teacher is prepared in the trainer's constructor, the student by the engine when training starts
        assert record["before"]["teacher"] == facts["teacher"] and record["before"]["student_held"] == 1.0


def test_teacher_scores_through_the_fused_head_stays_frozen_and_no_logits_are_materialised(engine):
    for run, record, other in runs(engine):
        kernel_heads = {call["head"] for call in record["kernel"]}
        assert kernel_heads == {TEACHER_HEAD, STUDENT_HEAD}, run  # whole heads, gathered from shards
        assert record["heads"]["teacher"] == [], f"{run}: the teacher's vocabulary head ran outside the fused kernel"
        assert record["heads"]["student"] and all(shape[1] == 1 for shape in record["heads"]["student"]), (
            f"{run}: the student's head produced logits for more than the next token: {record['heads']['student']}"
        )
        for name, before in record["teacher_before"].items():
            assert torch.equal(before, record["teacher_after"][name]), f"{run}: teacher {name} changed"
            assert torch.equal(before, other["teacher_after"][name]), f"{run}: teacher {name} differs across ranks"


def test_ranks_share_the_whitening_statistics_and_end_with_identical_weights(engine):
    initial = initial_student()
    for run, record, other in runs(engine):
        steps = len(record["whitening"])
        assert steps == len(other["whitening"]) == record["steps"] - (2 if run == "resumed" else 0), run
        for mine, theirs in zip(record["whitening"], other["whitening"], strict=True):
            assert torch.equal(mine["mean"], theirs["mean"]) and torch.equal(mine["var"], theirs["var"]), run
            signal = torch.cat([mine["signal"][mine["mask"]], theirs["signal"][theirs["mask"]]]).double()
            torch.testing.assert_close(mine["mean"].double(), signal.mean())
            torch.testing.assert_close(mine["var"].double(), signal.var())
            assert not torch.equal(mine["signal"], theirs["signal"]), f"{run}: both ranks scored the same tokens"
        weights, theirs = record["student"], other["student"]
        assert all(torch.equal(weights[n], theirs[n]) for n in weights), f"{run}: ranks end with different weights"
        if run in ("base", "full", "resumed"):
            assert max((weights[n] - initial[n]).abs().max().item() for n in initial) > 1e-3, f"{run}: nothing moved"


def test_lora_under_zero3_and_fsdp2_trains_only_the_adapter(launch):
    initial = initial_student()
    for name in ("zero3", "fsdp2"):
        (_, record, other), = runs((name, launch(name)), ["lora"])  # fmt: skip
        weights = record["student"]
        adapters = [n for n in weights if "lora_B" in n]
        assert adapters and all(weights[n].abs().max() > 0 for n in adapters), f"{name}: LoRA B stayed at zero"
        for n, value in weights.items():
            base = n.removeprefix("base_model.model.").replace(".base_layer", "")
            if "lora_" not in n:
                assert torch.equal(value, initial[base]), f"{name}: frozen base weight {n} changed"


def test_vgs_under_zero2_measures_the_same_eta_on_both_ranks(launch):
    (_, record, other), = runs(("zero2", launch("zero2")), ["vgs"])  # fmt: skip
    assert record["eta"] == other["eta"] and 0.0 < record["eta"] < 1.0  # measured once, averaged over the ranks
    assert record["heads"]["student"] and all(shape[1] == 1 for shape in record["heads"]["student"])


def test_zero3_checkpoint_resumes_to_the_uninterrupted_run(launch):
    ranks = launch("zero3")
    for rank in ranks:
        interrupted, resumed, full = rank["base"], rank["resumed"], rank["full"]
        assert (interrupted["steps"], resumed["steps"], full["steps"]) == (2, 4, 4)
        for a, b in zip(interrupted["whitening"] + resumed["whitening"], full["whitening"], strict=True):
            assert torch.equal(a["signal"], b["signal"]) and torch.equal(a["mean"], b["mean"])
        assert all(torch.equal(resumed["student"][n], full["student"][n]) for n in full["student"])


def test_the_engines_compute_the_same_update(launch):
    """Same data, seeds and two steps: ZeRO-2, ZeRO-3 (its interrupted run, stopped at step 2 under a constant
    learning rate) and FSDP2 end with the same weights up to float32 reduction order, far closer than the update."""
    weights = {e: launch(e)[0]["base"]["student"] for e in ("zero2", "zero3", "fsdp2")}
    initial = initial_student()
    for engine in ("zero3", "fsdp2"):
        for n, value in weights[engine].items():
            torch.testing.assert_close(value, weights["zero2"][n], rtol=0, atol=1e-4, msg=f"{engine} {n}")
    assert max((weights["zero2"][n] - initial[n]).abs().max().item() for n in initial) > 1e-2


def test_zero3_in_bf16_keeps_the_token_signal_statistics_and_loss_in_float32(launch):
    """The config's bf16 (DeepSpeed holds student and teacher in bf16): the models run in bf16, GNDPO's token signal,
    advantages and loss stay float32, the whitening statistics float64, and training leaves finite weights."""
    for rank in launch("zero3_bf16"):
        record = rank["base"]
        assert {(call["dtype"], call["weight"]) for call in record["kernel"]} == {(torch.bfloat16, torch.bfloat16)}
        for call in record["whitening"]:
            assert call["signal"].dtype == call["advantages"].dtype == torch.float32
            assert call["mean"].dtype == call["var"].dtype == torch.float64
        assert record["loss_dtypes"] and set(record["loss_dtypes"]) == {torch.float32}
        assert all(value.dtype == torch.bfloat16 for value in record["student"].values())
        assert all(torch.isfinite(value).all() for value in record["student"].values())

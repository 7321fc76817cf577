"""Bad and awkward inputs (issue 13): each fails early with an error naming the row, field or file and what to change,
or is reported and survived as documented in docs/bad-inputs.md, whose table names the test of every case (the last
test here keeps table and tests in step)."""

import io
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import PIL.Image
import PIL.ImageFile
import pytest
import torch
from datasets import Dataset
from helpers import build_text_trainer as build
from tiny_models import (
    _trained_bpe,
    make_image_dataset,
    make_text_dataset,
    make_text_model,
    make_tokenizer,
    make_vlm,
    save_tiny,
)
from transformers import AutoModelForCausalLM, Qwen2Tokenizer
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from trl_gndpo import GNDPOConfig, GNDPOTrainer, checks
from trl_gndpo.invalid_batches import InvalidBatchGuard
from trl_gndpo.vgs_steering import Steering

ROOT = Path(__file__).resolve().parent.parent


def build_vlm(cpu_config_kwargs, dataset, config=None):
    student, processor = make_vlm("qwen2_vl")
    teacher, _ = make_vlm("qwen2_vl", seed=1)
    return build(
        cpu_config_kwargs,
        config,
        model=student,
        teacher_model=teacher,
        processing_class=processor,
        train_dataset=dataset,
    )


def with_row(dataset: Dataset, column: str, row: int, value) -> Dataset:
    """`dataset` with `dataset[row][column]` replaced by `value` (same features)."""
    rows = dataset.to_dict()
    rows[column][row] = value
    return Dataset.from_dict(rows, features=dataset.features)


# ---------------------------------------------------------------------------------------------------------------------
# Dataset size


def test_empty_training_dataset(cpu_config_kwargs):
    with pytest.raises(ValueError, match=r"has 0 prompts, fewer than one generation batch takes \(2 = "):
        build(cpu_config_kwargs, train_dataset=Dataset.from_dict({"prompt": []}))


def test_training_dataset_smaller_than_one_generation_batch(cpu_config_kwargs):
    # 4 completions per generation batch / 2 generations = 2 prompts; with steps_per_generation=2 it takes 4
    with pytest.raises(ValueError, match=r"has 3 prompts, fewer than one generation batch takes \(4 = .*steps_per_"):
        build(cpu_config_kwargs, {"steps_per_generation": 2}, train_dataset=make_text_dataset(3))
    build(cpu_config_kwargs, {"steps_per_generation": 2}, train_dataset=make_text_dataset(4))  # one batch: fine


def test_empty_eval_dataset(cpu_config_kwargs):
    with pytest.raises(ValueError, match="evaluation dataset is empty"):
        build(cpu_config_kwargs, eval_dataset=Dataset.from_dict({"prompt": []}))


# ---------------------------------------------------------------------------------------------------------------------
# Prompts

_CONVERSATION = [{"role": "user", "content": "What is 1 + 1?"}]


@pytest.mark.parametrize(
    "prompts, detail",
    [
        (["Say hi.", "Count.", "", "Add."], "empty or blank string"),
        (["Say hi.", "Count.", "  \n", "Add."], "empty or blank string"),
        (["Say hi.", "Count.", None, "Add."], "None"),
        ([1, 2, 3, 4], "a int, not a string or a list of messages"),
        ([_CONVERSATION, _CONVERSATION, [], _CONVERSATION], "empty conversation"),
        ([_CONVERSATION, _CONVERSATION, [{"role": "user", "content": ""}], _CONVERSATION], "no text in any message"),
        ([_CONVERSATION, _CONVERSATION, None, _CONVERSATION], "None"),
        ([["Say hi."]] * 4, "message 0 is not a {'role': ..., 'content': ...} dict"),
    ],
)
def test_unusable_prompts(prompts, detail, cpu_config_kwargs):
    count, row = (4, 0) if detail.startswith(("a int", "message 0")) else (1, 2)
    with pytest.raises(ValueError, match=rf"cannot use: {count} have an unusable `prompt`, at rows {row} "):
        build(cpu_config_kwargs, train_dataset=Dataset.from_dict({"prompt": prompts}))
    with pytest.raises(ValueError, match=re.escape(f"at rows {row} ({detail})")):
        build(cpu_config_kwargs, train_dataset=Dataset.from_dict({"prompt": prompts}))


# ---------------------------------------------------------------------------------------------------------------------
# Images


def truncated_jpeg() -> bytes:
    """A JPEG cut in half: it opens and passes PIL's `verify`, and fails when decoded."""
    noise = torch.randint(0, 256, (128, 128, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    PIL.Image.fromarray(noise.numpy()).save(buffer, format="JPEG")  # noise: the pixel data outweighs the headers
    data = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    with PIL.Image.open(io.BytesIO(data)) as opened:
        opened.verify()  # the old check's test: it passes
    return data


def png(image: PIL.Image.Image) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("image", None, r"1 have no image in column 'image' \(None or an empty list\), at rows 2\b"),
        ("images", [], r"1 have no image in column 'images' \(None or an empty list\), at rows 2\b"),
        ("images", [None], r"1 have no image in column 'images'.*at rows 2\b"),
        (
            "image",
            {"bytes": truncated_jpeg(), "path": None},
            r"1 images of column 'image' cannot be decoded, at rows 2 ",
        ),
        ("image", png(PIL.Image.new("RGB", (402, 2))), r"aspect ratio over 200 .*, at rows 2 \(402x2\)"),
    ],
)
def test_unusable_images(column, value, message, cpu_config_kwargs):
    dataset = with_row(make_image_dataset(4, column=column), column, 2, value)
    with pytest.raises(ValueError, match=message):
        build_vlm(cpu_config_kwargs, dataset)


def test_the_processor_refuses_what_the_image_check_refuses():
    """The two image cases the old check let through fail in the Qwen-VL processor itself, late."""
    _, processor = make_vlm("qwen2_vl")
    with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
        processor.image_processor(PIL.Image.new("RGB", (402, 2)))
    with pytest.raises(OSError, match="truncated"):
        processor.image_processor(PIL.Image.open(io.BytesIO(truncated_jpeg())))


def test_image_check_reads_rows_lazily_and_can_be_limited(monkeypatch):
    """`check_rows` never reads a whole column, and `max_rows` bounds the images it decodes."""
    dataset = with_row(make_image_dataset(8), "image", 5, {"bytes": b"not an image", "path": None})
    whole_column = Dataset.__getitem__

    def refuse_whole_columns(self, key):
        if isinstance(key, str):
            raise AssertionError(f"read the whole column {key!r}")
        return whole_column(self, key)

    monkeypatch.setattr(Dataset, "__getitem__", refuse_whole_columns)
    decoded = []
    load = PIL.ImageFile.ImageFile.load
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", lambda image: decoded.append(image.size) or load(image))

    checks.check_rows(dataset, "train_dataset", max_rows=5)  # rows 0-4 are fine
    assert len(decoded) == 5
    with pytest.raises(ValueError, match=r"checked the first 6 of 8 rows: max_checked_rows.*at rows 5 \("):
        checks.check_rows(dataset, "train_dataset", max_rows=6)
    with pytest.raises(ValueError, match=r"cannot be decoded, at rows 5 \("):
        checks.check_rows(dataset, "train_dataset")
    with pytest.raises(ValueError, match=r"cannot be decoded, at rows 2 \("):  # rows as the user's view numbers them
        checks.check_rows(dataset.select(range(7, -1, -1)), "train_dataset")


def test_max_checked_rows_reaches_the_check(cpu_config_kwargs):
    dataset = Dataset.from_dict({"prompt": ["Say hi.", "Count.", "Add.", ""]})
    with pytest.raises(ValueError, match=r"at rows 3 \(empty"):
        build(cpu_config_kwargs, train_dataset=dataset)
    build(cpu_config_kwargs, {"max_checked_rows": 3}, train_dataset=dataset)  # row 3 is not checked


# ---------------------------------------------------------------------------------------------------------------------
# Generation batches without a valid token


def nan_teacher():
    teacher = make_text_model(seed=1)
    with torch.no_grad():
        teacher.lm_head.weight.fill_(float("nan"))
    return teacher


def test_a_run_without_valid_tokens_logs_no_averages_and_keeps_finite_weights(cpu_config_kwargs):
    trainer = build(cpu_config_kwargs, teacher_model=nan_teacher())  # 2 steps < max_invalid_generation_batches=3
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "gndpo/valid_token_frac" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert entry["gndpo/valid_token_frac"] == 0.0 and entry["gndpo/nonfinite_frac"] == 1.0
        assert not {"gndpo/teacher_logp", "gndpo/reverse_kl", "gndpo/advantage_std"} & entry.keys()
        assert entry["entropy"] is None and entry["clip_ratio/region_mean"] is None  # nothing to average: not 0
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_consecutive_batches_without_valid_tokens_stop_training(cpu_config_kwargs):
    # max_prompt_length=1 masks every completion (every prompt is longer)
    config = {"max_prompt_length": 1, "max_steps": 5, "max_invalid_generation_batches": 2}
    trainer = build(cpu_config_kwargs, config)
    with pytest.raises(RuntimeError, match="2 consecutive generation batches had no valid completion token .every "):
        trainer.train()
    assert trainer.state.global_step == 1
    trainer = build(
        cpu_config_kwargs, {"max_steps": 5, "max_invalid_generation_batches": 2}, teacher_model=nan_teacher()
    )
    with pytest.raises(RuntimeError, match="non-finite log-prob"):
        trainer.train()


def test_invalid_batch_guard_counts_consecutive_batches():
    guard = InvalidBatchGuard(limit=2)
    guard.update(n_tokens=10, n_finite=10, n_valid=0)
    guard.update(n_tokens=10, n_finite=10, n_valid=4)  # a valid batch resets the count
    guard.update(n_tokens=10, n_finite=10, n_valid=0)
    with pytest.raises(RuntimeError, match="token filters"):
        guard.update(n_tokens=10, n_finite=10, n_valid=0)
    never = InvalidBatchGuard(limit=None)
    for _ in range(10):
        never.update(0, 0, 0)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tiny_models import cpu_grpo_kwargs

    output = tmp_path_factory.mktemp("run")
    config = GNDPOConfig(**cpu_grpo_kwargs(output_dir=str(output), max_steps=1, save_strategy="steps", save_steps=1))
    trainer = GNDPOTrainer(
        model=make_text_model(seed=0),
        teacher_model=make_text_model(seed=1),
        args=config,
        train_dataset=make_text_dataset(),
        processing_class=make_tokenizer(),
    )
    trainer.train()
    return output / "checkpoint-1"


@pytest.mark.parametrize(
    "removed, reset",
    [
        (None, None),
        ("optimizer.pt", "optimizer.pt (the optimizer's moments and the learning-rate schedule restart"),
        ("scheduler.pt", "scheduler.pt (the optimizer's moments and the learning-rate schedule restart"),
        ("rng_state.pth", "rng_state.pth (random states start fresh"),
    ],
)
def test_resume_from_a_checkpoint_missing_a_part(removed, reset, checkpoint, tmp_path, cpu_config_kwargs):
    partial = shutil.copytree(checkpoint, tmp_path / "checkpoint-1")
    if removed:
        (partial / removed).unlink()
    trainer = build(cpu_config_kwargs, {"max_steps": 2})
    with CaptureLogger(logging.get_logger("trl_gndpo.resume")) as captured:
        trainer.train(resume_from_checkpoint=str(partial))
    assert trainer.state.global_step == 2
    if removed is None:
        assert "lacks" not in captured.out
    else:
        assert f"Resuming from {partial}, which lacks {reset}" in captured.out


def test_resume_from_a_checkpoint_without_trainer_state(checkpoint, tmp_path, cpu_config_kwargs):
    """Already an error in Trainer (no GNDPO code involved), naming the file."""
    partial = shutil.copytree(checkpoint, tmp_path / "checkpoint-1")
    (partial / "trainer_state.json").unlink()
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        build(cpu_config_kwargs, {"max_steps": 2}).train(resume_from_checkpoint=str(partial))


def SteeringStub(measure_steps: int) -> Steering:
    """VGS's checkpoint loading on its own (no trainer, no models): eta 1.0 from the config."""
    args = SimpleNamespace(vgs_eta=1.0, vgs_eta_measure_steps=measure_steps)
    return Steering(args, None, None, 0, None, None, None)


def test_vgs_eta_checkpoint_missing_or_corrupt(tmp_path):
    with pytest.raises(ValueError, match=r"has no vgs_eta.json, so the eta measured over the first 2 steps is lost"):
        SteeringStub(measure_steps=2).load(str(tmp_path))
    fixed = SteeringStub(measure_steps=0)  # eta comes from the config: nothing lost
    fixed.load(str(tmp_path))
    assert fixed.eta == 1.0
    path = tmp_path / "vgs_eta.json"
    for content, error in [("{not json", "JSONDecodeError"), ('{"eta": 0.4}', "KeyError"), ("[0.4]", "TypeError")]:
        path.write_text(content)
        with pytest.raises(ValueError, match=rf"vgs_eta.json is corrupt \({error}"):
            SteeringStub(measure_steps=2).load(str(tmp_path))
    path.write_text('{"eta": NaN, "samples": []}')
    with pytest.raises(ValueError, match="must be a positive finite number"):
        SteeringStub(measure_steps=2).load(str(tmp_path))
    path.write_text(json.dumps({"eta": 0.4, "samples": [0.3, 0.5]}))
    loaded = SteeringStub(measure_steps=2)
    loaded.load(str(tmp_path))
    assert (loaded.eta, loaded.eta_samples) == (0.4, [0.3, 0.5])


# ---------------------------------------------------------------------------------------------------------------------
# Teacher tokenizer


def swapped_tokenizer() -> Qwen2Tokenizer:
    """The tiny tokenizer with two tokens' ids swapped: same size, other vocabulary."""
    vocab_json, merges_json = _trained_bpe()
    vocab = json.loads(vocab_json)
    a, b = list(vocab)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[tuple(m) for m in json.loads(merges_json)],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )


def test_teacher_object_saved_with_another_tokenizer_of_the_same_size(tmp_path, cpu_config_kwargs):
    path = save_tiny(make_text_model(seed=1), swapped_tokenizer(), tmp_path / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(path)  # an object, without teacher_processing_class
    with pytest.raises(ValueError, match="tokenizer differs from the student's"):
        build(cpu_config_kwargs, teacher_model=teacher)
    same = save_tiny(make_text_model(seed=1), make_tokenizer(), tmp_path / "same")
    build(cpu_config_kwargs, teacher_model=AutoModelForCausalLM.from_pretrained(same))


def test_teacher_saved_without_tokenizer_files(tmp_path, cpu_config_kwargs):
    path = tmp_path / "teacher"
    make_text_model(seed=1).save_pretrained(path)
    with CaptureLogger(logging.get_logger("trl_gndpo.scoring_models")) as captured:
        build(cpu_config_kwargs, teacher_model=str(path))  # used to fail: "differs (1 vs 320 tokens)"
    assert f"The teacher's folder {str(path)!r} has no tokenizer files" in captured.out


def test_teacher_object_built_in_memory_is_checked_by_size_with_a_warning(cpu_config_kwargs):
    with CaptureLogger(logging.get_logger("trl_gndpo.checks")) as captured:
        build(cpu_config_kwargs)
    assert "No teacher tokenizer was given or found with the teacher" in captured.out


# ---------------------------------------------------------------------------------------------------------------------
# The table in docs/bad-inputs.md


def test_every_test_named_in_the_bad_input_table_exists():
    table = (ROOT / "docs" / "bad-inputs.md").read_text()
    named = re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", table)
    assert len(named) >= 20
    for path, name in named:
        source = (ROOT / path).read_text()
        assert re.search(rf"^def {name}\(", source, re.M), f"{path}::{name} is named in docs/bad-inputs.md"
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| Bad input")]
    assert all("`tests/" in row for row in rows if not set(row) <= set("|- ")), "every row names its test"

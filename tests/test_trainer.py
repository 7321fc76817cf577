"""End-to-end GNDPO training on tiny offline models: text and Qwen-VL students, full fine-tune, LoRA and QLoRA.

Each run checks what the trainer must guarantee: the student moves, the teacher does not, and the advantages handed
to the loss are the whitened (or, with scope "none", the raw clamped) teacher-minus-student log-ratio, recomputed
here independently from plain logits in float64.
"""

import math

import pytest
import torch
from peft import LoraConfig
from tiny_models import (
    VLM_FAMILIES,
    frozen_fingerprint,
    load_tiny_4bit,
    make_image_dataset,
    make_text_dataset,
    make_text_model,
    make_tokenizer,
    make_vlm,
    same_fingerprint,
    save_tiny,
)
from trl import GRPOTrainer

from trl_gndpo import GNDPOConfig, GNDPOTrainer

IMAGE_KEYS = ("pixel_values", "image_grid_thw", "mm_token_type_ids")


def reference_logps(model, batch):
    """log p(y_t) of the completion tokens from the model's plain logits, in float64."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    extra = {k: batch[k] for k in IMAGE_KEYS if k in batch}
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention_mask, **extra).logits.double()
    length = batch["completion_ids"].size(1)
    logps = logits[:, -length - 1 : -1].log_softmax(-1)
    return logps.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)


def expected_advantages(student_logps, teacher_logps, mask, config):
    """GNDPO's advantage from its definition (docs/method.md, arXiv 2606.09091), in float64, single process."""
    r = (teacher_logps - student_logps).clamp(-config.token_signal_clamp, config.token_signal_clamp)
    if config.normalization_scope == "none":
        return r * mask
    values = r[mask.bool()]
    return (r - values.mean()) / torch.sqrt(values.var(unbiased=True) + config.whitening_eps) * mask


def record_batches(trainer):
    """Wrap the generation step: keep each batch with the student/teacher reference log-probs at generation time."""
    records = []
    generate = trainer._generate_and_score_completions

    def spy(inputs):
        batch = generate(inputs)
        student = trainer.accelerator.unwrap_model(trainer.model)
        records.append((batch, reference_logps(student, batch), reference_logps(trainer.teacher_model, batch)))
        return batch

    trainer._generate_and_score_completions = spy
    return records


def snapshot(model):
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def changed(before, model, names=None):
    after = snapshot(model)
    return [n for n in (names or before) if not torch.equal(before[n], after[n])]


def check_advantages(records, config, unit_variance=True):
    assert records, "no generation batch was recorded"
    for batch, student_logps, teacher_logps in records:
        mask = batch["completion_mask"].double()
        assert mask.sum() > 1
        advantages = batch["advantages"].double()
        assert advantages.shape == batch["completion_ids"].shape
        expected = expected_advantages(student_logps, teacher_logps, mask, config)
        torch.testing.assert_close(advantages, expected, rtol=1e-4, atol=1e-4)
        if config.normalization_scope == "global" and unit_variance:
            valid = advantages[mask.bool()]
            assert valid.mean().item() == pytest.approx(0.0, abs=1e-5)
            assert valid.var().item() == pytest.approx(1.0, rel=1e-3)
        assert (advantages[~mask.bool()] == 0).all()


def run(trainer, teacher):
    records = record_batches(trainer)
    student_before, teacher_before = snapshot(trainer.model), frozen_fingerprint(teacher)
    trainer.train()
    assert same_fingerprint(teacher_before, frozen_fingerprint(teacher)), "the teacher must stay frozen"
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for p in trainer.model.parameters():
        assert torch.isfinite(p.float()).all()
    return records, student_before


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@pytest.mark.parametrize("scope", ["global", "none"])
def test_text_full_finetune(family, scope, cpu_config_kwargs):
    student, teacher = make_text_model(family, seed=0), make_text_model(family, seed=1, hidden_size=128)
    config = GNDPOConfig(**cpu_config_kwargs(normalization_scope=scope))
    trainer = GNDPOTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=make_text_dataset(),
        processing_class=make_tokenizer(),
        teacher_processing_class=make_tokenizer(),
    )
    records, before = run(trainer, teacher)
    assert len(records) == 2
    assert changed(before, trainer.model), "the student did not train"
    check_advantages(records, config)
    logs = trainer.state.log_history[0]
    for name in (
        "reverse_kl",
        "teacher_logp",
        "student_logp",
        "signal_mean",
        "signal_std",
        "clamped_frac",
        "advantage_mean",
        "advantage_std",
        "advantage_abs_max",
    ):
        assert math.isfinite(logs[f"gndpo/{name}"]), name
    assert logs["gndpo/teacher_logp"] < 0 and logs["gndpo/student_logp"] < 0
    assert logs["gndpo/reverse_kl"] == pytest.approx(logs["gndpo/student_logp"] - logs["gndpo/teacher_logp"])
    assert not any(key.startswith("reward") for key in logs), "placeholder reward metrics must be dropped"


def test_lora_trains_only_the_adapter(cpu_config_kwargs):
    student, teacher = make_text_model(seed=0), make_text_model(seed=1)
    config = GNDPOConfig(**cpu_config_kwargs(learning_rate=5e-2))
    trainer = GNDPOTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=make_text_dataset(),
        processing_class=make_tokenizer(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    records, before = run(trainer, teacher)
    moved = changed(before, trainer.model)
    assert moved and all("lora_" in name for name in moved)
    check_advantages(records, config)


def test_qlora_student_and_4bit_teacher_from_path(tmp_path, cpu_config_kwargs):
    """A 4-bit student with LoRA, and a teacher loaded by path in 4-bit through teacher_model_init_kwargs."""
    tokenizer = make_tokenizer()
    save_tiny(make_text_model(seed=0), tokenizer, tmp_path / "student")
    save_tiny(make_text_model(seed=1, hidden_size=128), tokenizer, tmp_path / "teacher")
    student = load_tiny_4bit(tmp_path / "student")
    config = GNDPOConfig(
        **cpu_config_kwargs(learning_rate=5e-2),
        teacher_model_init_kwargs={
            "quantization_config": {"load_in_4bit": True, "bnb_4bit_compute_dtype": "float32"},
            "device_map": "cpu",
        },
    )
    trainer = GNDPOTrainer(
        model=student,
        teacher_model=str(tmp_path / "teacher"),
        args=config,
        train_dataset=make_text_dataset(),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    assert teacher.is_loaded_in_4bit and getattr(student, "is_loaded_in_4bit", False)
    records, before = run(trainer, teacher)
    moved = changed(before, trainer.model)
    assert moved and all("lora_" in name for name in moved)
    check_advantages(records, config)


@pytest.mark.parametrize("family", VLM_FAMILIES)
@pytest.mark.parametrize("column", ["image", "images"])
def test_vision_language_student(family, column, cpu_config_kwargs):
    student, processor = make_vlm(family, seed=0)
    teacher, teacher_processor = make_vlm(family, seed=1, hidden_size=128)
    seen = []
    teacher.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
    config = GNDPOConfig(**cpu_config_kwargs())
    trainer = GNDPOTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=make_image_dataset(column=column),
        processing_class=processor,
        teacher_processing_class=teacher_processor,
    )
    records, before = run(trainer, teacher)
    assert changed(before, trainer.model)
    # the teacher scored exactly the student's ids and images, once per generation batch
    scored = [kwargs for kwargs in seen if kwargs.get("fused_lm_head")]
    assert len(scored) == len(records) == 2
    for kwargs, (batch, _, _) in zip(scored, records, strict=True):
        assert torch.equal(kwargs["pixel_values"], batch["pixel_values"])
        assert torch.equal(kwargs["image_grid_thw"], batch["image_grid_thw"])
        assert torch.equal(kwargs["input_ids"][:, -batch["completion_ids"].size(1) :], batch["completion_ids"])
    check_advantages(records, config)


def test_non_finite_teacher_log_probs_are_masked_and_logged(cpu_config_kwargs):
    student, teacher = make_text_model(seed=0), make_text_model(seed=1)
    trainer = GNDPOTrainer(
        model=student,
        teacher_model=teacher,
        args=GNDPOConfig(**cpu_config_kwargs()),
        train_dataset=make_text_dataset(),
        processing_class=make_tokenizer(),
    )
    score = trainer._score_tokens

    def corrupt(batch, inputs, mode):
        scores = score(batch, inputs, mode)
        scores["teacher"][0, :3] = float("nan")
        scores["teacher"][1, 0] = float("-inf")
        return scores

    trainer._score_tokens = corrupt
    records, before = run(trainer, teacher)
    assert changed(before, trainer.model)
    for batch, _, _ in records:
        assert (batch["advantages"][0, :3] == 0).all() and batch["advantages"][1, 0] == 0
        assert batch["loss_mask"][0, :3].sum() == 0, "masked tokens must leave the loss too"
    assert trainer.state.log_history[0]["gndpo/nonfinite_frac"] > 0


def test_outcome_rewards_are_logged_and_mixed_only_on_request(cpu_config_kwargs, monkeypatch):
    def length_reward(completions, **kwargs):
        return [float(len(str(c))) for c in completions]

    def build(weight):
        return GNDPOTrainer(
            model=make_text_model(seed=0),
            teacher_model=make_text_model(seed=1),
            reward_funcs=length_reward,
            args=GNDPOConfig(**cpu_config_kwargs(max_steps=1, outcome_advantage_weight=weight)),
            train_dataset=make_text_dataset(),
            processing_class=make_tokenizer(),
        )

    trainer = build(0.0)
    records = record_batches(trainer)
    trainer.train()
    assert "rewards/length_reward/mean" in trainer.state.log_history[0]
    check_advantages(records, trainer.args)  # logged, not mixed in

    # with a weight, GRPO's sequence-level outcome advantage is added on every valid token
    outcome = []
    grpo_generate = GRPOTrainer._generate_and_score_completions

    def grpo_spy(self, inputs):
        batch = grpo_generate(self, inputs)
        outcome.append(batch["advantages"].clone())
        return batch

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", grpo_spy)
    trainer = build(0.5)
    records = record_batches(trainer)
    trainer.train()
    (batch, student_logps, teacher_logps), sequence_advantages = records[0], outcome[0].double()
    assert sequence_advantages.abs().sum() > 0
    mask = batch["completion_mask"].double()
    expected = expected_advantages(student_logps, teacher_logps, mask, trainer.args)
    expected = expected + 0.5 * sequence_advantages.unsqueeze(1) * mask
    torch.testing.assert_close(batch["advantages"].double(), expected, rtol=1e-4, atol=1e-4)


def test_all_masked_generation_batch_gives_zero_advantages(cpu_config_kwargs):
    """Every completion hits max_completion_length and is masked: zero advantages, zero loss, finite weights."""
    trainer = GNDPOTrainer(
        model=make_text_model(seed=0),
        teacher_model=make_text_model(seed=1),
        args=GNDPOConfig(**cpu_config_kwargs(mask_truncated_completions=True, max_completion_length=2)),
        train_dataset=make_text_dataset(),
        processing_class=make_tokenizer(),
    )
    records, _ = run(trainer, trainer.teacher_model)
    for batch, _, _ in records:
        assert batch["completion_mask"].sum() == 0
        assert torch.equal(batch["advantages"], torch.zeros_like(batch["advantages"]))
    assert all(log["loss"] == 0 for log in trainer.state.log_history if "loss" in log)


def test_empty_completions_train_without_nan(cpu_config_kwargs):
    """Every completion is just the end-of-turn token: one valid token each, finite advantages and weights."""
    tokenizer = make_tokenizer()
    others = [i for i in range(len(tokenizer)) if i != tokenizer.eos_token_id]
    trainer = GNDPOTrainer(
        model=make_text_model(seed=0),
        teacher_model=make_text_model(seed=1),
        args=GNDPOConfig(**cpu_config_kwargs(generation_kwargs={"suppress_tokens": others})),
        train_dataset=make_text_dataset(),
        processing_class=tokenizer,
    )
    records, before = run(trainer, trainer.teacher_model)
    for batch, _, _ in records:
        assert (batch["completion_ids"][:, 0] == tokenizer.eos_token_id).all()
        assert batch["completion_mask"].sum(1).tolist() == [1] * len(batch["completion_ids"])
        assert torch.isfinite(batch["advantages"]).all()
    # two prompts of a batch may be the same text: then every signal is equal and the advantages are all 0
    check_advantages(records, trainer.args, unit_variance=False)


def test_long_prompts_are_skipped_and_counted(cpu_config_kwargs):
    dataset = make_text_dataset(8)
    tokenizer = make_tokenizer()
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in dataset["prompt"]]
    tokenized = [tuple(tokenizer(text)["input_ids"]) for text in texts]
    lengths = [len(ids) for ids in tokenized]
    limit = sorted(lengths)[len(lengths) // 2]  # about half the prompts are longer
    trainer = GNDPOTrainer(
        model=make_text_model(seed=0),
        teacher_model=make_text_model(seed=1),
        args=GNDPOConfig(**cpu_config_kwargs(max_prompt_length=limit)),
        train_dataset=dataset,
        processing_class=make_tokenizer(),
    )
    records, _ = run(trainer, trainer.teacher_model)
    skipped = kept = 0
    for batch, _, _ in records:
        # each row's length from the dataset prompt it came from, tokenized here (not from the batch's mask)
        prompts = [
            tuple(ids[mask.bool()].tolist())
            for ids, mask in zip(batch["prompt_ids"], batch["prompt_mask"], strict=True)
        ]
        too_long = torch.tensor([lengths[tokenized.index(ids)] > limit for ids in prompts])
        skipped, kept = skipped + too_long.sum().item(), kept + (~too_long).sum().item()
        assert (batch["loss_mask"][too_long] == 0).all() and (batch["advantages"][too_long] == 0).all()
        assert (batch["loss_mask"][~too_long].sum(1) > 0).all()
    assert skipped > 0 and kept > 0
    logged = [log["gndpo/long_prompt_frac"] for log in trainer.state.log_history if "gndpo/long_prompt_frac" in log]
    assert sum(logged) * 4 == pytest.approx(skipped)


@pytest.mark.parametrize("placement", [{"teacher_offload": True}, {"teacher_device": "cpu"}])
def test_teacher_placement_gives_the_same_advantages(placement, cpu_config_kwargs):
    """On CPU the devices coincide, so this checks the wiring: same scores, and the offload round trip each batch."""

    def train(**options):
        teacher = make_text_model(seed=1)
        moves = []
        to = teacher.to
        teacher.to = lambda *a, **k: (moves.append(str(a[0] if a else k.get("device"))), to(*a, **k))[1]
        trainer = GNDPOTrainer(
            model=make_text_model(seed=0),
            teacher_model=teacher,
            args=GNDPOConfig(**cpu_config_kwargs(**options)),
            train_dataset=make_text_dataset(),
            processing_class=make_tokenizer(),
        )
        records, _ = run(trainer, teacher)
        return trainer, [batch["advantages"] for batch, _, _ in records], moves

    _, reference, _ = train()
    trainer, advantages, moves = train(**placement)
    assert trainer.teacher_model is trainer.accelerator.unwrap_model(trainer.teacher_model), "not handed to accelerate"
    for a, b in zip(advantages, reference, strict=True):
        torch.testing.assert_close(a, b)
    if placement.get("teacher_offload"):
        assert moves == ["cpu"] + ["cpu", "cpu"] * 2, "parked once, then in and out around each scoring pass"
    else:
        assert moves == ["cpu"]


def test_teacher_placement_options_are_validated(cpu_config_kwargs):
    with pytest.raises(ValueError, match="alternatives"):
        GNDPOConfig(**cpu_config_kwargs(teacher_device="cpu", teacher_offload=True))

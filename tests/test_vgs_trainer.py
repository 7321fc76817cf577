"""Visual Gradient Steering in the trainer, end to end on tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL students.

What is checked against independent computations: the text-only view is the same conversation without its images
(same template), left-padded so the completion positions line up, and the teacher's text-view states are those of
a plain forward of each unpadded text prompt (the model's own rotary positions, never the image view's); the VGS
loss equals its definition recomputed from full float64 logits; eta is the measured gradient-norm ratio.
"""

import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from test_trainer import IMAGE_KEYS, changed, snapshot
from tiny_models import VLM_FAMILIES, make_image, make_text_dataset, make_text_model, make_tokenizer, make_vlm

from trl_gndpo import GNDPOConfig, GNDPOTrainer

QUESTIONS = ["Colour?", "What colour is the square in this small picture, and where is it?", "Describe it briefly."]


def mixed_dataset(n: int = 8) -> Dataset:
    """Image prompts of different lengths, one with a system prompt."""
    prompts = []
    for i in range(n):
        turn = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        prompts.append(([{"role": "system", "content": "Answer in one word."}] if i % 4 == 1 else []) + turn)
    return Dataset.from_dict({"prompt": prompts, "image": [make_image(i) for i in range(n)]})


def build(family, cpu_config_kwargs, peft_config=None, **overrides):
    student, processor = make_vlm(family, seed=0)
    teacher, teacher_processor = make_vlm(family, seed=1, hidden_size=128)
    config = GNDPOConfig(**cpu_config_kwargs(visual_gradient_steering=True, **overrides))
    trainer = GNDPOTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=mixed_dataset(),
        processing_class=processor,
        teacher_processing_class=teacher_processor,
        peft_config=peft_config,
    )
    return trainer, teacher, processor


def record_batches(trainer) -> list[dict]:
    """Keep every generation batch the trainer hands to its loss."""
    batches, generate = [], trainer._generate_and_score_completions

    def spy(inputs):
        batches.append(generate(inputs))
        return batches[-1]

    trainer._generate_and_score_completions = spy
    return batches


def unpadded(ids, mask):
    return [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]


def without_vision_spans(ids: list[int], start: int, end: int) -> list[int]:
    out, inside = [], False
    for token in ids:
        inside = inside or token == start
        if not inside:
            out.append(token)
        inside = inside and token != end
    return out


def kl(log_a, log_b):
    return (log_a.exp() * (log_a - log_b)).sum(-1)


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_vgs_trains_each_qwen_vl_family_on_an_aligned_text_view(family, cpu_config_kwargs):
    trainer, teacher, processor = build(family, cpu_config_kwargs)
    calls = []
    teacher.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    records = record_batches(trainer)
    before, teacher_before = snapshot(trainer.model), snapshot(teacher)
    trainer.train()
    assert changed(before, trainer.model) and not changed(teacher_before, teacher)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())

    # the teacher's backbone runs twice per generation batch: the image view (with pixels, through the fused
    # log-prob head) and the text-only view (hidden states only, no image input of any kind)
    image_view = [kwargs for kwargs in calls if kwargs.get("pixel_values") is not None]
    text_view = [kwargs for kwargs in calls if kwargs.get("pixel_values") is None]
    assert len(image_view) == len(text_view) == len(records) == 2
    assert not any(kwargs.get(key) is not None for kwargs in text_view for key in IMAGE_KEYS)

    tokenizer = processor.tokenizer
    start, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>"))
    backbone = teacher.model
    for batch in records:
        image_prompts = unpadded(batch["prompt_ids"], batch["prompt_mask"])
        text_prompts = unpadded(batch["vgs_text_prompt_ids"], batch["vgs_text_prompt_mask"])
        assert len({len(p) for p in text_prompts}) > 1, "prompts of different lengths"
        for image_ids, text_ids in zip(image_prompts, text_prompts, strict=True):
            assert start in image_ids and start not in text_ids
            assert text_ids == without_vision_spans(image_ids, start, end)
        # teacher states of the text view = a plain forward of each unpadded prompt + completion, row by row
        for row, text_ids in enumerate(text_prompts):
            completion = batch["completion_ids"][row][batch["completion_mask"][row].bool()].tolist()
            with torch.no_grad():
                states = backbone(input_ids=torch.tensor([text_ids + completion])).last_hidden_state[0]
            expected = states[len(text_ids) - 1 : len(text_ids) - 1 + len(completion)]
            got = batch["vgs_teacher_text"][row, : len(completion)]
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert batch["vgs_teacher_image"].shape == batch["vgs_teacher_text"].shape
        assert not torch.allclose(batch["vgs_teacher_image"], batch["vgs_teacher_text"])

    logs = trainer.state.log_history[0]
    for name in ("std_kl", "visual_kl", "language_prior_kl", "vds_mean", "lp_token_frac", "eta", "loss"):
        assert math.isfinite(logs[f"vgs/{name}"]), name
    assert logs["vgs/eta"] == 0.41 and logs["vgs/gamma_mean"] == pytest.approx(2.0)
    assert 0 < logs["vgs/lp_token_frac"] < 0.5  # above the 0.7 quantile


def test_vgs_loss_equals_its_definition_from_float64_logits(cpu_config_kwargs):
    trainer, teacher, _ = build(
        "qwen2_5_vl", cpu_config_kwargs, vgs_adaptive_gamma=True, vgs_lambda=0.5, vgs_eta=0.4
    )  # the default vgs_mode="alone": the loss is L_VGS alone, whatever vgs_alpha (default 0.3) says
    records = record_batches(trainer)
    trainer.train()
    batch = records[-1]
    student = trainer.model
    with torch.no_grad():
        loss = trainer._compute_loss(student, batch).double()

        length = batch["completion_ids"].size(1)

        def log_probs(model, prompt_ids, prompt_mask, images):
            ids = torch.cat([prompt_ids, batch["completion_ids"]], 1)
            mask = torch.cat([prompt_mask, batch["completion_mask"]], 1)
            extra = {k: batch[k] for k in IMAGE_KEYS if k in batch} if images else {}
            logits = model(input_ids=ids, attention_mask=mask, **extra).logits.double()
            return logits[:, -length - 1 : -1].log_softmax(-1)

        image, text = (
            (batch["prompt_ids"], batch["prompt_mask"]),
            (batch["vgs_text_prompt_ids"], batch["vgs_text_prompt_mask"]),
        )
        log_p, log_pt = log_probs(student, *image, True), log_probs(student, *text, False)
        log_q, log_qt = log_probs(teacher, *image, True), log_probs(teacher, *text, False)
    log_star = torch.log_softmax(log_pt + log_q - log_qt, -1)
    gate, gamma = batch["vgs_lp_gate"].double(), batch["vgs_gamma"].double()
    per_token = kl(log_p, log_q) + gamma * kl(log_p, log_star) + 0.5 * gate * kl(log_pt, log_qt)
    mask = batch["loss_mask"].bool()
    expected = 0.4 * (torch.where(mask, per_token, 0).sum(1) / mask.sum(1).clamp(min=1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    # adaptive gamma: the three levels of the paper's variant over the valid tokens
    assert set(batch["vgs_gamma"][mask].unique().tolist()) <= {0.0, 1.0, 2.0}
    assert len(set(batch["vgs_gamma"][mask].unique().tolist())) >= 2
    # 30% of the tokens at gamma, 30% at gamma / 2, 40% at 0 (up to ties and the batch's size)
    assert trainer.state.log_history[0]["vgs/gamma_mean"] == pytest.approx(0.45 * 2.0, abs=0.1)


def test_vgs_with_lora_and_measured_eta_kept_in_checkpoints(cpu_config_kwargs, tmp_output_dir):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    trainer, _, _ = build(
        "qwen2_vl", cpu_config_kwargs, peft_config=lora, vgs_eta_measure_steps=1, save_strategy="steps", save_steps=1
    )
    before = snapshot(trainer.model)
    trainer.train()
    moved = changed(before, trainer.model)
    assert moved and all("lora_" in name for name in moved)
    etas = [h["vgs/eta"] for h in trainer.state.log_history if "vgs/eta" in h]
    assert etas[0] != 1.0 and etas[0] == etas[1], "measured on step 1, then fixed"
    assert 0 < etas[0] < 1.5 and trainer.steering.eta == etas[0]

    # resumed after the measurement, the run keeps the measured eta (from the checkpoint), not the default
    resumed, _, _ = build("qwen2_vl", cpu_config_kwargs, peft_config=lora, vgs_eta_measure_steps=1)
    resumed.train(resume_from_checkpoint=f"{tmp_output_dir}/checkpoint-1")
    assert [h["vgs/eta"] for h in resumed.state.log_history if h.get("step") == 2 and "vgs/eta" in h] == [etas[0]]


def test_measured_eta_is_the_gradient_norm_ratio(cpu_config_kwargs):
    trainer, _, _ = build("qwen2_vl", cpu_config_kwargs)
    model = torch.nn.Linear(3, 2)
    x = torch.randn(5, 3)
    standard, visual = model(x).pow(2).mean(), model(x).sin().sum()
    g_std = torch.cat([g.flatten() for g in torch.autograd.grad(standard, model.parameters(), retain_graph=True)])
    g_vis = torch.cat([g.flatten() for g in torch.autograd.grad(visual, model.parameters(), retain_graph=True)])
    trainer.steering.measure_eta(model, standard, visual)
    trainer.steering.measure_eta(model, standard, 2 * visual)
    expected = [g_std.norm() / (g_std + k * g_vis).norm() for k in (1, 2)]
    assert trainer.steering.eta_samples == pytest.approx([e.item() for e in expected], rel=1e-5)
    assert trainer.steering.eta == pytest.approx(sum(trainer.steering.eta_samples) / 2)


def test_vgs_refuses_a_text_only_student(cpu_config_kwargs):
    with pytest.raises(ValueError, match="this student is text-only"):
        GNDPOTrainer(
            model=make_text_model(seed=0),
            teacher_model=make_text_model(seed=1),
            args=GNDPOConfig(**cpu_config_kwargs(visual_gradient_steering=True)),
            train_dataset=make_text_dataset(),
            processing_class=make_tokenizer(),
        )


@pytest.mark.parametrize(
    ("field", "value"),
    [("vgs_alpha", 1.5), ("vgs_gamma", -1.0), ("vgs_lambda", -0.1), ("vgs_lp_quantile", 1.0), ("vgs_eta", 0.0)],
)
def test_vgs_config_is_validated(field, value, cpu_config_kwargs):
    with pytest.raises(ValueError, match=field):
        GNDPOConfig(**cpu_config_kwargs(visual_gradient_steering=True, **{field: value}))


def test_vgs_evaluates_without_training_the_text_view(cpu_config_kwargs):
    student, processor = make_vlm("qwen2_vl", seed=0)
    teacher, _ = make_vlm("qwen2_vl", seed=1, hidden_size=128)
    config = GNDPOConfig(**cpu_config_kwargs(visual_gradient_steering=True, per_device_eval_batch_size=4))
    trainer = GNDPOTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=mixed_dataset(),
        eval_dataset=mixed_dataset(4),
        processing_class=processor,
    )
    before = snapshot(trainer.model)
    metrics = trainer.evaluate()
    assert not changed(before, trainer.model)
    for name in ("std_kl", "visual_kl", "language_prior_kl", "vds_mean", "lp_token_frac", "loss"):
        assert math.isfinite(metrics[f"eval_vgs/{name}"]), name
    assert metrics["eval_vgs/std_kl"] > 0

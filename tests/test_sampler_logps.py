"""`old_logps_from_sampler`: log p_old recorded during transformers generation instead of a student re-score pass.

The recorded log-probs must equal the re-score (the student's log-softmax at the sampling temperature, recomputed
here from plain logits in float64) up to float32 rounding, for a text and a vision-language student; the whitened
advantages must match those of the re-scored signal; the no-grad student pass must really be skipped; where TRL
re-scores anyway (`num_iterations > 1`) its re-score is used; and sampling settings that change the distribution are
refused.
"""

import pytest
import torch
from helpers import expected_advantages, reference_logps
from tiny_models import make_image_dataset, make_text_dataset, make_text_model, make_tokenizer, make_vlm

from trl_gndpo import GNDPOConfig, GNDPOTrainer
from trl_gndpo.sampler_logps import recording

TEMPERATURE = 0.7  # not 1, so that a missing or doubled division by the temperature shows


def make_trainer(kind, config):
    """`kind`: "text", "lora" (a LoRA adapter on the text student: generate goes through PEFT) or a VLM family."""
    peft = None
    if kind in ("text", "lora"):
        student, teacher = make_text_model(seed=0), make_text_model(seed=1, hidden_size=128)
        processing, teacher_processing, dataset = make_tokenizer(), make_tokenizer(), make_text_dataset()
        if kind == "lora":
            from peft import LoraConfig

            peft = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    else:
        (student, processing), (teacher, teacher_processing) = make_vlm(kind, seed=0), make_vlm(kind, seed=1)
        dataset = make_image_dataset()
    return GNDPOTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=dataset,
        processing_class=processing,
        teacher_processing_class=teacher_processing,
        peft_config=peft,
    )


def record(trainer):
    """Each generation batch with the student's and teacher's float64 re-scores, taken before the loss runs, and the
    number of no-grad student log-prob passes (the re-score) the batch cost."""
    records, passes = [], []
    student = trainer.accelerator.unwrap_model(trainer.model)
    student.register_forward_pre_hook(
        lambda module, args, kwargs: passes.append(1) if kwargs.get("fused_lm_head") and not torch.is_grad_enabled()
        else None,
        with_kwargs=True,
    )  # fmt: skip
    generate = trainer._generate_and_score_completions

    def spy(inputs):
        passes.clear()
        batch = generate(inputs)
        count = len(passes)
        teacher_logps = reference_logps(trainer.teacher_model, batch, 1.0)
        records.append((batch, reference_logps(student, batch, TEMPERATURE), teacher_logps, count))
        return batch

    trainer._generate_and_score_completions = spy
    return records


def test_completions_of_different_lengths_get_their_own_tokens_log_probs():
    """`generate` directly, with a tenth of the vocabulary as end tokens so that rows stop at different steps."""
    torch.manual_seed(0)
    model = make_text_model(seed=0).eval()
    eos = list(range(0, model.config.vocab_size, 10))
    prompt = torch.tensor([[5, 17, 42, 7]] * 8)
    with recording(model, TEMPERATURE) as recorder, torch.no_grad():
        sequences = model.generate(
            prompt, do_sample=True, temperature=TEMPERATURE, top_k=0, max_new_tokens=12, eos_token_id=eos,
            pad_token_id=1,
        )  # fmt: skip
    assert "_get_logits_processor" not in vars(model), "the model's method was not restored"
    completions = []
    for row in sequences[:, prompt.size(1) :].tolist():  # cut after the first end token, as GRPOTrainer does
        end = next((i for i, token in enumerate(row) if token in eos), len(row) - 1)
        completions.append(row[: end + 1])
    lengths = {len(c) for c in completions}
    assert len(lengths) > 1 and max(lengths) == sequences.size(1) - prompt.size(1)
    recorded = recorder.per_completion(completions)
    with torch.no_grad():
        logits = model(sequences).logits.double()[:, prompt.size(1) - 1 : -1]
    expected = (logits / TEMPERATURE).log_softmax(-1).gather(-1, sequences[:, prompt.size(1) :, None]).squeeze(-1)
    for row, completion, reference in zip(recorded, completions, expected, strict=True):
        assert len(row) == len(completion)
        torch.testing.assert_close(torch.tensor(row, dtype=torch.float64), reference[: len(row)], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["text", "lora", "qwen2_vl"])
def test_recorded_logps_equal_the_rescore_and_skip_it(kind, cpu_config_kwargs):
    config = GNDPOConfig(**cpu_config_kwargs(old_logps_from_sampler=True, temperature=TEMPERATURE))
    trainer = make_trainer(kind, config)
    records = record(trainer)
    trainer.train()
    assert len(records) == 2
    for batch, student_logps, teacher_logps, passes in records:
        assert passes == 0, "the student re-score pass ran"
        assert "old_per_token_logps" not in batch
        mask = batch["completion_mask"].bool()
        assert mask.sum() > 1
        difference = (batch["sampling_per_token_logps"].double() - student_logps)[mask].abs()
        print(f"{kind}: |recorded - re-score| max {difference.max():.3g}, mean {difference.mean():.3g}")
        assert difference.max() < 1e-4
        expected = expected_advantages(student_logps, teacher_logps, mask, config)
        advantage_difference = (batch["advantages"].double() - expected)[mask].abs()
        print(f"{kind}: |whitened advantage difference| max {advantage_difference.max():.3g}")
        torch.testing.assert_close(batch["advantages"].double(), expected, rtol=1e-4, atol=1e-4)


def test_default_rescores_once_per_generation_batch(cpu_config_kwargs):
    trainer = make_trainer("text", GNDPOConfig(**cpu_config_kwargs(temperature=TEMPERATURE)))
    records = record(trainer)
    trainer.train()
    assert [passes for *_, passes in records] == [1, 1]  # one chunk of 4 sequences per generation batch
    assert all("sampling_per_token_logps" not in batch for batch, *_ in records)


def test_with_several_iterations_trl_rescores_and_that_is_used(cpu_config_kwargs):
    with pytest.warns(UserWarning, match="no effect with num_iterations=2"):
        config = GNDPOConfig(
            **cpu_config_kwargs(old_logps_from_sampler=True, temperature=TEMPERATURE, num_iterations=2, max_steps=4)
        )
    trainer = make_trainer("text", config)
    records = record(trainer)
    trainer.train()
    assert len(records) == 2
    for batch, student_logps, teacher_logps, passes in records:
        assert passes == 1 and "sampling_per_token_logps" not in batch  # TRL's re-score, and nothing recorded
        mask = batch["completion_mask"].bool()
        torch.testing.assert_close(batch["old_per_token_logps"].double()[mask], student_logps[mask], rtol=0, atol=1e-4)
        expected = expected_advantages(student_logps, teacher_logps, mask, config)
        torch.testing.assert_close(batch["advantages"].double(), expected, rtol=1e-4, atol=1e-4)


def test_neutral_settings_are_accepted(cpu_config_kwargs):
    # min_new_tokens masks the end token in the sampler only: the recorded log-prob, like the re-score, is unmasked
    kwargs = {"min_new_tokens": 4, "temperature": 1.0}
    config = GNDPOConfig(**cpu_config_kwargs(old_logps_from_sampler=True, top_k=0, top_p=1, generation_kwargs=kwargs))
    assert config.old_logps_from_sampler

"""The held-out reverse-KL evaluation: against a float64 full-vocabulary reference, its masking and seeding, and the
callback on GNDPOTrainer and TRL's DistillationTrainer."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import make_text_dataset, make_text_model, make_tokenizer
from trl import DistillationConfig, DistillationTrainer

from trl_gndpo import GNDPOConfig, GNDPOTrainer, ReverseKLCallback, heldout_reverse_kl
from trl_gndpo.evaluation import reverse_kl_sum, sample_completions

PROMPTS = [row["prompt"] for row in make_text_dataset(6)]


def pair(seed: int = 0):
    student = make_text_model("qwen2", seed=seed)
    teacher = make_text_model("qwen2", seed=seed + 1, hidden_size=128, num_hidden_layers=3)
    return student, teacher, make_tokenizer()


def reference_kl(student, teacher, samples) -> tuple[float, int]:
    """Full logits in float64, log-softmax over the whole vocabulary, KL summed over the masked completion tokens."""
    start = samples["prompt_length"]
    logps = [
        copy.deepcopy(m)
        .double()(samples["input_ids"], attention_mask=samples["attention_mask"])
        .logits[:, start - 1 : -1]
        .log_softmax(-1)
        for m in (student, teacher)
    ]
    kl = (logps[0].exp() * (logps[0] - logps[1])).sum(-1)
    mask = samples["completion_mask"].bool()
    return kl[mask].sum().item(), int(mask.sum())


def favour_eos(model, tokenizer, weight: float = 3.0):
    """Make the end-of-sequence token likely, so that sampled completions stop at different lengths."""
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[tokenizer.eos_token_id] = weight * head.mean(0) / head.mean(0).norm() * head.norm(dim=1).mean()
    return model


@pytest.mark.parametrize("seed", [0, 1])
def test_reverse_kl_sum_matches_float64_reference(seed):
    student, teacher, tokenizer = pair(seed)
    favour_eos(student, tokenizer)
    samples = sample_completions(
        student, tokenizer, PROMPTS, num_samples=2, max_new_tokens=12, seed=seed, batch_size=5
    )
    total, count = reverse_kl_sum(student, teacher, samples, batch_size=3)
    expected_total, expected_count = reference_kl(student, teacher, samples)
    assert count == expected_count > 0
    assert total == pytest.approx(expected_total, rel=1e-4)
    assert total / count > 0.01  # random models disagree: the comparison above is not between zeros


def test_completion_mask_stops_at_the_first_end_of_sequence():
    student, _, tokenizer = pair()
    favour_eos(student, tokenizer)
    samples = sample_completions(student, tokenizer, PROMPTS, num_samples=3, max_new_tokens=16, seed=0, batch_size=4)
    completions = samples["input_ids"][:, samples["prompt_length"] :]
    stopped = 0
    for ids, mask in zip(completions.tolist(), samples["completion_mask"].tolist(), strict=True):
        end = ids.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in ids else len(ids)
        stopped += end < len(ids)
        assert mask == [1] * end + [0] * (len(ids) - end)
    assert 0 < stopped < len(completions), "the test needs rows that stop early and rows that run to the limit"
    # the attention mask covers the prompt's tokens and exactly the masked completion tokens
    prompt_mask = samples["attention_mask"][:, : samples["prompt_length"]]
    assert torch.equal(samples["attention_mask"][:, samples["prompt_length"] :], samples["completion_mask"])
    assert prompt_mask.sum(1).min() > 0


def test_tokens_after_the_end_of_sequence_do_not_count():
    student, teacher, tokenizer = pair()
    favour_eos(student, tokenizer)
    samples = sample_completions(student, tokenizer, PROMPTS, num_samples=3, max_new_tokens=16, seed=0, batch_size=4)
    changed = dict(samples, input_ids=samples["input_ids"].clone())
    after = samples["attention_mask"] == 0
    after[:, : samples["prompt_length"]] = False
    assert after.any()
    changed["input_ids"][after] = 7  # junk where the masks are 0
    assert reverse_kl_sum(student, teacher, changed) == pytest.approx(reverse_kl_sum(student, teacher, samples))


def test_heldout_reverse_kl_is_seeded_and_leaves_the_rng_alone():
    student, teacher, tokenizer = pair()
    state = torch.random.get_rng_state()
    first = heldout_reverse_kl(student, teacher, tokenizer, PROMPTS, num_samples=2, max_new_tokens=8, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert heldout_reverse_kl(student, teacher, tokenizer, PROMPTS, num_samples=2, max_new_tokens=8, seed=3) == first
    assert heldout_reverse_kl(student, teacher, tokenizer, PROMPTS, num_samples=2, max_new_tokens=8, seed=4) != first
    assert abs(heldout_reverse_kl(student, copy.deepcopy(student), tokenizer, PROMPTS, max_new_tokens=8)) < 1e-5
    assert not student.training and not teacher.training  # modes restored (the tiny models are built in eval mode)


def test_plain_string_prompts():
    student, teacher, tokenizer = pair()
    value = heldout_reverse_kl(student, teacher, tokenizer, ["What is 2 + 2?", "Name a colour."], max_new_tokens=6)
    assert value > 0


def gndpo_trainer(student, teacher, tokenizer, cpu_config_kwargs):
    args = GNDPOConfig(**cpu_config_kwargs())
    return GNDPOTrainer(model=student, teacher_model=teacher, args=args, train_dataset=make_text_dataset(8),
                        processing_class=tokenizer, teacher_processing_class=tokenizer)  # fmt: skip


def distillation_trainer(student, teacher, tokenizer, cpu_config_kwargs):
    fields = DistillationConfig.__dataclass_fields__
    args = DistillationConfig(**{k: v for k, v in cpu_config_kwargs().items() if k in fields}, beta=1.0)
    return DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=make_text_dataset(8),
                               processing_class=tokenizer)  # fmt: skip


@pytest.mark.parametrize("build", [gndpo_trainer, distillation_trainer], ids=["gndpo", "distillation"])
def test_callback_logs_the_kl_of_the_model_being_trained(build, cpu_config_kwargs):
    student, teacher, tokenizer = pair()
    settings = dict(num_samples=2, max_new_tokens=8, seed=5)
    before = heldout_reverse_kl(copy.deepcopy(student), teacher, tokenizer, PROMPTS, **settings)
    trainer = build(student, teacher, tokenizer, cpu_config_kwargs)
    callback = ReverseKLCallback(trainer, teacher, PROMPTS, eval_steps=1, **settings)
    trainer.add_callback(callback)
    trainer.train()

    assert [r["step"] for r in callback.history] == [0, 1, 2]
    assert callback.history[0]["reverse_kl"] == pytest.approx(before, rel=1e-5)
    assert callback.history[-1]["reverse_kl"] != pytest.approx(before, rel=1e-3), "it must see the trained weights"
    seconds = [r["train_seconds"] for r in callback.history]
    assert 0 <= seconds[0] < seconds[1] < seconds[2]
    logged = [(e["step"], e["eval/reverse_kl"]) for e in trainer.state.log_history if "eval/reverse_kl" in e]
    assert logged == [(r["step"], r["reverse_kl"]) for r in callback.history]
    # the trainer's own per-step metrics still reach its regular log entries
    key = "gndpo/reverse_kl" if isinstance(trainer, GNDPOTrainer) else "loss"
    assert sum(key in e for e in trainer.state.log_history) == 2
    assert all(key not in e for e in trainer.state.log_history if "eval/reverse_kl" in e)
    assert student.training  # the trainer's mode is restored after each evaluation


def test_callback_refuses_bad_arguments(cpu_config_kwargs):
    student, teacher, tokenizer = pair()
    trainer = gndpo_trainer(student, teacher, tokenizer, cpu_config_kwargs)
    with pytest.raises(ValueError, match="held-out prompt"):
        ReverseKLCallback(trainer, prompts=[])
    with pytest.raises(ValueError, match="eval_steps"):
        ReverseKLCallback(trainer, prompts=PROMPTS, eval_steps=0)
    assert ReverseKLCallback(trainer, prompts=make_text_dataset(2)).teacher is trainer.teacher_model


def test_callback_plots_the_heldout_kl_into_output_dir(cpu_config_kwargs):
    from PIL import Image

    student, teacher, tokenizer = pair()
    trainer = gndpo_trainer(student, teacher, tokenizer, cpu_config_kwargs)
    callback = ReverseKLCallback(trainer, teacher, PROMPTS, eval_steps=1, max_new_tokens=6, plot=True)
    trainer.add_callback(callback)
    trainer.train()
    assert callback.plot_path == str(Path(trainer.args.output_dir) / "reverse_kl.png")
    with Image.open(callback.plot_path) as image:  # a real PNG, redrawn after the last of the 3 evaluations
        assert image.format == "PNG" and image.size == (720, 432)
        assert len(set(image.convert("L").getdata())) > 10, "an empty canvas"
    assert [r["step"] for r in callback.history] == [0, 1, 2]


def test_plotting_without_matplotlib_says_how_to_get_it(cpu_config_kwargs, monkeypatch):
    student, teacher, tokenizer = pair()
    trainer = gndpo_trainer(student, teacher, tokenizer, cpu_config_kwargs)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # an import of it fails, as when it is not installed
    with pytest.raises(ImportError, match="pip install matplotlib"):
        ReverseKLCallback(trainer, prompts=PROMPTS, plot=True)
    assert ReverseKLCallback(trainer, prompts=PROMPTS).plot_path is None  # without plot=True it is not needed

"""Several teachers routed by a dataset column, a text-only teacher for a vision-language student (cross-modal), and
G-OPD's reward correction with a given reference model: each checked against float64 log-probs of plain forwards."""

import copy

import pytest
import torch
from helpers import record, routed_dataset, unpadded, whiten, without_vision_spans
from peft import LoraConfig
from tiny_models import make_image_dataset, make_text_dataset, make_text_model, make_tokenizer, make_vlm

from trl_gndpo import GNDPOConfig, GNDPOTrainer

LORA = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


def count_rows(model) -> list[int]:
    """Rows of every scoring pass of `model` (through TRL's fused log-prob head), appended as they happen."""
    rows = []

    def hook(module, args, kwargs):
        if kwargs.get("fused_lm_head"):
            rows.append(len(kwargs["input_ids"]))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return rows


@pytest.mark.parametrize(
    ("values", "device", "column"),
    [(["math", "code"], None, "teacher_id"), ([1, 0, 0], {"code": "cpu"}, "teacher")],
    ids=["names-in-trl-teacher_id", "indices-in-teacher"],
)
def test_each_sample_is_scored_by_its_own_teacher(values, device, column, cpu_config_kwargs):
    """Routed by TRL's `teacher_id` column or by this package's earlier `teacher` column, without `teacher_column`."""
    math, code = make_text_model(seed=1, hidden_size=128), make_text_model(seed=2, num_hidden_layers=3)
    seen = {"math": count_rows(math), "code": count_rows(code)}
    trainer = GNDPOTrainer(
        model=make_text_model(seed=0),
        teacher_model={"math": math, "code": code},
        args=GNDPOConfig(**cpu_config_kwargs(max_steps=3, teacher_device=device)),
        train_dataset=routed_dataset(values, column),
        processing_class=make_tokenizer(),
    )
    records = record(trainer, {"math": math, "code": code})
    trainer.train()
    routed = {"math": 0, "code": 0}
    assert any(len({str(x[column]) for x in r["inputs"]}) == 2 for r in records), "a batch mixes both teachers"
    for r in records:
        names = [v if isinstance(v, str) else ["math", "code"][v] for v in (x[column] for x in r["inputs"])]
        for name in names:
            routed[name] += 1
        q = torch.stack([r[name][i] for i, name in enumerate(names)])
        mask = r["batch"]["completion_mask"].bool()
        expected = whiten((q - r["p"]).clamp(-5, 5), mask)  # one whitening over both teachers' tokens
        torch.testing.assert_close(r["batch"]["advantages"].double(), expected, rtol=1e-4, atol=1e-4)
    assert routed["math"] > 0 and routed["code"] > 0
    assert {name: sum(rows) for name, rows in seen.items()} == routed, "each teacher scores only its own samples"
    logged = [entry for entry in trainer.state.log_history if "gndpo/teacher/math/token_frac" in entry]
    assert logged and all(
        abs(e["gndpo/teacher/math/token_frac"] + e["gndpo/teacher/code/token_frac"] - 1) < 1e-6 for e in logged
    )


def run(teacher_model, cpu_config_kwargs, peft_config=None):
    trainer = GNDPOTrainer(
        model=make_text_model(seed=0),
        teacher_model=teacher_model,
        args=GNDPOConfig(**cpu_config_kwargs()),
        train_dataset=routed_dataset(["a", "b"]),
        processing_class=make_tokenizer(),
        peft_config=peft_config,
    )
    records = record(trainer)
    trainer.train()
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return [r["batch"]["advantages"] for r in records], weights


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_copies_of_one_teacher_train_like_that_teacher_alone(lora, cpu_config_kwargs):
    teacher = make_text_model(seed=1, hidden_size=128)
    peft_config = LORA if lora else None
    single, single_weights = run(copy.deepcopy(teacher), cpu_config_kwargs, peft_config)
    both, both_weights = run({"a": copy.deepcopy(teacher), "b": teacher}, cpu_config_kwargs, peft_config)
    assert len(single) == len(both) == 2
    for a, b in zip(single, both, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert single_weights.keys() == both_weights.keys()
    for name in single_weights:
        torch.testing.assert_close(single_weights[name], both_weights[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "dataset", "message"),
    [
        ({}, make_text_dataset(8), "column 'teacher_id'"),  # TRL's name is the one asked for
        ({"teacher_column": "domain"}, routed_dataset(["a", "b"]), "column 'domain'"),
        # with both columns, TRL's `teacher_id` routes (here to an unknown teacher), not `teacher`
        ({}, routed_dataset(["a", "x"], "teacher_id").add_column("teacher", ["a"] * 8), "'teacher_id' is 'x'"),
        ({}, routed_dataset(["a", "x"]), "names none of the teachers"),
        ({}, routed_dataset([0, 2]), "names none of the teachers"),
        ({"value_baseline": True}, routed_dataset(["a", "b"]), "several teachers"),
        ({"teacher_device": {"c": "cpu"}}, routed_dataset(["a", "b"]), r"teacher_device names teachers \['c'\]"),
    ],
)
def test_routing_errors(overrides, dataset, message, cpu_config_kwargs):
    with pytest.raises(ValueError, match=message):
        GNDPOTrainer(
            model=make_text_model(seed=0),
            teacher_model={"a": make_text_model(seed=1), "b": make_text_model(seed=2)},
            args=GNDPOConfig(**cpu_config_kwargs(**overrides)),
            train_dataset=dataset,
            processing_class=make_tokenizer(),
        )


def test_teacher_models_config_fields(cpu_config_kwargs):
    config = GNDPOConfig(**cpu_config_kwargs(teacher_models='{"math": "m", "code": "c"}', teacher_device="cpu"))
    assert config.teacher_models == {"math": "m", "code": "c"} and config.teacher_device == "cpu"


# --------------------------------------------------------------------------------------------------------------------
# Cross-modal: a text-only teacher for a vision-language student


def text_view_logps(teacher, batch, processor) -> torch.Tensor:
    """The text teacher's float64 log-probs of the completion on each unpadded prompt with its vision span removed."""
    tokenizer = processor.tokenizer
    start, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>"))
    prompts = unpadded(batch["prompt_ids"], batch["prompt_mask"])
    out = torch.zeros(batch["completion_ids"].shape, dtype=torch.float64)
    for i, prompt in enumerate(prompts):
        text = without_vision_spans(prompt, start, end)
        assert len(text) < len(prompt), "the image view has a vision span to remove"
        ids = torch.tensor([text + batch["completion_ids"][i].tolist()])
        with torch.no_grad():
            logits = teacher(input_ids=ids).logits.double()[0, len(text) - 1 : -1].log_softmax(-1)
        out[i] = logits.gather(-1, batch["completion_ids"][i].unsqueeze(-1)).squeeze(-1)
    return out


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_text_teacher_scores_the_text_view_of_a_vision_student(lora, cpu_config_kwargs):
    student, processor = make_vlm("qwen2_vl", seed=0)
    teacher = make_text_model(seed=1, hidden_size=128)
    trainer = GNDPOTrainer(
        model=student,
        teacher_model=teacher,
        args=GNDPOConfig(**cpu_config_kwargs(cross_modal_distillation=True)),
        train_dataset=make_image_dataset(8),
        processing_class=processor,
        teacher_processing_class=make_tokenizer(),
        peft_config=LORA if lora else None,
    )
    records = record(trainer)
    trainer.train()
    for r in records:
        assert "pixel_values" in r["batch"], "the student trains on the image view"
        q = text_view_logps(teacher, r["batch"], processor)
        mask = r["batch"]["completion_mask"].bool()
        expected = whiten((q - r["p"]).clamp(-5, 5), mask)
        torch.testing.assert_close(r["batch"]["advantages"].double(), expected, rtol=1e-4, atol=1e-4)


def test_vision_and_text_teachers_each_score_their_own_view(cpu_config_kwargs):
    """Uni-OPD's mixed setting: a multimodal teacher sees its rows' images, a text teacher the text view of its
    rows."""
    student, processor = make_vlm("qwen2_vl", seed=0)
    vision, text = make_vlm("qwen2_vl", seed=1, hidden_size=128)[0], make_text_model(seed=2, hidden_size=128)
    seen = {"vision": count_rows(vision), "text": count_rows(text)}
    dataset = make_image_dataset(8)
    trainer = GNDPOTrainer(
        model=student,
        teacher_model={"vision": vision, "text": text},
        args=GNDPOConfig(**cpu_config_kwargs(cross_modal_distillation=True, per_device_train_batch_size=8)),
        train_dataset=dataset.add_column("teacher", ["vision", "text"] * 4),
        processing_class=processor,
        teacher_processing_class={"vision": processor, "text": make_tokenizer()},
    )
    records = record(trainer, {"vision": vision})
    trainer.train()
    routed = {"vision": 0, "text": 0}
    assert any(len({x["teacher"] for x in r["inputs"]}) == 2 for r in records), "a batch mixes both teachers"
    for r in records:
        names = [x["teacher"] for x in r["inputs"]]
        text_q = text_view_logps(text, r["batch"], processor)
        q = torch.stack([r["vision"][i] if name == "vision" else text_q[i] for i, name in enumerate(names)])
        for name in names:
            routed[name] += 1
        mask = r["batch"]["completion_mask"].bool()
        expected = whiten((q - r["p"]).clamp(-5, 5), mask)
        torch.testing.assert_close(r["batch"]["advantages"].double(), expected, rtol=1e-4, atol=1e-4)
    assert routed["vision"] > 0 and routed["text"] > 0
    assert {name: sum(rows) for name, rows in seen.items()} == routed


def test_text_teacher_with_another_chat_layout_is_warned_about(cpu_config_kwargs, caplog):
    student, processor = make_vlm("qwen2_vl", seed=0)
    for template, warned in (("qwen2_5", True), ("qwen2_5_vl", False)):  # qwen2_5 adds another system prompt
        caplog.clear()
        GNDPOTrainer(
            model=student,
            teacher_model=make_text_model(seed=1),
            args=GNDPOConfig(**cpu_config_kwargs(cross_modal_distillation=True)),
            train_dataset=make_image_dataset(4),
            processing_class=processor,
            teacher_processing_class=make_tokenizer(template),
        )
        assert ("lays a text conversation out differently" in caplog.text) == warned


def test_cross_modal_checks(cpu_config_kwargs):
    student, processor = make_vlm("qwen2_vl", seed=0)
    with pytest.raises(ValueError, match="no teacher is a text-only model"):
        GNDPOTrainer(
            model=student,
            teacher_model=make_vlm("qwen2_vl", seed=1)[0],
            args=GNDPOConfig(**cpu_config_kwargs(cross_modal_distillation=True)),
            train_dataset=make_image_dataset(4),
            processing_class=processor,
        )
    with pytest.raises(ValueError, match="needs the teacher's image view"):
        GNDPOTrainer(
            model=student,
            teacher_model=make_text_model(seed=1),
            args=GNDPOConfig(**cpu_config_kwargs(cross_modal_distillation=True, visual_gradient_steering=True)),
            train_dataset=make_image_dataset(4),
            processing_class=processor,
        )
    with pytest.raises(ValueError, match="no vision tower"):  # a reference model always scores the image view
        GNDPOTrainer(
            model=student,
            teacher_model=make_text_model(seed=1),
            reference_model=make_text_model(seed=2),
            args=GNDPOConfig(**cpu_config_kwargs(cross_modal_distillation=True, reward_extrapolation=1.25)),
            train_dataset=make_image_dataset(4),
            processing_class=processor,
        )
    with pytest.raises(ValueError, match="vocabulary"):  # the tokenizer checks still apply to a text teacher
        GNDPOTrainer(
            model=student,
            teacher_model=make_text_model(seed=1, vocab_size=100),
            args=GNDPOConfig(**cpu_config_kwargs(cross_modal_distillation=True)),
            train_dataset=make_image_dataset(4),
            processing_class=processor,
        )


# --------------------------------------------------------------------------------------------------------------------
# G-OPD reward correction: the teacher's base model as the reference of ExOPD


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_reference_model_replaces_the_initial_student(lora, cpu_config_kwargs):
    teacher, reference = make_text_model(seed=1, hidden_size=128), make_text_model(seed=3, hidden_size=128)
    trainer = GNDPOTrainer(
        model=make_text_model(seed=0),
        teacher_model=teacher,
        reference_model=reference,
        args=GNDPOConfig(**cpu_config_kwargs(reward_extrapolation=1.25)),
        train_dataset=make_text_dataset(),
        processing_class=make_tokenizer(),
        peft_config=LORA if lora else None,
    )
    assert trainer.base_model is reference
    records = record(trainer, {"q": teacher, "ref": reference})
    trainer.train()
    for r in records:
        mask = r["batch"]["completion_mask"].bool()
        signal = (1.25 * (r["q"] - r["ref"]) - (r["p"] - r["ref"])).clamp(-5, 5)
        torch.testing.assert_close(r["batch"]["advantages"].double(), whiten(signal, mask), rtol=1e-4, atol=1e-4)


def test_reference_model_needs_extrapolation(cpu_config_kwargs):  # the config's side: tests/test_errors.py
    with pytest.raises(ValueError, match="reward_extrapolation"):
        GNDPOTrainer(
            model=make_text_model(seed=0),
            teacher_model=make_text_model(seed=1),
            reference_model=make_text_model(seed=3),
            args=GNDPOConfig(**cpu_config_kwargs()),
            train_dataset=make_text_dataset(),
            processing_class=make_tokenizer(),
        )


def test_command_line_flags(tmp_path):
    from trl_gndpo.cli import parse

    _, config, _, _ = parse(
        [
            "--model_name_or_path",
            "student",
            "--dataset_name",
            "d",
            "--output_dir",
            str(tmp_path),
            "--teacher_models",
            '{"math": "m", "code": "c"}',
            "--teacher_device",
            '{"code": "cpu"}',
            "--teacher_column",
            "domain",
            "--reward_extrapolation",
            "1.25",
            "--reference_model_name_or_path",
            "base",
            "--cross_modal_distillation",
            "true",
        ]  # fmt: skip
    )
    assert config.teacher_models == {"math": "m", "code": "c"} and config.teacher_device == {"code": "cpu"}
    assert config.teacher_column == "domain" and config.reference_model_name_or_path == "base"
    assert config.cross_modal_distillation
    with pytest.raises(ValueError, match="--teacher_models given without --model_name_or_path"):
        parse(["--teacher_models", '{"math": "m"}', "--output_dir", str(tmp_path)])


def test_several_teachers_are_refused_with_sharded_engines(cpu_config_kwargs):
    from types import SimpleNamespace

    from trl_gndpo import checks, teachers

    args = GNDPOConfig(**cpu_config_kwargs())
    fsdp = SimpleNamespace(is_fsdp_enabled=True, is_deepspeed_enabled=False)
    with pytest.raises(ValueError, match="FSDP and DeepSpeed ZeRO-3"):
        checks.check_routing(args, fsdp, ["a", "b"], [routed_dataset(["a", "b"])])
    checks.check_routing(args, fsdp, [teachers.SINGLE], [make_text_dataset()])  # one teacher: as before


def test_several_teachers_in_evaluation(cpu_config_kwargs):
    trainer = GNDPOTrainer(
        model=make_text_model(seed=0),
        teacher_model={"a": make_text_model(seed=1), "b": make_text_model(seed=2)},
        args=GNDPOConfig(**cpu_config_kwargs(max_steps=1, eval_strategy="steps", eval_steps=1)),
        train_dataset=routed_dataset(["a", "b"]),
        eval_dataset=routed_dataset(["b", "a", "a"]),
        processing_class=make_tokenizer(),
    )
    trainer.train()
    logged = [e for e in trainer.state.log_history if "eval_gndpo/teacher/a/token_frac" in e]
    assert len(logged) == 1
    assert abs(logged[0]["eval_gndpo/teacher/a/token_frac"] + logged[0]["eval_gndpo/teacher/b/token_frac"] - 1) < 1e-6


# --------------------------------------------------------------------------------------------------------------------
# Issue 24: image rows scored by a text-only teacher are counted and warned about; G-OPD's teacher temperature


def text_view_image_fracs(trainer) -> list[float]:
    key = "gndpo/teacher/text_view_image_frac"
    return [h[key] for h in trainer.state.log_history if key in h]


@pytest.mark.parametrize("images", [True, False], ids=["image rows", "text rows"])
def test_image_rows_scored_by_a_text_only_teacher_are_counted_and_warned_about_once(images, cpu_config_kwargs, caplog):
    """Uni-OPD sends its text teacher text-domain rows (0, no warning); an image row read on its text view is not
    that setting, so it is counted (every row here) and warned about, once."""
    student, processor = make_vlm("qwen2_vl", seed=0)
    trainer = GNDPOTrainer(
        model=student,
        teacher_model=make_text_model(seed=1, hidden_size=128),
        args=GNDPOConfig(**cpu_config_kwargs(cross_modal_distillation=True, max_steps=3, logging_steps=1)),
        train_dataset=make_image_dataset(8) if images else make_text_dataset(8),
        processing_class=processor,
        teacher_processing_class=make_tokenizer("qwen2_5_vl"),
    )
    caplog.clear()
    with caplog.at_level("WARNING"):
        trainer.train()
    fracs = text_view_image_fracs(trainer)
    assert len(fracs) == 3 and all(f == (1.0 if images else 0.0) for f in fracs)
    assert caplog.text.count("image rows were scored by a text-only teacher") == (1 if images else 0)


def test_image_rows_routed_to_the_text_teacher_are_the_share_logged(cpu_config_kwargs):
    student, processor = make_vlm("qwen2_vl", seed=0)
    vision, text = make_vlm("qwen2_vl", seed=1, hidden_size=128)[0], make_text_model(seed=2, hidden_size=128)
    trainer = GNDPOTrainer(
        model=student,
        teacher_model={"vision": vision, "text": text},
        args=GNDPOConfig(**cpu_config_kwargs(cross_modal_distillation=True, per_device_train_batch_size=8)),
        train_dataset=make_image_dataset(8).add_column("teacher", ["vision", "text"] * 4),
        processing_class=processor,
        teacher_processing_class={"vision": processor, "text": make_tokenizer("qwen2_5_vl")},
    )
    records = record(trainer)
    trainer.train()
    expected = [sum(x["teacher"] == "text" for x in r["inputs"]) / len(r["inputs"]) for r in records]
    assert text_view_image_fracs(trainer) == pytest.approx(expected) and 0 < sum(expected) < len(expected)


def tempered_logps(model, batch, temperature):
    """log softmax(logits / temperature)(y_t) of the completion tokens, in float64."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention_mask).logits.double()
    length = batch["completion_ids"].size(1)
    logps = (logits[:, -length - 1 : -1] / temperature).log_softmax(-1)
    return logps.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("extrapolation", [1.0, 1.25])
def test_the_teacher_scores_at_g_opds_temperature(extrapolation, cpu_config_kwargs):
    """G-OPD's code scores teacher, student and references at the rollout temperature; GNDPO's scores its teacher at
    temperature 1. At temperature 0.7: the teacher at 0.7 under reward_extrapolation != 1, at 1 otherwise."""
    teacher, reference = make_text_model(seed=1, hidden_size=128), make_text_model(seed=3, hidden_size=128)
    trainer = GNDPOTrainer(
        model=make_text_model(seed=0),
        teacher_model=teacher,
        reference_model=reference if extrapolation != 1.0 else None,
        args=GNDPOConfig(
            **cpu_config_kwargs(reward_extrapolation=extrapolation, temperature=0.7, normalization_scope="none")
        ),
        train_dataset=make_text_dataset(),
        processing_class=make_tokenizer(),
    )
    assert trainer.args.teacher_temperature == (0.7 if extrapolation != 1.0 else 1.0)
    records, generate = [], trainer._generate_and_score_completions

    def spy(inputs):
        batch = generate(inputs)
        student = trainer.accelerator.unwrap_model(trainer.model)
        records.append((batch, *(tempered_logps(m, batch, 0.7) for m in (student, teacher, reference))))
        records[-1] += (tempered_logps(teacher, batch, 1.0),)
        return batch

    trainer._generate_and_score_completions = spy
    trainer.train()
    for batch, p, q, ref, q_one in records:
        mask = batch["completion_mask"].bool()
        if extrapolation == 1.0:
            signal = q_one - p
        else:
            signal = extrapolation * (q - ref) - (p - ref)
        expected = signal.clamp(-5, 5) * mask
        torch.testing.assert_close(batch["advantages"].double() * mask, expected, rtol=1e-4, atol=1e-4)


def test_a_served_teacher_cannot_score_at_g_opds_temperature(cpu_config_kwargs):
    with pytest.raises(ValueError, match="a teacher server returns log-probs at temperature 1"):
        GNDPOConfig(
            **cpu_config_kwargs(
                teacher_model_server_url="http://localhost:1", reward_extrapolation=1.25, temperature=0.7
            )
        )

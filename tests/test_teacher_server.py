"""A teacher served over HTTP (`teacher_model_server_url`): the same advantages as the local teacher, training end to
end, two processes, and the failures (server down, other tokenizer, smaller vocabulary, slow server, a token the
server does not score). The server is tests/teacher_server_app.py, a stand-in for `vllm serve` speaking the contract
TRL's `VLLMClient` uses, backed by the tiny teacher."""

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import torch
from test_distributed import calls, run_two_processes
from tiny_models import (
    VLM_FAMILIES,
    _trained_bpe,
    make_image,
    make_processor,
    make_text_dataset,
    make_text_model,
    make_tokenizer,
    save_tiny,
)
from transformers import Qwen2Tokenizer
from trl import GRPOTrainer

from trl_gndpo import GNDPOConfig, GNDPOTrainer, functional, teacher_server
from trl_gndpo.teacher_server import (
    TeacherServer,
    TeacherServerError,
    completion_logps,
    images_from_pixel_values,
    one_placeholder_per_image,
    request_sequences,
    rows_images,
)

TESTS = Path(__file__).parent


def make_teacher():
    return make_text_model(seed=1, hidden_size=128)  # as tests/distributed_run.py builds it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------------------------
# Without a server


def test_request_sequences_strip_the_padding_and_skip_empty_completions():
    pad = 0
    prompt_ids = torch.tensor([[pad, pad, 11, 12], [21, 22, 23, 24], [pad, 31, 32, 33]])
    prompt_mask = (prompt_ids != pad).long()
    completion_ids = torch.tensor([[13, 14, pad], [pad, pad, pad], [34, 35, 36]])
    completion_mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    rows, sequences, prompt_lengths = request_sequences(prompt_ids, prompt_mask, completion_ids, completion_mask)
    assert rows == [0, 2]
    assert sequences == [[11, 12, 13, 14], [31, 32, 33, 34, 35, 36]]
    assert prompt_lengths == [2, 3]


def test_completion_logps_align_with_the_mask_and_mark_unscored_tokens_nan():
    completion_mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]])
    answers = [[[-0.5], [-math.inf], [-1.5]], [[-2.0]]]  # row 2 got one log-prob for two tokens
    out = completion_logps(answers, [0, 2], completion_mask)
    assert out.dtype == torch.float32 and out.shape == completion_mask.shape
    expected = torch.tensor([[-0.5, math.nan, -1.5, math.nan], [math.nan] * 4, [-2.0, math.nan, math.nan, math.nan]])
    torch.testing.assert_close(out, expected, equal_nan=True)
    with pytest.raises(TeacherServerError, match="3 log-probs for a completion of 2 tokens"):
        completion_logps([[[-1.0]] * 3], [2], completion_mask)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"teacher_model_name_or_path": "t"}, "teacher_model_name_or_path configure a local one"),
        ({"teacher_offload": True}, "teacher_offload configure a local one"),
        ({"value_baseline": True}, "value_baseline needs the full next-token distributions"),
        ({"visual_gradient_steering": True}, "visual_gradient_steering needs"),
        ({"teacher_model_server_timeout": 0.0}, "teacher_model_server_timeout must be > 0"),
        ({"teacher_model_server_chunk_size": 0}, "teacher_model_server_chunk_size must be >= 1"),
    ],
)
def test_config_refuses_what_a_served_teacher_cannot_do(cpu_config_kwargs, options, message):
    with pytest.raises(ValueError, match=message):
        GNDPOConfig(**cpu_config_kwargs(teacher_model_server_url="http://127.0.0.1:8000", **options))


def test_several_server_urls_are_a_dict_or_its_json(cpu_config_kwargs):
    urls = {"math": "http://a:8001", "code": "http://b:8002"}
    config = GNDPOConfig(
        **cpu_config_kwargs(teacher_model_server_url='{"math": "http://a:8001", "code": "http://b:8002"}')
    )
    assert config.teacher_model_server_url == urls
    with pytest.raises(ValueError, match="names each teacher's server"):
        GNDPOConfig(**cpu_config_kwargs(teacher_model_server_url={"math": " "}))


def test_served_teacher_is_compatible_with_token_selection(cpu_config_kwargs):
    config = GNDPOConfig(**cpu_config_kwargs(teacher_model_server_url="http://x:8000", token_selection="quadrant"))
    assert config.teacher_model_server_url == "http://x:8000"


def test_a_local_and_a_served_teacher_together_are_refused(cpu_config_kwargs):
    args = GNDPOConfig(**cpu_config_kwargs(teacher_model_server_url="http://127.0.0.1:8000"))
    with pytest.raises(ValueError, match="Both a teacher model and teacher_model_server_url"):
        GNDPOTrainer(model=make_text_model(), teacher_model=make_teacher(), args=args, train_dataset=None)


def test_a_vision_language_student_needs_a_qwen_vl_processor(cpu_config_kwargs):
    args = GNDPOConfig(**cpu_config_kwargs(teacher_model_server_url="http://127.0.0.1:1"))
    with pytest.raises(ValueError, match="needs a Qwen2-VL / Qwen2.5-VL / Qwen3-VL processor"):
        teacher_server.connect(args, processing_class=make_tokenizer(), student=None, is_vlm=True)


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_images_rebuilt_from_pixel_values_give_the_same_pixel_values(family):
    """The images a vision-language student's batch is sent with are its own pixels: rebuilt from `pixel_values` and
    processed again by the family's processor, they give the same patches, for images of different sizes."""
    image_processor = make_processor(family).image_processor
    images = [make_image(0, 32), make_image(3, 48).resize((80, 40)), make_image(5, 64)]
    processed = image_processor(images=images, return_tensors="pt")
    rebuilt = images_from_pixel_values(processed["pixel_values"], processed["image_grid_thw"], image_processor)
    again = image_processor(images=rebuilt, return_tensors="pt")
    assert torch.equal(again["image_grid_thw"], processed["image_grid_thw"])
    assert torch.equal(again["pixel_values"], processed["pixel_values"])
    assert len({image.size for image in rebuilt}) > 1  # each at its own resized size


def test_one_placeholder_per_image():
    assert one_placeholder_per_image([1, 6, 6, 6, 2, 6, 6, 3, 6], image_token_id=6) == [1, 6, 2, 6, 3, 6]
    assert one_placeholder_per_image([6, 6], image_token_id=6) == [6]


def test_rows_images_select_each_rows_images():
    grid = torch.tensor([[1, 2, 2], [1, 2, 4], [1, 2, 2]])  # row 0: one image (4 patches); row 1: none; row 2: two
    images = {"pixel_values": torch.arange(16.0)[:, None], "image_grid_thw": grid, "num_images": [1, 0, 2]}
    last = rows_images(images, [2])
    assert last["pixel_values"][:, 0].tolist() == list(range(4, 16)) and last["num_images"] == [2]
    assert torch.equal(last["image_grid_thw"], grid[1:])
    first = rows_images(images, [0, 1])
    assert first["pixel_values"][:, 0].tolist() == [0, 1, 2, 3] and first["num_images"] == [1, 0]
    assert rows_images({"pixel_values": None}, [0]) == {}


def test_several_servers_each_score_their_rows_once():
    class Server:
        def __init__(self, value):
            self.value, self.calls = value, []

        def score(self, prompt_ids, prompt_mask, completion_ids, completion_mask, **images):
            self.calls.append(prompt_ids[:, -1].tolist())
            return torch.full(completion_mask.shape, self.value)

    servers = {"math": Server(-1.0), "code": Server(-2.0)}
    batch = {"prompt_ids": torch.tensor([[10], [11], [12]]), "prompt_mask": torch.ones(3, 1),
             "completion_ids": torch.zeros(3, 2, dtype=torch.long), "completion_mask": torch.ones(3, 2)}  # fmt: skip
    out = teacher_server.score_routed(servers, torch.tensor([1, 0, 1]), batch)
    assert out[:, 0].tolist() == [-2.0, -1.0, -2.0]
    assert servers["math"].calls == [[11]] and servers["code"].calls == [[10, 12]]


def test_server_down_is_a_clear_error_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TeacherServerError, match=f"Cannot reach the teacher server at {url}"):
        TeacherServer(url, timeout=0.5)


# --------------------------------------------------------------------------------------------------------------------
# Against a served teacher (one server process for the module)


def serve(directory):
    """tests/teacher_server_app.py serving the model saved in `directory`: the process and its URL."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    app = str(TESTS / "teacher_server_app.py")
    process = subprocess.Popen([sys.executable, app, str(directory)], stdout=subprocess.PIPE, text=True, env=env)
    return process, f"http://127.0.0.1:{int(process.stdout.readline())}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The tiny teacher saved and served by tests/teacher_server_app.py; yields its URL."""
    process, url = serve(save_tiny(make_teacher(), make_tokenizer(), tmp_path_factory.mktemp("served-teacher")))
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def configure(url, **settings):
    requests.post(f"{url}/_test/configure", json=settings, timeout=30).raise_for_status()


def served_requests(url):
    return requests.get(f"{url}/_test/requests", timeout=30).json()["requests"]


def make_trainer(config_kwargs, teacher=None, **options):
    args = GNDPOConfig(**config_kwargs(**options))
    dataset = make_text_dataset()
    return GNDPOTrainer(
        model=make_text_model(seed=0), teacher_model=teacher, args=args, train_dataset=dataset,
        processing_class=make_tokenizer(),
    )  # fmt: skip


@pytest.mark.slow
def test_served_advantages_equal_the_local_teachers_and_unscored_tokens_are_masked(
    server, cpu_config_kwargs, monkeypatch
):
    """The same generation batch through the local teacher and through the server gives the same advantages; then a
    token the server leaves out is masked and counted in gndpo/nonfinite_frac, and the rest stays finite."""
    local = make_trainer(cpu_config_kwargs, teacher=make_teacher())
    served = make_trainer(cpu_config_kwargs, teacher_model_server_url=server, teacher_model_server_chunk_size=3)
    generated = []
    original = GRPOTrainer._generate_and_score_completions

    def generate_once(self, inputs):
        batch = original(self, inputs)
        generated.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        return batch

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", generate_once)
    dataset = make_text_dataset()
    inputs = [dataset[i] for i in (0, 0, 1, 1)]
    expected = local._generate_and_score_completions(inputs)
    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", lambda self, inputs: dict(generated[0]))
    configure(server, clear_requests=True)
    got = served._generate_and_score_completions(inputs)

    mask = expected["loss_mask"].bool()
    assert mask.sum() > 4 and torch.equal(got["loss_mask"], expected["loss_mask"])
    assert expected["advantages"][mask].abs().max() > 0.1
    torch.testing.assert_close(got["advantages"], expected["advantages"], atol=1e-4, rtol=1e-4)
    mode = "train" if served.model.training else "eval"
    for key in ("gndpo/teacher_logp", "gndpo/reverse_kl", "gndpo/signal_std"):
        assert math.isclose(served._metrics[mode][key][-1], local._metrics[mode][key][-1], rel_tol=1e-4)
    asked = served_requests(server)
    _, sequences, _ = request_sequences(*(generated[0][k] for k in ("prompt_ids", "prompt_mask")),
                                        *(generated[0][k] for k in ("completion_ids", "completion_mask")))  # fmt: skip
    assert sorted(r["sequences"] for r in asked) == [1, 3]  # chunks of 3, sent concurrently (in any order)
    assert sorted(ids for r in asked for ids in r["ids"]) == sorted(sequences)  # unpadded prompt + completion ids
    assert all(r["prompt_logprobs"] == 0 and r["temperature"] == 1.0 for r in asked)  # the sampled token only

    completion_ids = generated[0]["completion_ids"]
    skipped = completion_ids[mask][0].item()
    hit = (completion_ids == skipped) & mask
    configure(server, skip_token=skipped)
    try:
        got = served._generate_and_score_completions(inputs)
    finally:
        configure(server, skip_token=None)
    assert torch.equal(got["loss_mask"].bool(), mask & ~hit)
    assert torch.isfinite(got["advantages"]).all() and (got["advantages"][hit] == 0).all()
    assert served._metrics[mode]["gndpo/nonfinite_frac"][-1] == pytest.approx(hit.sum().item() / mask.sum().item())


@pytest.mark.slow
def test_a_text_student_trains_against_the_served_teacher(server, cpu_config_kwargs):
    trainer = make_trainer(cpu_config_kwargs, teacher_model_server_url=server)
    assert trainer.teacher_model is None
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    configure(server, clear_requests=True)
    trainer.train()
    assert len(served_requests(server)) == 2  # one request per generation batch (4 sequences, chunks of 16)
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    logged = [row for row in trainer.state.log_history if "gndpo/teacher_logp" in row]
    assert len(logged) == 2
    assert all(math.isfinite(row["gndpo/teacher_logp"]) and row["gndpo/nonfinite_frac"] == 0 for row in logged)


@pytest.mark.slow
def test_a_slow_server_raises_a_timeout_naming_the_server(server):
    client = TeacherServer(server, timeout=1.0)
    configure(server, delay=3.0)
    try:
        with pytest.raises(TeacherServerError, match=rf"{server} failed to score 1 sequences: no answer within 1 s"):
            client.score(torch.tensor([[5, 6]]), torch.ones(1, 2), torch.tensor([[7, 8]]), torch.ones(1, 2))
    finally:
        configure(server, delay=0.0)


@pytest.mark.slow
def test_a_server_without_the_token_in_endpoint_is_an_error_saying_how_to_start_it(server):
    """A vision-language student's teacher needs `vllm serve --enable-scale-out` (the stand-in, like a plain `vllm
    serve`, has no /inference/v1/generate)."""
    from trl_gndpo.teacher_server import VisionTeacherServer

    client = VisionTeacherServer(server, image_processor=None, image_token_id=6, timeout=30)
    with pytest.raises(TeacherServerError, match="start it with `vllm serve TEACHER --enable-scale-out`"):
        client.score(torch.tensor([[5, 6]]), torch.ones(1, 2), torch.tensor([[7, 8]]), torch.ones(1, 2))


def other_tokenizer(directory):
    """The tiny tokenizer's vocabulary with half of its merges: same ids, different tokenization."""
    import json

    vocab, merges = (json.loads(x) for x in _trained_bpe())
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[tuple(m) for m in merges[: len(merges) // 2]], eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )  # fmt: skip
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.mark.slow
@pytest.mark.parametrize("wrong", ["tokenizer", "vocabulary"])
def test_a_server_with_another_tokenizer_fails_at_start_up(server, cpu_config_kwargs, tmp_path, wrong):
    if wrong == "tokenizer":
        settings, message = {"tokenizer_dir": other_tokenizer(tmp_path / "other")}, "tokenizes differently"
    else:
        vocab = make_text_model().config.vocab_size
        settings, message = {"vocab_limit": vocab - 1}, f"cannot score the student's vocabulary id {vocab - 1}"
    configure(server, **settings)
    try:
        with pytest.raises(TeacherServerError, match=message):
            make_trainer(cpu_config_kwargs, teacher_model_server_url=server)
    finally:
        configure(server, tokenizer_dir=None, vocab_limit=None)


@pytest.mark.slow
def test_two_processes_score_their_shares_and_whiten_like_the_local_teacher(server, tmp_path, monkeypatch):
    """Each rank sends its own rows; with the served log-probs replaced by the local teacher's, the globally whitened
    advantages are what each rank trained on."""
    monkeypatch.setenv("GNDPO_TEACHER_SERVER_URL", server)
    configure(server, clear_requests=True)
    ranks = run_two_processes(tmp_path, "server")["server"]
    teacher = make_teacher()
    served = [ids for r in served_requests(server) for ids in r["ids"]]
    steps = list(zip(*(calls(r, "scores") for r in ranks), *(calls(r, "batch") for r in ranks), strict=True))
    assert len(steps) == 2
    for scores0, scores1, batch0, batch1 in steps:
        signals, masks = [], []
        for scores, batch in ((scores0, batch0), (scores1, batch1)):
            ids = [scores[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")]
            rows, sequences, prompt_lengths = request_sequences(*ids)
            assert all(s in served for s in sequences)  # this rank's rows reached the server
            local = torch.full_like(scores["teacher"], math.nan)
            with torch.no_grad():
                for row, sequence, start in zip(rows, sequences, prompt_lengths, strict=True):
                    logps = torch.log_softmax(teacher(input_ids=torch.tensor([sequence])).logits[0], -1)
                    local[row, : len(sequence) - start] = logps[start - 1 : -1].gather(
                        1, torch.tensor(sequence[start:])[:, None]
                    )[:, 0]
            mask = batch["mask"].bool()
            torch.testing.assert_close(scores["teacher"][mask], local[mask], atol=1e-5, rtol=1e-5)
            signal, _ = functional.clamped_log_ratio(local, scores["student"], mask, 5.0)
            signals.append(signal), masks.append(mask)
        pooled = torch.cat([s[m] for s, m in zip(signals, masks, strict=True)]).double()
        for signal, mask, batch in zip(signals, masks, (batch0, batch1), strict=True):
            expected = (signal.double() - pooled.mean()) / torch.sqrt(pooled.var() + 1e-8) * mask
            torch.testing.assert_close(batch["advantages"].double(), expected, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------------------------------
# Several served teachers


@pytest.mark.slow
def test_several_served_teachers_each_score_their_routed_rows(server, tmp_path, cpu_config_kwargs):
    """`teacher_model_server_url={"math": URL, "code": URL}` with the `teacher` column: each server scores only the
    rows routed to it, once per generation batch, and the advantages are those of the two local teachers routed the
    same way (one whitening over both); per-teacher metrics are logged as for local teachers."""
    from test_estimators import whiten
    from test_teachers import record, routed_dataset

    code_teacher = make_text_model(seed=2, num_hidden_layers=3)
    process, code_url = serve(save_tiny(code_teacher, make_tokenizer(), tmp_path / "code"))
    try:
        urls = {"math": server, "code": code_url}
        args = GNDPOConfig(**cpu_config_kwargs(teacher_model_server_url=urls, per_device_train_batch_size=8))
        trainer = GNDPOTrainer(
            model=make_text_model(seed=0), args=args, train_dataset=routed_dataset(["math", "code"]),
            processing_class=make_tokenizer(),
        )  # fmt: skip
        for url in urls.values():  # forget the start-up checks' requests
            configure(url, clear_requests=True)
        records = record(trainer, {"math": make_teacher(), "code": code_teacher})
        trainer.train()
        asked = {name: served_requests(url) for name, url in urls.items()}
    finally:
        process.terminate()
        process.wait(timeout=30)
    routed = {"math": [], "code": []}
    for r in records:
        names = [x["teacher"] for x in r["inputs"]]
        keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
        rows, sequences, _ = request_sequences(*(r["batch"][k] for k in keys))
        for row, sequence in zip(rows, sequences, strict=True):
            routed[names[row]].append(sequence)
        q = torch.stack([r[name][i] for i, name in enumerate(names)])
        mask = r["batch"]["completion_mask"].bool()
        expected = whiten((q - r["p"]).clamp(-5, 5), mask)
        torch.testing.assert_close(r["batch"]["advantages"].double(), expected, rtol=1e-4, atol=1e-4)
    assert any(len({x["teacher"] for x in r["inputs"]}) == 2 for r in records), "a batch mixes both teachers"
    for name in ("math", "code"):
        assert len(asked[name]) == len(records)  # one request per generation batch (chunks of 16)
        assert sorted(ids for r in asked[name] for ids in r["ids"]) == sorted(routed[name])
    logged = [entry for entry in trainer.state.log_history if "gndpo/teacher/math/token_frac" in entry]
    assert logged and all(
        abs(e["gndpo/teacher/math/token_frac"] + e["gndpo/teacher/code/token_frac"] - 1) < 1e-6 for e in logged
    )

"""A teacher served over HTTP (`teacher_model_server_url`): the same advantages as the local teacher, training end to
end (in two processes: tests/test_distributed.py), and the failures (server down, other tokenizer, smaller
vocabulary, slow server, a token the server does not score, a /health that never answers, broken replies, a restart
mid-run, a server down for good), the URLs refused and the API key (sent, and written nowhere). The server is
tests/teacher_server_app.py, a stand-in for `vllm serve` speaking the contract TRL's `VLLMClient` uses, backed by the
tiny teacher."""

import logging
import math
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from helpers import (
    assert_same_state,
    configure_server,
    free_port,
    keep_generation_batches,
    record,
    routed_dataset,
    served_requests,
    served_teacher,
    whiten,
)
from tiny_models import (
    VLM_FAMILIES,
    _trained_bpe,
    cpu_grpo_kwargs,
    make_image,
    make_processor,
    make_text_dataset,
    make_text_model,
    make_tokenizer,
    save_tiny,
)
from transformers import Qwen2Tokenizer
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as transformers_logging
from trl import GRPOTrainer

from trl_gndpo import GNDPOConfig, GNDPOTrainer, teacher_server
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
SECRET = "s3cret-Key-0123456789"  # an API key or URL token that must never be written anywhere


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
        GNDPOTrainer(model=make_text_model(), teacher_model=served_teacher(), args=args, train_dataset=None)


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
# Against a served teacher (one server process for the session; restarts start their own)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """The tiny teacher saved with its tokenizer, for tests/teacher_server_app.py to serve."""
    return save_tiny(served_teacher(), make_tokenizer(), tmp_path_factory.mktemp("served-teacher"))


def start_server(directory, port: int = 0) -> tuple[subprocess.Popen, str]:
    """tests/teacher_server_app.py serving `directory` on `port` (0: any free one), once it listens."""
    command = [sys.executable, str(TESTS / "teacher_server_app.py"), str(directory), "--port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    return process, f"http://127.0.0.1:{int(process.stdout.readline())}"


def stop(process: subprocess.Popen) -> None:
    process.kill()
    process.wait(timeout=30)


@pytest.fixture
def server(teacher_server_url):
    """The session's served tiny teacher (conftest.py): its URL."""
    return teacher_server_url


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
    local = make_trainer(cpu_config_kwargs, teacher=served_teacher())
    served = make_trainer(cpu_config_kwargs, teacher_model_server_url=server, teacher_model_server_chunk_size=3)
    generated = keep_generation_batches(monkeypatch)
    dataset = make_text_dataset()
    inputs = [dataset[i] for i in (0, 0, 1, 1)]
    expected = local._generate_and_score_completions(inputs)
    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", lambda self, inputs: dict(generated[0]))
    configure_server(server, clear_requests=True)
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
    configure_server(server, skip_token=skipped)
    try:
        got = served._generate_and_score_completions(inputs)
    finally:
        configure_server(server, skip_token=None)
    assert torch.equal(got["loss_mask"].bool(), mask & ~hit)
    assert torch.isfinite(got["advantages"]).all() and (got["advantages"][hit] == 0).all()
    assert served._metrics[mode]["gndpo/nonfinite_frac"][-1] == pytest.approx(hit.sum().item() / mask.sum().item())


@pytest.mark.slow
def test_a_text_student_trains_against_the_served_teacher(server, cpu_config_kwargs):
    trainer = make_trainer(cpu_config_kwargs, teacher_model_server_url=server)
    assert trainer.teacher_model is None
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    configure_server(server, clear_requests=True)
    trainer.train()
    assert len(served_requests(server)) == 2  # one request per generation batch (4 sequences, chunks of 16)
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    logged = [row for row in trainer.state.log_history if "gndpo/teacher_logp" in row]
    assert len(logged) == 2
    assert all(math.isfinite(row["gndpo/teacher_logp"]) and row["gndpo/nonfinite_frac"] == 0 for row in logged)


@pytest.mark.slow
def test_a_slow_server_raises_a_timeout_naming_the_server(server):
    client = TeacherServer(server, timeout=1.0)
    configure_server(server, delay=3.0)
    try:
        with pytest.raises(TeacherServerError, match=rf"{server} failed to score 1 sequences: no answer within 1 s"):
            client.score(torch.tensor([[5, 6]]), torch.ones(1, 2), torch.tensor([[7, 8]]), torch.ones(1, 2))
    finally:
        configure_server(server, delay=0.0)


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
    configure_server(server, **settings)
    try:
        with pytest.raises(TeacherServerError, match=message):
            make_trainer(cpu_config_kwargs, teacher_model_server_url=server)
    finally:
        configure_server(server, tokenizer_dir=None, vocab_limit=None)


# --------------------------------------------------------------------------------------------------------------------
# Faults and secrets: URLs, API key, a server that never answers, restarts or stays down, broken replies


@pytest.mark.parametrize(
    "url, message",
    [
        ("localhost:8000", "must be an http:// or https:// URL with a host"),
        ("127.0.0.1:8000", "must be an http:// or https:// URL with a host"),
        ("ftp://teacher-node:8000", "must be an http:// or https:// URL with a host"),
        ("http://teacher-node:port", "is not a valid URL"),
        (f"http://user:{SECRET}@teacher-node:8000", "must not carry credentials.*teacher_model_server_api_key"),
        (f"http://teacher-node:8000/?token={SECRET}", "must not carry credentials, a query string"),
    ],
)
def test_malformed_urls_and_urls_with_secrets_are_refused_with_the_secret_redacted(cpu_config_kwargs, url, message):
    with pytest.raises(ValueError, match=f"teacher_model_server_url {message}") as refused:
        GNDPOConfig(**cpu_config_kwargs(teacher_model_server_url=url))
    with pytest.raises(ValueError, match=message) as refused_too:  # also when the server class is used directly
        TeacherServer(url, timeout=0.5)
    assert SECRET not in str(refused.value) + str(refused_too.value)


def test_the_api_key_stays_out_of_the_config_s_dict_json_str_repr_and_pickle(cpu_config_kwargs):
    args = GNDPOConfig(
        **cpu_config_kwargs(teacher_model_server_url="http://teacher-node:8000", teacher_model_server_api_key=SECRET)
    )
    assert args.to_dict()["teacher_model_server_api_key"] == "<TEACHER_MODEL_SERVER_API_KEY>"  # hub_token's way
    for text in (args.to_json_string(), str(args.to_sanitized_dict()), str(args), repr(args)):
        assert SECRET not in text
    pickled = pickle.dumps(args)  # what training_args.bin holds (torch.save pickles the arguments)
    assert SECRET.encode() not in pickled and pickle.loads(pickled).teacher_model_server_api_key is None
    assert args.teacher_model_server_api_key == SECRET  # the live arguments keep it
    with pytest.raises(ValueError, match="teacher_model_server_api_key is set without teacher_model_server_url"):
        GNDPOConfig(**cpu_config_kwargs(teacher_model_server_api_key=SECRET))
    with pytest.raises(ValueError, match="teacher_model_server_retry_timeout must be a finite number >= 0"):
        GNDPOConfig(**cpu_config_kwargs(teacher_model_server_url="http://x:1", teacher_model_server_retry_timeout=-1))


def test_a_health_check_that_never_answers_times_out():
    """A server that accepts connections and never answers (here a socket nobody reads: the kernel completes the
    connection) must fail start-up after the timeout; TRL's check_server sends its /health request without one."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        outcome = []

        def connect():
            try:
                TeacherServer(url, timeout=1.0)
            except Exception as error:
                outcome.append(error)

        thread = threading.Thread(target=connect, daemon=True)
        thread.start()
        thread.join(timeout=30)
        assert not thread.is_alive(), "start-up hangs on a /health that never answers"
    assert isinstance(outcome[0], TeacherServerError)
    assert f"Cannot reach the teacher server at {url} (teacher_model_server_url) within 1 s" in str(outcome[0])


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault, message",
    [
        ("positive_logprob", r"it returned a log-prob of 0.5 > 0, which no probability has"),
        ("extra_logprob", r"it returned 5 prompt log-probs for a sequence of 4 tokens"),
        ("error_200", r"it answered 200 with an error: The engine is sleeping \(test fault\)"),
    ],
)
def test_a_broken_reply_is_a_clear_error_with_the_server_s_message(server, fault, message):
    """Impossible log-probs, more log-probs than tokens, or a 200 reply with an error body: never trained on silently,
    never an IndexError/KeyError from inside TRL's client."""
    client = TeacherServer(server, timeout=30)
    configure_server(server, fault=fault)
    try:
        with pytest.raises(TeacherServerError, match=rf"{server} failed to score 1 sequences: {message}"):
            client.score(torch.tensor([[5, 6]]), torch.ones(1, 2), torch.tensor([[7, 8]]), torch.ones(1, 2))
    finally:
        configure_server(server, fault=None)


@pytest.fixture
def keyed_server(server):
    """The served teacher wanting `Authorization: Bearer SECRET`, as `vllm serve --api-key SECRET` does."""
    configure_server(server, api_key=SECRET)
    try:
        yield server
    finally:
        configure_server(server, api_key=None)


@pytest.mark.slow
def test_a_server_with_a_key_refuses_requests_without_it_and_gets_it_from_the_config_or_environment(
    keyed_server, cpu_config_kwargs, monkeypatch
):
    assert requests.get(f"{keyed_server}/v1/models", timeout=30).status_code == 401
    wrong = {"Authorization": "Bearer not-the-key"}
    completion = {"prompt": [[5, 6, 7]], "max_tokens": 1, "prompt_logprobs": 0}
    assert (
        requests.post(f"{keyed_server}/v1/completions", json=completion, headers=wrong, timeout=30).status_code == 401
    )
    student, tokenizer = make_text_model(), make_tokenizer()
    monkeypatch.delenv("TEACHER_MODEL_SERVER_API_KEY", raising=False)
    args = GNDPOConfig(**cpu_config_kwargs(teacher_model_server_url=keyed_server))
    with pytest.raises(
        TeacherServerError, match="HTTP 401: Unauthorized .*teacher_model_server_api_key or TEACHER_MO"
    ):
        teacher_server.connect(args, tokenizer, student, is_vlm=False)
    batch = torch.tensor([[5, 6]]), torch.ones(1, 2), torch.tensor([[7, 8]]), torch.ones(1, 2)
    keyed = GNDPOConfig(
        **cpu_config_kwargs(teacher_model_server_url=keyed_server, teacher_model_server_api_key=SECRET)
    )
    assert torch.isfinite(teacher_server.connect(keyed, tokenizer, student, is_vlm=False).score(*batch)).all()
    monkeypatch.setenv("TEACHER_MODEL_SERVER_API_KEY", SECRET)
    assert torch.isfinite(teacher_server.connect(args, tokenizer, student, is_vlm=False).score(*batch)).all()


@pytest.mark.slow
def test_a_run_with_an_api_key_writes_the_key_in_no_file_and_no_log_line(
    keyed_server, cpu_config_kwargs, caplog, capfd
):
    """Checkpoints (training_args.bin, trainer_state.json, ...), the final save, the model card and every log line at
    INFO of a run given the key in its arguments."""
    transformers_logging.set_verbosity_info()
    transformers_logging.enable_propagation()
    caplog.set_level(logging.INFO)
    try:
        trainer = make_trainer(
            cpu_config_kwargs, teacher_model_server_url=keyed_server, teacher_model_server_api_key=SECRET,
            save_strategy="steps", save_steps=1, log_level="info",
        )  # fmt: skip
        trainer.train()
        trainer.save_model()
    finally:
        transformers_logging.disable_propagation()
        transformers_logging.set_verbosity_warning()
    files = [path for path in Path(trainer.args.output_dir).rglob("*") if path.is_file()]
    names = [path.name for path in files]
    assert names.count("training_args.bin") == 3 and {"README.md", "trainer_state.json"} <= set(names)
    assert [str(path) for path in files if SECRET.encode() in path.read_bytes()] == []
    logged = caplog.text + "".join(capfd.readouterr())
    assert "GNDPO: the teacher" in logged and "Saving model checkpoint" in logged  # INFO lines were captured
    assert SECRET not in logged


def train_against(url: str, output_dir, resume: bool = False, **overrides) -> GNDPOTrainer:
    """3 steps against the server at `url`, saving a checkpoint after each."""
    options = dict(max_steps=3, save_strategy="steps", save_steps=1, teacher_model_server_url=url, **overrides)
    args = GNDPOConfig(**cpu_grpo_kwargs(output_dir=str(output_dir), **options))
    trainer = GNDPOTrainer(
        model=make_text_model(seed=0), args=args, train_dataset=make_text_dataset(), processing_class=make_tokenizer()
    )
    trainer.train(resume_from_checkpoint=True if resume else None)
    return trainer


def assert_same_training(expected: GNDPOTrainer, actual: GNDPOTrainer) -> None:
    """Bit-equal weights and optimizer state, and the same logged steps and losses."""
    for (name, e), a in zip(expected.model.named_parameters(), actual.model.parameters(), strict=True):
        assert torch.equal(e, a), name
    assert_same_state(expected.optimizer.state_dict(), actual.optimizer.state_dict())

    def losses(trainer):
        return [(row["step"], row["loss"]) for row in trainer.state.log_history if "loss" in row]

    assert losses(actual) == losses(expected) and len(losses(expected)) == 3


@pytest.fixture(scope="module")
def uninterrupted(teacher_server_url, tmp_path_factory):
    return train_against(teacher_server_url, tmp_path_factory.mktemp("uninterrupted"))


@pytest.mark.slow
def test_a_server_restarted_mid_request_is_waited_for_and_training_continues_identically(
    teacher_dir, uninterrupted, tmp_path, monkeypatch
):
    """The server is killed while it answers the second step's request and started again on the same port: the request
    is retried until it answers, and the run ends bit-equal to the uninterrupted one."""
    process, url = start_server(teacher_dir)
    servers, original, scored = [process], TeacherServer.score, []

    def restart():
        time.sleep(0.5)
        stop(servers[-1])
        servers.append(start_server(teacher_dir, port=int(url.rsplit(":", 1)[1]))[0])

    def score(self, *batch):
        scored.append(1)
        if len(scored) != 2:
            return original(self, *batch)
        configure_server(url, delay=2.0)  # the request is in flight when the server dies
        thread = threading.Thread(target=restart)
        thread.start()
        try:
            return original(self, *batch)
        finally:
            thread.join()

    monkeypatch.setattr(TeacherServer, "score", score)
    captured = CaptureLogger(teacher_server.logger)
    try:
        with captured:
            trainer = train_against(url, tmp_path, teacher_model_server_retry_timeout=120)
        assert len(servers) == 2 and len(served_requests(url)) == 2  # the retried step and the last one
    finally:
        stop(servers[-1])
    assert f"The teacher server at {url} is unreachable" in captured.out and "answers again" in captured.out
    assert_same_training(uninterrupted, trainer)


@pytest.mark.slow
def test_a_server_down_for_good_stops_the_run_and_its_last_checkpoint_resumes_exactly(
    teacher_dir, uninterrupted, tmp_path, monkeypatch
):
    """The server dies before the third step and does not come back within teacher_model_server_retry_timeout: the
    run stops with an error naming the server and the wait; the step it was in saves nothing, so the newest checkpoint
    is the second, and resuming from it once the server is back ends bit-equal to the uninterrupted run."""
    process, url = start_server(teacher_dir)
    original, scored = TeacherServer.score, []

    def score(self, *batch):
        scored.append(1)
        if len(scored) == 3:
            stop(process)
        return original(self, *batch)

    monkeypatch.setattr(TeacherServer, "score", score)
    stopped = rf"{url} failed to score \d+ sequences: the server stayed unreachable for \d+ s .*retry_timeout=1\)"
    try:
        with pytest.raises(TeacherServerError, match=stopped + ".*resume from the last checkpoint"):
            train_against(url, tmp_path, teacher_model_server_retry_timeout=1)
    finally:
        stop(process)  # already stopped unless the run failed before its third step
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    monkeypatch.setattr(TeacherServer, "score", original)
    process, _ = start_server(teacher_dir, port=int(url.rsplit(":", 1)[1]))  # the server is back
    try:
        trainer = train_against(url, tmp_path, resume=True)
    finally:
        stop(process)
    assert_same_training(uninterrupted, trainer)


# --------------------------------------------------------------------------------------------------------------------
# Several served teachers


@pytest.mark.slow
def test_several_served_teachers_each_score_their_routed_rows(server, tmp_path, cpu_config_kwargs):
    """`teacher_model_server_url={"math": URL, "code": URL}` with the `teacher` column: each server scores only the
    rows routed to it, once per generation batch, and the advantages are those of the two local teachers routed the
    same way (one whitening over both); per-teacher metrics are logged as for local teachers."""
    code_teacher = make_text_model(seed=2, num_hidden_layers=3)
    process, code_url = start_server(save_tiny(code_teacher, make_tokenizer(), tmp_path / "code"))
    try:
        urls = {"math": server, "code": code_url}
        args = GNDPOConfig(**cpu_config_kwargs(teacher_model_server_url=urls, per_device_train_batch_size=8))
        trainer = GNDPOTrainer(
            model=make_text_model(seed=0), args=args, train_dataset=routed_dataset(["math", "code"]),
            processing_class=make_tokenizer(),
        )  # fmt: skip
        for url in urls.values():  # forget the start-up checks' requests
            configure_server(url, clear_requests=True)
        records = record(trainer, {"math": served_teacher(), "code": code_teacher})
        trainer.train()
        asked = {name: served_requests(url) for name, url in urls.items()}
    finally:
        stop(process)
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

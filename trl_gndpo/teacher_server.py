"""The teacher behind a vLLM server (`teacher_model_server_url`): scoring the sampled tokens over HTTP.

Owns the connection (TRL's `VLLMClient`, given a per-request timeout), the start-up check that the served model
tokenizes like the student and covers its vocabulary, the refusal of what a server cannot give (images, hidden
states, full distributions), and the conversion of a generation batch: padded prompt and completion ids become one
unpadded `prompt + completion` sequence per row, scored in chunks of concurrent requests, and the answers come back
as a `(B, T)` float32 tensor of the teacher's log-probs of the sampled tokens, NaN where the server gave none (the
trainer masks those tokens and counts them in `gndpo/nonfinite_frac`).

The protocol is the one TRL's client speaks: vLLM's OpenAI-compatible `POST /v1/completions` with the token ids as
`prompt`, `max_tokens=1` and `prompt_logprobs=0` (only the sampled token's log-prob), plus `GET /health`,
`GET /v1/models` and `POST /tokenize`: a plain `vllm serve TEACHER` answers all of them.
"""

import contextlib
import math

import requests
import torch
from requests.adapters import HTTPAdapter
from transformers.utils import logging
from trl.generation import vllm_client
from trl.generation.vllm_client import VLLMClient
from urllib3.util.retry import Retry

logger = logging.get_logger(__name__)

# Text whose token ids the student and the server must agree on; every special token of the student is added.
_PROBE = "The quick brown fox jumps over the lazy dog. 12 + 7 = 19; naïve café ✓ 你好\n\tdef f(x):\n  return x**2"


class TeacherServerError(RuntimeError):
    """The teacher server could not be reached, answered with an error or too late, or serves another tokenizer."""


class _TimeoutSession(requests.Session):
    """A session whose requests time out after `timeout` seconds unless the caller sets its own timeout."""

    def __init__(self, timeout: float):
        super().__init__()
        self.timeout = timeout

    def request(self, method, url, **kwargs):
        kwargs.setdefault("timeout", self.timeout)
        return super().request(method, url, **kwargs)


@contextlib.contextmanager
def _without_vllm_import_check():
    """TRL's client refuses to start without vLLM installed, which only its weight-sync methods need; scoring needs
    only HTTP, so the training processes need not install vLLM."""
    original = vllm_client.is_vllm_available
    vllm_client.is_vllm_available = lambda *args, **kwargs: True
    try:
        yield
    finally:
        vllm_client.is_vllm_available = original


def request_sequences(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[list[int], list[list[int]], list[int]]:
    """The rows to score and, for each, its unpadded `prompt + completion` token ids and prompt length.

    Prompts are left-padded and completions right-padded (GRPOTrainer's layout); the masks say which ids are real.
    Rows without a completion token (e.g. masked truncated completions) are not sent.
    """
    rows, sequences, prompt_lengths = [], [], []
    prompt_mask, completion_mask = prompt_mask.bool().cpu(), completion_mask.bool().cpu()
    for row, (p_ids, p_mask, c_ids, c_mask) in enumerate(
        zip(prompt_ids.cpu(), prompt_mask, completion_ids.cpu(), completion_mask, strict=True)
    ):
        if not c_mask.any():
            continue
        prompt = p_ids[p_mask].tolist()
        rows.append(row)
        sequences.append(prompt + c_ids[c_mask].tolist())
        prompt_lengths.append(len(prompt))
    return rows, sequences, prompt_lengths


def completion_logps(
    actual_logprobs: list[list[list[float]]], rows: list[int], completion_mask: torch.Tensor
) -> torch.Tensor:
    """Scatter the server's per-row log-probs of the sampled tokens (TRL's `actual_logprobs`, one `[logprob]` per
    completion token) into a float32 tensor shaped like `completion_mask`. Positions not scored, or scored with a
    non-finite value (TRL's client writes -inf for a token the server left out), are NaN."""
    out = torch.full(completion_mask.shape, math.nan, dtype=torch.float32)
    lengths = completion_mask.bool().sum(1).tolist()
    for row, values in zip(rows, actual_logprobs, strict=True):
        if len(values) > lengths[row]:
            raise TeacherServerError(
                f"The teacher server returned {len(values)} log-probs for a completion of {lengths[row]} tokens."
            )
        if values:
            scored = torch.tensor([v[0] for v in values], dtype=torch.float32)
            out[row, : len(values)] = torch.where(torch.isfinite(scored), scored, math.nan)
    return out.to(completion_mask.device)


class TeacherServer:
    """A teacher served by vLLM, scoring the sampled tokens of each process's share of the generation batch.

    Args:
        url: the server's base URL, e.g. `"http://teacher-node:8000"`.
        timeout: seconds to wait for the server to come up, and for each scoring request.
        chunk_size: sequences per request.
        max_concurrent_requests: requests in flight at once.
    """

    def __init__(self, url: str, timeout: float = 300.0, chunk_size: int = 16, max_concurrent_requests: int = 4):
        self.url, self.timeout = url.rstrip("/"), timeout
        self.chunk_size, self.max_concurrent_requests = chunk_size, max_concurrent_requests
        try:
            with _without_vllm_import_check():
                self.client = VLLMClient(base_url=self.url, connection_timeout=timeout)
        except Exception as error:
            raise TeacherServerError(
                f"Cannot reach the teacher server at {self.url} (teacher_model_server_url) within {timeout:g} s: "
                f"{error}. Start it with `vllm serve TEACHER` and check the address, or raise "
                "teacher_model_server_timeout if it is still loading."
            ) from error
        # One attempt per read (a slow server fails after `timeout`, not after retries of it); a refused connection
        # or a 500/502/503 is retried a few times with back-off, as TRL's client does.
        retry = Retry(
            total=3, connect=3, read=0, status=3, status_forcelist=[500, 502, 503], backoff_factor=1,
            allowed_methods=["POST", "GET"],
        )  # fmt: skip
        session = _TimeoutSession(timeout)
        adapter = HTTPAdapter(max_retries=retry, pool_maxsize=max(max_concurrent_requests, 1))
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        self.client.session = session

    def _error(self, what: str, error: Exception) -> TeacherServerError:
        if isinstance(error, requests.Timeout) or "timed out" in str(error).lower():
            reason = f"no answer within {self.timeout:g} s (teacher_model_server_timeout)"
        else:
            reason = f"{type(error).__name__}: {error}"
        return TeacherServerError(f"The teacher server at {self.url} failed to {what}: {reason}")

    def sequence_logprobs(self, sequences: list[list[int]], prompt_lengths: list[int]) -> list[list[list[float]]]:
        """The teacher's log-prob of each completion token (TRL's `actual_logprobs`), for the sampled token only."""
        if not sequences:
            return []
        try:
            result = self.client.get_sequence_logprobs(
                sequences,
                prompt_lengths,
                top_logprobs=0,  # only the sampled token's log-prob, which vLLM always returns
                temperature=1.0,
                chunk_size=self.chunk_size,
                max_concurrent_requests=self.max_concurrent_requests,
            )
        except Exception as error:  # TRL's client raises bare Exceptions for HTTP errors
            raise self._error(f"score {len(sequences)} sequences", error) from error
        return result["actual_logprobs"]

    @torch.no_grad()
    def score(self, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
        """`log q(y_t)` of every completion token of the batch, `(B, T)` float32, NaN where the server gave none."""
        rows, sequences, prompt_lengths = request_sequences(prompt_ids, prompt_mask, completion_ids, completion_mask)
        return completion_logps(self.sequence_logprobs(sequences, prompt_lengths), rows, completion_mask)

    def check_tokenizer(self, tokenizer, vocab_size: int) -> None:
        """Fail unless the server tokenizes a probe text exactly like `tokenizer` and scores the student's last
        vocabulary id (`vocab_size - 1`): then it can score every token the student samples, with the same meaning."""
        probe = " ".join([*tokenizer.all_special_tokens, _PROBE])
        expected = tokenizer(probe, add_special_tokens=False)["input_ids"]
        payload = {"model": self.client.model, "prompt": probe, "add_special_tokens": False}
        try:
            response = self.client.session.post(f"{self.url}/tokenize", json=payload)
            response.raise_for_status()
            served = response.json()["tokens"]
        except Exception as error:
            raise self._error("tokenize a probe text (POST /tokenize)", error) from error
        if served != expected:
            at = next(
                (i for i, (a, b) in enumerate(zip(served, expected, strict=False)) if a != b),
                min(len(served), len(expected)),
            )
            raise TeacherServerError(
                f"The teacher served at {self.url} ({self.client.model}) tokenizes differently from the student: a "
                f"probe text gives {len(served)} ids there and {len(expected)} here, first differing at position {at} "
                f"({served[at : at + 4]} vs {expected[at : at + 4]}). GNDPO scores the student's token ids with the "
                "teacher, so both must share one tokenizer: serve a teacher of the student's family."
            )
        sequence = [*expected, vocab_size - 1]
        try:
            logps = self.sequence_logprobs([sequence], [1])[0]
        except TeacherServerError as error:
            raise TeacherServerError(
                f"The teacher served at {self.url} ({self.client.model}) cannot score the student's vocabulary id "
                f"{vocab_size - 1} (the student has {vocab_size} rows): {error}. Serve a teacher with the student's "
                "tokenizer."
            ) from error
        if len(logps) != len(sequence) - 1 or not all(math.isfinite(v[0]) for v in logps):
            raise TeacherServerError(
                f"The teacher served at {self.url} returned {len(logps)} log-probs for a probe of {len(sequence) - 1} "
                "scored tokens, or a non-finite one: it must return `prompt_logprobs` for every prompt token "
                "(vLLM's /v1/completions does)."
            )


def connect(args, processing_class, student, is_vlm: bool) -> TeacherServer:
    """Refuse what a served teacher cannot do, connect, and check the server's tokenizer against the student's."""
    if is_vlm:
        raise ValueError(
            "teacher_model_server_url scores token ids through vLLM's /v1/completions, which takes no images, so "
            "the teacher would score a vision-language student's completions without seeing the images. Use a "
            "local teacher (teacher_model / teacher_model_name_or_path) for vision-language students."
        )
    server = TeacherServer(
        args.teacher_model_server_url,
        timeout=args.teacher_model_server_timeout,
        chunk_size=args.teacher_model_server_chunk_size,
        max_concurrent_requests=args.teacher_model_server_max_concurrent_requests,
    )
    server.check_tokenizer(processing_class, student.config.get_text_config().vocab_size)
    logger.info(f"GNDPO: the teacher {server.client.model} served at {server.url} scores the sampled tokens.")
    return server

"""The teacher behind a vLLM server (`teacher_model_server_url`): scoring the sampled tokens over HTTP.

Owns the connection (TRL's `VLLMClient`, given a per-request timeout), the start-up check that the served model
tokenizes like the student and covers its vocabulary, the refusal of what a server cannot give (images, hidden
states, full distributions), and the conversion of a generation batch: padded prompt and completion ids become one
unpadded `prompt + completion` sequence per row, scored in chunks of concurrent requests, and the answers come back
as a `(B, T)` float32 tensor of the teacher's log-probs of the sampled tokens, NaN where the server gave none (the
trainer masks those tokens and counts them in `gndpo/nonfinite_frac`).

The protocol is the one TRL's client speaks: vLLM's OpenAI-compatible `POST /v1/completions` with the token ids as
`prompt`, `max_tokens=1` and `prompt_logprobs=0` (only the sampled token's log-prob), plus `GET /health`,
`GET /v1/models` and `POST /tokenize`: a plain `vllm serve TEACHER` answers all of them. A server started with
`--api-key KEY` wants `Authorization: Bearer KEY` on its `/v1` routes; the client sends it on every request.

The request layer: every request has a timeout; a server that is down or restarting (refused or dropped connections,
502/503/504) is retried until `retry_timeout` seconds have passed, so a restart mid-run costs a wait and not the run;
every reply is checked (an error body, one log-prob per prompt token, no positive log-prob) so that a broken server
stops training with its own message rather than training on garbage or failing deep in TRL's client.
"""

import contextlib
import math
import os
import time
from urllib.parse import urlsplit, urlunsplit

import requests
import torch
from requests.adapters import HTTPAdapter
from transformers.utils import logging
from trl.generation import vllm_client
from trl.generation.vllm_client import VLLMClient

logger = logging.get_logger(__name__)

API_KEY_ENV = "TEACHER_MODEL_SERVER_API_KEY"  # read when `teacher_model_server_api_key` is not set

# Statuses of a server (or the proxy in front of it) that is restarting or overloaded: retried like a refused
# connection. Other errors (e.g. a 400 for a sequence longer than --max-model-len, a 401) stop at once.
_RETRIED_STATUSES = (502, 503, 504)
# Slack over 0 for a log-prob: log-softmax is <= 0, a larger value means the server returns something else
# (e.g. `--logprobs-mode raw_logits`).
_MAX_LOGPROB = 1e-3

# Text whose token ids the student and the server must agree on; every special token of the student is added.
_PROBE = "The quick brown fox jumps over the lazy dog. 12 + 7 = 19; naïve café ✓ 你好\n\tdef f(x):\n  return x**2"


class TeacherServerError(RuntimeError):
    """The teacher server could not be reached, answered with an error or too late, or serves another tokenizer."""


class _ReplyError(Exception):
    """What went wrong with a request, in words fit for the user (the server's own message where it gave one)."""


class _NotUp(_ReplyError):
    """The server did not answer `/health` in time."""


def redact_url(url: str) -> str:
    """`url` with its user info, query string and fragment replaced by `***`, for messages."""
    parts = urlsplit(url)
    netloc = f"***@{parts.netloc.rsplit('@', 1)[1]}" if "@" in parts.netloc else parts.netloc
    return urlunsplit(
        (parts.scheme, netloc, parts.path, "***" if parts.query else "", "***" if parts.fragment else "")
    )


def url_problem(url: str) -> str | None:
    """Why `url` cannot be a teacher server's base URL, or None. The URL must be `http(s)://host[:port][/path]`: no
    credentials or query string (a key goes in `teacher_model_server_api_key`, never into URLs, which logs and saved
    arguments repeat). The URL in the answer is redacted."""
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number in range)
    except ValueError as error:
        return f"is not a valid URL ({error}): got {redact_url(url)!r}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return (
            f"must be an http:// or https:// URL with a host, like 'http://teacher-node:8000', got {redact_url(url)!r}"
        )
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        return (
            f"must not carry credentials, a query string or a fragment, got {redact_url(url)!r}: give the server's "
            f"key as teacher_model_server_api_key or the {API_KEY_ENV} environment variable (sent as "
            "`Authorization: Bearer`, what `vllm serve --api-key` checks)"
        )
    return None


def _server_message(response: requests.Response) -> str:
    """The error message of a reply: vLLM's `{"error": {"message": ...}}`, `{"error": "..."}` (its 401), the older
    `{"object": "error", "message": ...}`, FastAPI's `{"detail": ...}`, or the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        for value in (error, body.get("message"), body.get("detail")):
            if value:
                return str(value)
    return response.text[:500]


def _check_completions(body: dict, prompts: list[list[int]]) -> None:
    """A `/v1/completions` reply must carry one choice per prompt, each with one prompt log-prob entry per prompt
    token (the first `None`), and no log-prob above 0."""
    choices = body.get("choices")
    if not isinstance(choices, list) or len(choices) != len(prompts):
        given = len(choices) if isinstance(choices, list) else "no"
        raise _ReplyError(f"its reply has {given} choices for {len(prompts)} sequences: {str(body)[:300]}")
    for choice, prompt in zip(choices, prompts, strict=True):
        logprobs = choice.get("prompt_logprobs")
        if not isinstance(logprobs, list) or len(logprobs) != len(prompt):
            given = len(logprobs) if isinstance(logprobs, list) else "no"
            raise _ReplyError(
                f"it returned {given} prompt log-probs for a sequence of {len(prompt)} tokens (vLLM returns one per "
                "prompt token)"
            )
        for position in logprobs[1:]:
            for entry in (position or {}).values():
                if entry["logprob"] > _MAX_LOGPROB:
                    raise _ReplyError(
                        f"it returned a log-prob of {entry['logprob']:g} > 0, which no probability has: serve with "
                        "vLLM's default `--logprobs-mode raw_logprobs` (or processed_logprobs), not logits"
                    )


class _Client(VLLMClient):
    """TRL's client on a given session (the key, the per-request timeout), with a bounded health check, retries while
    the server is down, and checked replies. `retry_timeout`: seconds to keep retrying a request that finds the
    server down or restarting."""

    def __init__(self, url: str, session: requests.Session, connection_timeout: float, retry_timeout: float):
        self._session, self.retry_timeout = session, retry_timeout
        with _without_vllm_import_check():
            super().__init__(base_url=url, connection_timeout=connection_timeout)

    def check_server(self, total_timeout: float = 0.0, retry_interval: float = 2.0) -> None:
        """Wait until `GET /health` answers 200, at most `total_timeout` seconds. TRL's `__init__` calls this right
        after building a plain session, and TRL's loop sends requests without a timeout (a server that accepts the
        connection and never answers hangs start-up forever): this one installs our session first and bounds each
        request by the time left."""
        self.session = self._session
        deadline = time.monotonic() + total_timeout
        while True:
            left = deadline - time.monotonic()
            try:
                status = self.session.get(f"{self.base_url}/health", timeout=max(left, 0.01)).status_code
                if status == 200:
                    return
                failure = f"/health answered HTTP {status}"
            except requests.RequestException as error:
                failure = f"{type(error).__name__}: {error}"
            left = deadline - time.monotonic()
            if left <= 0:
                raise _NotUp(f"no healthy answer from /health; last: {failure}")
            time.sleep(min(retry_interval, left))

    def _request(self, method: str, url: str, **kwargs) -> dict:
        """The JSON reply to one request, retried while the server is down (for at most `retry_timeout` seconds);
        `_ReplyError` with the server's message for an error status or an error body."""
        start, delay, warned = time.monotonic(), 0.5, False
        while True:
            try:
                response = self.session.request(method, url, **kwargs)
                if response.status_code not in _RETRIED_STATUSES:
                    break
                failure = f"HTTP {response.status_code}: {_server_message(response)}"
            except requests.ConnectionError as error:  # refused, reset or dropped (a read timeout is not retried)
                failure = f"{type(error).__name__}: {error}"
            waited = time.monotonic() - start
            if waited + delay > self.retry_timeout:
                raise _ReplyError(
                    f"the server stayed unreachable for {waited:.0f} s (teacher_model_server_retry_timeout="
                    f"{self.retry_timeout:g}); last: {failure}"
                )
            if not warned:
                logger.warning(
                    f"The teacher server at {self.base_url} is unreachable ({failure}); retrying for up to "
                    f"{self.retry_timeout:g} s (teacher_model_server_retry_timeout)."
                )
                warned = True
            time.sleep(delay)
            delay = min(2 * delay, 10.0)
        if warned:
            logger.warning(
                f"The teacher server at {self.base_url} answers again after {time.monotonic() - start:.0f} s."
            )
        if response.status_code != 200:
            hint = ""
            if response.status_code == 401:
                hint = (
                    f" (the server wants an API key: set teacher_model_server_api_key or {API_KEY_ENV} to the key "
                    "it was started with)"
                )
            raise _ReplyError(f"HTTP {response.status_code}: {_server_message(response)}{hint}")
        try:
            body = response.json()
        except ValueError as error:
            raise _ReplyError(f"its reply is not JSON: {response.text[:300]!r}") from error
        if isinstance(body, dict) and ("error" in body or body.get("object") == "error"):
            raise _ReplyError(f"it answered 200 with an error: {_server_message(response)}")
        return body

    def _get(self, url: str, **kwargs) -> dict:
        return self._request("GET", url, **kwargs)

    def _post(self, url: str, **kwargs) -> dict:
        body = self._request("POST", url, **kwargs)
        if url.endswith("/v1/completions") and kwargs.get("json", {}).get("prompt_logprobs") is not None:
            _check_completions(body, kwargs["json"]["prompt"])
        return body


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
        url: the server's base URL, e.g. `"http://teacher-node:8000"` (no credentials or query string).
        timeout: seconds to wait for the server to come up, and for each request.
        chunk_size: sequences per request.
        max_concurrent_requests: requests in flight at once.
        api_key: sent as `Authorization: Bearer <api_key>` (`vllm serve --api-key`), or None.
        retry_timeout: seconds to keep retrying a request while the server is down or restarting.
    """

    def __init__(
        self, url: str, timeout: float = 300.0, chunk_size: int = 16, max_concurrent_requests: int = 4,
        api_key: str | None = None, retry_timeout: float = 300.0,
    ):  # fmt: skip
        problem = url_problem(url)
        if problem is not None:
            raise ValueError(f"The teacher server URL {problem}.")
        if api_key is not None and (not api_key or not api_key.isprintable() or any(c.isspace() for c in api_key)):
            raise ValueError(
                "The teacher server's API key is empty or holds whitespace or control characters (often a trailing "
                f"newline): check teacher_model_server_api_key / {API_KEY_ENV}."
            )
        self.url, self.timeout = url.strip().rstrip("/"), timeout
        self.chunk_size, self.max_concurrent_requests = chunk_size, max_concurrent_requests
        session = _TimeoutSession(timeout)
        adapter = HTTPAdapter(pool_maxsize=max(max_concurrent_requests, 1))  # retries are ours
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        if api_key is not None:
            session.headers["Authorization"] = f"Bearer {api_key}"
        try:
            self.client = _Client(self.url, session, connection_timeout=timeout, retry_timeout=retry_timeout)
        except _NotUp as error:
            raise TeacherServerError(
                f"Cannot reach the teacher server at {self.url} (teacher_model_server_url) within {timeout:g} s: "
                f"{error}. Start it with `vllm serve TEACHER` and check the address, or raise "
                "teacher_model_server_timeout if it is still loading."
            ) from error
        except Exception as error:
            raise self._error("list its model (GET /v1/models)", error) from error

    def _error(self, what: str, error: Exception) -> TeacherServerError:
        if isinstance(error, requests.Timeout):
            reason = f"no answer within {self.timeout:g} s (teacher_model_server_timeout)"
        elif isinstance(error, _ReplyError):
            reason = str(error)
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
        except Exception as error:
            raise self._error(f"score {len(sequences)} sequences", error) from error
        return result["actual_logprobs"]

    @torch.no_grad()
    def score(self, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
        """`log q(y_t)` of every completion token of the batch, `(B, T)` float32, NaN where the server gave none."""
        rows, sequences, prompt_lengths = request_sequences(prompt_ids, prompt_mask, completion_ids, completion_mask)
        try:
            logprobs = self.sequence_logprobs(sequences, prompt_lengths)
        except TeacherServerError as error:
            raise TeacherServerError(
                f"{error}. Training stops here, before this step changes anything; once the server answers again, "
                "resume from the last checkpoint (resume_from_checkpoint=True) to continue exactly."
            ) from error
        return completion_logps(logprobs, rows, completion_mask)

    def check_tokenizer(self, tokenizer, vocab_size: int) -> None:
        """Fail unless the server tokenizes a probe text exactly like `tokenizer` and scores the student's last
        vocabulary id (`vocab_size - 1`): then it can score every token the student samples, with the same meaning."""
        probe = " ".join([*tokenizer.all_special_tokens, _PROBE])
        expected = tokenizer(probe, add_special_tokens=False)["input_ids"]
        payload = {"model": self.client.model, "prompt": probe, "add_special_tokens": False}
        try:
            served = self.client._post(f"{self.url}/tokenize", json=payload)["tokens"]
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


def server_options(args) -> dict:
    """`TeacherServer`'s keyword arguments from a `GNDPOConfig` (the key from the config, else the environment)."""
    return dict(
        timeout=args.teacher_model_server_timeout,
        chunk_size=args.teacher_model_server_chunk_size,
        max_concurrent_requests=args.teacher_model_server_max_concurrent_requests,
        api_key=args.teacher_model_server_api_key or os.environ.get(API_KEY_ENV) or None,
        retry_timeout=args.teacher_model_server_retry_timeout,
    )


def connect(args, processing_class, student, is_vlm: bool) -> TeacherServer:
    """Refuse what a served teacher cannot do, connect, and check the server's tokenizer against the student's."""
    if is_vlm:  # the images go with the token ids through vLLM's token-in endpoint (below)
        return connect_vision(args, processing_class, student)
    server = TeacherServer(args.teacher_model_server_url, **server_options(args))
    server.check_tokenizer(processing_class, student.config.get_text_config().vocab_size)
    logger.info(f"GNDPO: the teacher {server.client.model} served at {server.url} scores the sampled tokens.")
    return server


# --------------------------------------------------------------------------------------------------------------------
# Vision-language students: the token ids with the images, through vLLM's token-in endpoint
#
# `/v1/completions` takes no images, but vLLM's `POST /inference/v1/generate` (served with `--enable-scale-out`) takes
# `token_ids` with `content_parts` (images as URLs, data URLs included) and `sampling_params` carrying
# `prompt_logprobs`. vLLM renders such a prompt with the model's multimodal processor, which expands each image
# placeholder token (`<|image_pad|>`) into as many as the image has merged patches: the request must carry ONE
# placeholder per image (a pre-expanded run would be expanded again from its first token), and `return_token_ids`
# gives back the expanded ids, checked here against the student's. The images sent are the student's own pixels: each
# is rebuilt from the batch's `pixel_values` at the size the student's processor resized it to, so the server's
# processor (the same family's, resizing a size it already accepts) gives the same patches.

GENERATE_PATH = "/inference/v1/generate"
IMAGE_KEYS = ("pixel_values", "image_grid_thw", "num_images")


def images_from_pixel_values(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, image_processor) -> list:
    """The images behind Qwen2-VL / Qwen2.5-VL / Qwen3-VL `pixel_values`, as RGB PIL images at the size the processor
    resized them to: the processor's patch flattening and `(x * rescale_factor - mean) / std` undone, rounded to
    8-bit. Processing them again gives the same `pixel_values` (tested on the three families)."""
    from PIL import Image

    patch, merge, temporal = (
        image_processor.patch_size,
        image_processor.merge_size,
        image_processor.temporal_patch_size,
    )
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(image_processor.image_std, dtype=torch.float64).view(3, 1, 1)
    images, start = [], 0
    for t, h, w in image_grid_thw.tolist():
        patches = pixel_values[start : start + t * h * w].to(torch.float64).cpu()
        start += t * h * w
        frames = patches.reshape(t, h // merge, w // merge, merge, merge, 3, temporal, patch, patch)
        frames = frames.permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(t * temporal, 3, h * patch, w * patch)
        pixels = (frames[0] * std + mean) / image_processor.rescale_factor
        array = pixels.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        images.append(Image.fromarray(array, mode="RGB"))
    if start != pixel_values.size(0):
        raise ValueError(f"image_grid_thw covers {start} patches but pixel_values has {pixel_values.size(0)}.")
    return images


def one_placeholder_per_image(ids: list[int], image_token_id: int) -> list[int]:
    """`ids` with every run of the image placeholder token collapsed to one, as vLLM expects a prompt's images."""
    return [t for i, t in enumerate(ids) if t != image_token_id or i == 0 or ids[i - 1] != image_token_id]


def _data_url(image) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless: the server decodes exactly these pixels
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class VisionTeacherServer(TeacherServer):
    """A vision-language teacher served by vLLM (`vllm serve TEACHER --enable-scale-out`): each sequence is scored
    with its images through `POST /inference/v1/generate`, one request per sequence, up to
    `max_concurrent_requests` in flight.

    Args:
        image_processor: the student's image processor (its patch layout and normalisation rebuild the images).
        image_token_id: the student's image placeholder token.
        Others as `TeacherServer`.
    """

    def __init__(self, url: str, image_processor, image_token_id: int, **kwargs):
        super().__init__(url, **kwargs)
        self.image_processor, self.image_token_id = image_processor, image_token_id

    def _generate(self, ids: list[int], images: list) -> dict:
        payload = {
            "model": self.client.model,
            "token_ids": one_placeholder_per_image(ids, self.image_token_id) if images else ids,
            "sampling_params": {"max_tokens": 1, "temperature": 1.0, "prompt_logprobs": 0, "detokenize": False},
            "return_token_ids": True,
        }
        if images:
            payload["content_parts"] = [{"type": "image_url", "url": _data_url(image)} for image in images]
        try:  # retried while the server is down, with the key, as the text path's requests
            answer = self.client._post(f"{self.url}{GENERATE_PATH}", json=payload)
        except _ReplyError as error:
            if not str(error).startswith("HTTP 404"):
                raise
            raise TeacherServerError(
                f"The teacher server at {self.url} has no {GENERATE_PATH} (vLLM's token-in endpoint), which a "
                "vision-language student needs to send its images: start it with `vllm serve TEACHER "
                "--enable-scale-out`."
            ) from error
        _check_completions({"choices": [answer]}, [answer.get("prompt_token_ids") or ids])
        return answer

    def sequence_logprobs_with_images(
        self, sequences: list[list[int]], prompt_lengths: list[int], images: list[list]
    ) -> list[list[list[float]]]:
        """As `sequence_logprobs`, each sequence scored with its images (placeholders expanded as the student's)."""
        from concurrent.futures import ThreadPoolExecutor

        def one(ids, prompt_length, row_images):
            answer = self._generate(ids, row_images)
            if answer.get("prompt_token_ids") not in (None, ids):
                served = answer["prompt_token_ids"]
                raise TeacherServerError(
                    f"The teacher server at {self.url} expanded a prompt's {len(row_images)} image(s) into "
                    f"{served.count(self.image_token_id)} placeholder tokens where the student's processor has "
                    f"{ids.count(self.image_token_id)}: the teacher would see the images at another resolution. Serve "
                    "a teacher of the student's family with the student's image processor settings (min/max pixels)."
                )
            logprobs = answer["prompt_logprobs"]
            out = []
            for position in range(prompt_length, len(ids)):
                entry = (logprobs[position] or {}).get(str(ids[position]))
                out.append([entry["logprob"] if entry is not None else -math.inf])
            return out

        try:
            with ThreadPoolExecutor(max_workers=max(self.max_concurrent_requests, 1)) as pool:
                return list(pool.map(one, sequences, prompt_lengths, images))
        except TeacherServerError:
            raise
        except Exception as error:
            raise self._error(f"score {len(sequences)} sequences with their images", error) from error

    @torch.no_grad()
    def score(
        self, prompt_ids, prompt_mask, completion_ids, completion_mask, pixel_values=None, image_grid_thw=None,
        num_images=None,
    ) -> torch.Tensor:  # fmt: skip
        """`log q(y_t)` of every completion token, each row scored with its own images; `(B, T)` float32."""
        rows, sequences, prompt_lengths = request_sequences(prompt_ids, prompt_mask, completion_ids, completion_mask)
        per_row = [[] for _ in range(prompt_ids.size(0))]
        if pixel_values is not None:
            images = images_from_pixel_values(pixel_values, image_grid_thw, self.image_processor)
            counts = num_images if num_images is not None else [1] * len(images)
            if sum(counts) != len(images):
                raise ValueError(f"num_images counts {sum(counts)} images, image_grid_thw {len(images)}.")
            offsets = [sum(counts[:i]) for i in range(len(counts))]
            per_row = [images[o : o + n] for o, n in zip(offsets, counts, strict=True)]
        logps = self.sequence_logprobs_with_images(sequences, prompt_lengths, [per_row[row] for row in rows])
        return completion_logps(logps, rows, completion_mask)


def connect_vision(args, processing_class, student) -> VisionTeacherServer:
    """Connect to a vision-language teacher served with `--enable-scale-out` and check its tokenizer (text only: the
    images' expansion is checked on every request)."""
    image_processor = getattr(processing_class, "image_processor", None)
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    image_token = getattr(processing_class, "image_token", "<|image_pad|>")
    if image_processor is None or not hasattr(image_processor, "merge_size"):
        raise ValueError(
            "teacher_model_server_url with a vision-language student needs a Qwen2-VL / Qwen2.5-VL / Qwen3-VL "
            f"processor (patch_size, merge_size), got {type(processing_class).__name__}. Use a local teacher."
        )
    server = VisionTeacherServer(
        args.teacher_model_server_url,
        image_processor=image_processor,
        image_token_id=tokenizer.convert_tokens_to_ids(image_token),
        **server_options(args),
    )
    server.check_tokenizer(tokenizer, student.config.get_text_config().vocab_size)
    server.sequence_logprobs_with_images([tokenizer("probe", add_special_tokens=False)["input_ids"] * 2], [1], [[]])
    logger.info(f"GNDPO: the vision-language teacher {server.client.model} served at {server.url} scores the samples.")
    return server


# --------------------------------------------------------------------------------------------------------------------
# Several served teachers: `teacher_model_server_url` as a dict teacher name -> URL, routed by `teacher_column` as
# local teachers are; each server scores only its rows, once per generation batch.


def connect_all(args, processing_class, student, is_vlm: bool) -> dict:
    """`{name: connected server}`: one per teacher of a dict `teacher_model_server_url`, else `{"teacher": server}`."""
    import copy

    urls = args.teacher_model_server_url
    if not isinstance(urls, dict):
        return {"teacher": connect(args, processing_class, student, is_vlm)}
    servers = {}
    for name, url in urls.items():
        one = copy.copy(args)  # the same settings with this teacher's URL (no re-validation)
        one.teacher_model_server_url = url
        servers[name] = connect(one, processing_class, student, is_vlm)
    return servers


def rows_images(images: dict, rows: list[int]) -> dict:
    """The `pixel_values`, `image_grid_thw` and `num_images` of some rows of a batch (each row's images in order)."""
    if images.get("pixel_values") is None:
        return {}
    counts = images.get("num_images") or [1] * images["image_grid_thw"].size(0)
    patches = images["image_grid_thw"].prod(-1).tolist()
    first_image = [sum(counts[:row]) for row in range(len(counts))]
    image_ids = [i for row in rows for i in range(first_image[row], first_image[row] + counts[row])]
    starts = [sum(patches[:i]) for i in range(len(patches))]
    patch_ids = [p for i in image_ids for p in range(starts[i], starts[i] + patches[i])]
    return {
        "pixel_values": images["pixel_values"][patch_ids],
        "image_grid_thw": images["image_grid_thw"][image_ids],
        "num_images": [counts[row] for row in rows],
    }


def score_routed(servers: dict, routes, batch: dict) -> torch.Tensor:
    """`log q(y_t)` of every completion token, `(B, T)` float32: each row scored by the server `routes` names (its
    index in `servers`; None: the only server), each server once, with its rows only."""
    ids = [batch[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")]
    images = {k: batch[k] for k in IMAGE_KEYS if k in batch}
    if routes is None:
        return next(iter(servers.values())).score(*ids, **images)
    out = torch.full(batch["completion_mask"].shape, math.nan, device=batch["completion_mask"].device)
    for index, server in enumerate(servers.values()):
        rows = (routes == index).nonzero().squeeze(1).tolist()
        if rows:
            out[rows] = server.score(*(x[rows] for x in ids), **rows_images(images, rows)).to(out.device)
    return out

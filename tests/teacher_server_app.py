"""A stand-in for `vllm serve TEACHER` in tests: the HTTP endpoints TRL's `VLLMClient` and `trl_gndpo.teacher_server`
use, answered by a transformers model on CPU.

    python tests/teacher_server_app.py MODEL_DIR [--port N]     # prints the port it listens on (127.0.0.1), serves

Served as vLLM's OpenAI-compatible server answers them: `GET /health`, `GET /v1/models`, `POST /tokenize`
(`{"tokens": [...]}`) and `POST /v1/completions` with token-id prompts and `prompt_logprobs=k`: each choice carries
`prompt_logprobs`, `None` for the first position, then per position a dict `{token_id: {"logprob", "rank",
"decoded_token"}}` with the prompt's token and the top k. Ids outside the model's vocabulary or k above 20 (vLLM's
default `--max-logprobs`) get a 400. Test controls, not part of vLLM: `POST /_test/configure` sets `delay` (seconds
before answering a completion), `skip_token` (a token id whose log-prob is left out), `vocab_limit` (ids at or above it
are out of vocabulary), `tokenizer_dir` (another tokenizer for /tokenize) and `fault` (a broken reply to completion
requests: `"positive_logprob"`, `"extra_logprob"` one more prompt log-prob than tokens, `"error_200"` an error body
with status 200) and `api_key` (then routes under `/v1` answer 401 `{"error": "Unauthorized"}` unless the request
carries `Authorization: Bearer KEY`, as `vllm serve --api-key KEY` does; it does not check /health or /tokenize);
`GET /_test/requests` lists what the completion requests asked for.
"""

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

MAX_LOGPROBS = 20


class Teacher:
    def __init__(self, model_dir: str):
        torch.set_num_threads(1)
        self.name = model_dir
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.vocab_limit = self.model.config.vocab_size
        self.delay, self.skip_token, self.fault, self.api_key = 0.0, None, None, None
        self.requests = []
        self.lock = threading.Lock()  # one forward at a time, like one GPU

    @torch.no_grad()
    def prompt_logprobs(self, ids: list[int], k: int) -> list:
        logps = torch.log_softmax(self.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
        out = [None]
        for position in range(1, len(ids)):
            row, token = logps[position - 1], ids[position]
            entries = {}
            if token != self.skip_token:
                entries[token] = row[token].item()
            if k > 0:
                top = torch.topk(row, k)
                entries.update(zip(top.indices.tolist(), top.values.tolist(), strict=True))
            out.append(
                {
                    str(t): {
                        "logprob": lp,
                        "rank": int((row > row[t]).sum()) + 1,
                        "decoded_token": self.tokenizer.decode([t]),
                    }
                    for t, lp in entries.items()
                }
            )
        return out

    def completions(self, body: dict) -> tuple[int, dict]:
        prompts = body["prompt"]
        prompts = [prompts] if prompts and isinstance(prompts[0], int) else prompts
        k = body.get("prompt_logprobs")
        self.requests.append(
            {"sequences": len(prompts), "prompt_logprobs": k, "temperature": body.get("temperature"), "ids": prompts}
        )
        if k is not None and k > MAX_LOGPROBS:
            return 400, error(f"Requested prompt logprobs of {k}, which is greater than max allowed: {MAX_LOGPROBS}")
        for ids in prompts:
            if max(ids) >= self.vocab_limit:
                return 400, error(f"Token id {max(ids)} is out of vocabulary")
        time.sleep(self.delay)
        choices = []
        with self.lock:
            for index, ids in enumerate(prompts):
                choice = {"index": index, "text": "", "logprobs": None, "finish_reason": "length"}
                choice["prompt_logprobs"] = None if k is None else self.prompt_logprobs(ids, k)
                choices.append(choice)
        if self.fault == "error_200":
            return 200, error("The engine is sleeping (test fault)")
        for choice in choices if k is not None else []:
            if self.fault == "positive_logprob":
                last = choice["prompt_logprobs"][-1]
                choice["prompt_logprobs"][-1] = {t: {**v, "logprob": 0.5} for t, v in last.items()}
            elif self.fault == "extra_logprob":
                choice["prompt_logprobs"].append(choice["prompt_logprobs"][-1])
        return 200, {"id": "cmpl-test", "object": "text_completion", "model": self.name, "choices": choices}


def error(message: str) -> dict:
    return {"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}}


def make_handler(teacher: Teacher):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send(self, status: int, body: dict | None = None):
            data = json.dumps(body if body is not None else {}).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                pass

        def unauthorized(self) -> bool:
            if teacher.api_key is None or not self.path.startswith("/v1"):
                return False
            if self.headers.get("Authorization") == f"Bearer {teacher.api_key}":
                return False
            self.send(401, {"error": "Unauthorized"})
            return True

        def do_GET(self):
            if self.unauthorized():
                return
            if self.path == "/health":
                return self.send(200)
            if self.path == "/v1/models":
                model = {"id": teacher.name, "object": "model", "max_model_len": 512}
                return self.send(200, {"object": "list", "data": [model]})
            if self.path == "/_test/requests":
                return self.send(200, {"requests": teacher.requests})
            self.send(404, error(f"no route {self.path}"))

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
            if self.unauthorized():
                return
            if self.path == "/v1/completions":
                return self.send(*teacher.completions(body))
            if self.path == "/tokenize":
                ids = teacher.tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))
                ids = ids["input_ids"]
                return self.send(200, {"count": len(ids), "max_model_len": 512, "tokens": ids, "token_strs": None})
            if self.path == "/_test/configure":
                for key in ("delay", "skip_token", "fault", "api_key"):
                    if key in body:
                        setattr(teacher, key, body[key])
                if "vocab_limit" in body:
                    teacher.vocab_limit = body["vocab_limit"] or teacher.model.config.vocab_size
                if "tokenizer_dir" in body:
                    teacher.tokenizer = AutoTokenizer.from_pretrained(body["tokenizer_dir"] or teacher.name)
                if body.get("clear_requests"):
                    teacher.requests.clear()
                return self.send(200)
            self.send(404, error(f"no route {self.path}"))

    return Handler


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--port", type=int, default=0)
    options = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", options.port), make_handler(Teacher(options.model_dir)))
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()

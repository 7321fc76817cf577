"""Global whitening across two processes (gloo on CPU): one statistic for the whole generation batch."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:  # torchrun's static rendezvous hangs on --master_port 0
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_share_the_statistics_of_the_concatenated_batch(tmp_path):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(TESTS / "distributed_run.py"),
        str(tmp_path),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 2  # one whitening per generation batch, two steps
    for step0, step1 in zip(*ranks, strict=True):
        assert torch.equal(step0["mean"], step1["mean"]) and torch.equal(step0["var"], step1["var"])
        signal = torch.cat([step0["signal"][step0["mask"]], step1["signal"][step1["mask"]]]).double()
        assert step0["mask"].any() and step1["mask"].any()
        torch.testing.assert_close(step0["mean"].double(), signal.mean())
        torch.testing.assert_close(step0["var"].double(), signal.var(unbiased=True))
        # the ranks saw different tokens, so a local statistic would have differed from the global one
        local_means = [s["signal"][s["mask"]].double().mean() for s in (step0, step1)]
        assert not torch.isclose(local_means[0], local_means[1])
        for s in (step0, step1):
            expected = (s["signal"].double() - signal.mean()) / torch.sqrt(signal.var() + 1e-8) * s["mask"]
            torch.testing.assert_close(s["advantages"].double(), expected)

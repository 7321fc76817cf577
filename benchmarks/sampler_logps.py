"""How far the sampler's log p_old (`old_logps_from_sampler`) is from the student re-score, on a benchmark size.

    python benchmarks/sampler_logps.py --size smollm2 [--steps 3]

Trains `gndpo_sampler` (``worker.make_trainer``, the benchmark's work) and, at every generation batch, also runs the
default re-score of the same batch; prints the max and mean absolute differences of the completion tokens' log p_old
and of the whitened advantages computed from each, as JSON. Figures are quoted in docs/method.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import SIZES, build  # noqa: E402
from worker import make_trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps (one generation batch each)")
    args = parser.parse_args()
    import torch
    from transformers.utils import logging

    from trl_gndpo import functional

    logging.set_verbosity_error()
    spec = dict(SIZES[args.size], size=args.size, seed=0, trainer="gndpo_sampler", warmup=0, steps=args.steps)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    built = build(spec, with_teacher=True)
    trainer = make_trainer(spec, built, torch.device("cpu"), tempfile.mkdtemp())
    score, batches = trainer._score_tokens, []

    def both(batch, inputs, mode):
        sampled = score(batch, inputs, mode)
        trainer.args.old_logps_from_sampler = False  # the default path, on the same batch
        rescored = score({k: v for k, v in batch.items() if k != "sampling_per_token_logps"}, inputs, mode)
        trainer.args.old_logps_from_sampler = True
        mask = batch["completion_mask"].bool()
        advantages = []
        for scores in (sampled, rescored):
            signal, finite = functional.clamped_log_ratio(
                scores["teacher"], scores["student"], mask, trainer.args.token_signal_clamp
            )
            advantages.append(functional.whitened_advantages(signal, finite, trainer.args.whitening_eps)[0])
        logp = (sampled["student"] - rescored["student"])[mask].abs().double()
        advantage = (advantages[0] - advantages[1])[mask].abs().double()
        batches.append({"tokens": int(mask.sum()), "logp_abs_diff_max": logp.max().item(),
                        "logp_abs_diff_mean": logp.mean().item(), "advantage_abs_diff_max": advantage.max().item(),
                        "advantage_abs_diff_mean": advantage.mean().item()})  # fmt: skip
        return sampled

    trainer._score_tokens = both
    trainer.train()
    keys = ("logp_abs_diff_max", "logp_abs_diff_mean", "advantage_abs_diff_max", "advantage_abs_diff_mean")
    overall = {k: (max if k.endswith("max") else lambda v: sum(v) / len(v))([b[k] for b in batches]) for k in keys}
    print(json.dumps({"size": args.size, "models": built["description"], "batches": batches,
                      "overall": overall}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()

"""Two processes (gloo on CPU): global whitening, Uni-OPD group margins and prompt-group masking, TIP's entropy
sampling, VGS and routed teachers see the whole generation batch.

One launch (`two_process_runs`) serves these tests, the served teacher's two processes included."""

import math

import pytest
import torch
from helpers import calls, configure_server, reference_logps, run_two_processes, served_requests, served_teacher
from tiny_models import make_text_model, make_vlm

from trl_gndpo import functional
from trl_gndpo import uniopd as U
from trl_gndpo.teacher_server import request_sequences

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, teacher_server_url) -> dict[str, list]:
    """Every mode of tests/distributed_run.py in one two-process launch, shared by the tests that compare ranks:
    {mode: [rank 0's records, rank 1's]}, and under "server_requests" what the `server` mode asked the server."""
    modes = ("whitening", "uniopd", "vgs", "teachers", "papers", "server")
    configure_server(teacher_server_url, clear_requests=True)
    out, env = tmp_path_factory.mktemp("two-processes"), {"GNDPO_TEACHER_SERVER_URL": teacher_server_url}
    return {**run_two_processes(out, *modes, env=env), "server_requests": served_requests(teacher_server_url)}


def test_two_processes_share_the_statistics_of_the_concatenated_batch(two_process_runs):
    ranks = two_process_runs["whitening"]
    steps = [calls(r, "whitened_advantages") for r in ranks]
    assert len(steps[0]) == len(steps[1]) == 2  # one whitening per generation batch, two steps
    for call0, call1 in zip(*steps, strict=True):
        (signal0, mask0, *_), (adv0, mean0, var0) = call0["args"], call0["result"]
        (signal1, mask1, *_), (adv1, mean1, var1) = call1["args"], call1["result"]
        assert torch.equal(mean0, mean1) and torch.equal(var0, var1)
        signal = torch.cat([signal0[mask0], signal1[mask1]]).double()
        assert mask0.any() and mask1.any()
        torch.testing.assert_close(mean0.double(), signal.mean())
        torch.testing.assert_close(var0.double(), signal.var(unbiased=True))
        # the ranks saw different tokens, so a local statistic would have differed from the global one
        assert not torch.isclose(signal0[mask0].double().mean(), signal1[mask1].double().mean())
        for s, m, a in ((signal0, mask0, adv0), (signal1, mask1, adv1)):
            expected = (s.double() - signal.mean()) / torch.sqrt(signal.var() + 1e-8) * m
            torch.testing.assert_close(a.double(), expected)


def test_uniopd_group_margins_span_processes(two_process_runs):
    """Each prompt group of 4 has 2 completions on each rank: both ranks compute the same per-group shift."""
    ranks = two_process_runs["uniopd"]
    shifts = [calls(r, "margin_shift") for r in ranks]
    assert len(shifts[0]) == len(shifts[1]) == 3
    for call0, call1 in zip(*shifts, strict=True):
        for a, b in zip(call0["args"], call1["args"], strict=True):
            assert a == b if not isinstance(a, torch.Tensor) else torch.equal(a, b)
        assert torch.equal(call0["result"][0], call1["result"][0])
    eligible = 0
    for step, (batch0, batch1) in enumerate(zip(calls(ranks[0], "batch"), calls(ranks[1], "batch"), strict=True)):
        advantages = torch.cat([batch0["advantages"], batch1["advantages"]]).double()
        mask = torch.cat([batch0["mask"], batch1["mask"]])
        means, present = U.response_means(advantages, mask)
        correct, gathered_present = shifts[0][step]["args"][1], shifts[0][step]["args"][2]
        assert torch.equal(present, gathered_present), "the gathered rows are rank 0's then rank 1's"
        gap = U.margin_gap(means.view(-1, 4), correct.view(-1, 4), present.view(-1, 4), "mean")
        ok = ~torch.isnan(gap)
        eligible += ok.sum().item()
        assert (gap[ok] >= 0.4 - 1e-5).all()
    assert eligible > 0


def test_vgs_quantiles_and_eta_span_processes(two_process_runs):
    """GRPO + VGS: both ranks gate on the quantiles of the VDS of every valid token of both ranks, measure the same
    eta, train on one outcome advantage per completion, and end with the same weights (the text-view pass runs around
    the DDP wrapper; its gradients must still be reduced)."""
    ranks = two_process_runs["vgs"]
    local = [[c["result"] for c in calls(r, "visual_dependency_scores")] for r in ranks]
    quantiles = [calls(r, "quantile_thresholds") for r in ranks]
    batches = [calls(r, "batch") for r in ranks]
    assert len(local[0]) == len(quantiles[0]) == len(batches[0]) == 2  # once per generation batch, two steps
    for step in range(2):
        vds0, vds1 = local[0][step], local[1][step]
        (values0, levels), thresholds0 = quantiles[0][step]["args"], quantiles[0][step]["result"]
        (values1, _), thresholds1 = quantiles[1][step]["args"], quantiles[1][step]["result"]
        assert torch.equal(values0, values1) and thresholds0 == thresholds1
        assert torch.equal(values0, torch.cat([vds0, vds1])), "rank 0's tokens, then rank 1's"
        expected = torch.quantile(values0.double(), torch.tensor(levels, dtype=torch.float64)).tolist()
        assert thresholds0 == expected and not torch.equal(vds0, vds1)
        low, high, lp = thresholds0
        for vds, batch in ((vds0, batches[0][step]), (vds1, batches[1][step])):
            valid = batch["mask"].bool()
            assert torch.equal(batch["vgs_lp_gate"][valid].bool(), vds > lp)
            # GRPO + VGS: one outcome advantage per completion on its valid tokens, no per-token teacher signal
            advantages = batch["advantages"]
            assert all(row[v].unique().numel() <= 1 for row, v in zip(advantages, valid, strict=True))
            assert (advantages[~valid] == 0).all()
            expected_gamma = torch.where(vds > high, 2.0, torch.where(vds > low, 1.0, 0.0))
            assert torch.equal(batch["vgs_gamma"][valid], expected_gamma)
    eta0, eta1 = calls(ranks[0], "eta")[0], calls(ranks[1], "eta")[0]
    assert eta0["result"] == eta1["result"] != 1.0 and len(eta0["samples"]) == 1
    weights0, weights1 = calls(ranks[0], "weights")[0]["result"], calls(ranks[1], "weights")[0]["result"]
    initial = dict(make_vlm(seed=0)[0].named_parameters())
    assert all(torch.equal(weights0[name], weights1[name]) for name in weights0)
    assert any(not torch.equal(weights0[name], initial[name]) for name in weights0)


@pytest.mark.slow
def test_several_teachers_route_and_whiten_across_processes(two_process_runs):
    """Each rank scores its rows with their own teachers; the whitening and per-teacher metrics span both ranks."""
    ranks = two_process_runs["teachers"]
    teachers = {"a": make_text_model(seed=1, hidden_size=128), "b": make_text_model(seed=2, num_hidden_layers=3)}
    names = set()
    for records in ranks:
        for r in calls(records, "scores"):
            names |= set(r["names"])
            expected = {name: reference_logps(model, r) for name, model in teachers.items()}
            q = torch.stack([expected[name][i] for i, name in enumerate(r["names"])])
            mask = r["completion_mask"].bool()
            torch.testing.assert_close(r["teacher"].double()[mask], q[mask], rtol=1e-4, atol=1e-4)
    assert names == {"a", "b"}
    steps = [calls(r, "whitened_advantages") for r in ranks]
    assert len(steps[0]) == len(steps[1]) == 3
    for call0, call1 in zip(*steps, strict=True):
        (signal0, mask0, *_), (_, mean0, var0) = call0["args"], call0["result"]
        (signal1, mask1, *_), (_, mean1, var1) = call1["args"], call1["result"]
        signal = torch.cat([signal0[mask0], signal1[mask1]]).double()
        assert torch.equal(mean0, mean1) and torch.equal(var0, var1)
        torch.testing.assert_close(mean0.double(), signal.mean())
    history = [calls(r, "log_history")[0]["result"] for r in ranks]
    keys = [k for k in history[0][0] if k.startswith("gndpo/teacher/")]
    assert {k.split("/")[2] for k in keys} == {"a", "b"}
    for entry0, entry1 in zip(*history, strict=True):
        assert all(entry0[k] == entry1[k] for k in keys if k in entry0)


@pytest.mark.slow
def test_prompt_group_mask_and_entropy_sampling_span_two_processes(two_process_runs):
    """Groups of 4 split 2 + 2 across the ranks: both ranks discard the same groups, and TIP's entropy sampling keeps
    half of the generation batch's tokens, with the vOPD top-k baseline on as well."""
    ranks = two_process_runs["papers"]
    decisions = [calls(r, "margin_group_mask") for r in ranks]
    assert len(decisions[0]) == len(decisions[1]) == 3
    discarded = 0
    batches = zip(calls(ranks[0], "batch"), calls(ranks[1], "batch"), decisions[0], decisions[1], strict=True)
    for batch0, batch1, call0, call1 in batches:
        for a, b in zip(call0["args"], call1["args"], strict=True):
            assert a == b if not isinstance(a, torch.Tensor) else torch.equal(a, b)
        keep, _ = call0["result"]
        assert torch.equal(keep, call1["result"][0])
        advantages = torch.cat([batch0["advantages"], batch1["advantages"]])
        assert (advantages[~keep] == 0).all()
        discarded += (~keep).sum().item() // 4
        kept = torch.cat([batch0["mask"], batch1["mask"]]).sum().item()
        tokens = torch.cat([batch0["completion_mask"], batch1["completion_mask"]]).sum().item()
        assert abs(kept - 0.5 * tokens) <= 1
    assert discarded > 0


def test_two_processes_score_their_shares_and_whiten_like_the_local_teacher(two_process_runs):
    """Each rank sends its own rows; with the served log-probs replaced by the local teacher's, the globally whitened
    advantages are what each rank trained on (the `server` mode of the shared two-process launch)."""
    ranks = two_process_runs["server"]
    teacher = served_teacher()
    served = [ids for r in two_process_runs["server_requests"] for ids in r["ids"]]
    steps = list(zip(*(calls(r, "scores") for r in ranks), *(calls(r, "batch") for r in ranks), strict=True))
    assert len(steps) == 2
    for scores0, scores1, batch0, batch1 in steps:
        signals, masks = [], []
        for scores, batch in ((scores0, batch0), (scores1, batch1)):
            ids = [scores[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")]
            rows, sequences, prompt_lengths = request_sequences(*ids)
            assert all(s in served for s in sequences)  # this rank's rows reached the server
            local = torch.full_like(scores["teacher"], math.nan)
            with torch.no_grad():
                for row, sequence, start in zip(rows, sequences, prompt_lengths, strict=True):
                    logps = torch.log_softmax(teacher(input_ids=torch.tensor([sequence])).logits[0], -1)
                    local[row, : len(sequence) - start] = logps[start - 1 : -1].gather(
                        1, torch.tensor(sequence[start:])[:, None]
                    )[:, 0]
            mask = batch["mask"].bool()
            torch.testing.assert_close(scores["teacher"][mask], local[mask], atol=1e-5, rtol=1e-5)
            signal, _ = functional.clamped_log_ratio(local, scores["student"], mask, 5.0)
            signals.append(signal), masks.append(mask)
        pooled = torch.cat([s[m] for s, m in zip(signals, masks, strict=True)]).double()
        for signal, mask, batch in zip(signals, masks, (batch0, batch1), strict=True):
            expected = (signal.double() - pooled.mean()) / torch.sqrt(pooled.var() + 1e-8) * mask
            torch.testing.assert_close(batch["advantages"].double(), expected, atol=1e-4, rtol=1e-4)

"""Uni-OPD offline difficulty-aware balancing: estimate each prompt's pass rate, then flatten the histogram.

rates = estimate_pass_rates(student, tokenizer, dataset, reward_funcs=[accuracy_reward], args=args, num_samples=8)
train_dataset = difficulty_balanced_dataset(dataset, rates, num_bins=5, seed=0)
"""

import warnings
from collections.abc import Callable, Sequence

import torch
from datasets import Dataset

from .uniopd import difficulty_balanced_indices


def difficulty_balanced_dataset(
    dataset: Dataset, pass_rates: Sequence[float] | str = "pass_rate", num_bins: int = 5, seed: int = 0
) -> Dataset:
    """`dataset` with mid-difficulty prompts up-sampled so their pass-rate histogram is flat.

    Args:
        dataset: the prompts.
        pass_rates: one pass rate in [0, 1] per row, or the name of the column holding them.
        num_bins: equal-width bins over (0, 1); each is brought to the size of the largest (the Uni-OPD paper does not
            publish its bins).
        seed: the up-sampling and the final shuffle are deterministic given the seed.

    Every row appears at least once; always- and never-solved prompts are not repeated.
    """
    rates = torch.tensor(list(dataset[pass_rates] if isinstance(pass_rates, str) else pass_rates), dtype=torch.float64)
    if len(rates) != len(dataset):
        raise ValueError(f"Got {len(rates)} pass rates for {len(dataset)} rows.")
    if ((rates < 0) | (rates > 1) | torch.isnan(rates)).any():
        raise ValueError("Pass rates must lie in [0, 1].")
    return dataset.select(difficulty_balanced_indices(rates, num_bins, seed).tolist())


@torch.no_grad()
def estimate_pass_rates(
    model,
    tokenizer,
    dataset: Dataset,
    reward_funcs: Callable | list[Callable],
    args=None,
    num_samples: int = 8,
    max_new_tokens: int | None = None,
    threshold: float = 0.5,
    temperature: float | None = None,
    seed: int = 0,
) -> list[float]:
    """Share of `num_samples` sampled completions per prompt whose summed reward reaches `threshold`.

    Samples `model` (a text student with its tokenizer) on each row's `prompt`, conversational or plain, and scores the
    completions with TRL-style reward functions `f(prompts, completions, completion_ids, **columns) -> list[float]`,
    which receive the row's other columns repeated per sample, as during training.

    Completions are capped at `max_new_tokens`, by default the training config's `max_completion_length` (`args`, the
    `GNDPOConfig` you train with), and sampled at `temperature`, by default `args.temperature` (1.0 without `args`).
    Give one of `args` and `max_new_tokens`: a cap shorter than the training one cuts long reasoning before its answer,
    so those samples score as failures. A warning says when most samples reach the cap unfinished.
    """
    if max_new_tokens is None:
        if args is None:
            raise ValueError(
                "estimate_pass_rates needs the completion cap you train with: pass args=<your GNDPOConfig> (its "
                "max_completion_length) or max_new_tokens; a shorter cap truncates long answers into failures."
            )
        max_new_tokens = args.max_completion_length
    if temperature is None:
        temperature = 1.0 if args is None else args.temperature
    if "prompt" not in dataset.column_names:
        raise ValueError(f"The dataset needs a `prompt` column; it has {dataset.column_names}.")
    if any(column in dataset.column_names for column in ("image", "images")):
        raise ValueError("estimate_pass_rates samples text students only; pass precomputed pass rates for images.")
    reward_funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else []
    eos = (set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}) - {None}
    rates, unfinished = [], 0
    for row in dataset:
        prompt = row["prompt"]
        conversational = isinstance(prompt, list)
        if conversational:
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        else:
            text = prompt
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=not conversational).to(model.device)
        generated = model.generate(
            **ids,
            do_sample=True,
            temperature=temperature,
            top_p=1.0,
            top_k=0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_samples,
            pad_token_id=tokenizer.pad_token_id,
        )
        completion_ids = [seq[ids["input_ids"].size(1) :].tolist() for seq in generated]
        unfinished += sum(len(c) >= max_new_tokens and not eos.intersection(c) for c in completion_ids)
        texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        columns = {k: [v] * num_samples for k, v in row.items() if k != "prompt"}
        totals = torch.zeros(num_samples)
        for func in reward_funcs:
            scores = func(
                prompts=[prompt] * num_samples, completions=completions, completion_ids=completion_ids, **columns
            )
            totals += torch.tensor([float("nan") if s is None else s for s in scores]).nan_to_num(0.0)
        rates.append((totals >= threshold).double().mean().item())
    torch.random.set_rng_state(rng_state)
    share = unfinished / max(len(dataset) * num_samples, 1)
    if share > 0.5:
        warnings.warn(
            f"{share:.0%} of the sampled completions reached max_new_tokens={max_new_tokens} unfinished, so most "
            "pass rates count truncated answers as failures: raise max_new_tokens to the max_completion_length you "
            "train with (pass args=<your GNDPOConfig>).",
            stacklevel=3,  # the caller, past torch.no_grad's wrapper
        )
    return rates

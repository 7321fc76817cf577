"""Prompts over `max_prompt_length`, dealt with before the student generates: prefilling a 100k-token prompt takes
minutes and much memory even when its completions are masked afterwards (TRL 1.16's GRPOTrainer tokenizes every
prompt in full; it has no `max_prompt_length` of its own)."""

from transformers.utils import logging

logger = logging.get_logger(__name__)


def limit_prompt_lengths(prompt_ids: list, has_images: bool, args) -> list:
    """The tokenized prompts of a generation batch, as `args.long_prompts` handles those over `args.max_prompt_length`
    tokens.

    `"mask"`: unchanged, with a warning that they are generated in full and then masked; `"truncate"`: their last
    `max_prompt_length` tokens (refused when the batch has images, whose tokens cannot be cut); `"error"`: a
    `ValueError`.
    """
    limit, action = args.max_prompt_length, args.long_prompts
    if limit is None:
        return prompt_ids
    long = [(row, len(ids)) for row, ids in enumerate(prompt_ids) if len(ids) > limit]
    if not long:
        return prompt_ids
    which = ", ".join(f"row {row} ({length} tokens)" for row, length in long[:5])
    which = f"{len(long)} prompts of this generation batch are longer than max_prompt_length={limit}: {which}"
    if action == "error" or (action == "truncate" and has_images):
        why = "; long_prompts='truncate' cannot cut prompts with images" if action == "truncate" else ""
        raise ValueError(
            f"{which}{why}. Shorten or filter them, raise max_prompt_length, or set long_prompts='truncate' (text "
            "prompts: keep their last tokens) or 'mask' (generate in full, then mask their completions)."
        )
    if action == "truncate":
        logger.warning(f"{which}; each keeps its last {limit} tokens (long_prompts='truncate').")
        return [ids[-limit:] if len(ids) > limit else ids for ids in prompt_ids]
    logger.warning(
        f"{which}; they are generated in full (the prefill costs time and memory), then their completions are "
        "masked (gndpo/long_prompt_frac). Set long_prompts='truncate' or 'error' to avoid the prefill."
    )
    return prompt_ids

"""Configuration of the GNDPO trainer."""

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from trl import GRPOConfig

from .teacher_server import url_problem

# Fields holding secrets: kept out of to_dict()/to_json_string() and str() (shown as `<NAME>`, transformers' convention
# for `hub_token`), out of repr() (`repr=False`) and out of pickles such as each checkpoint's training_args.bin (None).
_SECRET_FIELDS = ("teacher_model_server_api_key",)

# GRPO loss options whose behaviour GNDPO's loss does not implement; each must stay at its default.
_UNSUPPORTED_GRPO_OPTIONS = {
    "entropy_coef": 0.0,
    "use_adaptive_entropy": False,
    "top_entropy_quantile": 1.0,
    "off_policy_mask_threshold": None,
    "delta": None,
}


# Sampling settings at which the sampler draws from softmax(logits / temperature), the distribution whose log-probs
# `old_logps_from_sampler` takes (keys of `generation_kwargs` too; `min_tokens` and the penalties are vLLM's names).
_NEUTRAL_SAMPLING = {
    "top_k": (0, None),
    "top_p": (1.0, None),
    "min_p": (0.0, None),
    "typical_p": (1.0, None),
    "epsilon_cutoff": (0.0, None),
    "eta_cutoff": (0.0, None),
    "top_h": (None,),
    "repetition_penalty": (1.0, None),
    "presence_penalty": (0.0, None),
    "frequency_penalty": (0.0, None),
    "min_tokens": (0, None),
    "num_beams": (1, None),
    "do_sample": (True, None),
}

# Numeric options that must be finite: an inf or NaN passes a range check like `> 0` yet breaks training.
_FINITE_FIELDS = (
    "token_signal_clamp",
    "whitening_eps",
    "outcome_advantage_weight",
    "max_log_ratio",
    "reward_extrapolation",
    "max_abs_log_ratio",
    "correctness_threshold",
    "margin_delta",
    "balance_ratio",
    "vgs_gamma",
    "vgs_lambda",
    "vgs_eta",
    "temperature",
    "epsilon",
    "epsilon_high",
    # TrainingArguments' and GRPOConfig's: an inf learning rate trains a step and leaves NaN in every weight
    "learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "warmup_steps",
    "num_train_epochs",
    "top_p",
    "min_p",
    "repetition_penalty",
)

# Above this, reward extrapolation only clamps: every token's signal is at the clamp for ordinary log-ratios.
_MAX_REWARD_EXTRAPOLATION = 10.0

# What a refused choice's message adds to "<field> must be <choices>, got <value>".
_CHOICE_HINTS = {
    "margin_calibration": " (the calibrations are alternatives: pick one)",
    "loss_type": " (GNDPO's loss implements 'grpo', sequence-mean-token-mean, and 'dapo', the global token mean)",
}


@dataclass
class GNDPOConfig(GRPOConfig):
    r"""
    Configuration class for the [`~trl_gndpo.GNDPOTrainer`].

    Extends [`~trl.GRPOConfig`] with the teacher and the GNDPO token signal. Defaults that differ from `GRPOConfig`
    follow the GNDPO reference recipe: temperature 1, top_p 1, no KL to a reference model (`beta=0`), dropout
    disabled, a sequence-level importance ratio in token form (GSPO-token) clipped at 0.2, sequence-mean-token-mean
    loss aggregation, AdamW with a constant learning rate of 1e-6 and weight decay 0.01.

    Parameters:
        > Parameters that control the teacher

        teacher_model_name_or_path (`str`, *optional*):
            Name or path of the teacher, used when the trainer's `teacher_model` argument is not given.
        teacher_model_revision (`str`, *optional*):
            Revision of the teacher (branch, tag or commit), used when the teacher is loaded from a name or path.
        teacher_model_init_kwargs (`dict[str, Any]` or `str`, *optional*):
            Keyword arguments for `from_pretrained` when the teacher is loaded from a name or path (a JSON string is
            accepted, e.g. on the command line). `dtype` defaults to `"bfloat16"` on accelerators that support it,
            `"float16"` on other GPUs and `"float32"` on CPU. A `quantization_config` may be a dict, e.g.
            `{"load_in_4bit": true}` for a 4-bit teacher.
        teacher_models (`dict[str, str]` or `str`, *optional*):
            Several teachers (multi-teacher distillation, as evaluated by Uni-OPD and G-OPD): teacher name -> name or
            path, e.g. `{"math": "org/math-rl", "code": "org/code-rl"}` (a JSON string is accepted). Each sample is
            scored by the teacher its `teacher_column` names; every teacher scores only its samples, once per
            generation batch. Alternative to `teacher_model_name_or_path`. Not with DeepSpeed ZeRO-3 or FSDP,
            `value_baseline` or `visual_gradient_steering`.
        teacher_column (`str`, *optional*):
            With several teachers, the dataset column that routes each sample: a teacher's name, or its index in
            `teacher_models` (0-based, in the order given). Defaults to `"teacher_id"` (the column TRL's async
            distillation routes by) or, in a dataset without it, `"teacher"` (this package's earlier default).
        teacher_device (`str` or `dict[str, str]`, *optional*):
            Keep the teacher on this device (e.g. `"cuda:1"`, or `"cpu"`) instead of the training device; its inputs
            are moved there for scoring and its log-probs moved back. With several teachers, a dict teacher name ->
            device places each (teachers it does not name stay on the training device). Not with DeepSpeed or FSDP.
        teacher_offload (`bool`, *optional*, defaults to `False`):
            Keep the teacher in CPU memory and move it to the training device only for its scoring pass (once per
            generation batch): less GPU memory, one host-device copy of the teacher per generation batch. Not with
            DeepSpeed, FSDP, a quantized teacher or `teacher_device`.
        teacher_model_server_url (`str` or `dict[str, str]`, *optional*):
            Base URL of a vLLM server that serves the teacher (`vllm serve TEACHER`, e.g. `"http://teacher:8000"`),
            used instead of a local teacher: each process sends its completions' token ids (prompt + completion) to
            `/v1/completions` with `prompt_logprobs=0` and receives the teacher's log-prob of each sampled token, once
            per generation batch. The served model must share the student's tokenizer (checked at start-up). For a
            vision-language student (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), serve a teacher of its family with
            `--enable-scale-out`: each sequence goes with its images to `/inference/v1/generate`. Several served
            teachers: a dict teacher name -> URL (or its JSON string), each sample scored by the server its
            `teacher_column` names, as with `teacher_models`. Not with a local teacher or its options,
            `value_baseline` or `visual_gradient_steering`, which need more than the sampled tokens' log-probs. A
            token the server does not score is masked and counted in `gndpo/nonfinite_frac`.
        teacher_model_server_timeout (`float`, *optional*, defaults to `300.0`):
            Seconds to wait for the teacher server to come up at start-up, and for each scoring request; a request
            that takes longer stops training with an error naming the server.
        teacher_model_server_chunk_size (`int`, *optional*, defaults to `16`):
            Sequences per scoring request.
        teacher_model_server_max_concurrent_requests (`int`, *optional*, defaults to `4`):
            Scoring requests in flight at once, per process.
        teacher_model_server_api_key (`str`, *optional*):
            Key of a teacher server started with `vllm serve --api-key KEY`, sent as `Authorization: Bearer KEY`.
            When not set, the `TEACHER_MODEL_SERVER_API_KEY` environment variable is read instead (the safer way: the
            key then never enters the arguments). A key set here is left out of `to_dict()`/`to_json_string()`,
            `str()`/`repr()` and the pickled `training_args.bin` of every checkpoint, like `hub_token`: give it again
            (or the environment variable) when resuming.
        teacher_model_server_retry_timeout (`float`, *optional*, defaults to `300.0`):
            Seconds to keep retrying a request to the teacher server while it is down or restarting (refused or
            dropped connections, HTTP 502/503/504), with back-off; training waits meanwhile and continues unchanged
            once it answers. A server down for longer stops training with an error naming it, and the run resumes
            exactly from its last checkpoint. 0 retries nothing.
        cross_modal_distillation (`bool`, *optional*, defaults to `False`):
            Allow a text-only teacher for a vision-language student (Uni-OPD's cross-modal setting): a text-only
            teacher scores the text view of each sample (the conversation with its images removed, built like VGS's
            text view), while the student trains on the image view. Vision-language teachers still see the images.
            The teacher must share the student's tokenizer, unless `cross_tokenizer_distillation`. Uni-OPD's
            cross-modal setting gives its text teachers text-domain rows; an image row scored by a text-only teacher
            (which cannot see the image) is counted in `gndpo/teacher/text_view_image_frac`, with a warning the first
            time.
        cross_tokenizer_distillation (`bool`, *optional*, defaults to `False`):
            Let every teacher keep its own tokenizer, chat template and processor (a teacher from another family):
            it reads each row's prompt (text and images) rendered by its own processor and the student's completion
            text tokenized by its own tokenizer, and scores its own tokens. Student and teacher tokens are grouped
            into the smallest spans of characters on which both tokenizations agree; a span's signal (summed
            log-probs on both sides) is whitened once per span and is the advantage of each of its student tokens.
            Spans that cannot be aligned are masked and counted (`gndpo/unaligned_token_frac`). With identical
            tokenizations it gives the shared-tokenizer advantages exactly. Needs fast tokenizers; not with a served
            teacher, TIP token selection, the vOPD value baseline, VGS, tools or environments. See
            docs/cross-tokenizer.md.

        > Parameters that control the GNDPO token signal

        token_signal_clamp (`float`, *optional*, defaults to `5.0`):
            Bound `b` of the token signal `r_t = clamp(log q(y_t) - log p_old(y_t), -b, b)`, applied before
            normalization.
        normalization_scope (`str`, *optional*, defaults to `"global"`):
            How the token signal becomes the advantage. `"global"`: whitened with the mean and unbiased variance of
            the signal over every valid completion token of the whole generation batch, on all processes (GNDPO).
            `"none"`: the clamped signal is the advantage (plain on-policy distillation baseline).
        whitening_eps (`float`, *optional*, defaults to `1e-8`):
            Added to the variance inside the square root of the whitening.
        outcome_advantage_weight (`float`, *optional*, defaults to `0.0`):
            Weight `w` of GRPO's sequence-level outcome advantage from `reward_funcs`, added to every valid token:
            `A_t + w * A_seq`. GNDPO uses none (0.0); the rewards are then only logged.
        max_log_ratio (`float`, *optional*, defaults to `10.0`):
            Upper clamp of the log importance ratio in the policy loss.
        reward_extrapolation (`float`, *optional*, defaults to `1.0`):
            ExOPD / G-OPD (arXiv 2602.12125) scale `lambda` on the teacher-minus-reference signal: the raw signal is
            `lambda (log q - log p_base) - (log p_old - log p_base)` with `p_base` the initial student (with a PEFT
            adapter, the base weights with the adapter disabled, so no copy is kept), or `reference_model_name_or_path`
            when given. `1.0` is plain OPD exactly; ExOPD uses `1.25`. With `reward_extrapolation != 1` the teacher
            scores at the sampling `temperature`, like the student and the reference (G-OPD's code scores all of them
            at the rollout temperature); at `1.0` it scores at temperature 1, as GNDPO's reference code does.
        reference_model_name_or_path (`str`, *optional*):
            G-OPD's reward correction for strong-to-weak distillation: the reference `p_base` of
            `reward_extrapolation` is this model, the teacher's base model before its RL, instead of the initial
            student. Loaded with `teacher_model_init_kwargs` and placed like the teacher (`teacher_device`,
            `teacher_offload`); it scores at the student's sampling temperature, as the initial student does. Needs
            `reward_extrapolation != 1` (at 1 the reference cancels).
        value_baseline (`bool`, *optional*, defaults to `False`):
            vOPD (arXiv 2605.07865): add the detached per-token reverse KL of the full next-token distributions,
            `KL(p || q)`, to the signal (its closed-form value baseline), computed chunk by chunk over the vocabulary
            from both models' hidden states with TRL's chunked divergence kernel. Needs `temperature=1`.
        value_baseline_top_k (`int`, *optional*):
            vOPD's top-k approximation of the baseline: the reverse KL on the student's `k` most likely tokens, both
            distributions renormalized there, instead of the full vocabulary (no teacher pass over the whole
            vocabulary). `None` (default) computes the exact KL. Needs `value_baseline=True`.
        token_selection (`str`, *optional*, defaults to `"none"`):
            TIP (arXiv 2604.14084) token selection before the statistics: `"entropy"` keeps the tokens whose student
            entropy is in the top `token_selection_ratio` of the generation batch; `"quadrant"` also keeps
            low-entropy tokens whose teacher-student divergence `|log p - log q|` is in the top share; `"q3"` keeps
            only those low-entropy, high-divergence tokens (TIP's Q3, overconfident and wrong); `"entropy_sampling"`
            draws `token_selection_ratio` of the tokens at random without replacement, with probability proportional
            to the student's entropy (TIP's entropy-based sampling). Dropped tokens leave the statistics and the loss.
            At ratio `r` the share kept is `r` (`"entropy"`, `"entropy_sampling"`), about `r (2 - r)` (`"quadrant"`,
            75% at 0.5) and about `r (1 - r)` (`"q3"`, 25% at 0.5) when entropy and divergence are independent;
            `gndpo/tip_kept_frac` logs it.
        token_selection_ratio (`float`, *optional*, defaults to `0.5`):
            The share used by `token_selection`: of high-entropy tokens, of high-divergence tokens, and the share
            drawn by `"entropy_sampling"` (TIP: keeping 50% by entropy-based sampling matched all-token training).
        max_prompt_length (`int`, *optional*):
            Completions of prompts longer than this many tokens (image tokens included) are excluded from the
            statistics and the loss, and counted in `gndpo/long_prompt_frac`. `None` (default) keeps all; the GNDPO
            reference uses 8192. `long_prompts` says what happens to them before generation.
        long_prompts (`str`, *optional*, defaults to `"mask"`):
            What happens to a prompt over `max_prompt_length` tokens before the student generates: `"mask"` generates
            from it in full (its prefill costs time and memory: a warning says so) and masks its completions as
            above, as the GNDPO reference does; `"truncate"` keeps its last `max_prompt_length` tokens (the end of the
            conversation and the generation prompt; refused for prompts with images, whose tokens cannot be cut);
            `"error"` stops with an error naming the prompt's length, before generating.
        max_abs_log_ratio (`float`, *optional*):
            Token guard from the Uni-OPD reference scripts (which use 10): tokens with `|log p - log q|` at or above
            this bound leave the statistics and the loss. `None` (default) keeps every token.
        old_logps_from_sampler (`bool`, *optional*, defaults to `False`):
            Take `log p_old` of the token signal from the sampler instead of a no-grad re-score pass of the student:
            the log-probs vLLM returns (needs `vllm_importance_sampling_correction=False`), or, with transformers
            generation, `log softmax(logits / temperature)` of each sampled token recorded step by step (one step's
            scores kept at a time). Skips the re-score pass where GNDPO runs it for `p_old` alone; where TRL
            re-scores anyway (`num_iterations > 1`, or `gradient_accumulation_steps` not a multiple of
            `steps_per_generation`), TRL's re-score is used. Refused where the sampler draws from another
            distribution (`top_k`, `top_p`, `min_p`, `repetition_penalty`, also in `generation_kwargs`) and with
            TIP and vOPD, which need the student pass anyway. The recorded values differ from the re-score's only by
            float rounding (KV-cached forward vs one forward): see [the method](method.md#sampler-log-probs).

        > Parameters that control the checks of bad input (see the bad-input table in the docs)

        max_checked_rows (`int`, *optional*):
            Before training, the prompts and images of the first this-many rows of each dataset are checked (prompt
            present and non-empty; each image present, decodable in full and of aspect ratio at most 200). `None`
            (default) checks every row. Rows are read a slice at a time, never a whole column; decoding every image
            of a very large dataset takes a while, in every process, so set a limit there.
        max_invalid_generation_batches (`int`, *optional*, defaults to `3`):
            Stop with an error after this many consecutive training generation batches without a single valid
            completion token (every token non-finite, masked or filtered out), which would train on a zero loss.
            Each such batch logs a warning and leaves the `gndpo/` averages unlogged. `None` never stops.

        > Parameters of Uni-OPD (margin calibration and balancing)

        correctness_threshold (`float`, *optional*, defaults to `0.5`):
            A completion is correct when its weighted outcome reward is at least this value.
        margin_calibration (`str`, *optional*, defaults to `"none"`):
            `"shift"`: where the gap between correct and incorrect responses' mean token advantages is below
            `margin_delta`, shift the classes apart until it equals `margin_delta`. `"mask"`: instead drop the
            responses that close the gap, greedily (the reference code). `"group_mask"`: drop every response of a
            prompt group whose gap is below `margin_delta` (the paper's "discards prompt groups", with its margin
            `margin_mode="minmax"`; groups only). The three are alternatives; `"none"` disables calibration. It acts
            on the advantages after normalization, i.e. on what the loss sees: with the default
            `normalization_scope="global"` after GNDPO's whitening, while the Uni-OPD reference calibrates the raw
            log-ratio (`normalization_scope="none"`), see `margin_delta`.
        margin_scope (`str`, *optional*, defaults to `"group"`):
            `"group"`: one margin per prompt group; `"global"`: one over the whole generation batch, all processes.
        margin_mode (`str`, *optional*):
            Gap statistic: `"mean"` (mean correct - mean incorrect) or `"minmax"` (min correct - max incorrect).
            `None` (default) takes each calibration's own pairing: `"minmax"` under `"group_mask"` (the paper's
            margin `m(q)`, with which it discards prompt groups), `"mean"` under `"shift"` and `"mask"` (the reference
            scripts).
        margin_direction (`str`, *optional*, defaults to `"both"`):
            Who moves under `"shift"`: `"both"` (half each), `"correct_up"` or `"incorrect_down"`.
        margin_delta (`float`, *optional*, defaults to `0.4`):
            The margin to reach, in the units of the advantage it calibrates: with `normalization_scope="global"`
            (the default) calibration runs after GNDPO's whitening, so `0.4` is 0.4 standard deviations of the token
            signal; the Uni-OPD reference calibrates the raw log-ratio, where its `0.4` is in nats: set
            `normalization_scope="none"` (and `token_signal_clamp=10.0` with `max_abs_log_ratio=10.0`, which leaves
            the kept tokens unclamped as the reference does) to reproduce it.
        margin_min_retain_ratio (`float`, *optional*, defaults to `0.25`):
            Under `"mask"`, the share of each class (at least one response) that is never dropped.
        balance_ratio (`float`, *optional*):
            Online correctness-aware balancing: in each group, randomly drop the majority class's surplus down to
            correct:incorrect = `balance_ratio`:1 (dropped responses leave the statistics and the loss). `None`
            (default) disables it; the reference uses 1.0.

        > Parameters that control Visual Gradient Steering (VGS, vision-language students)

        visual_gradient_steering (`bool`, *optional*, defaults to `False`):
            Train on the VGS loss `eta * (l_Std + gamma * l_Vis + lambda * l_LP)` (alone or mixed, see `vgs_mode`),
            token-averaged like the policy loss, with `l_Std = KL(p || q)`, `l_Vis = KL(p || q*)` and
            `l_LP = 1[VDS_t > quantile] * KL(p_text || q_text)` over the full vocabulary. `p_text` and `q_text` score
            the same completion on a text-only view of the sample (the conversation with its images removed); `q*` is
            the student's text-only distribution (detached) moved by the teacher's image-minus-text log-prob gain,
            renormalized; `VDS_t = KL(q || q_text)`. Needs a vision-language student and teacher and
            `temperature=1` (the KLs compare the untempered distributions, as the paper samples); not with FSDP,
            DeepSpeed ZeRO-3, tools or environments. Costs one more teacher pass per generation batch and one more
            student pass per micro-step (both on the text-only view).
        vgs_mode (`str`, *optional*, defaults to `"alone"`):
            What VGS is trained with. `"alone"`: the loss is the VGS loss only (the paper's main results; the GNDPO
            policy loss is still logged, not trained). `"grpo"`: `(1 - vgs_alpha) * GRPO + vgs_alpha * VGS`, where
            the policy-gradient term's advantage is GRPO's outcome advantage from `reward_funcs` on every valid token,
            with no teacher signal in it (the paper's "GRPO + VGS" ablation); needs `reward_funcs`. `"gndpo"`:
            `(1 - vgs_alpha) * GNDPO + vgs_alpha * VGS`, GNDPO's teacher advantage in the policy-gradient term (not
            a setting of the paper).
        vgs_alpha (`float`, *optional*, defaults to `0.3`):
            Weight of VGS in the hybrid modes `"grpo"` and `"gndpo"`: `(1 - vgs_alpha) * policy loss + vgs_alpha *
            VGS` (the paper's "GRPO + VGS" uses 0.3). Not used by `"alone"`.
        vgs_gamma (`float`, *optional*, defaults to `2.0`):
            Weight `gamma` of the visual term `l_Vis`.
        vgs_lambda (`float`, *optional*, defaults to `0.01`):
            Weight `lambda` of the language-prior term `l_LP`.
        vgs_lp_quantile (`float`, *optional*, defaults to `0.7`):
            `l_LP` trains the tokens whose VDS exceeds this quantile of the VDS of every valid token of the
            generation batch (all processes).
        vgs_adaptive_gamma (`bool`, *optional*, defaults to `False`):
            Per-token `gamma_t`: 0 below the 40th VDS percentile, `gamma / 2` up to the 70th, `gamma` above (the
            paper's adaptive variant), percentiles over the generation batch.
        vgs_eta (`float`, *optional*, defaults to `0.41`):
            Fixed loss scale `eta`. The paper measures `eta = ||grad L_Std|| / ||grad L_Std + gamma grad L_Vis||`
            once, keeps it fixed, and reports 0.41 for its 2B and 0.36 for its 4B Qwen3-VL student (Qwen3-VL-8B
            teacher, `gamma = 2`); the default is the 2B value, measured for that one pair only. For another pair,
            measure it with `vgs_eta_measure_steps` (the trainer logs a one-time hint when a fixed `eta` is used).
            `1.0` is the paper's "no normalization" ablation, in which `gamma` also scales the step size.
        vgs_eta_measure_steps (`int`, *optional*, defaults to `0`):
            If > 0, measure `eta` from the gradient norms (over the trainable parameters, two extra backward passes
            per micro-step) during the first this-many optimizer steps, use the running mean meanwhile, then keep
            it fixed (saved in checkpoints). Not with DeepSpeed or FSDP, which shard the gradients.

        > Parameters whose defaults differ from `GRPOConfig` (the GNDPO reference recipe)

        disable_dropout (`bool`, *optional*, defaults to `True`):
            Disable dropout in the student and the teacher, so that the token signal is not noisy.
        loss_type (`str`, *optional*, defaults to `"grpo"`):
            Loss aggregation. `"grpo"`: sequence-mean-token-mean (GNDPO reference). `"dapo"`: sum over tokens divided
            by the number of valid tokens of the generation batch. TRL's other aggregations are not implemented by
            GNDPO's loss.
        importance_sampling_level (`str`, *optional*, defaults to `"sequence"`):
            `"sequence"`: GSPO ratio in token form, `sg[s_i] * p_t / sg[p_t]` (GNDPO reference). `"token"`: per-token
            PPO ratio.
        weight_decay (`float`, *optional*, defaults to `0.01`):
            Weight decay of AdamW.
        lr_scheduler_type (`str`, *optional*, defaults to `"constant"`):
            Learning-rate schedule.
    """

    _VALID_DICT_FIELDS = GRPOConfig._VALID_DICT_FIELDS + [
        "teacher_model_init_kwargs",
        "teacher_models",
        "teacher_device",
        "teacher_model_server_url",
    ]

    # Teacher
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Name or path of the teacher, used when the trainer's `teacher_model` is not given."},
    )
    teacher_model_revision: str | None = field(
        default=None,
        metadata={"help": "Revision of the teacher (branch, tag or commit) when it is loaded from a name or path."},
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `from_pretrained` when the teacher is loaded from a name or path (dict or "
            "JSON string). `dtype` defaults to bfloat16 where supported, float16 on other GPUs, float32 on CPU. "
            'A `quantization_config` may be a dict, e.g. `{"load_in_4bit": true}`.'
        },
    )

    teacher_models: dict[str, str] | str | None = field(
        default=None,
        metadata={
            "help": "Several teachers, name -> name or path (dict or JSON string); each sample is scored by the "
            "teacher its `teacher_column` names. Alternative to `teacher_model_name_or_path`."
        },
    )
    teacher_column: str | None = field(
        default=None,
        metadata={
            "help": "With several teachers, the dataset column holding each sample's teacher name or index; "
            "defaults to `teacher_id` (TRL's name) or, without it, `teacher`."
        },
    )
    teacher_device: dict[str, str] | str | None = field(
        default=None,
        metadata={
            "help": "Keep the teacher on this device (e.g. 'cuda:1' or 'cpu'), or with several teachers a dict "
            "name -> device; not with DeepSpeed or FSDP."
        },
    )
    teacher_offload: bool = field(
        default=False,
        metadata={"help": "Keep the teacher in CPU memory, moving it to the training device only to score."},
    )
    teacher_model_server_url: dict[str, str] | str | None = field(
        default=None,
        metadata={
            "help": "Base URL of a vLLM server serving the teacher (`vllm serve TEACHER`, with `--enable-scale-out` "
            "for a vision-language student), used instead of a local teacher to score the sampled tokens; or a dict "
            "teacher name -> URL, routed by `teacher_column`."
        },
    )
    teacher_model_server_timeout: float = field(
        default=300.0,
        metadata={"help": "Seconds to wait for the teacher server at start-up and for each scoring request."},
    )
    teacher_model_server_chunk_size: int = field(
        default=16, metadata={"help": "Sequences per request to the teacher server."}
    )
    teacher_model_server_max_concurrent_requests: int = field(
        default=4, metadata={"help": "Requests to the teacher server in flight at once, per process."}
    )
    teacher_model_server_api_key: str | None = field(
        default=None,
        repr=False,
        metadata={
            "help": "Key of a teacher server started with `vllm serve --api-key`, sent as `Authorization: Bearer`; "
            "if unset, read from the TEACHER_MODEL_SERVER_API_KEY environment variable. Never saved or logged."
        },
    )
    teacher_model_server_retry_timeout: float = field(
        default=300.0,
        metadata={
            "help": "Seconds to keep retrying a request while the teacher server is down or restarting, before "
            "training stops with an error."
        },
    )
    cross_modal_distillation: bool = field(
        default=False,
        metadata={
            "help": "Allow a text-only teacher for a vision-language student: it scores the text view of each "
            "sample (images removed) while the student trains on the image view. Uni-OPD's cross-modal setting "
            "gives text teachers text-domain rows; image rows they score are counted and warned about."
        },
    )
    cross_tokenizer_distillation: bool = field(
        default=False,
        metadata={
            "help": "Let each teacher keep its own tokenizer, chat template and processor: it scores its own tokens "
            "of the student's completion text, aligned to the student's tokens by character spans."
        },
    )

    # Token signal
    token_signal_clamp: float = field(
        default=5.0,
        metadata={
            "help": "Bound b of the token signal clamp(log q - log p_old, -b, b), applied before normalization."
        },
    )
    normalization_scope: str = field(
        default="global",
        metadata={
            "help": "'global': whiten the token signal over every valid completion token of the whole generation "
            "batch on all processes (GNDPO). 'none': use the clamped signal as the advantage (plain OPD).",
            "choices": ["global", "none"],
        },
    )
    whitening_eps: float = field(
        default=1e-8,
        metadata={"help": "Added to the variance inside the square root of the whitening."},
    )
    outcome_advantage_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of GRPO's sequence-level outcome advantage from `reward_funcs`, added to every valid "
            "token. 0 (GNDPO): rewards are only logged."
        },
    )
    max_log_ratio: float = field(
        default=10.0,
        metadata={"help": "Upper clamp of the log importance ratio in the policy loss."},
    )

    reward_extrapolation: float = field(
        default=1.0,
        metadata={
            "help": "ExOPD lambda on the teacher-minus-initial-student signal; 1.0 is plain OPD, ExOPD uses 1.25. "
            "With lambda != 1 the teacher scores at the sampling temperature (G-OPD's code), else at 1 (GNDPO's)."
        },
    )
    reference_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "G-OPD reward correction: the reference of reward_extrapolation is this model (the teacher's "
            "pre-RL base) instead of the initial student."
        },
    )
    value_baseline: bool = field(
        default=False,
        metadata={"help": "vOPD: add the detached full-vocabulary reverse KL(p || q) of each position to the signal."},
    )
    value_baseline_top_k: int | None = field(
        default=None,
        metadata={
            "help": "vOPD top-k baseline: the KL on the student's k most likely tokens, renormalized (None: exact)."
        },
    )
    token_selection: str = field(
        default="none",
        metadata={
            "help": "TIP token selection: 'entropy' keeps the highest-entropy share of tokens, 'quadrant' also keeps "
            "low-entropy tokens with a high teacher-student divergence, 'q3' keeps only those, 'entropy_sampling' "
            "draws the share with probability proportional to entropy; 'none' keeps all.",
            "choices": ["none", "entropy", "quadrant", "q3", "entropy_sampling"],
        },
    )
    token_selection_ratio: float = field(
        default=0.5,
        metadata={
            "help": "Share of tokens counted as high entropy (and high divergence), or drawn, by TIP; the share kept "
            "is r for 'entropy', about r(2 - r) for 'quadrant', about r(1 - r) for 'q3'."
        },
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "Skip (mask and count) completions of prompts longer than this many tokens (None: keep all)."
        },
    )
    long_prompts: str = field(
        default="mask",
        metadata={
            "help": "Prompts over max_prompt_length before generation: 'mask' (generate in full, then mask), "
            "'truncate' (keep the last max_prompt_length tokens; text prompts only) or 'error'.",
            "choices": ["mask", "truncate", "error"],
        },
    )
    max_abs_log_ratio: float | None = field(
        default=None,
        metadata={"help": "Drop tokens with |log p - log q| >= this bound from statistics and loss (Uni-OPD: 10)."},
    )
    old_logps_from_sampler: bool = field(
        default=False,
        metadata={
            "help": "Take log p_old from the sampler (vLLM's log-probs, or recorded during transformers generation) "
            "instead of a student re-score pass; refused with top_k, top_p, min_p or repetition_penalty."
        },
    )

    # Checks of bad input
    max_checked_rows: int | None = field(
        default=None,
        metadata={
            "help": "Check the prompts and images of only the first this-many rows of each dataset before training "
            "(None: every row)."
        },
    )
    max_invalid_generation_batches: int | None = field(
        default=3,
        metadata={
            "help": "Stop after this many consecutive training generation batches without any valid completion "
            "token (None: never stop)."
        },
    )

    # Uni-OPD
    correctness_threshold: float = field(
        default=0.5, metadata={"help": "A completion is correct when its weighted outcome reward is at least this."}
    )
    margin_calibration: str = field(
        default="none",
        metadata={
            "help": "Uni-OPD margin calibration on the normalized advantages (after GNDPO's whitening by default; "
            "the reference calibrates the raw log-ratio: normalization_scope='none'): 'shift' the classes apart, "
            "'mask' the responses that close the gap, 'group_mask' whole prompt groups below the margin "
            "(alternatives), or 'none'.",
            "choices": ["none", "shift", "mask", "group_mask"],
        },
    )
    margin_scope: str = field(
        default="group",
        metadata={"help": "One margin per prompt group, or one global margin.", "choices": ["group", "global"]},
    )
    margin_mode: str | None = field(
        default=None,
        metadata={
            "help": "Gap: mean correct - mean incorrect, or min correct - max incorrect. None: 'minmax' under "
            "'group_mask' (the paper's margin), 'mean' under 'shift' and 'mask' (the reference scripts).",
            "choices": ["mean", "minmax"],
        },
    )
    margin_direction: str = field(
        default="both",
        metadata={"help": "Who moves under 'shift'.", "choices": ["both", "correct_up", "incorrect_down"]},
    )
    margin_delta: float = field(
        default=0.4,
        metadata={
            "help": "The margin to reach, in the advantage's units: standard deviations after GNDPO's whitening "
            "(normalization_scope='global', the default), nats of the log-ratio with 'none' (the Uni-OPD reference)."
        },
    )
    margin_min_retain_ratio: float = field(
        default=0.25, metadata={"help": "Under 'mask', the share of each class that is never dropped."}
    )
    balance_ratio: float | None = field(
        default=None,
        metadata={"help": "Drop each group's majority-class surplus down to correct:incorrect = ratio:1 (off: None)."},
    )

    # Visual Gradient Steering
    visual_gradient_steering: bool = field(
        default=False,
        metadata={
            "help": "Train on the VGS loss eta * (KL(p||q) + gamma KL(p||q*) + lambda 1[VDS > quantile] "
            "KL(p_text||q_text)) on a text-only view of each sample (vision-language students); see vgs_mode."
        },
    )
    vgs_mode: str = field(
        default="alone",
        metadata={
            "help": "'alone': train on the VGS loss only (the paper's main setting). 'grpo': (1 - vgs_alpha) * GRPO "
            "with the outcome advantage of `reward_funcs`, no teacher signal + vgs_alpha * VGS (the paper's GRPO + "
            "VGS). 'gndpo': (1 - vgs_alpha) * GNDPO + vgs_alpha * VGS.",
            "choices": ["alone", "grpo", "gndpo"],
        },
    )
    vgs_alpha: float = field(
        default=0.3,
        metadata={
            "help": "Weight of VGS in the 'grpo' and 'gndpo' modes: (1 - vgs_alpha) * policy loss + vgs_alpha * VGS "
            "(paper's GRPO + VGS: 0.3). Not used by 'alone'."
        },
    )
    vgs_gamma: float = field(default=2.0, metadata={"help": "Weight gamma of the visual term KL(p || q*)."})
    vgs_lambda: float = field(
        default=0.01, metadata={"help": "Weight lambda of the language-prior term KL(p_text || q_text)."}
    )
    vgs_lp_quantile: float = field(
        default=0.7,
        metadata={"help": "The language-prior term trains tokens whose VDS exceeds this quantile of the batch's VDS."},
    )
    vgs_adaptive_gamma: bool = field(
        default=False,
        metadata={"help": "Per-token gamma: 0 / gamma/2 / gamma split at the 40th / 70th VDS percentiles."},
    )
    vgs_eta: float = field(
        default=0.41,
        metadata={
            "help": "Fixed VGS loss scale eta = ||grad L_Std|| / ||grad L_Std + gamma grad L_Vis||; default: the "
            "paper's value measured for one pair, Qwen3-VL-8B -> 2B (0.36 for -> 4B); for other pairs measure it "
            "with vgs_eta_measure_steps. 1.0 is the paper's no-normalization ablation."
        },
    )
    vgs_eta_measure_steps: int = field(
        default=0,
        metadata={
            "help": "If > 0, measure eta = ||grad L_Std|| / ||grad L_Std + gamma grad L_Vis|| over the first "
            "this-many optimizer steps, then keep it fixed."
        },
    )

    # GRPO defaults replaced by the GNDPO reference recipe
    disable_dropout: bool = field(
        default=True,
        metadata={"help": "Disable dropout in the student and the teacher, so the token signal is not noisy."},
    )
    loss_type: str = field(
        default="grpo",
        metadata={
            "help": "Loss aggregation. 'grpo': sequence-mean-token-mean (GNDPO reference). 'dapo': sum over tokens "
            "divided by the number of valid tokens of the generation batch.",
            "choices": ["grpo", "dapo"],
        },
    )
    importance_sampling_level: str = field(
        default="sequence",
        metadata={
            "help": "'sequence': GSPO ratio in token form, sg[s_i] * p_t / sg[p_t] (GNDPO reference). 'token': "
            "per-token PPO ratio.",
            "choices": ["sequence", "token"],
        },
    )
    weight_decay: float = field(default=0.01, metadata={"help": "Weight decay of AdamW."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "The scheduler type to use."})

    def _check_teachers(self) -> None:
        """Several teachers, their devices and the G-OPD reference (after the JSON fields are parsed)."""
        if self.teacher_models is not None:
            if not isinstance(self.teacher_models, dict) or not self.teacher_models:
                raise ValueError(
                    f"teacher_models must be a non-empty dict teacher name -> name or path (or its JSON string), "
                    f"got {self.teacher_models!r}."
                )
            if self.teacher_model_name_or_path is not None:
                raise ValueError(
                    "teacher_models and teacher_model_name_or_path are alternatives: name every teacher in "
                    "teacher_models, or use teacher_model_name_or_path alone."
                )
        if isinstance(self.teacher_device, dict) and self.teacher_models is not None:  # else checked by the trainer
            self.check_teacher_device_names(list(self.teacher_models))
        if self.reference_model_name_or_path is not None and self.reward_extrapolation == 1.0:
            raise ValueError(
                "reference_model_name_or_path is the reference of reward_extrapolation, which cancels at 1.0: set "
                "reward_extrapolation (G-OPD's ExOPD uses 1.25) or drop the reference model."
            )

    def __post_init__(self):
        if self.num_generations is not None and self.num_generations < 2:
            raise ValueError(
                f"num_generations must be >= 2, got {self.num_generations}. GNDPO's whitening needs no prompt groups, "
                "but GRPOTrainer (TRL 1.16), whose sampler and validation GNDPO reuses, only runs with groups of at "
                "least 2 samples per prompt; both samples train, so set num_generations=2 and halve the number of "
                "prompts per batch for the same cost."
            )
        super().__post_init__()
        for name in _FINITE_FIELDS:  # inf or NaN here would silently zero the advantages or NaN the weights
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}.")
        if not self.learning_rate >= 0:
            raise ValueError(f"learning_rate must be >= 0, got {self.learning_rate}.")
        if math.isnan(self.max_grad_norm or 0.0):  # inf is allowed: it logs the norm without clipping
            raise ValueError("max_grad_norm must be a number, got nan (use 0 or None to disable clipping).")
        if not 0 < self.reward_extrapolation <= _MAX_REWARD_EXTRAPOLATION:
            raise ValueError(
                f"reward_extrapolation must be in (0, {_MAX_REWARD_EXTRAPOLATION}], got {self.reward_extrapolation}: "
                "at 0 the teacher drops out of the signal, below 0 the student is trained away from it, and far above "
                "the values G-OPD studies (1.0 is plain OPD, ExOPD uses 1.25) every token sits at token_signal_clamp."
            )
        if not self.temperature > 0:
            raise ValueError(
                f"temperature must be > 0 (the student's log-probs are divided by it), got {self.temperature}."
            )
        for name in ("epsilon", "epsilon_high"):
            if getattr(self, name) is not None and not getattr(self, name) >= 0:
                raise ValueError(f"{name} (the policy loss's clip range) must be >= 0, got {getattr(self, name)}.")
        if (self.teacher_device is not None or self.teacher_offload) and (self.deepspeed or self.fsdp):
            raise ValueError(
                "teacher_device and teacher_offload place the teacher outside DeepSpeed/FSDP, which shard it "
                "themselves: drop them, or train without DeepSpeed/FSDP."
            )
        if self.teacher_device is not None and self.teacher_offload:
            raise ValueError("teacher_device and teacher_offload are alternatives: set one of them.")
        if self.margin_mode is None:  # each calibration's own pairing: the paper's m(q) for its group mask
            self.margin_mode = "minmax" if self.margin_calibration == "group_mask" else "mean"
        self._check_choices()
        self._check_teachers()
        self._check_teacher_server()
        self._check_cross_tokenizer()
        if not self.token_signal_clamp > 0:
            raise ValueError(f"token_signal_clamp must be > 0, got {self.token_signal_clamp}.")
        if not self.whitening_eps > 0:
            raise ValueError(
                f"whitening_eps must be > 0 (it keeps constant signals finite), got {self.whitening_eps}."
            )
        if not self.outcome_advantage_weight >= 0:
            raise ValueError(f"outcome_advantage_weight must be >= 0, got {self.outcome_advantage_weight}.")
        if not self.max_log_ratio > 0:
            raise ValueError(f"max_log_ratio must be > 0, got {self.max_log_ratio}.")
        if self.visual_gradient_steering and self.temperature != 1.0:
            raise ValueError(
                f"visual_gradient_steering computes its KLs (KL(p || q), KL(p || q*), VDS, KL(p_text || q_text)) from "
                f"the untempered vocabulary heads, while temperature={self.temperature} tempers the student's samples "
                "and policy log-probs: the VGS loss would train another distribution than the one sampled (the paper "
                "gives no temperature for its KLs): set temperature=1.0, or visual_gradient_steering=False."
            )
        if self.value_baseline and self.temperature != 1.0:
            raise ValueError(
                f"value_baseline (vOPD) compares the distributions at temperature 1; set temperature=1.0 (got "
                f"{self.temperature}) or value_baseline=False."
            )
        if self.old_logps_from_sampler:
            self._check_old_logps_from_sampler()
        if self.value_baseline_top_k is not None:
            if not self.value_baseline:
                raise ValueError("value_baseline_top_k approximates vOPD's baseline: set value_baseline=True too.")
            k = self.value_baseline_top_k
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"value_baseline_top_k must be a whole number >= 1 or None, got {k!r}.")
        if not 0 < self.token_selection_ratio <= 1:
            raise ValueError(f"token_selection_ratio must be in (0, 1], got {self.token_selection_ratio}.")
        if self.max_prompt_length is not None and not self.max_prompt_length > 0:
            raise ValueError(f"max_prompt_length must be > 0 or None, got {self.max_prompt_length}.")
        if self.max_abs_log_ratio is not None and not self.max_abs_log_ratio > 0:
            raise ValueError(f"max_abs_log_ratio must be > 0 or None, got {self.max_abs_log_ratio}.")
        for name in ("max_checked_rows", "max_invalid_generation_batches"):
            if getattr(self, name) is not None and not getattr(self, name) >= 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)}.")
        if self.margin_calibration == "group_mask" and self.margin_scope != "group":
            raise ValueError(
                "margin_calibration='group_mask' discards prompt groups; with margin_scope='global' it would discard "
                "the whole generation batch: set margin_scope='group'."
            )
        if self.margin_calibration != "none" and not self.margin_delta > 0:
            raise ValueError(f"margin_delta must be > 0, got {self.margin_delta}.")
        if not 0 < self.margin_min_retain_ratio <= 1:
            raise ValueError(f"margin_min_retain_ratio must be in (0, 1], got {self.margin_min_retain_ratio}.")
        if self.balance_ratio is not None and not self.balance_ratio > 0:
            raise ValueError(f"balance_ratio must be > 0 or None, got {self.balance_ratio}.")
        if self.visual_gradient_steering and self.vgs_mode == "grpo":
            if self.margin_calibration != "none" or self.outcome_advantage_weight > 0:
                raise ValueError(
                    "vgs_mode='grpo' trains the policy-gradient term on the outcome advantage alone, so "
                    "margin_calibration and outcome_advantage_weight (which act on the teacher advantage) have no "
                    "effect there: set margin_calibration='none' and outcome_advantage_weight=0, or use "
                    "vgs_mode='gndpo'."
                )
        if not 0 <= self.vgs_alpha <= 1:
            raise ValueError(f"vgs_alpha must be in [0, 1], got {self.vgs_alpha}.")
        for name in ("vgs_gamma", "vgs_lambda"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if not 0 <= self.vgs_lp_quantile < 1:
            raise ValueError(f"vgs_lp_quantile must be in [0, 1), got {self.vgs_lp_quantile}.")
        if not self.vgs_eta > 0:
            raise ValueError(f"vgs_eta must be > 0, got {self.vgs_eta}.")
        if self.vgs_eta_measure_steps < 0:
            raise ValueError(f"vgs_eta_measure_steps must be >= 0, got {self.vgs_eta_measure_steps}.")
        if self.visual_gradient_steering and self.vgs_eta_measure_steps and (self.fsdp or self.deepspeed):
            raise ValueError(
                "vgs_eta_measure_steps measures gradient norms, which FSDP and DeepSpeed shard: set vgs_eta to a "
                "fixed value (the paper's 0.41 / 0.36) and vgs_eta_measure_steps=0."
            )
        if self.beta != 0.0:
            raise ValueError(
                f"beta={self.beta}: in GNDPO `beta` is GRPO's KL coefficient (a KL penalty to a reference model), "
                f"which GNDPO replaces by the teacher's token signal, so it must be 0 (set beta=0.0); in TRL's "
                f"DistillationConfig `beta` picks the divergence instead (0 forward KL, 1 reverse KL, 0.5 JSD), and "
                f"GNDPO's signal is always the reverse KL."
            )
        for name, default in _UNSUPPORTED_GRPO_OPTIONS.items():
            if getattr(self, name) != default:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is a GRPOTrainer loss option that GNDPO's loss does not "
                    f"implement; leave it at {default!r}."
                )

    def check_teacher_device_names(self, names: list[str]) -> None:
        """A `teacher_device` dict names only teachers among `names` (from `teacher_models`, or the trainer's)."""
        unknown = sorted(set(self.teacher_device) - set(names))
        if unknown:
            raise ValueError(
                f"teacher_device names teachers {unknown} that are not among the teachers {names}; a single teacher "
                "takes a plain device string."
            )

    def _check_choices(self) -> None:
        """Each field with `choices` in its metadata holds one of them (the lists are written once, on the fields)."""
        for name, spec in type(self).__dataclass_fields__.items():
            allowed = spec.metadata.get("choices")
            if name not in GNDPOConfig.__annotations__ or allowed is None or getattr(self, name) in allowed:
                continue
            listed = ", ".join(repr(choice) for choice in allowed[:-1]) + f" or {allowed[-1]!r}"
            hint = _CHOICE_HINTS.get(name, "")
            raise ValueError(f"{name} must be {listed}, got {getattr(self, name)!r}{hint}.")

    def _check_old_logps_from_sampler(self) -> None:
        """The sampler's log-probs stand for the re-score only when they are of the same distribution."""
        settings = {name: getattr(self, name) for name in ("top_k", "top_p", "min_p", "repetition_penalty")}
        settings.update((self.generation_kwargs or {}) if isinstance(self.generation_kwargs, dict) else {})
        neutral = dict(_NEUTRAL_SAMPLING, temperature=(self.temperature,))
        changed = {k: v for k, v in settings.items() if k in neutral and v not in neutral[k]}
        if changed:
            raise ValueError(
                f"old_logps_from_sampler takes log p_old from the sampler, whose distribution {changed} changes away "
                f"from the tempered softmax the token signal uses: reset them (top_k=0, top_p=1.0, min_p=None, "
                f"repetition_penalty=1.0) or set old_logps_from_sampler=False."
            )
        if self.token_selection != "none" or self.value_baseline:
            raise ValueError(
                "old_logps_from_sampler saves the student's scoring pass, which token_selection (TIP) and "
                "value_baseline (vOPD) need anyway: set old_logps_from_sampler=False."
            )
        if self.use_transformers_continuous_batching:
            raise ValueError(
                "old_logps_from_sampler cannot record log-probs with use_transformers_continuous_batching: use "
                "generate (use_transformers_continuous_batching=False) or vLLM, or set old_logps_from_sampler=False."
            )
        if self.use_vllm and self.vllm_importance_sampling_correction:
            raise ValueError(
                "With vllm_importance_sampling_correction, TRL re-scores every batch on the training side anyway and "
                "GNDPO uses that re-score: set vllm_importance_sampling_correction=False to take log p_old from "
                "vLLM, or old_logps_from_sampler=False."
            )
        if self.rescores_each_generation:
            warnings.warn(
                f"old_logps_from_sampler has no effect with num_iterations={self.num_iterations} and "
                f"steps_per_generation={self.steps_per_generation}: TRL re-scores each generation batch for its "
                "importance ratio, and GNDPO uses that re-score as log p_old.",
                stacklevel=3,
            )

    @property
    def teacher_temperature(self) -> float:
        """The temperature the teacher scores at: 1 (GNDPO's reference code: its teacher's logits are not divided by
        the temperature), or the sampling temperature under G-OPD's `reward_extrapolation != 1` (G-OPD's code scores
        its teacher, the student and both base models at the rollout temperature)."""
        return 1.0 if self.reward_extrapolation == 1.0 else self.temperature

    @property
    def rescores_each_generation(self) -> bool:
        """Whether GRPOTrainer re-scores each generation batch with the student for its importance ratio (stored as
        `old_per_token_logps`): TRL's condition, `gradient_accumulation_steps` not a multiple of `steps_per_generation
        x num_iterations` (vLLM's importance-sampling correction aside)."""
        return self.gradient_accumulation_steps % (self.steps_per_generation * self.num_iterations) != 0

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d.update({name: f"<{name.upper()}>" for name in _SECRET_FIELDS if d.get(name) is not None})
        return d

    def __str__(self) -> str:
        redacted = copy.copy(self)  # through __getstate__: no secrets
        for name in _SECRET_FIELDS:
            if getattr(self, name) is not None:
                setattr(redacted, name, f"<{name.upper()}>")
        return GRPOConfig.__str__(redacted)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, **{name: None for name in _SECRET_FIELDS}}

    def _check_cross_tokenizer(self) -> None:
        """A teacher with its own tokenizer scores its own tokens of the completion text: options that need the
        teacher's scores on the student's own tokens or positions are refused."""
        if not self.cross_tokenizer_distillation:
            return
        needs_student_tokens = {
            "teacher_model_server_url": "a served teacher (the server scores token ids the student sends)",
            "token_selection": "TIP token selection (per-token entropy and divergence)",
            "value_baseline": "the vOPD value baseline (the teacher's distribution over the student's vocabulary)",
            "visual_gradient_steering": "VGS (the teacher's distributions over the student's vocabulary)",
        }
        for name, what in needs_student_tokens.items():
            if getattr(self, name) not in (None, False, "none"):
                raise ValueError(
                    f"cross_tokenizer_distillation scores the teacher's own tokens, which {what} cannot use (not "
                    f"supported yet): set {name} back to its default, or use a teacher with the student's tokenizer."
                )

    def _check_teacher_server(self) -> None:
        """A served teacher replaces the local one and gives only the sampled tokens' log-probs."""
        urls = self.teacher_model_server_url
        if isinstance(urls, dict):
            empty = [name for name, url in urls.items() if not (isinstance(url, str) and url.strip())]
            if not urls or empty:  # the URLs are not repeated: one of the others may carry a secret
                raise ValueError(
                    "teacher_model_server_url as a dict names each teacher's server: teacher name -> base URL; "
                    f"{'it is empty' if not urls else f'no URL for {empty}'}."
                )
        elif urls is not None and not urls.strip():
            raise ValueError("teacher_model_server_url is empty: give the server's base URL, or None.")
        for url in urls.values() if isinstance(urls, dict) else [] if urls is None else [urls]:
            if url_problem(url) is not None:
                raise ValueError(f"teacher_model_server_url {url_problem(url)}.")
        if self.teacher_model_server_api_key is not None and self.teacher_model_server_url is None:
            raise ValueError(
                "teacher_model_server_api_key is set without teacher_model_server_url: set both, or neither."
            )
        if not (math.isfinite(self.teacher_model_server_timeout) and self.teacher_model_server_timeout > 0):
            raise ValueError(f"teacher_model_server_timeout must be > 0, got {self.teacher_model_server_timeout}.")
        retry = self.teacher_model_server_retry_timeout
        if not (math.isfinite(retry) and retry >= 0):
            raise ValueError(f"teacher_model_server_retry_timeout must be a finite number >= 0, got {retry}.")
        for name in ("teacher_model_server_chunk_size", "teacher_model_server_max_concurrent_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.teacher_model_server_url is None:
            return
        if self.teacher_temperature != 1.0:
            raise ValueError(
                f"reward_extrapolation={self.reward_extrapolation} scores the teacher at the sampling temperature "
                f"({self.temperature}), as G-OPD's code does, but a teacher server returns log-probs at temperature "
                "1: set temperature=1.0, or use a local teacher instead of teacher_model_server_url."
            )
        local = ("teacher_model_name_or_path", "teacher_models", "teacher_model_revision", "teacher_model_init_kwargs")
        local += ("teacher_device", "teacher_offload", "cross_modal_distillation")
        given = [name for name in local if getattr(self, name)]
        if given:
            raise ValueError(
                f"teacher_model_server_url scores with a served teacher, but {', '.join(given)} configure a local "
                "one: drop them, or drop teacher_model_server_url."
            )
        needs_model = {
            "value_baseline": "the full next-token distributions (its KL baseline)",
            "visual_gradient_steering": "the teacher's full distributions and its text-only view of each sample",
        }
        for name, what in needs_model.items():
            if getattr(self, name):
                raise ValueError(
                    f"{name} needs {what}, which a vLLM server does not return (it gives the sampled tokens' "
                    f"log-probs): set {name}=False, or use a local teacher instead of teacher_model_server_url."
                )

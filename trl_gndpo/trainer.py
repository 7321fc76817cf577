"""GNDPO trainer: TRL's GRPOTrainer with a frozen teacher whose token signal, globally whitened, is the advantage."""

from typing import Any

import torch
from transformers import AutoProcessor, BitsAndBytesConfig, PreTrainedModel
from transformers.utils import logging
from trl import GRPOTrainer
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import add_fused_lm_head, create_model_from_path, disable_dropout_in_model

from . import functional as F
from . import uniopd as U
from .config import GNDPOConfig

logger = logging.get_logger(__name__)

# Keys of a generation batch that `GRPOTrainer._get_per_token_logps_and_entropies` takes besides the token ids.
_MODEL_INPUT_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)
# Settings that decide how an image becomes tokens: the teacher must agree with the student on each of them.
_VISION_CONFIG_KEYS = ("patch_size", "spatial_merge_size", "temporal_patch_size", "in_channels")
_IMAGE_TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
_IMAGE_PROCESSOR_KEYS = ("patch_size", "merge_size", "temporal_patch_size", "size")  # size holds min/max pixels
# GRPO's outcome-reward metrics, meaningless for the placeholder reward.
_REWARD_METRICS = ("reward", "reward_std", "frac_reward_zero_std")


def no_outcome_reward(completions: list, **kwargs) -> list[float]:
    """Placeholder reward: GRPOTrainer requires one, GNDPO's advantage comes from the teacher alone."""
    return [0.0] * len(completions)


class GNDPOTrainer(GRPOTrainer):
    """
    Globally Normalized Distillation Policy Optimization.

    The student samples completions on-policy (GRPOTrainer's generation: transformers or vLLM, text or Qwen-VL
    inputs). A frozen teacher scores the sampled tokens once per generation batch on exactly the student's input ids
    and images. The token signal `r_t = clamp(log q(y_t) - log p_old(y_t), -b, b)` is whitened with its mean and
    unbiased variance over every valid completion token of the generation batch on all processes, and the result is
    the per-token advantage of a clipped policy-gradient loss (GSPO-token ratio, sequence-mean-token-mean).

    Args:
        model: the student, a name or path or a `PreTrainedModel` (as for `GRPOTrainer`).
        teacher_model: the teacher, a name or path (loaded with `args.teacher_model_init_kwargs`) or a
            `PreTrainedModel`; defaults to `args.teacher_model_name_or_path`. It must share the student's tokenizer
            and, for vision-language students, its image layout.
        reward_funcs: optional outcome rewards (GRPO signature). Logged; they decide correctness for the Uni-OPD
            options, and are mixed into the advantage only with `args.outcome_advantage_weight > 0`.
        args: a [`GNDPOConfig`].
        teacher_processing_class: the teacher's tokenizer or processor, used only to check that it tokenizes and lays
            out images like the student's. Loaded from the teacher's path when the teacher is given by name.
        **grpo_kwargs: everything else `GRPOTrainer` takes (`train_dataset`, `eval_dataset`, `processing_class`,
            `peft_config`, `callbacks`, `optimizers`, `quantization_config`, ...).
    """

    _tag_names = ["trl", "gndpo"]
    _name = "GNDPO"

    def __init__(
        self,
        model: "str | PreTrainedModel",
        teacher_model: "str | PreTrainedModel | None" = None,
        reward_funcs=None,
        args: GNDPOConfig | None = None,
        teacher_processing_class=None,
        **grpo_kwargs: Any,
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = GNDPOConfig(f"{str(name).split('/')[-1]}-GNDPO")
        elif not isinstance(args, GNDPOConfig):
            raise TypeError(f"args must be a GNDPOConfig, got {type(args).__name__}.")
        teacher_model = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        if teacher_model is None:
            raise ValueError("GNDPO needs a teacher: pass `teacher_model` or set `teacher_model_name_or_path`.")
        if isinstance(teacher_model, str):
            if teacher_processing_class is None:
                teacher_processing_class = _load_processing_class(teacher_model, args)
            teacher_model = _load_teacher(teacher_model, args)
        elif args.teacher_model_init_kwargs is not None:
            raise ValueError(
                "teacher_model_init_kwargs is set but the teacher is already instantiated: drop the kwargs or pass "
                "the teacher by name."
            )
        if args.outcome_advantage_weight > 0 and not reward_funcs:
            raise ValueError("outcome_advantage_weight > 0 needs `reward_funcs` to compute the outcome advantage.")
        if (args.margin_calibration != "none" or args.balance_ratio is not None) and not reward_funcs:
            raise ValueError(
                "Uni-OPD margin calibration and balancing need `reward_funcs` to tell correct from incorrect "
                "completions: pass them, or set margin_calibration='none' and balance_ratio=None."
            )
        self._placeholder_reward = not reward_funcs

        super().__init__(model=model, reward_funcs=reward_funcs or no_outcome_reward, args=args, **grpo_kwargs)

        self._check_datasets(grpo_kwargs.get("train_dataset"), grpo_kwargs.get("eval_dataset"))
        self._check_teacher(teacher_model, teacher_processing_class)
        self.teacher_model = self._prepare_teacher(teacher_model)

    # ----------------------------------------------------------------------------------------------------------------
    # Set-up checks: every mismatch is reported before the first training step.

    def _check_datasets(self, train_dataset, eval_dataset) -> None:
        datasets = [train_dataset] + (
            list(eval_dataset.values()) if isinstance(eval_dataset, dict) else [eval_dataset]
        )
        for dataset in datasets:
            columns = getattr(dataset, "column_names", None)
            if not columns:  # None, or a streaming dataset whose columns are unknown until read
                continue
            if "prompt" not in columns and self.environment_factories is None:
                raise ValueError(f"The dataset needs a `prompt` column (conversational or text); it has {columns}.")
            image_columns = [c for c in ("image", "images") if c in columns]
            if image_columns and not self._is_vlm:
                raise ValueError(
                    f"The dataset has an image column {image_columns} but the student's processing class is a "
                    "text tokenizer. Use a vision-language student with its processor, or drop the image column."
                )

    def _check_teacher(self, teacher: PreTrainedModel, teacher_processing_class) -> None:
        student = self.accelerator.unwrap_model(self.model)
        student_config, teacher_config = student.config, teacher.config
        student_rows = student_config.get_text_config().vocab_size
        teacher_rows = teacher_config.get_text_config().vocab_size
        if teacher_rows < student_rows:
            raise ValueError(
                f"The teacher's vocabulary ({teacher_rows} rows) is smaller than the student's ({student_rows}): the "
                "teacher cannot score every token the student can sample. Use a teacher with the student's tokenizer."
            )
        if teacher_processing_class is not None:
            teacher_tokenizer = getattr(teacher_processing_class, "tokenizer", teacher_processing_class)
            student_vocab, teacher_vocab = self._tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
            if student_vocab != teacher_vocab:
                differing = sorted(set(student_vocab.items()) ^ set(teacher_vocab.items()))
                raise ValueError(
                    f"The teacher's tokenizer differs from the student's ({len(teacher_vocab)} vs "
                    f"{len(student_vocab)} tokens; differing (token, id) pairs include {differing[:4]}). GNDPO scores "
                    "the student's token ids with the teacher, so both must share one vocabulary."
                )
        else:
            logger.warning(
                "No teacher tokenizer was given, so only the vocabulary sizes were compared. Pass "
                "`teacher_processing_class` to check that the teacher tokenizes exactly like the student."
            )
        if not self._is_vlm:
            return
        teacher_vision = getattr(teacher_config, "vision_config", None)
        if teacher_vision is None:
            raise ValueError(
                f"The student is a vision-language model but the teacher ({type(teacher).__name__}) has no vision "
                "tower: it must see the same images. Use a vision-language teacher of the same family."
            )
        student_processor = self.processing_class.image_processor
        teacher_processor = getattr(teacher_processing_class, "image_processor", None)
        mismatches = (
            _differences("vision_config.", student_config.vision_config, teacher_vision, _VISION_CONFIG_KEYS)
            + _differences("", student_config, teacher_config, _IMAGE_TOKEN_KEYS)
            + _differences("image_processor.", student_processor, teacher_processor, _IMAGE_PROCESSOR_KEYS)
        )
        if mismatches:
            raise ValueError(
                "The teacher lays image tokens out differently from the student, so it cannot score the student's "
                "inputs: " + "; ".join(mismatches) + ". Use a teacher of the same family and image settings."
            )

    def _prepare_teacher(self, teacher: PreTrainedModel):
        teacher.requires_grad_(False)
        teacher.eval()
        if self.args.disable_dropout:
            disable_dropout_in_model(teacher)
        # The teacher scores at temperature 1, whatever the student samples with.
        add_fused_lm_head(teacher, temperature=1.0, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(teacher, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(teacher, self.accelerator)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    # ----------------------------------------------------------------------------------------------------------------
    # Advantages: once per generation batch.

    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        if self._placeholder_reward:
            for key in (
                *_REWARD_METRICS,
                *(f"rewards/{n}/{s}" for n in self.reward_func_names for s in ("mean", "std")),
            ):
                metrics.pop(key, None)

        mask = batch["completion_mask"] if "tool_mask" not in batch else batch["completion_mask"] * batch["tool_mask"]
        student_logps, teacher_logps = self._score_student_and_teacher(batch, mode)
        signal, finite = F.clamped_log_ratio(teacher_logps, student_logps, mask, self.args.token_signal_clamp)
        valid = finite
        if self.args.max_abs_log_ratio is not None:  # Uni-OPD token guard
            valid = valid & ((teacher_logps - student_logps).abs() < self.args.max_abs_log_ratio)
        if self.args.balance_ratio is not None:
            valid = valid & self._balanced_responses(valid, metrics).unsqueeze(1)
        signal = torch.where(valid, signal, 0)
        if self.args.normalization_scope == "global":
            advantages, _, _ = F.whitened_advantages(
                signal, valid, self.args.whitening_eps, lambda t: self.accelerator.reduce(t, reduction="sum")
            )
        else:
            advantages = signal
        if self.args.margin_calibration != "none":
            advantages = self._calibrate_margins(advantages, valid, metrics)
        if self.args.outcome_advantage_weight > 0:
            advantages = advantages + self.args.outcome_advantage_weight * batch["advantages"].unsqueeze(1) * valid
        batch["advantages"] = advantages
        batch["tool_mask"] = valid.to(batch["completion_mask"].dtype)  # dropped tokens leave the loss too
        batch["num_items_in_batch"] = self.accelerator.gather(valid.sum()).sum()  # "dapo" divides by the loss tokens

        # Logged statistics, all over the whole generation batch on every process (one reduction).
        def valid_sum(x: torch.Tensor) -> torch.Tensor:
            return torch.where(valid, x, 0).to(torch.float64).sum()

        log_ratio = student_logps - teacher_logps
        sums = torch.stack(
            [
                valid_sum(torch.ones_like(signal)),
                valid_sum(log_ratio),
                valid_sum(teacher_logps),
                valid_sum(student_logps),
                valid_sum((log_ratio.abs() > self.args.token_signal_clamp).float()),
                mask.sum().to(torch.float64),
                finite.sum().to(torch.float64),
                valid_sum(signal),
                valid_sum(signal**2),
                valid_sum(advantages),
                valid_sum(advantages**2),
            ]
        )
        n, kl, teacher, student, clamped, n_mask, n_finite, r, r2, a, a2 = self.accelerator.reduce(
            sums, "sum"
        ).tolist()
        abs_max = torch.where(valid, advantages.abs(), 0).amax().to(torch.float64)
        adv_abs_max = self.accelerator.reduce(abs_max, "max").item()
        count = max(n, 1.0)
        r_mean, a_mean = r / count, a / count
        metrics["gndpo/reverse_kl"].append(kl / count)
        metrics["gndpo/teacher_logp"].append(teacher / count)
        metrics["gndpo/student_logp"].append(student / count)
        metrics["gndpo/signal_mean"].append(r_mean)
        metrics["gndpo/signal_std"].append(max(r2 / count - r_mean**2, 0.0) ** 0.5)
        metrics["gndpo/clamped_frac"].append(clamped / count)
        metrics["gndpo/nonfinite_frac"].append((n_mask - n_finite) / max(n_mask, 1.0))
        metrics["gndpo/valid_token_frac"].append(n / max(n_mask, 1.0))
        metrics["gndpo/advantage_mean"].append(a_mean)
        metrics["gndpo/advantage_std"].append(max(a2 / count - a_mean**2, 0.0) ** 0.5)
        metrics["gndpo/advantage_abs_max"].append(adv_abs_max)
        if n_finite < n_mask:
            logger.warning(
                f"GNDPO: {int(n_mask - n_finite)} completion tokens with a non-finite log-prob were masked."
            )
        return batch

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._rewards_per_func = rewards  # (all processes' completions, reward functions): Uni-OPD's correctness
        return rewards

    def _gathered_responses(self, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, slice]:
        """Correctness and presence of every completion of the generation batch (all processes), and our rows."""
        rewards = self._rewards_per_func
        total = (rewards * self.reward_weights.to(rewards.device)).nansum(1)
        present = self.accelerator.gather(valid.any(1)).bool() & ~torch.isnan(rewards).all(1)
        local = slice(self.accelerator.process_index * len(valid), (self.accelerator.process_index + 1) * len(valid))
        return (total >= self.args.correctness_threshold).cpu(), present.cpu(), local

    def _balanced_responses(self, valid: torch.Tensor, metrics) -> torch.Tensor:
        """Uni-OPD online balancing; every process draws the same responses to drop (same seed, same inputs)."""
        correct, present, local = self._gathered_responses(valid)
        # seeded by the step, so a resumed run draws what the uninterrupted one would have
        generator = torch.Generator().manual_seed(self.args.seed * 1_000_003 + self.state.global_step)
        group_size = self.num_generations if self.model.training else self.num_generations_eval
        keep = U.balance_classes(correct, present, group_size, self.args.balance_ratio, generator)
        metrics["uniopd/correct_frac"].append((correct & present).sum().item() / max(present.sum().item(), 1))
        metrics["uniopd/balance_dropped_frac"].append((present & ~keep).sum().item() / max(present.sum().item(), 1))
        return keep[local].to(valid.device)

    def _calibrate_margins(self, advantages: torch.Tensor, valid: torch.Tensor, metrics) -> torch.Tensor:
        """Uni-OPD margin shift or mask on the normalized advantages, per prompt group or over the whole batch."""
        correct, present, local = self._gathered_responses(valid)
        if self.args.balance_ratio is None:  # else logged, before balancing, by `_balanced_responses`
            metrics["uniopd/correct_frac"].append((correct & present).sum().item() / max(present.sum().item(), 1))
        means, _ = U.response_means(advantages, valid)
        means = self.accelerator.gather(means.float()).cpu()
        group_size = self.num_generations if self.model.training else self.num_generations_eval
        group = group_size if self.args.margin_scope == "group" else len(means)
        args = (means, correct, present, group, self.args.margin_delta, self.args.margin_mode)
        if self.args.margin_calibration == "shift":
            shift, gap = U.margin_shift(*args, direction=self.args.margin_direction)
            after = means + shift
            advantages = advantages + shift[local].to(advantages)[:, None] * valid
        else:
            keep, gap = U.margin_mask(*args, min_retain_ratio=self.args.margin_min_retain_ratio)
            after, present = means, present & keep
            advantages = advantages * keep[local].to(advantages)[:, None]
        gap_after = U.margin_gap(
            after.view(-1, group), correct.view(-1, group), present.view(-1, group), self.args.margin_mode
        )
        eligible = ~torch.isnan(gap)
        metrics["uniopd/margin_before"].append(gap[eligible].mean().item() if eligible.any() else 0.0)
        metrics["uniopd/margin_after"].append(gap_after[eligible].mean().item() if eligible.any() else 0.0)
        metrics["uniopd/calibrated_group_frac"].append((gap < self.args.margin_delta).float().mean().item())
        return advantages

    @torch.no_grad()
    def _score_student_and_teacher(self, batch: dict, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs of the sampled tokens under the student (training side) and the teacher, on the same inputs."""
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        args = (input_ids, attention_mask, batch["completion_ids"].size(1))
        kwargs = {k: batch[k] for k in _MODEL_INPUT_KEYS if k in batch}
        kwargs["batch_size"] = (
            self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        )
        student_logps = batch.get("old_per_token_logps")
        if student_logps is None:
            with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
                student_logps, _, _ = self._get_per_token_logps_and_entropies(self.model, *args, **kwargs)
        teacher_logps, _, _ = self._get_per_token_logps_and_entropies(self.teacher_model, *args, **kwargs)
        return student_logps.float(), teacher_logps.float()

    # ----------------------------------------------------------------------------------------------------------------
    # Loss: clipped policy gradient on the per-token advantages.

    def _compute_loss(self, model, inputs):
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask = inputs["completion_mask"] * inputs["tool_mask"]
        logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{k: inputs[k] for k in _MODEL_INPUT_KEYS if k in inputs},
        )
        old_logps = inputs.get("old_per_token_logps")
        per_token_loss, ratio = F.clipped_policy_loss(
            logps,
            logps.detach() if old_logps is None else old_logps,
            inputs["advantages"],
            mask,
            self.epsilon_low,
            self.epsilon_high,
            level=self.importance_sampling_level,
            max_log_ratio=self.args.max_log_ratio,
        )
        if "importance_sampling_ratio" in inputs:  # vLLM sampler/trainer mismatch correction
            per_token_loss = per_token_loss * inputs["importance_sampling_ratio"]

        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        if self.loss_type == "grpo":
            loss = F.seq_mean_token_mean(per_token_loss, mask) / accumulation
        else:  # "dapo": `num_items_in_batch` counts the valid tokens of the whole generation batch
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * accumulation / self.args.steps_per_generation
            loss = (per_token_loss * mask).sum() / normalizer
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation

        def global_mean(x: torch.Tensor) -> float:
            totals = self.accelerator.reduce(torch.stack([(x * mask).sum(), mask.sum()]).float(), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        advantages = inputs["advantages"]
        low = (ratio < 1 - self.epsilon_low) & (advantages < 0)
        high = (ratio > 1 + self.epsilon_high) & (advantages > 0)
        metrics = self._metrics[mode]
        metrics["entropy"].append(global_mean(entropies))
        metrics["clip_ratio/low_mean"].append(global_mean(low.float()))
        metrics["clip_ratio/high_mean"].append(global_mean(high.float()))
        metrics["clip_ratio/region_mean"].append(global_mean((low | high).float()))
        metrics["policy_loss"].append(self.accelerator.gather(loss.detach() * accumulation).mean().item())
        return loss


def _differences(prefix: str, student, teacher, keys: tuple[str, ...]) -> list[str]:
    """'<prefix><key>: student <value>, teacher <value>' for each setting on which the two disagree."""
    if teacher is None:  # nothing to compare against (e.g. no teacher processor)
        return []
    return [
        f"{prefix}{key}: student {getattr(student, key, None)}, teacher {getattr(teacher, key, None)}"
        for key in keys
        if getattr(student, key, None) != getattr(teacher, key, None)
    ]


def _load_teacher(name: str, args: GNDPOConfig) -> PreTrainedModel:
    kwargs = dict(args.teacher_model_init_kwargs or {})
    kwargs.setdefault("dtype", _default_teacher_dtype(args))
    if isinstance(kwargs.get("quantization_config"), dict):
        kwargs["quantization_config"] = BitsAndBytesConfig.from_dict(kwargs["quantization_config"])
    if args.teacher_model_revision is not None:
        kwargs.setdefault("revision", args.teacher_model_revision)
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        kwargs["device_map"] = None  # "auto" fails under distributed training
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    return create_model_from_path(name, **kwargs)


def _default_teacher_dtype(args: GNDPOConfig) -> str:
    """Half precision where the training device supports it: the teacher only runs forward passes."""
    if args.device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if args.device.type in ("xpu", "npu", "hpu"):
        return "bfloat16"
    return "float32"


def _load_processing_class(name: str, args: GNDPOConfig):
    """The teacher's processor or tokenizer, or None (with a warning in `_check_teacher`) if it ships none."""
    try:
        return AutoProcessor.from_pretrained(
            name, revision=args.teacher_model_revision, trust_remote_code=args.trust_remote_code
        )
    except (OSError, ValueError) as error:
        logger.warning(f"Could not load the teacher's tokenizer from {name!r}: {error}")
        return None

"""GNDPO trainer: TRL's GRPOTrainer with a frozen teacher whose token signal, globally whitened, is the advantage."""

import copy
import io
import json
import math
import os
from contextlib import contextmanager, nullcontext
from typing import Any

import PIL.Image
import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, Image
from transformers import AutoProcessor, BitsAndBytesConfig, PreTrainedModel
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging
from trl import GRPOTrainer
from trl.data_utils import prepare_multimodal_messages
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import (
    RepeatSampler,
    add_fused_lm_head,
    create_model_from_path,
    disable_dropout_in_model,
    pad,
    use_adapter,
)

from . import functional as F
from . import uniopd as U
from . import vgs as V
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
# Content blocks that the text-only view of Visual Gradient Steering removes.
_VISUAL_PARTS = ("image", "video")
# GRPO's outcome-reward metrics, meaningless for the placeholder reward.
_REWARD_METRICS = ("reward", "reward_std", "frac_reward_zero_std")


def no_outcome_reward(completions: list, **kwargs) -> list[float]:
    """Placeholder reward: GRPOTrainer requires one, GNDPO's advantage comes from the teacher alone."""
    return [0.0] * len(completions)


class _EpochRepeatSampler(RepeatSampler):
    """TRL's `RepeatSampler` with `set_epoch`, so that a run resumed from a checkpoint keeps the epoch's data order.

    `RepeatSampler` seeds its generator once and draws a new permutation on every pass, so a trainer resumed in epoch
    `e >= 1` (with a fresh sampler) would replay epoch 0's order. `Trainer` calls `set_epoch(epoch)` before each
    epoch: re-seed and skip the earlier epochs' permutations, so the order is the uninterrupted run's.
    """

    def set_epoch(self, epoch: int) -> None:
        if self.shuffle and self.seed is not None:
            self.generator.manual_seed(self.seed)
            for _ in range(epoch):
                torch.randperm(self.num_samples, generator=self.generator)


class GNDPOTrainer(GRPOTrainer):
    """
    Globally Normalized Distillation Policy Optimization.

    The student samples completions on-policy (GRPOTrainer's generation: transformers or vLLM, text or Qwen-VL
    inputs). A frozen teacher scores the sampled tokens once per generation batch on exactly the student's input ids
    and images. The token signal `r_t = clamp(log q(y_t) - log p_old(y_t), -b, b)` is whitened with its mean and
    unbiased variance over every valid completion token of the generation batch on all processes, and the result is
    the per-token advantage of a clipped policy-gradient loss (GSPO-token ratio, sequence-mean-token-mean).
    Options of the same trainer add the Uni-OPD calibration and balancing and the ExOPD, vOPD and TIP estimators.

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
        if args.outcome_advantage_weight > 0 and not reward_funcs:
            raise ValueError("outcome_advantage_weight > 0 needs `reward_funcs` to compute the outcome advantage.")
        if (args.margin_calibration != "none" or args.balance_ratio is not None) and not reward_funcs:
            raise ValueError(
                "Uni-OPD margin calibration and balancing need `reward_funcs` to tell correct from incorrect "
                "completions: pass them, or set margin_calibration='none' and balance_ratio=None."
            )
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
        self._placeholder_reward = not reward_funcs
        # ExOPD's reference: a frozen copy of the initial student, taken before training touches it. With a PEFT
        # adapter, the base weights with the adapter disabled serve instead (no copy).
        base_model = None
        if args.reward_extrapolation != 1.0 and grpo_kwargs.get("peft_config") is None and not is_peft_model(model):
            if isinstance(model, str):
                base_model = create_model_from_path(model, **dict(args.model_init_kwargs or {}))
            else:
                base_model = copy.deepcopy(model)

        super().__init__(model=model, reward_funcs=reward_funcs or no_outcome_reward, args=args, **grpo_kwargs)

        self._check_datasets(grpo_kwargs.get("train_dataset"), grpo_kwargs.get("eval_dataset"))
        generate_every = args.steps_per_generation * args.num_iterations
        if (
            args.save_strategy == "steps"
            and args.save_steps >= 1
            and (args.save_steps * args.gradient_accumulation_steps) % generate_every
        ):
            logger.warning(
                f"Checkpoints every {args.save_steps} steps fall inside a generation batch (one generation every "
                f"{generate_every} micro-steps); GRPOTrainer does not save its generation buffer, so resuming from "
                "them regenerates with the updated model. Use save_steps * gradient_accumulation_steps divisible by "
                "steps_per_generation * num_iterations for exact resumption."
            )
        self._check_teacher(teacher_model, teacher_processing_class)
        if args.teacher_offload and getattr(teacher_model, "is_quantized", False):
            raise ValueError(
                "teacher_offload moves the teacher between devices, which a quantized teacher does not support: load "
                "it on the training device, or drop teacher_offload."
            )
        if args.visual_gradient_steering:
            self._check_vgs(teacher_model)
        self._vgs_eta, self._vgs_eta_samples = args.vgs_eta, []
        self.teacher_model = self._prepare_teacher(teacher_model, temperature=1.0, placed=True)
        # The reference scores on the student's (tempered) scale, so that lambda = 1 cancels it exactly.
        self.base_model = None if base_model is None else self._prepare_teacher(base_model, self.temperature)

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
            for column in image_columns:
                _check_images_decode(dataset, column)

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

    def _check_vgs(self, teacher: PreTrainedModel) -> None:
        """VGS needs images to remove and plain vocabulary heads it can read (its divergences use their weights)."""
        if not self._is_vlm:
            raise ValueError(
                "visual_gradient_steering contrasts each sample with its text-only view, so it needs a "
                "vision-language student with its processor; this student is text-only. Set "
                "visual_gradient_steering=False."
            )
        if self.tools or self.environment_factories is not None:
            raise ValueError(
                "visual_gradient_steering does not support tools or environments (their turns can carry images "
                "the text-only view cannot remove): drop them or set visual_gradient_steering=False."
            )
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        if self.is_fsdp_enabled or zero3:
            raise ValueError(
                "visual_gradient_steering reads the vocabulary heads' weights directly, which FSDP and DeepSpeed "
                "ZeRO-3 shard: use DDP or ZeRO-2, or set visual_gradient_steering=False."
            )
        for name, model in (("student", self.accelerator.unwrap_model(self.model)), ("teacher", teacher)):
            model = model.get_base_model() if is_peft_model(model) else model
            head, config = model.get_output_embeddings(), model.config.get_text_config()
            if not isinstance(head, torch.nn.Linear) or not head.weight.is_floating_point():
                raise ValueError(
                    f"visual_gradient_steering needs the {name}'s vocabulary head as a plain linear layer with "
                    f"floating-point weights, got {type(head).__name__}: keep the head out of LoRA targets and "
                    "quantization."
                )
            if getattr(config, "final_logit_softcapping", None) or (getattr(config, "logit_scale", None) or 1) != 1:
                raise ValueError(
                    f"visual_gradient_steering does not implement logit soft-capping or scaling (the {name} uses "
                    "them): set visual_gradient_steering=False."
                )

    def _get_train_sampler(self, dataset=None):
        sampler = super()._get_train_sampler(dataset)
        return _EpochRepeatSampler(
            sampler.data_source,
            mini_repeat_count=sampler.mini_repeat_count,
            batch_size=sampler.batch_size,
            repeat_count=sampler.repeat_count,
            shuffle=sampler.shuffle,
            seed=sampler.seed,
        )

    def _prepare_teacher(self, teacher: PreTrainedModel, temperature: float, placed: bool = False):
        """Freeze a scoring-only model, give it TRL's fused log-prob head and prepare it like TRL's reference model.

        `placed`: the teacher honours `teacher_device` / `teacher_offload` (then it is not handed to accelerate).
        """
        teacher.requires_grad_(False)
        teacher.eval()
        if self.args.disable_dropout:
            disable_dropout_in_model(teacher)
        add_fused_lm_head(teacher, temperature=temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
        if placed and (self.args.teacher_device is not None or self.args.teacher_offload):
            return teacher.to(self.args.teacher_device or "cpu")
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
        if self.args.max_prompt_length is not None:  # a masked, logged skip of over-long prompts
            too_long = batch["prompt_mask"].sum(1) > self.args.max_prompt_length
            metrics["gndpo/long_prompt_frac"].append(self.accelerator.gather(too_long.float()).mean().item())
            mask = mask * ~too_long.unsqueeze(1)
        scores = self._score_tokens(batch, mode)
        student_logps, teacher_logps = scores["student"], scores["teacher"]
        signal, finite = F.clamped_log_ratio(
            teacher_logps,
            student_logps,
            mask,
            self.args.token_signal_clamp,
            base_logps=scores.get("base"),
            extrapolation=self.args.reward_extrapolation,
            value_baseline=scores.get("kl"),
        )
        valid = finite
        if self.args.max_abs_log_ratio is not None:  # Uni-OPD token guard
            valid = valid & ((teacher_logps - student_logps).abs() < self.args.max_abs_log_ratio)
        if self.args.token_selection != "none":
            valid = self._select_informative_tokens(
                scores["entropy"], (student_logps - teacher_logps).abs(), valid, metrics
            )
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

        if self.args.visual_gradient_steering:
            self._add_text_view(batch, inputs, scores["teacher_states"], valid, mode, metrics)

        self._log_token_statistics(metrics, mask, finite, valid, student_logps, teacher_logps, signal, advantages)
        return batch

    def _add_text_view(self, batch, inputs, teacher_states, valid, mode, metrics) -> None:
        """VGS inputs of the generation batch, with one teacher pass over the text-only view.

        Writes the text-only prompts (`vgs_text_prompt_ids` / `_mask`, left-padded, so completion positions line up
        with the image view), the teacher's hidden states of both views at the completion positions, and the per-token
        language-prior gate and `gamma_t` from the VDS quantiles over every valid token of the batch (all processes).
        """
        prompts = [
            [
                {**message, "content": [part for part in message["content"] if part.get("type") not in _VISUAL_PARTS]}
                for message in prepare_multimodal_messages(x["prompt"])
            ]
            for x in inputs
        ]
        tokenized = self.processing_class.apply_chat_template(
            conversation=prompts,
            chat_template=self.chat_template,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            **self.chat_template_kwargs,
        )
        device = self.accelerator.device
        ids = [torch.as_tensor(row) for row in tokenized["input_ids"]]
        prompt_ids = pad(ids, padding_value=self._tokenizer.pad_token_id, padding_side="left").to(device)
        prompt_mask = pad([torch.ones_like(row) for row in ids], padding_value=0, padding_side="left").to(device)
        ids = torch.cat([prompt_ids, batch["completion_ids"]], 1)
        mask = torch.cat([prompt_mask, batch["completion_mask"]], 1)
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        with torch.no_grad(), self._placed_teacher() as place, self.accelerator.autocast():
            text_states = _completion_states(
                self.teacher_model, ids.to(place), mask.to(place), batch["completion_ids"].size(1), batch_size
            ).to(device)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        head, rows = teacher.get_output_embeddings(), self._student_head().weight.shape[0]
        vds = V.visual_dependency_scores(
            teacher_states[valid],
            text_states[valid],
            head.weight[:rows].to(device),
            None if head.bias is None else head.bias[:rows].to(device),
        )
        everywhere = self.accelerator.gather(self.accelerator.pad_across_processes(vds, pad_index=math.nan))
        low, high, lp = V.quantile_thresholds(everywhere[~everywhere.isnan()], (0.4, 0.7, self.args.vgs_lp_quantile))
        gate = V.language_prior_gate(vds, lp)
        if self.args.vgs_adaptive_gamma:
            gamma = V.adaptive_gamma(vds, low, high, self.args.vgs_gamma)
        else:
            gamma = torch.full_like(vds, self.args.vgs_gamma)
        scatter = valid.new_zeros(valid.shape, dtype=torch.float32).masked_scatter
        batch.update(
            vgs_text_prompt_ids=prompt_ids,
            vgs_text_prompt_mask=prompt_mask,
            vgs_teacher_image=teacher_states,
            vgs_teacher_text=text_states,
            vgs_lp_gate=scatter(valid, gate.float()),
            vgs_gamma=scatter(valid, gamma.float()),
        )
        totals = torch.stack([vds.sum(), gate.float().sum(), gamma.sum(), vds.new_tensor(len(vds))])
        totals = self.accelerator.reduce(totals, "sum")
        count = max(totals[3].item(), 1.0)
        metrics["vgs/vds_mean"].append(totals[0].item() / count)
        metrics["vgs/lp_token_frac"].append(totals[1].item() / count)
        metrics["vgs/gamma_mean"].append(totals[2].item() / count)

    def _student_head(self) -> torch.nn.Module:
        """The student's vocabulary head (its rows are the vocabulary; a teacher's head may carry padding rows)."""
        student = self.accelerator.unwrap_model(self.model)
        return (student.get_base_model() if is_peft_model(student) else student).get_output_embeddings()

    @contextmanager
    def _placed_teacher(self):
        """The teacher on its scoring device, yielded: its own (`teacher_device`), or moved in (`teacher_offload`)."""
        if self.args.teacher_offload:
            self.teacher_model.to(self.accelerator.device)
        try:
            yield next(self.teacher_model.parameters()).device
        finally:
            if self.args.teacher_offload:
                self.teacher_model.to("cpu")

    def _teacher_log_probs(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The teacher's scoring pass, on its scoring device; log-probs come back on the training device."""
        with self._placed_teacher() as device:
            args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
            kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            logps, _, _ = self._get_per_token_logps_and_entropies(self.teacher_model, *args, **kwargs)
        return logps.to(self.accelerator.device)

    def _log_token_statistics(self, metrics, mask, finite, valid, student_logps, teacher_logps, signal, advantages):
        """The `gndpo/` metrics, over the whole generation batch on every process (one sum and one max reduction)."""

        def valid_sum(x: torch.Tensor) -> torch.Tensor:
            return torch.where(valid, x, 0).to(torch.float64).sum()

        log_ratio = student_logps - teacher_logps
        sums = torch.stack(
            [
                valid_sum(torch.ones_like(signal)),
                valid_sum(log_ratio),
                valid_sum(teacher_logps),
                valid_sum(student_logps),
                valid_sum((signal.abs() >= self.args.token_signal_clamp).float()),
                mask.sum().to(torch.float64),
                finite.sum().to(torch.float64),
                valid_sum(signal),
                valid_sum(signal**2),
                valid_sum(advantages),
                valid_sum(advantages**2),
            ]
        )
        totals = self.accelerator.reduce(sums, "sum").tolist()
        n, kl, teacher, student, clamped, n_mask, n_finite, r, r2, a, a2 = totals
        abs_max = self.accelerator.reduce(torch.where(valid, advantages.abs(), 0).amax().to(torch.float64), "max")
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
        metrics["gndpo/advantage_abs_max"].append(abs_max.item())
        if n_finite < n_mask:
            logger.warning(
                f"GNDPO: {int(n_mask - n_finite)} completion tokens with a non-finite log-prob were masked."
            )

    def _select_informative_tokens(self, entropy, divergence, valid, metrics) -> torch.Tensor:
        """TIP: keep the high-entropy share of tokens (and, for "quadrant", high-divergence low-entropy ones).

        The thresholds are quantiles over every valid token of the generation batch on all processes (TRL's
        `get_high_entropy_mask`, which gathers them).
        """
        quantile = 1.0 - self.args.token_selection_ratio
        keep = self.get_high_entropy_mask(entropy, valid, quantile)
        if self.args.token_selection == "quadrant":
            keep = keep | self.get_high_entropy_mask(divergence.nan_to_num(0.0), valid, quantile)
        counts = self.accelerator.reduce(torch.stack([(keep & valid).sum(), valid.sum()]).float(), "sum")
        metrics["gndpo/tip_kept_frac"].append((counts[0] / counts[1].clamp(min=1)).item())
        return valid & keep

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
    def _score_tokens(self, batch: dict, mode: str) -> dict[str, torch.Tensor]:
        """Per-token scores of the sampled completions, all on the same inputs (ids and images), in float32.

        `student` and `teacher`: log-probs of the sampled tokens (student on the training side, at the sampling
        temperature; teacher at temperature 1). With the estimators that need them: `entropy` (student, TIP), `base`
        (initial student, ExOPD), `kl` (full-vocabulary KL(p || q), vOPD), `teacher_states` (the teacher's hidden
        states at the completion positions, in its own dtype, VGS).
        """
        completion_length = batch["completion_ids"].size(1)
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        args = (input_ids, attention_mask, completion_length)
        kwargs = {k: batch[k] for k in _MODEL_INPUT_KEYS if k in batch}
        kwargs["batch_size"] = (
            self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        )
        want_entropy, want_kl = self.args.token_selection != "none", self.args.value_baseline
        scores = {"student": batch.get("old_per_token_logps")}
        with _capture_completion_states(self.model, completion_length, enabled=want_kl) as student_states:
            if scores["student"] is None or want_entropy or want_kl:
                with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
                    scores["student"], scores["entropy"], _ = self._get_per_token_logps_and_entropies(
                        self.model, *args, compute_entropy=want_entropy, **kwargs
                    )
        want_states = want_kl or self.args.visual_gradient_steering
        with _capture_completion_states(self.teacher_model, completion_length, want_states) as teacher_states:
            scores["teacher"] = self._teacher_log_probs(args, kwargs)
        if self.args.reward_extrapolation != 1.0:
            if self.base_model is None:  # PEFT: the initial student is the base weights with the adapter disabled
                with use_adapter(self.accelerator.unwrap_model(self.model), adapter_name=None):
                    scores["base"], _, _ = self._get_per_token_logps_and_entropies(self.model, *args, **kwargs)
            else:
                scores["base"], _, _ = self._get_per_token_logps_and_entropies(self.base_model, *args, **kwargs)
        if want_kl:
            mask = batch["completion_mask"].bool()
            kl = _reverse_kl_per_token(
                self.accelerator.unwrap_model(self.model),
                torch.cat(student_states)[mask],
                self.accelerator.unwrap_model(self.teacher_model),
                torch.cat(teacher_states)[mask],
            )
            scores["kl"] = kl.new_zeros(mask.shape).masked_scatter(mask, kl)
        scores = {k: v.float() for k, v in scores.items() if v is not None}
        if self.args.visual_gradient_steering:
            scores["teacher_states"] = torch.cat(teacher_states).to(self.accelerator.device)
        return scores

    # ----------------------------------------------------------------------------------------------------------------
    # Loss: clipped policy gradient on the per-token advantages.

    def _compute_loss(self, model, inputs):
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask = inputs["completion_mask"] * inputs["tool_mask"]
        vgs = self.args.visual_gradient_steering
        with _capture_completion_states(model, completion_ids.size(1), vgs, detach=False) as states:
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

        def aggregate(per_token: torch.Tensor) -> torch.Tensor:
            if self.loss_type == "grpo":
                return F.seq_mean_token_mean(per_token, mask) / accumulation
            # "dapo": `num_items_in_batch` counts the valid tokens of the whole generation batch
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * accumulation / self.args.steps_per_generation
            return torch.where(mask.bool(), per_token, 0).sum() / normalizer

        policy_loss = loss = aggregate(per_token_loss)
        if vgs:
            alpha = self.args.vgs_alpha
            loss = (1 - alpha) * loss + alpha * self._vgs_loss(model, inputs, torch.cat(states), aggregate, mode)
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
        metrics["policy_loss"].append(self.accelerator.gather(policy_loss.detach() * accumulation).mean().item())
        return loss

    def _vgs_loss(self, model, inputs, student_image, aggregate, mode) -> torch.Tensor:
        """eta * aggregate(l_Std + gamma_t l_Vis + lambda 1[VDS > quantile] l_LP), with one text-view student pass."""
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        valid = (completion_mask * inputs["tool_mask"]).bool()
        gate, gamma = inputs["vgs_lp_gate"], inputs["vgs_gamma"]
        # l_LP's gradient runs through this pass; without it, p_text only enters q*, detached. The pass needs hidden
        # states only (no vocabulary head) and goes around the DDP wrapper, whose bookkeeping allows one forward per
        # backward; its gradients still reach the parameters, whose hooks reduce the sum of both views' gradients.
        trains_text = self.args.vgs_lambda > 0 and self.model.training
        with nullcontext() if trains_text else torch.no_grad(), self.accelerator.autocast():
            student_text = _completion_states(
                model,
                torch.cat([inputs["vgs_text_prompt_ids"], completion_ids], 1),
                torch.cat([inputs["vgs_text_prompt_mask"], completion_mask], 1),
                completion_ids.size(1),
                len(completion_ids),
            )
        student_head = self._student_head()
        teacher_head = self.accelerator.unwrap_model(self.teacher_model).get_output_embeddings()
        rows, device = student_head.weight.shape[0], student_image.device
        l_std, l_vis, l_lp = V.vgs_divergences(
            student_image[valid],
            student_text[valid],
            inputs["vgs_teacher_image"][valid],
            inputs["vgs_teacher_text"][valid],
            student_head.weight,
            teacher_head.weight[:rows].to(device),
            student_head.bias,
            None if teacher_head.bias is None else teacher_head.bias[:rows].to(device),
        )

        def per_token(values: torch.Tensor) -> torch.Tensor:
            return values.new_zeros(valid.shape).masked_scatter(valid, values)

        standard, visual = per_token(l_std), per_token(gamma[valid] * l_vis)
        prior = per_token(self.args.vgs_lambda * gate[valid] * l_lp)
        if mode == "train" and self.state.global_step < self.args.vgs_eta_measure_steps:
            self._measure_eta(model, aggregate(standard), aggregate(visual))

        def global_mean(x: torch.Tensor) -> float:
            totals = self.accelerator.reduce(torch.stack([x.detach().sum(), x.new_tensor(x.numel())]), "sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        metrics = self._metrics[mode]
        metrics["vgs/std_kl"].append(global_mean(l_std))
        metrics["vgs/visual_kl"].append(global_mean(l_vis))
        metrics["vgs/language_prior_kl"].append(global_mean(gate[valid] * l_lp))
        metrics["vgs/eta"].append(self._vgs_eta)
        loss = self._vgs_eta * aggregate(standard + visual + prior)
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        metrics["vgs/loss"].append(self.accelerator.gather(loss.detach() * accumulation).mean().item())
        return loss

    def _measure_eta(self, model, standard: torch.Tensor, visual: torch.Tensor) -> None:
        """eta = ||grad L_Std|| / ||grad L_Std + grad (gamma L_Vis)|| over the trainable parameters, this micro-step,
        averaged over processes; `self._vgs_eta` is the running mean of the measurements (fixed once they stop)."""
        params = [p for p in model.parameters() if p.requires_grad]
        grad_std = torch.autograd.grad(standard, params, retain_graph=True, materialize_grads=True)
        grad_vis = torch.autograd.grad(visual, params, retain_graph=True, materialize_grads=True)
        norm_std = torch.stack([g.float().pow(2).sum() for g in grad_std]).sum()
        norm_sum = torch.stack([(a + b).float().pow(2).sum() for a, b in zip(grad_std, grad_vis, strict=True)]).sum()
        eta = (norm_std.sqrt() / norm_sum.sqrt().clamp(min=1e-12)).detach()
        self._vgs_eta_samples.append(self.accelerator.reduce(eta, "mean").item())
        self._vgs_eta = sum(self._vgs_eta_samples) / len(self._vgs_eta_samples)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.visual_gradient_steering and self.args.should_save:
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            with open(os.path.join(folder, "vgs_eta.json"), "w") as f:
                json.dump({"eta": self._vgs_eta, "samples": self._vgs_eta_samples}, f)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        path = None if checkpoint is None else os.path.join(checkpoint, "vgs_eta.json")
        if self.args.visual_gradient_steering and path is not None and os.path.exists(path):
            with open(path) as f:
                state = json.load(f)
            self._vgs_eta, self._vgs_eta_samples = state["eta"], state["samples"]


@contextmanager
def _capture_completion_states(model, completion_length: int, enabled: bool = True, detach: bool = True):
    """Collect the backbone's last hidden states at the positions that predict the completion tokens.

    A forward hook on the backbone that TRL's fused head calls, so the batch chunking and image slicing of
    `_get_per_token_logps_and_entropies` apply unchanged; keeps `(chunk, completion_length, hidden)` per call,
    detached unless `detach=False` (a loss then backpropagates through them into the model).
    """
    states = []
    if not enabled:
        yield states
        return

    def keep(module, args, output):
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        hidden = hidden[:, -completion_length - 1 : -1]
        states.append(hidden.detach() if detach else hidden)

    handle = _backbone(model).register_forward_hook(keep)
    try:
        yield states
    finally:
        handle.remove()


def _backbone(model) -> torch.nn.Module:
    """The decoder without its vocabulary head, under any DDP / DeepSpeed / accelerate wrapper and PEFT adapter."""
    while hasattr(model, "module"):
        model = model.module
    return (model.get_base_model() if is_peft_model(model) else model).base_model


def _completion_states(model, input_ids, attention_mask, completion_length: int, batch_size: int) -> torch.Tensor:
    """Last hidden states at the positions that predict the completion tokens, from the backbone alone (no vocabulary
    head), `batch_size` rows at a time. Text-only inputs: the model derives its (Qwen: 3-D) rotary positions itself."""
    backbone = _backbone(model)
    states = []
    for start in range(0, len(input_ids), batch_size):
        rows = slice(start, start + batch_size)
        hidden = backbone(input_ids=input_ids[rows], attention_mask=attention_mask[rows]).last_hidden_state
        states.append(hidden[:, -completion_length - 1 : -1])
    return torch.cat(states)


def _reverse_kl_per_token(student, student_states, teacher, teacher_states) -> torch.Tensor:
    """KL(p || q) per position from both models' hidden states, vocabulary chunk by vocabulary chunk (TRL's kernel).

    The teacher's head is cut to the student's vocabulary rows (a teacher may pad its embedding further).
    """
    student = student.get_base_model() if is_peft_model(student) else student
    heads = [m.get_output_embeddings() for m in (student, teacher)]
    rows, device = heads[0].weight.shape[0], student_states.device
    teacher_states = teacher_states.to(device)  # a teacher on its own device, or offloaded
    scale_and_cap = []
    for m in (student, teacher):
        config = m.config.get_text_config()
        scale_and_cap += [
            getattr(config, "logit_scale", None) or 1.0,
            getattr(config, "final_logit_softcapping", None),
        ]
    kl, _ = ChunkedDivergenceFunction.apply(
        student_states,
        heads[0].weight,
        heads[0].bias,
        teacher_states,
        heads[1].weight[:rows].to(device),
        None if heads[1].bias is None else heads[1].bias[:rows].to(device),
        1.0,  # beta = 1: reverse KL(student || teacher)
        1.0,
        *scale_and_cap,
    )
    return kl


def _check_images_decode(dataset, column: str) -> None:
    """Open every stored image of a `datasets.Image` column (header and data check, no full decode) before training."""
    if not isinstance(dataset, Dataset):
        return  # a stream: nothing stored to check up front
    feature = dataset.features[column]
    listed = not isinstance(feature, Image)  # `images`: a list of images
    if not isinstance(getattr(feature, "feature", None) if listed else feature, Image):
        return
    raw = dataset.cast_column(column, type(feature)(Image(decode=False)) if listed else Image(decode=False))
    bad = []
    for row, value in enumerate(raw[column]):
        for image in value if isinstance(value, list) else [value]:
            if image is None:
                continue
            try:
                source = io.BytesIO(image["bytes"]) if image.get("bytes") is not None else image["path"]
                with PIL.Image.open(source) as opened:
                    opened.verify()
            except Exception as error:  # PIL raises many types for broken files
                bad.append(f"{row} ({type(error).__name__})")
    if bad:
        raise ValueError(
            f"{len(bad)} images of column {column!r} cannot be decoded, at rows {', '.join(bad[:10])}. Fix or drop "
            "those rows (e.g. `dataset.filter`) before training."
        )


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

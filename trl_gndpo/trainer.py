"""GNDPO's pipeline on TRL's GRPOTrainer, read top to bottom: score the sampled tokens with the teacher once per
generation batch, turn the clamped token signal into globally whitened per-token advantages, and train with the
clipped policy loss. Every GRPOTrainer override of the package is in this file.

The trainer holds its parts as objects and calls plain functions: `Teachers` (teachers.py: routing, scoring, metrics),
`Steering` (vgs_steering.py: VGS), Uni-OPD's steps (uniopd_batch.py), the set-up checks (checks.py, once). Which file
owns which concern, and how a generation batch flows through them: docs/architecture.md.
"""

import os
from typing import Any

import torch
from accelerate.utils import is_peft_model
from transformers import PreTrainedModel
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from . import checks, functional, sampler_logps, teacher_server, teachers, token_alignment, token_metrics, uniopd_batch
from .completion_head import project_completions_only
from .config import GNDPOConfig
from .cross_tokenizer import OwnTokenizers
from .fsdp2_on_cpu import select_fsdp2_on_cpu
from .hidden_states import capture_completion_states, reverse_kl_per_token, vocabulary_head
from .invalid_batches import InvalidBatchGuard
from .long_prompts import limit_prompt_lengths
from .paper import PAPER
from .resume import (
    EpochRepeatSampler,
    check_resumed_arguments,
    has_full_weights,
    last_complete_checkpoint,
    load_full_weights,
    mark_checkpoint_complete,
    rotation_after_marking,
    unmark_checkpoint,
    warn_missing_checkpoint_parts,
)
from .scoring_models import load_reference, placed_log_probs, prepare_scoring_model
from .text_view import TextView
from .vgs import mixed_loss, policy_advantages
from .vgs_steering import Steering

logger = logging.get_logger(__name__)

# Keys of a generation batch that `GRPOTrainer._get_per_token_logps_and_entropies` takes besides the token ids.
_MODEL_INPUT_KEYS = (
    *("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles"),
    *("image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids"),
)
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
    Options of the same trainer add the Uni-OPD calibration and balancing, the ExOPD, vOPD and TIP estimators and
    Visual Gradient Steering.

    Args:
        model: the student, a name or path or a `PreTrainedModel` (as for `GRPOTrainer`).
        teacher_model: the teacher, a name or path (loaded with `args.teacher_model_init_kwargs`) or a
            `PreTrainedModel`; or several teachers, a dict name -> teacher, each scoring the samples whose
            `args.teacher_column` names it. Defaults to `args.teacher_models` or `args.teacher_model_name_or_path`.
            Teachers must share the student's tokenizer and, for vision-language students, its image layout (a
            text-only teacher only with `args.cross_modal_distillation`).
        reward_funcs: optional outcome rewards (GRPO signature). Logged; they decide correctness for the Uni-OPD
            options, and are mixed into the advantage only with `args.outcome_advantage_weight > 0`.
        args: a [`GNDPOConfig`].
        teacher_processing_class: the teacher's tokenizer or processor (a dict name -> one with several teachers),
            used only to check that it tokenizes and lays out images like the student's. Loaded from the teacher's
            path when the teacher is given by name, or from its `name_or_path` when it is a model object loaded from
            a folder or the Hub.
        reference_model: G-OPD's reward correction, the reference of `args.reward_extrapolation` (the teacher's
            base model before RL), a name or path (loaded like the teacher) or a `PreTrainedModel`; defaults to
            `args.reference_model_name_or_path`, and without one the initial student is the reference.
        **grpo_kwargs: everything else `GRPOTrainer` takes (`train_dataset`, `eval_dataset`, `processing_class`,
            `peft_config`, `callbacks`, `optimizers`, `quantization_config`, ...).
    """

    _tag_names = ["trl", "gndpo", "distillation"]  # "distillation": listed with TRL's distillation models
    _name = "GNDPO"
    _paper = PAPER  # trl_gndpo/paper.py, also quoted by docs/index.md

    def __init__(
        self,
        model: "str | PreTrainedModel",
        teacher_model: "str | PreTrainedModel | dict[str, str | PreTrainedModel] | None" = None,
        reward_funcs=None,
        args: GNDPOConfig | None = None,
        teacher_processing_class=None,
        reference_model: "str | PreTrainedModel | None" = None,
        **grpo_kwargs: Any,
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = GNDPOConfig(f"{str(name).split('/')[-1]}-GNDPO")
        elif not isinstance(args, GNDPOConfig):
            raise TypeError(f"args must be a GNDPOConfig, got {type(args).__name__}.")
        if teacher_model is None:
            teacher_model = args.teacher_models or args.teacher_model_name_or_path
        checks.check_arguments(args, reward_funcs, teacher_model, reference_model)  # before anything loads
        teacher_models, teacher_processing = teachers.load(teacher_model, teacher_processing_class, args)
        self._placeholder_reward = not reward_funcs
        peft = grpo_kwargs.get("peft_config") is not None or (not isinstance(model, str) and is_peft_model(model))
        base_model, reference_given, reference_processing = load_reference(reference_model, model, args, peft)

        super().__init__(model=model, reward_funcs=reward_funcs or no_outcome_reward, args=args, **grpo_kwargs)

        reference = (base_model if reference_given else None, reference_processing)
        checks.check_setup(self, teacher_models, teacher_processing, *reference, grpo_kwargs)
        student = self.accelerator.unwrap_model(self.model)
        servers = {}  # served teachers: nothing to load, check or place here
        if args.teacher_model_server_url is not None:
            servers = teacher_server.connect_all(args, self.processing_class, student, self._is_vlm)
        project_completions_only(student.get_base_model() if is_peft_model(student) else student)
        self._invalid_batches = InvalidBatchGuard(args.max_invalid_generation_batches)
        offload_to = self.accelerator.device if args.teacher_offload else None
        template = (self.chat_template, self.chat_template_kwargs)
        text_view = TextView(self.processing_class, *template, self._tokenizer.pad_token_id, self.accelerator.device)
        own_tokenizers = None  # teachers from another family read their own tokens of the completion text
        if args.cross_tokenizer_distillation:
            own = (self.processing_class, teacher_processing, self.eos_token_ids, self.chat_template_kwargs)
            own_tokenizers = OwnTokenizers(*own)
        self.teachers = teachers.Teachers(
            {
                name: prepare_scoring_model(
                    self, t, args.teacher_temperature, placed=True, device=teachers.device_of(args, name)
                )
                for name, t in teacher_models.items()
            },
            teachers.text_only_names(teacher_models, self._is_vlm),
            args.teacher_column,
            offload_to,
            self._get_per_token_logps_and_entropies,
            text_view,
            self.accelerator,
            servers=servers,
            own_tokenizers=own_tokenizers,
        )
        self.teacher_model = self.teachers.first  # the teacher, the first of several, or None
        names = self.teachers.names  # local or served: a stream's rows are checked as they are read, naming the row
        self.train_dataset = teachers.checked_stream(self.train_dataset, args.teacher_column, names, "training")
        self.eval_dataset = teachers.checked_stream(self.eval_dataset, args.teacher_column, names, "evaluation")
        # The reference scores on the student's (tempered) scale, so that lambda = 1 cancels it exactly.
        self.base_model = (
            None if base_model is None else prepare_scoring_model(self, base_model, self.temperature, reference_given)
        )
        self._base_offload_to = offload_to if reference_given else None
        self.steering = None
        if args.visual_gradient_steering:
            vocab_size = vocabulary_head(student).weight.shape[0]
            self.steering = Steering(
                args, self.teacher_model, offload_to, vocab_size, text_view, self.accelerator, self._global_mean
            )

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if select_fsdp2_on_cpu(self.accelerator, self.args.fsdp_plugin_args):  # accelerate drops it on CPU
            self.is_fsdp_enabled = True

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None):
        if resume_from_checkpoint is True:  # the newest COMPLETE checkpoint, not Trainer's newest folder
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
        if isinstance(resume_from_checkpoint, str):
            check_resumed_arguments(self.args, resume_from_checkpoint)
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if model is None and not self.is_fsdp_enabled and has_full_weights(resume_from_checkpoint, self.model):
            return load_full_weights(self.model, resume_from_checkpoint)
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _save_checkpoint(self, model, trial):
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:  # a folder saved over is incomplete until marked again
            unmark_checkpoint(folder)
        with rotation_after_marking() as rotate:  # older checkpoints are deleted once this one is complete
            super()._save_checkpoint(model, trial)
        if self.steering is not None and self.args.should_save:  # VGS's measured eta travels with the checkpoint
            self.steering.save(folder)
        self.accelerator.wait_for_everyone()  # every process has written its part (RNG states, shards)
        if self.args.should_save:
            mark_checkpoint_complete(folder, self.state.global_step, self.args)
            rotate()

    def _load_optimizer_and_scheduler(self, checkpoint):
        warn_missing_checkpoint_parts(self, checkpoint)
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.steering is not None and checkpoint is not None:
            self.steering.load(checkpoint)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """GRPO's outcome rewards (all processes' completions x reward functions), kept for the Uni-OPD steps: TRL
        does not return them, so `_generate_and_score_completions` takes (and drops) them right after TRL's part."""
        self._outcome_rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._outcome_rewards

    def _get_train_sampler(self, dataset=None):
        return EpochRepeatSampler.like(super()._get_train_sampler(dataset))

    def _tokenize_prompts(self, prompts: list):
        prompt_ids, images, multimodal_fields = super()._tokenize_prompts(prompts)
        has_images = images is not None or bool(multimodal_fields)
        return limit_prompt_lengths(prompt_ids, has_images, self.args), images, multimodal_fields

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        args = (prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        # Record only where TRL neither returns them (vLLM) nor re-scores the batch itself (then its re-score is used).
        if not self.args.old_logps_from_sampler or self.use_vllm or self.args.rescores_each_generation:
            return super()._generate_single_turn(*args)
        student = self.accelerator.unwrap_model(self.model_wrapped)
        student = student.get_base_model() if is_peft_model(student) else student
        with sampler_logps.recording(student, self.temperature) as recorder:
            completion_ids, _ = super()._generate_single_turn(*args)
        return completion_ids, recorder.per_completion(completion_ids)

    # ----------------------------------------------------------------------------------------------------------------
    # Advantages: once per generation batch.

    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        rewards = self.__dict__.pop("_outcome_rewards", None)  # from `_calculate_rewards`: Uni-OPD's correctness
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        if self._placeholder_reward:
            names = (f"rewards/{n}/{s}" for n in self.reward_func_names for s in ("mean", "std"))
            for key in (*_REWARD_METRICS, *names):
                metrics.pop(key, None)

        mask = batch["completion_mask"] if "tool_mask" not in batch else batch["completion_mask"] * batch["tool_mask"]
        if self.args.max_prompt_length is not None:  # a masked, logged skip of over-long prompts
            too_long = batch["prompt_mask"].sum(1) > self.args.max_prompt_length
            metrics["gndpo/long_prompt_frac"].append(self.accelerator.gather(too_long.float()).mean().item())
            mask = mask * ~too_long.unsqueeze(1)
        scores = self._score_tokens(batch, inputs, mode)
        placement = scores.get("placement")
        if placement is not None:  # teachers with their own tokenizers: one signal per span, on its last student token
            mask = mask.bool() & placement.representative
            for key in ("student", "base"):
                if key in scores:
                    scores[key] = token_alignment.student_span_sums(scores[key], placement)
            token_metrics.log_unaligned(metrics, batch["completion_mask"], placement, self._reduce_sum)
        student_logps, teacher_logps = scores["student"], scores["teacher"]
        signal, finite = functional.clamped_log_ratio(
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
            divergence = (student_logps - teacher_logps).abs()
            valid = self._select_informative_tokens(scores["entropy"], divergence, valid, metrics)
        group_size = self.num_generations if self.model.training else self.num_generations_eval
        if self.args.balance_ratio is not None:  # seeded by the step: a resumed run drops what the whole one would
            generator = torch.Generator().manual_seed(self.args.seed * 1_000_003 + self.state.global_step)
            answers = self._responses(rewards, valid)
            keep = uniopd_batch.balanced_responses(answers, group_size, self.args.balance_ratio, generator, metrics)
            valid = valid & keep.to(valid.device).unsqueeze(1)
        signal = torch.where(valid, signal, 0)
        if self.args.normalization_scope == "global":
            advantages, mean, var = functional.whitened_advantages(
                signal, valid, self.args.whitening_eps, self._reduce_sum
            )
        else:  # plain OPD: the statistics are only logged
            advantages = signal
            mean, var = functional.mean_and_unbiased_var(self._reduce_sum(functional.masked_moments(signal, valid)))
        if self.args.margin_calibration != "none":
            advantages = uniopd_batch.calibrate_margins(
                advantages, valid, self._responses(rewards, valid), group_size, self.args, self.accelerator, metrics
            )
        if self.args.outcome_advantage_weight > 0:
            advantages = advantages + self.args.outcome_advantage_weight * batch["advantages"].unsqueeze(1) * valid
        if self.args.visual_gradient_steering:  # "GRPO + VGS" trains on the outcome advantage alone
            advantages = policy_advantages(self.args.vgs_mode, advantages, batch["advantages"], valid)
        loss_tokens = valid
        batch["advantages"] = advantages
        if placement is not None:  # each student token of a span trains with the span's advantage
            batch["advantages"] = token_alignment.from_representatives(advantages, placement)
            loss_tokens = token_alignment.from_representatives(valid, placement)
        batch["loss_mask"] = loss_tokens.to(batch["completion_mask"].dtype)  # the loss's tokens: dropped ones leave it
        batch["num_items_in_batch"] = self.accelerator.gather(loss_tokens.sum()).sum()  # "dapo": the loss tokens

        if self.steering is not None:
            chunk_size = self._chunk_size(mode)
            self.steering.add_text_view(batch, inputs, scores["teacher_states"], valid, chunk_size, metrics)

        counts = token_metrics.log_token_statistics(
            metrics, mask, finite, valid, scores, signal, (mean, var), advantages, self.args, self.accelerator
        )
        if self.model.training:
            self._invalid_batches.update(*counts)
        self.teachers.statistics(metrics, inputs, valid, scores["student"], scores["teacher"])
        self.teachers.text_view_images(metrics, inputs)
        return batch

    def _responses(self, rewards: torch.Tensor, valid: torch.Tensor) -> uniopd_batch.Responses:
        """Correctness and presence of every completion of the generation batch (all processes), for Uni-OPD."""
        threshold, weights = self.args.correctness_threshold, self.reward_weights
        return uniopd_batch.responses(rewards, weights, threshold, valid, self.accelerator)

    @torch.no_grad()
    def _score_tokens(self, batch: dict, inputs: list[dict], mode: str) -> dict[str, torch.Tensor]:
        """Per-token scores of the sampled completions, all on the student's inputs (ids and images), in float32.
        `inputs`: the rows behind `batch` (teacher routing, text views).

        `student` and `teacher`: log-probs of the sampled tokens (student on the training side, at the sampling
        temperature, or the sampler's own with `old_logps_from_sampler`; teacher at `args.teacher_temperature`, each
        row by its own teacher, on the text view for a text-only teacher, or from the teacher server). With
        `cross_tokenizer_distillation`, `teacher` holds span log-probs of the teachers' own tokens on each span's
        last student token and `placement` the spans (`token_alignment.SpanPlacement`). With the estimators that need
        them: `entropy` (student, TIP), `base` (the reference of ExOPD: the initial student or the given reference
        model), `kl` (full-vocabulary KL(p || q), vOPD), `teacher_states` (the teacher's hidden states at the
        completion positions, in its own dtype, VGS).
        """
        completion_length = batch["completion_ids"].size(1)
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        model_inputs = {k: batch[k] for k in _MODEL_INPUT_KEYS if k in batch}
        model_inputs["batch_size"] = self._chunk_size(mode)

        def log_probs(model, **kwargs):
            return self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, completion_length, **model_inputs, **kwargs
            )

        want_entropy, want_kl = self.args.token_selection != "none", self.args.value_baseline
        scores = {"student": batch.get("old_per_token_logps")}
        if scores["student"] is None and self.args.old_logps_from_sampler:
            scores["student"] = batch["sampling_per_token_logps"]  # the sampler's own log p_old: no re-score pass
        with capture_completion_states(self.model, completion_length, enabled=want_kl) as student_states:
            if scores["student"] is None or want_entropy or want_kl:
                with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
                    scores["student"], scores["entropy"], _ = log_probs(self.model, compute_entropy=want_entropy)
        want_states = want_kl or self.args.visual_gradient_steering
        placement = None
        if self.teachers.own_tokenizers is not None:  # their own tokens, summed over spans (placement)
            scores["teacher"], placement = self.teachers.score_own_tokens(batch, inputs, self._chunk_size(mode))
            teacher_states = []
        else:  # local or served teachers
            scores["teacher"], teacher_states = self.teachers.score(
                batch, inputs, input_ids, attention_mask, model_inputs, want_states
            )
        if self.args.reward_extrapolation != 1.0:
            if self.base_model is None:  # PEFT: the initial student is the base weights with the adapter disabled
                with use_adapter(self.accelerator.unwrap_model(self.model), adapter_name=None):
                    scores["base"], _, _ = log_probs(self.model)
            else:  # on the teacher's device when the reference is placed like the teacher
                score_with, placing = self._get_per_token_logps_and_entropies, (self.base_model, self._base_offload_to)
                scoring = (input_ids, attention_mask, completion_length, model_inputs, self.accelerator.device)
                scores["base"] = placed_log_probs(score_with, *placing, *scoring)
        if want_kl:
            mask = batch["completion_mask"].bool()
            kl = reverse_kl_per_token(
                self.accelerator.unwrap_model(self.model),
                torch.cat(student_states)[mask],
                self.accelerator.unwrap_model(self.teacher_model),
                torch.cat(teacher_states)[mask],
                top_k=self.args.value_baseline_top_k,
            )
            scores["kl"] = kl.new_zeros(mask.shape).masked_scatter(mask, kl)
        scores = {k: v.float() for k, v in scores.items() if v is not None}
        if self.args.visual_gradient_steering:
            scores["teacher_states"] = torch.cat(teacher_states).to(self.accelerator.device)
        if placement is not None:
            scores["placement"] = placement
        return scores

    def _select_informative_tokens(self, entropy, divergence, valid, metrics) -> torch.Tensor:
        """TIP: keep the high-entropy share of tokens, and/or the high-divergence low-entropy ones (Q3), or draw the
        share with probability proportional to entropy.

        The thresholds are quantiles over every valid token of the generation batch on all processes (TRL's
        `get_high_entropy_mask`, which gathers them); sampling keeps the largest sampling keys the same way.
        """
        rule, quantile = self.args.token_selection, 1.0 - self.args.token_selection_ratio
        if rule == "entropy_sampling":  # seeded by seed, step and process: ranks draw independently
            seed = (self.args.seed * 1_000_003 + self.state.global_step) * 1_009 + self.accelerator.process_index
            uniform = torch.rand(entropy.shape, generator=torch.Generator().manual_seed(seed))
            keys = functional.entropy_sampling_keys(entropy.float(), uniform.to(entropy.device))
            keep = self.get_high_entropy_mask(keys, valid, quantile)
        else:
            high_entropy = self.get_high_entropy_mask(entropy, valid, quantile)
            high_divergence = (
                None if rule == "entropy" else self.get_high_entropy_mask(divergence.nan_to_num(0.0), valid, quantile)
            )
            keep = functional.tip_keep(rule, high_entropy, high_divergence)
        counts = self.accelerator.reduce(torch.stack([(keep & valid).sum(), valid.sum()]).float(), "sum")
        metrics["gndpo/tip_kept_frac"].append((counts[0] / counts[1]).item() if counts[1] > 0 else float("nan"))
        return valid & keep

    # ----------------------------------------------------------------------------------------------------------------
    # Loss: clipped policy gradient on the per-token advantages.

    def _compute_loss(self, model, inputs):
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask = inputs["loss_mask"]
        vgs = self.args.visual_gradient_steering
        with capture_completion_states(model, completion_ids.size(1), vgs, detach=False) as states:
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
        per_token_loss, ratio = functional.clipped_policy_loss(
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
                return functional.seq_mean_token_mean(per_token, mask) / accumulation
            # "dapo": `num_items_in_batch` counts the valid tokens of the whole generation batch
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * accumulation / self.args.steps_per_generation
            return torch.where(mask.bool(), per_token, 0).sum() / normalizer

        policy_loss = loss = aggregate(per_token_loss)
        if vgs:
            measure_eta = mode == "train" and self.state.global_step < self.args.vgs_eta_measure_steps
            training, metrics = self.model.training, self._metrics[mode]
            vgs_loss = self.steering.loss(model, inputs, torch.cat(states), aggregate, training, measure_eta, metrics)
            metrics["vgs/loss"].append(self._logged_loss(vgs_loss, mode))
            loss = mixed_loss(self.args.vgs_mode, self.args.vgs_alpha, loss, vgs_loss)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation

        advantages, valid = inputs["advantages"], mask.bool()
        low = (ratio < 1 - self.epsilon_low) & (advantages < 0)
        high = (ratio > 1 + self.epsilon_high) & (advantages > 0)
        metrics = self._metrics[mode]
        metrics["entropy"].append(self._global_mean(entropies[valid]))
        metrics["clip_ratio/low_mean"].append(self._global_mean(low[valid].float()))
        metrics["clip_ratio/high_mean"].append(self._global_mean(high[valid].float()))
        metrics["clip_ratio/region_mean"].append(self._global_mean((low | high)[valid].float()))
        metrics["policy_loss"].append(self._logged_loss(policy_loss, mode))
        return loss

    def _reduce_sum(self, x: torch.Tensor) -> torch.Tensor:  # the reductions over every process
        return self.accelerator.reduce(x, reduction="sum")

    def _global_mean(self, values: torch.Tensor) -> float:
        """Mean of `values` (any shape) over all processes' elements; NaN when there are none, which TRL's `log`
        leaves out of the average (a window with nothing to average logs None, not 0)."""
        values = values.detach().float()
        totals = self._reduce_sum(torch.stack([values.sum(), values.new_tensor(values.numel())]))
        return (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")

    def _logged_loss(self, loss: torch.Tensor, mode: str) -> float:
        """A micro-step loss as logged: undo the gradient-accumulation scaling, average over processes."""
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        return self.accelerator.gather(loss.detach() * accumulation).mean().item()

    def _chunk_size(self, mode: str) -> int:
        """Rows per forward pass when scoring a generation batch: the per-device batch size of the mode."""
        return self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size

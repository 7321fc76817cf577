"""Visual Gradient Steering (arXiv 2606.00564) wired into GNDPOTrainer: the text-only view of each generation batch,
the VGS loss of each micro-step, the measured eta and its checkpoint (refused when missing or corrupt). The math lives
in `vgs.py`."""

import json
import math
import os
from contextlib import nullcontext

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl.data_utils import prepare_multimodal_messages
from trl.trainer.utils import pad

from . import vgs
from .modules import vocabulary_head
from .teacher import completion_states, placed

# Content blocks that the text-only view removes.
_VISUAL_PARTS = ("image", "video")
_ETA_FILE = "vgs_eta.json"


class SteeringMixin:
    """The VGS half of `GNDPOTrainer`; every method here runs only with `visual_gradient_steering=True`."""

    def _add_text_view(self, batch, inputs, teacher_states, valid, mode, metrics) -> None:
        """VGS inputs of the generation batch, with one teacher pass over the text-only view.

        Writes the text-only prompts (`vgs_text_prompt_ids` / `_mask`, left-padded, so completion positions line up
        with the image view), the teacher's hidden states of both views at the completion positions, and the per-token
        language-prior gate and `gamma_t` from the VDS quantiles over every valid token of the batch (all processes).
        """
        prompt_ids, prompt_mask = self._text_view_prompts(inputs)
        device = self.accelerator.device
        input_ids = torch.cat([prompt_ids, batch["completion_ids"]], 1)
        attention_mask = torch.cat([prompt_mask, batch["completion_mask"]], 1)
        completion_length = batch["completion_ids"].size(1)
        with torch.no_grad(), placed(self.teacher_model, self._teacher_offload_to) as at, self.accelerator.autocast():
            text_states = completion_states(
                self.teacher_model, input_ids.to(at), attention_mask.to(at), completion_length, self._chunk_size(mode)
            ).to(device)
        head = vocabulary_head(self.teacher_model)
        vocab = vocabulary_head(self.accelerator.unwrap_model(self.model)).weight.shape[0]
        vds = vgs.visual_dependency_scores(
            teacher_states[valid],
            text_states[valid],
            head.weight[:vocab].to(device),
            None if head.bias is None else head.bias[:vocab].to(device),
        )
        everywhere = self.accelerator.gather(self.accelerator.pad_across_processes(vds, pad_index=math.nan))
        low, high, lp = vgs.quantile_thresholds(everywhere[~everywhere.isnan()], (0.4, 0.7, self.args.vgs_lp_quantile))
        gate = vgs.language_prior_gate(vds, lp)
        if self.args.vgs_adaptive_gamma:
            gamma = vgs.adaptive_gamma(vds, low, high, self.args.vgs_gamma)
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
        metrics["vgs/vds_mean"].append(self._global_mean(vds))
        metrics["vgs/lp_token_frac"].append(self._global_mean(gate.float()))
        metrics["vgs/gamma_mean"].append(self._global_mean(gamma))

    def _text_view_prompts(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The text-only view of the generation batch's prompts: each conversation with its image and video parts
        removed, through the student's chat template; left-padded ids and mask, on the training device. Used by VGS
        and by text-only teachers (cross-modal distillation)."""
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
        rows = [torch.as_tensor(row) for row in tokenized["input_ids"]]
        prompt_ids = pad(rows, padding_value=self._tokenizer.pad_token_id, padding_side="left").to(device)
        prompt_mask = pad([torch.ones_like(row) for row in rows], padding_value=0, padding_side="left").to(device)
        return prompt_ids, prompt_mask

    def _vgs_loss(self, model, inputs, student_image, aggregate, mode) -> torch.Tensor:
        """eta * aggregate(l_Std + gamma_t l_Vis + lambda 1[VDS > quantile] l_LP), with one text-view student pass."""
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        valid = inputs["loss_mask"].bool()
        gate, gamma = inputs["vgs_lp_gate"], inputs["vgs_gamma"]
        # l_LP's gradient runs through this pass; without it, p_text only enters q*, detached. The pass needs hidden
        # states only (no vocabulary head) and goes around the DDP wrapper, whose bookkeeping allows one forward per
        # backward; its gradients still reach the parameters, whose hooks reduce the sum of both views' gradients.
        trains_text = self.args.vgs_lambda > 0 and self.model.training
        with nullcontext() if trains_text else torch.no_grad(), self.accelerator.autocast():
            student_text = completion_states(
                model,
                torch.cat([inputs["vgs_text_prompt_ids"], completion_ids], 1),
                torch.cat([inputs["vgs_text_prompt_mask"], completion_mask], 1),
                completion_ids.size(1),
                len(completion_ids),
            )
        student_head = vocabulary_head(self.accelerator.unwrap_model(self.model))
        teacher_head = vocabulary_head(self.teacher_model)
        vocab, device = student_head.weight.shape[0], student_image.device
        l_std, l_vis, l_lp = vgs.vgs_divergences(
            student_image[valid],
            student_text[valid],
            inputs["vgs_teacher_image"][valid],
            inputs["vgs_teacher_text"][valid],
            student_head.weight,
            teacher_head.weight[:vocab].to(device),
            student_head.bias,
            None if teacher_head.bias is None else teacher_head.bias[:vocab].to(device),
        )

        def per_token(values: torch.Tensor) -> torch.Tensor:
            return values.new_zeros(valid.shape).masked_scatter(valid, values)

        standard, visual = per_token(l_std), per_token(gamma[valid] * l_vis)
        prior = per_token(self.args.vgs_lambda * gate[valid] * l_lp)
        if mode == "train" and self.state.global_step < self.args.vgs_eta_measure_steps:
            self._measure_eta(model, aggregate(standard), aggregate(visual))
        metrics = self._metrics[mode]
        metrics["vgs/std_kl"].append(self._global_mean(l_std))
        metrics["vgs/visual_kl"].append(self._global_mean(l_vis))
        metrics["vgs/language_prior_kl"].append(self._global_mean(gate[valid] * l_lp))
        metrics["vgs/eta"].append(self._vgs_eta)
        loss = self._vgs_eta * aggregate(standard + visual + prior)
        metrics["vgs/loss"].append(self._logged_loss(loss, mode))
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
            with open(os.path.join(folder, _ETA_FILE), "w") as f:
                json.dump({"eta": self._vgs_eta, "samples": self._vgs_eta_samples}, f)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if not self.args.visual_gradient_steering or checkpoint is None:
            return
        path = os.path.join(checkpoint, _ETA_FILE)
        if os.path.exists(path):
            self._vgs_eta, self._vgs_eta_samples = read_eta(path)
        elif self.args.vgs_eta_measure_steps > 0:  # without the file the resumed run would train at another scale
            raise ValueError(
                f"The checkpoint {checkpoint} has no {_ETA_FILE}, so the eta measured over the first "
                f"{self.args.vgs_eta_measure_steps} steps is lost. Resume from a checkpoint that has it, or set "
                "vgs_eta to the measured value (logged as vgs/eta in trainer_state.json) and vgs_eta_measure_steps=0."
            )


def read_eta(path: str) -> tuple[float, list[float]]:
    """The measured eta and its samples from a checkpoint's `vgs_eta.json`; a clear error naming the file if broken."""
    try:
        with open(path) as f:
            state = json.load(f)
        eta, samples = float(state["eta"]), [float(x) for x in state["samples"]]
    except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError is a ValueError
        raise ValueError(
            f"{path} is corrupt ({type(error).__name__}: {error}); it should hold "
            '{"eta": <float>, "samples": [<float>, ...]}. Restore it, or delete it and set vgs_eta to the measured '
            "value with vgs_eta_measure_steps=0."
        ) from error
    if not (math.isfinite(eta) and eta > 0):
        raise ValueError(f"{path} holds eta={eta}; it must be a positive finite number. Restore or fix the file.")
    return eta, samples

"""Visual Gradient Steering (arXiv 2606.00564) as a part of GNDPOTrainer: the text view's teacher pass of each
generation batch, the VGS loss of each micro-step, the measured eta and its checkpoint file (refused when missing or
corrupt). The math lives in `vgs.py`; the text view in `text_view.py`."""

import json
import math
import os
from contextlib import nullcontext

import torch

from . import vgs
from .hidden_states import completion_states, vocabulary_head
from .scoring_models import placed

ETA_FILE = "vgs_eta.json"


class Steering:
    """VGS's state (eta) and its two steps; the trainer creates one only with `visual_gradient_steering=True`.

    Args:
        args: the `GNDPOConfig`.
        teacher: the (single, vision-language) prepared teacher.
        offload_to: the device the teacher is moved to for its pass (`teacher_offload`), else None.
        vocab_size: the student's vocabulary rows (the teacher's head is cut to them).
        text_view: renders the text view of the rows' prompts (a `TextView`).
        accelerator: the trainer's accelerator (device, autocast, reductions).
        global_mean: `values -> float`, the mean over all processes' elements (NaN when there are none).
    """

    def __init__(self, args, teacher, offload_to, vocab_size: int, text_view, accelerator, global_mean):
        self.args, self.teacher, self.offload_to, self.vocab_size = args, teacher, offload_to, vocab_size
        self.text_view, self.accelerator, self.global_mean = text_view, accelerator, global_mean
        self.eta, self.eta_samples = args.vgs_eta, []

    def add_text_view(self, batch, inputs, teacher_states, valid, batch_size: int, metrics) -> None:
        """VGS inputs of the generation batch, with one teacher pass over the text view of `inputs` (its rows).

        Writes the text-view prompts (`vgs_text_prompt_ids` / `_mask`, left-padded, so completion positions line up
        with the image view), the teacher's hidden states of both views at the completion positions, and the per-token
        language-prior gate and `gamma_t` from the VDS quantiles over every valid token of the batch (all processes).
        """
        args, accelerator, teacher = self.args, self.accelerator, self.teacher
        prompt_ids, prompt_mask = self.text_view.prompts(inputs)
        device = accelerator.device
        input_ids = torch.cat([prompt_ids, batch["completion_ids"]], 1)
        attention_mask = torch.cat([prompt_mask, batch["completion_mask"]], 1)
        completion_length = batch["completion_ids"].size(1)
        with torch.no_grad(), placed(teacher, self.offload_to) as at, accelerator.autocast():
            text_states = completion_states(
                teacher, input_ids.to(at), attention_mask.to(at), completion_length, batch_size
            ).to(device)
        head = vocabulary_head(teacher)
        vds = vgs.visual_dependency_scores(
            teacher_states[valid],
            text_states[valid],
            head.weight[: self.vocab_size].to(device),
            None if head.bias is None else head.bias[: self.vocab_size].to(device),
        )
        everywhere = accelerator.gather(accelerator.pad_across_processes(vds, pad_index=math.nan))
        low, high, lp = vgs.quantile_thresholds(everywhere[~everywhere.isnan()], (0.4, 0.7, args.vgs_lp_quantile))
        gate = vgs.language_prior_gate(vds, lp)
        if args.vgs_adaptive_gamma:
            gamma = vgs.adaptive_gamma(vds, low, high, args.vgs_gamma)
        else:
            gamma = torch.full_like(vds, args.vgs_gamma)
        scatter = valid.new_zeros(valid.shape, dtype=torch.float32).masked_scatter
        batch.update(
            vgs_text_prompt_ids=prompt_ids,
            vgs_text_prompt_mask=prompt_mask,
            vgs_teacher_image=teacher_states,
            vgs_teacher_text=text_states,
            vgs_lp_gate=scatter(valid, gate.float()),
            vgs_gamma=scatter(valid, gamma.float()),
        )
        metrics["vgs/vds_mean"].append(self.global_mean(vds))
        metrics["vgs/lp_token_frac"].append(self.global_mean(gate.float()))
        metrics["vgs/gamma_mean"].append(self.global_mean(gamma))

    def loss(self, model, inputs, student_image, aggregate, training: bool, measure_eta: bool, metrics):
        """eta * aggregate(l_Std + gamma_t l_Vis + lambda 1[VDS > quantile] l_LP), with one text-view student pass.

        `student_image`: the student's completion hidden states of this micro-batch (with their graph); `aggregate`:
        the policy loss's token aggregation; `measure_eta`: measure eta on this micro-step (training, first steps).
        """
        args = self.args
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        valid = inputs["loss_mask"].bool()
        gate, gamma = inputs["vgs_lp_gate"], inputs["vgs_gamma"]
        # l_LP's gradient runs through this pass; without it, p_text only enters q*, detached. The pass needs hidden
        # states only (no vocabulary head) and goes around the DDP wrapper, whose bookkeeping allows one forward per
        # backward; its gradients still reach the parameters, whose hooks reduce the sum of both views' gradients.
        trains_text = args.vgs_lambda > 0 and training
        with nullcontext() if trains_text else torch.no_grad(), self.accelerator.autocast():
            student_text = completion_states(
                model,
                torch.cat([inputs["vgs_text_prompt_ids"], completion_ids], 1),
                torch.cat([inputs["vgs_text_prompt_mask"], completion_mask], 1),
                completion_ids.size(1),
                len(completion_ids),
            )
        student_head, teacher_head = vocabulary_head(model), vocabulary_head(self.teacher)
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
        prior = per_token(args.vgs_lambda * gate[valid] * l_lp)
        if measure_eta:
            self.measure_eta(model, aggregate(standard), aggregate(visual))
        metrics["vgs/std_kl"].append(self.global_mean(l_std))
        metrics["vgs/visual_kl"].append(self.global_mean(l_vis))
        metrics["vgs/language_prior_kl"].append(self.global_mean(gate[valid] * l_lp))
        metrics["vgs/eta"].append(self.eta)
        return self.eta * aggregate(standard + visual + prior)

    def measure_eta(self, model, standard: torch.Tensor, visual: torch.Tensor) -> None:
        """eta = ||grad L_Std|| / ||grad L_Std + grad (gamma L_Vis)|| over the trainable parameters, this micro-step,
        averaged over processes; `eta` is the running mean of the measurements (fixed once they stop)."""
        params = [p for p in model.parameters() if p.requires_grad]
        grad_std = torch.autograd.grad(standard, params, retain_graph=True, materialize_grads=True)
        grad_vis = torch.autograd.grad(visual, params, retain_graph=True, materialize_grads=True)
        norm_std = torch.stack([g.float().pow(2).sum() for g in grad_std]).sum()
        norm_sum = torch.stack([(a + b).float().pow(2).sum() for a, b in zip(grad_std, grad_vis, strict=True)]).sum()
        eta = (norm_std.sqrt() / norm_sum.sqrt().clamp(min=1e-12)).detach()
        self.eta_samples.append(self.accelerator.reduce(eta, "mean").item())
        self.eta = sum(self.eta_samples) / len(self.eta_samples)

    def save(self, folder: str) -> None:
        """Write eta and its samples to the checkpoint folder's `vgs_eta.json`."""
        with open(os.path.join(folder, ETA_FILE), "w") as f:
            json.dump({"eta": self.eta, "samples": self.eta_samples}, f)

    def load(self, checkpoint: str) -> None:
        """Restore eta from a checkpoint; refuse one without the file while eta is measured (the resumed run would
        train at another scale)."""
        path = os.path.join(checkpoint, ETA_FILE)
        if os.path.exists(path):
            self.eta, self.eta_samples = read_eta(path)
        elif self.args.vgs_eta_measure_steps > 0:
            raise ValueError(
                f"The checkpoint {checkpoint} has no {ETA_FILE}, so the eta measured over the first "
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

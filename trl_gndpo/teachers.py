"""Which teacher scores which sample: several teachers routed by a dataset column (multi-teacher distillation, as
Uni-OPD and G-OPD evaluate it), text-only teachers of a vision-language student scoring the text view of a sample
(Uni-OPD's cross-modal distillation), and the per-teacher metrics.

Each teacher runs once per generation batch, on the rows routed to it only. The token signal and its global
whitening do not change: the teachers' log-probs are put back in row order before the signal is computed.
"""

import torch
from datasets import Dataset
from trl.trainer.utils import split_pixel_values_by_grid, unsplit_pixel_values_by_grid

from .teacher import capture_completion_states, load_teacher, load_teacher_processing_class, placed

# The name of the only teacher when one is given (metrics and `teacher_device` use names only with several).
SINGLE = "teacher"
# The routing columns looked for without `teacher_column`: TRL's async distillation's name, then this package's first.
ROUTING_COLUMNS = ("teacher_id", "teacher")


def routing_column(args, columns) -> str:
    """The column that names each sample's teacher: `teacher_column`, else the first of `ROUTING_COLUMNS` present."""
    if args.teacher_column is not None:
        return args.teacher_column
    return next((column for column in ROUTING_COLUMNS if column in columns), ROUTING_COLUMNS[0])


def named(teacher_model) -> dict:
    """`{name: teacher}` from the trainer's `teacher_model` argument: a dict of several teachers, or one teacher."""
    if isinstance(teacher_model, dict):
        return dict(teacher_model)
    return {SINGLE: teacher_model}


def load(teachers: dict, processing_classes, args) -> tuple[dict, dict]:
    """Load the teachers given by name or path, with their tokenizers unless `processing_classes` gives them."""
    if not isinstance(processing_classes, dict):
        processing_classes = {name: processing_classes for name in teachers}
    models, processors = {}, {}
    for name, teacher in teachers.items():
        processors[name] = processing_classes.get(name)
        if processors[name] is None:  # by name, or a model object loaded from a folder or the Hub: its tokenizer too
            path = teacher if isinstance(teacher, str) else getattr(teacher, "name_or_path", "")
            processors[name] = load_teacher_processing_class(path, args) if path else None
        if isinstance(teacher, str):
            teacher = load_teacher(teacher, args)
        models[name] = teacher
    return models, processors


def is_text_only(model) -> bool:
    """A teacher without a vision tower: for a vision-language student it scores the text view."""
    return getattr(model.config, "vision_config", None) is None


def text_only(args, teachers: dict, is_vlm: bool) -> set[str]:
    """The text-only teachers of a vision-language student (cross-modal distillation), checked against the options."""
    names = {name for name, teacher in teachers.items() if is_vlm and is_text_only(teacher)}
    if names and args.visual_gradient_steering:
        raise ValueError(
            "visual_gradient_steering needs the teacher's image view; a text-only teacher (cross-modal "
            "distillation) has none: set visual_gradient_steering=False or use a vision-language teacher."
        )
    if args.cross_modal_distillation and not names:
        raise ValueError(
            "cross_modal_distillation is set but no teacher is a text-only model for a vision-language student: "
            "drop the option, or give a text-only teacher."
        )
    return names


def device_of(args, name: str):
    """The device `teacher_device` asks for this teacher (None: the training device, or `teacher_offload`)."""
    return args.teacher_device.get(name) if isinstance(args.teacher_device, dict) else args.teacher_device


def check_setup(args, trainer, names: list[str], datasets: list) -> None:
    """Several teachers: the routing column is in every dataset and names known teachers; unsupported options."""
    if isinstance(args.teacher_device, dict) and sorted(set(args.teacher_device) - set(names)):
        raise ValueError(
            f"teacher_device names teachers {sorted(set(args.teacher_device) - set(names))} that are not among "
            f"the teachers {names}."
        )
    if len(names) <= 1:  # one teacher (none here when it is served)
        return
    zero3 = trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
    if trainer.is_fsdp_enabled or zero3:
        raise ValueError(
            "Several teachers score different numbers of rows on each process, which FSDP and DeepSpeed ZeRO-3 "
            "(one collective per forward on every process) do not allow: use DDP or ZeRO-2, or one teacher."
        )
    if args.value_baseline or args.visual_gradient_steering:
        raise ValueError(
            "value_baseline and visual_gradient_steering read one teacher's full distribution; with several "
            "teachers, turn them off or distill from one teacher."
        )
    for dataset in datasets:
        columns = getattr(dataset, "column_names", None)
        if columns is None:
            continue
        column = routing_column(args, columns)
        if column not in columns:
            raise ValueError(
                f"With several teachers ({names}) each sample names its teacher in the column {column!r} "
                f"(`teacher_column`), which the dataset lacks; it has {columns}."
            )
        if not isinstance(dataset, Dataset):
            continue  # a stream: its rows are checked as they are scored
        values = set(dataset[column])
        route([{column: value} for value in values], column, names)


def route(inputs: list[dict], column: str, names: list[str]) -> torch.Tensor:
    """Index of each sample's teacher: the column holds a teacher's name or its 0-based index in `names`."""
    indices = []
    for x in inputs:
        value = x.get(column)
        if isinstance(value, str) and value in names:
            indices.append(names.index(value))
        elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
            indices.append(value)
        else:
            raise ValueError(
                f"A sample's {column!r} is {value!r}, which names none of the teachers {names} (give a name or a "
                f"0-based index below {len(names)})."
            )
    return torch.tensor(indices, dtype=torch.long)


def select_rows(model_inputs: dict, rows: list[int]) -> dict:
    """The multimodal model inputs of some rows of a generation batch (images split per sample, as TRL does)."""
    split = split_pixel_values_by_grid(model_inputs)
    selected = {}
    for key, value in split.items():
        if isinstance(value, list):
            selected[key] = [value[i] for i in rows]
        elif isinstance(value, torch.Tensor) and value.ndim > 0:
            selected[key] = value[rows]
        else:
            selected[key] = value
    return unsplit_pixel_values_by_grid(selected)


class TeachersMixin:
    """The teachers' half of `GNDPOTrainer`'s scoring: route, score each teacher's rows once, log per teacher."""

    def _teacher_routes(self, inputs) -> "torch.Tensor | None":
        """Each local row's teacher index, or None with a single teacher (or a served one)."""
        if len(self.teachers) <= 1:
            return None
        column = routing_column(self.args, inputs[0])
        return route(inputs, column, list(self.teachers)).to(self.accelerator.device)

    def _score_teachers(self, batch, inputs, input_ids, attention_mask, model_inputs, want_states):
        """Log-probs of the sampled tokens under each row's teacher (temperature 1), in row order, and the teachers'
        completion hidden states when `want_states` (a single teacher). Text-only teachers of a vision-language
        student read the text view of their rows; the others read exactly the student's inputs."""
        completion_length = batch["completion_ids"].size(1)
        routes = self._teacher_routes(inputs)
        logps = torch.zeros(batch["completion_ids"].shape, device=self.accelerator.device)
        text_view = None
        states = []
        for index, (name, teacher) in enumerate(self.teachers.items()):
            rows = None if routes is None else (routes == index).nonzero().squeeze(1)
            if rows is not None and rows.numel() == 0:
                continue
            ids, mask, extra = input_ids, attention_mask, model_inputs
            if name in self._text_teachers:
                if text_view is None:
                    prompt_ids, prompt_mask = self._text_view_prompts(inputs)
                    text_view = (
                        torch.cat([prompt_ids, batch["completion_ids"]], 1),
                        torch.cat([prompt_mask, batch["completion_mask"]], 1),
                    )
                ids, mask = text_view
                extra = {"batch_size": model_inputs["batch_size"]}
            if rows is not None:
                ids, mask = ids[rows], mask[rows]
                extra = select_rows(extra, rows.tolist())
            with capture_completion_states(teacher, completion_length, want_states) as teacher_states:
                scored = self._placed_log_probs(teacher, self._teacher_offload_to, ids, mask, completion_length, extra)
            if rows is None:
                logps = scored.float()
            else:
                logps[rows] = scored.float()
            states += teacher_states
        return logps, states

    def _placed_log_probs(self, model, offload_to, input_ids, attention_mask, completion_length, model_inputs):
        """Log-probs of the sampled tokens under a frozen scoring model (a teacher, or G-OPD's reference) on the
        device it is placed on (`placed`), returned on the training device."""
        with placed(model, offload_to) as device:
            moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in model_inputs.items()}
            logps, _, _ = self._get_per_token_logps_and_entropies(
                model, input_ids.to(device), attention_mask.to(device), completion_length, **moved
            )
        return logps.to(self.accelerator.device)

    def _log_teacher_statistics(self, metrics, inputs, valid, scores) -> None:
        """`gndpo/teacher/<name>/`: each teacher's share of the valid tokens, mean log-prob and sampled-token reverse
        KL over its valid tokens, over the generation batch on every process (one sum reduction)."""
        routes = self._teacher_routes(inputs)
        if routes is None:
            return
        student, teacher = scores["student"], scores["teacher"]
        sums = []
        for index in range(len(self.teachers)):
            mine = valid & (routes == index).unsqueeze(1)
            sums += [mine.sum(), torch.where(mine, student - teacher, 0).sum(), torch.where(mine, teacher, 0).sum()]
        sums = self._reduce_sum(torch.stack(sums).to(torch.float64)).view(-1, 3)
        total = sums[:, 0].sum().clamp(min=1.0)
        for name, (count, kl, logp) in zip(self.teachers, sums, strict=True):
            metrics[f"gndpo/teacher/{name}/token_frac"].append((count / total).item())
            # a teacher without valid tokens has nothing to average: NaN, which TRL's `log` leaves out (never 0)
            metrics[f"gndpo/teacher/{name}/reverse_kl"].append((kl / count).item() if count > 0 else float("nan"))
            metrics[f"gndpo/teacher/{name}/teacher_logp"].append((logp / count).item() if count > 0 else float("nan"))

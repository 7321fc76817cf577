"""Which teacher scores which sample: several teachers routed by a dataset column (multi-teacher distillation, as
Uni-OPD and G-OPD evaluate it), text-only teachers of a vision-language student scoring the text view of a sample
(Uni-OPD's cross-modal distillation), and the per-teacher metrics. Their set-up checks are in `checks.py`.

Each teacher runs once per generation batch, on the rows routed to it only. The token signal and its global
whitening do not change: the teachers' log-probs are put back in row order before the signal is computed.
"""

import torch
from datasets import IterableDataset
from transformers.utils import logging
from trl.trainer.utils import split_pixel_values_by_grid, unsplit_pixel_values_by_grid

from . import teacher_server
from .hidden_states import capture_completion_states
from .scoring_models import load_teacher, load_teacher_processing_class, placed_log_probs

logger = logging.get_logger(__name__)

# The name of the only teacher when one is given (metrics and `teacher_device` use names only with several).
SINGLE = "teacher"
# The routing columns looked for without `teacher_column`: TRL's async distillation's name, then this package's first.
ROUTING_COLUMNS = ("teacher_id", "teacher")


def routing_column(column: str | None, columns) -> str:
    """The column that names each sample's teacher: `column` (`teacher_column`) if given, else the first of
    `ROUTING_COLUMNS` among `columns`."""
    if column is not None:
        return column
    return next((column for column in ROUTING_COLUMNS if column in columns), ROUTING_COLUMNS[0])


def named(teacher_model) -> dict:
    """`{name: teacher}` from the trainer's `teacher_model` argument: a dict of several teachers, or one teacher."""
    if isinstance(teacher_model, dict):
        return dict(teacher_model)
    return {SINGLE: teacher_model}


def load(teacher_model, processing_classes, args) -> tuple[dict, dict]:
    """`{name: teacher}` and `{name: its processor}` from the trainer's `teacher_model` argument (`named`): the
    teachers given by name or path loaded, with their tokenizers unless `processing_classes` gives them. None (a
    served teacher): nothing to load."""
    teachers = {} if teacher_model is None else named(teacher_model)
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


def text_only_names(models: dict, is_vlm: bool) -> set[str]:
    """The text-only teachers of a vision-language student (cross-modal distillation)."""
    return {name for name, model in models.items() if is_vlm and is_text_only(model)}


def has_images(row: dict) -> bool:
    """Whether a dataset row carries images (TRL's `image` or `images` column)."""
    return row.get("image") is not None or bool(row.get("images"))


def device_of(args, name: str):
    """The device `teacher_device` asks for this teacher (None: the training device, or `teacher_offload`)."""
    return args.teacher_device.get(name) if isinstance(args.teacher_device, dict) else args.teacher_device


def route(inputs: list[dict], column: str, names: list[str], where: str = "A sample") -> torch.Tensor:
    """Index of each sample's teacher: the column holds a teacher's name or its 0-based index in `names`. `where`
    names the sample in the error."""
    indices = []
    for x in inputs:
        value = x.get(column)
        if isinstance(value, str) and value in names:
            indices.append(names.index(value))
        elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
            indices.append(value)
        else:
            raise ValueError(
                f"{where}'s {column!r} is {value!r}, which names none of the teachers {names} (give a name or a "
                f"0-based index below {len(names)})."
            )
    return torch.tensor(indices, dtype=torch.long)


def checked_stream(dataset, column: str | None, names: list[str], split: str):
    """A streamed dataset whose rows' teacher names are checked as they are read, so that a row naming no teacher
    fails with its number in the stream (a `Dataset`, checked whole when the trainer is built, is returned as is)."""
    if len(names) <= 1 or not isinstance(dataset, IterableDataset):
        return dataset

    def check(row: dict, index: int) -> dict:
        route([row], routing_column(column, row), names, where=f"Row {index} of the streamed {split} dataset")
        return row

    return dataset.map(check, with_indices=True, features=dataset.features)


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


class Teachers:
    """The placed teachers of a trainer: route each row to its teacher, score each teacher's rows once per generation
    batch, and log per-teacher metrics.

    Args:
        models: name -> prepared teacher (in routing order).
        text_only: names of the text-only teachers of a vision-language student; they score the text view.
        column: the dataset column that routes a row (`teacher_column`).
        offload_to: the device a teacher is moved to for its pass (`teacher_offload`), else None.
        log_probs: GRPOTrainer's `_get_per_token_logps_and_entropies`.
        text_view: renders the text view of the rows' prompts (a `TextView`).
        accelerator: the trainer's accelerator (its device, and the reductions of the metrics).
        servers: name -> connected teacher server (`teacher_server.py`), in routing order, when the teachers are
            served (`teacher_model_server_url`); then `models` is empty.
        own_tokenizers: with `cross_tokenizer_distillation`, the teachers' own tokenizers and processors (an
            `OwnTokenizers`); they then score their own tokens (`score_own_tokens`), else None.
    """

    def __init__(
        self,
        models: dict,
        text_only: set,
        column: str,
        offload_to,
        log_probs,
        text_view,
        accelerator,
        servers=None,
        own_tokenizers=None,
    ):
        self.models, self.text_only, self.column, self.offload_to = models, text_only, column, offload_to
        self.log_probs, self.text_view, self.accelerator = log_probs, text_view, accelerator
        self.servers, self.own_tokenizers = servers or {}, own_tokenizers
        self.names = list(self.servers or self.models)  # routing order
        self.warned_about_image_rows = False  # image rows read by a text-only teacher: warned once per trainer

    @property
    def first(self):
        """The teacher, the first of several, or None (a served teacher)."""
        return next(iter(self.models.values()), None)

    def routes(self, inputs: list[dict]) -> "torch.Tensor | None":
        """Each local row's teacher index (in `names`), or None with a single teacher, local or served."""
        if len(self.names) <= 1:
            return None
        column = routing_column(self.column, inputs[0])
        return route(inputs, column, self.names).to(self.accelerator.device)

    def score(self, batch, inputs, input_ids, attention_mask, model_inputs, want_states):
        """Log-probs of the sampled tokens under each row's teacher (at `args.teacher_temperature`, set when the
        teachers were prepared), in row order, and the teachers' completion hidden states when `want_states` (a
        single teacher). `inputs`: the rows behind `batch`. Text-only teachers of a vision-language student read the
        text view of their rows; the others read exactly the student's inputs."""
        if self.servers:  # each server scores its rows; NaN where it gave no log-prob (masked and counted downstream)
            return teacher_server.score_routed(self.servers, self.routes(inputs), batch), []
        completion_length = batch["completion_ids"].size(1)
        routes = self.routes(inputs)
        logps = torch.zeros(batch["completion_ids"].shape, device=self.accelerator.device)
        text_view = None
        states = []
        for index, (name, teacher) in enumerate(self.models.items()):
            rows = None if routes is None else (routes == index).nonzero().squeeze(1)
            if rows is not None and rows.numel() == 0:
                continue
            ids, mask, extra = input_ids, attention_mask, model_inputs
            if name in self.text_only:
                if text_view is None:
                    prompt_ids, prompt_mask = self.text_view.prompts(inputs)
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
                scored = placed_log_probs(
                    self.log_probs,
                    teacher,
                    self.offload_to,
                    ids,
                    mask,
                    completion_length,
                    extra,
                    self.accelerator.device,
                )
            if rows is None:
                logps = scored.float()
            else:
                logps[rows] = scored.float()
            states += teacher_states
        return logps, states

    def score_own_tokens(self, batch, inputs, batch_size: int):
        """`cross_tokenizer_distillation`: each row's teacher scores its own tokens of the row (its own rendering of
        the prompt and images, its own tokens of the completion text), once per generation batch; returns the span
        log-probs on the student's completion grid and their `SpanPlacement` (`cross_tokenizer.OwnTokenizers`)."""

        def log_probs(name, input_ids, attention_mask, completion_length, model_inputs):
            model_inputs = {**model_inputs, "batch_size": batch_size}
            scoring = (input_ids, attention_mask, completion_length, model_inputs, self.accelerator.device)
            return placed_log_probs(self.log_probs, self.models[name], self.offload_to, *scoring)

        ids = (batch["completion_ids"], batch["completion_mask"])
        return self.own_tokenizers.score(list(self.models), self.routes(inputs), *ids, inputs, log_probs)

    def statistics(self, metrics, inputs, valid, student, teacher) -> None:
        """`gndpo/teacher/<name>/`: each teacher's share of the valid tokens, mean log-prob and sampled-token reverse
        KL over its valid tokens, over the generation batch on every process (one sum reduction). Nothing with a
        single teacher."""
        routes = self.routes(inputs)
        if routes is None:
            return
        sums = []
        for index in range(len(self.names)):
            mine = valid & (routes == index).unsqueeze(1)
            sums += [mine.sum(), torch.where(mine, student - teacher, 0).sum(), torch.where(mine, teacher, 0).sum()]
        sums = self.accelerator.reduce(torch.stack(sums).to(torch.float64), reduction="sum").view(-1, 3)
        total = sums[:, 0].sum().clamp(min=1.0)
        for name, (count, kl, logp) in zip(self.names, sums, strict=True):
            metrics[f"gndpo/teacher/{name}/token_frac"].append((count / total).item())
            # a teacher without valid tokens has nothing to average: NaN, which TRL's `log` leaves out (never 0)
            metrics[f"gndpo/teacher/{name}/reverse_kl"].append((kl / count).item() if count > 0 else float("nan"))
            metrics[f"gndpo/teacher/{name}/teacher_logp"].append((logp / count).item() if count > 0 else float("nan"))

    def text_view_images(self, metrics, inputs) -> None:
        """`gndpo/teacher/text_view_image_frac`: the share of the generation batch's image rows (all processes) that
        a text-only teacher scored on their text view, which is not Uni-OPD's cross-modal setting (its text teachers
        get text-domain rows); a warning the first time it is not 0. Nothing without a text-only teacher."""
        if not self.text_only:
            return
        routes = self.routes(inputs)
        names = list(self.models)
        text = [names[i] in self.text_only for i in ([0] * len(inputs) if routes is None else routes.tolist())]
        images = [has_images(x) for x in inputs]
        counts = [sum(t and i for t, i in zip(text, images, strict=True)), sum(images)]
        counts = torch.tensor(counts, dtype=torch.float64, device=self.accelerator.device)
        scored, total = self.accelerator.reduce(counts, reduction="sum").tolist()
        metrics["gndpo/teacher/text_view_image_frac"].append(scored / total if total else 0.0)
        if scored and not self.warned_about_image_rows:
            self.warned_about_image_rows = True
            logger.warning(
                f"{scored:g} of {total:g} image rows were scored by a text-only teacher on their text view (images "
                "removed): that teacher cannot see the image, and Uni-OPD's cross-modal setting sends text teachers "
                "text-domain rows only. Route image rows to a vision-language teacher (teacher_models with "
                "teacher_column) unless this is what you want; gndpo/teacher/text_view_image_frac logs the share."
            )

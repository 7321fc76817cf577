"""Set-up checks of GNDPOTrainer: every mismatch between the arguments, the datasets, the student and the teacher is
reported before the first training step, with a message that says what to change."""

import io

import PIL.Image
import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, Image
from transformers import PreTrainedModel
from transformers.utils import logging

from . import cross_tokenizer, teachers
from .config import GNDPOConfig

logger = logging.get_logger(__name__)

# Settings that decide how an image becomes tokens: the teacher must agree with the student on each of them.
_VISION_CONFIG_KEYS = ("patch_size", "spatial_merge_size", "temporal_patch_size", "in_channels")
_IMAGE_TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
_IMAGE_PROCESSOR_KEYS = ("patch_size", "merge_size", "temporal_patch_size", "size")  # size holds min/max pixels


def check_setup(
    trainer,
    teacher_models: dict,
    teacher_processing: dict,
    reference: "PreTrainedModel | None",
    reference_processing,
    datasets: dict,
) -> None:
    """Every set-up check of GNDPOTrainer that needs models, datasets or the accelerator, called once after
    `GRPOTrainer.__init__`: the datasets, the teachers, the G-OPD reference and VGS. (The config checks itself in
    `__post_init__`; `check_arguments` checks the trainer's arguments before anything loads.)

    `teacher_models` (name -> model) and `teacher_processing` (name -> processor or None): the loaded teachers;
    `reference`: the loaded G-OPD reference model (None: none given) and its processor; `datasets`: GRPOTrainer's
    keyword arguments, of which `train_dataset` and `eval_dataset` (one or a dict of several) are read.
    """
    args = trainer.args
    train_dataset, eval_dataset = datasets.get("train_dataset"), datasets.get("eval_dataset")
    eval_datasets = list(eval_dataset.values()) if isinstance(eval_dataset, dict) else [eval_dataset]
    check_dataset_sizes(args, train_dataset, eval_datasets)
    datasets = [train_dataset, *eval_datasets]
    check_datasets(datasets, trainer._is_vlm, trainer.environment_factories is not None, args.max_checked_rows)
    warn_if_checkpoints_split_generations(args)
    warn_if_rollout_feeds_several_steps(args)
    hint_fixed_vgs_eta(args)
    served = args.teacher_model_server_url
    check_routing(args, trainer, list(served) if isinstance(served, dict) else list(teacher_models), datasets)
    student = trainer.accelerator.unwrap_model(trainer.model)
    if args.cross_tokenizer_distillation:
        check_own_tokenizers(trainer, teacher_models, teacher_processing)
    for name, teacher in teacher_models.items():
        check_teacher(
            args,
            student,
            teacher,
            trainer.processing_class,
            teacher_processing[name],
            trainer._is_vlm,
            text_view=args.cross_modal_distillation,
            own_tokenizer=args.cross_tokenizer_distillation,
        )
    check_cross_modal(args, teacher_models, trainer._is_vlm)
    if reference is not None:
        check_teacher(args, student, reference, trainer.processing_class, reference_processing, trainer._is_vlm)
    if args.visual_gradient_steering:
        check_steering(trainer, student, next(iter(teacher_models.values()), None))


def check_own_tokenizers(trainer, teacher_models: dict, teacher_processing: dict) -> None:
    """`cross_tokenizer_distillation`: fast tokenizers on both sides (character offsets), each teacher's own processor
    (its chat template, and its image processor for a vision-language teacher), no tools or environments."""
    if trainer.tools or trainer.environment_factories is not None:
        raise ValueError(
            "cross_tokenizer_distillation re-renders each completion as text for the teacher, which tool calls and "
            "environment turns (tokens the student did not sample) would break: drop them, or use a teacher with "
            "the student's tokenizer."
        )
    cross_tokenizer.check_fast_tokenizer(trainer.processing_class, "student")
    for name, teacher in teacher_models.items():
        processing_class = teacher_processing[name]
        if processing_class is None:
            raise ValueError(
                f"cross_tokenizer_distillation renders prompts and completions with the teacher's own tokenizer, "
                f"but none was given or found for teacher {name!r}: pass `teacher_processing_class`, or save the "
                "tokenizer (processor) with the teacher."
            )
        cross_tokenizer.check_fast_tokenizer(processing_class, f"teacher {name!r}")
        vision = getattr(teacher.config, "vision_config", None) is not None
        if trainer._is_vlm and vision and not hasattr(processing_class, "image_processor"):
            raise ValueError(
                f"Teacher {name!r} is a vision-language model, so with cross_tokenizer_distillation its own "
                "processor renders the images; its processing class has no image processor: pass its processor "
                "(`AutoProcessor`) as `teacher_processing_class`."
            )


def _shards_parameters(trainer) -> bool:
    """FSDP or DeepSpeed ZeRO-3: one collective per forward on every process, and sharded weights."""
    zero3 = trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
    return trainer.is_fsdp_enabled or zero3


def check_arguments(args: GNDPOConfig, reward_funcs, teacher_model, reference_model=None) -> None:
    """Options that need something the trainer was not given: the trainer's arguments as given, before any model
    loads."""
    if reference_model is not None and args.reward_extrapolation == 1.0:  # the config checks its own field
        raise ValueError(
            "reference_model is the reference of reward_extrapolation, which cancels at 1.0: set "
            "reward_extrapolation (G-OPD's ExOPD uses 1.25) or drop the reference model."
        )
    if args.outcome_advantage_weight > 0 and not reward_funcs:
        raise ValueError("outcome_advantage_weight > 0 needs `reward_funcs` to compute the outcome advantage.")
    if (args.margin_calibration != "none" or args.balance_ratio is not None) and not reward_funcs:
        raise ValueError(
            "Uni-OPD margin calibration and balancing need `reward_funcs` to tell correct from incorrect "
            "completions: pass them, or set margin_calibration='none' and balance_ratio=None."
        )
    if args.visual_gradient_steering and args.vgs_mode == "grpo" and not reward_funcs:
        raise ValueError(
            "vgs_mode='grpo' (GRPO + VGS) trains on GRPO's outcome advantage, which needs `reward_funcs`: pass them, "
            "or use vgs_mode='alone'."
        )
    if args.teacher_model_server_url is not None and teacher_model is not None:
        raise ValueError(
            "Both a teacher model and teacher_model_server_url are given: pass `teacher_model` for a local teacher, "
            "or only teacher_model_server_url for a served one."
        )
    if (teacher_model is None or teacher_model == {}) and args.teacher_model_server_url is None:
        raise ValueError(
            "GNDPO needs a teacher: pass `teacher_model`, or set `teacher_model_name_or_path` or "
            "`teacher_model_server_url`."
        )
    given = teacher_model.values() if isinstance(teacher_model, dict) else [teacher_model]
    if any(not isinstance(t, str) for t in given) and args.teacher_model_init_kwargs is not None:
        raise ValueError(
            "teacher_model_init_kwargs is set but the teacher is already instantiated: drop the kwargs or pass "
            "the teacher by name."
        )


def warn_if_checkpoints_split_generations(args: GNDPOConfig) -> None:
    """GRPOTrainer does not save its generation buffer: a checkpoint inside a generation batch cannot resume
    exactly."""
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


def check_dataset_sizes(args: GNDPOConfig, train_dataset, eval_datasets: list) -> None:
    """A training set too small for one generation batch (or an empty evaluation set) would run 0 steps, silently."""
    per_batch = args.generation_batch_size // args.num_generations
    size = _length(train_dataset)
    if size is not None and size < per_batch:
        raise ValueError(
            f"The training dataset has {size} prompts, fewer than one generation batch takes ({per_batch} = "
            f"generation_batch_size {args.generation_batch_size} / num_generations {args.num_generations}, with "
            f"generation_batch_size = per_device_train_batch_size {args.per_device_train_batch_size} x "
            f"steps_per_generation {args.steps_per_generation} x {args.world_size} processes): training would run "
            "0 steps. Use more prompts, or lower per_device_train_batch_size or steps_per_generation "
            "(gradient_accumulation_steps sets its default)."
        )
    for dataset in eval_datasets:
        if _length(dataset) == 0:
            raise ValueError("An evaluation dataset is empty: pass one with at least one prompt, or none.")


def _length(dataset) -> int | None:
    """Number of rows, or None for a stream (or no dataset)."""
    try:
        return None if dataset is None else len(dataset)
    except TypeError:  # IterableDataset
        return None


def warn_if_rollout_feeds_several_steps(args: GNDPOConfig) -> None:
    """GNDPO whitens over one rollout and takes one optimizer step on it; more steps per rollout train off-policy."""
    if args.normalization_scope != "global":
        return
    steps = args.steps_per_generation * args.num_iterations / args.gradient_accumulation_steps
    if args.steps_per_generation > args.gradient_accumulation_steps or args.num_iterations > 1:
        logger.warning(
            f"Each generation batch feeds {steps:g} optimizer steps (steps_per_generation="
            f"{args.steps_per_generation}, gradient_accumulation_steps={args.gradient_accumulation_steps}, "
            f"num_iterations={args.num_iterations}): the whitening statistics come from the whole rollout while the "
            "later steps train a policy that has already moved, unlike the GNDPO reference, which takes one "
            "optimizer step per rollout. For that, leave generation_batch_size and steps_per_generation unset "
            "(steps_per_generation then equals gradient_accumulation_steps) and set num_iterations=1."
        )


def hint_fixed_vgs_eta(args: GNDPOConfig) -> None:
    """VGS's fixed eta was measured by the paper for one student-teacher pair; once per trainer, say how to measure it
    for others."""
    if args.visual_gradient_steering and args.vgs_eta_measure_steps == 0 and args.vgs_eta != 1.0:
        logger.warning(
            f"VGS uses a fixed vgs_eta={args.vgs_eta}. The paper measured eta = ||grad L_Std|| / ||grad L_Std + gamma "
            "grad L_Vis|| for one pair only (Qwen3-VL-8B teacher: 0.41 for its 2B student, 0.36 for its 4B); for "
            "another student-teacher pair, set vgs_eta_measure_steps (e.g. 20) to measure it over the first steps."
        )


def check_datasets(datasets: list, is_vlm: bool, has_environments: bool, max_rows: int | None = None) -> None:
    """Every dataset has a `prompt` column, image columns only go with a vision-language student, and the first
    `max_rows` rows (all if None) hold prompts and images the student can use (see `check_rows`)."""
    for index, dataset in enumerate(datasets):
        columns = getattr(dataset, "column_names", None)
        if not columns:  # None, or a streaming dataset whose columns are unknown until read
            continue
        if "prompt" not in columns and not has_environments:
            raise ValueError(f"The dataset needs a `prompt` column (conversational or text); it has {columns}.")
        image_columns = [c for c in ("image", "images") if c in columns]
        if image_columns and not is_vlm:
            raise ValueError(
                f"The dataset has an image column {image_columns} but the student's processing class is a "
                "text tokenizer. Use a vision-language student with its processor, or drop the image column."
            )
        check_rows(dataset, "train_dataset" if index == 0 else "eval_dataset", max_rows)


def check_routing(args: GNDPOConfig, trainer, names: list[str], datasets: list) -> None:
    """Several teachers: the routing column is in every dataset and names known teachers; unsupported options.
    `teacher_device` names only known teachers."""
    if isinstance(args.teacher_device, dict):
        args.check_teacher_device_names(names)
    if len(names) <= 1:  # one teacher (none here when it is served)
        return
    if _shards_parameters(trainer):
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
        column = teachers.routing_column(args.teacher_column, columns)  # `teacher_id` (TRL's name) or `teacher`
        if column not in columns:
            raise ValueError(
                f"With several teachers ({names}) each sample names its teacher in the column {column!r} "
                f"(`teacher_column`), which the dataset lacks; it has {columns}."
            )
        if not isinstance(dataset, Dataset):
            continue  # a stream: its rows are checked as they are scored
        values = set(dataset[column])
        teachers.route([{column: value} for value in values], column, names)


def check_cross_modal(args: GNDPOConfig, models: dict, is_vlm: bool) -> None:
    """Text-only teachers of a vision-language student need `cross_modal_distillation`, and the option needs one;
    VGS needs the teacher's image view."""
    names = teachers.text_only_names(models, is_vlm)
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


# Rows read at a time by `check_rows`: the images of one slice are in memory at once, never a whole column.
_ROWS_PER_SLICE = 16
# Qwen-VL image processors (`smart_resize`) refuse images whose longer side is over 200 times the shorter.
_MAX_ASPECT_RATIO = 200


def check_rows(dataset, name: str, max_rows: int | None = None) -> None:
    """Check the prompts and images of the first `max_rows` rows (all if None) before training.

    A prompt must be a non-empty string or a non-empty conversation (a list of messages with a `role`, and some text or
    an image). Every image of an `image` / `images` column must be present (not None, not an empty list), decode (every
    byte is read; a truncated file passes PIL's `verify` but fails in the processor) and have an aspect ratio of at
    most 200. Rows are read a slice at a time in Arrow form (images as encoded bytes), so memory holds one slice, never
    a whole column. The error names every bad row (the first 10 of each kind) and its field.
    """
    if not isinstance(dataset, Dataset):
        return  # a stream: nothing stored to check up front
    image_columns = [c for c in ("image", "images") if c in dataset.column_names and _is_image_feature(dataset, c)]
    columns = [c for c in ("prompt",) if c in dataset.column_names] + image_columns
    if not columns:
        return
    raw = dataset.select_columns(columns).with_format("arrow")
    stop = len(raw) if max_rows is None else min(max_rows, len(raw))
    problems: dict[str, list[str]] = {}
    for start in range(0, stop, _ROWS_PER_SLICE):
        for offset, row in enumerate(raw[start : min(start + _ROWS_PER_SLICE, stop)].to_pylist()):
            index = start + offset
            has_image = False
            for column in image_columns:
                images = row[column] if isinstance(row[column], list) else [row[column]]
                if not images or any(_missing(image) for image in images):
                    problems.setdefault(f"have no image in column {column!r} (None or an empty list)", []).append(
                        str(index)
                    )
                    continue
                has_image = True
                for image in images:
                    kind, detail = _image_problem(image)
                    if kind is not None:
                        problems.setdefault(kind.format(column=column), []).append(f"{index} ({detail})")
            if "prompt" in row:
                problem = _prompt_problem(row["prompt"], has_image)
                if problem is not None:
                    problems.setdefault("have an unusable `prompt`", []).append(f"{index} ({problem})")
    if problems:
        checked = "" if stop == len(raw) else f" (checked the first {stop} of {len(raw)} rows: max_checked_rows)"
        raise ValueError(
            f"The {name} has rows the trainer cannot use{checked}: "
            + "; ".join(f"{len(rows)} {kind}, at rows {', '.join(rows[:10])}" for kind, rows in problems.items())
            + ". Fix or drop those rows (e.g. `dataset.filter`) before training."
        )


def _is_image_feature(dataset: Dataset, column: str) -> bool:
    feature = dataset.features[column]
    return isinstance(feature, Image) or isinstance(getattr(feature, "feature", None), Image)


def _missing(image) -> bool:
    return image is None or (image.get("bytes") is None and image.get("path") is None)


def _image_problem(image: dict) -> tuple[str | None, str]:
    """(kind of problem, detail) of a stored image ({"bytes", "path"}); (None, "") when the processor can use it."""
    try:
        source = io.BytesIO(image["bytes"]) if image.get("bytes") is not None else image["path"]
        with PIL.Image.open(source) as opened:
            width, height = opened.size
            opened.draft(opened.mode, (max(1, width // 8), max(1, height // 8)))  # JPEG: reads every byte, less work
            opened.load()  # decode: a truncated file opens and verifies, then fails here
    except Exception as error:  # PIL raises many types for broken files
        return "images of column {column!r} cannot be decoded", type(error).__name__
    if min(width, height) == 0 or max(width, height) / min(width, height) > _MAX_ASPECT_RATIO:
        kind = "images of column {column!r} have an aspect ratio over %d (Qwen-VL processors refuse it)"
        return kind % _MAX_ASPECT_RATIO, f"{width}x{height}"
    return None, ""


def _prompt_problem(prompt, has_image: bool) -> str | None:
    """Why a `prompt` value cannot be tokenized into a usable prompt, or None."""
    if prompt is None:
        return "None"
    if isinstance(prompt, str):
        return None if prompt.strip() else "empty or blank string"
    if not isinstance(prompt, list):
        return f"a {type(prompt).__name__}, not a string or a list of messages"
    if not prompt:
        return "empty conversation"
    text = False
    for number, message in enumerate(prompt):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return f"message {number} is not a {{'role': ..., 'content': ...}} dict"
        content = message.get("content")
        if isinstance(content, str):
            text = text or bool(content.strip())
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    return f"message {number} has a content part that is not a dict"
                text = text or bool((part.get("text") or "").strip())
                has_image = has_image or part.get("type") in ("image", "video")
        elif content is not None:
            return f"message {number} has content of type {type(content).__name__}"
    return None if text or has_image else "no text in any message"


def check_teacher(
    args: GNDPOConfig,
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    processing_class,
    teacher_processing_class,
    is_vlm: bool,
    text_view: bool = False,
    own_tokenizer: bool = False,
) -> None:
    """The teacher can score every token the student samples, tokenizes like it, lays images out like it, and can be
    placed where the arguments ask. `text_view`: a text-only teacher of a vision-language student is accepted (it
    scores the text view of each sample, `cross_modal_distillation`); its tokenizer is still checked. `own_tokenizer`
    (`cross_tokenizer_distillation`): the teacher keeps its own tokenizer and processor, so only its placement and
    its vision are checked here (its processor in `check_own_tokenizers`)."""
    if args.teacher_offload and getattr(teacher, "is_quantized", False):
        raise ValueError(
            "teacher_offload moves the teacher between devices, which a quantized teacher does not support: load "
            "it on the training device, or drop teacher_offload."
        )
    if own_tokenizer:
        if is_vlm and getattr(teacher.config, "vision_config", None) is None and not text_view:
            raise ValueError(
                f"The student is a vision-language model but the teacher ({type(teacher).__name__}) has no vision "
                "tower: set cross_modal_distillation=True to let it score the text of each sample."
            )
        return
    student_config, teacher_config = student.config, teacher.config
    student_rows = student_config.get_text_config().vocab_size
    teacher_rows = teacher_config.get_text_config().vocab_size
    if teacher_rows < student_rows:
        raise ValueError(
            f"The teacher's vocabulary ({teacher_rows} rows) is smaller than the student's ({student_rows}): the "
            "teacher cannot score every token the student can sample. Use a teacher with the student's tokenizer, "
            "or set cross_tokenizer_distillation=True to let the teacher score its own tokens of the completion text."
        )
    if teacher_processing_class is not None:
        student_vocab = getattr(processing_class, "tokenizer", processing_class).get_vocab()
        teacher_vocab = getattr(teacher_processing_class, "tokenizer", teacher_processing_class).get_vocab()
        if student_vocab != teacher_vocab:
            differing = sorted(set(student_vocab.items()) ^ set(teacher_vocab.items()))
            raise ValueError(
                f"The teacher's tokenizer differs from the student's ({len(teacher_vocab)} vs "
                f"{len(student_vocab)} tokens; differing (token, id) pairs include {differing[:4]}). GNDPO scores "
                "the student's token ids with the teacher, so both must share one vocabulary (or set "
                "cross_tokenizer_distillation=True to let the teacher score its own tokens of the completion text)."
            )
    else:
        logger.warning(  # a teacher built in memory, or saved without its tokenizer: nothing else to compare
            "No teacher tokenizer was given or found with the teacher, so only the vocabulary sizes were compared "
            "(a tokenizer of the same size that maps tokens to other ids would go unnoticed). Pass "
            "`teacher_processing_class` to check that the teacher tokenizes exactly like the student."
        )
    if not is_vlm:
        return
    teacher_vision = getattr(teacher_config, "vision_config", None)
    if teacher_vision is None and text_view:
        _warn_if_text_layout_differs(processing_class, teacher_processing_class)
        return
    if teacher_vision is None:
        raise ValueError(
            f"The student is a vision-language model but the teacher ({type(teacher).__name__}) has no vision "
            "tower: it must see the same images. Use a vision-language teacher of the same family, or set "
            "cross_modal_distillation=True to let it score the text view of each sample."
        )
    mismatches = (
        _differences("vision_config.", student_config.vision_config, teacher_vision, _VISION_CONFIG_KEYS)
        + _differences("", student_config, teacher_config, _IMAGE_TOKEN_KEYS)
        + _differences(
            "image_processor.",
            processing_class.image_processor,
            getattr(teacher_processing_class, "image_processor", None),
            _IMAGE_PROCESSOR_KEYS,
        )
    )
    if mismatches:
        raise ValueError(
            "The teacher lays image tokens out differently from the student, so it cannot score the student's "
            "inputs: " + "; ".join(mismatches) + ". Use a teacher of the same family and image settings, or set "
            "cross_tokenizer_distillation=True to let its own processor render the images."
        )


def _warn_if_text_layout_differs(processing_class, teacher_processing_class) -> None:
    """The text view is rendered with the student's chat template: warn when the text teacher's own template renders a
    text-only conversation differently (e.g. another default system prompt), since the teacher then reads an
    unfamiliar layout."""
    templates = [getattr(p, "chat_template", None) for p in (processing_class, teacher_processing_class)]
    if None in templates:
        return
    probe = [{"role": "user", "content": "1 + 1?"}]
    try:
        rendered = [
            p.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
            for p in (processing_class, teacher_processing_class)
        ]
    except Exception as error:  # a template may need arguments a plain probe lacks; this check only warns
        logger.warning(f"Could not compare the text teacher's chat template with the student's: {error}")
        return
    if rendered[0] != rendered[1]:
        logger.warning(
            "The text-only teacher's chat template lays a text conversation out differently from the student's "
            f"({rendered[1]!r} vs {rendered[0]!r}); the teacher scores the text view in the student's layout. Give "
            "the student a chat template the teacher knows (`chat_template_path`) if this is not intended."
        )


def check_steering(trainer, student: PreTrainedModel, teacher: PreTrainedModel) -> None:
    """Visual Gradient Steering needs images to remove and plain vocabulary heads it can read."""
    if not trainer._is_vlm:
        raise ValueError(
            "visual_gradient_steering contrasts each sample with its text-only view, so it needs a "
            "vision-language student with its processor; this student is text-only. Set "
            "visual_gradient_steering=False."
        )
    if trainer.tools or trainer.environment_factories is not None:
        raise ValueError(
            "visual_gradient_steering does not support tools or environments (their turns can carry images "
            "the text-only view cannot remove): drop them or set visual_gradient_steering=False."
        )
    if _shards_parameters(trainer):
        raise ValueError(
            "visual_gradient_steering reads the vocabulary heads' weights directly, which FSDP and DeepSpeed "
            "ZeRO-3 shard: use DDP or ZeRO-2, or set visual_gradient_steering=False."
        )
    for name, model in (("student", student), ("teacher", teacher)):
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


def _differences(prefix: str, student, teacher, keys: tuple[str, ...]) -> list[str]:
    """'<prefix><key>: student <value>, teacher <value>' for each setting on which the two disagree."""
    if teacher is None:  # nothing to compare against (e.g. no teacher processor)
        return []
    return [
        f"{prefix}{key}: student {getattr(student, key, None)}, teacher {getattr(teacher, key, None)}"
        for key in keys
        if getattr(student, key, None) != getattr(teacher, key, None)
    ]

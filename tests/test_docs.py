"""The Markdown documentation stays in step with the code: the generated reference pages are current, tables are
well-formed, links resolve, every logged metric is documented, and every row of docs/papers.md's settings table builds
its config. Offline and fast: nothing is fetched and no model is built."""

import ast
import dataclasses
import importlib.util
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from helpers import (
    length_reward,
)

from trl_gndpo import GNDPOConfig, checks
from trl_gndpo import functional as F
from trl_gndpo.trainer import _REWARD_METRICS, no_outcome_reward

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PACKAGE = ROOT / "trl_gndpo"
MARKDOWN_FILES = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
AUTOLINK = re.compile(r"<(https?://[^>\s]+)>")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines of a Markdown file outside fenced code blocks, with inline code spans removed."""
    lines, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append(CODE_SPAN.sub("", line))
    return lines


def links(path: Path) -> list[str]:
    found = []
    for line in prose_lines(path.read_text()):
        found += INLINE_LINK.findall(line) + AUTOLINK.findall(line)
    return found


def github_slug(heading: str) -> str:
    """GitHub's heading anchor: link text kept, lower case, punctuation dropped, each space a hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Anchors of the headings of a Markdown file; repeated slugs get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    result = set()
    lines, in_fence = [], False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence:
            lines.append(line)
    for line in lines:
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def relative_to_root(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_there_are_docs_to_check():
    names = {path.name for path in DOCS.glob("*.md")}
    assert {"index.md", "method.md", "configuration.md", "metrics.md", "guide.md"} <= names


@pytest.mark.parametrize("path", MARKDOWN_FILES, ids=relative_to_root)
def test_links_resolve(path):
    problems = []
    for target in links(path):
        if target.startswith(("http://", "https://")):
            url = urlparse(target)
            if not url.netloc or "." not in url.netloc or any(c.isspace() for c in target):
                problems.append(f"malformed URL {target}")
            continue
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
            problems.append(f"unexpected scheme in {target} (only http(s) and relative links are allowed)")
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            problems.append(f"{target}: {resolved} does not exist")
            continue
        if anchor:
            if resolved.suffix != ".md":
                problems.append(f"{target}: anchor into a non-Markdown file")
            elif anchor not in anchors(resolved):
                problems.append(f"{target}: no heading with anchor #{anchor} in {resolved.name}")
    assert not problems, "\n".join(problems)


def test_index_links_every_page():
    linked = {(DOCS / target.partition("#")[0]).resolve() for target in links(DOCS / "index.md")}
    missing = [path.name for path in DOCS.glob("*.md") if path.name != "index.md" and path.resolve() not in linked]
    assert not missing, f"docs/index.md does not link {missing}"


def load_generator():
    spec = importlib.util.spec_from_file_location("generate", DOCS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["configuration.md", "api.md"])
def test_generated_pages_are_current(name):
    """docs/generate.py writes these pages from the docstrings; a stale page means someone forgot to regenerate."""
    generate = load_generator()
    assert (DOCS / name).read_text() == generate.PAGES[name](), f"docs/{name} is stale: run `python docs/generate.py`"


def test_every_added_or_changed_config_field_has_a_docstring_and_help():
    generate = load_generator()
    names = [field.name for field in generate.own_fields()]
    assert "token_signal_clamp" in names and "loss_type" in names and "learning_rate" not in names
    _, entries = generate.docstring_parts(GNDPOConfig)
    documented = {entry["name"]: entry for entry in entries}
    fields = {field.name: field for field in dataclasses.fields(GNDPOConfig)}
    for name in names:
        assert documented.get(name, {}).get("text"), f"GNDPOConfig's docstring does not document {name}"
        assert fields[name].metadata.get("help"), f"GNDPOConfig.{name} has no `help` metadata"
    text = (DOCS / "configuration.md").read_text()
    assert all(f"| `{name}` |" in text for name in names)


def test_the_generator_refuses_an_undocumented_field(monkeypatch):
    generate = load_generator()
    new = dataclasses.field(default=1.0, metadata={"help": "A new option."})
    new.name, new.type = "new_option", float
    fields = generate.own_fields()
    monkeypatch.setattr(generate, "own_fields", lambda: [*fields, new])
    with pytest.raises(ValueError, match="new_option needs a docstring entry"):
        generate.configuration_page()


def table_blocks(path: Path) -> list[list[str]]:
    """The runs of consecutive prose lines that start with `|`: each must be one Markdown table."""
    blocks, current, in_fence = [], [], False
    for line in path.read_text().splitlines() + [""]:
        if FENCE.match(line):
            in_fence = not in_fence
        if not in_fence and line.lstrip().startswith("|"):
            current.append(line.strip())
        elif current:
            blocks.append(current)
            current = []
    return blocks


def cells(row: str) -> int:
    return len(re.split(r"(?<!\\)\|", row.strip().strip("|")))


@pytest.mark.parametrize("path", MARKDOWN_FILES, ids=relative_to_root)
def test_tables_are_well_formed(path):
    """A header, a separator and rows of the header's width; a blank line inside a table breaks it into rows of
    text."""
    for block in table_blocks(path):
        assert len(block) >= 2 and re.fullmatch(r"\|(\s*:?-{3,}:?\s*\|)+", block[1]), f"not a table: {block[0]}"
        widths = {row: cells(row) for row in block}
        assert all(width == cells(block[0]) for width in widths.values()), f"rows of another width: {block[0]}"


def test_table_check_catches_a_blank_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("| a | b |\n| --- | --- |\n| 1 | 2 |\n\n| 3 | 4 |\n")
    with pytest.raises(AssertionError, match="not a table"):
        test_tables_are_well_formed(page)


def test_every_logged_metric_is_documented():
    source = "".join(path.read_text() for path in PACKAGE.glob("*.py"))
    gndpo_keys = set(re.findall(r"[\"'](gndpo/[A-Za-z0-9_/]+)[\"']", source))
    logged_keys = set(re.findall(r"metrics\[\s*[\"']([^\"']+)[\"']\s*\]", source))
    dropped_keys = {*_REWARD_METRICS, *(f"rewards/{no_outcome_reward.__name__}/{s}" for s in ("mean", "std"))}
    assert len(gndpo_keys) >= 5 and gndpo_keys <= logged_keys  # the regexes find what the trainer logs
    text = (DOCS / "metrics.md").read_text()
    missing = sorted(key for key in gndpo_keys | logged_keys | dropped_keys if f"`{key}`" not in text)
    assert not missing, f"docs/metrics.md does not mention {missing}"


def test_the_citation_is_the_one_the_model_card_uses():
    """docs/index.md quotes the BibTeX entry that `GNDPOTrainer._paper` puts in every model card, character for
    character; a change to one fails here until the other gets it too."""
    from trl_gndpo import GNDPOTrainer

    blocks = re.findall(r"```bibtex\n(.*?)\n```", (DOCS / "index.md").read_text(), re.S)
    assert blocks == [GNDPOTrainer._paper["citation"]]
    assert GNDPOTrainer._paper["id"] in blocks[0] and GNDPOTrainer._paper["title"] in blocks[0]


def test_extras_have_trls_names_and_every_documented_extra_exists():
    """`quantization` and `vllm` as TRL names its extras (`qlora` kept as an alias of `quantization`), and every
    `pip install ...[extra]` in the docs, the README and the examples names an extra that setup.cfg defines."""
    import configparser

    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    extras = {name: value.split() for name, value in setup["options.extras_require"].items()}
    assert extras["quantization"] == extras["qlora"] and any(r.startswith("bitsandbytes") for r in extras["qlora"])
    trl_pin = next(r for r in setup["options"]["install_requires"].split() if r.startswith("trl"))
    assert extras["vllm"] == [trl_pin.replace("trl", "trl[vllm]", 1)]  # the vLLM versions TRL supports
    texts = [p.read_text() for p in MARKDOWN_FILES + sorted((ROOT / "examples").rglob("*.*"))]
    used = {
        e
        for text in texts
        for group in re.findall(r"(?:-e \"?\.|trl-gndpo)\[([\w,]+)\]", text)
        for e in group.split(",")
    }
    assert used and used <= set(extras), used - set(extras)


# ---------------------------------------------------------------------------------------------------------------------
# docs/papers.md: every row's config builds, and its "Needs" column says when reward functions are required


PAPERS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "papers.md"


def paper_rows() -> list[dict]:
    """The rows of the settings table, as {paper, setting, config (keyword arguments), needs, source}."""
    lines = PAPERS_PAGE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Paper | Setting | Config |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        paper, setting, config, needs, source = (cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1]))
        assert config.startswith("`") and config.endswith("`"), f"{setting}: the config is one code span"
        call = ast.parse(f"GNDPOConfig({config.strip('`')})", mode="eval").body
        assert not call.args, f"{setting}: keywords only"
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        rows.append({"paper": paper, "setting": setting, "config": kwargs, "needs": needs, "source": source})
    return rows


def test_the_papers_table_covers_every_named_setting():
    settings = {(row["paper"], row["setting"]) for row in paper_rows()}
    names = " ; ".join(f"{paper}: {setting}" for paper, setting in settings)
    for expected in (
        "GNDPO: GNDPO",
        "GNDPO: OPD baseline",
        "Uni-OPD: Margin shift",
        "Uni-OPD: Margin mask",
        "Uni-OPD: Prompt-group masking",
        "Uni-OPD: Online correctness-aware balancing",
        "ExOPD / G-OPD: Reward extrapolation",
        "ExOPD / G-OPD: Reward correction",
        "ExOPD / G-OPD: Multi-teacher ExOPD",
        "Uni-OPD / G-OPD: Several domain teachers",
        "Uni-OPD: Cross-modal",
        "vOPD: Value baseline, full vocabulary",
        "vOPD: Value baseline, top-k",
        "TIP: Entropy, top 50%",
        "TIP: Entropy-based sampling",
        "TIP: Two axes",
        "TIP: Q3 only",
        "VGS: VGS alone",
        "VGS: GRPO + VGS",
    ):
        assert expected in names, f"docs/papers.md has no row for {expected}"


@pytest.mark.parametrize("row", paper_rows(), ids=lambda row: f"{row['paper']}: {row['setting']}")
def test_each_papers_setting_builds_its_config(row, cpu_config_kwargs):
    config = GNDPOConfig(**cpu_config_kwargs(**row["config"]))
    for name, value in row["config"].items():
        assert getattr(config, name) == value, name
    # the "Needs" column is right about reward functions: the trainer's argument check agrees
    if "reward_funcs" in row["needs"]:
        with pytest.raises(ValueError, match="reward_funcs"):
            checks.check_arguments(config, None, "teacher")
        checks.check_arguments(config, [length_reward], "teacher")
    else:
        checks.check_arguments(config, None, "teacher")
    assert ("a vision-language student and teacher" in row["needs"]) == config.visual_gradient_steering


# ---------------------------------------------------------------------------------------------------------------------
# The papers' settings as the pages and the config's help state them


def row_named(paper: str, setting: str) -> dict:
    (row,) = [r for r in paper_rows() if r["paper"] == paper and r["setting"].startswith(setting)]
    return row


def code_block(page: str, heading: str, language: str) -> str:
    """The first ```language block after `heading` in docs/<page>."""
    text = (DOCS / page).read_text()
    after = text[text.index(f"\n{heading}\n") :]
    return re.search(rf"```{language}\n(.*?)```", after, re.S)[1]


def uniopd_reference_kwargs() -> dict:
    """The keywords of the `GNDPOConfig(...)` call of docs/uniopd.md's reference settings."""
    tree = ast.parse(code_block("uniopd.md", "## Reference settings", "python"))
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "GNDPOConfig")
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords}


def test_uniopd_reference_settings_are_one_config_on_both_pages(cpu_config_kwargs):
    """docs/uniopd.md's example, its command line and docs/papers.md's "Reference recipe" row describe one config,
    which reproduces the reference: the raw log-ratio (no whitening), no effective clamp under the guard."""
    row = row_named("Uni-OPD", "Reference recipe")["config"]
    example = uniopd_reference_kwargs()
    batch = {"output_dir", "num_generations", "per_device_train_batch_size", "gradient_accumulation_steps"}
    from_row = GNDPOConfig(**cpu_config_kwargs(**row))
    from_example = GNDPOConfig(**cpu_config_kwargs(**{k: v for k, v in example.items() if k not in batch}))
    for name in sorted(set(row) | set(example) - batch):
        assert getattr(from_row, name) == getattr(from_example, name), name
    assert from_row.normalization_scope == "none" and from_row.token_signal_clamp == 10.0
    assert from_row.max_abs_log_ratio == 10.0 and from_row.token_signal_clamp >= from_row.max_abs_log_ratio
    assert (from_row.margin_mode, from_row.margin_delta, from_row.balance_ratio) == ("mean", 0.4, 1.0)
    flags = dict(re.findall(r"--(\w+) (\S+)", code_block("uniopd.md", "## Reference settings", "bash")))
    for name, value in row.items():
        assert name in flags and type(value)(flags[name]) == value, f"the command line lacks --{name} {value}"


def test_margin_delta_states_its_units_in_the_help_and_the_generated_page():
    field = GNDPOConfig.__dataclass_fields__["margin_delta"]
    assert "standard deviations" in field.metadata["help"] and "'none'" in field.metadata["help"]
    (line,) = [x for x in (DOCS / "configuration.md").read_text().splitlines() if x.startswith("| `margin_delta`")]
    assert "standard deviations" in line and 'normalization_scope="none"' in line and "token_signal_clamp=10.0" in line


def test_the_papers_group_mask_row_gets_the_papers_margin(cpu_config_kwargs):
    row = row_named("Uni-OPD", "Prompt-group masking")["config"]
    assert "margin_mode" not in row and GNDPOConfig(**cpu_config_kwargs(**row)).margin_mode == "minmax"


def test_vgs_eta_says_which_pair_it_was_measured_for():
    help_text = GNDPOConfig.__dataclass_fields__["vgs_eta"].metadata["help"]
    assert "Qwen3-VL-8B -> 2B" in help_text and "vgs_eta_measure_steps" in help_text
    (line,) = [x for x in (DOCS / "vgs.md").read_text().splitlines() if x.startswith("| `vgs_eta` |")]
    assert "Qwen3-VL-8B -> 2B" in line and "vgs_eta_measure_steps" in line
    assert "one pair" in row_named("VGS", "VGS alone (main results")["source"]


def tip_share(rule: str, ratio: float, n: int = 200_000) -> float:
    """The share of tokens a TIP rule keeps when entropy and divergence are drawn independently."""
    g = torch.Generator().manual_seed(0)
    entropy, divergence = torch.rand(n, generator=g), torch.rand(n, generator=g)
    if rule == "entropy_sampling":
        return ratio  # exactly that share is drawn
    high_entropy = entropy >= torch.quantile(entropy, 1 - ratio)
    high_divergence = divergence >= torch.quantile(divergence, 1 - ratio)
    return F.tip_keep(rule, high_entropy, high_divergence).float().mean().item()


@pytest.mark.parametrize("row", [r for r in paper_rows() if r["paper"] == "TIP"], ids=lambda r: r["setting"])
def test_each_tip_row_states_the_share_it_keeps(row):
    stated = re.search(r"keeps (?:about )?(\d+)%", row["source"])
    assert stated, f"{row['setting']}: say the share of tokens it keeps"
    share = tip_share(row["config"]["token_selection"], row["config"]["token_selection_ratio"])
    assert abs(100 * share - int(stated[1])) <= 1.5, (row["setting"], share)
    # and the paper's bound, where the setting quotes one
    bound = re.search(r"(?:<|under |fewer than )(\d+)%", row["setting"] + " " + row["source"])
    if bound and row["config"]["token_selection"] == "q3":
        assert 100 * share < int(bound[1])


def test_g_opd_rows_aggregate_like_its_code():
    """G-OPD's `token-mean` runs on micro-batches of one sequence in its scripts: sequence-mean-token-mean."""
    rows = [r for r in paper_rows() if r["paper"] == "ExOPD / G-OPD"]
    assert len(rows) == 3 and all(r["config"].get("loss_type") == "grpo" for r in rows)

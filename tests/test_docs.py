"""The Markdown documentation stays in step with the code: the generated reference pages are current, tables are
well-formed, links resolve, and every logged metric is documented. Offline and fast: nothing is fetched and no model is
built."""

import dataclasses
import importlib.util
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest

from trl_gndpo import GNDPOConfig
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

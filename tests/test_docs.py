"""The Markdown documentation stays in step with the code: links resolve, and every config field, logged metric and
error message of the library is documented. Offline and fast: nothing is fetched and no model is built."""

import ast
import dataclasses
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
from trl import GRPOConfig

from trl_gndpo import GNDPOConfig
from trl_gndpo.config import _UNSUPPORTED_GRPO_OPTIONS
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


def default_of(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def test_every_added_or_changed_config_field_is_documented():
    grpo = {field.name: field for field in dataclasses.fields(GRPOConfig)}
    own = [
        field.name
        for field in dataclasses.fields(GNDPOConfig)
        if field.name not in grpo or default_of(field) != default_of(grpo[field.name])
    ]
    assert "token_signal_clamp" in own and "loss_type" in own  # the comparison itself works
    rejected = ["beta", *_UNSUPPORTED_GRPO_OPTIONS]
    text = (DOCS / "configuration.md").read_text()
    missing = [name for name in own + rejected if f"`{name}`" not in text]
    assert not missing, f"docs/configuration.md does not mention {missing}"


def test_every_logged_metric_is_documented():
    source = (PACKAGE / "trainer.py").read_text()
    gndpo_keys = set(re.findall(r"[\"'](gndpo/[A-Za-z0-9_/]+)[\"']", source))
    logged_keys = set(re.findall(r"metrics\[\s*[\"']([^\"']+)[\"']\s*\]", source))
    dropped_keys = {*_REWARD_METRICS, *(f"rewards/{no_outcome_reward.__name__}/{s}" for s in ("mean", "std"))}
    assert len(gndpo_keys) >= 5 and gndpo_keys <= logged_keys  # the regexes find what the trainer logs
    text = (DOCS / "metrics.md").read_text()
    missing = sorted(key for key in gndpo_keys | logged_keys | dropped_keys if f"`{key}`" not in text)
    assert not missing, f"docs/metrics.md does not mention {missing}"


PLACEHOLDER = object()


def message_parts(node: ast.expr) -> list:
    """A message expression as literal strings and PLACEHOLDERs (formatted values, calls, names, ...)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [part for value in node.values for part in message_parts(value)]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return message_parts(node.left) + message_parts(node.right)
    return [PLACEHOLDER]


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def raised_messages() -> list[tuple[str, re.Pattern]]:
    """(location, pattern) of every `raise ValueError(...)` / `raise TypeError(...)` message in the package."""
    messages = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            exc = node.exc if isinstance(node, ast.Raise) else None
            if not (isinstance(exc, ast.Call) and isinstance(exc.func, ast.Name)):
                continue
            if exc.func.id not in ("ValueError", "TypeError"):
                continue
            parts = message_parts(exc.args[0])
            literal = "".join(part for part in parts if part is not PLACEHOLDER)
            location = f"{path.name}:{node.lineno}"
            assert len(literal) >= 10, f"{location}: message has too little literal text to look up in the docs"
            regex = "".join(".+?" if part is PLACEHOLDER else re.escape(re.sub(r"\s+", " ", part)) for part in parts)
            messages.append((location, re.compile(regex)))
    return messages


def troubleshooting_messages() -> list[str]:
    """The ```text blocks of the Troubleshooting section of docs/guide.md, whitespace-normalized."""
    section = re.search(r"^## Troubleshooting\n(.*?)(?=^## |\Z)", (DOCS / "guide.md").read_text(), re.M | re.S)
    assert section, "docs/guide.md has no '## Troubleshooting' section"
    return [normalize(block) for block in re.findall(r"^```text\n(.*?)^```", section.group(1), re.M | re.S)]


def test_every_error_message_is_in_the_troubleshooting_section():
    messages = raised_messages()
    source = "".join(path.read_text() for path in PACKAGE.glob("*.py"))
    assert len(messages) == len(re.findall(r"raise (?:ValueError|TypeError)\(", source))  # none slipped the parser
    documented = troubleshooting_messages()
    missing = [
        location
        for location, pattern in messages
        if not any(pattern.fullmatch(normalize(block)) for block in documented)
    ]
    assert not missing, f"raised but not quoted in docs/guide.md#troubleshooting: {missing}"
    stale = [block for block in documented if not any(pattern.fullmatch(block) for _, pattern in messages)]
    assert not stale, f"quoted in docs/guide.md#troubleshooting but raised nowhere: {stale}"

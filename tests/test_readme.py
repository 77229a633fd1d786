"""The README opens with exactly two commands; CI runs the second one verbatim."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _blocks():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S), text


def test_readme_opens_with_two_commands():
    blocks, text = _blocks()
    assert len(blocks) >= 2
    first_code = text.index("```")
    assert text[:first_code].strip().startswith("# gpuload")
    assert text[:first_code].count("\n") <= 3  # nothing but the title before the commands
    for b in blocks[:2]:
        assert len(b.strip().splitlines()) == 1, "each of the first two blocks is one command"


def test_ci_runs_the_readme_test_command():
    blocks, _ = _blocks()
    ci = (ROOT / ".ci" / "run").read_text()
    assert blocks[1].strip() in ci
    assert "pytest" in blocks[1]

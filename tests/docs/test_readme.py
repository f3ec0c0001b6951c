"""The README's Python examples run as written (on smaller data where a size is a literal)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
SMALLER = {"50_000": "3_000"}  # the synthetic world of the API tour


def python_blocks() -> list[tuple[str, str]]:
    text = README.read_text(encoding="utf-8")
    blocks = []
    for match in re.finditer(r"^## (.+?)$|^```python\n(.*?)^```", text, re.S | re.M):
        if match.group(1):
            section = match.group(1)
        else:
            blocks.append((section, match.group(2)))
    return blocks


BLOCKS = python_blocks()


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 3


def test_readme_examples_run_in_order():
    """The blocks run top to bottom in one namespace, as a reader pastes them into one session
    (later blocks use the imports of earlier ones)."""
    namespace = {"__name__": "readme_example"}
    for section, code in BLOCKS:
        for literal, smaller in SMALLER.items():
            code = code.replace(literal, smaller)
        exec(compile(code, f"README.md ({section})", "exec"), namespace)

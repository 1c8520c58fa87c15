"""The README's code runs: the Python blocks of "Using the pieces" and "Embedding the pieces in another trainer",
executed in order in one namespace, as a reader would paste them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def _python_blocks(section: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.parametrize("title", ["Using the pieces", "Embedding the pieces in another trainer"])
def test_readme_python_blocks_run(title):
    blocks = _python_blocks(_section(title))
    assert blocks, f"no python code under '## {title}'"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, f"README.md ({title})", "exec"), namespace)  # noqa: S102 - the README's own code

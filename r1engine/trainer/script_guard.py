"""Refuse to start training from the unguarded top level of a script.

The reward workers and vLLM's engine start processes with the "spawn" method, which re-imports the main script in
each child. A script that builds the trainer at its top level, outside `if __name__ == "__main__":`, would start a
second trainer in every child; Python then fails inside the workers minutes later with a message about the
bootstrapping phase. Checking the caller's line against the script's syntax tree catches it at once.
"""

from __future__ import annotations

import ast
import sys
import types
from pathlib import Path


def _is_main_test(node: ast.expr) -> bool:
    """`__name__ == "__main__"` (either side)."""
    if not isinstance(node, ast.Compare) or len(node.ops) != 1 or not isinstance(node.ops[0], ast.Eq):
        return False
    sides = [node.left, node.comparators[0]]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    consts = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return len(names) == 1 and len(consts) == 1


def _guarded_lines(source: str) -> list[tuple[int, int]]:
    """Line ranges of the bodies of every top-level `if __name__ == "__main__":` block."""
    ranges = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.If) and _is_main_test(node.test) and node.body:
            ranges.append((node.body[0].lineno, max(getattr(n, "end_lineno", n.lineno) or n.lineno for n in node.body)))
    return ranges


def _top_level_frame(main: types.ModuleType) -> types.FrameType | None:
    """The frame running the main script's top-level code, when it is on the stack."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals is main.__dict__:
            return frame
        frame = frame.f_back
    return None


def check_main_guard(what: str = "GRPOTrainer") -> None:
    """Raise a RuntimeError when `what` is being built from a script's top level outside its
    `if __name__ == "__main__":` block (interactive sessions, `python -c` and functions are fine)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None or not Path(path).is_file():
        return
    frame = _top_level_frame(main)
    if frame is None:
        return
    try:
        ranges = _guarded_lines(Path(path).read_text())
    except (OSError, SyntaxError, UnicodeDecodeError):
        return  # not a readable Python source: nothing to check against
    line = frame.f_lineno
    if any(first <= line <= last for first, last in ranges):
        return
    raise RuntimeError(
        f'{what} is started at the top level of {path} (line {line}) without an `if __name__ == "__main__":` '
        "guard. r1engine's reward workers and vLLM start processes that re-run your script, so put the training "
        'code under `if __name__ == "__main__":` (or in a function called from there).'
    )

"""The compiled extension imports on its own, before torch (it finds libc10/libtorch through its run path)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_extension_imports_before_torch():
    if not list((ROOT / "r1engine").glob("_C*.so")):
        pytest.skip("r1engine._C is not built in this checkout (python setup.py build_ext --inplace)")
    code = "import r1engine._C; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]

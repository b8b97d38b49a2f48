"""The engine runs on tensors alone: importing it loads neither Ray nor fsspec."""

from __future__ import annotations

import subprocess
import sys


def test_engine_imports_neither_ray_nor_fsspec():
    code = "import sys, dgbatch.engine; print(sorted(m for m in ('ray', 'fsspec') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr

"""gridserver.py and the example games pass mypy at the level ``setup.cfg`` sets ([mypy]):
every function of gridserver.py annotated and its body checked, so a game developer's editor
and mypy know the types of everything a module imports from gridserver."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mypy_passes():
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]

"""The package sets torch's OpenMP wait policy itself, so the README's commands are fast as written."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = "import codi_nnsight, os; print(os.environ['OMP_WAIT_POLICY'])"


def _run(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    return subprocess.run(
        [sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_passive_unless_the_user_chose():
    assert _run(PROBE) == "PASSIVE"
    assert _run(PROBE, OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"


def test_the_cli_entry_point_sets_it_before_torch_starts():
    code = (
        "import os, sys; from codi_nnsight.cli import main; "
        "print('torch' in sys.modules, os.environ['OMP_WAIT_POLICY'])"
    )
    assert _run(code) == "False PASSIVE"

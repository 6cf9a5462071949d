"""The documentation site (mkdocs.yml: guides, tutorials index, API reference from the docstrings) builds
with `mkdocs build --strict`, where any warning (a broken link, a docstring mkdocstrings cannot
read) is an error."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:  # a dotted name whose parent package is absent
        return True


MISSING = [m for m in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python") if _missing(m)]


@pytest.mark.skipif(
    bool(MISSING),
    reason=f"the docs build needs the docs extra (pip install -e '.[docs]'); missing: {', '.join(MISSING)}",
)
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(site),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert (site / "index.html").is_file()
    patching = (site / "api" / "patching" / "index.html").read_text(encoding="utf-8")
    assert 'id="codi_nnsight.patching.sweep.patch_sweep"' in patching  # the API page holds the docstrings
    assert "Patch source activations into target runs" in patching
    for name in ("01_where_does_the_model_reason.ipynb", "04_your_own_traces.ipynb"):
        assert (site / "tutorials" / name).is_file()  # linked notebooks are published with the site

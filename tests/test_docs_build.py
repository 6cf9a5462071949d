"""The documentation site (mkdocs.yml: guides, tutorials, API reference from the docstrings) builds
with `mkdocs build --strict`, where any warning (a broken link, a docstring mkdocstrings cannot
read) is an error.

The tutorials (docs/tutorials/*.ipynb, stored without outputs) are executed by the build
(mkdocs-jupyter) and rendered as pages with what the current code prints and draws; every one of
them is in the nav (docs/api/tutorials_nav.py). The test builds from a copy whose notebooks the
session has already executed (tests/conftest.py `executed_tutorial`, shared with
tests/test_tutorials.py), so each runs once per suite.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EXECUTED_TUTORIALS

ROOT = Path(__file__).resolve().parent.parent


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:  # a dotted name whose parent package is absent
        return True


MISSING = [
    m for m in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python", "mkdocs_jupyter", "ipykernel") if _missing(m)
]
TUTORIALS = ROOT / "docs" / "tutorials"
#: Markup nbconvert gives a code cell's outputs, an inline figure, and xarray's HTML view of a Dataset.
OUTPUT_CELL = 'class="jp-OutputArea jp-Cell-outputArea"'
FIGURE = re.compile(r'<img [^>]*src="data:image/png;base64,')
DATASET = 'class="xr-wrap"'


def _not_executed() -> list[str]:
    """The notebooks mkdocs.yml renders without executing them (mkdocs-jupyter's execute_ignore)."""
    import yaml  # an mkdocs dependency: here, not at the top, so the module still skips without the docs extra

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    (jupyter,) = [p["mkdocs-jupyter"] for p in config["plugins"] if isinstance(p, dict) and "mkdocs-jupyter" in p]
    assert jupyter["execute"] is True and jupyter["allow_errors"] is False and jupyter["cache"] is False
    return [Path(p).name for p in jupyter.get("execute_ignore", [])]


NEEDS_DOCS = pytest.mark.skipif(
    bool(MISSING),
    reason=f"the docs build needs the docs extra (pip install -e '.[docs]'); missing: {', '.join(MISSING)}",
)


@NEEDS_DOCS
def test_every_tutorial_is_in_the_nav() -> None:
    """The hooks put every docs/tutorials/*.ipynb under Tutorials, after the index page (no build needed)."""
    from mkdocs.config import load_config

    config = load_config(str(ROOT / "mkdocs.yml"))
    config = config.plugins.on_config(config)  # runs the hooks, docs/api/tutorials_nav.py among them
    (section,) = [e["Tutorials"] for e in config["nav"] if isinstance(e, dict) and "Tutorials" in e]
    assert section[0] == {"Overview": "tutorials/README.md"}
    listed = [e if isinstance(e, str) else next(iter(e.values())) for e in section[1:]]
    assert sorted(listed) == sorted(f"tutorials/{p.name}" for p in TUTORIALS.glob("*.ipynb"))


def _prebuilt_config(tmp_path: Path, executed_tutorial) -> Path:
    """mkdocs.yml and docs/ copied to `tmp_path`, the tutorials replaced by the session's executed
    notebooks and `execute: false`: the site renders exactly the outputs the tutorial tests
    checked, and the suite executes each notebook once, not twice (the build alone took about
    three CPU-minutes). What `mkdocs build` does by itself — execute them — is checked on the
    config (`_not_executed`)."""
    import shutil

    import nbformat

    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    for name in EXECUTED_TUTORIALS:
        nb, _ = executed_tutorial(name)
        nbformat.write(nb, tmp_path / "docs" / "tutorials" / name)
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert text.count("      execute: true\n") == 1 and text.count("          paths: [.]\n") == 1
    text = text.replace("      execute: true\n", "      execute: false\n")
    text = text.replace("          paths: [.]\n", f"          paths: [{json.dumps(str(ROOT))}]\n")
    config = tmp_path / "mkdocs.yml"
    config.write_text(text, encoding="utf-8")
    return config


@NEEDS_DOCS
def test_mkdocs_build_strict(tmp_path: Path, executed_tutorial) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    config = _prebuilt_config(tmp_path / "src", executed_tutorial)
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        cwd=config.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert (site / "index.html").is_file()
    patching = (site / "api" / "patching" / "index.html").read_text(encoding="utf-8")
    assert 'id="codi_nnsight.patching.sweep.patch_sweep"' in patching  # the API page holds the docstrings
    assert "Patch source activations into target runs" in patching
    home = (site / "index.html").read_text(encoding="utf-8")
    not_executed = _not_executed()
    notebooks = sorted(TUTORIALS.glob("*.ipynb"))
    assert len(notebooks) >= 5
    for nb in notebooks:
        assert (site / "tutorials" / nb.stem / nb.name).is_file()  # the notebook itself, to download
        page = site / "tutorials" / nb.stem / "index.html"
        assert page.is_file(), f"{nb.name} is not rendered as a page"
        assert f'href="tutorials/{nb.stem}/"' in home, f"{nb.name} is not in the nav"
        html = page.read_text(encoding="utf-8")
        assert "&quot;cell_type&quot;" not in html and '"cell_type"' not in html, f"{nb.name} shown as raw JSON"
        if nb.name not in not_executed:
            assert OUTPUT_CELL in html, f"{nb.name}: its page has no rendered output"
    first = (site / "tutorials" / "01_where_does_the_model_reason" / "index.html").read_text(encoding="utf-8")
    assert FIGURE.search(first), "tutorial 01's page has no figure"
    assert DATASET in first, "tutorial 01's page does not show its results Dataset"
    assert 'data-mime-type="text/plain"' in first, "tutorial 01's page has no printed output"

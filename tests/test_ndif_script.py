"""scripts/ndif_local.sh without a server: which Python `install` takes, and a half-built venv.

Fast (no venv, no server): the interpreters are stand-ins that report a version, the venv a folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ndif_local.sh"


def _fake_python(folder: Path, version: str) -> Path:
    """An executable that runs `-c CODE` in this Python while claiming to be `version`."""
    major, minor, micro = map(int, version.split("."))
    path = folder / f"python{version}"
    path.write_text(
        "#!/bin/sh\n"
        f'exec {sys.executable} -c \'import sys; sys.version_info = ({major}, {minor}, {micro}, "final", 0); '
        f'sys.version = "{version} (stand-in)"; exec(sys.argv[1])\' "$2"\n'
    )
    path.chmod(0o755)
    return path


def _script(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, env={**os.environ, **env}
    )


@pytest.mark.parametrize(
    ("versions", "chosen"),
    [
        (["3.12.9", "3.12.10", "3.11.7"], "3.12.10"),  # by version, not by name (`ls` puts 3.12.10 first)
        (["3.12.1", "3.13.0"], "3.13.0"),  # the newest, not the first found
        (["3.13.0", "3.14.0", "3.12.1"], "3.13.0"),  # ndif 0.1.2 requires < 3.14
    ],
)
def test_install_takes_the_newest_python_ndif_accepts(tmp_path, versions, chosen):
    fakes = {v: _fake_python(tmp_path, v) for v in versions}
    r = _script("python", NDIF_LOCAL_PYTHON="", NDIF_LOCAL_PYTHON_CANDIDATES=" ".join(map(str, fakes.values())))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{fakes[chosen]} ({chosen})"


def test_no_python_ndif_accepts_is_one_line(tmp_path):
    fake = _fake_python(tmp_path, "3.11.7")
    r = _script("python", NDIF_LOCAL_PYTHON="", NDIF_LOCAL_PYTHON_CANDIDATES=str(fake))
    assert r.returncode == 1
    assert r.stderr.strip() == ("ndif_local: no Python >=3.12,<3.14 found (ndif 0.1.2 needs it): set NDIF_LOCAL_PYTHON")


def test_a_half_built_venv_is_not_taken_for_ready(tmp_path):
    """An interrupted `install` leaves a venv without its stamp: `check` sends the user to `install`."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    r = _script("check", NDIF_LOCAL_VENV=str(venv))
    assert r.returncode == 1
    assert r.stderr.strip() == (f"ndif_local: {venv} is incomplete or built for other versions (run: {SCRIPT} install)")

"""Ray is an optional extra: without it, `--workers` says in one line how to install it, and
`workers=1` (or none) runs in this process as before."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from codi_nnsight.data.pairs import Pair, PairSet, Question
from codi_nnsight.errors import UserError
from codi_nnsight.patching.attribution import attribution_patching
from codi_nnsight.patching.sweep import patch_sweep

ROOT = Path(__file__).resolve().parents[1]


def two_pairs() -> PairSet:
    q = [Question(f"Sam has {a} cats and 4 dogs. How many pets?", a + 4, {}) for a in (3, 5, 6)]
    return PairSet.from_pairs([Pair(0, q[0], q[1]), Pair(1, q[1], q[2])])


WITHOUT_RAY = "import sys; sys.modules['ray'] = None; from codi_nnsight.cli import run; run()"


def test_without_ray_workers_says_how_to_install_it(tiny_models, tmp_path, monkeypatch):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-c", WITHOUT_RAY, "patch", "--workers", "2", "--out", str(tmp_path / "r.nc")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == 'error: --workers 2 needs Ray, an optional extra: pip install -e ".[ray]"'
    monkeypatch.setitem(sys.modules, "ray", None)  # the Python API says the same
    with pytest.raises(UserError, match=re.escape('--workers 2 needs Ray, an optional extra: pip install -e ".[ray]"')):
        attribution_patching(tiny_models["gpt2"], two_pairs(), workers=2)
    assert np.isfinite(patch_sweep(tiny_models["gpt2"], two_pairs(), workers=1)["kl"].values).all()  # 1: here


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"workers": 0}, "--workers 0: expected an int >= 1"),
        ({"workers": True}, "--workers True: expected an int >= 1"),
        ({"ray_address": " "}, "--ray-address ' ': expected a Ray address (host:port, ray://host:port or auto)"),
    ],
)
def test_bad_workers_arguments_are_one_line(tiny_models, kwargs, message):
    with pytest.raises(UserError) as e:
        patch_sweep(tiny_models["gpt2"], two_pairs(), **kwargs)
    assert str(e.value) == message


#: Every command with a batch loop (all shard it over Ray workers).
SHARDED_COMMANDS = [
    "patch",
    "attribute",
    "early-exit",
    "lens",
    "attention",
    "probe",
    "tuned-lens train",
    "transplant",
    "steer",
    "thought-graph",
]


@pytest.mark.parametrize("command", SHARDED_COMMANDS)
def test_every_batch_command_offers_workers_and_refuses_without_ray_before_loading(command, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from codi_nnsight.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)
    # A model spec that does not exist: the refusal must come before any model is loaded.
    args = [*command.split(), "--model", str(tmp_path / "no-model"), "--workers", "3", "--out", str(tmp_path / "o")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    assert (
        r.output.strip().splitlines()[-1] == 'error: --workers 3 needs Ray, an optional extra: pip install -e ".[ray]"'
    )

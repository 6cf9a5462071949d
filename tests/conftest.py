"""Shared fixtures: tiny CODI checkpoints in the official layout, built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spin-waiting threads starve the other core
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

FAMILIES = ("gpt2", "llama", "qwen2")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    """`{family: path of codi.json}`: 2-layer random GPT-2, 3-layer random Llama, 2-layer random Qwen2."""
    from codi_nnsight.testing.tiny import write_tiny_codi

    out = {}
    for family, layers in (("gpt2", 2), ("llama", 3), ("qwen2", 2)):
        d = tmp_path_factory.mktemp(f"tiny-{family}")
        out[family] = str(
            write_tiny_codi(
                d, family=family, n_layers=layers, kv_heads=None if family == "gpt2" else 2, num_latent=3, seed=1
            )
        )
    return out


@pytest.fixture(scope="session")
def tiny_models(tiny_dirs):
    """float64 `CODIModel`s for both families."""
    from codi_nnsight.model.wrapper import load_model

    return {f: load_model(p, dtype="float64", device="cpu") for f, p in tiny_dirs.items()}


@pytest.fixture(scope="session")
def references(tiny_dirs):
    """Independent eager references for both families (float64)."""
    from reference import ReferenceCODI

    return {f: ReferenceCODI(p) for f, p in tiny_dirs.items()}

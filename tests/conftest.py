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


#: Tutorials executed offline on the bundled toy models (05 needs the Hugging Face Hub).
EXECUTED_TUTORIALS = (
    "01_where_does_the_model_reason.ipynb",
    "02_what_does_each_thought_hold.ipynb",
    "03_heads_routes_ablations_attribution.ipynb",
    "04_your_own_traces.ipynb",
    "06_interventions_on_thoughts.ipynb",
)
#: Wall-clock budget of one notebook's cells (kernel start not included); each takes 10-60 s here.
NOTEBOOK_TIMEOUT_S = 240


@pytest.fixture(scope="session")
def executed_tutorial(tmp_path_factory):
    """`executed_tutorial(name)` -> (the notebook executed by nbclient, the files it left in its
    working folder). Each notebook runs once per session: the tutorial tests and the docs build
    (which renders these outputs) share the execution, about three CPU-minutes."""
    import time
    from pathlib import Path

    nbformat = pytest.importorskip("nbformat", reason="executing the tutorials needs nbformat (pip install -e .[test])")
    nbclient = pytest.importorskip("nbclient", reason="executing the tutorials needs nbclient (pip install -e .[test])")
    pytest.importorskip("ipykernel", reason="executing the tutorials needs ipykernel (pip install -e .[test])")
    folder = Path(__file__).resolve().parent.parent / "docs" / "tutorials"
    done: dict[str, tuple] = {}

    def run(name: str):
        if name not in done:
            nb = nbformat.read(folder / name, as_version=4)
            cwd = tmp_path_factory.mktemp(Path(name).stem)
            deadline: list[float] = []

            def remaining(cell: object) -> int:
                """Each cell gets what is left of the notebook's budget."""
                if not deadline:
                    deadline.append(time.monotonic() + NOTEBOOK_TIMEOUT_S)
                return max(1, int(deadline[0] - time.monotonic()))

            client = nbclient.NotebookClient(
                nb, kernel_name="python3", timeout_func=remaining, resources={"metadata": {"path": str(cwd)}}
            )
            client.execute()  # raises CellExecutionError (with the cell and traceback) on any error
            done[name] = (nb, sorted(p.name for p in cwd.iterdir()))
        return done[name]

    return run

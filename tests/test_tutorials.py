"""The tutorial notebooks in docs/tutorials: stored without outputs, their `codi_nnsight` names exist and
belong to the public API, and 1-4 run.

Notebooks 1-4 and 6 are executed with nbclient on the bundled toy models (offline, about a minute or less
each on 2 CPU cores) and must end with a figure. Notebook 5 needs the Hugging Face Hub: it is only
parsed, and every `codi_nnsight` name it uses must exist.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
from pathlib import Path

import pytest
from conftest import EXECUTED_TUTORIALS

TUTORIALS = Path(__file__).resolve().parent.parent / "docs" / "tutorials"
EXECUTED = list(EXECUTED_TUTORIALS)
NOT_EXECUTED = ["05_real_checkpoints.ipynb"]
#: The modules a tutorial may use: the package's public API (a notebook never needs a deep import).
PUBLIC_MODULES = {"codi_nnsight", "codi_nnsight.analysis"}


def _notebook(name: str) -> dict:
    return json.loads((TUTORIALS / name).read_text(encoding="utf-8"))


def _code_cells(nb: dict) -> list[str]:
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def _python(source: str) -> str:
    """A cell's source with IPython magics and shell lines commented out, so `ast` can parse it."""
    return "\n".join("# " + line if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())


def _codi_names(tree: ast.Module) -> set[str]:
    """Dotted `codi_nnsight` names the code imports or reads, e.g. `codi_nnsight.analysis.layer_summary`."""
    imported: dict[str, str] = {}  # local name -> dotted name
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "codi_nnsight":
            for alias in node.names:
                dotted = f"{node.module}.{alias.name}"
                names.add(dotted)
                imported[alias.asname or alias.name] = dotted
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "codi_nnsight":
                    names.add(alias.name)
                    # `import codi_nnsight.x` binds `codi_nnsight`; `import codi_nnsight.x as y` binds y to it
                    imported[alias.asname or "codi_nnsight"] = alias.name if alias.asname else "codi_nnsight"
    for node in ast.walk(tree):  # attributes of imported names: analysis.layer_summary, CODIConfig.from_json, ...
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported:
            names.add(f"{imported[node.value.id]}.{node.attr}")
    return names


def _resolve(dotted: str) -> object | None:
    """The object a dotted name refers to (a module, or an attribute of one), None if there is none."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return None
            obj = getattr(obj, attr)
        return obj
    return None


@pytest.mark.parametrize("name", EXECUTED + NOT_EXECUTED)
def test_notebook_is_stored_without_outputs_and_names_exist(name: str) -> None:
    nb = _notebook(name)
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, f"{name}: no code cells"
    for cell in code:
        assert cell["outputs"] == [] and cell["execution_count"] is None, f"{name}: outputs committed"
    tree = ast.parse("\n\n".join(_python(s) for s in _code_cells(nb)), filename=name)  # SyntaxError fails here
    names = _codi_names(tree)
    assert names, f"{name}: uses no codi_nnsight name"
    missing = sorted(n for n in names if _resolve(n) is None)
    assert not missing, f"{name} uses codi_nnsight names that do not exist: {missing}"


def _is_module(dotted: str) -> bool:
    try:
        return importlib.util.find_spec(dotted) is not None
    except (ImportError, ValueError):  # a prefix is not a package (e.g. a function's attribute)
        return False


@pytest.mark.parametrize("name", EXECUTED + NOT_EXECUTED)
def test_notebook_uses_only_the_public_api(name: str) -> None:
    tree = ast.parse("\n\n".join(_python(s) for s in _code_cells(_notebook(name))), filename=name)
    used = {
        ".".join(n.split(".")[:i]) for n in _codi_names(tree) for i in range(2, len(n.split(".")) + 1)
    }  # every dotted prefix: `analysis.readouts.x` uses the module `analysis.readouts`
    deep = sorted(m for m in used if m not in PUBLIC_MODULES and _is_module(m))
    assert not deep, f"{name} uses modules outside {sorted(PUBLIC_MODULES)}: {deep}"


def test_every_tutorial_is_tested() -> None:
    assert sorted(p.name for p in TUTORIALS.glob("*.ipynb")) == sorted(EXECUTED + NOT_EXECUTED)


@pytest.mark.parametrize("name", EXECUTED)
def test_notebook_runs_and_ends_with_a_figure(name: str, executed_tutorial) -> None:
    nb, left = executed_tutorial(name)  # executed once per session (conftest), in a folder of its own
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), f"{name}: not every cell ran"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{name}: {errors}"
    last = code[-1].outputs
    assert any("image/png" in o.get("data", {}) for o in last), f"{name}: the last cell drew no figure"
    assert left == [], f"{name}: wrote files into its working folder"

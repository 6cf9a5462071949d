"""The notebook API: `codi_nnsight`'s lazy exports (the commands' Python twins) and the `ds.codi` accessor.

The accessor is checked on real Datasets: a 3-pair, 2-layer sweep and two readouts of the bundled
toy model (seconds on 2 cores), against the functions and commands it stands for.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import xarray as xr
from click.testing import CliRunner
from matplotlib.figure import Figure

import codi_nnsight as cn
from codi_nnsight import analysis
from codi_nnsight.errors import UserError


def _python(code: str) -> str:
    """Run `code` in a fresh interpreter (this one has xarray and torch loaded already); its stdout."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


# -- the package's names ------------------------------------------------------------------------
def test_import_loads_no_heavy_library() -> None:
    code = "import sys, json, codi_nnsight; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
    code += "('torch', 'nnsight', 'transformers', 'xarray', 'numpy', 'click'))))"
    assert json.loads(_python(code)) == []


@pytest.mark.parametrize(
    "code",
    [
        "import codi_nnsight, xarray",  # the accessor registers right after xarray's import
        "import xarray, codi_nnsight",  # ... or at once
        # a library probing for xarray first (transformers does) must not use up the registration
        "import importlib.util, codi_nnsight; importlib.util.find_spec('xarray'); import xarray",
        "import codi_nnsight; codi_nnsight.load_model()",  # xarray imported deep inside the package
    ],
)
def test_every_dataset_has_the_accessor_after_import_codi_nnsight(code: str) -> None:
    out = _python(
        f"{code}\nimport xarray as xr\nds = xr.Dataset()\nprint(type(ds.codi).__name__, len(ds._repr_html_()) > 0)"
    )
    assert out.splitlines()[-1] == "CodiAccessor True"  # and xarray still reads its own resources (HTML repr)


def test_every_export_exists_and_dir_lists_them() -> None:
    missing = [name for name in cn.__all__ if not hasattr(cn, name)]
    assert missing == []
    assert set(cn.__all__) <= set(dir(cn))
    assert cn.attribute is cn.patching.attribution.attribution_patching
    assert cn.analysis is analysis
    with pytest.raises(AttributeError, match="^module 'codi_nnsight' has no attribute 'nope'$"):
        cn.nope  # noqa: B018


def test_pairs_default_to_the_bundled_demo_pairs() -> None:
    from codi_nnsight.data.pairs import load_pairs

    assert cn.DEMO_PAIRS.is_file() and cn.DEMO_PAIRS.name == "demo_pairs.json"
    demo = cn.demo_pairs()
    assert len(demo) == 24 and [p.pair_id for p in demo] == [p.pair_id for p in load_pairs(cn.DEMO_PAIRS)]
    assert [p.pair_id for p in cn.load_pairs()] == [p.pair_id for p in demo]
    assert [p.pair_id for p in cn.load_pairs(limit=2)] == [p.pair_id for p in demo][:2]
    assert len(cn.demo_pairs(limit=3)) == 3


def test_load_pairs_names_the_bad_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(UserError, match=f"^{missing}: "):
        cn.load_pairs(missing)


# -- the twins and the accessor on real Datasets ------------------------------------------------
@pytest.fixture(scope="module")
def model():  # noqa: ANN201
    return cn.load_model()


@pytest.fixture(scope="module")
def pairs():  # noqa: ANN201
    return cn.demo_pairs(limit=3)


@pytest.fixture(scope="module")
def sweep(model, pairs) -> xr.Dataset:  # noqa: ANN001
    return cn.patch_sweep(model, pairs, layers=[0, 1])


def test_summary_is_what_analyze_prints(sweep: xr.Dataset, tmp_path: Path) -> None:
    from codi_nnsight.cli import main

    path = tmp_path / "results.nc"
    sweep.to_netcdf(path)
    for metric in ("kl", "logprob_diff"):
        printed = CliRunner().invoke(main, ["analyze", str(path), "--metric", metric])
        assert printed.exit_code == 0, printed.output
        assert sweep.codi.summary(metric) == printed.output.rstrip("\n")
        assert analysis.load(path).codi.summary(metric) == printed.output.rstrip("\n")
    assert sweep.codi.summary() == analysis.format_layer_table(sweep, "kl")


def test_plot_draws_the_layer_means(sweep: xr.Dataset) -> None:
    fig = sweep.codi.plot("kl")
    assert isinstance(fig, Figure)
    means = fig.axes[0].lines[0]  # the mean line; the CI bars follow it
    assert list(means.get_xdata()) == [0, 1]
    assert list(means.get_ydata()) == pytest.approx(sweep["kl"].mean("pair").values, rel=1e-12)


def test_report_writes_the_report_and_refuses_to_overwrite(sweep: xr.Dataset, tmp_path: Path) -> None:
    md = sweep.codi.report(tmp_path / "r", formats=("png",))
    assert md == tmp_path / "r" / "report.md"
    assert md.read_text().startswith("# codi-nnsight report: toy-codi — kl")
    assert (tmp_path / "r" / "report.html").is_file()
    with pytest.raises(UserError, match=f"^{tmp_path / 'r'}: holds a report already; add force=True to replace it$"):
        sweep.codi.report(tmp_path / "r")
    assert sweep.codi.report(tmp_path / "r", metric="logprob_diff", force=True, formats=("png",)) == md
    assert md.read_text().startswith("# codi-nnsight report: toy-codi — logprob_diff")
    # the twin of `report FILE --out DIR`: from a file, the same files
    sweep.to_netcdf(tmp_path / "results.nc")
    cn.report(tmp_path / "results.nc", tmp_path / "f", formats=("png",))
    cn.report(sweep, tmp_path / "m", formats=("png",))
    names = sorted(p.relative_to(tmp_path / "f").as_posix() for p in (tmp_path / "f").rglob("*"))
    assert names == sorted(p.relative_to(tmp_path / "m").as_posix() for p in (tmp_path / "m").rglob("*"))


def test_the_accessor_refuses_a_dataset_that_is_not_a_result() -> None:
    with pytest.raises(UserError, match="^dataset: not a codi-nnsight results file"):
        xr.Dataset().codi.summary()


def test_ablate_is_patch_sweep_with_an_ablation(model, pairs) -> None:  # noqa: ANN001
    got = cn.ablate(model, pairs, "zero", component="latent")
    want = cn.patch_sweep(model, pairs, component="latent", ablation="zero")
    xr.testing.assert_equal(got, want)  # the same kernels on the same data: bit-equal values
    assert got.attrs["ablation"] == "zero"
    with pytest.raises(UserError, match="^ablate\\(\\): ablation=None is a patch, not an ablation; call patch_sweep$"):
        cn.ablate(model, pairs, None)


def test_readouts_have_their_summary_figure_and_report(model, tmp_path: Path) -> None:  # noqa: ANN001
    from codi_nnsight.analysis.readouts import readout_summary

    two = cn.demo_pairs(limit=2)
    for ds in (cn.logit_lens(model, two), cn.attention_readout(model, two)):
        assert ds.codi.summary() == readout_summary(ds)
        assert isinstance(ds.codi.plot(), Figure)
        kind = ds.attrs["codi_nnsight_schema"].split("/")[1]
        ds.to_netcdf(tmp_path / f"{kind}.nc")
        md = cn.report(tmp_path / f"{kind}.nc", tmp_path / kind)
        assert md == tmp_path / kind / "readout.md" and readout_summary(ds) in md.read_text()

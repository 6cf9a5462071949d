"""Several models on one `model` dimension (`codi_nnsight.analysis.compare`, `codi-nnsight compare`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from codi_nnsight.analysis import ResultsError, compare_models, comparison_summary, write_comparison
from codi_nnsight.analysis import load as load_results
from codi_nnsight.model.wrapper import load_model
from codi_nnsight.patching.sweep import patch_sweep
from codi_nnsight.testing.tiny_coconut import write_tiny_coconut

N_PAIRS = 5


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_dirs) -> dict[str, str]:
    """Sweep files of a tiny CODI (gpt2, 2 layers; llama, 3 layers) and a tiny Coconut on the same pairs."""
    from codi_nnsight import demo_pairs

    d = tmp_path_factory.mktemp("compare")
    coconut = write_tiny_coconut(d / "coconut", family="gpt2", n_layers=2, num_latent=3, seed=5)
    pairs = demo_pairs(N_PAIRS)
    out = {}
    for name, spec in (("codi", tiny_dirs["gpt2"]), ("llama", tiny_dirs["llama"]), ("coconut", str(coconut))):
        model = load_model(spec, dtype="float64")
        out[name] = str(d / f"{name}.nc")
        patch_sweep(model, pairs, batch_size=2, out=out[name])
    out["fewer"] = str(d / "fewer.nc")
    patch_sweep(load_model(tiny_dirs["gpt2"], dtype="float64"), pairs.limit(3), batch_size=2, out=out["fewer"])
    return out


def test_models_stack_on_a_model_dimension_with_their_labels(results) -> None:
    a, b = load_results(results["codi"]), load_results(results["coconut"])
    ds = compare_models([results["codi"], results["coconut"]], names=["CODI", "Coconut"])
    assert list(ds["model"].values) == ["CODI", "Coconut"] and ds["kl"].dims[0] == "model"
    np.testing.assert_array_equal(ds["kl"].sel(model="CODI").values, a["kl"].values)
    np.testing.assert_array_equal(ds["kl"].sel(model="Coconut").values, b["kl"].values)
    assert list(ds["latent_method"].values) == ["codi", "coconut"]
    assert ds["checkpoint_sha256"].values.tolist() == [a.attrs["checkpoint_sha256"], b.attrs["checkpoint_sha256"]]
    compared = json.loads(ds.attrs["compared"])
    assert [c["source"] for c in compared] == [results["codi"], results["coconut"]]
    assert ds.attrs["pairs_sha256"] == a.attrs["pairs_sha256"]  # shared attrs stay


def test_other_depths_compare_on_the_union_of_layers(results) -> None:
    ds = compare_models([results["codi"], results["llama"]])
    assert ds["layer"].values.tolist() == [0, 1, 2]
    assert np.isnan(ds["kl"].isel(model=0).sel(layer=2)).all()  # the 2-layer model has no layer 2
    assert np.isfinite(ds["kl"].isel(model=1).sel(layer=2)).all()
    summary = comparison_summary(ds)
    assert list(summary["differences"].values())[0]["n_layers"] == 2  # the layers both have


def test_the_summary_is_the_per_model_layer_mean(results) -> None:
    ds = compare_models([results["codi"], results["coconut"]], names=["A", "B"])
    summary = comparison_summary(ds, "kl")
    for m in ("A", "B"):
        mean = ds["kl"].sel(model=m).mean("pair").values
        s = summary["models"][m]
        assert s["peak_layer"] == int(ds["layer"].values[np.nanargmax(mean)])
        assert s["mean"] == pytest.approx(float(np.nanmax(mean)), rel=1e-12)
        assert s["ci_low"] <= s["mean"] <= s["ci_high"] and s["n"] == N_PAIRS
    # A model against itself: no layer differs.
    same = comparison_summary(compare_models([results["codi"], results["codi"]], names=["x", "y"]))
    assert same["differences"]["y"]["higher_at"] == [] and same["differences"]["y"]["lower_at"] == []


def test_results_that_cannot_be_compared_are_refused_in_one_line(results) -> None:
    with pytest.raises(ResultsError, match=r"^compare: needs at least two results, got 1$"):
        compare_models([results["codi"]])
    with pytest.raises(ResultsError) as err:
        compare_models([results["codi"], results["fewer"]])
    assert str(err.value) == (
        f"compare: {results['fewer']} and {results['codi']} hold different pairs; "
        "the comparison is paired, run both on one pairs file"
    )
    with pytest.raises(ResultsError, match=r"^compare: names must differ, got a, a$"):
        compare_models([results["codi"], results["coconut"]], names=["a", "a"])
    # the same model twice gets numbered labels
    name = load_results(results["codi"]).attrs["model_name"]
    ds = compare_models([results["codi"], results["codi"]])
    assert [str(m) for m in ds["model"].values] == [f"{name} #1", f"{name} #2"]


def test_write_comparison_writes_figure_file_and_finding_first(results, tmp_path) -> None:
    ds = compare_models([results["codi"], results["coconut"]], names=["CODI", "Coconut"])
    md = write_comparison(ds, tmp_path / "cmp")
    text = md.read_text()
    lines = [x for x in text.splitlines() if x.strip()]
    assert lines[0] == "# CODI vs Coconut: kl by layer"
    assert lines[1].startswith("CODI peaks at layer ") and "Coconut peaks at layer " in lines[1]
    assert (tmp_path / "cmp" / "figures" / "profile_kl.png").stat().st_size > 1000
    assert "data:image/png;base64," in (tmp_path / "cmp" / "report.html").read_text()
    back = load_results(tmp_path / "cmp" / "comparison.nc")
    np.testing.assert_array_equal(back["kl"].values, ds["kl"].values)
    assert list(back["model"].values) == ["CODI", "Coconut"]
    with pytest.raises(Exception, match="holds a report already; add --force to replace it"):
        write_comparison(ds, tmp_path / "cmp")


def test_compare_command(results, tmp_path) -> None:
    from codi_nnsight.cli import main

    out = tmp_path / "cli"
    r = CliRunner().invoke(
        main, ["compare", results["codi"], results["coconut"], "--out", str(out), "--name", "CODI", "--name", "Coconut"]
    )
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[-1].startswith(f"wrote {out}/report.md: CODI peaks at layer ")
    r = CliRunner().invoke(main, ["compare", results["codi"], results["fewer"], "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and r.output.strip().startswith("error: compare: ") and "Traceback" not in r.output
    assert not (tmp_path / "x").exists()  # refused before any folder is made

"""The output contract: each command's file says its kind and what its metrics mean; analyze and report read all."""

from __future__ import annotations

import json

import pytest
import xarray as xr
from click.testing import CliRunner

from codi_nnsight.analysis import stats
from codi_nnsight.analysis.io import NOT_SUMMARIZABLE, nan_reason
from codi_nnsight.cli import main
from codi_nnsight.contract import METRICS, RESULT_KINDS, metric_info
from codi_nnsight.data.synthetic import make_synthetic_pairs

COMMANDS = {
    "sweep": (["patch", "--layers", "0-1"], "sweep"),
    "ablation": (["patch", "--layers", "0-1", "--ablation", "zero"], "sweep"),
    "attribution": (["attribute", "--layers", "0-1"], "attribution"),
    "early-exit": (["early-exit"], "early-exit"),
    "lens": (["lens"], "lens"),
    "attention": (["attention"], "attention"),
    "probe": (["probe", "--seeds", "0"], "probe"),
    "transplant": (["transplant", "--thoughts", "0"], "transplant"),
    "steer": (["steer", "--scales", "0,0.5", "--n-random", "1"], "steer"),
    "thought-graph": (["thought-graph"], "thought-graph"),
}


@pytest.fixture(scope="module")
def outputs(tiny_dirs, tmp_path_factory):
    """One output file of every command on the tiny GPT-2 (4 pairs)."""
    root = tmp_path_factory.mktemp("contract")
    pairs = str(make_synthetic_pairs(4, seed=4).save(root / "p.json"))
    files = {}
    for name, (args, _) in COMMANDS.items():
        out = root / f"{name}.nc"
        r = CliRunner().invoke(main, [*args, "--model", tiny_dirs["gpt2"], "--pairs", pairs, "--out", str(out)])
        assert r.exit_code == 0, (name, r.output)
        files[name] = out
    return files


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_file_declares_its_kind_and_metrics(name, outputs):
    with xr.open_dataset(outputs[name]) as ds:
        attrs = dict(ds.attrs)
        held = [m for m in METRICS if m in ds.data_vars]
    kind = RESULT_KINDS[COMMANDS[name][1]]
    assert attrs["result_kind"] == kind.name and attrs["result_dims"] == ",".join(kind.dims)
    declared = json.loads(attrs["metric_info"])
    assert sorted(declared) == sorted(held)
    for m in held:
        assert metric_info(attrs, m) == METRICS[m]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_analyze_and_report_accept_every_kind(name, outputs, tmp_path):
    r = CliRunner().invoke(main, ["analyze", str(outputs[name])])
    assert r.exit_code == 0, r.output
    assert r.output.strip()
    out = tmp_path / "rep"
    r = CliRunner().invoke(main, ["report", str(outputs[name]), "--out", str(out)])
    assert r.exit_code == 0, r.output
    md = next(p for p in (out / "report.md", out / "readout.md") if p.exists())
    assert md.read_text().startswith("# ")
    assert (out / ".codi-report-manifest.json").exists()


def test_early_exit_report_leads_with_the_finding_and_exact_intervals(outputs, tmp_path):
    out = tmp_path / "ee"
    assert CliRunner().invoke(main, ["report", str(outputs["early-exit"]), "--out", str(out)]).exit_code == 0
    text = (out / "report.md").read_text()
    assert text.index("## Finding") < text.index("## Table") < text.index("## Provenance")
    assert "exact 95% CI" in text and (out / "accuracy_by_thoughts.png").exists() and (out / "report.html").exists()


def test_attribution_report_says_it_is_a_first_order_estimate(outputs, tmp_path):
    out = tmp_path / "atp"
    assert CliRunner().invoke(main, ["report", str(outputs["attribution"]), "--out", str(out)]).exit_code == 0
    text = (out / "report.md").read_text()
    assert "first-order (gradient) estimate" in text and "atp_logprob_diff" in text


def test_analysis_keeps_no_tables_of_its_own():
    """Negligible sizes, units, NaN rules and metric classes are the contract's, read through it."""
    for m, info in METRICS.items():
        if info.negligible:
            assert stats.NEGLIGIBLE[m] == (info.negligible, info.negligible_why)
        assert (m in stats.COMPARISON_METRICS) == info.needs_distinct_answers
        assert (m in stats.PROPORTION_METRICS) == info.proportion
        assert nan_reason(m) == info.nan_rule
    assert NOT_SUMMARIZABLE == {"answer": METRICS["answer"].not_summarizable}


def test_a_files_own_declaration_wins_over_the_table():
    attrs = {"metric_info": json.dumps({"kl": {"units": "bits", "negligible": 0.5}})}
    assert metric_info(attrs, "kl").units == "bits" and metric_info(attrs, "kl").negligible == 0.5
    assert metric_info({}, "kl") == METRICS["kl"]


def test_attribute_verify_is_stored_in_the_file_and_its_report(tiny_dirs, outputs, tmp_path):
    pairs = str(outputs["sweep"].parent / "p.json")
    out = tmp_path / "v.nc"
    args = ["attribute", "--layers", "0-1", "--verify", "1", "--model", tiny_dirs["gpt2"], "--pairs", pairs]
    r = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "Checked against the exact sweep on layers" in r.output and "{" not in r.output  # words, not a raw dict
    with xr.open_dataset(out) as ds:
        comparison = json.loads(ds.attrs["verify_comparison"])
        assert set(comparison) == {"resid"} and len(ds.attrs["verify_layers"].split(",")) == 1
    rep = tmp_path / "rep"
    assert CliRunner().invoke(main, ["report", str(out), "--out", str(rep)]).exit_code == 0
    assert "## Check against the exact sweep" in (rep / "report.md").read_text()


@pytest.mark.parametrize(
    "args,site",
    [
        ([], "largest mean KL at layer "),
        (["--positions", "each"], ", thought "),
        (["--component", "latent"], "largest mean KL at the fed-back thought ("),
        (["--component", "latent", "--positions", "each"], "largest mean KL at fed-back thought "),
        (["--component", "resid,attn"], ") ("),
        (["--component", "head"], ", head "),
    ],
)
def test_the_summary_line_names_the_site(args, site, tiny_dirs, outputs, tmp_path):
    pairs = str(outputs["sweep"].parent / "p.json")
    r = CliRunner().invoke(
        main, ["patch", *args, "--model", tiny_dirs["gpt2"], "--pairs", pairs, "--out", str(tmp_path / "r.nc")]
    )
    assert r.exit_code == 0, r.output
    assert site in r.output and "at layer 0 (" not in r.output.replace("layer 0 (resid)", "")


def test_probe_warns_when_classes_are_too_thin(outputs):
    import numpy as np

    from codi_nnsight.readouts.probe import too_few_per_class

    labels = np.array([[1.0, 7.0], [1.0, 8.0], [1.0, np.nan], [1.0, 9.0], [1.0, 10.0], [2.0, 11.0]])
    assert too_few_per_class(["many", "thin"], labels, minimum=2) == (
        "too few questions per class to train a probe for thin (1) (median questions per class; fewer than 2): "
        "accuracies and the chance level are unreliable — use --synthetic N (e.g. 500) for a probe study"
    )
    assert too_few_per_class(["many"], labels[:, :1], minimum=2) == ""
    with xr.open_dataset(outputs["probe"]) as ds:  # 4 pairs: every value is thin
        assert ds.attrs["warning"].startswith("too few questions per class to train a probe for value0")

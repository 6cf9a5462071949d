"""`analyze` / `report` refuse metrics that are not numbers, in one line naming the file (issue 31)."""

from __future__ import annotations

from pathlib import Path

import pytest
from analysis_fixtures import make_results
from click.testing import CliRunner

from codi_nnsight import analysis
from codi_nnsight.analysis.io import check_metric, numeric_metrics
from codi_nnsight.cli import main

NUMERIC = (
    "kl, l2, top1_changed, logit_diff, recovery, p_clean, p_corrupted, logp_clean_answer, logp_corrupted_answer, "
    "logprob_diff, logprob_recovery, flipped"
)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("metrics")
    ds = make_results(8, 3, effect_layer=1)
    ds.to_netcdf(d / "results.nc")
    text = ds.copy(deep=True)
    text["kl"] = text["kl"].astype(str)  # "0.1234…" strings: would be converted and summarised silently
    text.to_netcdf(d / "kl_text.nc")
    return {"ok": d / "results.nc", "text": d / "kl_text.nc"}


def test_kl_stored_as_text_is_refused(files) -> None:
    path = files["text"]
    with pytest.raises(analysis.ResultsError) as err:
        analysis.load(path)
    assert str(err.value) == f"{path}: malformed results file (variable 'kl' is stored as text, not numbers)"
    r = CliRunner().invoke(main, ["analyze", str(path)])
    assert r.exit_code == 2
    assert r.output == f"error: {path}: malformed results file (variable 'kl' is stored as text, not numbers)\n"


def test_numeric_metrics_listing(files) -> None:
    assert ", ".join(numeric_metrics(analysis.load(files["ok"]))) == NUMERIC


def test_a_coordinate_is_not_called_a_malformed_file(files) -> None:
    path = files["ok"]
    expected = (
        f"{path}: 'question_clean' is not a numeric metric of this file (it holds text; numeric metrics: {NUMERIC})"
    )
    r = CliRunner().invoke(main, ["analyze", str(path), "--metric", "question_clean"])
    assert r.exit_code == 2
    assert r.output == f"error: {expected}\n"
    assert "malformed" not in r.output
    ds = analysis.load(path)
    with pytest.raises(analysis.ResultsError) as err:
        analysis.format_layer_table(ds, "question_clean")
    assert str(err.value) == expected
    with pytest.raises(analysis.ResultsError) as err:
        check_metric(ds, "reasoning_steps", str(path))
    assert str(err.value) == (
        f"{path}: 'reasoning_steps' is not a numeric metric of this file (it is a coordinate over (pair); "
        f"numeric metrics: {NUMERIC})"
    )
    with pytest.raises(analysis.ResultsError) as err:
        check_metric(ds, "baseline_logit_diff", str(path))
    assert str(err.value) == (
        f"{path}: 'baseline_logit_diff' is not a numeric metric of this file (it is over (pair), not (pair, layer); "
        f"numeric metrics: {NUMERIC})"
    )
    with pytest.raises(analysis.ResultsError) as err:
        check_metric(ds, "nope", str(path))
    assert str(err.value) == f"{path}: no metric 'nope' (numeric metrics: {NUMERIC})"
    check_metric(ds, "kl", str(path))  # a metric passes
    check_metric(ds, "answer", str(path))  # stats.metric_array explains why `answer` cannot be summarised


def test_report_refuses_a_coordinate_as_metric_before_writing(files, tmp_path) -> None:
    ds = analysis.load(files["ok"])
    with pytest.raises(analysis.ResultsError, match="'question_clean' is not a numeric metric of this file"):
        analysis.write_report(ds, tmp_path / "rep", metric="question_clean")
    assert not (tmp_path / "rep").exists()

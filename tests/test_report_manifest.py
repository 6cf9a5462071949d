"""A report folder may hold the user's own files: the report deletes only what it wrote itself.

Issue 31: ``codi-nnsight report results.nc --out DIR`` into a folder of the user's own files deleted
the ones whose names looked like the report's (``layer_summary_*.csv``, ``recovery_*.csv``,
``figures/layer_means_*``) without ``--force``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from analysis_fixtures import make_results
from click.testing import CliRunner

from codi_nnsight import analysis
from codi_nnsight.analysis.report import MANIFEST_NAME, clear_report_files, prepare_report_dir, read_manifest
from codi_nnsight.cli import main
from codi_nnsight.errors import UserError

#: the user's files seen deleted in issue 31, each named like a file the report writes
USER_FILES = {
    "layer_summary_draft-v1.csv": "layer,mean\n0,1\n",
    "recovery_by_hand.csv": "layer,ratio\n0,0.5\n",
    "figures/layer_means_from_my_paper.png": "not really a png",
    "notes.txt": "mine",
}


def _user_folder(path: Path) -> Path:
    for rel, text in USER_FILES.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    return path


def _assert_user_files_intact(path: Path) -> None:
    for rel, text in USER_FILES.items():
        assert (path / rel).read_text() == text, rel


def _report(out: Path, metric: str = "kl", force: bool = False, **kw) -> Path:
    return analysis.write_report(
        make_results(12, 4, effect_layer=1, **kw), out, metric=metric, n_resamples=50, formats=("png",), force=force
    )


def _not_empty(out: Path, flag: str = "--force") -> str:
    return (
        f"{out}: folder is not empty (figures, layer_summary_draft-v1.csv, notes.txt, …) and holds no codi-nnsight "
        f"report; choose a new or empty folder, or add {flag} to write the report into it (its other files are kept)"
    )


def test_prepare_report_dir_refuses_a_folder_of_user_files(tmp_path) -> None:
    out = _user_folder(tmp_path / "mine")
    with pytest.raises(UserError) as err:
        prepare_report_dir(out, force=False)
    assert str(err.value) == _not_empty(out)
    _assert_user_files_intact(out)
    assert prepare_report_dir(out, force=True) == out  # allowed with force; nothing is deleted
    _assert_user_files_intact(out)
    assert prepare_report_dir(tmp_path / "new" / "rep", force=False).is_dir()  # a new folder is created
    assert prepare_report_dir(tmp_path / "new" / "rep", force=False).is_dir()  # an empty one is fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="^.*file: exists and is a file, expected a folder$"):
        prepare_report_dir(tmp_path / "file", force=True)
    with pytest.raises(UserError, match="^--out: empty path$"):
        prepare_report_dir(" ", force=True)


def test_prepare_report_dir_refuses_an_earlier_report_without_force(tmp_path) -> None:
    out = tmp_path / "rep"
    _report(out)
    with pytest.raises(UserError) as err:
        prepare_report_dir(out, force=False)
    assert str(err.value) == f"{out}: holds a report already; add --force to replace it"
    assert prepare_report_dir(out, force=True) == out
    old = tmp_path / "old"  # a report of a version without the manifest
    old.mkdir()
    (old / "report.md").write_text("# old")
    with pytest.raises(UserError, match="holds a report already; add --force to replace it$"):
        prepare_report_dir(old, force=False)


def test_report_written_into_user_folder_keeps_every_user_file(tmp_path) -> None:
    out = _user_folder(tmp_path / "mine")
    with pytest.raises(UserError) as err:
        _report(out)
    assert str(err.value) == _not_empty(out, "--force (force=True in Python)")
    assert not (out / "report.md").exists() and not (out / MANIFEST_NAME).exists()
    md = _report(out, force=True)
    _assert_user_files_intact(out)
    manifest = read_manifest(out)
    assert manifest is not None and "report.md" in manifest and "figures/layer_means_kl.png" in manifest
    assert not set(manifest) & set(USER_FILES)  # the user's files are never listed as the report's
    # a rewrite (another metric, so other names) removes the old report's files, never the user's
    _report(out, metric="l2")
    _assert_user_files_intact(out)
    assert not (out / "layer_tests_kl.csv").exists() and not (out / "figures" / "layer_means_kl.png").exists()
    assert (out / "layer_tests_l2.csv").exists() and md.exists()
    assert set(read_manifest(out)) == {
        p.relative_to(out).as_posix()
        for p in out.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME and p.relative_to(out).as_posix() not in USER_FILES
    }


def test_clear_deletes_only_unchanged_files_listed_inside_the_folder(tmp_path) -> None:
    out = tmp_path / "rep"
    _report(out, positions=2)
    stale = out / "figures" / "position_heatmap_kl.png"
    edited = out / "layer_tests_kl.csv"
    edited.write_text("the user's edit")  # listed, but no longer what the report wrote: the user's now
    victim = tmp_path / "victim.txt"
    victim.write_text("outside the report folder")
    doc = json.loads((out / MANIFEST_NAME).read_text())
    doc["files"]["../victim.txt"] = "0" * 64  # a hand-edited manifest must not reach outside
    doc["files"][str(victim)] = "0" * 64
    (out / MANIFEST_NAME).write_text(json.dumps(doc))
    removed = clear_report_files(out)
    assert stale in removed and not stale.exists()
    assert edited.read_text() == "the user's edit" and victim.exists()
    assert not (out / MANIFEST_NAME).exists()
    assert clear_report_files(out) == []  # no manifest: nothing to delete
    assert clear_report_files(tmp_path / "missing") == []


def test_corrupt_manifest_deletes_nothing(tmp_path) -> None:
    out = tmp_path / "rep"
    _report(out)
    (out / MANIFEST_NAME).write_text("{not json")
    assert read_manifest(out) is None
    assert clear_report_files(out) == [] and (out / "report.md").exists()


# ------------------------------------------------------------------------------------------- CLI
def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def results_nc(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("res") / "results.nc"
    make_results(12, 4, effect_layer=1).to_netcdf(path)
    return path


# The next test needs the change to cli.py `report` given in the helper's report (it calls
# analysis.report.prepare_report_dir(out, force) and passes force to write_report); until then
# the CLI refuses with write_report's message ("--force (force=True in Python)") and --force fails.
def test_cli_report_into_user_folder(tmp_path, results_nc: Path) -> None:
    out = _user_folder(tmp_path / "mine")
    r = _cli("report", str(results_nc), "--out", str(out))
    assert r.exit_code == 2, r.output
    assert r.output == f"error: {_not_empty(out)}\n"
    _assert_user_files_intact(out)
    assert not (out / "report.md").exists()
    r = _cli("report", str(results_nc), "--out", str(out), "--force")
    assert r.exit_code == 0, r.output
    _assert_user_files_intact(out)
    assert (out / "report.md").exists() and read_manifest(out)
    r = _cli("report", str(results_nc), "--out", str(out))
    assert r.exit_code == 2 and r.output == f"error: {out}: holds a report already; add --force to replace it\n"
    r = _cli("report", str(results_nc), "--out", str(out), "--force", "--metric", "l2")
    assert r.exit_code == 0, r.output
    _assert_user_files_intact(out)
    assert not (out / "layer_tests_kl.csv").exists() and (out / "layer_tests_l2.csv").exists()

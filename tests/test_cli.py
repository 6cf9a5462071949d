"""The command line, end to end: real files in, real files and exit codes out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import xarray as xr
from click.testing import CliRunner

from codi_nnsight.cli import default_pairs, main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "tiny"
    result = CliRunner().invoke(main, ["make-tiny", "--out", str(d), "--num-latent", "3"])
    assert result.exit_code == 0, result.output
    return d


def run(*args, **kw):
    return CliRunner().invoke(main, list(args), catch_exceptions=False, **kw)


def test_patch_analyze_report(tiny_dir, tmp_path):
    out = tmp_path / "r.nc"
    r = run("patch", "--model", str(tiny_dir), "--out", str(out), "--limit", "3", "--layers", "0-1")
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and "sanity checks passed" in r.output
    ds = xr.open_dataset(out)
    assert ds.sizes["pair"] == 3 and list(ds["layer"].values) == [0, 1]
    assert ds["kl"].attrs["units"] == "nats" and ds.attrs["command"].startswith("codi-nnsight patch")
    assert not (tmp_path / "r.nc.partial").exists()
    r = run("analyze", str(out))
    assert r.exit_code == 0 and "layer" in r.output and "95% CI" in r.output
    r = run("report", str(out), "--out", str(tmp_path / "rep"))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rep" / "report.md").stat().st_size > 0
    assert (tmp_path / "rep" / "report.html").stat().st_size > 0


def test_evaluate_writes_answers(tiny_dir, tmp_path):
    out = tmp_path / "answers.json"
    r = run("evaluate", "--model", str(tiny_dir), "--limit", "2", "--max-new-tokens", "4", "--out", str(out))
    assert r.exit_code == 0, r.output
    records = json.loads(out.read_text())
    assert len(records) == 4
    assert set(records[0]) >= {"pair_id", "variant", "question", "answer", "completion", "predicted"}
    assert "accuracy clean" in r.output


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["patch", "--layers", "7", "--out", "x.nc"],
            "error: --layers: layer 7 out of range (model has 2 layers, 0-1)",
        ),
        (["patch", "--layers", "", "--out", "x.nc"], "error: --layers: empty layer list"),
        (["patch", "--pairs", "missing.json", "--out", "x.nc"], "error: missing.json: file not found"),
        (["analyze", "nope.nc"], "error: nope.nc: no such file"),
    ],
)
def test_errors_are_one_line_exit_2(tiny_dir, tmp_path, args, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if args[0] == "patch":
        args = [args[0], "--model", str(tiny_dir), *args[1:]]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[0].startswith(message)
    assert "Traceback" not in r.output


def test_pairs_validate_make_filter(tiny_dir, tmp_path):
    made = tmp_path / "made.json"
    r = run("pairs", "make", "--synthetic", "5", "--out", str(made), "--seed", "3")
    assert r.exit_code == 0 and made.exists()
    r = run("pairs", "validate", str(made))
    assert r.exit_code == 0 and "5" in r.output
    bad = tmp_path / "bad.json"
    bad.write_text('[{"pair_id": 0, "variant": "clean", "question": "q", "answer": "x"}]')
    r = CliRunner().invoke(main, ["pairs", "validate", str(bad)])
    assert r.exit_code == 2
    assert f"{bad}: record 0 (pair_id 0), field 'answer': not a number: \"x\"" in r.output
    # A random model answers nothing: filter refuses to write an empty file, exit 2.
    r = CliRunner().invoke(
        main, ["pairs", "filter", str(made), "--model", str(tiny_dir), "--out", str(tmp_path / "none.json")]
    )
    assert r.exit_code == 2 and "answers no pair correctly in both variants" in r.output
    assert not (tmp_path / "none.json").exists()
    # The bundled toy model answers its own demo pairs: 23 of 24 are kept (measured), with baseline_correct.
    r = run("pairs", "filter", str(default_pairs()), "--out", str(tmp_path / "f.json"))
    assert r.exit_code == 0, r.output
    assert "kept 23 of 24 pairs (dropped — corrupted wrong: 1)" in r.output
    kept = json.loads((tmp_path / "f.json").read_text())
    assert len(kept) == 46 and all(rec["baseline_correct"] is True for rec in kept)


def test_module_entry_point_and_real_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "codi_nnsight", "analyze", str(tmp_path / "none.nc")], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'none.nc'}: no such file"
    assert "Traceback" not in proc.stderr


def test_bundled_demo_pairs_match_data_folder():
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    assert default_pairs().read_bytes() == (repo / "data" / "demo_pairs.json").read_bytes()


def test_pairs_validate_with_model_reports_lengths_and_correctness(tmp_path):
    bundled = str(Path(default_pairs()).parent / "toy-codi")
    r = run("pairs", "validate", str(default_pairs()), "--model", bundled)
    assert r.exit_code == 0, r.output
    assert "token length clean - corrupted: equal for 24/24 pairs, range 0..0" in r.output
    assert "answers correctly: clean 24/24, corrupted 23/24, both 23" in r.output  # measured


def test_pairs_validate_warns_about_pairs_that_cannot_flip(tmp_path):
    f = tmp_path / "p.json"
    pair = {"pair_id": 0, "clean": {"question": "What is 2+2?", "answer": 4}}
    f.write_text(json.dumps([{**pair, "corrupted": {"question": "What is 2 + 2?", "answer": 4}}]))
    r = CliRunner().invoke(main, ["pairs", "validate", str(f)])
    assert r.exit_code == 0
    assert "warning:" in r.output and "answers are equal" in r.output
    # Identical questions cannot differ in anything a patch could carry: refused, not warned about.
    f.write_text(json.dumps([{**pair, "corrupted": {"question": "What is 2+2?", "answer": 5}}]))
    r = CliRunner().invoke(main, ["pairs", "validate", str(f)])
    assert r.exit_code == 2
    assert "(pair_id 0), field 'corrupted.question': clean and corrupted questions are identical" in r.output


def test_outputs_are_never_overwritten_without_force(tiny_dir, tmp_path):
    out = tmp_path / "r.nc"
    assert run("patch", "--model", str(tiny_dir), "--out", str(out), "--limit", "2", "--layers", "0").exit_code == 0
    before = out.read_bytes()
    r = CliRunner().invoke(main, ["patch", "--model", str(tiny_dir), "--out", str(out), "--limit", "1"])
    assert r.exit_code == 2 and r.output.strip() == f"error: {out}: file exists; add --force to overwrite it"
    assert out.read_bytes() == before
    r = run("patch", "--model", str(tiny_dir), "--out", str(out), "--limit", "1", "--layers", "0", "--force")
    assert r.exit_code == 0 and xr.open_dataset(out).sizes["pair"] == 1
    made = tmp_path / "m.json"
    assert run("pairs", "make", "--synthetic", "2", "--out", str(made)).exit_code == 0
    r = CliRunner().invoke(main, ["pairs", "make", "--synthetic", "3", "--out", str(made)])
    assert r.exit_code == 2 and "add --force" in r.output
    answers = tmp_path / "a.json"
    answers.write_text("[]")
    r = CliRunner().invoke(main, ["evaluate", "--model", str(tiny_dir), "--limit", "1", "--out", str(answers)])
    assert r.exit_code == 2 and answers.read_text() == "[]"
    rep = tmp_path / "rep"
    assert run("report", str(out), "--out", str(rep)).exit_code == 0
    r = CliRunner().invoke(main, ["report", str(out), "--out", str(rep)])
    assert r.exit_code == 2 and "holds a report already; add --force" in r.output
    assert run("report", str(out), "--out", str(rep), "--force").exit_code == 0


def test_output_folders_are_checked_before_any_work(tiny_dir, tmp_path):
    # A missing folder is created up front; an unwritable one is refused before the model runs.
    out = tmp_path / "new" / "deeper" / "p.json"
    assert run("pairs", "make", "--synthetic", "2", "--out", str(out)).exit_code == 0 and out.exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = CliRunner().invoke(
        main, ["pairs", "filter", str(out), "--model", str(tiny_dir), "--out", str(blocker / "f.json")]
    )
    assert r.exit_code == 2 and r.output.startswith(f"error: {blocker}: cannot write there")
    r = CliRunner().invoke(main, ["patch", "--out", ""])
    assert r.exit_code == 2 and r.output.strip() == "error: --out: empty path"


def test_check_flag_fails_the_run_when_a_sanity_check_fails(tiny_dir, tmp_path, monkeypatch):
    from codi_nnsight.patching import sanity as patching

    real = patching.sanity_attrs

    def failing(values, dtype):
        attrs = real(values, dtype)
        attrs["sanity_passed"] = 0
        return attrs

    monkeypatch.setattr("codi_nnsight.patching.sweep.sanity_attrs", failing)
    out = tmp_path / "r.nc"
    r = CliRunner().invoke(main, ["patch", "--model", str(tiny_dir), "--out", str(out), "--limit", "1", "--check"])
    assert r.exit_code == 3
    assert "sanity checks FAILED" in r.output and out.exists()
    r = CliRunner().invoke(main, ["patch", "--model", str(tiny_dir), "--out", str(tmp_path / "s.nc"), "--limit", "1"])
    assert r.exit_code == 0


def test_several_components_stack_along_a_component_dim(tiny_dir, tmp_path):
    out = tmp_path / "c.nc"
    r = run("patch", "--model", str(tiny_dir), "--out", str(out), "--limit", "2", "--component", "resid,attn,mlp")
    assert r.exit_code == 0, r.output
    ds = xr.open_dataset(out)
    assert list(ds["component"].values) == ["resid", "attn", "mlp"]
    assert ds["kl"].dims == ("pair", "layer", "component")
    assert not list(tmp_path.glob("c.nc.*"))


def test_hub_checkpoint_location_downloads_through_huggingface_hub(monkeypatch, tmp_path):
    from codi_nnsight.model import checkpoint as codi

    calls = []

    def fake_download(repo, filename, revision=None):
        calls.append((repo, filename, revision))
        path = tmp_path / "model.safetensors"
        path.write_bytes(b"x")
        return str(path)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert codi.fetch_file("hf://zen-E/CODI-gpt2/pytorch_model.bin", "main").name == "model.safetensors"
    assert calls == [("zen-E/CODI-gpt2", "pytorch_model.bin", "main")]


def test_train_toy_command_reports_the_real_training_log(tmp_path, monkeypatch):
    import codi_nnsight.toy.train as train

    real = train.train_toy
    seen = {}

    def small(out_dir, seed=0, baseline=False, workers=1, method="codi"):  # the real training, made tiny
        seen["args"] = (out_dir, seed, baseline, torch.get_num_threads())
        seen["workers"], seen["method"] = workers, method
        shape = dict(n_layers=1, hidden=32, heads=2, intermediate=64, batch_size=4, warmup=1)
        if method == "coconut":
            shape["stage_steps"] = (1,) * 7 + (2,)
        else:
            shape.update(prj_dim=32, num_latent=2, teacher_steps=0)
        return real(
            out_dir,
            seed=seed,
            baseline=baseline,
            workers=1,
            steps=2,
            eval_n=4,
            log_every=1,
            verbose=False,
            method=method,
            **shape,
        )

    monkeypatch.setattr(train, "train_toy", small)
    threads = torch.get_num_threads()
    try:
        r = run("train-toy", "--out", str(tmp_path / "toy"), "--seed", "3")
        assert r.exit_code == 0, r.output
        assert seen["args"] == (str(tmp_path / "toy"), 3, False, 1)  # one thread by default
        log = json.loads((tmp_path / "toy" / "train_log.json").read_text())
        assert r.output.strip() == f"wrote {tmp_path / 'toy'}: {train.describe_training(log)}"
        assert "2 steps in" in r.output and f"held-out accuracy {log['eval']['accuracy']:.1%} on 4 problems" in r.output
        r = run("train-toy", "--out", str(tmp_path / "base"), "--baseline", "--threads", "2")
        assert r.exit_code == 0, r.output
        assert seen["args"] == (str(tmp_path / "base"), 0, True, 2)
        assert json.loads((tmp_path / "base" / "codi.json").read_text())["num_latent"] == 0
        assert "zeroed latents" not in r.output  # no latents to ablate
        assert seen["workers"] == train.ToyConfig().workers  # the shipped model's by default
        r = run("train-toy", "--out", str(tmp_path / "coconut"), "--method", "coconut")
        assert r.exit_code == 0 and seen["method"] == "coconut", r.output
        assert json.loads((tmp_path / "coconut" / "coconut.json").read_text())["method"] == "coconut"
        r = run("train-toy", "--out", str(tmp_path / "cb"), "--method", "coconut", "--baseline")
        assert r.exit_code == 2 and r.output.strip() == (
            "error: --baseline: the no-latent baseline is trained with --method codi (it has no thoughts)"
        )
        r = run("train-toy", "--out", str(tmp_path / "w4"), "--workers", "4")
        assert r.exit_code == 0 and seen["workers"] == 4, r.output
        r = run("train-toy", "--out", str(tmp_path / "w5"), "--workers", "5")
        assert r.exit_code == 2 and r.output.strip() == (
            "error: --workers 5: the batch of 32 problems does not split evenly"
        )
        assert not (tmp_path / "w5").exists()  # refused before any output
    finally:
        torch.set_num_threads(threads)


def test_num_latent_beyond_the_context_is_refused_before_any_work(tiny_dir, tmp_path):
    import shutil

    huge = tmp_path / "huge"
    shutil.copytree(tiny_dir, huge)
    cfg = json.loads((huge / "codi.json").read_text())
    (huge / "codi.json").write_text(json.dumps({**cfg, "num_latent": 1000}))  # under the config cap, past the context
    for cmd in (["evaluate", "--limit", "1"], ["pairs", "validate", str(default_pairs())]):
        args = cmd + ["--model", str(huge)]
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2, r.output
        assert "exceed the model's context of 512" in r.output


def test_ablation_and_early_exit_commands(tmp_path):
    # The bundled toy model: zeroing thought 4 breaks most answers; fewer thoughts, fewer right answers.
    r = run(
        "patch",
        "--out",
        str(tmp_path / "a.nc"),
        "--component",
        "latent",
        "--positions",
        "each",
        "--ablation",
        "zero",
        "--limit",
        "6",
    )
    assert r.exit_code == 0, r.output
    assert "zero ablation: clean answer kept by" in r.output
    ds = xr.open_dataset(tmp_path / "a.nc")
    assert ds.attrs["ablation"] == "zero" and ds.attrs["direction"] == "noise"
    assert float(ds["kept"].mean("pair").min()) < float(ds["kept"].mean("pair").max())
    r = run("early-exit", "--out", str(tmp_path / "e.nc"), "--limit", "4")
    assert r.exit_code == 0, r.output
    ee = xr.open_dataset(tmp_path / "e.nc")
    acc = ee["correct"].mean(("pair", "variant")).values
    assert r.output.strip().startswith(f"wrote {tmp_path / 'e.nc'}: accuracy by number of thoughts 0: ")
    assert acc[-1] == 1.0 and acc[0] < acc[-1]


def test_attribute_command_writes_the_sweep_layout_and_verifies(tmp_path):
    r = run(
        "attribute",
        "--out",
        str(tmp_path / "atp.nc"),
        "--limit",
        "3",
        "--component",
        "latent",
        "--verify",
        "1",
        "--method",
        "atp*",
    )
    assert r.exit_code == 0, r.output
    ds = xr.open_dataset(tmp_path / "atp.nc")
    assert ds.attrs["codi_nnsight_schema"] == "codi-nnsight/attribution/1"
    assert ds["atp_logprob_diff"].dims == ("pair", "layer", "position") and ds.sizes["pair"] == 3
    assert ds["atpstar_logprob_diff"].dims == ds["atp_logprob_diff"].dims
    assert "Checked against the exact sweep on layers 0 (the layers AtP ranks highest): latent: Spearman" in r.output
    assert ds.attrs["verify_layers"] == "0" and "latent" in ds.attrs["verify_comparison"]


def test_newer_sweep_options_run_from_the_command_line(tiny_dir, tmp_path):
    r = run(
        "patch",
        "--model",
        str(tiny_dir),
        "--out",
        str(tmp_path / "f.nc"),
        "--limit",
        "2",
        "--positions",
        "each",
        "--mode",
        "feedback-only",
        "--question-normalization",
        "none",
    )
    assert r.exit_code == 0, r.output
    ds = xr.open_dataset(tmp_path / "f.nc")
    assert ds.attrs["mode"] == "block-thought-attention" and ds.attrs["question_normalization"] == "none"
    assert ds["kl"].dims == ("pair", "layer", "position")
    r = CliRunner().invoke(
        main, ["patch", "--model", str(tiny_dir), "--out", str(tmp_path / "g.nc"), "--mode", "block-thought-attention"]
    )
    assert (
        r.exit_code == 2
        and r.output.strip()
        == "error: --mode block-thought-attention needs --positions each "
        "(it blocks one patched thought's keys and values)"
    )
    r = CliRunner().invoke(
        main, ["patch", "--model", str(tiny_dir), "--out", str(tmp_path / "h.nc"), "--question-normalization", "nfc"]
    )
    assert r.exit_code == 2 and "Invalid value for '--question-normalization'" in r.output


def test_pairs_make_kinds_and_make_tiny_families(tmp_path):
    for kind in ("toy", "wide"):
        r = run("pairs", "make", "--synthetic", "3", "--kind", kind, "--out", str(tmp_path / f"{kind}.json"))
        assert r.exit_code == 0 and r.output.strip() == f"wrote {tmp_path / f'{kind}.json'}: 3 synthetic pairs ({kind})"
    assert (tmp_path / "toy.json").read_text() != (tmp_path / "wide.json").read_text()
    r = run("make-tiny", "--out", str(tmp_path / "q"), "--family", "qwen2", "--num-latent", "2")
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "q" / "base" / "config.json").read_text())
    assert cfg["model_type"] == "qwen2"
    r = run("evaluate", "--model", str(tmp_path / "q"), "--limit", "1", "--max-new-tokens", "2")
    assert r.exit_code == 0 and "accuracy clean" in r.output

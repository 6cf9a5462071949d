"""Issue 31's remaining refusals: one line, exit 2, before any work, nothing overwritten or left behind."""

from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner

from codi_nnsight.cli import main
from codi_nnsight.data.synthetic import make_synthetic_pairs
from codi_nnsight.errors import UserError
from codi_nnsight.patching.sweep import patch_sweep
from codi_nnsight.readouts.attention import attention_readout
from codi_nnsight.readouts.lens import logit_lens


def _cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_make_tiny_never_overwrites_a_model_folder_without_force(tmp_path):
    out = tmp_path / "m"
    assert _cli("make-tiny", "--out", out).exit_code == 0
    before = (out / "codi.json").read_bytes()
    r = _cli("make-tiny", "--out", out, "--seed", "3")
    assert (
        r.exit_code == 2 and r.output == f"error: {out}: folder exists and is not empty; add --force to overwrite it\n"
    )
    assert (out / "codi.json").read_bytes() == before
    assert _cli("make-tiny", "--out", out, "--seed", "3", "--force").exit_code == 0


@pytest.mark.parametrize("component", ["", ","])
def test_attribute_refuses_an_empty_component_list(component, tmp_path):
    r = _cli("attribute", "--component", component, "--out", tmp_path / "a.nc")
    assert r.exit_code == 2
    assert (
        r.output == f"error: --component {component!r}: expected resid, attn, mlp, latent or head (or a comma list)\n"
    )


def test_meta_device_is_refused(tmp_path):
    r = _cli("patch", "--device", "meta", "--out", tmp_path / "r.nc")
    assert r.exit_code == 2
    assert r.output == "error: --device meta: holds no data, so nothing can be computed there (use cpu or cuda)\n"


def test_duplicate_components_are_refused_before_any_file_is_made(tmp_path):
    out = tmp_path / "r.nc"
    r = _cli("patch", "--component", "resid,resid", "--out", out, "--limit", "1")
    assert r.exit_code == 2 and r.output == "error: --component resid,resid: a component is named twice\n"
    assert list(tmp_path.iterdir()) == []


def test_trace_refuses_what_it_cannot_run(tiny_models):
    model = tiny_models["gpt2"]
    with pytest.raises(TypeError, match=r"^CODIModel.trace: expected question text, a list of questions or input_ids"):
        with model.trace(123):
            pass
    with pytest.raises(UserError, match=r"^question 0 is empty: the model needs a question to think about$"):
        with model.trace(""):
            pass
    with pytest.raises(UserError, match=r"^question 0: \d+ tokens \+ 3 latents exceed the model's context of \d+$"):
        with model.trace("two plus two " * 400):
            pass


def test_a_nul_in_a_question_built_in_code_is_refused(tiny_models):
    pair = make_synthetic_pairs(1, seed=4)[0]
    bad = dataclasses.replace(pair, clean=dataclasses.replace(pair.clean, question="Tom has\x00 3 cats."))
    with pytest.raises(UserError) as e:
        patch_sweep(tiny_models["gpt2"], [bad], layers=[0])
    assert str(e.value) == f"pair_id {pair.pair_id}, clean question: contains a NUL character at character 7"


@pytest.mark.parametrize("readout", [logit_lens, attention_readout])
def test_readouts_refuse_questions_past_the_context(readout, tiny_models):
    model = tiny_models["gpt2"]
    pair = make_synthetic_pairs(1, seed=4)[0]
    long = dataclasses.replace(pair, corrupted=dataclasses.replace(pair.corrupted, question="one more " * 400))
    with pytest.raises(UserError, match=r"^pair_id \d+, corrupted question: \d+ tokens \+ \d+ for latents and answer"):
        readout(model, [long])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--layers", "0-9999999999"], "error: --layers: 0-9999999999 out of range (model has 8 layers, 0-7)"),
        (["--max-new-tokens", "1000000000"], "error: 1000000054 tokens for latents and answer (num_latent 6) exceed"),
        (["--max-new-tokens", "600"], "error: 654 tokens for latents and answer (num_latent 6) exceed"),
    ],
)
def test_sizes_past_the_model_are_refused_before_any_work(args, message, tmp_path):
    r = _cli("patch", *args, "--out", tmp_path / "r.nc", "--limit", "1")
    assert r.exit_code == 2 and r.output.startswith(message) and r.output.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_save_tuned_lens_never_overwrites_without_force(tiny_models, tmp_path):
    from codi_nnsight.readouts.tuned import TunedLens, save_tuned_lens

    lens = TunedLens.identity(tiny_models["gpt2"])
    path = save_tuned_lens(lens, tmp_path / "tl")
    before = (path / "tuned_lens.safetensors").read_bytes()
    with pytest.raises(UserError) as e:
        save_tuned_lens(lens, tmp_path / "tl")
    assert str(e.value) == f"{tmp_path / 'tl'}: holds a tuned lens already; add --force (force=True) to overwrite it"
    assert (path / "tuned_lens.safetensors").read_bytes() == before
    assert save_tuned_lens(lens, tmp_path / "tl", force=True) == path


def test_make_tiny_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        r = _cli("make-tiny", "--out", disk / "t")
        assert r.exit_code == 2
        assert r.output == f"error: {disk / 't'}: cannot write the model (No space left on device)\n"
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_the_llama_presets_offline_error_says_the_base_is_gated(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    r = _cli("patch", "--model", "codi-llama3.2-1b", "--out", tmp_path / "r.nc")
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert "meta-llama/Llama-3.2-1B-Instruct is gated on the hub: accept the licence" in r.output

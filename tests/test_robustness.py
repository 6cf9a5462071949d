"""Nothing lost, nothing silent, same numbers every time — end to end through the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from codi_nnsight.data.pairs import load_pairs
from codi_nnsight.data.synthetic import make_synthetic_pairs
from codi_nnsight.errors import UserError
from codi_nnsight.model.wrapper import load_model
from codi_nnsight.patching import sweep as sweep_mod
from codi_nnsight.testing.tiny import write_tiny_codi

TIMING_ATTRS = {"start_time", "end_time", "command"}
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("robust")
    model_json = write_tiny_codi(d / "tiny", family="llama", num_latent=3, seed=2)
    pairs = make_synthetic_pairs(8, seed=5)
    pairs_file = pairs.save(d / "pairs.json")
    return d, model_json, pairs_file


def cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "codi_nnsight", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
        **kw,
    )


def assert_same_results(a: xr.Dataset, b: xr.Dataset) -> None:
    xr.testing.assert_identical(a.drop_attrs(deep=False), b.drop_attrs(deep=False))
    keys = (set(a.attrs) | set(b.attrs)) - TIMING_ATTRS
    assert {k: a.attrs.get(k) for k in keys} == {k: b.attrs.get(k) for k in keys}


def test_interrupted_api_sweep_resumes_to_the_same_file(setup, tmp_path, monkeypatch):
    _, model_json, pairs_file = setup
    model = load_model(model_json, dtype="float32")
    pairs = load_pairs(pairs_file)
    full = sweep_mod.patch_sweep(model, pairs, out=tmp_path / "full.nc", batch_size=2)
    real = sweep_mod.run_batch
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sweep_mod, "run_batch", flaky)
    out = tmp_path / "r.nc"
    with pytest.raises(KeyboardInterrupt):
        sweep_mod.patch_sweep(model, pairs, out=out, batch_size=2)
    assert not out.exists()
    assert len(list((tmp_path / "r.nc.partial").glob("batch-*.nc"))) == 2
    with pytest.raises(UserError, match="a partial run exists; rerun with --resume"):
        sweep_mod.patch_sweep(model, pairs, out=out, batch_size=2)
    monkeypatch.setattr(sweep_mod, "run_batch", real)
    calls["n"] = 0
    resumed = sweep_mod.patch_sweep(model, pairs, out=out, batch_size=2, resume=True)
    assert_same_results(resumed, full)
    assert_same_results(xr.open_dataset(out).load(), xr.open_dataset(tmp_path / "full.nc").load())
    assert not (tmp_path / "r.nc.partial").exists()


def test_resume_refuses_a_different_configuration(setup, tmp_path, monkeypatch):
    _, model_json, pairs_file = setup
    model = load_model(model_json, dtype="float32")
    real = sweep_mod.run_batch
    calls = {"n": 0}

    def interrupted_after_one_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sweep_mod, "run_batch", interrupted_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        sweep_mod.patch_sweep(model, load_pairs(pairs_file), out=tmp_path / "r.nc", mode="recurrent", batch_size=1)
    with pytest.raises(UserError) as e:
        sweep_mod.patch_sweep(model, load_pairs(pairs_file), out=tmp_path / "r.nc", mode="no-feedback", resume=True)
    assert (
        "partial run has a different configuration (mode differ; e.g. mode: stored 'recurrent', "
        "now 'block-all-feedback'); refusing to mix results" in str(e.value)
    )


def test_sigkill_then_resume_equals_uninterrupted_run(setup, tmp_path):
    d, model_json, pairs_file = setup
    common = ["patch", "--model", model_json, "--pairs", pairs_file, "--batch-size", "1", "--seed", "7"]
    ref = cli(*common, "--out", tmp_path / "ref.nc")
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "r.nc"
    proc = subprocess.Popen(
        [sys.executable, "-m", "codi_nnsight", *map(str, common), "--out", str(out)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    partial = tmp_path / "r.nc.partial"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(partial.glob("batch-*.nc"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "killed run must not leave a final file"
    done = len(list(partial.glob("batch-*.nc")))
    assert 1 <= done < 8
    resumed = cli(*common, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_results(xr.open_dataset(out).load(), xr.open_dataset(tmp_path / "ref.nc").load())


def test_sigint_prints_where_results_are_and_exits_130(setup, tmp_path):
    d, model_json, pairs_file = setup
    out = tmp_path / "r.nc"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "codi_nnsight",
            "patch",
            "--model",
            str(model_json),
            "--pairs",
            str(pairs_file),
            "--batch-size",
            "1",
            "--out",
            str(out),
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    partial = tmp_path / "r.nc.partial"
    deadline = time.time() + 120
    while time.time() < deadline and not list(partial.glob("batch-*.nc")) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert f"finished pairs are kept in {out}.partial" in err and "--resume" in err
    assert "Traceback" not in err


def test_two_cpu_runs_are_bitwise_identical(setup, tmp_path):
    _, model_json, pairs_file = setup
    a = cli("patch", "--model", model_json, "--pairs", pairs_file, "--out", tmp_path / "a.nc", "--limit", "3")
    b = cli("patch", "--model", model_json, "--pairs", pairs_file, "--out", tmp_path / "b.nc", "--limit", "3")
    assert a.returncode == 0 and b.returncode == 0
    da, db = xr.open_dataset(tmp_path / "a.nc"), xr.open_dataset(tmp_path / "b.nc")
    for name in da.data_vars:
        assert np.array_equal(da[name].values, db[name].values, equal_nan=True), name
    assert da.attrs["seed"] == 0 and da.attrs["version_torch"] and da.attrs["version_nnsight"]


def test_truncated_results_file_is_named(setup, tmp_path):
    _, model_json, pairs_file = setup
    out = tmp_path / "r.nc"
    assert cli("patch", "--model", model_json, "--pairs", pairs_file, "--out", out, "--limit", "2").returncode == 0
    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    for cmd in (["analyze", out], ["report", out, "--out", tmp_path / "rep"]):
        r = cli(*cmd)
        assert r.returncode == 2
        assert r.stderr.strip() == f"error: {out}: not a readable netCDF file (truncated or corrupt?)"


def test_unwritable_output_keeps_nothing_half_written(setup, tmp_path):
    _, model_json, pairs_file = setup
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        r = cli("patch", "--model", model_json, "--pairs", pairs_file, "--out", locked / "r.nc", "--limit", "2")
        assert r.returncode == 2 and "cannot write" in r.stderr and "Traceback" not in r.stderr
    finally:
        locked.chmod(0o700)


def test_question_too_long_for_context(setup, tmp_path):
    d, model_json, _ = setup
    long_pairs = tmp_path / "long.json"
    q = "What is " + "1 + " * 200 + "1?"
    long_pairs.write_text(
        json.dumps(
            [
                {"pair_id": 3, "variant": "clean", "question": q, "answer": 201},
                {"pair_id": 3, "variant": "corrupted", "question": "What is 2?", "answer": 2},
            ]
        )
    )
    r = cli("patch", "--model", model_json, "--pairs", long_pairs, "--out", tmp_path / "x.nc")
    assert r.returncode == 2
    assert r.stderr.strip().startswith(
        "error: pair_id 3, clean question: 812 tokens + 51 for latents and answer exceed the model's context of 512"
    )


def test_debug_flag_shows_traceback(setup, tmp_path):
    r = cli("--debug", "analyze", tmp_path / "missing.nc")
    assert r.returncode != 0 and "Traceback" in r.stderr
    assert f"Error: {tmp_path / 'missing.nc'}: no such file" in r.stderr  # the exception, not a one-liner


@pytest.fixture
def tiny_disk(tmp_path):
    """A 160 KiB tmpfs, so 'disk full' really happens (needs mount rights; skipped without)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_disk_full_gives_clear_error_and_keeps_finished_pairs(setup, tiny_disk):
    _, model_json, pairs_file = setup
    out = tiny_disk / "r.nc"
    r = cli(
        "patch", "--model", model_json, "--pairs", pairs_file, "--batch-size", "1", "--out", out, "--positions", "each"
    )
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "cannot write (No space left on device)" in line
    assert "Traceback" not in r.stderr
    assert not out.exists()
    kept = list((tiny_disk / "r.nc.partial").glob("batch-*.nc"))
    assert kept, "batches finished before the disk filled must be kept"
    for path in kept:  # every kept batch is complete and readable
        assert xr.open_dataset(path).sizes["pair"] == 1


def _codi_json(setup, tmp_path, **changes) -> Path:
    d, model_json, _ = setup
    data = json.loads(Path(model_json).read_text())
    data.update(changes)
    data["base"] = str(Path(model_json).parent / "base")
    data["checkpoint"] = changes.get("checkpoint", str(Path(model_json).parent / "ckpt" / "model.safetensors"))
    path = tmp_path / "codi.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"num_latents": 6}, "unknown key(s) 'num_latents'"),
        ({"lora_r": "4"}, "key 'lora_r' must be int, got \"4\""),
        ({"checkpoint": "/nonexistent/model.safetensors"}, "checkpoint /nonexistent/model.safetensors: no such file"),
        ({"num_latent": -1}, "codi.json: num_latent must be >= 0, got -1"),
    ],
)
def test_bad_codi_json_via_cli(setup, tmp_path, changes, message):
    path = _codi_json(setup, tmp_path, **changes)
    r = cli("evaluate", "--model", path, "--limit", "1")
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_wrong_family_and_malicious_checkpoint_via_cli(setup, tmp_path):
    gpt2 = write_tiny_codi(tmp_path / "g", family="gpt2", checkpoint_format="bin")
    llama_ckpt = Path(setup[1]).parent / "ckpt" / "model.safetensors"
    path = _codi_json(setup, tmp_path, checkpoint=str(llama_ckpt))
    data = json.loads(path.read_text())
    data["base"] = str(gpt2.parent / "base")
    path.write_text(json.dumps(data))
    r = cli("evaluate", "--model", path, "--limit", "1")
    assert r.returncode == 2 and "checkpoint keys not used by a CODI gpt2 model" in r.stderr

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch /tmp/codi_nnsight_cli_pwned",))

    import torch

    torch.save({"w": Evil()}, gpt2.parent / "ckpt" / "pytorch_model.bin")
    r = cli("evaluate", "--model", gpt2, "--limit", "1")
    assert r.returncode == 2 and "refused to load (weights_only=True)" in r.stderr
    assert not Path("/tmp/codi_nnsight_cli_pwned").exists()


def _word_level_toy(tmp_path: Path) -> Path:
    """The bundled toy model with a word-level tokenizer over its own vocabulary (same ids), whose
    unknown words become `<unk>`: the kind of tokenizer that cannot spell every answer."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from codi_nnsight.model.config import bundled_model_dir

    out = tmp_path / "word-toy"
    shutil.copytree(bundled_model_dir(), out)
    bpe = sorted(AutoTokenizer.from_pretrained(out / "base").get_vocab().items(), key=lambda kv: kv[1])
    vocab: dict[str, int] = {}
    for token, i in bpe:  # "Ġapples" becomes the word "apples" (unless taken); every id is kept
        word = token.removeprefix("Ġ")
        vocab[word if word and word not in vocab else token] = i
    spare = next(t for t, i in vocab.items() if i >= 2 and len(t) == 1 and not t.isalnum())
    vocab["<unk>"] = vocab.pop(spare)  # same size and ids: the model's embeddings still fit
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / "base" / name).unlink(missing_ok=True)
    tok.save_pretrained(out / "base")
    return out / "codi.json"


def test_text_the_tokenizer_would_change_is_refused_by_pair(tmp_path):
    from codi_nnsight.data.pairs import Pair, PairSet, Question

    model = load_model()  # the bundled toy
    good = load_pairs(Path(__file__).resolve().parent.parent / "data" / "demo_pairs.json")[0]
    special = PairSet.from_pairs(
        [Pair(7, Question(good.clean.question + " </s>", good.clean.answer, {}), good.corrupted)]
    )
    with pytest.raises(UserError) as e:
        sweep_mod.patch_sweep(model, special, layers=[0])
    assert (
        str(e.value) == "pair_id 7, clean question: the text contains the special token(s) </s>; remove them "
        "from the question"
    )
    # The toy's byte-level BPE spells any answer; a word-level tokenizer over the same ids cannot.
    unknown = PairSet.from_pairs([Pair(8, good.clean, Question(good.corrupted.question, 150, {}))])
    model.check_text(unknown)
    words = load_model(str(_word_level_toy(tmp_path)))
    with pytest.raises(UserError) as e:
        sweep_mod.patch_sweep(words, unknown, layers=[0])
    assert str(e.value).startswith("pair_id 8, corrupted answer 150: the tokenizer cannot spell it (it becomes <unk>)")


@pytest.mark.parametrize("remote,immediate", [(False, False), ("http://127.0.0.1:9", True)])
def test_ctrl_c_ends_a_remote_wait_at_once_and_a_local_batch_at_its_end(
    setup, tmp_path, monkeypatch, remote, immediate
):
    import os
    import signal
    import time

    _, model_json, pairs_file = setup
    model = load_model(model_json, dtype="float32")
    real_provenance = type(model).provenance  # describe the local model: the target below is unreachable
    monkeypatch.setattr(type(model), "provenance", lambda self, remote, identity=None: real_provenance(self, False))
    seen = {}

    def slow_batch(*args, **kwargs):  # Ctrl-C arrives during a 2 s batch: a remote wait, or a local trace
        seen["start"] = time.monotonic()
        os.kill(os.getpid(), signal.SIGINT)  # delivered here, with the sweep's own handler installed
        time.sleep(2)
        seen["finished"] = True
        raise RuntimeError("batch ran to its end")

    monkeypatch.setattr(sweep_mod, "run_batch", slow_batch)
    with pytest.raises(BaseException) as e:
        sweep_mod.patch_sweep(model, load_pairs(pairs_file), out=tmp_path / "r.nc", batch_size=1, remote=remote)
    if immediate:  # the remote wait ends at the first Ctrl-C
        assert e.type is KeyboardInterrupt and "finished" not in seen
    else:  # a local batch runs to its end first (nnsight's interleaving must not be torn)
        assert e.type is RuntimeError and seen.get("finished")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back

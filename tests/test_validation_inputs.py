"""Bad input refused in one line before any work: absurd codi.json values, a symlinked codi.json,
a base folder without tokenizer, heads that do not divide the width, answers float64 cannot hold."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from codi_nnsight.cli import main
from codi_nnsight.data import gsm8k
from codi_nnsight.data.pairs import validate_pairs
from codi_nnsight.errors import UserError
from codi_nnsight.model.checkpoint import build_codi
from codi_nnsight.model.config import CODIConfig, resolve_model_spec
from codi_nnsight.testing.tiny import write_tiny_codi


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`{family: folder}` of tiny models, written once for this module."""
    root = tmp_path_factory.mktemp("validation")
    return {f: write_tiny_codi(root / f, family=f, n_layers=1).parent for f in ("gpt2", "qwen2")}


def copy_model(src: Path, dst: Path, **changes: object) -> Path:
    """A copy of a tiny model folder with `changes` written into its codi.json."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "codi.json").read_text())
    (dst / "codi.json").write_text(json.dumps({**cfg, **changes}))
    return dst


# ------------------------------------------------------------------------------------------------
# codi.json values that cannot fit any context, and wrong types
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"num_latent": 10**6}, "num_latent must be <= 4096 (each thought takes a context position), got 1000000"),
        ({"num_latent": 4097}, "num_latent must be <= 4096 (each thought takes a context position), got 4097"),
        ({"num_latent": -1}, "num_latent must be >= 0, got -1"),
        (
            {"num_latent": 10**40},
            "num_latent must be <= 4096 (each thought takes a context position), got an integer of 41 digits",
        ),
        ({"num_latent": 6.0}, "key 'num_latent' must be int, got 6.0"),
        ({"num_latent": True}, "key 'num_latent' must be int, got true"),
        ({"lora_r": 10**9}, "lora_r must be <= 65536, got 1000000000"),
        ({"prj_dim": 10**7}, "prj_dim must be <= 65536, got 10000000"),
    ],
)
def test_codi_json_refuses_absurd_values_naming_file_and_field(tmp_path: Path, changes: dict, message: str) -> None:
    path = tmp_path / "codi.json"
    path.write_text(json.dumps({"base": "base", "checkpoint": "ckpt/model.safetensors", **changes}))
    with pytest.raises(UserError) as e:
        CODIConfig.from_json(path)
    assert str(e.value) == f"{path}: {message}"


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"num_latent": 10**6}, "num_latent must be <= 4096 (each thought takes a context position), got 1000000"),
        ({"num_latent": 2.0}, "num_latent must be an integer, got 2.0"),
        ({"num_latent": True}, "num_latent must be an integer, got True"),
        ({"lora_r": "4"}, "lora_r must be an integer, got '4'"),
        ({"lora_alpha": 10**400}, "lora_alpha must be a finite number, got an integer of 401 digits"),
    ],
)
def test_configs_built_in_code_are_checked_too(changes: dict, message: str) -> None:
    with pytest.raises(UserError) as e:
        CODIConfig(base="b", checkpoint="c", **changes)
    assert str(e.value) == f"codi config: {message}"


def test_early_exit_with_a_million_thoughts_is_refused_before_any_work(tiny: dict[str, Path], tmp_path: Path) -> None:
    huge = copy_model(tiny["gpt2"], tmp_path / "huge", num_latent=10**6)
    out = tmp_path / "ee.nc"
    r = CliRunner().invoke(main, ["early-exit", "--model", str(huge), "--out", str(out)])
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines() == [
        f"error: {huge / 'codi.json'}: num_latent must be <= 4096 (each thought takes a context position), got 1000000"
    ]
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# a symlinked codi.json resolves relative paths beside the real file
# ------------------------------------------------------------------------------------------------


def test_symlinked_codi_json_resolves_beside_the_real_file(tiny: dict[str, Path], tmp_path: Path) -> None:
    real = tiny["gpt2"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "codi.json").symlink_to(real / "codi.json")
    for spec in (elsewhere / "codi.json", elsewhere):
        cfg = resolve_model_spec(spec)
        assert cfg.base_path == str((real / "base").resolve())  # before: "base", sent to the hub
        assert cfg.checkpoint_path == str((real / "ckpt" / "model.safetensors").resolve())
    r = CliRunner().invoke(main, ["evaluate", "--model", str(elsewhere), "--limit", "1"])
    assert r.exit_code == 0, r.output


# ------------------------------------------------------------------------------------------------
# a base folder without tokenizer files
# ------------------------------------------------------------------------------------------------


def test_a_base_without_tokenizer_files_is_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    # Qwen2's tokenizer class loads from no files at all: one token, every question encoded as nothing.
    model = copy_model(tiny["qwen2"], tmp_path / "notok")
    for f in (model / "base").glob("tokenizer*"):
        f.unlink()
    base = model / "base"
    message = (
        f"base '{base}': no usable tokenizer (1 token(s), encodes 'The answer is: 18' as 0 tokens); the folder "
        "needs its tokenizer files (tokenizer.json, or vocab.json and merges.txt)"
    )
    with pytest.raises(UserError) as e:
        build_codi(CODIConfig.from_json(model / "codi.json"))
    assert str(e.value) == message
    r = CliRunner().invoke(main, ["evaluate", "--model", str(model), "--limit", "1"])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [f"error: {message}"]


# ------------------------------------------------------------------------------------------------
# attention heads that do not divide the width
# ------------------------------------------------------------------------------------------------


def test_make_tiny_with_a_width_the_heads_do_not_divide(tmp_path: Path) -> None:
    message = "hidden size 9 does not split evenly over 4 attention heads (use a multiple of 4)"
    with pytest.raises(UserError) as e:
        write_tiny_codi(tmp_path / "t", family="qwen2", hidden=9)  # Qwen2 used to build it silently
    assert str(e.value) == message and not (tmp_path / "t").exists()
    for family in ("gpt2", "llama", "qwen2"):
        out = tmp_path / family
        r = CliRunner().invoke(main, ["make-tiny", "--out", str(out), "--hidden", "9", "--family", family])
        assert r.exit_code == 2 and r.output.strip().splitlines() == [f"error: {message}"], r.output
        assert not out.exists()
    with pytest.raises(UserError, match=r"^4 attention heads do not split evenly over 3 key/value heads$"):
        write_tiny_codi(tmp_path / "kv", family="llama", kv_heads=3)


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_a_base_whose_heads_do_not_divide_the_width(tiny: dict[str, Path], tmp_path: Path, family: str) -> None:
    model = copy_model(tiny[family], tmp_path / family)
    config = model / "base" / "config.json"
    data = json.loads(config.read_text())
    data["n_head" if family == "gpt2" else "num_attention_heads"] = 5
    data["num_key_value_heads"] = 5
    config.write_text(json.dumps(data))
    message = f"base '{model / 'base'}': hidden size 32 does not split evenly over 5 attention heads"
    r = CliRunner().invoke(main, ["evaluate", "--model", str(model), "--limit", "1"])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [f"error: {message}"], r.output


# ------------------------------------------------------------------------------------------------
# answers float64 cannot hold exactly
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "written,shown,stored",
    [
        ("12345678901234567891", "12345678901234567891", "12345678901234567168"),
        ('"12345678901234567891"', "12345678901234567891", "12345678901234567168"),
        ('"12,345,678,901,234,567,891"', "12,345,678,901,234,567,891", "12345678901234567168"),
        ("12345678901234567891.0", "12345678901234567891.0", "12345678901234567168"),
        ("9007199254740993", "9007199254740993", "9007199254740992"),
    ],
)
def test_answers_float64_cannot_hold_are_refused(tmp_path: Path, written: str, shown: str, stored: str) -> None:
    path = tmp_path / "p.json"
    path.write_text(
        '[{"pair_id": 0, "variant": "clean", "question": "a?", "answer": 1},'
        f' {{"pair_id": 0, "variant": "corrupted", "question": "b?", "answer": {written}}}]'
    )
    pairset, problems = validate_pairs(path)
    assert pairset is None
    assert [str(p) for p in problems] == [
        f"{path}: record 1 (pair_id 0), field 'answer': {shown} is not exact in float64 (it would be stored as "
        f"{stored})"
    ]


@pytest.mark.parametrize("written", ["9007199254740992", "0.1", '"0.1"', '"1,234.5"', '"2e3"', "-3.25", "1e300"])
def test_answers_float64_holds_as_written_load(tmp_path: Path, written: str) -> None:
    path = tmp_path / "p.json"
    path.write_text(
        '[{"pair_id": 0, "variant": "clean", "question": "a?", "answer": 1},'
        f' {{"pair_id": 0, "variant": "corrupted", "question": "b?", "answer": {written}}}]'
    )
    assert validate_pairs(path)[1] == []


def test_gsm8k_answers_float64_cannot_hold_make_no_pair() -> None:
    big = 12345678901234567891
    record = {
        "question": f"Tom has {big} coins and finds 7 more. How many?",
        "answer": f"<<{big}+7={big + 7}>>\n#### {big + 7}",
    }
    assert gsm8k.make_pair(record, random.Random(0)) == gsm8k.REJECT_INEXACT


def test_make_tiny_refuses_an_absurd_num_latent_before_writing(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        write_tiny_codi(tmp_path / "t", num_latent=10**6)
    assert (
        str(e.value) == "codi config: num_latent must be <= 4096 (each thought takes a context position), got 1000000"
    )
    assert not (tmp_path / "t").exists()

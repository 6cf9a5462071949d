"""Toy CODI training: batch layout, a few-step smoke run, determinism, and the shipped model."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from codi_nnsight.config import bundled_model_dir
from codi_nnsight.train import (
    ANSWER_PREFIX,
    BOS,
    BOT,
    EOS,
    EOT,
    ToyConfig,
    encode,
    eval_problems,
    evaluate_toy,
    is_held_out,
    make_batch,
    sample_problems,
    train_toy,
)

#: A model small enough that a few steps take about a second.
TINY = dict(n_layers=1, hidden=32, heads=2, intermediate=64, prj_dim=32, num_latent=2, batch_size=4,
            warmup=2, lr=1e-2, log_every=4, verbose=False)


def test_byte_encoding_matches_tokenizer() -> None:
    from codi_nnsight.tiny import byte_tokenizer

    q = eval_problems(1, 0)[0].question
    assert byte_tokenizer("llama")(q).input_ids == [BOS, *encode(q)]


def test_batch_targets_and_distill_positions() -> None:
    problems = sample_problems(random.Random(1), 5, ToyConfig(), held_out=False)
    b = make_batch(problems)
    for i, p in enumerate(problems):
        q = [t for t, m in zip(b["q_ids"][i].tolist(), b["q_mask"][i].tolist()) if m]
        assert q == [BOS, *encode(p.question), BOT]
        answer = encode(ANSWER_PREFIX + str(p.answer)) + [EOS]
        student = [t for t in b["s_labels"][i].tolist() if t != -100]
        assert student == answer
        teacher = [t for t in b["t_labels"][i].tolist() if t != -100]
        assert teacher == encode(" ".join(p.steps)) + [EOT] + answer
        # Both distillation positions hold the space whose next token is the first digit.
        s_at, t_at = int(b["s_distill"][i]), int(b["t_distill"][i])
        assert b["s_ids"][i, s_at] == ord(" ") and b["s_ids"][i, s_at + 1] == ord(str(p.answer)[0])
        assert b["t_ids"][i, t_at] == ord(" ") and b["t_ids"][i, t_at + 1] == ord(str(p.answer)[0])


def test_held_out_split_is_disjoint() -> None:
    cfg = ToyConfig()
    assert all(is_held_out(p) for p in eval_problems(30, 12345))
    train = sample_problems(random.Random(0), 30, cfg, held_out=False)
    assert not any(is_held_out(p) for p in train)


def test_train_toy_smoke(tmp_path) -> None:
    from codi_nnsight.inference import generate
    from codi_nnsight.model import load_model

    log = train_toy(tmp_path, seed=0, steps=8, evaluate=False, **TINY)
    for name in ("codi.json", "base/config.json", "ckpt/model.safetensors", "train_log.json"):
        assert (tmp_path / name).is_file()
    totals = [h["total"] for h in log["history"]]
    assert all(math.isfinite(t) for t in totals) and totals[-1] < totals[0]
    cfg = json.loads((tmp_path / "codi.json").read_text())
    assert cfg["lora_r"] == 0 and cfg["num_latent"] == 2 and cfg["name"] == "toy-codi"
    model = load_model(str(tmp_path / "codi.json"), dtype="float32", device="cpu")  # strict loader
    assert model.num_latent == 2
    assert len(generate(model, ["Tom has 3 pens. How many pens does he have now?"], 4)) == 1
    metrics = evaluate_toy(tmp_path, n=4, batch_size=4)
    assert {"accuracy", "zero_latent", "other_latent", "teacher"} <= set(metrics)


def test_train_toy_is_deterministic(tmp_path) -> None:
    paths = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    for path, seed in zip(paths, (3, 3, 4)):
        train_toy(path, seed=seed, steps=2, evaluate=False, **TINY)
    blobs = [(p / "ckpt" / "model.safetensors").read_bytes() for p in paths]
    assert blobs[0] == blobs[1]
    assert blobs[0] != blobs[2]


def test_baseline_has_no_latents(tmp_path) -> None:
    train_toy(tmp_path, seed=0, steps=1, evaluate=False, baseline=True, **TINY)
    assert json.loads((tmp_path / "codi.json").read_text())["num_latent"] == 0


# -- the shipped model ------------------------------------------------------------------------
SHIPPED = bundled_model_dir()


@pytest.fixture(scope="module")
def shipped_metrics() -> dict:
    if not (SHIPPED / "codi.json").exists():
        pytest.skip("the toy model is not installed")
    torch.manual_seed(0)
    return evaluate_toy(SHIPPED, n=60, seed=12345, batch_size=60, teacher=False)


def test_shipped_model_layout() -> None:
    cfg = json.loads((SHIPPED / "codi.json").read_text())
    assert cfg["num_latent"] == 6 and cfg["lora_r"] == 0 and cfg["base"] == "base"
    assert (SHIPPED / "ckpt" / "model.safetensors").stat().st_size < 5_000_000


def test_shipped_model_accuracy(shipped_metrics) -> None:
    # Measured on these 60 held-out problems: see docs/toy-model.md (margin 0.05).
    assert shipped_metrics["accuracy"] >= SHIPPED_ACCURACY - 0.05


def test_shipped_model_latent_ablations(shipped_metrics) -> None:
    acc = shipped_metrics["accuracy"]
    assert acc - shipped_metrics["zero_latent"] >= SHIPPED_ZERO_DROP - 0.05
    assert acc - shipped_metrics["other_latent"] >= SHIPPED_OTHER_DROP - 0.05


# Measured on the first 60 held-out problems (the shipped model misses the targets; these
# pin what it does reach so that a regression is caught): 7/60 right, zeros 3/60, other 5/60.
SHIPPED_ACCURACY = 7 / 60
SHIPPED_ZERO_DROP = 4 / 60
SHIPPED_OTHER_DROP = 2 / 60

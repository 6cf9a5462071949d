"""The toy Coconut recipe (`codi_nnsight.toy.coconut`): its curriculum, and that what it trains is
what the package runs (the training loop equals the inference loop of the saved model)."""

from __future__ import annotations

import random

import pytest
import torch

from codi_nnsight.data.synthetic import make_toy_problem
from codi_nnsight.toy.coconut import (
    END,
    LATENT,
    START,
    CoconutToyConfig,
    build_coconut_toy,
    coconut_logits,
    make_coconut_batch,
    save_coconut_toy,
    stage_at,
    stage_plan,
    stage_starts,
)
from codi_nnsight.toy.train import BASE_VOCAB, _lr_factor, decode, train_toy

TINY = dict(n_layers=2, hidden=32, heads=2, intermediate=64, batch_size=4, warmup=2)


def _problems(n: int, seed: int = 3) -> list:
    rng = random.Random(seed)
    return [make_toy_problem(rng, rng.randint(3, 5), 9, 39, 29) for _ in range(n)]


def test_curriculum_stages_follow_the_official_schedule() -> None:
    # GSM8K's official shape: two thoughts per step, three stages, then every step latent.
    cfg = CoconutToyConfig(c_thought=2, max_latent_stage=3, stage_steps=(5, 4, 3, 2, 6))
    assert cfg.steps == 20 and cfg.num_latent == 6
    assert stage_starts(cfg) == [0, 5, 9, 12, 14]
    assert [stage_at(cfg, s) for s in (0, 4, 5, 13, 14, 19, 25)] == [0, 0, 1, 3, 4, 4, 4]
    # Stage s: s steps replaced by 2s thoughts; the final stage: every step, 6 thoughts.
    assert [stage_plan(cfg, s) for s in range(5)] == [(0, 0), (2, 1), (4, 2), (6, 3), (6, 10_000)]
    # Each stage restarts the warmup (its optimizer is new, as the official reset_optimizer).
    assert [_lr_factor(s, cfg) for s in (0, 5, 9, 12, 14)] == [1 / cfg.warmup] * 5
    with pytest.raises(ValueError, match="stage_steps has 3 entries; stages 0..3 and the final one need 5"):
        CoconutToyConfig(c_thought=2, max_latent_stage=3, stage_steps=(1, 2, 3))
    # The shipped toy: ProsQA's shape (one thought per step, six stages), six thoughts as the toy CODI.
    shipped = CoconutToyConfig()
    assert (shipped.c_thought, shipped.max_latent_stage, shipped.num_latent) == (1, 6, 6)
    assert [stage_plan(shipped, s) for s in (1, 5, 6, 7)] == [(1, 1), (5, 5), (6, 6), (6, 10_000)]


def test_batch_layout_is_coconuts() -> None:
    p = _problems(1)[0]
    b = make_coconut_batch([p], n_skip=1)
    prefix = b["p_ids"][0].tolist()
    assert prefix[-1] == START and decode(prefix[:-1]) == p.question + "\n"
    suffix = b["s_ids"][0].tolist()
    assert suffix[0] == END and LATENT not in suffix
    assert decode(suffix) == "".join(s + "\n" for s in p.steps[1:]) + f"### {p.answer}"
    labels = b["s_labels"][0].tolist()
    assert labels[:-1] == suffix[1:] and labels[-1] == -100  # next-token targets from <|end-latent|> on
    assert (START, END, LATENT) == (BASE_VOCAB, BASE_VOCAB + 1, BASE_VOCAB + 2)


def test_training_loop_equals_the_packages_inference_loop(tmp_path) -> None:
    """The saved toy, loaded through coconut.json (Meta's format), runs the loop it was trained on."""
    from codi_nnsight.model.wrapper import load_model

    cfg = CoconutToyConfig(**TINY)
    module, hf_config = build_coconut_toy(cfg)
    path = save_coconut_toy(module, hf_config, cfg, tmp_path)
    model = load_model(str(path), dtype="float64")
    module.to(torch.float64).eval()
    problems = _problems(3)
    batch = make_coconut_batch(problems, n_skip=10_000)  # the final stage: no steps left
    with torch.no_grad():
        trained = coconut_logits(module, batch, cfg.num_latent)
    for i, p in enumerate(problems):
        suffix = batch["s_ids"][i][batch["s_mask"][i].bool()]
        inputs = model.prepare([p.question])
        with torch.no_grad():
            out = model.codi(**inputs, suffix_ids=suffix[:-1])  # logits after the last fed suffix token
        n = len(suffix) - 1
        assert torch.allclose(out["logits"][0], trained[i, n - 1], atol=1e-9, rtol=0)


def test_train_toy_coconut_saves_a_model_the_package_loads(tmp_path) -> None:
    log = train_toy(
        tmp_path,
        method="coconut",
        seed=0,
        stage_steps=(1, 1, 1, 1, 1, 1, 1, 2),
        evaluate=True,
        eval_n=4,
        workers=1,
        **TINY,
    )
    assert log["config"]["method"] == "coconut" and len(log["history"]) == 1
    ev = log["eval"]
    assert ev["num_latent"] == 6 and set(ev) >= {"accuracy", "zero_latent", "other_latent"}
    assert "teacher" not in ev  # Coconut's last stage has no explicit-CoT mode
    assert (tmp_path / "coconut.json").exists() and (tmp_path / "ckpt" / "checkpoint_6").exists()


def test_train_toy_coconut_is_deterministic(tmp_path) -> None:
    kw = dict(method="coconut", seed=1, stage_steps=(1, 1, 0, 0, 0, 0, 0, 1), evaluate=False, workers=1, **TINY)
    a = train_toy(tmp_path / "a", **kw)
    b = train_toy(tmp_path / "b", **kw)
    assert a["history"][-1]["ce"] == b["history"][-1]["ce"]
    sa = torch.load(tmp_path / "a" / "ckpt" / "checkpoint_6", weights_only=True)
    sb = torch.load(tmp_path / "b" / "ckpt" / "checkpoint_6", weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_unknown_method_is_refused_in_one_line(tmp_path) -> None:
    from codi_nnsight.errors import UserError

    with pytest.raises(UserError, match="^train-toy: no recipe for method 'huginn'; known: codi, coconut$"):
        train_toy(tmp_path, method="huginn")


def test_the_shipped_toy_coconut() -> None:
    """The bundled toy Coconut: its layout, and the figures docs/toy-model.md states, on 60 held-out problems."""
    from codi_nnsight.model.config import bundled_model_dir
    from codi_nnsight.toy.train import evaluate_toy

    shipped = bundled_model_dir("toy-coconut")
    size = sum(p.stat().st_size for p in shipped.rglob("*") if p.is_file())
    assert size < 10 * 2**20 and (shipped / "ckpt" / "checkpoint_6").exists()  # Meta's format
    ev = evaluate_toy(shipped, n=60, seed=12345, batch_size=60)
    assert ev["accuracy"] >= 0.9
    # The documented finding: its answer does not need the thoughts' content (docs/toy-model.md).
    assert ev["zero_latent"] >= 0.8 and ev["other_latent"] >= 0.8 and ev["other_latent_copies_other"] <= 0.05

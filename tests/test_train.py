"""Toy CODI training: batch layout, a few-step smoke run, determinism, and the shipped model."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from codi_nnsight.model.config import bundled_model_dir
from codi_nnsight.model.inference import extract_answer_number
from codi_nnsight.toy.train import (
    ANSWER_PREFIX,
    BOS,
    BOT,
    EOS,
    EOT,
    SINGLE_TOKEN_NUMBERS,
    ToyConfig,
    build_model,
    decode,
    encode,
    eval_problems,
    evaluate_toy,
    is_held_out,
    make_batch,
    sample_problems,
    toy_tokenizer,
    train_toy,
)

#: A model small enough that a few steps take about a second.
TINY = dict(
    n_layers=1,
    hidden=32,
    heads=2,
    intermediate=64,
    prj_dim=32,
    num_latent=2,
    batch_size=4,
    warmup=2,
    lr=1e-2,
    log_every=4,
    verbose=False,
    teacher_steps=0,
    workers=1,  # one process (the default, 2, is tested on its own below)
)


def test_bpe_tokenizer_splits_like_llama3() -> None:
    tok = toy_tokenizer()
    # a whitespace-only token before every number, each number 0-99 one token, words keep their space
    assert tok.convert_ids_to_tokens(encode("The answer is: 18")) == ["The", "Ġanswer", "Ġis", ":", "Ġ", "18"]
    assert tok.convert_ids_to_tokens(encode("17-3=14 14+19=33")) == [
        "17", "-", "3", "=", "14", "Ġ", "14", "+", "19", "=", "33"
    ]  # fmt: skip
    assert all(len(encode(str(n))) == 1 for n in SINGLE_TOKEN_NUMBERS)
    # longer numbers are split in groups of three digits before BPE, as in Llama 3
    assert [t for t, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("1234")] == ["123", "4"]
    # a byte-level BPE: a word it has rarely seen is split, and any text encodes and decodes back
    assert len(encode(" Xylophone")) > 1
    for text in ("naïve 😀 text\n\twith tabs", "Then Sam buys 17 more pens."):
        assert tok.decode(encode(text)) == decode(encode(text)) == text


def test_encoding_matches_tokenizer() -> None:
    tok = toy_tokenizer()
    for p in eval_problems(20, 0):
        assert tok(p.question).input_ids == [BOS, *encode(p.question)]
        text = f"{ANSWER_PREFIX}{p.answer}"
        ids = encode(text)
        assert ids == encode(ANSWER_PREFIX) + encode(str(p.answer))  # prompt, whitespace token, one answer token
        assert tok.decode(ids) == decode(ids) == text
        assert extract_answer_number(tok.decode(ids)) == p.answer


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
        # Both distillation positions hold the whitespace token whose next token is the answer.
        s_at, t_at = int(b["s_distill"][i]), int(b["t_distill"][i])
        answer_id = encode(str(p.answer))[0]
        space = encode(" ")[0]  # the whitespace-only token before the number
        assert b["s_ids"][i, s_at] == space and b["s_ids"][i, s_at + 1] == answer_id
        assert b["t_ids"][i, t_at] == space and b["t_ids"][i, t_at + 1] == answer_id


def test_toy_problems_and_pairs_stay_in_range() -> None:
    from codi_nnsight.data.synthetic import make_toy_pairs, make_toy_problems

    for p in make_toy_problems(200, seed=1, steps=(2, 5)):
        assert 2 <= len(p.steps) <= 5 and len(set(p.numbers)) == len(p.numbers)
        assert 2 <= p.numbers[0] <= 29 and all(2 <= k <= 9 for k in p.numbers[1:])
        assert all(0 <= int(s.split("=")[1]) <= 39 for s in p.steps)
    for pair in make_toy_pairs(30, seed=2):
        c, k = pair.clean, pair.corrupted
        assert c.answer != k.answer and 0 <= k.answer <= 39
        assert len(encode(c.question)) == len(encode(k.question))  # one number token differs
        assert sum(a != b for a, b in zip(encode(c.question), encode(k.question))) == 1


def test_held_out_split_is_disjoint() -> None:
    cfg = ToyConfig()
    assert all(is_held_out(p) for p in eval_problems(30, 12345))
    train = sample_problems(random.Random(0), 30, cfg, held_out=False)
    assert not any(is_held_out(p) for p in train)


def test_train_toy_smoke(tmp_path) -> None:
    from codi_nnsight.model.inference import generate
    from codi_nnsight.model.wrapper import load_model

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
    for path, seed in zip(paths, (3, 3, 4)):  # one teacher-only step, then two CODI steps
        log = train_toy(path, seed=seed, steps=3, evaluate=False, **{**TINY, "teacher_steps": 1})
        assert "student_ce" in log["history"][-1]
    blobs = [(p / "ckpt" / "model.safetensors").read_bytes() for p in paths]
    assert blobs[0] == blobs[1]
    assert blobs[0] != blobs[2]


def test_two_workers_train_on_the_whole_batch_together(tmp_path) -> None:
    # Two processes each take half of every batch and average their gradients: deterministic, and
    # close to one process training on the whole batch (only the per-half loss means differ).
    from safetensors.torch import load_file

    kw = {**TINY, "teacher_steps": 1, "batch_size": 8}
    train_toy(tmp_path / "one", seed=0, steps=4, evaluate=False, **kw)
    two = {**kw, "workers": 2}
    log = train_toy(tmp_path / "two", seed=0, steps=4, evaluate=True, eval_n=4, **two)  # rank 0 evaluates last
    assert log["config"]["workers"] == 2 and "student_ce" in log["history"][-1] and log["eval"]["n"] == 4
    train_toy(tmp_path / "again", seed=0, steps=4, evaluate=False, **two)
    weights = {n: load_file(tmp_path / n / "ckpt" / "model.safetensors") for n in ("one", "two", "again")}
    assert all(torch.equal(weights["two"][k], weights["again"][k]) for k in weights["two"])
    start = build_model(ToyConfig(seed=0, **{k: v for k, v in kw.items() if k in ToyConfig.__dataclass_fields__}))[0]
    initial = {"codi." + k: v for k, v in start.lm.state_dict().items()}  # the checkpoint's names
    initial.update({"prj." + k: v for k, v in start.prj.state_dict().items()})

    def dist(a: dict, b: dict) -> float:
        return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a if k in b))

    moved = dist(weights["one"], initial)
    assert moved > 0 and dist(weights["two"], weights["one"]) < 0.1 * moved
    with pytest.raises(ValueError, match="batch_size 8 does not split evenly over 3 workers"):
        train_toy(tmp_path / "three", seed=0, steps=1, evaluate=False, **{**kw, "workers": 3})


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
    assert (SHIPPED / "ckpt" / "model.safetensors").stat().st_size <= 10_000_000
    base = json.loads((SHIPPED / "base" / "config.json").read_text())
    assert base["model_type"] == "llama" and base["num_hidden_layers"] == 8


def test_shipped_tokenizer_is_the_toy_bpe() -> None:
    from transformers import AutoTokenizer

    shipped = AutoTokenizer.from_pretrained(SHIPPED / "base")
    assert shipped.get_vocab() == toy_tokenizer().get_vocab()
    for p in eval_problems(10, 0):
        assert shipped(p.question).input_ids == [BOS, *encode(p.question)]


def test_shipped_model_accuracy(shipped_metrics) -> None:
    # Measured on these 60 held-out problems: see docs/toy-model.md (margin 0.05).
    assert shipped_metrics["accuracy"] >= max(0.9, SHIPPED_ACCURACY - 0.05)


def test_shipped_model_latent_ablations(shipped_metrics) -> None:
    acc = shipped_metrics["accuracy"]
    assert acc - shipped_metrics["zero_latent"] >= max(0.4, SHIPPED_ZERO_DROP - 0.05)
    assert acc - shipped_metrics["other_latent"] >= max(0.4, SHIPPED_OTHER_DROP - 0.05)
    assert shipped_metrics["other_latent_copies_other"] >= 0.8  # the latents carry the answer


def test_demo_pairs_patching_flips_answers() -> None:
    """The default `codi-nnsight patch` (recurrent resid sweep) on the bundled demo pairs moves
    the corrupted run to the clean answer for a non-zero share of pairs at some layer."""
    from codi_nnsight.cli import default_pairs
    from codi_nnsight.data.pairs import load_pairs
    from codi_nnsight.model.wrapper import load_model
    from codi_nnsight.patching.sweep import patch_sweep

    if not (SHIPPED / "codi.json").exists():
        pytest.skip("the toy model is not installed")
    ds = patch_sweep(load_model(), load_pairs(default_pairs()))
    best = float(ds["flipped"].mean("pair").max())
    assert best >= SHIPPED_FLIPPED - 0.05 and best > 0


# Measured on the first 60 held-out problems with the shipped model (see docs/toy-model.md):
# 60/60 right, 1/60 with zero latents, 0/60 with another problem's latents (55/60 of those give
# the other problem's answer). The regression floors: accuracy >= 0.9, ablation drops >= 0.4.
SHIPPED_ACCURACY = 60 / 60
SHIPPED_ZERO_DROP = 59 / 60
SHIPPED_OTHER_DROP = 60 / 60
#: Best share of demo pairs flipped by the default sweep (resid, all positions): 24/24 at layers 3-7.
SHIPPED_FLIPPED = 24 / 24


def _descendants(pid: int) -> set[int]:
    """Process ids below `pid`, from /proc (Linux)."""
    import os
    from pathlib import Path

    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended meanwhile
            continue
        fields = text.rsplit(")", 1)[1].split()
        parent[int(stat.parent.name)] = int(fields[1])
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        kids = {c for c, pp in parent.items() if pp == p}
        out |= kids
        todo += list(kids)
    return out - {os.getpid()}


def _alive(pid: int) -> bool:
    from pathlib import Path

    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_to_the_main_process_alone_leaves_no_worker(tmp_path, sig) -> None:
    # A job scheduler signals the main process only (`kill -INT PID`): before, it printed
    # "interrupted" while it and both workers trained on for minutes.
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "codi_nnsight", "train-toy", "--out", str(tmp_path / "toy"), "--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    everyone: set[int] = set()
    try:
        deadline = time.time() + 120
        workers: set[int] = set()
        while time.time() < deadline and proc.poll() is None:
            workers = {p for p in _descendants(proc.pid) if "spawn_main" in _cmdline(p)}
            if len(workers) >= 2:
                break
            time.sleep(0.2)
        assert len(workers) == 2, proc.stderr.read() if proc.poll() is not None else "workers did not start"
        time.sleep(3)  # into their imports / training
        everyone |= _descendants(proc.pid)
        t0 = time.time()
        os.kill(proc.pid, getattr(signal, sig))
        rc = proc.wait(timeout=30)
        if sig == "SIGINT":
            assert rc == 130 and proc.stderr.read().strip().splitlines()[-1] == "interrupted"
        left = set(everyone)
        while left and time.time() - t0 < 20:
            left = {p for p in left if _alive(p)}
            time.sleep(0.2)
        assert not left, f"still running after {time.time() - t0:.0f} s: {sorted(left)}"
        assert time.time() - t0 < 20
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in everyone | _descendants(proc.pid):  # after the main process died they are not its children
            if "multiprocessing" not in _cmdline(p):  # ended meanwhile: the id may be someone else's now
                continue
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass


def _cmdline(pid: int) -> str:
    from pathlib import Path

    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""

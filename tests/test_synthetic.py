"""Tests for codi_nnsight.synthetic: chain correctness, corruption, determinism, demo file."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from codi_nnsight.data.pairs import load_pairs
from codi_nnsight.data.synthetic import (
    MAX_RESULT,
    TOY_STEPS,
    WordProblem,
    apply_op,
    corrupt,
    make_problem,
    make_problems,
    make_synthetic_pairs,
    make_toy_pairs,
)
from codi_nnsight.errors import UserError

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo_pairs.json"
ALLOWED_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,?*+-=/")
STEP = re.compile(r"(\d+)([-+*/])(\d+)=(\d+)")


def check_chain(p: WordProblem) -> None:
    """Steps are left-to-right over the question numbers and evaluate exactly."""
    assert len(p.numbers) == len(p.steps) + 1
    acc = p.numbers[0]
    for i, step in enumerate(p.steps):
        a, op, b, r = STEP.fullmatch(step).groups()
        assert int(a) == acc and int(b) == p.numbers[i + 1]
        expected = {"+": acc + int(b), "-": acc - int(b), "*": acc * int(b)}.get(op)
        if op == "/":
            assert acc % int(b) == 0
            expected = acc // int(b)
        assert int(r) == expected and 0 <= expected <= MAX_RESULT
        acc = expected
    assert p.answer == acc
    # each question number appears exactly once, as a standalone token, in chain order
    assert [int(t) for t in re.findall(r"\b\d+\b", p.question)] == p.numbers
    assert len(set(p.numbers)) == len(p.numbers)


def test_problems_are_valid() -> None:
    problems = make_problems(300, seed=1, steps=(2, 4))
    for p in problems:
        check_chain(p)
        assert 2 <= len(p.steps) <= 4
        assert set(p.question) <= ALLOWED_CHARS
        assert all(set(s) <= ALLOWED_CHARS for s in p.steps)
        assert p.question.endswith("?")
    assert {len(p.steps) for p in problems} == {2, 3, 4}
    assert len({p.question for p in problems}) > 250  # text varies


def test_step_count_range() -> None:
    assert {len(p.steps) for p in make_problems(50, seed=2, steps=(3, 3))} == {3}
    with pytest.raises(ValueError):
        make_problem(random.Random(0), 5)
    with pytest.raises(ValueError):
        make_problem(random.Random(0), 1)


def test_example_shape() -> None:
    p = make_problem(random.Random(0), 3)
    assert p.question.startswith(("Tom", "Ann", "Sam", "Mia", "Ben", "Eva"))
    assert "How many" in p.question


def test_apply_op() -> None:
    assert apply_op(12, "/", 4) == 3
    assert apply_op(12, "/", 5) is None  # inexact division
    assert apply_op(3, "-", 4) is None  # negative
    assert apply_op(50, "*", 2) is None  # out of range
    with pytest.raises(ValueError):
        apply_op(1, "%", 2)


def test_corrupt_changes_exactly_one_number() -> None:
    rng = random.Random(5)
    n_ok = 0
    for p in make_problems(200, seed=3):
        c = corrupt(p, rng)
        if c is None:
            continue
        n_ok += 1
        check_chain(c)
        diffs = [(a, b) for a, b in zip(p.numbers, c.numbers) if a != b]
        assert len(diffs) == 1 and abs(diffs[0][0] - diffs[0][1]) == 1
        assert c.answer != p.answer
        assert len(c.steps) == len(p.steps)
        # the text outside the changed number is untouched
        assert re.sub(r"\d+", "#", c.question) == re.sub(r"\d+", "#", p.question)
    assert n_ok > 150  # most problems admit some valid +-1 change


def test_corrupt_returns_none_when_impossible() -> None:
    p = WordProblem(
        "Tom has 2 pens. He buys 97 more pens. How many pens does he have now?",
        ["2+97=99"],
        99,
        [2, 97],
    )
    # +1 on either number pushes the answer to 100, out of range
    assert corrupt(p, random.Random(0), offsets=(1,)) is None
    # 2 -> 1 is below the minimum, so only 97 -> 96 remains
    c = corrupt(p, random.Random(0), offsets=(-1,))
    assert c is not None and c.numbers == [2, 96] and c.steps == ["2+96=98"]
    assert c.question.startswith("Tom has 2 pens. He buys 96 more")
    assert corrupt(p, random.Random(0), offsets=(0,)) is None  # offset 0 changes nothing


def test_determinism() -> None:
    assert make_problems(20, seed=9) == make_problems(20, seed=9)
    assert make_problems(20, seed=9) != make_problems(20, seed=10)
    a, b = make_synthetic_pairs(10, seed=4), make_synthetic_pairs(10, seed=4)
    assert a == b and a.sha256 == b.sha256


@pytest.mark.parametrize("kind", ["toy", "wide"])
def test_synthetic_pairs(kind: str) -> None:
    ps = make_synthetic_pairs(30, seed=0, kind=kind)
    assert ps.ids == list(range(30))
    for pair in ps:
        for q in (pair.clean, pair.corrupted):
            assert q.meta["reasoning_steps"] == len(q.meta["steps"])
            assert q.answer == int(q.meta["steps"][-1].split("=")[1])
        assert pair.clean.answer != pair.corrupted.answer
        assert pair.clean.meta["changed"] == pair.corrupted.meta["changed"]
    ds = ps.to_xarray()
    assert set(ds["reasoning_steps"].values.tolist()) <= ({3, 4, 5} if kind == "toy" else {2, 3, 4})


def test_demo_file_is_reproducible() -> None:
    expected = make_toy_pairs(24, seed=0, steps=(3, 5))
    loaded = load_pairs(DEMO)
    assert loaded == expected
    assert len(loaded) == 24


def test_demo_file_bytes_match_save(tmp_path: Path) -> None:
    out = make_toy_pairs(24, seed=0, steps=(3, 5)).save(tmp_path / "demo.json")
    assert out.read_bytes() == DEMO.read_bytes()


# ------------------------------------------------------------------------------------------
# The default synthetic pairs come from the bundled toy model's distribution
# ------------------------------------------------------------------------------------------


def test_default_synthetic_pairs_are_toy_pairs() -> None:
    ps = make_synthetic_pairs(40, seed=7)
    assert ps == make_toy_pairs(40, seed=7, steps=(3, 5)) == make_synthetic_pairs(40, seed=7, kind="toy")
    for pair in ps:
        for q in (pair.clean, pair.corrupted):
            assert q.meta["reasoning_steps"] in (3, 4, 5)
            numbers = [int(t) for t in re.findall(r"\b\d+\b", q.question)]
            assert 2 <= numbers[0] <= 29 and all(2 <= k <= 9 for k in numbers[1:])  # toy start and operands
            assert all(re.fullmatch(r"\d+[-+]\d+=\d+", s) for s in q.meta["steps"])  # toy: + and - only
            assert all(0 <= int(s.split("=")[1]) <= 39 for s in q.meta["steps"])
    # multi-digit numbers on both sides of the chains
    numbers = {int(t) for pair in ps for t in re.findall(r"\d+", " ".join(pair.clean.meta["steps"]))}
    assert len({k for k in numbers if k >= 10}) > 20
    # the demo file is exactly the default synthetic pairs
    assert make_synthetic_pairs(24, seed=0) == load_pairs(DEMO)


def test_toy_steps_are_the_bundled_models() -> None:
    from codi_nnsight.toy.train import ToyConfig

    assert TOY_STEPS == (ToyConfig.min_steps, ToyConfig.max_steps)


def test_wide_kind_is_the_former_default() -> None:
    # Frozen from the code before the default changed: `make_synthetic_pairs(5, seed=3)`.
    ps = make_synthetic_pairs(5, seed=3, kind="wide")
    assert ps.sha256 == "99feb6a41ba0b47bc624d60598247f171977c3fefefbbe608416ff4d487000cd"
    assert ps[0].clean.question == (
        "Ben has 9 baskets with 7 eggs each. He buys 12 more eggs. How many eggs does he have now?"
    )
    assert make_synthetic_pairs(5, seed=3, steps=(2, 4), max_value=20, kind="wide") == ps


def test_synthetic_pairs_argument_errors() -> None:
    expected = r"^max_value applies to kind='wide' only \(toy problems have their own ranges\)$"
    with pytest.raises(ValueError, match=expected):
        make_synthetic_pairs(2, seed=0, max_value=20)
    with pytest.raises(ValueError, match=r"^unknown kind 'hard' \(expected one of toy, wide\)$"):
        make_synthetic_pairs(2, seed=0, kind="hard")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["toy", "wide"])
@pytest.mark.parametrize(("offsets", "shown"), [((0,), "0"), ((), "(none)"), ((0, 0), "0,0")])
def test_unusable_offsets_stop_with_one_line(kind: str, offsets: tuple, shown: str) -> None:
    # These used to loop forever (`pairs make --synthetic 5 --offsets 0` never returned).
    with pytest.raises(UserError) as exc:
        make_synthetic_pairs(3, seed=0, offsets=offsets, kind=kind)
    assert str(exc.value) == (
        f"offsets {shown}: no valid corrupted problem in 2000 tries "
        "(the changed number must stay in range, distinct, and change the answer)"
    )


def test_bundled_model_answers_default_synthetic_pairs() -> None:
    from codi_nnsight.model import load_model
    from codi_nnsight.model.inference import accuracy_summary, evaluate_pairs

    model = load_model()  # the bundled toy model
    fresh = make_synthetic_pairs(20, seed=2024)
    assert accuracy_summary(evaluate_pairs(model, fresh, max_new_tokens=8, batch_size=40))["clean"] >= 0.9
    # the former default is beyond it: that is why the default changed
    wide = make_synthetic_pairs(20, seed=2024, kind="wide")
    assert accuracy_summary(evaluate_pairs(model, wide, max_new_tokens=8, batch_size=40))["clean"] <= 0.3

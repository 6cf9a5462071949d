"""Synthetic multi-step arithmetic word problems with a tiny vocabulary.

Used to train the bundled toy CODI model and as test data.  Every problem is a
left-to-right chain: step 0 combines the first two question numbers, every later step combines
the previous result with the next question number, so ``steps[i]`` looks like ``"12-2=10"``.
Question numbers are distinct and appear exactly once as standalone tokens, in chain order,
which makes a one-number corruption (and its recomputed answer) unambiguous.

Characters used: ASCII letters, digits, space and ``.,?*+-=/`` (questions use only letters,
digits, space, ``.`` and ``?``; the steps add the operators).

Two distributions:

* ``toy`` (:func:`make_toy_problem`): 3-5 additions/subtractions from a start of 2-29, operands
  2-9, results 0-39 --
  what the bundled toy CODI model is trained on, so it answers them;
* ``wide`` (:func:`make_problem`): 2-4 steps of ``+ - * /`` with operands up to 20 and results up
  to 99, sentences such as "has 3 boxes with 4 pens each" -- harder than anything the toy model
  saw (it answers ~0% of them).

:func:`make_synthetic_pairs` (``codi-nnsight pairs make --synthetic N``) makes ``toy`` pairs by
default.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..errors import UserError
from .pairs import Pair, PairSet, Question

__all__ = [
    "KINDS",
    "MAX_RESULT",
    "TOY_STEPS",
    "WordProblem",
    "apply_op",
    "corrupt",
    "make_problem",
    "make_problems",
    "make_synthetic_pairs",
    "make_toy_pairs",
    "make_toy_problem",
    "make_toy_problems",
    "toy_words",
]

MAX_RESULT = 99
_MIN_STEPS, _MAX_STEPS = 2, 4
_NAMES = (
    ("Tom", "He"),
    ("Ann", "She"),
    ("Sam", "He"),
    ("Mia", "She"),
    ("Ben", "He"),
    ("Eva", "She"),
)
_OBJECTS = ("apples", "pens", "cards", "coins", "eggs", "books")
_CONTAINERS = ("boxes", "bags", "baskets")
_STEP = re.compile(r"(\d+)([-+*/])(\d+)=(\d+)")
_TOKEN = re.compile(r"\b\d+\b")

# Sentence templates per operator; {p} pronoun, {o} object, {k} the question number.
_OP_TEMPLATES = {
    "+": ("{p} buys {k} more {o}.", "{p} finds {k} more {o}.", "Then {p2} gets {k} more {o}."),
    "-": ("{p} eats {k} {o}.", "{p} gives {k} {o} away.", "Then {p2} loses {k} {o}."),
    "*": ("Then the number of {o} is multiplied by {k}.", "{p} makes the pile {k} times bigger."),
    "/": (
        "{p} splits the {o} into {k} equal groups and keeps one group.",
        "Then {p2} puts them into {k} equal piles and keeps one pile.",
    ),
}


@dataclass
class WordProblem:
    """A generated arithmetic word problem, its chain of steps (``"3*4=12"``), answer and
    question numbers (in chain order)."""

    question: str
    steps: list[str]
    answer: int
    numbers: list[int]


#: Former name of :class:`WordProblem`, kept so existing imports keep working.
Problem = WordProblem


def apply_op(a: int, op: str, b: int) -> int | None:
    """Result of ``a op b`` if it stays an integer in [0, MAX_RESULT], else None."""
    if op == "+":
        r = a + b
    elif op == "-":
        r = a - b
    elif op == "*":
        r = a * b
    elif op == "/":
        if b == 0 or a % b:
            return None
        r = a // b
    else:
        raise ValueError(f"unknown operator {op!r}")
    return r if 0 <= r <= MAX_RESULT else None


def _chain(numbers: Sequence[int], ops: Sequence[str]) -> list[int] | None:
    """Left-to-right results, or None if any step is invalid."""
    results = []
    acc = numbers[0]
    for op, b in zip(ops, numbers[1:]):
        r = apply_op(acc, op, b)
        if r is None:
            return None
        results.append(r)
        acc = r
    return results


def _choose_operand(rng: random.Random, acc: int, op: str, used: set[int], max_value: int) -> int | None:
    """An unused operand for ``acc op k`` giving a valid (and non-trivial) result."""
    if op in "*/":
        # Multipliers/divisors stay small: they read naturally and keep results in range.
        pool = range(2, min(max_value, 9) + 1)
    else:
        pool = range(2, max_value + 1)  # avoid "1 apples"
    options = [k for k in pool if k not in used and apply_op(acc, op, k) not in (None, 0)]
    return rng.choice(options) if options else None


def make_problem(rng: random.Random, n_steps: int, max_value: int = 20) -> WordProblem:
    """A templated word problem with ``n_steps`` (2-4) integer steps, results in [1, 99]."""
    if not _MIN_STEPS <= n_steps <= _MAX_STEPS:
        raise ValueError(f"n_steps must be in [{_MIN_STEPS}, {_MAX_STEPS}], got {n_steps}")
    if max_value < 4:
        raise ValueError("max_value must be >= 4")
    name, pron = rng.choice(_NAMES)
    obj = rng.choice(_OBJECTS)
    for _ in range(1000):  # rejection sampling; almost always succeeds on the first tries
        product_start = rng.random() < 0.5
        first = rng.randint(2, min(max_value, 9) if product_start else max_value)
        numbers = [first]
        ops: list[str] = []
        acc = first
        n_ops = n_steps
        if product_start:
            k = _choose_operand(rng, acc, "*", set(numbers), max_value)
            if k is None:
                continue
            numbers.append(k)
            ops.append("*")
            acc *= k
            n_ops -= 1
        ok = True
        for _ in range(n_ops):
            for op in rng.sample("+-*/", 4):
                k = _choose_operand(rng, acc, op, set(numbers), max_value)
                if k is not None:
                    break
            else:
                ok = False
                break
            numbers.append(k)
            ops.append(op)
            acc = apply_op(acc, op, k)
        if ok:
            return _render(rng, name, pron, obj, product_start, numbers, ops)
    raise RuntimeError("could not generate a valid problem")  # pragma: no cover


def _render(
    rng: random.Random,
    name: str,
    pron: str,
    obj: str,
    product_start: bool,
    numbers: list[int],
    ops: list[str],
) -> WordProblem:
    if product_start:
        box = rng.choice(_CONTAINERS)
        sentences = [f"{name} has {numbers[0]} {box} with {numbers[1]} {obj} each."]
        rest = list(zip(ops[1:], numbers[2:]))
    else:
        sentences = [f"{name} has {numbers[0]} {obj}."]
        rest = list(zip(ops, numbers[1:]))
    for op, k in rest:
        template = rng.choice(_OP_TEMPLATES[op])
        sentences.append(template.format(p=pron, p2=pron.lower(), o=obj, k=k))
    sentences.append(f"How many {obj} does {pron.lower()} have now?")
    question = " ".join(sentences)
    results = _chain(numbers, ops)
    assert results is not None  # guaranteed by construction
    steps = _format_steps(numbers, ops, results)
    return WordProblem(question=question, steps=steps, answer=results[-1], numbers=list(numbers))


def _format_steps(numbers: Sequence[int], ops: Sequence[str], results: Sequence[int]) -> list[str]:
    lhs = [numbers[0], *results[:-1]]
    return [f"{a}{op}{b}={r}" for a, op, b, r in zip(lhs, ops, numbers[1:], results)]


def make_problems(n: int, seed: int, steps: tuple[int, int] = (2, 4), max_value: int = 20) -> list[WordProblem]:
    """``n`` problems with step counts uniform in ``steps`` (inclusive); deterministic."""
    rng = random.Random(seed)
    return [make_problem(rng, rng.randint(*steps), max_value) for _ in range(n)]


def _ops_of(problem: WordProblem) -> list[str]:
    ops = []
    for s in problem.steps:
        m = _STEP.fullmatch(s)
        if m is None:
            raise ValueError(f"malformed step {s!r}")
        ops.append(m.group(2))
    return ops


def corrupt(problem: WordProblem, rng: random.Random, offsets: Sequence[int] = (-1, 1)) -> WordProblem | None:
    """Change exactly one question number by an offset and recompute the chain.

    Numbers and offsets are tried in ``rng`` order; returns the first valid variant (all
    results in [0, 99], exact divisions, the new number still unique and >= 2, answer
    changed), or None if there is none.
    """
    ops = _ops_of(problem)
    spans = [m.span() for m in _TOKEN.finditer(problem.question)]
    if len(spans) != len(problem.numbers):
        raise ValueError("question numbers do not match problem.numbers")
    for j in rng.sample(range(len(problem.numbers)), len(problem.numbers)):
        for off in rng.sample(list(offsets), len(offsets)):
            new = problem.numbers[j] + off
            # >= 2: "multiplied by 1" or "1 apples" would make degenerate problems.
            if new < 2 or new == problem.numbers[j] or new in problem.numbers:
                continue
            numbers = list(problem.numbers)
            numbers[j] = new
            results = _chain(numbers, ops)
            if results is None or results[-1] == problem.answer:
                continue
            start, end = spans[j]
            question = problem.question[:start] + str(new) + problem.question[end:]
            return WordProblem(question, _format_steps(numbers, ops, results), results[-1], numbers)
    return None


#: Distributions :func:`make_synthetic_pairs` can draw from (see the module docstring).
KINDS = ("toy", "wide")


def make_synthetic_pairs(
    n: int,
    seed: int,
    steps: tuple[int, int] | None = None,
    max_value: int | None = None,
    offsets: Sequence[int] = (-1, 1),
    *,
    kind: Literal["toy", "wide"] = "toy",
) -> PairSet:
    """``n`` clean/corrupted pairs (ids 0..n-1) with meta ``reasoning_steps``, ``steps``, ``changed``.

    ``kind="toy"`` (default) draws from the bundled toy model's distribution (`make_toy_pairs`,
    ``steps`` default :data:`TOY_STEPS` = (3, 5), the range the model was trained on), so the
    default model answers the pairs.  ``kind="wide"`` gives the older, harder problems of
    `make_problem` (``steps`` default (2, 4), ``max_value`` default 20); ``max_value`` applies
    to it only.
    """
    if kind == "toy":
        if max_value is not None:
            raise ValueError("max_value applies to kind='wide' only (toy problems have their own ranges)")
        return make_toy_pairs(n, seed, steps=TOY_STEPS if steps is None else steps, offsets=offsets)
    if kind != "wide":
        raise ValueError(f"unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
    steps = (2, 4) if steps is None else steps
    max_value = 20 if max_value is None else max_value
    rng = random.Random(seed)
    pairs: list[Pair] = []
    failures = 0
    while len(pairs) < n:
        clean = make_problem(rng, rng.randint(*steps), max_value)
        bad = corrupt(clean, rng, offsets)
        if bad is None:
            failures = _failed(failures, offsets)
            continue
        failures = 0
        pairs.append(_pair(len(pairs), clean, bad))
    return PairSet.from_pairs(pairs)


#: Consecutive problems without a valid corruption after which the offsets are declared unusable;
#: with the default offsets (-1, 1) a few percent of problems fail, so this is never reached.
_MAX_FAILURES = 2000


def _failed(failures: int, offsets: Sequence[int]) -> int:
    # Offsets such as 0 or 50 never give a valid corrupted problem: stop instead of looping forever.
    failures += 1
    if failures >= _MAX_FAILURES:
        shown = ",".join(str(o) for o in offsets) or "(none)"
        raise UserError(
            f"offsets {shown}: no valid corrupted problem in {_MAX_FAILURES} tries "
            "(the changed number must stay in range, distinct, and change the answer)"
        )
    return failures


def _pair(pair_id: int, clean: WordProblem, bad: WordProblem) -> Pair:
    changed = next(f"{a}->{b}" for a, b in zip(clean.numbers, bad.numbers) if a != b)
    qs = [
        Question(
            p.question,
            float(p.answer),
            {"reasoning_steps": len(p.steps), "steps": list(p.steps), "changed": changed},
        )
        for p in (clean, bad)
    ]
    return Pair(pair_id, qs[0], qs[1])


# ---------------------------------------------------------------------------------------------
# The toy model's distribution: small additions and subtractions
# ---------------------------------------------------------------------------------------------
#: A toy problem starts from a number in [2, TOY_MAX_START], adds or subtracts operands in
#: [2, TOY_MAX_OPERAND], and every intermediate result and the answer is in [0, TOY_MAX_RESULT]:
#: multi-digit starts, intermediates and answers (one token each, after a whitespace token).
TOY_MAX_START = 29
TOY_MAX_OPERAND = 9
TOY_MAX_RESULT = 39
#: Step counts of the bundled toy model's training problems (``ToyConfig.min_steps/max_steps``).
TOY_STEPS = (3, 5)
#: Longest chain a toy problem may have (the `wide` generator stops at 4).
TOY_MAX_CHAIN = 5
_TOY_TEMPLATES = {
    "+": ("{p} buys {k} more {o} .", "{p} finds {k} more {o} .", "Then {p2} gets {k} more {o} ."),
    "-": ("{p} eats {k} {o} .", "{p} gives {k} {o} away .", "Then {p2} loses {k} {o} ."),
}


def toy_words() -> list[str]:
    """Every word and punctuation mark a toy (or `make_problem`) question can contain, sorted."""
    texts = [n for pair in _NAMES for n in pair] + [n.lower() for _, n in _NAMES]
    texts += list(_OBJECTS) + list(_CONTAINERS)
    texts += [t for group in (*_TOY_TEMPLATES.values(), *_OP_TEMPLATES.values()) for t in group]
    texts += ["has with each . How many does have now ?", "The answer is :"]
    words = set()
    for t in texts:
        words.update(
            re.findall(
                r"[A-Za-z]+|[^\w\s]+", t.replace("{p}", "").replace("{p2}", "").replace("{o}", "").replace("{k}", "")
            )
        )
    return sorted(words)


def _toy_chain_ok(
    numbers: Sequence[int],
    ops: Sequence[str],
    max_operand: int = TOY_MAX_OPERAND,
    max_result: int = TOY_MAX_RESULT,
    max_start: int = TOY_MAX_START,
) -> bool:
    results = _chain(numbers, ops)
    return (
        results is not None
        and all(0 <= r <= max_result for r in results)
        and 2 <= numbers[0] <= max_start
        and all(2 <= k <= max_operand for k in numbers[1:])
        and len(set(numbers)) == len(numbers)
    )


def make_toy_problem(
    rng: random.Random,
    n_steps: int,
    max_operand: int = TOY_MAX_OPERAND,
    max_result: int = TOY_MAX_RESULT,
    max_start: int = TOY_MAX_START,
) -> WordProblem:
    """A word problem of ``n_steps`` (2-5) additions/subtractions: a start in [2, max_start], then
    operands in [2, max_operand], all question numbers distinct, every intermediate result and the
    answer in [0, max_result].

    E.g. ``Tom has 17 pens. He eats 3 pens. Then he gets 9 more pens. How many pens does he have
    now?`` with steps ``17-3=14 14+9=23``. Numbers are standalone words, so `corrupt` applies.
    """
    if not _MIN_STEPS <= n_steps <= TOY_MAX_CHAIN:
        raise ValueError(f"n_steps must be in [{_MIN_STEPS}, {TOY_MAX_CHAIN}], got {n_steps}")
    name, pron = rng.choice(_NAMES)
    obj = rng.choice(_OBJECTS)
    for _ in range(1000):
        numbers = [rng.randint(2, max_start)]
        ops: list[str] = []
        for _ in range(n_steps):
            acc = _chain(numbers, ops)[-1] if ops else numbers[0]
            options = [
                (op, k)
                for op in "+-"
                for k in range(2, max_operand + 1)
                if k not in numbers and 0 <= (acc + k if op == "+" else acc - k) <= max_result
            ]
            if not options:
                break
            op, k = rng.choice(options)
            numbers.append(k)
            ops.append(op)
        if len(ops) == n_steps and _toy_chain_ok(numbers, ops, max_operand, max_result, max_start):
            break
    else:  # pragma: no cover
        raise RuntimeError("could not generate a valid toy problem")
    sentences = [f"{name} has {numbers[0]} {obj} ."]
    for op, k in zip(ops, numbers[1:]):
        sentences.append(rng.choice(_TOY_TEMPLATES[op]).format(p=pron, p2=pron.lower(), o=obj, k=k))
    sentences.append(f"How many {obj} does {pron.lower()} have now ?")
    question = " ".join(sentences).replace(" .", ".").replace(" ?", "?")
    results = _chain(numbers, ops)
    assert results is not None
    return WordProblem(question, _format_steps(numbers, ops, results), results[-1], list(numbers))


def make_toy_problems(n: int, seed: int, steps: tuple[int, int] = TOY_STEPS) -> list[WordProblem]:
    """``n`` toy problems (`make_toy_problem`) with step counts uniform in ``steps``."""
    rng = random.Random(seed)
    return [make_toy_problem(rng, rng.randint(*steps)) for _ in range(n)]


def make_toy_pairs(n: int, seed: int, steps: tuple[int, int] = TOY_STEPS, offsets: Sequence[int] = (-1, 1)) -> PairSet:
    """``n`` clean/corrupted pairs of toy problems; both variants stay in the toy distribution
    (`_toy_chain_ok` with the defaults) and differ in one number and in their answers."""
    rng = random.Random(seed)
    pairs: list[Pair] = []
    failures = 0
    while len(pairs) < n:
        clean = make_toy_problem(rng, rng.randint(*steps))
        bad = corrupt(clean, rng, offsets)
        if bad is None or not _toy_chain_ok(bad.numbers, _ops_of(bad)):
            failures = _failed(failures, offsets)
            continue
        failures = 0
        pairs.append(_pair(len(pairs), clean, bad))
    return PairSet.from_pairs(pairs)

"""Build clean/corrupted pairs from GSM8K-format word problems.

A GSM8K record looks like ``{"question": str, "answer": "...<<48/2=24>>...\\n#### 72"}``.  A pair
is made by changing one number of the question by a small offset and propagating the change
through the annotated calculator chain (``<<expr=result>>``), which is re-evaluated with a tiny
safe arithmetic evaluator (``ast`` based, never ``eval``).  Records whose chain cannot be
trusted are rejected with a short reason string so callers can report counts.
"""

from __future__ import annotations

import ast
import json
import math
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from ..errors import UserError
from .pairs import Pair, PairSet, Question, _question_error

__all__ = [
    "REJECT_AMBIGUOUS",
    "REJECT_BAD_RECORD",
    "REJECT_DIV_ZERO",
    "REJECT_FINAL_MISMATCH",
    "REJECT_INCONSISTENT",
    "REJECT_INEXACT",
    "REJECT_NEGATIVE",
    "REJECT_NEW_NOT_UNIQUE",
    "REJECT_NON_INTEGER",
    "REJECT_NO_ANNOTATIONS",
    "REJECT_NO_FINAL",
    "REJECT_NO_OPERAND",
    "REJECT_NO_VALID_OFFSET",
    "REJECT_UNCHANGED",
    "REJECT_UNIT",
    "REJECT_UNPARSEABLE",
    "REJECT_WORD_NUMBER",
    "EvalError",
    "explain_pairs",
    "implied_values",
    "load_gsm8k_hub",
    "make_pair",
    "make_pairs",
    "parse_chain",
    "question_numbers",
    "read_gsm8k",
    "safe_eval",
]

# Rejection reasons (fixed strings, counted by make_pairs).
REJECT_BAD_RECORD = "bad record"
REJECT_NO_ANNOTATIONS = "no annotations"
REJECT_NO_FINAL = "no final answer"
REJECT_UNPARSEABLE = "unparseable chain"
REJECT_INCONSISTENT = "chain inconsistent"
REJECT_FINAL_MISMATCH = "final answer not in chain"
REJECT_NO_OPERAND = "no unique operand"
REJECT_NO_VALID_OFFSET = "no valid offset"
REJECT_AMBIGUOUS = "ambiguous operand"
REJECT_DIV_ZERO = "division by zero"
REJECT_NON_INTEGER = "non-integer result"
REJECT_NEGATIVE = "negative result"
REJECT_NEW_NOT_UNIQUE = "new number not unique"
REJECT_UNCHANGED = "answer unchanged"
# A chain literal with the changed number's value may also come from a word ("twice", "dozen")
# or a unit ("a week", "percent"): its new value cannot be known, so the pair would lie.
REJECT_WORD_NUMBER = "value also from a word-number"
REJECT_UNIT = "value also from a unit or constant"
# Answers are stored and scored as float64: an integer beyond 2**53 would change silently.
REJECT_INEXACT = "answer not exact in float64"

_TOL = 1e-6
_MAX_EXPR_LEN = 200
_MAX_LITERAL_DIGITS = 30
_ANNOTATION = re.compile(r"<<([^<>]*)>>")
_FINAL = re.compile(r"####\s*([^\n]*)")
# A number token: not glued to letters/digits/dots before it; thousands commas allowed.
_NUMBER_TOKEN = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?![\w])")
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")

_BINOPS: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


class EvalError(ValueError):
    """An expression is not plain arithmetic or cannot be evaluated."""


def _parse_expr(expr: str) -> ast.Expression:
    expr = _DIGIT_COMMA.sub("", expr.strip())
    if not expr or len(expr) > _MAX_EXPR_LEN:
        raise EvalError(f"bad expression length: {expr!r}")
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError) as e:
        raise EvalError(f"cannot parse {expr!r}") from e
    return tree


def _literal(value: Any) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EvalError(f"not a number literal: {value!r}")
    if isinstance(value, int):
        if len(str(abs(value))) > _MAX_LITERAL_DIGITS:
            raise EvalError("literal too large")
        return Fraction(value)
    if not math.isfinite(value):
        raise EvalError("non-finite literal")
    # repr gives the shortest decimal, so 0.1 becomes exactly 1/10 rather than a binary float.
    return Fraction(repr(value))


def _eval_node(node: ast.AST, lit: Callable[[Fraction], Fraction]) -> Fraction:
    if isinstance(node, ast.Expression):
        return _eval_node(node.body, lit)
    if isinstance(node, ast.Constant):
        return lit(_literal(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval_node(node.operand, lit)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a = _eval_node(node.left, lit)
        b = _eval_node(node.right, lit)
        if isinstance(node.op, ast.Div) and b == 0:
            raise ZeroDivisionError("division by zero")
        return _BINOPS[type(node.op)](a, b)
    raise EvalError(f"unsupported syntax: {type(node).__name__}")


def safe_eval(expr: str) -> Fraction:
    """Exactly evaluate ``+ - * / ( )`` arithmetic on integers/decimals; no ``eval``.

    Raises :class:`EvalError` for anything else and ``ZeroDivisionError`` on division by zero.
    """
    return _eval_node(_parse_expr(expr), lambda v: v)


def _to_fraction(text: str) -> Fraction:
    s = text.strip().replace(",", "")
    try:
        f = Fraction(s)
    except (ValueError, ZeroDivisionError) as e:
        raise EvalError(f"not a number: {text!r}") from e
    return f


def parse_chain(answer_text: str) -> tuple[list[tuple[str, str]], str | None]:
    """Split a GSM8K answer into ``<<expr=result>>`` steps and the final ``#### X`` answer.

    Returns ``(steps, final)`` where ``steps`` is a list of ``(expression, stated_result)``
    strings (result without commas; empty when the annotation has no ``=``) and ``final`` is
    the ``####`` answer with commas removed, or None when absent.
    """
    steps: list[tuple[str, str]] = []
    for inner in _ANNOTATION.findall(answer_text):
        expr, sep, result = inner.rpartition("=")
        if not sep:
            steps.append((inner.strip(), ""))
        else:
            steps.append((expr.strip(), result.strip().replace(",", "")))
    markers = list(_FINAL.finditer(answer_text))  # the last "####" marker wins
    final = markers[-1].group(1).strip().replace(",", "") if markers else None
    return steps, final or None


def question_numbers(question: str) -> list[tuple[int, int, str, Fraction]]:
    """Number tokens in ``question`` as (start, end, text, value), in text order."""
    out = []
    for m in _NUMBER_TOKEN.finditer(question):
        text = m.group(0)
        out.append((m.start(), m.end(), text, Fraction(text.replace(",", ""))))
    return out


def _out_number(v: Fraction) -> int | float:
    return int(v) if v.denominator == 1 else float(v)


def _format_like(old_text: str, new: int) -> str:
    # Keep thousands separators if the original number used them.
    return f"{new:,}" if "," in old_text else str(new)


def _float64_exact(v: Fraction) -> bool:
    """Whether an integer answer survives float64 (fractions are stored as floats anyway)."""
    if v.denominator != 1:
        return True
    try:
        return Fraction(float(v)) == v
    except OverflowError:
        return False


def _show_value(v: Fraction) -> str:
    return str(v.numerator) if v.denominator == 1 else repr(float(v))


# ------------------------------------------------------------------------------------------------
# Values a question implies without writing them as digits
# ------------------------------------------------------------------------------------------------

_UNITS_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_TEENS = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

#: Word-numbers: a word (regex, lower case, whole word) and the values a chain may write for it.
#: Fractions imply both the divisor and the fraction ("half": 48/2 or 48*0.5).
_WORD_NUMBERS: list[tuple[str, tuple[Fraction, ...]]] = [
    *((w, (Fraction(i + 1),)) for i, w in enumerate(_UNITS_WORDS)),
    *((w, (Fraction(10 + i),)) for i, w in enumerate(_TEENS)),
    *((w, (Fraction(20 + 10 * i),)) for i, w in enumerate(_TENS)),
    ("hundreds?", (Fraction(100),)),
    ("thousands?", (Fraction(1000),)),
    ("millions?", (Fraction(10**6),)),
    ("once|single|alone|first", (Fraction(1),)),
    ("twice|double[sd]?|doubling|both|pairs?|couples?|twins?|second|halve[sd]?|halves|half", (Fraction(2),)),
    ("half|halve[sd]?|halves", (Fraction(1, 2),)),
    ("thrice|triple[sd]?|tripling|triplets?|third", (Fraction(3),)),
    ("thirds?", (Fraction(1, 3),)),
    ("quadruple[sd]?|quarters?|fourths?", (Fraction(4),)),
    ("quarters?|fourths?", (Fraction(1, 4), Fraction(25))),
    ("fifths?", (Fraction(5), Fraction(1, 5))),
    ("sixths?", (Fraction(6), Fraction(1, 6))),
    ("tenths?", (Fraction(10), Fraction(1, 10))),
    ("dozens?", (Fraction(12),)),
    ("half(?: a)?[- ]dozens?", (Fraction(6),)),
    ("score", (Fraction(20),)),
    ("gross", (Fraction(144),)),
]

#: Units and counted things whose conversion factors chains write as bare numbers.
_UNITS: list[tuple[str, tuple[int, ...]]] = [
    ("%|percent|percentage|cents?|century|centuries|centimet(?:er|re)s?|cm", (100,)),
    ("weeks?|weekly", (7, 52)),
    ("weekdays?", (5,)),
    ("weekends?", (2,)),
    ("fortnights?", (14,)),
    ("days?|daily", (24, 7, 30, 365)),
    ("hours?|hourly", (60, 24)),
    ("minutes?|seconds?", (60,)),
    ("months?|monthly", (12, 30, 31, 4)),
    ("years?|yearly|annual(?:ly)?", (12, 52, 365)),
    ("decades?", (10,)),
    ("dimes?", (10,)),
    ("nickels?", (5,)),
    ("feet|foot|inch(?:es)?", (12,)),
    ("yards?", (3, 36)),
    ("miles?", (5280,)),
    ("pounds?|ounces?|lbs?|oz", (16,)),
    ("gallons?|quarts?", (4, 128)),
    ("pints?", (2,)),
    ("kilo\\w*|kg|km|met(?:er|re)s?|lit(?:er|re)s?|millilit(?:er|re)s?|ml|grams?|milligrams?|tons?", (1000,)),
    ("legs?", (2, 4)),
    ("wheels?|wheelers?", (2, 3, 4)),
    ("sides?|corners?", (3, 4)),
    ("hands?|eyes?|ears?|feet|shoes?|socks?|gloves?|arms?|wings?", (2,)),
]


def _compile(table: list[tuple[str, tuple[Any, ...]]]) -> list[tuple[re.Pattern[str], tuple[Fraction, ...]]]:
    return [(re.compile(rf"(?<![a-z])(?:{pat})(?![a-z])"), tuple(Fraction(v) for v in vals)) for pat, vals in table]


_WORD_PATTERNS = _compile(_WORD_NUMBERS)
_COMPOUND = re.compile(rf"(?<![a-z])({'|'.join(_TENS)})[- ]({'|'.join(_UNITS_WORDS)})(?![a-z])")
_UNIT_PATTERNS = _compile(_UNITS)
_PERCENT_AFTER = re.compile(r"\s*(?:%|percent)")


def implied_values(question: str) -> dict[Fraction, list[tuple[str, str]]]:
    """Values a question implies without digits: ``{value: [(kind, label), ...]}``.

    ``kind`` is ``"word"`` for word-numbers ("twice" 2, "dozen" 12, "half" 2 and 1/2, "twenty-five"
    25) and ``"unit"`` for conversion factors of units and counted things ("week" 7 and 52,
    "percent" 100, "legs" 2 and 4) and the constant 1, which chains use freely ("1 - 0.2", "+ 1").
    The table is deliberately generous: a false alarm costs one pair, a miss a wrong label.
    """
    text = question.lower()
    out: dict[Fraction, list[tuple[str, str]]] = {Fraction(1): [("unit", "the constant 1")]}

    def add(value: Fraction, kind: str, label: str) -> None:
        labels = out.setdefault(value, [])
        if (kind, label) not in labels:
            labels.append((kind, label))

    for kind, patterns in (("word", _WORD_PATTERNS), ("unit", _UNIT_PATTERNS)):
        for pattern, values in patterns:
            for m in pattern.finditer(text):
                for v in values:
                    add(v, kind, f"{m.group(0)!r} ({_show_value(v)})")
    for m in _COMPOUND.finditer(text):
        v = Fraction(20 + 10 * _TENS.index(m.group(1)) + _UNITS_WORDS.index(m.group(2)) + 1)
        add(v, "word", f"{m.group(0)!r} ({_show_value(v)})")
    return out


# ------------------------------------------------------------------------------------------------
# Propagating one change through the chain
# ------------------------------------------------------------------------------------------------


class _Refused(Exception):
    """A change cannot be propagated: a fixed reason (counted) and a detail (for --explain)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def _render(tree: ast.Expression, values: list[Fraction]) -> str:
    """The expression with its literals, in evaluation order, replaced by ``values``."""
    it = iter(values)

    class _Sub(ast.NodeTransformer):
        def visit_Constant(self, node: ast.Constant) -> ast.AST:
            return ast.Name(id=_show_value(next(it)))

    return ast.unparse(_Sub().visit(ast.parse(ast.unparse(tree), mode="eval")))


def _chain_text(trees: list[ast.Expression], used: list[list[Fraction]], results: list[Fraction]) -> str:
    return "; ".join(f"{_render(t, u)} = {_show_value(r)}" for t, u, r in zip(trees, used, results))


def _propagate(
    trees: list[ast.Expression],
    old_vals: list[Fraction],
    old_text: str,
    old_x: Fraction,
    new_x: Fraction,
    other_question_values: set[Fraction],
    implied: dict[Fraction, list[tuple[str, str]]],
) -> tuple[list[Fraction], list[list[Fraction]]]:
    """Re-evaluate the chain with ``old_x`` -> ``new_x``: each step's new result and literals.

    Every literal's possible origins are listed: the changed question number, another (unchanged)
    question number, a word-number or unit the question implies, an earlier step's result.  A
    literal is substituted only when all its origins agree on the new value; otherwise the change
    is refused (:class:`_Refused`), naming the conflicting origins.
    """
    new_vals: list[Fraction] = []
    used: list[list[Fraction]] = []
    for i, tree in enumerate(trees):
        step_used: list[Fraction] = []

        def lit(v: Fraction, i: int = i, step_used: list[Fraction] = step_used) -> Fraction:
            sources: list[tuple[str, str, Fraction]] = []
            if v == old_x:
                sources.append(("changed", f"the changed {old_text!r}", new_x))
            elif v in other_question_values:
                sources.append(("question", f"the question's {_show_value(v)}", v))
            sources += [(kind, label, v) for kind, label in implied.get(v, [])]
            sources += [("step", f"step {j + 1}'s result", new_vals[j]) for j in range(i) if old_vals[j] == v]
            if len({new for *_, new in sources}) > 1:
                kinds = {kind for kind, *_ in sources}
                reason = REJECT_WORD_NUMBER if "word" in kinds else REJECT_UNIT if "unit" in kinds else REJECT_AMBIGUOUS
                labels = " or ".join(label for _, label, _ in sources)
                raise _Refused(reason, f"chain literal {_show_value(v)} in step {i + 1} may be {labels}")
            new = sources[0][2] if sources else v
            step_used.append(new)
            return new

        try:
            new_vals.append(_eval_node(tree, lit))
        except ZeroDivisionError:
            raise _Refused(REJECT_DIV_ZERO, f"step {i + 1} divides by zero") from None
        used.append(step_used)
    return new_vals, used


def _check_percent_forms(
    question: str, end: int, old_text: str, old_x: Fraction, literal_values: set[Fraction]
) -> None:
    """A changed percentage must not also reach the chain as a fraction (20% as 0.2 or 0.8)."""
    if not _PERCENT_AFTER.match(question, end):
        return
    forms = {old_x / 100, 1 - old_x / 100, 1 + old_x / 100}
    hit = sorted(forms & literal_values)
    if hit:
        shown = ", ".join(_show_value(v) for v in hit)
        raise _Refused(REJECT_UNIT, f"the changed {old_text}% also reaches the chain as {shown}")


def make_pair(record: Any, rng: random.Random, offsets: Sequence[int] = (-1, 1)) -> tuple[dict, dict] | str:
    """Make a (clean, corrupted) record pair from one GSM8K record, or return a reject reason.

    A question number that occurs exactly once in the question and as an operand in the chain
    is changed by an offset from ``offsets`` (candidates and offsets tried in ``rng`` order);
    the chain is re-evaluated and the new final answer taken from the step that produced the
    original ``####`` answer.  A chain literal is changed only where it can only come from the
    changed number: where its value also arises from a word-number ("twice"), a unit ("a week":
    7), another mention or an earlier result that changes differently, the change is refused.
    The returned dicts have ``question``, ``answer``, ``reasoning_steps``, ``changed``
    (``"old->new"``) and ``intermediates`` (each step's result in that variant's own chain: what
    the readouts compare the thoughts with).
    """
    return _make_pair_traced(record, rng, offsets, [])


def _parse_record(
    record: Any,
) -> tuple[str, list[ast.Expression], list[Fraction], list[list[Fraction]], Fraction, int] | str:
    """A record's question, chain (trees, results, literals), final answer and the step giving it;
    or the reason the record cannot make a pair."""
    if not isinstance(record, dict):
        return REJECT_BAD_RECORD
    question, answer_text = record.get("question"), record.get("answer")
    if not isinstance(question, str) or not isinstance(answer_text, str) or _question_error(question):
        # _question_error: empty, lone surrogate or NUL -- the pairs file would not load.
        return REJECT_BAD_RECORD
    steps, final_text = parse_chain(answer_text)
    if not steps:
        return REJECT_NO_ANNOTATIONS
    if final_text is None:
        return REJECT_NO_FINAL

    # 1. The original chain must be self-consistent.
    try:
        trees = [_parse_expr(expr) for expr, _ in steps]
        stated = [_to_fraction(res) for _, res in steps]
        final = _to_fraction(final_text)
        old_vals = [_eval_node(t, lambda v: v) for t in trees]
        old_used = [_literals_in_order(t) for t in trees]
    except (EvalError, ZeroDivisionError):
        return REJECT_UNPARSEABLE
    if any(abs(float(a - b)) > _TOL for a, b in zip(old_vals, stated)):
        return REJECT_INCONSISTENT
    final_idx = None
    for i, v in enumerate(old_vals):
        if abs(float(v - final)) <= _TOL:
            final_idx = i  # last matching step wins
    if final_idx is None:
        return REJECT_FINAL_MISMATCH
    if not _float64_exact(final):
        return REJECT_INEXACT
    return question, trees, old_vals, old_used, final, final_idx


def _make_pair_traced(
    record: Any, rng: random.Random, offsets: Sequence[int], trace: list[str]
) -> tuple[dict, dict] | str:
    """:func:`make_pair`, appending one audit line per change tried (and the chains) to ``trace``."""
    parsed = _parse_record(record)
    if isinstance(parsed, str):
        return parsed
    question, trees, old_vals, old_used, final, final_idx = parsed
    literal_values = {v for u in old_used for v in u}

    # 2. Candidate numbers: integers, unique in the question, used as a chain operand.
    tokens = question_numbers(question)
    counts = Counter(v for *_, v in tokens)
    candidates = [
        t for t in tokens if t[3].denominator == 1 and "." not in t[2] and counts[t[3]] == 1 and t[3] in literal_values
    ]
    if not candidates:
        return REJECT_NO_OPERAND
    implied = implied_values(question)

    first_reason: str | None = None
    for start, end, text, old_x in rng.sample(candidates, len(candidates)):
        for off in rng.sample(list(offsets), len(offsets)):
            new_x = old_x + off
            if new_x <= 0 or new_x == old_x:
                continue
            new_text = _format_like(text, int(new_x))
            changed = f"{text}->{new_text}"
            try:
                _check_percent_forms(question, end, text, old_x, literal_values)
                new_vals, new_used = _try_change(tokens, trees, old_vals, final_idx, text, old_x, new_x, implied)
            except _Refused as r:
                trace.append(f"  refused {changed}: {r.reason}" + (f" ({r.detail})" if r.detail else ""))
                # A reason about the chain says more than "the new number is already there".
                if first_reason in (None, REJECT_NEW_NOT_UNIQUE):
                    first_reason = r.reason
                continue
            new_question = question[:start] + new_text + question[end:]
            trace.append(f"  changed {changed} at character {start}")
            trace.append(f"    clean chain:     {_chain_text(trees, old_used, old_vals)} -> {_show_value(final)}")
            trace.append(
                f"    corrupted chain: {_chain_text(trees, new_used, new_vals)} -> {_show_value(new_vals[final_idx])}"
            )
            # Each variant's own intermediate results, for the readouts' gold values.
            clean = {
                "question": question,
                "answer": _out_number(final),
                "reasoning_steps": len(trees),
                "changed": changed,
                "intermediates": [_out_number(v) for v in old_vals],
            }
            corrupted = {
                "question": new_question,
                "answer": _out_number(new_vals[final_idx]),
                "reasoning_steps": len(trees),
                "changed": changed,
                "intermediates": [_out_number(v) for v in new_vals],
            }
            return clean, corrupted
    return first_reason or REJECT_NO_VALID_OFFSET


def _literals_in_order(tree: ast.Expression) -> list[Fraction]:
    """The literals of an expression in evaluation order (what :func:`_render` replaces)."""
    out: list[Fraction] = []

    def keep(v: Fraction) -> Fraction:
        out.append(v)
        return v

    _eval_node(tree, keep)  # ZeroDivisionError: the caller rejects the chain
    return out


def _try_change(
    tokens: list[tuple[int, int, str, Fraction]],
    trees: list[ast.Expression],
    old_vals: list[Fraction],
    final_idx: int,
    old_text: str,
    old_x: Fraction,
    new_x: Fraction,
    implied: dict[Fraction, list[tuple[str, str]]],
) -> tuple[list[Fraction], list[list[Fraction]]]:
    values = [v for *_, v in tokens]
    if new_x in values:
        # The corrupted question would contain the number twice.
        raise _Refused(REJECT_NEW_NOT_UNIQUE, f"{_show_value(new_x)} is already in the question")
    others = {v for v in values if v != old_x}
    new_vals, new_used = _propagate(trees, old_vals, old_text, old_x, new_x, others, implied)
    for i, (old, new) in enumerate(zip(old_vals, new_vals)):
        if old.denominator == 1 and new.denominator != 1:
            raise _Refused(REJECT_NON_INTEGER, f"step {i + 1} gives {_show_value(new)}")
        if old >= 0 and new < 0:
            raise _Refused(REJECT_NEGATIVE, f"step {i + 1} gives {_show_value(new)}")
    if new_vals[final_idx] == old_vals[final_idx]:
        raise _Refused(REJECT_UNCHANGED)
    if not _float64_exact(new_vals[final_idx]):
        raise _Refused(REJECT_INEXACT, f"{_show_value(new_vals[final_idx])} would be stored as a float64")
    return new_vals, new_used


def _records_pairs(
    records: Iterable[Any], seed: int, offsets: Sequence[int], limit: int | None, trace: list[str] | None
) -> tuple[PairSet, Counter]:
    pairs: list[Pair] = []
    rejected: Counter = Counter()
    for i, record in enumerate(records):
        if limit is not None and len(pairs) >= limit:
            break
        lines: list[str] = []
        result = _make_pair_traced(record, random.Random(f"{seed}:{i}"), offsets, lines)
        if isinstance(result, str):
            rejected[result] += 1
            if trace is not None:
                trace.append(f"record {i}: no pair ({result})")
                trace.extend(lines)
            continue
        if trace is not None:
            trace.append(f"record {i}: pair {len(pairs)}")
            trace.extend(lines)
        qs = []
        for rec in result:
            meta = {k: v for k, v in rec.items() if k not in ("question", "answer")}
            meta["source_index"] = i
            qs.append(Question(rec["question"], float(rec["answer"]), meta))
        pairs.append(Pair(len(pairs), qs[0], qs[1]))
    return PairSet.from_pairs(pairs), rejected


def make_pairs(
    records: Iterable[Any],
    seed: int,
    offsets: Sequence[int] = (-1, 1),
    limit: int | None = None,
) -> tuple[PairSet, Counter]:
    """Make pairs from GSM8K records; deterministic for a given ``seed``.

    Each record gets its own RNG derived from ``(seed, record index)`` so a record's pair does
    not depend on which other records were accepted.  Returns the pairs (ids 0, 1, ...; meta
    ``reasoning_steps``, ``changed``, ``source_index``) and a Counter of rejection reasons.
    :func:`explain_pairs` gives the same pairs with an audit of every change tried.
    """
    return _records_pairs(records, seed, offsets, limit, None)


def explain_pairs(
    records: Iterable[Any],
    seed: int,
    offsets: Sequence[int] = (-1, 1),
    limit: int | None = None,
) -> tuple[PairSet, Counter, list[str]]:
    """:func:`make_pairs` plus audit lines: for each record, every change tried and why it was
    refused, and for each pair its clean and corrupted chain (``3*2=6; 6*2=12 -> 12``)."""
    trace: list[str] = []
    pairset, rejected = _records_pairs(records, seed, offsets, limit, trace)
    return pairset, rejected, trace


def read_gsm8k(path: str | os.PathLike) -> list[dict]:
    """Read GSM8K-format records from a local JSON list or JSON Lines file.

    Raises :class:`UserError` (a ValueError) with one line naming the file for anything unusable:
    missing or unreadable file, bad UTF-8, invalid JSON, or not a list of objects.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8").removeprefix("\ufeff")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read file: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 at byte {e.start}") from None
    try:
        data = _json_or_jsonl(path, text)
    except RecursionError:
        raise UserError(f"{path}: invalid JSON: nesting too deep") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"{path}: expected a list of objects with 'question' and 'answer'")
    return data


def _json_or_jsonl(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    except ValueError as e:  # e.g. an integer beyond Python's digit limit
        raise UserError(f"{path}: invalid JSON: {e}") from None
    data = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: invalid JSON at line {lineno}: {e.msg}") from None
        except ValueError as e:
            raise UserError(f"{path}: invalid JSON at line {lineno}: {e}") from None
    return data


def load_gsm8k_hub(split: str = "test") -> list[dict]:
    """Download GSM8K (``openai/gsm8k``, config ``main``) via the optional ``datasets`` package."""
    try:
        import datasets  # lazy: optional dependency, only needed for this path
    except ImportError as e:
        raise UserError(  # one line, not a traceback: a missing optional package is a setup step
            "--gsm8k hub: loading GSM8K from the Hugging Face Hub needs the 'datasets' package: "
            'pip install -e ".[gsm8k]" (or pip install datasets)'
        ) from e
    ds = datasets.load_dataset("openai/gsm8k", "main", split=split)
    return [{"question": r["question"], "answer": r["answer"]} for r in ds]

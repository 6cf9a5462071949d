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
    "REJECT_NEGATIVE",
    "REJECT_NEW_NOT_UNIQUE",
    "REJECT_NON_INTEGER",
    "REJECT_NO_ANNOTATIONS",
    "REJECT_NO_FINAL",
    "REJECT_NO_OPERAND",
    "REJECT_NO_VALID_OFFSET",
    "REJECT_UNCHANGED",
    "REJECT_UNPARSEABLE",
    "EvalError",
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


def _literals(tree: ast.AST) -> list[Fraction]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant):
            out.append(_literal(node.value))
    return out


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


def _propagate(
    trees: list[ast.Expression],
    old_vals: list[Fraction],
    old_x: Fraction,
    new_x: Fraction,
    other_question_values: set[Fraction],
) -> list[Fraction] | str:
    """Re-evaluate the chain with ``old_x`` -> ``new_x``; return new results or a reason."""
    new_vals: list[Fraction] = []
    for i, tree in enumerate(trees):

        def lit(v: Fraction, i: int = i) -> Fraction:
            # Every explanation of this literal: the changed question number, an earlier
            # step's result, or another (unchanged) question number.  If they disagree on the
            # new value we cannot know which one the annotator meant.
            sources: set[Fraction] = set()
            if v == old_x:
                sources.add(new_x)
            elif v in other_question_values:
                sources.add(v)
            for j in range(i):
                if old_vals[j] == v:
                    sources.add(new_vals[j])
            if len(sources) > 1:
                raise _Ambiguous
            return sources.pop() if sources else v

        try:
            new_vals.append(_eval_node(tree, lit))
        except _Ambiguous:
            return REJECT_AMBIGUOUS
        except ZeroDivisionError:
            return REJECT_DIV_ZERO
    return new_vals


class _Ambiguous(Exception):
    pass


def make_pair(record: Any, rng: random.Random, offsets: Sequence[int] = (-1, 1)) -> tuple[dict, dict] | str:
    """Make a (clean, corrupted) record pair from one GSM8K record, or return a reject reason.

    A question number that occurs exactly once in the question and as an operand in the chain
    is changed by an offset from ``offsets`` (candidates and offsets tried in ``rng`` order);
    the chain is re-evaluated and the new final answer taken from the step that produced the
    original ``####`` answer.  The returned dicts have ``question``, ``answer``,
    ``reasoning_steps``, ``changed`` (``"old->new"``) and ``intermediates`` (each step's result in
    that variant's own chain: what the readouts compare the thoughts with).
    """
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
        literal_values = {v for t in trees for v in _literals(t)}
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

    # 2. Candidate numbers: integers, unique in the question, used as a chain operand.
    tokens = question_numbers(question)
    counts = Counter(v for *_, v in tokens)
    candidates = [
        t for t in tokens if t[3].denominator == 1 and "." not in t[2] and counts[t[3]] == 1 and t[3] in literal_values
    ]
    if not candidates:
        return REJECT_NO_OPERAND

    first_reason: str | None = None
    for start, end, text, old_x in rng.sample(candidates, len(candidates)):
        for off in rng.sample(list(offsets), len(offsets)):
            new_x = old_x + off
            if new_x <= 0 or new_x == old_x:
                continue
            reason_or_vals = _try_change(tokens, trees, old_vals, final_idx, old_x, new_x)
            if isinstance(reason_or_vals, str):
                first_reason = first_reason or reason_or_vals
                continue
            new_vals = reason_or_vals
            new_text = _format_like(text, int(new_x))
            new_question = question[:start] + new_text + question[end:]
            changed = f"{text}->{new_text}"
            # Each variant's own intermediate results, for the readouts' gold values.
            clean = {
                "question": question,
                "answer": _out_number(final),
                "reasoning_steps": len(steps),
                "changed": changed,
                "intermediates": [_out_number(v) for v in old_vals],
            }
            corrupted = {
                "question": new_question,
                "answer": _out_number(new_vals[final_idx]),
                "reasoning_steps": len(steps),
                "changed": changed,
                "intermediates": [_out_number(v) for v in new_vals],
            }
            return clean, corrupted
    return first_reason or REJECT_NO_VALID_OFFSET


def _try_change(
    tokens: list[tuple[int, int, str, Fraction]],
    trees: list[ast.Expression],
    old_vals: list[Fraction],
    final_idx: int,
    old_x: Fraction,
    new_x: Fraction,
) -> list[Fraction] | str:
    values = [v for *_, v in tokens]
    if new_x in values:
        return REJECT_NEW_NOT_UNIQUE  # corrupted question would contain the number twice
    others = {v for v in values if v != old_x}
    new_vals = _propagate(trees, old_vals, old_x, new_x, others)
    if isinstance(new_vals, str):
        return new_vals
    for old, new in zip(old_vals, new_vals):
        if old.denominator == 1 and new.denominator != 1:
            return REJECT_NON_INTEGER
        if old >= 0 and new < 0:
            return REJECT_NEGATIVE
    if new_vals[final_idx] == old_vals[final_idx]:
        return REJECT_UNCHANGED
    return new_vals


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
    """
    pairs: list[Pair] = []
    rejected: Counter = Counter()
    for i, record in enumerate(records):
        if limit is not None and len(pairs) >= limit:
            break
        result = make_pair(record, random.Random(f"{seed}:{i}"), offsets)
        if isinstance(result, str):
            rejected[result] += 1
            continue
        qs = []
        for rec in result:
            meta = {k: v for k, v in rec.items() if k not in ("question", "answer")}
            meta["source_index"] = i
            qs.append(Question(rec["question"], float(rec["answer"]), meta))
        pairs.append(Pair(len(pairs), qs[0], qs[1]))
    return PairSet.from_pairs(pairs), rejected


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
        raise RuntimeError(
            "loading GSM8K from the Hugging Face Hub needs the 'datasets' package: pip install datasets"
        ) from e
    ds = datasets.load_dataset("openai/gsm8k", "main", split=split)
    return [{"question": r["question"], "answer": r["answer"]} for r in ds]

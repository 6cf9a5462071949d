"""The answer a question would have with another value at one step of its chain ("carried through").

A question's chain is its ``steps`` meta field, one ``"expr=result"`` string per reasoning step
(the toy and synthetic pairs: ``"12-2=10"``; GSM8K-style ``"<<48/2=24>>"`` annotations too).
`carried_answer(question, s, v)` replaces step s's result by v and re-evaluates every later step
with the package's exact arithmetic (`data.gsm8k.safe_eval`):

* a step of the left-to-right chain form ``a op b`` whose first operand is the previous step's
  old result takes the previous step's *new* result there (and only there: an equal question
  number in the second operand stays);
* any other step takes the new result of every changed earlier step wherever a literal equals
  that step's old result (GSM8K chains refer to earlier results by value).

The answer is the last step's new result. NaN where the question has no readable chain (GSM8K
pairs made by `pairs make --gsm8k` carry only their `intermediates`, not the expressions), where
the last step's result is not the question's answer, or where a step cannot be evaluated.
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["carried_answer", "chain_steps"]

_STEP = re.compile(r"^\s*(?:<<)?(?P<expr>[^=<>]+)=(?P<result>[^=<>]+?)(?:>>)?\s*$")
_LITERAL = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])")
_BINARY = re.compile(r"^\s*(?P<a>\d+(?:\.\d+)?)\s*(?P<op>[-+*/])\s*(?P<b>\d+(?:\.\d+)?)\s*$")


def chain_steps(question: Any) -> list[tuple[str, float]] | None:
    """`(expression, result)` of every step of `question`'s ``steps`` field, or None if it has no readable chain."""
    meta = getattr(question, "meta", None) or {}
    steps = meta.get("steps")
    if not isinstance(steps, (list, tuple)) or not steps:
        return None
    out = []
    for s in steps:
        m = _STEP.match(s) if isinstance(s, str) else None
        if m is None:
            return None
        try:
            out.append((m.group("expr").strip(), float(m.group("result").replace(",", ""))))
        except ValueError:
            return None
    return out


def _evaluate(expr: str) -> float:
    from ..data.gsm8k import EvalError, safe_eval

    try:
        return float(safe_eval(expr))
    except (EvalError, ZeroDivisionError, ValueError, SyntaxError):
        return math.nan


def _show(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def carried_answer(question: Any, step: int, value: float) -> float:
    """`question`'s answer with step `step`'s result set to `value` and the later steps re-evaluated."""
    chain = chain_steps(question)
    if chain is None or not 0 <= step < len(chain) or not math.isfinite(float(value)):
        return math.nan
    if chain[-1][1] != float(question.answer):
        return math.nan
    old = [r for _, r in chain]
    new = list(old)
    new[step] = float(value)
    for j in range(step + 1, len(chain)):
        expr = chain[j][0]
        changed = {old[i]: new[i] for i in range(step, j) if new[i] != old[i]}
        binary = _BINARY.match(expr)
        if binary and float(binary.group("a")) == old[j - 1]:
            expr = f"{_show(new[j - 1])}{binary.group('op')}{binary.group('b')}"
        elif changed:
            expr = _LITERAL.sub(lambda m, c=changed: _show(c.get(float(m.group()), float(m.group()))), expr)
        new[j] = _evaluate(expr)
        if not math.isfinite(new[j]):
            return math.nan
    return new[-1]

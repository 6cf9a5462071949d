"""Gold intermediate values: the result of every reasoning step of a question, where known.

A question carries its intermediate results in one of these forms (first match wins):

* a ``steps`` meta field (pairs files, `data.synthetic`), a list whose items are step strings
  (``"6-3=3"``: the number after the last ``=``), GSM8K calculator annotations
  (``"<<48/2=24>>"``, or prose holding several), or plain numbers;
* ``steps`` as one string (a GSM8K solution, or steps separated by newlines or ``;``);
* a GSM8K solution text in ``solution`` / ``answer_text`` / ``rationale`` / ``cot`` /
  ``gsm8k_answer`` holding ``<<expr=result>>`` annotations;
* ``intermediates``: a list of numbers.

An annotation without a stated result (``<<48/2>>``) is evaluated with the package's safe
arithmetic evaluator. A step that cannot be read is NaN (so later steps keep their index); a
question without any of these fields has no gold intermediates (an empty list), and every
readout that needs them is NaN for it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["GOLD_TEXT_FIELDS", "gold_intermediates", "parse_step"]

#: Meta fields that may hold a GSM8K-style solution with ``<<expr=result>>`` annotations.
GOLD_TEXT_FIELDS = ("solution", "answer_text", "rationale", "cot", "gsm8k_answer")
_ANNOTATION = re.compile(r"<<([^<>]*)>>")
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")


def _meta_of(question: Any) -> Mapping[str, Any]:
    """The metadata mapping of a `Question`, a flat pairs-file record or a plain meta dict."""
    meta = getattr(question, "meta", None)
    if isinstance(meta, Mapping):
        return meta
    if isinstance(question, Mapping):
        inner = question.get("meta")
        return inner if isinstance(inner, Mapping) else question
    return {}


def _number(text: str) -> float:
    """The last number in `text` ("$1,234.5" -> 1234.5); NaN when there is none."""
    found = _NUMBER.findall(text)
    if not found:
        return math.nan
    return float(found[-1].replace(",", ""))


def _annotation_value(inner: str) -> float:
    """The result of one ``expr=result`` annotation: the stated result, else the evaluated expression."""
    expr, sep, result = inner.rpartition("=")
    if sep and _NUMBER.search(result):
        return _number(result)
    from ..data.gsm8k import EvalError, safe_eval

    try:
        return float(safe_eval(inner if not sep else expr))
    except (EvalError, ZeroDivisionError, ValueError, SyntaxError):
        return math.nan


def parse_step(step: Any) -> list[float]:
    """The result(s) one `steps` item states: one value, or one per annotation it holds."""
    if isinstance(step, bool) or step is None:
        return [math.nan]
    if isinstance(step, (int, float)):
        return [float(step)]
    if not isinstance(step, str):
        return [math.nan]
    annotations = _ANNOTATION.findall(step)
    if annotations:
        return [_annotation_value(a) for a in annotations]
    _, sep, result = step.rpartition("=")
    return [_number(result if sep else step)]


def gold_intermediates(question: Any) -> list[float]:
    """The result of each reasoning step of `question`, in order (see the module docstring).

    `question` is a `data.pairs.Question`, a pairs-file record or a meta dict. Returns an empty
    list when the question carries no intermediate results; unreadable steps are NaN.
    """
    meta = _meta_of(question)
    steps = meta.get("steps")
    if isinstance(steps, str):
        if _ANNOTATION.search(steps):
            return [_annotation_value(a) for a in _ANNOTATION.findall(steps)]
        parts = [p for p in re.split(r"[\n;]+", steps) if p.strip()]
        return [v for p in parts for v in parse_step(p)]
    if isinstance(steps, (list, tuple)):
        return [v for s in steps for v in parse_step(s)]
    for name in GOLD_TEXT_FIELDS:
        text = meta.get(name)
        if isinstance(text, str) and _ANNOTATION.search(text):
            return [_annotation_value(a) for a in _ANNOTATION.findall(text)]
    values = meta.get("intermediates")
    if isinstance(values, (list, tuple)):
        return [v for s in values for v in parse_step(s)]
    return []

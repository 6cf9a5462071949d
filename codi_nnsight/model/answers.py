"""Reading and writing answer numbers the way CODI does (no model needed: used by the wrapper and inference)."""

from __future__ import annotations

import math
import re

__all__ = ["extract_answer_number", "format_answer"]

_NUMBER = re.compile(r"-?\d+\.?\d*")


def extract_answer_number(text: str) -> float | None:
    """The answer the way the official CODI code reads it: the last number, commas removed.

    Returns None where the text holds no number (the official code uses `inf`).
    """
    found = _NUMBER.findall(text.replace(",", ""))
    if not found:
        return None
    value = float(found[-1])
    return value if math.isfinite(value) else None


def format_answer(value: float) -> str:
    """An answer as the model writes it: integers without a decimal point."""
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))

"""Clean/corrupted question pairs: loading, validation and export.

A pairs file holds, for every ``pair_id``, one *clean* and one *corrupted* question with its true
numeric answer.  Three layouts are accepted and auto-detected:

1. a flat JSON list with two records per pair::

       [{"pair_id": 0, "variant": "clean", "question": "...", "answer": 12}, ...]

2. the same records as JSON Lines (one object per line);
3. a nested layout, one object per pair, as a JSON list or JSON Lines::

       {"pair_id": 0, "clean": {"question": ..., "answer": ...}, "corrupted": {...}}

Any extra field is kept verbatim in :attr:`Question.meta`.  The loader never raises anything but
:class:`PairsError` on bad file content, and :func:`validate_pairs` reports *all* problems at once.
Content that would crash a later step or be changed silently is refused at load time: lone UTF-16
surrogates anywhere (they cannot be written back as UTF-8), NUL in a question, non-finite answers,
a ``reasoning_steps`` that is not a non-negative int64, and duplicate keys in one JSON object (JSON
would keep only the last).  A GSM8K file given instead of a pairs file is recognised and the
command that converts it is named.

:func:`pair_warnings` lists valid pairs that cannot measure a flip (identical questions, equal
answers); :func:`pair_coordinates` is the single pair -> ``pair``-coordinates builder used by
:meth:`PairSet.to_xarray` and the patching results.
"""

from __future__ import annotations

import decimal
import hashlib
import json
import math
import numbers
import os
import re
import shlex
from collections import Counter
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

__all__ = [
    "PAIR_COORDINATES",
    "VARIANTS",
    "Pair",
    "PairSet",
    "PairsError",
    "PairsFileProblem",
    "Question",
    "load_pairs",
    "pair_coordinates",
    "pair_warnings",
    "pairs_summary",
    "validate_pairs",
]

VARIANTS = ("clean", "corrupted")
REQUIRED_FLAT = ("pair_id", "variant", "question", "answer")
# Largest magnitude that still fits the int64 ``pair`` coordinate of result datasets.
_INT64_MAX = 2**63 - 1
# Numeric strings we accept for answers: "18", "-3.5", "1,234", "1,234.5", "2e3".
_NUMERIC_STR = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?(?:[eE][+-]?\d+)?|[+-]?\.\d+(?:[eE][+-]?\d+)?")


@dataclass(frozen=True)
class Question:
    """One question of a pair: text, true numeric answer and free-form metadata."""

    question: str
    answer: float
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Pair:
    """A clean question and its minimally different corrupted counterpart."""

    pair_id: int
    clean: Question
    corrupted: Question


@dataclass(frozen=True)
class PairsFileProblem:
    """One thing wrong with a pairs file; ``str()`` gives a single human-readable line."""

    file: str
    index: int | None
    pair_id: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        loc = []
        if self.index is not None:
            loc.append(f"record {self.index}")
            if self.pair_id is not None:
                loc.append(f"(pair_id {self.pair_id})")
        elif self.pair_id is not None:
            loc.append(f"pair_id {self.pair_id}")
        where = " ".join(loc)
        if self.field is not None:
            where = f"{where}, field '{self.field}'" if where else f"field '{self.field}'"
        prefix = f"{self.file}: {where}" if where else self.file
        return f"{prefix}: {self.message}"


#: Former name of :class:`PairsFileProblem`, kept so existing imports keep working.
Problem = PairsFileProblem


class PairsError(UserError):
    """Raised by :func:`load_pairs` when a pairs file is unusable; see :attr:`problems`."""

    def __init__(self, problems: Sequence[PairsFileProblem]):
        self.problems: list[PairsFileProblem] = list(problems)
        lines = [str(p) for p in self.problems]
        if len(lines) == 1:
            msg = lines[0]
        else:
            msg = f"{len(lines)} problems found:\n" + "\n".join(lines)
        super().__init__(msg)


# --------------------------------------------------------------------------------------------
# PairSet
# --------------------------------------------------------------------------------------------


def _canonical_json(records: list[dict]) -> bytes:
    return json.dumps(records, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _answer_out(x: float) -> int | float:
    # Integral answers are written as JSON integers so files stay readable ("72", not "72.0").
    if isinstance(x, float) and math.isfinite(x) and x.is_integer() and abs(x) < 2**53:
        return int(x)
    return x


#: The per-pair coordinates every :func:`pair_coordinates` result holds, in this order.
PAIR_COORDINATES = ("question_clean", "question_corrupted", "answer_clean", "answer_corrupted", "reasoning_steps")


class PairSet:
    """An ordered, immutable collection of :class:`Pair` objects (file order)."""

    def __init__(
        self,
        pairs: Sequence[Pair],
        source: str | None = None,
        sha256: str | None = None,
        records: Mapping[int, tuple[int, ...]] | None = None,
    ):
        self._pairs: tuple[Pair, ...] = tuple(pairs)
        self.source: str | None = source
        self._sha256 = sha256
        # pair_id -> indices of its record(s) in the source file, so warnings can point at them.
        self._records: dict[int, tuple[int, ...]] = dict(records or {})

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_pairs(cls, pairs: Sequence[Pair], source: str | None = None) -> PairSet:
        """Build a PairSet in memory; ``sha256`` is that of the canonical JSON records."""
        seen: set[int] = set()
        for p in pairs:
            if p.pair_id in seen:
                raise ValueError(f"duplicate pair_id {p.pair_id}")
            seen.add(p.pair_id)
        return cls(pairs, source=None if source is None else str(source))

    # -- sequence protocol ----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._pairs)

    def __iter__(self) -> Iterator[Pair]:
        return iter(self._pairs)

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            # A slice of unique pairs stays unique; keep the record indices of the source file.
            return PairSet(self._pairs[i], source=self.source, records=self._records)
        return self._pairs[i]

    def __eq__(self, other: object) -> bool:
        # Equality is about content, so the same pairs loaded from different layouts are equal.
        if not isinstance(other, PairSet):
            return NotImplemented
        return self._pairs == other._pairs

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PairSet({len(self)} pairs, source={self.source!r})"

    # -- properties -----------------------------------------------------------------------
    @property
    def ids(self) -> list[int]:
        """Pair ids in file order."""
        return [p.pair_id for p in self._pairs]

    @property
    def sha256(self) -> str:
        """SHA-256 of the source file bytes, or of canonical JSON when built in memory."""
        if self._sha256 is None:
            self._sha256 = hashlib.sha256(_canonical_json(self.to_records())).hexdigest()
        return self._sha256

    def limit(self, n: int | None) -> PairSet:
        """First ``n`` pairs (all when ``n`` is None or >= len)."""
        if n is None or n >= len(self):
            return self
        if n < 0:
            raise ValueError("limit must be >= 0")
        # A subset no longer matches the file bytes, so its hash is recomputed from content.
        return PairSet(self._pairs[:n], source=self.source, records=self._records)

    def record_indices(self, k: int) -> tuple[int, ...]:
        """Record indices of the ``k``-th pair: in the source file when loaded from one (one index
        for the nested layout, clean and corrupted for the flat one), else those :meth:`save`
        would write (``2k``, ``2k + 1``)."""
        found = self._records.get(self._pairs[k].pair_id)
        return found if found is not None else (2 * k, 2 * k + 1)

    # -- export ---------------------------------------------------------------------------
    def to_records(self) -> list[dict]:
        """Flat records: clean then corrupted per pair, meta fields included."""
        out: list[dict] = []
        for p in self._pairs:
            for variant in VARIANTS:
                q: Question = getattr(p, variant)
                rec = {
                    "pair_id": p.pair_id,
                    "variant": variant,
                    "question": q.question,
                    "answer": _answer_out(q.answer),
                }
                for k, v in q.meta.items():
                    if k not in rec:
                        rec[k] = v
                out.append(rec)
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the flat records as a JSON list, or JSON Lines if ``path`` ends in ``.jsonl``."""
        path = Path(path)
        records = self.to_records()
        if path.suffix.lower() == ".jsonl":
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        else:
            text = json.dumps(records, indent=2, ensure_ascii=False) + "\n"
        from ..atomic import write_text_atomic

        return write_text_atomic(path, text)

    def _meta_keys(self) -> list[str]:
        return _meta_keys(self._pairs)

    def _meta_columns(self) -> dict[str, list[Any]]:
        """Meta as per-pair columns: plain name when clean == corrupted everywhere, else split."""
        cols: dict[str, list[Any]] = {}
        reserved = {"pair_id", "question_clean", "question_corrupted"}
        reserved |= {"answer_clean", "answer_corrupted"}
        for k in self._meta_keys():
            clean = [p.clean.meta.get(k) for p in self._pairs]
            corrupted = [p.corrupted.meta.get(k) for p in self._pairs]
            # Missing on both sides counts as equal; missing on one side counts as different.
            same = all(
                (k in p.clean.meta) == (k in p.corrupted.meta) and a == b
                for p, a, b in zip(self._pairs, clean, corrupted)
            )
            if same and k not in reserved:
                cols[k] = clean
            else:
                cols[f"{k}_clean"] = clean
                cols[f"{k}_corrupted"] = corrupted
        return cols

    def to_pandas(self) -> Any:
        """One row per pair: ids, questions, answers and meta columns."""
        import pandas as pd

        data: dict[str, list[Any]] = {
            "pair_id": self.ids,
            "question_clean": [p.clean.question for p in self._pairs],
            "question_corrupted": [p.corrupted.question for p in self._pairs],
            "answer_clean": [p.clean.answer for p in self._pairs],
            "answer_corrupted": [p.corrupted.answer for p in self._pairs],
        }
        for k, v in self._meta_columns().items():
            data.setdefault(k, v)
        return pd.DataFrame(data)

    def reasoning_steps(self) -> list[int]:
        """Per-pair reasoning steps, -1 when unknown (the rule of :func:`pair_coordinates`)."""
        return [_reasoning_steps(p) for p in self._pairs]

    def to_xarray(self) -> Any:
        """``xarray.Dataset`` with dim ``pair`` (coordinate = pair ids, int64).

        Its data variables are exactly :func:`pair_coordinates` of these pairs (questions,
        answers, ``reasoning_steps`` and numeric/bool meta); attrs ``pairs_sha256`` and
        ``pairs_file``.
        """
        import xarray as xr

        ds = xr.Dataset(pair_coordinates(self._pairs), coords={"pair": np.array(self.ids, dtype=np.int64)})
        ds.attrs["pairs_sha256"] = self.sha256
        ds.attrs["pairs_file"] = self.source or ""
        return ds


# --------------------------------------------------------------------------------------------
# Per-pair coordinates
# --------------------------------------------------------------------------------------------

_MISSING = object()


def _meta_keys(pairs: Sequence[Pair]) -> list[str]:
    """Meta keys in order of first appearance (pairs in order, clean before corrupted)."""
    keys: dict[str, None] = {}
    for p in pairs:
        for q in (p.clean, p.corrupted):
            for k in q.meta:
                keys.setdefault(k, None)
    return list(keys)


def _steps_value(v: Any) -> int | None:
    """``v`` as a non-negative int64 step count, or None when it is not one."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        return None
    if isinstance(v, numbers.Integral):
        n = int(v)
    else:
        x = float(v)
        if not math.isfinite(x) or not x.is_integer():
            return None
        n = int(x)
    return n if 0 <= n <= _INT64_MAX else None


def _reasoning_steps(p: Pair) -> int:
    """The clean question's ``reasoning_steps`` when it has the key, else the corrupted one's,
    else -1.  ``None`` counts as unknown; any other value that is not a non-negative int64
    raises ValueError (files are checked at load, so this only concerns pairs built in code)."""
    for q in (p.clean, p.corrupted):
        v = q.meta.get("reasoning_steps")
        if v is None:
            continue
        n = _steps_value(v)
        if n is None:
            raise ValueError(f"pair_id {p.pair_id}: reasoning_steps {v!r} is not a non-negative integer")
        return n
    return -1


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        if bool(a == b):
            return True
    except (ValueError, TypeError):  # e.g. numpy arrays in meta built in code
        return False
    return isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)


def _numeric_column(values: list[Any]) -> np.ndarray | None:
    """int64 when every pair has an int (or bool) value that fits, else float64 with NaN for
    missing (``None`` counts as missing); None when some value is not a bool or real number, or
    an integer is too large for float64, or no pair has a value."""
    present = [v for v in values if v is not _MISSING and v is not None]
    if not present:
        return None
    if not all(isinstance(v, (numbers.Real, np.bool_)) and not isinstance(v, str) for v in present):
        return None
    integral = all(isinstance(v, (numbers.Integral, np.bool_)) for v in present)
    if integral and len(present) == len(values) and all(abs(int(v)) <= _INT64_MAX for v in present):
        return np.array([int(v) for v in values], dtype=np.int64)
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        if v is _MISSING or v is None:
            out[i] = np.nan
            continue
        try:
            out[i] = float(v)
        except OverflowError:  # an integer beyond float64: no faithful numeric column
            return None
    return out


def pair_coordinates(pairs: Sequence[Pair], reserved: Collection[str] = ()) -> dict[str, tuple[str, np.ndarray]]:
    """Per-pair coordinates for dim ``"pair"``, as ``{name: ("pair", values)}``.

    Always, in this order: ``question_clean`` and ``question_corrupted`` (object arrays of str),
    ``answer_clean`` and ``answer_corrupted`` (float64), ``reasoning_steps`` (int64; the clean
    question's value when it has one, else the corrupted question's, else -1 = unknown).

    Then one coordinate per other meta key whose values are bools or real numbers, in order of
    first appearance: named ``key`` when clean and corrupted agree for every pair (missing on
    both sides agrees), else ``key_clean`` and ``key_corrupted``.  It is int64 when every pair has
    an integer or bool value, else float64 with NaN where a pair lacks the key (or has null).
    A column with any other value (string, list, an integer beyond float64) is left out.

    Name collisions: a meta column whose name is already taken -- by the five names above,
    ``pair``, a name in ``reserved`` (pass the variables and dims of the Dataset the coordinates
    go into) or an earlier meta column -- is prefixed with ``meta_`` until it is free.

    Names and dtypes depend on all the pairs, so build the coordinates once for the whole set
    rather than per batch.
    """
    pairs = list(pairs)
    coords: dict[str, tuple[str, np.ndarray]] = {
        "question_clean": ("pair", np.array([p.clean.question for p in pairs], dtype=object)),
        "question_corrupted": ("pair", np.array([p.corrupted.question for p in pairs], dtype=object)),
        "answer_clean": ("pair", np.array([float(p.clean.answer) for p in pairs], dtype=np.float64)),
        "answer_corrupted": ("pair", np.array([float(p.corrupted.answer) for p in pairs], dtype=np.float64)),
        "reasoning_steps": ("pair", np.array([_reasoning_steps(p) for p in pairs], dtype=np.int64)),
    }
    taken = set(coords) | {"pair"} | set(reserved)
    for key in _meta_keys(pairs):
        if key == "reasoning_steps":
            continue  # already a fixed coordinate
        clean = [p.clean.meta.get(key, _MISSING) for p in pairs]
        corrupted = [p.corrupted.meta.get(key, _MISSING) for p in pairs]
        if all(_same(a, b) for a, b in zip(clean, corrupted)):
            columns = [(key, clean)]
        else:
            columns = [(f"{key}_clean", clean), (f"{key}_corrupted", corrupted)]
        for name, values in columns:
            arr = _numeric_column(values)
            if arr is None:
                continue
            while name in taken:
                name = "meta_" + name
            taken.add(name)
            coords[name] = ("pair", arr)
    return coords


# --------------------------------------------------------------------------------------------
# Warnings: valid pairs that cannot measure a flip
# --------------------------------------------------------------------------------------------


def _where(pairset: PairSet, k: int) -> str:
    file = pairset.source or "<in memory>"
    idx = pairset.record_indices(k)
    records = f"record {idx[0]}" if len(idx) == 1 else "records " + " and ".join(str(i) for i in idx)
    return f"{file}: {records} (pair_id {pairset[k].pair_id})"


def pair_warnings(pairset: PairSet) -> list[str]:
    """One line per pair that is valid but cannot measure a flip.

    Two kinds: clean and corrupted questions that are identical (patching one into the other
    changes nothing; only pairs built in code, since a file holding one is refused), and clean
    and corrupted answers that are equal (a flip to the clean answer
    is indistinguishable from no effect; logit-difference metrics are undefined).  Each line
    names the file, the record index(es) and the pair_id; pairs in file order, identical
    questions before equal answers for the same pair.
    """
    out: list[str] = []
    for k, p in enumerate(pairset):
        if p.clean.question == p.corrupted.question:
            out.append(f"{_where(pairset, k)}: clean and corrupted questions are identical, so patching does nothing")
        if p.clean.answer == p.corrupted.answer:
            out.append(
                f"{_where(pairset, k)}: clean and corrupted answers are equal ({_answer_out(p.clean.answer)}), "
                "so a flip cannot be measured"
            )
    return out


# --------------------------------------------------------------------------------------------
# Loading / validation
# --------------------------------------------------------------------------------------------


def _json_type(v: Any) -> str:
    if isinstance(v, dict):
        return "object"
    if isinstance(v, list):
        return "list"
    if isinstance(v, str):
        return "string"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if v is None:
        return "null"
    return type(v).__name__


_SURROGATE = re.compile("[\ud800-\udfff]")


def _printable(s: str) -> str:
    """``s`` with lone surrogates escaped (``\\ud800``): such text cannot be printed as UTF-8."""
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", s)


def _show(v: Any, width: int = 40) -> str:
    """Short JSON rendering of a value for messages."""
    try:
        s = json.dumps(v, ensure_ascii=False)
    except (ValueError, TypeError, RecursionError):
        s = repr(v)
    s = _printable(s)
    return s if len(s) <= width else s[: width - 3] + "..."


class _Collector:
    """Accumulates problems for one file."""

    def __init__(self, file: str):
        self.file = file
        self.problems: list[PairsFileProblem] = []

    def add(
        self,
        message: str,
        index: int | None = None,
        pair_id: int | None = None,
        field: str | None = None,
    ) -> None:
        self.problems.append(PairsFileProblem(self.file, index, pair_id, field, message))


class _DuplicateKeysDict(dict):
    """A decoded JSON object that repeated some keys (JSON keeps only the last value)."""

    duplicate_keys: list[str]


def _object_pairs(items: list[tuple[str, Any]]) -> dict:
    # json.loads silently keeps the last of repeated keys; remember them so they can be reported.
    obj = dict(items)
    if len(obj) == len(items):
        return obj
    seen: set[str] = set()
    dups: list[str] = []
    for k, _ in items:
        if k in seen and k not in dups:
            dups.append(k)
        seen.add(k)
    marked = _DuplicateKeysDict(obj)
    marked.duplicate_keys = dups
    return marked


class _InexactFloat(float):
    """A JSON number that float64 cannot hold as written (``12345678901234567891.0``); keeps the text."""

    text: str


def _parse_float(text: str) -> float:
    x = float(text)
    if math.isfinite(x) and _exact_decimal(text) != _exact_decimal(repr(x)):
        marked = _InexactFloat(x)
        marked.text = text
        return marked
    return x


def _exact_decimal(text: str) -> decimal.Decimal:
    return decimal.Decimal(text.replace(",", ""))


def _loads(text: str) -> Any:
    return json.loads(text, object_pairs_hook=_object_pairs, parse_float=_parse_float)


def _check_duplicate_keys(obj: dict, col: _Collector, index: int, pair_id: int | None, prefix: str) -> bool:
    dups = getattr(obj, "duplicate_keys", ())
    for k in dups:
        col.add("duplicate key in one JSON object (only the last value would be kept)", index, pair_id, prefix + k)
    return not dups


def _surrogate_in(v: Any, depth: int = 0) -> str | None:
    """The first lone surrogate in a JSON value (keys included), or None."""
    if isinstance(v, str):
        m = _SURROGATE.search(v)
        return m.group() if m else None
    if depth > 50:  # the JSON decoder bounds nesting anyway; this keeps the walk cheap
        return None
    if isinstance(v, dict):
        for k, x in v.items():
            found = _surrogate_in(k, depth + 1) or _surrogate_in(x, depth + 1)
            if found:
                return found
    elif isinstance(v, list):
        for x in v:
            found = _surrogate_in(x, depth + 1)
            if found:
                return found
    return None


def _surrogate_message(ch: str) -> str:
    return f"contains a lone surrogate U+{ord(ch):04X} (not encodable as UTF-8)"


def _check_meta(meta: dict, col: _Collector, index: int, pair_id: int | None, prefix: str) -> bool:
    """Check metadata fields: ``reasoning_steps`` is a non-negative int64; no lone surrogates."""
    ok = True
    for k, v in meta.items():
        name = prefix + _printable(k)
        ch = _surrogate_in(k) or _surrogate_in(v)
        if ch is not None:
            # save() writes UTF-8, which cannot encode a lone surrogate.
            col.add(_surrogate_message(ch), index, pair_id, name)
            ok = False
        elif k == "reasoning_steps":
            err = _steps_error(v)
            if err is not None:
                col.add(err, index, pair_id, name)
                ok = False
    return ok


def _steps_error(v: Any) -> str | None:
    if _steps_value(v) is not None:
        return None
    if isinstance(v, int) and not isinstance(v, bool) and v > _INT64_MAX:
        return f"integer out of range: {_show(v)}"
    if isinstance(v, float) and math.isfinite(v) and v.is_integer() and v > _INT64_MAX:
        return f"integer out of range: {v!r}"
    shown = repr(v) if isinstance(v, float) else _show(v)
    return f"not a non-negative integer: {shown}"


def _parse_answer(v: Any) -> tuple[float | None, str | None]:
    """Return (value, None) or (None, error message)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        return None, f"not a number: {_show(v)}"
    if isinstance(v, str):
        s = v.strip()
        if not _NUMERIC_STR.fullmatch(s):
            return None, f"not a number: {_show(v)}"
        try:
            x = float(s.replace(",", ""))
        except ValueError:  # pragma: no cover - regex guarantees parseability
            return None, f"not a number: {_show(v)}"
        shown = s
    else:
        try:
            x = float(v)
        except OverflowError:  # huge JSON integers
            return None, f"not a finite number: {_show(v)}"
        shown = repr(v) if isinstance(v, float) else _show(v)
    if not math.isfinite(x):
        return None, f"not a finite number: {shown}"
    written = v.text if isinstance(v, _InexactFloat) else shown if isinstance(v, str) else None
    inexact = (
        isinstance(v, _InexactFloat)
        or (isinstance(v, int) and int(x) != v)
        or (isinstance(v, str) and _exact_decimal(s) != _exact_decimal(repr(x)))
    )
    if inexact:
        # Scores compare answers as float64: a rounded answer would be scored against another number.
        stored = int(x) if x.is_integer() else x
        return None, f"{written or _show(v)} is not exact in float64 (it would be stored as {stored!r})"
    return x, None


def _parse_pair_id(v: Any) -> tuple[int | None, str | None]:
    if isinstance(v, bool) or not isinstance(v, int):
        return None, f"not an integer: {_show(v)}"
    if abs(v) > _INT64_MAX:
        return None, f"integer out of range: {_show(v)}"
    return v, None


def _question_error(text: str) -> str | None:
    """Why a question string is unusable, or None."""
    if not text.strip():
        return "empty question"
    m = _SURROGATE.search(text)
    if m:
        # Tokenizers and UTF-8 writers (save, netCDF) fail on it.
        return f"{_surrogate_message(m.group())} at character {m.start()}"
    if "\x00" in text:
        # netCDF strings end at NUL, so the stored question would silently be cut there.
        return f"contains a NUL character at character {text.index(chr(0))}"
    return None


def _parse_question(
    obj: dict, col: _Collector, index: int, pair_id: int | None, prefix: str, drop: tuple
) -> Question | None:
    """Validate question/answer fields of ``obj``; meta = every other key except ``drop``."""
    ok = _check_duplicate_keys(obj, col, index, pair_id, prefix)
    text = obj.get("question")
    if "question" not in obj:
        col.add("missing required field", index, pair_id, prefix + "question")
        ok = False
    elif not isinstance(text, str):
        col.add(f"not a string (got {_json_type(text)})", index, pair_id, prefix + "question")
        ok = False
    else:
        err = _question_error(text)
        if err is not None:
            col.add(err, index, pair_id, prefix + "question")
            ok = False
    answer = None
    if "answer" not in obj:
        col.add("missing required field", index, pair_id, prefix + "answer")
        ok = False
    else:
        answer, err = _parse_answer(obj["answer"])
        if err is not None:
            col.add(err, index, pair_id, prefix + "answer")
            ok = False
    meta = {k: v for k, v in obj.items() if k not in ("question", "answer") and k not in drop}
    ok = _check_meta(meta, col, index, pair_id, prefix) and ok
    if not ok:
        return None
    return Question(question=text, answer=answer, meta=meta)


def _read_records(path: Path, col: _Collector) -> tuple[list[Any] | None, bytes | None]:
    """Read and JSON-decode the file; returns (records, raw bytes) or (None, ...) on failure."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        col.add("file not found")
        return None, None
    except IsADirectoryError:
        col.add("is a directory, not a file")
        return None, None
    except OSError as e:
        col.add(f"cannot read file: {e.strerror or e}")
        return None, None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        col.add(f"not valid UTF-8 at byte {e.start}")
        return None, raw
    text = text.removeprefix("\ufeff")  # tolerate a UTF-8 byte-order mark
    if not text.strip():
        col.add("file is empty")
        return None, raw

    is_jsonl_name = path.suffix.lower() == ".jsonl"
    try:
        doc = _loads(text)
    except json.JSONDecodeError as e:
        # Several top-level objects on separate lines: JSON Lines.
        if is_jsonl_name or text.lstrip().startswith("{"):
            return _read_jsonl(text, col), raw
        col.add(f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}")
        return None, raw
    except RecursionError:
        col.add("invalid JSON: nesting too deep")
        return None, raw
    except ValueError as e:  # e.g. integers beyond Python's digit limit
        col.add(f"invalid JSON: {e}")
        return None, raw

    if isinstance(doc, list):
        if not doc:
            col.add("no records (empty list)")
            return None, raw
        return doc, raw
    if isinstance(doc, dict) and (is_jsonl_name or "\n" not in text.strip() or _is_gsm8k([doc])):
        return [doc], raw  # JSON Lines file holding a single record
    col.add(f"top level must be a list of records, got {_json_type(doc)}")
    return None, raw


def _read_jsonl(text: str, col: _Collector) -> list[Any] | None:
    records: list[Any] = []
    ok = True
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(_loads(line))
        except json.JSONDecodeError as e:
            col.add(f"invalid JSON at line {lineno}, column {e.colno}: {e.msg}")
            ok = False
        except RecursionError:
            col.add(f"invalid JSON at line {lineno}: nesting too deep")
            ok = False
        except ValueError as e:
            col.add(f"invalid JSON at line {lineno}: {e}")
            ok = False
    return records if ok else None


_PAIR_KEYS = ("pair_id", "variant") + VARIANTS


def _is_gsm8k(records: list[Any]) -> bool:
    """Every record is a GSM8K problem: ``question`` and an ``answer`` text holding ``#### X``,
    and nothing of a pairs file (``pair_id``, ``variant``, ``clean``, ``corrupted``)."""
    return bool(records) and all(
        isinstance(r, dict)
        and not any(k in r for k in _PAIR_KEYS)
        and isinstance(r.get("question"), str)
        and isinstance(r.get("answer"), str)
        and "####" in r["answer"]
        for r in records
    )


def _is_nested(records: list[Any]) -> bool:
    for r in records:
        if isinstance(r, dict):
            return "variant" not in r and ("clean" in r or "corrupted" in r)
    return False


def _record_pair_id(rec: dict, i: int, col: _Collector) -> int | None:
    """The record's pair_id, or None after reporting why it is missing or unusable."""
    if "pair_id" not in rec:
        col.add("missing required field", i, None, "pair_id")
        return None
    pid, err = _parse_pair_id(rec["pair_id"])
    if err is not None:
        col.add(err, i, None, "pair_id")
    return pid


#: A pair whose questions are identical measures nothing: every patch is a no-op, so a sweep
#: would report every pair "flipped" with KL ~1e-14. Files are refused; in-memory pairs warn.
_SAME_QUESTIONS = "clean and corrupted questions are identical, so patching does nothing"


def _build_flat(records: list[Any], col: _Collector) -> tuple[list[Pair], dict[int, tuple[int, ...]]]:
    # pair_id -> {variant: record index}; tracks presence even for records with bad content,
    # so one bad answer does not also produce a spurious "no partner" problem.
    seen: dict[int, dict[str, int]] = {}
    questions: dict[tuple[int, str], Question] = {}
    order: list[int] = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            col.add(f"record is not an object (got {_json_type(rec)})", i)
            continue
        pid = _record_pair_id(rec, i, col)
        variant = None
        if "variant" not in rec:
            col.add("missing required field", i, pid, "variant")
        elif rec["variant"] not in VARIANTS:
            col.add(
                f'unknown variant {_show(rec["variant"])} (expected "clean" or "corrupted")',
                i,
                pid,
                "variant",
            )
        else:
            variant = rec["variant"]
        q = _parse_question(rec, col, i, pid, "", drop=("pair_id", "variant"))
        if pid is None or variant is None:
            continue
        slots = seen.get(pid)
        if slots is None:
            slots = seen[pid] = {}
            order.append(pid)
        if variant in slots:
            col.add(
                f'duplicate "{variant}" record (first at record {slots[variant]})',
                i,
                pid,
                "variant",
            )
            continue
        slots[variant] = i
        if q is not None:
            questions[(pid, variant)] = q
    pairs: list[Pair] = []
    where: dict[int, tuple[int, ...]] = {}
    for pid in order:
        slots = seen[pid]
        for variant, other in ((VARIANTS[0], VARIANTS[1]), (VARIANTS[1], VARIANTS[0])):
            if variant in slots and other not in slots:
                col.add(f'no "{other}" record for this pair', slots[variant], pid)
        c, k = questions.get((pid, "clean")), questions.get((pid, "corrupted"))
        if c is not None and k is not None:
            if c.question == k.question:
                col.add(_SAME_QUESTIONS + f" (as record {slots['clean']})", slots["corrupted"], pid, "question")
                continue
            pairs.append(Pair(pid, c, k))
            where[pid] = (slots["clean"], slots["corrupted"])
    return pairs, where


def _build_nested(records: list[Any], col: _Collector) -> tuple[list[Pair], dict[int, tuple[int, ...]]]:
    first_index: dict[int, int] = {}
    pairs: list[Pair] = []
    where: dict[int, tuple[int, ...]] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            col.add(f"record is not an object (got {_json_type(rec)})", i)
            continue
        pid = _record_pair_id(rec, i, col)
        duplicate = False
        if pid is not None:
            if pid in first_index:
                col.add(f"duplicate pair_id (first at record {first_index[pid]})", i, pid, "pair_id")
                duplicate = True
            else:
                first_index[pid] = i
        shared_ok = _check_duplicate_keys(rec, col, i, pid, "")
        for k in ("question", "answer", "variant"):
            if k in rec:
                # Shared meta goes into both questions; these names would clash with their own fields.
                col.add('belongs inside "clean" and "corrupted" in a nested record', i, pid, k)
                shared_ok = False
        shared = {k: v for k, v in rec.items() if k not in ("pair_id", "question", "answer", "variant") + VARIANTS}
        shared_ok = _check_meta(shared, col, i, pid, "") and shared_ok
        qs: dict[str, Question | None] = {}
        for variant in VARIANTS:
            sub = rec.get(variant)
            if variant not in rec:
                col.add("missing required field", i, pid, variant)
                qs[variant] = None
            elif not isinstance(sub, dict):
                col.add(f"not an object (got {_json_type(sub)})", i, pid, variant)
                qs[variant] = None
            else:
                qs[variant] = _nested_question(sub, variant, col, i, pid, shared)
        c, k = qs["clean"], qs["corrupted"]
        if c is not None and k is not None and c.question == k.question:
            col.add(_SAME_QUESTIONS + " (as clean.question)", i, pid, "corrupted.question")
            continue
        if pid is not None and not duplicate and shared_ok and c is not None and k is not None:
            pairs.append(Pair(pid, c, k))
            where[pid] = (i,)
    return pairs, where


def _nested_question(
    sub: dict, variant: str, col: _Collector, i: int, pid: int | None, shared: dict
) -> Question | None:
    """One variant of a nested record; a redundant inner ``pair_id``/``variant`` must agree."""
    ok = True
    # These inner fields are dropped, so a contradicting value would vanish without a word.
    if "variant" in sub and sub["variant"] != variant:
        col.add(f'is {_show(sub["variant"])} inside "{variant}"', i, pid, f"{variant}.variant")
        ok = False
    if "pair_id" in sub and pid is not None and (type(sub["pair_id"]) is not int or sub["pair_id"] != pid):
        col.add(f"{_show(sub['pair_id'])} differs from the record's pair_id", i, pid, f"{variant}.pair_id")
        ok = False
    q = _parse_question(sub, col, i, pid, variant + ".", drop=("pair_id", "variant"))
    if q is None or not ok:
        return None
    if shared:
        # Per-variant fields win over shared ones of the same name.
        q = Question(q.question, q.answer, {**shared, **q.meta})
    return q


def _gsm8k_problem(path: str | os.PathLike) -> str:
    return (
        'a GSM8K file (records with "question" and an "answer" ending in "#### N"), not a pairs file; '
        f"make pairs from it with: codi-nnsight pairs make --gsm8k {shlex.quote(str(path))} --out pairs.json"
    )


def _validate(path: str | os.PathLike) -> tuple[PairSet | None, list[PairsFileProblem]]:
    p = Path(path)
    col = _Collector(str(path))
    records, raw = _read_records(p, col)
    if records is None:
        return None, col.problems
    if _is_gsm8k(records):
        col.add(_gsm8k_problem(path))
        return None, col.problems
    pairs, where = (_build_nested if _is_nested(records) else _build_flat)(records, col)
    if col.problems:
        return None, col.problems
    if not pairs:  # pragma: no cover - non-empty valid records always yield pairs
        col.add("no pairs")
        return None, col.problems
    sha = hashlib.sha256(raw).hexdigest() if raw is not None else None
    return PairSet(pairs, source=str(path), sha256=sha, records=where), []


def validate_pairs(path: str | os.PathLike) -> tuple[PairSet | None, list[PairsFileProblem]]:
    """Check a pairs file and collect *all* problems; never raises.

    Returns ``(pairset, [])`` when the file is valid, else ``(None, problems)``.  A pair whose
    clean and corrupted questions are identical is a problem (it measures nothing); one whose
    answers are equal is valid but cannot measure a flip: see :func:`pair_warnings`.  Answers
    must be exact in float64 (``12345678901234567891`` would be scored as ...168).
    """
    try:
        return _validate(path)
    except Exception as e:  # noqa: BLE001 - last-resort guard: validation must never raise
        return None, [PairsFileProblem(str(path), None, None, None, f"internal error: {_printable(repr(e))}")]


def load_pairs(path: str | os.PathLike) -> PairSet:
    """Load a pairs file (any supported layout); raise :class:`PairsError` if anything is wrong."""
    pairset, problems = validate_pairs(path)
    if problems or pairset is None:
        raise PairsError(problems)
    return pairset


def _count(n: int) -> str:
    return f"{n} pair" if n == 1 else f"{n} pairs"


def pairs_summary(pairset: PairSet) -> str:
    """Multi-line human summary: pair count, reasoning-steps histogram, and how many pairs have
    identical questions or equal answers (the pairs :func:`pair_warnings` lists)."""
    lines = [f"{len(pairset)} pairs"]
    if pairset.source:
        lines[0] += f" from {pairset.source}"
    lines.append(f"sha256: {pairset.sha256}")
    steps = pairset.reasoning_steps()
    known = Counter(s for s in steps if s >= 0)
    if known:
        hist = ", ".join(f"{k}: {v}" for k, v in sorted(known.items()))
        unknown = sum(1 for s in steps if s < 0)
        extra = f" (unknown: {unknown})" if unknown else ""
        lines.append(f"reasoning steps histogram: {hist}{extra}")
    else:
        lines.append("reasoning steps: unknown")
    same_q = [p.pair_id for p in pairset if p.clean.question == p.corrupted.question]
    if same_q:
        ids = ", ".join(str(i) for i in same_q)
        lines.append(f"{_count(len(same_q))} with identical clean and corrupted questions (nothing to patch): {ids}")
    else:
        lines.append("no pairs with identical clean and corrupted questions")
    equal = [p.pair_id for p in pairset if p.clean.answer == p.corrupted.answer]
    if equal:
        ids = ", ".join(str(i) for i in equal)
        lines.append(
            f"{_count(len(equal))} with equal clean and corrupted answers "
            f"(flip not measurable, logit-difference metrics undefined): {ids}"
        )
    else:
        lines.append("no pairs with equal clean and corrupted answers")
    return "\n".join(lines)

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
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError

__all__ = [
    "VARIANTS",
    "Pair",
    "PairSet",
    "PairsError",
    "Problem",
    "Question",
    "load_pairs",
    "pairs_summary",
    "validate_pairs",
]

VARIANTS = ("clean", "corrupted")
REQUIRED_FLAT = ("pair_id", "variant", "question", "answer")
# Largest magnitude that still fits the int64 ``pair`` coordinate of result datasets.
_INT64_MAX = 2**63 - 1
# Numeric strings we accept for answers: "18", "-3.5", "1,234", "1,234.5", "2e3".
_NUMERIC_STR = re.compile(
    r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?(?:[eE][+-]?\d+)?|[+-]?\.\d+(?:[eE][+-]?\d+)?"
)


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
class Problem:
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


class PairsError(UserError):
    """Raised by :func:`load_pairs` when a pairs file is unusable; see :attr:`problems`."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems: list[Problem] = list(problems)
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
    return json.dumps(records, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )


def _answer_out(x: float) -> int | float:
    # Integral answers are written as JSON integers so files stay readable ("72", not "72.0").
    if isinstance(x, float) and math.isfinite(x) and x.is_integer() and abs(x) < 2**53:
        return int(x)
    return x


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class PairSet:
    """An ordered, immutable collection of :class:`Pair` objects (file order)."""

    def __init__(self, pairs: Sequence[Pair], source: str | None = None, sha256: str | None = None):
        self._pairs: tuple[Pair, ...] = tuple(pairs)
        self.source: str | None = source
        self._sha256 = sha256

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
            return PairSet.from_pairs(self._pairs[i], source=self.source)
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
        return PairSet(self._pairs[:n], source=self.source)

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
        path.write_text(text, encoding="utf-8")
        return path

    def _meta_keys(self) -> list[str]:
        keys: dict[str, None] = {}
        for p in self._pairs:
            for q in (p.clean, p.corrupted):
                for k in q.meta:
                    keys.setdefault(k, None)
        return list(keys)

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
        """Per-pair reasoning steps (clean meta, else corrupted meta), -1 when unknown."""
        out = []
        for p in self._pairs:
            steps = -1
            for q in (p.clean, p.corrupted):
                v = q.meta.get("reasoning_steps")
                if isinstance(v, int) and not isinstance(v, bool) and abs(v) <= _INT64_MAX:
                    steps = v
                    break
            out.append(steps)
        return out

    def to_xarray(self) -> Any:
        """``xarray.Dataset`` with dim ``pair`` (coordinate = pair ids).

        Variables: question_clean, question_corrupted (str), answer_clean, answer_corrupted
        (float64), reasoning_steps (int64, -1 unknown), plus any other numeric/bool meta
        (int64 when complete and integral, else float64 with NaN for missing).
        """
        import numpy as np
        import xarray as xr

        n = len(self)
        data_vars: dict[str, Any] = {
            "question_clean": ("pair", np.array([p.clean.question for p in self], dtype=object)),
            "question_corrupted": (
                "pair",
                np.array([p.corrupted.question for p in self], dtype=object),
            ),
            "answer_clean": ("pair", np.array([p.clean.answer for p in self], dtype=np.float64)),
            "answer_corrupted": (
                "pair",
                np.array([p.corrupted.answer for p in self], dtype=np.float64),
            ),
            "reasoning_steps": ("pair", np.array(self.reasoning_steps(), dtype=np.int64)),
        }
        for name, values in self._meta_columns().items():
            if name in data_vars or name == "pair" or name.startswith("reasoning_steps"):
                continue
            present = [v for v in values if v is not None]
            if not present or not all(_is_number(v) or isinstance(v, bool) for v in present):
                continue  # netCDF-friendly: only numeric meta becomes a variable
            ints = all(isinstance(v, (int, bool)) and abs(int(v)) <= _INT64_MAX for v in present)
            if ints and len(present) == n:
                arr = np.array([int(v) for v in values], dtype=np.int64)
            else:
                arr = np.array(
                    [np.nan if v is None else float(v) for v in values], dtype=np.float64
                )
            data_vars[name] = ("pair", arr)
        ds = xr.Dataset(data_vars, coords={"pair": np.array(self.ids, dtype=np.int64)})
        ds.attrs["pairs_sha256"] = self.sha256
        ds.attrs["pairs_file"] = self.source or ""
        return ds


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


def _show(v: Any, width: int = 40) -> str:
    """Short JSON rendering of a value for messages."""
    try:
        s = json.dumps(v, ensure_ascii=False)
    except (ValueError, TypeError, RecursionError):
        s = repr(v)
    return s if len(s) <= width else s[: width - 3] + "..."


class _Collector:
    """Accumulates problems for one file."""

    def __init__(self, file: str):
        self.file = file
        self.problems: list[Problem] = []

    def add(
        self,
        message: str,
        index: int | None = None,
        pair_id: int | None = None,
        field: str | None = None,
    ) -> None:
        self.problems.append(Problem(self.file, index, pair_id, field, message))


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
    return x, None


def _parse_pair_id(v: Any) -> tuple[int | None, str | None]:
    if isinstance(v, bool) or not isinstance(v, int):
        return None, f"not an integer: {_show(v)}"
    if abs(v) > _INT64_MAX:
        return None, f"integer out of range: {_show(v)}"
    return v, None


def _parse_question(
    obj: dict, col: _Collector, index: int, pair_id: int | None, prefix: str, drop: tuple
) -> Question | None:
    """Validate question/answer fields of ``obj``; meta = every other key except ``drop``."""
    ok = True
    text = obj.get("question")
    if "question" not in obj:
        col.add("missing required field", index, pair_id, prefix + "question")
        ok = False
    elif not isinstance(text, str):
        col.add(f"not a string (got {_json_type(text)})", index, pair_id, prefix + "question")
        ok = False
    elif not text.strip():
        col.add("empty question", index, pair_id, prefix + "question")
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
    if not ok:
        return None
    meta = {k: v for k, v in obj.items() if k not in ("question", "answer") and k not in drop}
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
        doc = json.loads(text)
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
    if isinstance(doc, dict) and (is_jsonl_name or "\n" not in text.strip()):
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
            records.append(json.loads(line))
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


def _build_flat(records: list[Any], col: _Collector) -> list[Pair]:
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
    for pid in order:
        slots = seen[pid]
        for variant, other in ((VARIANTS[0], VARIANTS[1]), (VARIANTS[1], VARIANTS[0])):
            if variant in slots and other not in slots:
                col.add(f'no "{other}" record for this pair', slots[variant], pid)
        c, k = questions.get((pid, "clean")), questions.get((pid, "corrupted"))
        if c is not None and k is not None:
            pairs.append(Pair(pid, c, k))
    return pairs


def _build_nested(records: list[Any], col: _Collector) -> list[Pair]:
    first_index: dict[int, int] = {}
    pairs: list[Pair] = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            col.add(f"record is not an object (got {_json_type(rec)})", i)
            continue
        pid = _record_pair_id(rec, i, col)
        duplicate = False
        if pid is not None:
            if pid in first_index:
                col.add(
                    f"duplicate pair_id (first at record {first_index[pid]})", i, pid, "pair_id"
                )
                duplicate = True
            else:
                first_index[pid] = i
        shared = {k: v for k, v in rec.items() if k not in ("pair_id",) + VARIANTS}
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
                q = _parse_question(sub, col, i, pid, variant + ".", drop=("pair_id", "variant"))
                if q is not None and shared:
                    q = Question(q.question, q.answer, {**shared, **q.meta})
                qs[variant] = q
        c, k = qs["clean"], qs["corrupted"]
        if pid is not None and not duplicate and c is not None and k is not None:
            pairs.append(Pair(pid, c, k))
    return pairs


def _validate(path: str | os.PathLike) -> tuple[PairSet | None, list[Problem]]:
    p = Path(path)
    col = _Collector(str(path))
    records, raw = _read_records(p, col)
    if records is None:
        return None, col.problems
    pairs = (_build_nested if _is_nested(records) else _build_flat)(records, col)
    if col.problems:
        return None, col.problems
    if not pairs:  # pragma: no cover - non-empty valid records always yield pairs
        col.add("no pairs")
        return None, col.problems
    sha = hashlib.sha256(raw).hexdigest() if raw is not None else None
    return PairSet(pairs, source=str(path), sha256=sha), []


def validate_pairs(path: str | os.PathLike) -> tuple[PairSet | None, list[Problem]]:
    """Check a pairs file and collect *all* problems; never raises.

    Returns ``(pairset, [])`` when the file is valid, else ``(None, problems)``.
    """
    try:
        return _validate(path)
    except Exception as e:  # noqa: BLE001 - last-resort guard: validation must never raise
        return None, [Problem(str(path), None, None, None, f"internal error: {e!r}")]


def load_pairs(path: str | os.PathLike) -> PairSet:
    """Load a pairs file (any supported layout); raise :class:`PairsError` if anything is wrong."""
    pairset, problems = validate_pairs(path)
    if problems or pairset is None:
        raise PairsError(problems)
    return pairset


def pairs_summary(pairset: PairSet) -> str:
    """Multi-line human summary: pair count, reasoning-steps histogram, equal-answer pairs."""
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
    equal = [p.pair_id for p in pairset if p.clean.answer == p.corrupted.answer]
    if equal:
        ids = ", ".join(str(i) for i in equal)
        lines.append(
            f"{len(equal)} pairs with equal clean and corrupted answers "
            f"(logit-difference metrics undefined): {ids}"
        )
    else:
        lines.append("no pairs with equal clean and corrupted answers")
    return "\n".join(lines)

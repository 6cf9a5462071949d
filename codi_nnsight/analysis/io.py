"""Loading and validating ``results.nc`` files written by ``codi-nnsight patch``.

Two schema versions are read. Schema 1 files are upgraded on reading (:func:`upgrade`) so that
the rest of the analysis code only ever sees the schema-2 names (docs/results-schema.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import xarray as xr

from ..contract import METRICS as CONTRACT_METRICS
from ..contract import kind_of_schema
from ..errors import UserError

SCHEMA_PREFIX = "codi-nnsight/results/"
SCHEMA_1 = "codi-nnsight/results/1"
SCHEMA_2 = "codi-nnsight/results/2"
SUPPORTED_SCHEMAS = (SCHEMA_1, SCHEMA_2)

#: schema-1 variable name -> schema-2 name
RENAMED_V1 = {
    "clean_predicted": "clean_prompted_answer",
    "corrupted_predicted": "corrupted_prompted_answer",
    "clean_correct": "clean_prompted_correct",
    "corrupted_correct": "corrupted_prompted_correct",
    "target_logit_diff": "source_logit_diff",  # it always held the *source* run's value
}
#: schema-1 attr ``mode`` value -> schema-2 value ("frozen" never froze the patched activation's
#: influence: it only held the fed-back latent input embeddings at their baseline values)
MODES_V1 = {"frozen": "block-all-feedback"}


#: Variables over (pair, layer) that cannot be summarised over pairs, and why (from the output contract).
NOT_SUMMARIZABLE = {m: i.not_summarizable for m, i in CONTRACT_METRICS.items() if i.not_summarizable}


class ResultsError(UserError):
    """A results file is missing, unreadable, or not in the codi-nnsight results schema."""


def _required_of(ds: xr.Dataset) -> dict[str, tuple[str, ...]]:
    """The metric a file of its kind must hold (the contract's default metric; `kl` for a sweep)."""
    kind = kind_of_schema(ds.attrs.get("codi_nnsight_schema", ""))
    if kind is None or kind.name == "sweep":
        return {}
    return {"required": (kind.default_metric,) if kind.default_metric else ()}


def validate(ds: xr.Dataset, name: str = "dataset", required: tuple[str, ...] = ("kl",)) -> xr.Dataset:
    """Check that ``ds`` follows a supported results schema; raise :class:`ResultsError` if not.

    ``name`` is used as the prefix of the one-line error message (normally the file name).
    Every variable in ``required`` must exist and hold at least one finite value.
    Returns the Dataset with schema-2 names (see :func:`upgrade`; ``ds`` itself is not changed).
    """
    schema = ds.attrs.get("codi_nnsight_schema")
    if schema is None:
        raise ResultsError(f"{name}: not a codi-nnsight results file (attr codi_nnsight_schema missing)")
    kind = kind_of_schema(schema)
    if kind is None:
        raise ResultsError(f"{name}: not a codi-nnsight results file (codi_nnsight_schema = {schema!r})")
    if kind.name != "sweep":  # the other kinds declare their dims and metrics (the output contract)
        for dim in kind.dims:
            if dim not in ds.dims:
                raise ResultsError(f"{name}: malformed {kind.name} file (dimension {dim!r} missing)")
        _check_required(ds, name, required)
        return ds
    if schema not in SUPPORTED_SCHEMAS:
        raise ResultsError(
            f"{name}: unsupported results schema {schema!r} (this codi-nnsight reads "
            f"{', '.join(SUPPORTED_SCHEMAS)}; a newer codi-nnsight may read it)"
        )
    for dim in ("pair", "layer"):
        if dim not in ds.dims:
            raise ResultsError(f"{name}: malformed results file (dimension {dim!r} missing)")
    if "pair" in ds.indexes and not ds.indexes["pair"].is_unique:
        dup = sorted(set(ds.indexes["pair"][ds.indexes["pair"].duplicated()].tolist()))
        shown = ", ".join(map(str, dup[:5])) + (", …" if len(dup) > 5 else "")
        raise ResultsError(f"{name}: malformed results file (duplicate pair ids: {shown})")
    ds = upgrade(ds)
    _check_required(ds, name, required)
    return ds


#: numpy dtype kinds a metric may have: bool, signed/unsigned integer, float
NUMERIC_KINDS = "biuf"


def _check_required(ds: xr.Dataset, name: str, required: tuple[str, ...]) -> None:
    """Every variable in `required` exists, holds numbers, and has at least one finite value."""
    for var in required:
        if var not in ds.data_vars:
            raise ResultsError(f"{name}: malformed results file (variable {var!r} missing)")
        values = np.asarray(ds[var].values)
        if values.dtype.kind not in NUMERIC_KINDS:
            # text that looks like numbers would otherwise be converted silently and summarised
            raise ResultsError(
                f"{name}: malformed results file (variable {var!r} is stored as {_kind_words(values)}, not numbers)"
            )
        if values.dtype.kind in "fc" and not np.isfinite(values).any():
            raise ResultsError(f"{name}: metric {var!r} is NaN for every pair and layer ({nan_reason(var)})")


def _kind_words(values: np.ndarray) -> str:
    kind = values.dtype.kind
    if kind in "USO":
        return "text"
    return {"c": "complex numbers", "M": "dates", "m": "time spans"}.get(kind, f"{values.dtype} values")


def numeric_metrics(ds: xr.Dataset) -> list[str]:
    """The variables of ``ds`` that can be summarised per layer: numeric, over ``pair`` and ``layer``,
    and not the decoded ``answer`` (a number per pair, not an effect size)."""
    return [
        str(v)
        for v, da in ds.data_vars.items()
        if {"pair", "layer"} <= set(da.dims) and da.dtype.kind in NUMERIC_KINDS and v not in NOT_SUMMARIZABLE
    ]


def check_metric(ds: xr.Dataset, metric: str, name: str = "dataset") -> None:
    """Refuse (one-line :class:`ResultsError` naming ``name``) a ``metric`` that is not a numeric
    per-pair, per-layer variable of ``ds``, listing the ones that are.

    The decoded ``answer`` passes here: :func:`stats.metric_array` says why it cannot be summarised.
    """
    if metric in NOT_SUMMARIZABLE and metric in ds.data_vars:
        return
    have = numeric_metrics(ds)
    if metric in have:
        return
    listing = f"numeric metrics: {', '.join(have)}" if have else "it has no numeric metric"
    if metric not in ds.variables:
        raise ResultsError(f"{name}: no metric {metric!r} ({listing})")
    var = ds[metric]
    if var.dtype.kind not in NUMERIC_KINDS:
        what = f"it holds {_kind_words(np.asarray(var.values))}"
    elif metric in ds.coords:
        what = f"it is a coordinate over ({', '.join(map(str, var.dims))})"
    else:
        what = f"it is over ({', '.join(map(str, var.dims))}), not (pair, layer)"
    raise ResultsError(f"{name}: {metric!r} is not a numeric metric of this file ({what}; {listing})")


def nan_reason(metric: str) -> str:
    """Why a metric can be NaN, in words (for error messages and the report)."""
    return CONTRACT_METRICS[metric].nan_rule if metric in CONTRACT_METRICS else "no pair produced a value"


def upgrade(ds: xr.Dataset) -> xr.Dataset:
    """Return ``ds`` with schema-2 names; a schema-2 Dataset is returned unchanged.

    For schema 1: renames the variables in :data:`RENAMED_V1`, maps attr ``mode`` ``frozen`` to
    ``no-feedback``, adds ``comparable`` (from the true answers), and derives ``logprob_diff``,
    ``logprob_recovery``, ``baseline_logprob_diff`` and ``source_logprob_diff`` from the stored
    log-probabilities when those exist. The attr ``schema_read_from`` records the original schema.
    """
    if ds.attrs.get("codi_nnsight_schema") != SCHEMA_1:
        return ds
    ds = ds.rename({k: v for k, v in RENAMED_V1.items() if k in ds.variables})
    ds.attrs = dict(ds.attrs)
    ds.attrs["mode"] = MODES_V1.get(str(ds.attrs.get("mode", "")), ds.attrs.get("mode", ""))
    ds.attrs["schema_read_from"] = SCHEMA_1
    ds.attrs["codi_nnsight_schema"] = SCHEMA_2
    if "comparable" not in ds and "answer_clean" in ds.variables and "answer_corrupted" in ds.variables:
        same = np.asarray(ds["answer_clean"].values == ds["answer_corrupted"].values)
        ds["comparable"] = ("pair", np.where(same, 0.0, 1.0), {"long_name": "clean and corrupted answers differ"})
    if {"logp_clean_answer", "logp_corrupted_answer"} <= set(ds.data_vars) and "logprob_diff" not in ds:
        diff = ds["logp_clean_answer"] - ds["logp_corrupted_answer"]
        if "comparable" in ds:
            diff = diff.where(ds["comparable"] == 1)
        ds["logprob_diff"] = diff.assign_attrs(
            long_name="log P(clean answer) - log P(corrupted answer), teacher-forced", units="nats"
        )
        have = [f"{w}_logp_{a}_answer" for w in ("baseline", "source") for a in ("clean", "corrupted")]
        if set(have) <= set(ds.data_vars):
            for who in ("baseline", "source"):
                ds[f"{who}_logprob_diff"] = ds[f"{who}_logp_clean_answer"] - ds[f"{who}_logp_corrupted_answer"]
            base, src = ds["baseline_logprob_diff"], ds["source_logprob_diff"]
            with np.errstate(all="ignore"):
                rec = (ds["logprob_diff"] - base) / (src - base)
            # schema 1 had no threshold; refuse only an exactly-zero denominator
            ds["logprob_recovery"] = rec.where(np.isfinite(rec)).assign_attrs(
                long_name="fraction of the logprob_diff gap recovered", units="1"
            )
    return ds


def _sniff_json(path: Path) -> str | None:
    """If ``path`` is JSON / JSON Lines, say what it looks like; else ``None``."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head[:8].startswith((b"\x89HDF", b"CDF")):
        return None
    text = head.lstrip()
    if not text.startswith((b"[", b"{")):
        return None
    try:
        body = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    try:
        doc = json.loads(body)
    except json.JSONDecodeError:
        try:  # JSON Lines
            doc = [json.loads(line) for line in body.splitlines() if line.strip()]
        except json.JSONDecodeError:
            return "is a JSON-like text file, not a results file (netCDF written by codi-nnsight patch)"
    records = doc.get("pairs", doc) if isinstance(doc, dict) else doc
    if isinstance(records, dict):
        records = [records]
    if isinstance(records, list) and records and all(isinstance(r, dict) for r in records):
        keys = set().union(*records)
        if keys & {"pair_id", "question", "clean", "corrupted"}:
            return "looks like a pairs file, not a results file (results come from codi-nnsight patch --out X.nc)"
    return "is a JSON file, not a results file (netCDF written by codi-nnsight patch)"


def load(path: str | Path) -> xr.Dataset:
    """Open a results netCDF file, load it fully into memory, close it, validate and upgrade it.

    Raises :class:`ResultsError` with a one-line message naming the file when the file is
    missing, is a JSON (e.g. pairs) file, is not a readable netCDF file, is not a codi-nnsight
    results file of a supported schema, has duplicate pair ids, or lacks a required dimension or
    a usable ``kl`` variable. Schema-1 files come back with schema-2 names (:func:`upgrade`).
    """
    name = str(path)  # as the user gave it: that is the name they recognize
    path = Path(path)
    if not path.exists():
        raise ResultsError(f"{name}: no such file")
    if path.is_dir():
        raise ResultsError(f"{name}: is a directory, not a results file")
    what = _sniff_json(path)
    if what is not None:
        raise ResultsError(f"{name}: {what}")
    try:
        # load() then close: the caller gets an in-memory Dataset and no open file handle
        # (important on Windows and when the file is rewritten later in the same process).
        with xr.open_dataset(path, engine="netcdf4") as handle:
            ds = handle.load()
    except Exception as exc:  # netCDF4 raises OSError/RuntimeError/ValueError variously
        raise ResultsError(f"{name}: not a readable netCDF file (truncated or corrupt?)") from exc
    ds = validate(ds, name, **_required_of(ds))
    # later errors (a metric the file lacks) name the file as the user gave it
    ds.encoding["codi_nnsight_name"] = name
    return ds

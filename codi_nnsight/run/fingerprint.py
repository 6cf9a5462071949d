"""What identifies a run, and how two runs differ: the one comparison `--resume` and stacking use."""

from __future__ import annotations

import json
from typing import Any


def fingerprint_difference(stored: dict[str, Any], current: dict[str, Any]) -> str | None:
    """None when two run fingerprints agree, else a one-line description of how they differ.

    Names every differing key and shows the first one's two values, e.g.
    `mode differ; e.g. mode: stored 'recurrent', now 'no-feedback'`.
    """
    diff = [k for k in sorted(set(stored) | set(current)) if stored.get(k) != current.get(k)]
    if not diff:
        return None
    k = diff[0]
    return f"{', '.join(diff)} differ; e.g. {k}: stored {_show(stored.get(k))}, now {_show(current.get(k))}"


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else json.dumps(value)

"""What identifies a run, and how two runs differ: the one comparison `--resume` and stacking use."""

from __future__ import annotations

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
    return f"{', '.join(diff)} differ; e.g. {k}: stored {stored.get(k)!r}, now {current.get(k)!r}"

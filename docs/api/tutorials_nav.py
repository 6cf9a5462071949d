"""mkdocs hook: list every tutorial notebook in the site's nav, under the "Tutorials" section.

mkdocs's nav cannot glob, and a notebook that is not in the nav is still built but hard to find.
The "Tutorials" section of mkdocs.yml lists the tutorials' index page (and any notebook it wants
under a chosen title); this hook appends every other `docs/tutorials/*.ipynb`, in file-name order,
so a new notebook appears on the site without editing mkdocs.yml. The page title is the notebook's
first heading (mkdocs-jupyter reads it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: The nav section that holds the tutorials, and the docs folder its notebooks live in.
SECTION = "Tutorials"
FOLDER = "tutorials"


def _listed(entries: list[Any]) -> set[str]:
    """Every page path in a nav (sub)list, at any depth."""
    out: set[str] = set()
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, list):
            out |= _listed(value)
        elif isinstance(value, str):
            out.add(value)
    return out


def on_config(config: Any) -> Any:
    """Append the tutorial notebooks the Tutorials section does not list yet."""
    nav = config.get("nav") or []
    section = next((e for e in nav if isinstance(e, dict) and SECTION in e), None)
    if section is None:
        raise ValueError(f"mkdocs.yml: the nav has no {SECTION!r} section for docs/api/tutorials_nav.py to fill")
    if isinstance(section[SECTION], str):  # `Tutorials: tutorials/README.md` becomes a section holding it
        section[SECTION] = [section[SECTION]]
    entries = section[SECTION]
    listed = _listed(nav)
    notebooks = sorted(Path(config["docs_dir"], FOLDER).glob("*.ipynb"))
    entries.extend(f"{FOLDER}/{nb.name}" for nb in notebooks if f"{FOLDER}/{nb.name}" not in listed)
    return config

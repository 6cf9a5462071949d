"""Package attributes imported on first use, so light entry points (`--help`) never load torch.

Also a one-shot post-import hook, so that `import codi_nnsight` can register its xarray accessor
without importing xarray itself (0.4 s, more than `codi-nnsight --help` takes in all).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any


def _target(spec: str, name: str) -> tuple[str, str]:
    """`"module"` exports `name` itself; `"module:attr"` exports `module.attr` under `name`."""
    module, _, attr = spec.partition(":")
    return module, attr or name


def lazy_getattr(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` (PEP 562) that imports `package.<module>` when `name` is first used.

    `exports` maps a public name to `"module"` (the module defines `name`) or `"module:attr"`
    (the name is another name for `module.attr`), modules relative to `package`. A module
    spelled `"."` is the package's own submodule `name` (e.g. `codi_nnsight.analysis`).
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attr = _target(exports[name], name)
        if module == ".":
            return importlib.import_module(f".{name}", package)
        return getattr(importlib.import_module(f".{module}", package), attr)

    return __getattr__


def lazy_dir(namespace: dict[str, Any], exports: dict[str, str]) -> Callable[[], list[str]]:
    """A module `__dir__` listing the lazy names too, so notebooks tab-complete them before first use."""

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __dir__


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `callback(module)` once, right after the module `name` has executed.

    It finds `name` with the other finders and wraps only that spec's loader's `exec_module`,
    so the module keeps its real loader (resources, reloads) and nothing else is imported. It
    stays in `sys.meta_path` until the module has run: libraries probe for optional packages
    with `importlib.util.find_spec`, and a spec handed to such a probe is never executed.
    """

    def __init__(self, name: str, callback: Callable[[ModuleType], None]) -> None:
        self.name = name
        self.callback = callback
        self._finding = False

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name or self._finding:
            return None
        self._finding = True  # the lookup below asks every finder again, this one included
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding = False
        loader = spec.loader if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            if self not in sys.meta_path:  # done already (a loader some finders share between specs)
                return
            sys.meta_path.remove(self)
            try:
                self.callback(module)
            except Exception as e:  # an extension must never break importing the library it extends
                warnings.warn(f"codi_nnsight: could not extend {fullname} ({e})", stacklevel=2)

        loader.exec_module = exec_module  # type: ignore[method-assign]  # this spec's loader only
        return spec


def after_import(name: str, callback: Callable[[ModuleType], None]) -> None:
    """Call `callback(module)` once `name` is imported: now if it already is, else right after its import."""
    if name in sys.modules:
        callback(sys.modules[name])
        return
    if not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, callback))

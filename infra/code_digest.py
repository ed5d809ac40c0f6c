"""The code part of a stage's cache key: a digest of the source a stage runs.

`code_digest(modules)` hashes the source bytes of `modules`, of every `mha2mla_core` module they reach through
imports (followed transitively, lazy imports inside functions too, found on disk: nothing is imported), and the
installed versions of the third-party distributions the core modules import (torch, transformers, lm_eval, ...).
So an edit to any core module a stage reaches, or an lm-eval upgrade, is a new key; an edit elsewhere is not.
A name a core package re-exports counts as its defining module, not the whole package.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

_CORE = "mha2mla_core"


@functools.cache
def code_digest(modules: tuple[str, ...]) -> str:
    """sha256 of the source of `modules` and of the core modules they import, and of the versions of the
    third-party distributions the core modules import (see the module docstring)."""
    sources, libraries = _code_closure(modules)
    digest = hashlib.sha256()
    for name in sorted(sources):
        digest.update(name.encode() + b"\0" + sources[name])
    for library in sorted(libraries):
        digest.update(f"{library}={_distribution_version(library)}".encode())
    return digest.hexdigest()


def _code_closure(modules: tuple[str, ...]) -> tuple[dict[str, bytes], set[str]]:
    """{module: source} of `modules` plus every `mha2mla_core` module reachable by imports, and the top-level names
    of the other modules the core ones import. Core files are found on disk: nothing is imported."""
    sources: dict[str, bytes] = {}
    libraries: set[str] = set()
    pending = list(modules)
    while pending:
        name = pending.pop()
        if name in sources:
            continue
        sources[name] = _module_file(name).read_bytes()
        for imported in _imports(sources[name]):
            if imported.split(".")[0] == _CORE:
                pending.append(imported)
            elif name.split(".")[0] == _CORE and imported.split(".")[0] not in sys.stdlib_module_names:
                libraries.add(imported.split(".")[0])
    return sources, libraries


@functools.cache
def _core_root() -> Path:
    return Path(importlib.util.find_spec(_CORE).origin).parent  # finding a top-level package does not import it


def _module_file(name: str) -> Path:
    if name.split(".")[0] == _CORE:
        root = _core_root()
        base = root.joinpath(*name.split(".")[1:])
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if path.is_file():
                return path
        raise ModuleNotFoundError(f"cache key: module {name} not found under {root}")
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"cache key: module {name} not found")
    return Path(spec.origin)


def _imports(source: bytes) -> set[str]:
    """Absolute module names a source imports; in the core, the modules that define what it takes (see
    `_core_targets`)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            core = node.module.split(".")[0] == _CORE
            names.update(_core_targets(node.module, [a.name for a in node.names]) if core else {node.module})
    return names


def _core_targets(module: str, imported: list[str]) -> set[str]:
    """The core modules `from module import *imported*` depends on: a submodule it names, or for a name a package
    re-exports, the module that defines it, not every module the package's `__init__` imports."""
    if _module_file(module).name != "__init__.py":
        return {module}
    exports = _package_exports(module)
    targets = set()
    for name in imported:
        if _is_core_module(f"{module}.{name}"):
            targets.add(f"{module}.{name}")
        else:
            targets.add(exports.get(name, module))  # defined in the package itself: all of it
    return targets


@functools.cache
def _package_exports(package: str) -> dict[str, str]:
    """{name: defining module} of the names a core package's `__init__` imports from the core."""
    tree = ast.parse(_module_file(package).read_bytes())
    return {alias.asname or alias.name: node.module for node in tree.body
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith(_CORE)
            for alias in node.names}  # fmt: skip


def _is_core_module(name: str) -> bool:
    try:
        _module_file(name)
    except ModuleNotFoundError:
        return False
    return True


@functools.cache
def _distribution_version(top_level: str) -> str:
    """The installed version of the distribution that provides import name `top_level`; "-" where it is not
    installed (then it cannot have produced a cached result)."""
    try:
        return metadata.version(top_level)
    except metadata.PackageNotFoundError:
        if importlib.util.find_spec(top_level) is None:
            return "-"
        dists = _import_names_to_distributions().get(top_level, [])  # e.g. optimum -> optimum-quanto
        return ",".join(f"{d}={metadata.version(d)}" for d in sorted(set(dists))) or "-"


@functools.cache
def _import_names_to_distributions() -> Mapping[str, list[str]]:
    return metadata.packages_distributions()  # scans every installed distribution: once, and only when needed

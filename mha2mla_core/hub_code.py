"""Self-contained checkpoints: the model's own source files saved beside its weights, as Hub models with a custom
architecture ship theirs.

    model.save_pretrained(directory)
    bundle_code(directory)      # modeling_mla.py and what it imports from mha2mla_core; config.json's auto_map
    AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)   # torch + transformers only

The files are copied from this package when the checkpoint is saved, so a checkpoint carries the code of the version
that wrote it, and `bundle_code` follows edits of the modeling code by itself: it starts from
`mha2mla_core.modeling.modeling_mla` and takes every `mha2mla_core` module reachable through imports (lazy imports
inside functions too).

transformers loads remote code from one flat folder: it copies the module that `auto_map` names and, recursively,
the files named by `from .x import` lines. So the modules are flattened (`mha2mla_core.kernels.latent_decode` ->
`latent_decode.py`, `mha2mla_core.modeling.latent_cache` -> `latent_cache.py`, the package `mha2mla_core.kernels` ->
`kernels.py`) and each absolute `from mha2mla_core...` import becomes a relative one. A lazy `from package import submodule` becomes `from . import submodule`, which
transformers' pattern does not see; the file that holds one gets a `typing.TYPE_CHECKING` block naming that module
with `from .submodule import ...`, so that its file (the Triton kernels, for one) is copied too.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "mha2mla_core"
ROOT_MODULE = f"{PACKAGE}.modeling.modeling_mla"
AUTO_MAP = {"AutoConfig": "modeling_mla.MLALlamaConfig", "AutoModelForCausalLM": "modeling_mla.MLAForCausalLM"}
_PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class SourceModule:
    name: str  # dotted module name, e.g. mha2mla_core.kernels.latent_decode
    path: Path  # its source file (a package's __init__.py)

    @property
    def flat_name(self) -> str:
        """The file stem it gets in the checkpoint: the module's last name (a package's own name)."""
        return self.name.rsplit(".", 1)[-1]


def module_path(name: str) -> Path | None:
    """The source file of `mha2mla_core` module `name`, or None when it is not a module of the package."""
    base = _PACKAGE_DIR.joinpath(*name.split(".")[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def source_modules(root: str = ROOT_MODULE) -> dict[str, SourceModule]:
    """`root` and every package module it reaches through `from mha2mla_core... import` (any depth, lazy too)."""
    found: dict[str, SourceModule] = {}
    pending = [root]
    while pending:
        name = pending.pop()
        if name in found:
            continue
        path = module_path(name)
        if path is None:
            raise ModuleNotFoundError(f"bundle_code: {name} is not a module of {_PACKAGE_DIR}")
        found[name] = SourceModule(name, path)
        for node in _package_imports(ast.parse(path.read_text())):
            pending.append(node.module)
            pending.extend(f"{node.module}.{a.name}" for a in node.names if module_path(f"{node.module}.{a.name}"))
    flat = [m.flat_name for m in found.values()]
    if len(set(flat)) != len(flat):
        raise ValueError(f"bundle_code: modules {sorted(found)} flatten to repeated file names {flat}; rename one")
    return found


def _package_imports(tree: ast.Module) -> list[ast.ImportFrom]:
    """The `from mha2mla_core... import` statements of a module; other forms of importing the package are errors."""
    imports = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == PACKAGE for a in node.names):
            raise ValueError(f"bundle_code: line {node.lineno}: write `from {PACKAGE}.x import y`, not `import {PACKAGE}.x`")
        if isinstance(node, ast.ImportFrom) and node.level:
            raise ValueError(f"bundle_code: line {node.lineno}: relative imports are not bundled; import from {PACKAGE}")
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            imports.append(node)
    return imports


def relative_source(module: SourceModule, modules: dict[str, SourceModule]) -> str:
    """The module's source with each package import made relative to the flat folder (see the module docstring)."""
    source = module.path.read_text()
    lines = source.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    edits, lazy_modules = [], []
    for node in _package_imports(ast.parse(source)):
        submodules = [a for a in node.names if f"{node.module}.{a.name}" in modules]
        if submodules and len(submodules) != len(node.names):
            raise ValueError(f"bundle_code: {module.name} line {node.lineno}: import modules and names apart")
        if submodules:
            text = f"from . import {_aliases(node.names)}"
            lazy_modules += [modules[f"{node.module}.{a.name}"] for a in submodules]
        else:
            text = f"from .{modules[node.module].flat_name} import {_aliases(node.names)}"
        begin = starts[node.lineno - 1] + _char_offset(lines[node.lineno - 1], node.col_offset)
        end = starts[node.end_lineno - 1] + _char_offset(lines[node.end_lineno - 1], node.end_col_offset)
        edits.append((begin, end, text))
    for begin, end, text in sorted(edits, reverse=True):
        source = source[:begin] + text + source[end:]
    return source + _copy_hints(lazy_modules)


def _char_offset(line: str, byte_offset: int) -> int:
    """ast's col_offset counts UTF-8 bytes; string slicing counts characters."""
    return len(line.encode()[:byte_offset].decode())


def _aliases(names: list[ast.alias]) -> str:
    return ", ".join(a.name if a.asname is None else f"{a.name} as {a.asname}" for a in names)


def _copy_hints(lazy_modules: list[SourceModule]) -> str:
    """A TYPE_CHECKING block with one `from .module import name` per lazily imported module (never executed)."""
    if not lazy_modules:
        return ""
    lines = ["\n\nimport typing\n\n",
             "if typing.TYPE_CHECKING:  # transformers copies the files named by `from .x import` with remote code\n"]  # fmt: skip
    for module in dict.fromkeys(lazy_modules):
        lines.append(f"    from .{module.flat_name} import {_first_public_name(module.path)}\n")
    return "".join(lines)


def _first_public_name(path: Path) -> str:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            return node.name
    raise ValueError(f"bundle_code: {path} defines no public function or class to name in an import")


def bundle_code(directory: str | Path) -> list[str]:
    """Copy the modeling code into the saved model `directory` (flat, imports made relative) and add `auto_map` to
    its config.json; return the file names written."""
    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory} has no config.json; call model.save_pretrained({str(directory)!r}) first")
    modules = source_modules()
    written = []
    for module in modules.values():
        (directory / f"{module.flat_name}.py").write_text(relative_source(module, modules))
        written.append(f"{module.flat_name}.py")
    config = json.loads(config_file.read_text())
    config["auto_map"] = dict(AUTO_MAP)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return sorted(written)

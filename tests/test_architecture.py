"""The import boundaries of ``fastpull/`` and its public surface, checked from the source.

Every module's imports of other fastpull modules (at any depth, including imports inside
functions) must be in :data:`ALLOWED`, which follows the data flow of
``/work/shared/design.md``::

    foundation   errors, types, cancel, events, hashing   (anyone may import these)
    1 name       reference
    2 talk       credentials, auth, transport, settings
    3 what       manifest (pure), batchfile (pure), registry
    4 fetch      scheduler (pure), journal, worker
    5 keep       diskqueue, verify, store, inventory (pure), then download (the engine over 4, 5)
    6 top        puller, bulk, progress, listing, maintenance, storecheck, cli, __init__, __main__

A module imports only from its own layer or the ones above it in this list, and nothing
imports the CLI except ``__main__``. Two deliberate readings of the design:

- ``hashing`` counts as foundation: it imports nothing of fastpull but its own extension and
  computes digests of bytes it is given, so ``manifest`` may check a digest with it;
- ``registry`` may use ``manifest``'s pure helpers (the Accept list, digest checks): the
  I/O edge depends on the pure core, never the other way round.

A new module must be added to the table before it can import anything, so every new
dependency is a visible, reviewed change (as ggcr's ``depcheck_test.go`` does it).
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType

import pytest

import fastpull

PACKAGE = Path(fastpull.__file__).parent
PACKAGE_NAME = "__init__"
# Compiled, so it has no source to read; it imports nothing of fastpull.
EXTENSION = "_native"

_FOUNDATION = frozenset({"errors", "types", "cancel", "events", "hashing"})

ALLOWED: Mapping[str, frozenset[str]] = {
    # foundation
    "errors": frozenset(),
    "types": frozenset({"errors"}),
    "cancel": frozenset({"errors"}),
    "events": frozenset({"types"}),
    "hashing": frozenset({EXTENSION}),
    # 1. name
    "reference": frozenset({"errors", "types"}),
    # 2. who to talk to, and how
    "credentials": frozenset({"errors", "types"}),
    "auth": frozenset({"errors", "types"}),
    "transport": frozenset({"cancel", "errors"}),
    "settings": frozenset({"errors", "reference", "transport"}),
    # 3. what to fetch
    "manifest": frozenset({"errors", "hashing", "types"}),
    "batchfile": frozenset({"errors", "reference", "types"}),
    "registry": _FOUNDATION
    | {"auth", "credentials", "manifest", "reference", "settings", "transport"},
    # 4. how to fetch it
    "scheduler": frozenset({"errors", "types"}),
    "journal": frozenset({"types"}),
    "worker": frozenset({"errors", "journal", "transport"}),
    # 5. trust it, keep it
    "diskqueue": frozenset(),
    "verify": frozenset({"diskqueue", "errors", "hashing", "types"}),
    "store": frozenset({"cancel", "diskqueue", "errors", "hashing", "journal", "types"}),
    "inventory": frozenset({"errors", "manifest", "reference", "types"}),
    "download": _FOUNDATION
    | {"diskqueue", "journal", "scheduler", "store", "transport", "verify", "worker"},
    # 6. orchestration and user interface
    "puller": _FOUNDATION
    | {"auth", "credentials", "download", "manifest", "reference", "registry", "settings"}
    | {"store", "transport"},
    "bulk": _FOUNDATION
    | {"batchfile", "credentials", "download", "puller", "reference", "settings", "store"},
    "progress": frozenset({"events"}),
    "listing": frozenset({"errors", "manifest", "reference", "store"}),
    "maintenance": frozenset({"errors", "inventory", "manifest", "reference", "store", "types"}),
    "storecheck": _FOUNDATION
    | {"inventory", "maintenance", "manifest", "puller", "reference", "settings", "store"},
    "cli": _FOUNDATION
    | {PACKAGE_NAME, "batchfile", "bulk", "credentials", "listing", "progress", "puller"}
    | {"maintenance", "reference", "registry", "settings", "storecheck", "store", "transport"},
    PACKAGE_NAME: frozenset({"errors", "hashing", "puller", "reference"}),
    "__main__": frozenset({"cli"}),
}

# Modules that touch the network or the store. The pure core must not reach them, not even
# through another module.
IO_MODULES = frozenset(
    {"transport", "registry", "journal", "worker", "diskqueue", "download", "store", "puller"}
    | {"bulk"}
)
PURE_MODULES = (
    "errors",
    "types",
    "reference",
    "auth",
    "manifest",
    "scheduler",
    "events",
    "inventory",
    "batchfile",
)


def _source_modules() -> dict[str, Path]:
    return {path.stem: path for path in sorted(PACKAGE.glob("*.py"))}


def _imported_modules(tree: ast.AST, known: frozenset[str]) -> Iterator[str]:
    """Every fastpull module ``tree`` imports, wherever the import statement is."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "fastpull":
                    yield parts[1] if len(parts) > 1 else PACKAGE_NAME
        elif isinstance(node, ast.ImportFrom):
            if node.level > 1:
                raise AssertionError(f"line {node.lineno}: fastpull is flat, '..' is wrong")
            if node.level == 1:
                module = node.module
            elif node.module is not None and node.module.split(".")[0] == "fastpull":
                module = node.module.partition(".")[2] or None
            else:
                continue
            if module is not None:
                yield module.split(".")[0]
                continue
            # ``from . import x``: a submodule, or a name defined by the package itself.
            for alias in node.names:
                yield alias.name if alias.name in known else PACKAGE_NAME


def _import_graph() -> dict[str, frozenset[str]]:
    sources = _source_modules()
    known = frozenset(sources) | {EXTENSION}
    return {
        name: frozenset(_imported_modules(ast.parse(path.read_text(), str(path)), known))
        for name, path in sources.items()
    }


GRAPH = _import_graph()


def _reachable(start: str, graph: Mapping[str, frozenset[str]] = GRAPH) -> set[str]:
    seen: set[str] = set()
    stack = [start]
    while stack:
        for target in graph.get(stack.pop(), frozenset()):
            if target not in seen:
                seen.add(target)
                stack.append(target)
    return seen


def test_the_scanner_sees_every_import_form() -> None:
    source = """
import fastpull
import fastpull.store
from fastpull import errors
from fastpull.types import Digest
from . import events, __version__
from .manifest import ACCEPT
import os


def later():
    from .registry import RegistryClient
    import fastpull.transport as transport
"""
    known = frozenset({"store", "errors", "types", "events", "manifest", "registry", "transport"})
    found = set(_imported_modules(ast.parse(source), known))
    assert found == known | {PACKAGE_NAME}


def test_every_module_is_in_the_table_and_nothing_else() -> None:
    assert set(GRAPH) == set(ALLOWED)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_stay_within_the_table(module: str) -> None:
    unexpected = GRAPH[module] - ALLOWED.get(module, frozenset())
    assert not unexpected, f"{module} must not import {sorted(unexpected)}"


def test_nothing_but_the_entry_point_imports_the_cli() -> None:
    importers = {name for name, targets in GRAPH.items() if "cli" in targets}
    assert importers <= {"__main__"}


def test_errors_and_types_are_the_bottom() -> None:
    assert GRAPH["errors"] == frozenset()
    assert GRAPH["types"] <= {"errors"}


def test_reference_depends_on_types_and_errors_only() -> None:
    assert GRAPH["reference"] <= {"types", "errors"}


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_modules_never_reach_io(module: str) -> None:
    reached = _reachable(module) & IO_MODULES
    assert not reached, f"{module} reaches I/O modules {sorted(reached)}"


def test_store_knows_nothing_of_the_network() -> None:
    assert not GRAPH["store"] & {"transport", "registry", "worker", "download", "puller"}


def test_download_engine_does_not_reach_back_up() -> None:
    assert not GRAPH["download"] & {"registry", "puller", "cli", "listing", "progress"}


def test_there_are_no_import_cycles() -> None:
    cyclic = sorted(name for name in GRAPH if name in _reachable(name))
    assert not cyclic, f"modules on an import cycle: {cyclic}"


def test_the_table_itself_has_no_cycles() -> None:
    # Two modules allowed to import each other, even indirectly, would make the layers moot.
    cyclic = sorted(name for name in ALLOWED if name in _reachable(name, ALLOWED))
    assert not cyclic, f"the table lets these modules import themselves: {cyclic}"


# -- public surface ----------------------------------------------------------------------------


def _names_exported_by_package() -> set[str]:
    """Public names ``fastpull/__init__.py`` binds or imports from its own modules.

    Imports under ``if TYPE_CHECKING:`` count: they declare what a lazy ``__getattr__``
    provides. Helpers imported from elsewhere (``typing``) are not exports.
    """
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Assign) and node in tree.body:
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.FunctionDef | ast.ClassDef) and node in tree.body:
            names.add(node.name)
    return {n for n in names if not n.startswith("_") or n == "__version__"}


# Exported on purpose as modules; every other export is a function, class or value.
MODULE_EXPORTS = frozenset({"hashing"})


def test_package_all_matches_what_it_exports() -> None:
    assert sorted(fastpull.__all__) == sorted(_names_exported_by_package())


def test_exports_survive_importing_every_submodule() -> None:
    # Importing a submodule binds it as an attribute of the package, so an export named like
    # a submodule (``fastpull.pull`` the function vs ``fastpull/pull.py``) would be replaced.
    for module in _source_modules():
        if module not in (PACKAGE_NAME, "__main__"):
            importlib.import_module(f"fastpull.{module}")
    for name in fastpull.__all__:
        value = getattr(fastpull, name)
        assert isinstance(value, ModuleType) == (name in MODULE_EXPORTS), name


@pytest.mark.parametrize("module", sorted(_source_modules()))
def test_every_module_has_a_docstring(module: str) -> None:
    tree = ast.parse(_source_modules()[module].read_text())
    docstring = ast.get_docstring(tree)
    assert docstring and docstring.strip(), f"fastpull/{module}.py has no module docstring"


@pytest.mark.parametrize(
    "module", sorted(name for name in _source_modules() if not name.startswith("__"))
)
def test_module_all_names_exist(module: str) -> None:
    imported = importlib.import_module(f"fastpull.{module}")
    missing = [name for name in getattr(imported, "__all__", ()) if not hasattr(imported, name)]
    assert not missing, f"fastpull.{module}.__all__ lists undefined names {missing}"

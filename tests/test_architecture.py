"""The import boundaries of ``fastpull/`` and its public surface, checked from the source.

The packages are the layers of ``shared/design.md``'s data flow, and a package imports only
from the packages before it in this list (never from one after it)::

    core       errors, types, cancel, events, hashing, reference   (anyone may import these)
    registry/  responses, transport, auth, credentials, settings,    -- who to talk to, how
               manifest, client, upload
    store/     files, locks, journal, diskqueue, ingest, layout, gc,
               inventory, maintenance, placements                      -- where bytes rest
    archive/   tarstream, documents, writer, reader                    -- images as one tar
    engine/    scheduler, connections, sink, worker, pool, routing,     -- how bytes move
               resume, verify, commit, records, job, download
    top        puller, pusher, mirror, bulk, batchfile, storecheck    -- one image, a batch
    cluster/   plan, tasks, relay, client, copying                     -- a batch over Dask
    cli/       commands, options, archive, mirror, progress, listing   -- the face

Within a layer, every module's imports of other fastpull modules (at any depth, including
imports inside functions) must be in :data:`ALLOWED`, so every new dependency is a visible,
reviewed change (as ggcr's ``depcheck_test.go`` does it). Deliberate readings of the design:

- ``hashing`` is core: it imports nothing of fastpull but its own extension and computes
  digests of bytes it is given, so ``registry.manifest`` may check a digest with it;
- ``store`` may use ``registry.manifest``'s pure parsers (an image's closure is read from its
  manifests) but nothing of the registry that does I/O;
- ``storecheck`` (``fastpull verify --repair``) sits beside ``puller``, not in ``store/``:
  repairing an image means pulling it again.
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

# Layers in order; a module may import modules of its own layer (as ALLOWED says) and of
# earlier layers.
LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("core", frozenset({"errors", "types", "cancel", "events", "hashing", "reference", EXTENSION})),
    ("registry", frozenset({"registry"})),
    ("store", frozenset({"store"})),
    ("archive", frozenset({"archive"})),
    ("engine", frozenset({"engine"})),
    (
        "top",
        frozenset(
            {"puller", "bulk", "batchfile", "storecheck", "pusher", "mirror", "cluster"}
            | {PACKAGE_NAME}
        ),
    ),
    ("cli", frozenset({"cli", "__main__"})),
)

_CORE = frozenset({"errors", "types", "cancel", "events", "hashing"})

ALLOWED: Mapping[str, frozenset[str]] = {
    # core
    "errors": frozenset(),
    "types": frozenset({"errors"}),
    "cancel": frozenset({"errors"}),
    "events": frozenset({"types"}),
    "hashing": frozenset({EXTENSION}),
    "reference": frozenset({"errors", "types"}),
    # registry/: who to talk to, and how
    "registry": frozenset(),
    "registry.credentials": frozenset({"errors", "types"}),
    "registry.auth": frozenset({"errors", "types"}),
    "registry.responses": frozenset({"errors", "types"}),
    "registry.transport": frozenset({"cancel", "errors", "registry.responses"}),
    "registry.settings": frozenset({"errors", "reference", "registry.transport"}),
    "registry.manifest": frozenset({"errors", "hashing", "types"}),
    "registry.client": _CORE
    | {"reference", "registry.auth", "registry.credentials", "registry.manifest"}
    | {"registry.settings", "registry.transport"},
    "registry.upload": frozenset({"cancel", "errors", "types"})
    | {"registry.auth", "registry.client", "registry.manifest", "registry.responses"}
    | {"registry.transport"},
    # store/: where bytes rest
    "store": frozenset(),
    "store.diskqueue": frozenset(),
    "store.journal": frozenset({"types"}),
    "store.files": frozenset({"errors"}),
    "store.locks": frozenset({"cancel"}),
    "store.ingest": frozenset({"errors", "types"})
    | {"store.diskqueue", "store.files", "store.journal", "store.locks"},
    "store.layout": frozenset({"errors", "hashing", "types"})
    | {"store.files", "store.ingest", "store.locks"},
    "store.gc": frozenset({"types", "store.files", "store.ingest", "store.layout", "store.locks"}),
    "store.inventory": frozenset({"errors", "reference", "types", "registry.manifest"}),
    "store.placements": frozenset({"errors", "reference", "types"}),
    "store.maintenance": frozenset({"errors", "reference", "types", "registry.manifest"})
    | {"store.gc", "store.inventory", "store.layout"},
    # archive/: save and load image archives
    "archive": frozenset(),
    "archive.tarstream": frozenset({"errors"}),
    "archive.documents": frozenset({"errors", "reference", "types", "registry.manifest"}),
    "archive.writer": _CORE
    | {"reference", "registry.manifest", "store.inventory", "store.layout", "store.maintenance"}
    | {"archive.documents", "archive.tarstream"},
    "archive.reader": frozenset({"cancel", "errors", "hashing", "reference", "types"})
    | {"registry.manifest", "store.inventory", "store.layout"}
    | {"archive.documents", "archive.tarstream"},
    # engine/: how bytes move
    "engine": frozenset(),
    "engine.scheduler": frozenset({"errors", "types", "registry.responses"}),
    "engine.connections": frozenset(),
    "engine.sink": frozenset({"hashing", "store.journal", EXTENSION}),
    "engine.worker": frozenset({"errors", "types", "registry.transport", "engine.sink"}),
    "engine.verify": frozenset({"errors", "hashing", "types", "store.diskqueue"}),
    "engine.routing": frozenset({"errors", "types", "registry.responses", "registry.transport"}),
    "engine.records": frozenset({"events", "types", "registry.responses", "registry.transport"})
    | {"store.ingest", "engine.connections", "engine.routing", "engine.verify"},
    "engine.resume": frozenset({"store.journal", "engine.worker"}),
    "engine.commit": frozenset({"errors", "engine.records"}),
    "engine.pool": frozenset({"errors", "engine.worker"}),
    "engine.job": _CORE
    | {"registry.responses", "registry.transport", "store.diskqueue"}
    | {"engine.commit", "engine.pool", "engine.records", "engine.resume", "engine.routing"}
    | {"engine.connections", "engine.scheduler", "engine.worker"},
    "engine.download": frozenset({"events", "types", "registry.responses", "registry.transport"})
    | {"store.diskqueue", "store.layout"}
    | {"engine.job", "engine.pool", "engine.records", "engine.verify"},
    # top: one image, a batch
    "batchfile": frozenset({"errors", "reference", "types"}),
    "puller": _CORE
    | {"reference", "registry.auth", "registry.client", "registry.credentials"}
    | {"registry.manifest", "registry.settings", "registry.transport"}
    | {"store.layout", "engine.download"},
    "bulk": _CORE
    | {"batchfile", "reference", "registry.credentials", "registry.settings", "store.layout"}
    | {"engine.download", "puller", "cluster.client"},
    # cluster/: a batch over Dask; the engine never knows it runs on a cluster
    "cluster": frozenset(),
    "cluster.plan": frozenset({"types"}),
    "cluster.tasks": _CORE
    | {"cluster.plan", "engine.download", "puller", "registry.settings", "store.layout"},
    "cluster.client": _CORE
    | {PACKAGE_NAME, "cluster.plan", "cluster.tasks", "engine.download", "puller"}
    | {"registry.settings"},
    "cluster.relay": _CORE
    | {"cluster.plan", "cluster.tasks", "engine.download", "puller", "pusher", "reference"}
    | {"registry.settings", "registry.upload", "store.layout"},
    "cluster.copying": _CORE
    | {"batchfile", "bulk", "mirror", "puller", "pusher", "reference", "store.layout"}
    | {"cluster.client", "cluster.plan", "cluster.relay"}
    | {"registry.credentials", "registry.manifest", "registry.settings", "registry.upload"},
    "storecheck": _CORE
    | {"reference", "registry.manifest", "registry.settings", "store.inventory"}
    | {"store.gc", "store.layout", "store.maintenance", "puller"},
    "pusher": _CORE
    | {"reference", "registry.client", "registry.credentials", "registry.manifest"}
    | {"registry.settings", "registry.transport", "registry.upload", "store.layout"}
    | {"store.placements"},
    "mirror": _CORE
    | {"batchfile", "bulk", "puller", "pusher", "reference", "registry.credentials"}
    | {"registry.settings", "registry.upload", "store.layout", "store.maintenance"},
    PACKAGE_NAME: frozenset({"errors", "hashing", "puller", "reference"}),
    # cli/: the face
    "cli": frozenset(),
    "cli.progress": frozenset({"events"}),
    "cli.options": frozenset({"errors", "registry.settings", "store.maintenance"}),
    "cli.listing": frozenset({"errors", "reference", "registry.manifest", "store.layout"}),
    "cli.archive": frozenset({"cancel", "errors", "types", "batchfile", "reference"})
    | {"store.layout", "archive.reader", "archive.writer", "cli.options"},
    "cli.commands": _CORE
    | {PACKAGE_NAME, "batchfile", "bulk", "puller", "reference", "storecheck", "cli.archive"}
    | {"registry.client", "registry.credentials", "registry.settings", "registry.transport"}
    | {"store.layout", "store.maintenance", "cli.listing", "cli.options", "cli.progress"}
    | {"cluster.client", "cli.mirror"},
    "cli.mirror": _CORE
    | {"batchfile", "mirror", "pusher", "reference", "store.layout", "store.maintenance"}
    | {"cli.options", "cli.progress", "cluster.client", "cluster.copying", "registry.settings"},
    "__main__": frozenset({"cli.commands"}),
}

# Modules that touch the network or the store. The pure core must not reach them, not even
# through another module.
IO_MODULES = frozenset(
    {"registry.transport", "registry.client", "registry.upload", "store.journal"}
    | {"store.diskqueue", "store.files", "store.locks", "store.ingest", "store.layout"}
    | {"store.gc", "engine.worker", "engine.pool", "engine.job", "engine.download"}
    | {"puller", "bulk", "pusher", "mirror"}
)
PURE_MODULES = (
    "errors",
    "types",
    "reference",
    "events",
    "registry.auth",
    "registry.manifest",
    "registry.responses",
    "store.inventory",
    "engine.scheduler",
    "engine.connections",
    "batchfile",
    "cluster.plan",
)


def _layer_of(module: str) -> int:
    top = module.split(".")[0]
    for index, (_, members) in enumerate(LAYERS):
        if top in members or module in members:
            return index
    raise AssertionError(f"fastpull/{module} belongs to no layer")


def _source_modules() -> dict[str, Path]:
    """Every module by dotted name below the package (``engine.download``); a subpackage's
    ``__init__`` is named for the subpackage (``engine``)."""
    modules: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if len(parts) > 1 and parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _resolve(dotted: str, known: frozenset[str]) -> str:
    """The longest known module ``dotted`` names (``store.layout.Store`` → ``store.layout``)."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return PACKAGE_NAME


def _imported_modules(tree: ast.AST, known: frozenset[str]) -> Iterator[str]:
    """Every fastpull module ``tree`` imports, wherever the import statement is."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                head, _, rest = alias.name.partition(".")
                if head == "fastpull":
                    yield _resolve(rest, known) if rest else PACKAGE_NAME
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"line {node.lineno}: import fastpull modules absolutely")
            head, _, rest = (node.module or "").partition(".")
            if head != "fastpull":
                continue
            for alias in node.names:
                # ``from fastpull.store import layout`` imports a module; ``from
                # fastpull.store.layout import Store`` a name of one.
                full = f"{rest}.{alias.name}" if rest else alias.name
                yield _resolve(full, known)


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
import fastpull.store.layout
from fastpull import errors
from fastpull.types import Digest
from fastpull import events, __version__
from fastpull.registry.manifest import ACCEPT
from fastpull.engine import verify
import os


def later():
    from fastpull.registry.client import RegistryClient
    import fastpull.registry.transport as transport
"""
    known = frozenset(
        {"store.layout", "errors", "types", "events", "registry.manifest", "registry.client"}
        | {"registry.transport", "engine.verify", "registry", "store", "engine"}
    )
    found = set(_imported_modules(ast.parse(source), known))
    expected = {"store.layout", "errors", "types", "events", "registry.manifest"}
    assert found == expected | {"registry.client", "registry.transport", "engine.verify"} | {
        PACKAGE_NAME
    }


def test_relative_imports_are_refused() -> None:
    with pytest.raises(AssertionError, match="absolutely"):
        list(_imported_modules(ast.parse("from .errors import X"), frozenset({"errors"})))


def test_every_module_is_in_the_table_and_nothing_else() -> None:
    assert set(GRAPH) == set(ALLOWED)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_stay_within_the_table(module: str) -> None:
    unexpected = GRAPH[module] - ALLOWED.get(module, frozenset())
    assert not unexpected, f"{module} must not import {sorted(unexpected)}"


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_the_table_only_looks_back_through_the_layers(module: str) -> None:
    later = {t for t in ALLOWED[module] if _layer_of(t) > _layer_of(module)}
    assert not later, f"{module} may not import later layers: {sorted(later)}"


def test_every_package_is_a_layer() -> None:
    packages = {name for name, path in _source_modules().items() if path.name == "__init__.py"}
    assert packages - {PACKAGE_NAME} == {
        "registry",
        "store",
        "archive",
        "engine",
        "cli",
        "cluster",
    }
    for package in packages - {PACKAGE_NAME}:
        assert any(package in members for _, members in LAYERS)


def test_subpackages_are_namespaces_only() -> None:
    # Their __init__ files import nothing: importing one part never drags in its siblings.
    for package in ("registry", "store", "archive", "engine", "cli", "cluster"):
        assert GRAPH[package] == frozenset()


def test_nothing_but_the_entry_point_imports_the_cli() -> None:
    importers = {n for n, targets in GRAPH.items() if any(t.startswith("cli") for t in targets)}
    assert importers <= {"__main__"} | {n for n in GRAPH if n.startswith("cli")}


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
    for module in (m for m in GRAPH if m.split(".")[0] == "store"):
        network = {t for t in _reachable(module) if t.startswith(("registry.", "engine."))}
        assert network <= {"registry.manifest"}, f"{module} reaches {sorted(network)}"


def test_archives_know_nothing_of_the_network() -> None:
    # save and load work from files alone: an air-gapped site has no registry to ask.
    for module in (m for m in GRAPH if m.split(".")[0] == "archive"):
        network = {t for t in _reachable(module) if t.startswith(("registry.", "engine."))}
        assert network <= {"registry.manifest"}, f"{module} reaches {sorted(network)}"


def test_download_engine_does_not_reach_back_up() -> None:
    reached = _reachable("engine.download")
    assert not {t for t in reached if _layer_of(t) > _layer_of("engine.download")}
    assert "registry.client" not in reached


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
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastpull"):
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

"""The import rules of docs/architecture.md ("Layers"), checked on the source.

Every module under ``graftfl/`` is parsed with ``ast`` (not imported), so imports inside functions
and under ``TYPE_CHECKING`` count as much as the ones at the top of a module. The registry's lazy
``importlib.import_module`` of protocol modules is by design not an import statement and is not seen.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import graftfl
from graftfl.protocols import BUILTIN_PROTOCOLS

ROOT = Path(graftfl.__file__).parent

# Lowest first, as in docs/architecture.md. A module may import its own group (graftfl.core.x ->
# graftfl.core.y) and any group of a strictly lower layer; nothing else.
LAYERS: list[set[str]] = [
    {"core"},
    {"transport", "tls", "service_auth", "console", "audit", "protocol_contract"},
    {"protocols"},
    {"config"},
    {"clients", "strategies"},
    {"server_app", "commands", "deploy", "prepare_sites", "sim", "ray_cluster"},
    {"cli"},
]
# Third-party packages a group must not import (top-level names).
FORBIDDEN = {
    "core": {"flwr"},  # core knows no Flower (flwr_datasets, a data library, is another package)
    "transport": {"omegaconf", "hydra"},  # transport takes byte limits, not the Hydra config
}


def module_name(path: Path, root: Path, package: str) -> str:
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(root: Path, package: str) -> dict[str, set[str]]:
    """``{module: every absolute name it imports}`` for each module of the package at ``root``."""
    result = {}
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root, package)
        base = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parent = base.split(".")[: len(base.split(".")) - (node.level - 1)]
                    module = ".".join(parent + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                found.add(module)
                found.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
        result[name] = found
    return result


def internal_graph(imports: dict[str, set[str]]) -> dict[str, set[str]]:
    """``{module: the package's own modules it imports}`` (a name resolves to its longest known module)."""
    graph = {}
    for module, names in imports.items():
        targets = set()
        for name in names:
            while name and name not in imports:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def group_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer_of(group: str) -> int | None:
    return next((number for number, layer in enumerate(LAYERS) if group in layer), None)


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            source_group, target_group = group_of(module), group_of(target)
            if source_group == target_group or group_of(module) == module.split(".")[0]:
                continue  # within a group, and the package's own __init__
            source_layer, target_layer = layer_of(source_group), layer_of(target_group)
            if source_layer is None or target_layer is None or target_layer >= source_layer:
                problems.append(f"{module} (layer {source_layer}) imports {target} (layer {target_layer})")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


IMPORTS = imports_of(ROOT, "graftfl")
GRAPH = internal_graph(IMPORTS)


def test_every_group_has_a_layer():
    groups = {group_of(module) for module in GRAPH} - {"graftfl"}
    assert groups, "no modules found"
    assert not [group for group in groups if layer_of(group) is None], "add new packages to LAYERS and docs/architecture.md"


def test_no_import_from_a_lower_layer_to_a_higher_one():
    assert layer_violations(GRAPH) == []


def test_no_import_cycle():
    assert cycles(GRAPH) == []


def test_core_knows_no_flower_and_transport_no_hydra_config():
    problems = []
    for module, names in IMPORTS.items():
        forbidden = FORBIDDEN.get(group_of(module), set())
        problems += [f"{module} imports {name}" for name in sorted(names) if name.split(".")[0] in forbidden]
    assert problems == []


def test_protocol_modules_do_not_import_each_other():
    protocol_modules = {module for parts in BUILTIN_PROTOCOLS.values() for key, module in parts.items() if key in ("server", "client")}
    assert "graftfl.clients.split" in protocol_modules and "graftfl.strategies.fedavg" in protocol_modules
    problems = []
    for module in protocol_modules:
        importers = {m for m in GRAPH if m == module or m.startswith(module + ".")}  # a protocol package's own modules
        for source in importers:
            others = {t for t in GRAPH[source] if any(t == p or t.startswith(p + ".") for p in protocol_modules - {module})}
            problems += [f"{source} imports protocol module {t}" for t in sorted(others)]
    assert problems == []


@pytest.fixture
def bad_package(tmp_path):
    """A package that breaks every rule: an upward import inside a function, a cycle, Flower in core."""
    root = tmp_path / "pkg"
    for folder in ("core", "clients"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "core" / "a.py").write_text("import flwr\n\ndef f():\n    from pkg.clients.b import g\n    return g\n")
    (root / "clients" / "b.py").write_text("from ..core import a\n\ndef g():\n    return a\n")
    return root


def test_the_checks_find_an_upward_import_a_cycle_and_flower_in_core(bad_package):
    imports = imports_of(bad_package, "pkg")
    graph = internal_graph(imports)
    assert graph["pkg.core.a"] == {"pkg.clients.b"} and graph["pkg.clients.b"] == {"pkg.core", "pkg.core.a"}
    assert layer_violations(graph) == ["pkg.core.a (layer 0) imports pkg.clients.b (layer 4)"]
    assert cycles(graph) == [["pkg.clients.b", "pkg.core.a"]]
    assert "flwr" in imports["pkg.core.a"]

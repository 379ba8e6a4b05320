"""docs/deployment.md's node-config table lists every node-config key graftfl reads (issue 11, "Docs").

Finds the keys in the source, as a reviewer would: every ``node_config[...]``,
``node_config.get(...)`` and ``... in node_config`` in graftfl/ (a string literal or a
module-level constant, resolved), plus every ``NODE_*`` constant of graftfl/core/wire.py.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import graftfl

PACKAGE = Path(graftfl.__file__).parent
DOC = PACKAGE.parent / "docs" / "deployment.md"


def modules() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(), filename=str(path)) for path in sorted(PACKAGE.rglob("*.py"))}


def string_constants(trees) -> dict[str, str]:
    """Module-level ``NAME = "value"`` (and ``NAME = OTHER_NAME``) of every module, aliases followed."""
    values: dict[str, str] = {}
    aliases: dict[str, str] = {}
    for tree in trees:
        for node in tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                name = node.targets[0].id
                if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                    values[name] = node.value.value
                elif isinstance(node.value, ast.Name):
                    aliases[name] = node.value.id
    for name, target in aliases.items():
        if target in values:
            values.setdefault(name, values[target])
    return values


def is_node_config(expr: ast.AST) -> bool:
    """``context.node_config``, ``node_config``, ``(node_config or {})``, ``dict(context.node_config)``."""
    if isinstance(expr, ast.Attribute):
        return expr.attr == "node_config"
    if isinstance(expr, ast.Name):
        return expr.id == "node_config"
    if isinstance(expr, ast.BoolOp):
        return any(is_node_config(value) for value in expr.values)
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id == "dict" and expr.args:
        return is_node_config(expr.args[0])
    return False


def keys_read(trees, constants) -> dict[str, str]:
    """Every node-config key read anywhere in graftfl/, with the file that reads it."""
    found: dict[str, str] = {}

    def note(arg: ast.AST, path: Path) -> None:
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            found.setdefault(arg.value, str(path.relative_to(PACKAGE)))
        elif isinstance(arg, ast.Name):
            assert arg.id in constants, f"{path}: node-config key {arg.id} is not a module-level string constant; resolve it here"
            found.setdefault(constants[arg.id], str(path.relative_to(PACKAGE)))

    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Subscript) and is_node_config(node.value):
                note(node.slice, path)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" and is_node_config(node.func.value) and node.args:
                note(node.args[0], path)
            elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops) and is_node_config(node.comparators[0]):
                note(node.left, path)
    return found


def documented_keys() -> set[str]:
    """The first column of the table whose header is ``| key | read in | ...`` in docs/deployment.md."""
    lines = DOC.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^\|\s*key\s*\|\s*read in\s*\|", line))
    keys = set()
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        keys.update(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return keys


def test_the_node_config_table_lists_every_key_read():
    trees = modules()
    constants = string_constants(trees.values())
    read = keys_read(trees, constants)
    wire = ast.parse((PACKAGE / "core" / "wire.py").read_text())
    for node in wire.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id.startswith("NODE_"):
            read.setdefault(node.value.value, "core/wire.py")
    # the finder must find what we know is read, or it checks nothing
    assert {"partition-id", "split-key", "require-tls", "site-dir"} <= set(read), read
    missing = {key: where for key, where in read.items() if key not in documented_keys()}
    assert not missing, f"node-config keys read but not in docs/deployment.md's node-config table: {missing}"


def test_the_finder_sees_every_form_of_read(tmp_path):
    """The AST finder recognises each way the code reads a key (a guard against a finder that finds nothing)."""
    source = '''
KEY = "k-const"
ALIAS = KEY
def f(context, node_config):
    context.node_config["k-sub"]; context.node_config.get("k-get"); "k-in" in context.node_config
    (node_config or {}).get(ALIAS); dict(context.node_config)["k-dict"]; node_config.get("k-plain", 1)
'''
    tree = ast.parse(source)
    found = keys_read({PACKAGE / "fake.py": tree}, string_constants([tree]))
    assert set(found) == {"k-const", "k-sub", "k-get", "k-in", "k-dict", "k-plain"}

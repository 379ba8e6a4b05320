"""docs/security.md names only tests that exist, so the threat model cannot drift from the tests."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "security.md"
REFERENCE = re.compile(r"(tests/[\w/]+\.py)::(\w+)")
PROTOCOL_SECTIONS = ("fedavg", "split", "ushaped", "semisup", "dssgd", "features")


def defined_tests(path: Path) -> set[str]:
    """Names of the test functions of a test file (module level and in classes)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")}


def test_every_test_the_threat_model_names_exists():
    references = REFERENCE.findall(DOC.read_text())
    assert len(references) >= 50, "the finder found too few references: the pattern or the doc changed"
    missing = []
    for file, name in sorted(set(references)):
        path = ROOT / file
        if not path.is_file() or name not in defined_tests(path):
            missing.append(f"{file}::{name}")
    assert not missing, f"docs/security.md names tests that do not exist: {missing}"


def test_every_protocol_has_a_table_with_the_issues_columns():
    text = DOC.read_text()
    for protocol in PROTOCOL_SECTIONS:
        section = re.search(rf"^## `{protocol}`.*?(?=^## )", text, re.DOTALL | re.MULTILINE)
        assert section, f"no section for {protocol}"
        header = next(line for line in section.group(0).splitlines() if line.startswith("|"))
        assert [cell.strip() for cell in header.strip("|").split("|")] == [
            "what the server receives", "what each site receives", "protected, and by which mechanism", "NOT protected", "tests"], protocol
    for section in ("The split data plane", "The prediction service", "Run-directory files", "The de-duplication phase", "Issue 11 checklist"):
        assert f"## {section}" in text


def test_the_finder_rejects_a_missing_test(tmp_path):
    fake = tmp_path / "test_fake.py"
    fake.write_text("def test_here():\n    pass\n\nclass TestX:\n    def test_in_class(self):\n        pass\n")
    assert defined_tests(fake) == {"test_here", "test_in_class"}
    assert REFERENCE.findall("see `tests/test_fake.py::test_gone` and tests/sub/test_a.py::test_b.") == [
        ("tests/test_fake.py", "test_gone"), ("tests/sub/test_a.py", "test_b")]

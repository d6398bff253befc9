"""The role files import only the standard library and each other."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
ROLE_FILES = sorted(ROOT.glob("*.py"))


def imported_roots(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


@pytest.mark.skipif(sys.version_info < (3, 10), reason="sys.stdlib_module_names needs 3.10")
def test_role_files_import_only_the_standard_library_and_each_other():
    local = {path.stem for path in ROLE_FILES}
    allowed = set(sys.stdlib_module_names) | local | {"__future__"}
    strays = ["%s:%d imports %s" % (path.name, line, name)
              for path in ROLE_FILES for line, name in imported_roots(path)
              if name not in allowed]
    assert not strays


def test_no_role_imports_a_private_name_of_another():
    local = {path.stem for path in ROLE_FILES}
    for path in ROLE_FILES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in local:
                assert not any(a.name.startswith("_") for a in node.names), path.name
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in local and node.value.id != path.stem):
                assert not node.attr.startswith("_"), "%s uses %s.%s" % (
                    path.name, node.value.id, node.attr)


@pytest.mark.parametrize("path", ROLE_FILES, ids=lambda p: p.name)
def test_every_role_file_imports_cleanly_on_its_own(path):
    result = subprocess.run([sys.executable, "-c", "import " + path.stem], cwd=ROOT,
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()


def test_every_name_a_file_uses_from_another_is_in_its_all():
    local = {path.stem for path in ROLE_FILES}
    exported = {}
    for path in ROLE_FILES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__"
                                                     for t in node.targets)):
                exported[path.stem] = set(ast.literal_eval(node.value))
    missing = set()
    for path in ROLE_FILES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in local and node.value.id != path.stem):
                if node.attr not in exported.get(node.value.id, set()):
                    missing.add("%s uses %s.%s" % (path.name, node.value.id, node.attr))
    assert not sorted(missing)


def test_the_import_graph_has_no_cycle():
    local = {path.stem for path in ROLE_FILES}
    graph = {path.stem: {name for _, name in imported_roots(path) if name in local}
             for path in ROLE_FILES}

    def visit(node, trail):
        assert node not in trail, "import cycle: " + " -> ".join(trail + [node])
        for child in graph[node]:
            visit(child, trail + [node])
    for node in graph:
        visit(node, [])


def test_tests_take_their_helpers_from_support_not_conftest():
    tests = pathlib.Path(__file__).resolve().parent
    offenders = [path.name for path in tests.glob("*.py")
                 if any(root == "conftest" for _, root in imported_roots(path))]
    assert not offenders


def test_the_import_graph_is_the_one_the_readme_shows():
    import re
    local = {path.stem for path in ROLE_FILES}
    actual = {path.stem: {name for _, name in imported_roots(path) if name in local} - {path.stem}
              for path in ROLE_FILES}
    table = {}
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and re.fullmatch(r"`\w+\.py`", cells[0]):
            named = set(re.findall(r"`(\w+)`", cells[2]))
            table[cells[0].strip("`")[:-3]] = named
    assert set(table) == local
    assert {name: sorted(table[name]) for name in local} == {
        name: sorted(actual[name]) for name in local}

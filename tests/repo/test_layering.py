"""Imports flow one way: model ← inputs ← engine ← predict.py ← scripts, tools (docs/architecture.md).

Each file is parsed with `ast` (nothing is imported), every import in it — at module level or
inside a function, absolute or relative — is resolved to a module name, and the rules below are
checked. A failure names the file, the line and the forbidden import.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "deepseek_vl2"


@dataclass(frozen=True)
class Import:
    """One imported module name, where it is imported."""

    module: str
    file: Path
    line: int

    def __str__(self) -> str:
        return f"{self.file.relative_to(REPO_ROOT)}:{self.line} imports {self.module}"


def module_name(path: Path) -> str:
    """Dotted module name of a file under the repository root (``__init__`` is its package)."""
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[Import]:
    """Every module ``path`` imports (see :func:`parse_imports`)."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    return parse_imports(path.read_text(encoding="utf-8"), package, path)


def parse_imports(source: str, package: list[str], path: Path) -> list[Import]:
    """Imports in ``source``, a module of ``package``; ``from x import y`` also counts as
    ``x.y`` when y is a module, and a bare name of a file under tests/ counts as that file's
    ``tests.`` module name."""
    found = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            found += [Import(_qualified(alias.name), path, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = _qualified(node.module or "")
            found.append(Import(target, path, node.lineno))
            found += [Import(f"{target}.{alias.name}", path, node.lineno) for alias in node.names
                      if _is_module(f"{target}.{alias.name}")]
    return found


def _qualified(name: str) -> str:
    """``test_docs`` -> ``tests.repo.test_docs``: a bare name of a file under tests/ (how one test
    file would import another with tests/ folders on sys.path) is that file's module."""
    top, _, rest = name.partition(".")
    if _is_module(top):
        return name
    found = sorted((REPO_ROOT / "tests").rglob(f"{top}.py"))
    return ".".join([module_name(found[0])] + ([rest] if rest else [])) if found else name


def _is_module(dotted: str) -> bool:
    """Whether a dotted name is a module or package of this repository."""
    relative = Path(*dotted.split("."))
    return (REPO_ROOT / relative.with_suffix(".py")).is_file() or (REPO_ROOT / relative / "__init__.py").is_file()


def python_files(*roots: str) -> list[Path]:
    """The .py files under the given repository paths (files or folders)."""
    files: list[Path] = []
    for root in roots:
        path = REPO_ROOT / root
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return files


def within(module: str, prefix: str) -> bool:
    """Whether ``module`` is ``prefix`` or inside it."""
    return module == prefix or module.startswith(prefix + ".")


# Each layer of the package and what it must not import. The arrows that remain are the intended
# ones: inputs may use the model's configuration (ConfigError) but no network code; the engine
# drives model + inputs; grounding reads images like the model's input does; weights may read the
# model's config and checkpoint files. Nothing in the package knows about Cog, predict.py, the
# scripts, the tools or the tests.
OUTSIDE_THE_PACKAGE = ("predict", "scripts", "tools", "tests", "cog", "coglet", "conftest")
FORBIDDEN: dict[str, tuple[str, ...]] = {
    f"{PACKAGE}.model": (f"{PACKAGE}.inputs", f"{PACKAGE}.engine", f"{PACKAGE}.grounding",
                         f"{PACKAGE}.weights", f"{PACKAGE}.serving"),
    f"{PACKAGE}.inputs": (f"{PACKAGE}.engine", f"{PACKAGE}.grounding", f"{PACKAGE}.weights",
                          f"{PACKAGE}.serving"),
    f"{PACKAGE}.engine": (f"{PACKAGE}.grounding", f"{PACKAGE}.weights", f"{PACKAGE}.serving"),
    f"{PACKAGE}.grounding": (f"{PACKAGE}.model", f"{PACKAGE}.engine", f"{PACKAGE}.weights",
                             f"{PACKAGE}.serving"),
    f"{PACKAGE}.weights": (f"{PACKAGE}.inputs", f"{PACKAGE}.engine", f"{PACKAGE}.grounding",
                           f"{PACKAGE}.serving"),
    # serving/ is the top of the package (what predict.py calls): it may use every layer.
    f"{PACKAGE}.serving": (),
}
# inputs/ may import exactly these modules of model/ (shared configuration vocabulary).
INPUTS_MAY_USE_FROM_MODEL = (f"{PACKAGE}.model.config",)


def violations_in(imports: list[Import], forbidden: tuple[str, ...]) -> list[str]:
    """The imports that fall inside any of the ``forbidden`` module prefixes."""
    return [str(found) for found in imports if any(within(found.module, prefix) for prefix in forbidden)]


def violations(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    """The imports in ``files`` that fall inside any of the ``forbidden`` module prefixes."""
    return violations_in([found for path in files for found in imports_of(path)], forbidden)


def test_the_package_has_the_layers_the_rules_name() -> None:
    layers = {module_name(path).split(".")[1] for path in python_files(PACKAGE)
              if module_name(path) != PACKAGE}
    assert layers == {name.split(".")[1] for name in FORBIDDEN}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_downward(layer: str) -> None:
    folder = REPO_ROOT / layer.replace(".", "/")
    files = python_files(str(folder.relative_to(REPO_ROOT)) + ("" if folder.is_dir() else ".py"))
    assert not violations(files, FORBIDDEN[layer]), violations(files, FORBIDDEN[layer])


def test_inputs_use_only_the_model_configuration() -> None:
    bad = [str(found) for path in python_files(f"{PACKAGE}/inputs") for found in imports_of(path)
           if within(found.module, f"{PACKAGE}.model")
           and not any(within(found.module, allowed) for allowed in INPUTS_MAY_USE_FROM_MODEL)
           and found.module != f"{PACKAGE}.model"]
    assert not bad, bad


def test_the_package_knows_nothing_outside_it() -> None:
    bad = violations(python_files(PACKAGE), OUTSIDE_THE_PACKAGE)
    assert not bad, bad


def test_predict_imports_neither_scripts_tools_nor_tests() -> None:
    bad = violations(python_files("predict.py"), ("scripts", "tools", "tests", "conftest"))
    assert not bad, bad


@pytest.mark.parametrize("folder", ["scripts", "tools"])
def test_scripts_and_tools_import_no_tests(folder: str) -> None:
    """Scripts and tools may import the package and tools/; nothing of the tests."""
    bad = violations(python_files(folder), ("tests", "conftest"))
    assert not bad, bad


def test_no_test_file_imports_another() -> None:
    """Shared test helpers are fixtures in tests/conftest.py or modules in tools/."""
    bad = violations(python_files("tests"), ("tests", "conftest"))
    assert not bad, bad


def test_resolution_sees_every_form_an_upward_import_can_take() -> None:
    """Relative, function-level and from-imports are all seen (the rules cannot pass vacuously)."""
    source = ("from ..engine import generation\n"
              "def f():\n    import predict\n    from deepseek_vl2.inputs.processor import X\n"
              "from test_docs import TEST_COMMAND\n")
    probe = REPO_ROOT / PACKAGE / "model" / "probe.py"
    imports = parse_imports(source, [PACKAGE, "model"], probe)
    names = {found.module for found in imports}
    assert {f"{PACKAGE}.engine", f"{PACKAGE}.engine.generation", "predict",
            f"{PACKAGE}.inputs.processor", "tests.repo.test_docs"} <= names
    assert violations_in(imports, FORBIDDEN[f"{PACKAGE}.model"])


def test_a_clean_module_has_no_violations() -> None:
    imports = parse_imports("from .config import LanguageConfig\nimport torch\n", [PACKAGE, "model"],
                            REPO_ROOT / PACKAGE / "model" / "probe.py")
    assert not violations_in(imports, FORBIDDEN[f"{PACKAGE}.model"] + OUTSIDE_THE_PACKAGE)


def type_checking_lines(source: str) -> set[int]:
    """Lines of the imports under ``if TYPE_CHECKING:``: read by type checkers, never run."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        test = node.test if isinstance(node, ast.If) else None
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
                (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
            lines |= {inner.lineno for statement in node.body for inner in ast.walk(statement)
                      if isinstance(inner, (ast.Import, ast.ImportFrom))}
    return lines


def import_graph(files: list[Path]) -> dict[str, dict[str, Import]]:
    """Module → {imported module of the same files → the first import of it}: every import that
    runs, at module level or inside a function (an import deferred into a function is still an
    edge); imports for type checkers only are not."""
    modules = {module_name(path): path for path in files}
    graph: dict[str, dict[str, Import]] = {name: {} for name in modules}
    for name, path in modules.items():
        skipped = type_checking_lines(path.read_text(encoding="utf-8"))
        for found in imports_of(path):
            if found.module in modules and found.module != name and found.line not in skipped:
                graph[name].setdefault(found.module, found)
    return graph


def import_cycles(graph: dict[str, dict[str, Import]]) -> list[list[Import]]:
    """One cycle (as the imports that close it) per strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(module: str) -> None:  # Tarjan's algorithm
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = set()
            while not group or group_member != module:
                group_member = stack.pop()
                group.add(group_member)
            if len(group) > 1:
                groups.append(group)

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return [_cycle_within(graph, group) for group in groups]


def _cycle_within(graph: dict[str, dict[str, Import]], group: set[str]) -> list[Import]:
    """A shortest path of imports from the group's first module back to itself, inside the group."""
    start = min(group)
    paths: dict[str, list[Import]] = {start: []}
    frontier = [start]
    while frontier:
        following = []
        for module in frontier:
            for target, found in sorted(graph[module].items()):
                if target == start:
                    return paths[module] + [found]
                if target in group and target not in paths:
                    paths[target] = paths[module] + [found]
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(group)}")


def test_the_package_has_no_import_cycle() -> None:
    """A module imports only what does not import it back, even lazily inside a function."""
    cycles = import_cycles(import_graph(python_files(PACKAGE)))
    assert not cycles, [" → ".join(str(found) for found in cycle) for cycle in cycles]


def test_a_cycle_through_a_function_level_import_is_found() -> None:
    """The check sees a cycle closed by an import deferred into a function (it cannot pass vacuously)."""
    model = REPO_ROOT / PACKAGE / "model"
    first = parse_imports("from .second import f\n", [PACKAGE, "model"], model / "first.py")
    second = parse_imports("def f():\n    from .first import g\n", [PACKAGE, "model"], model / "second.py")
    names = {"first": f"{PACKAGE}.model.first", "second": f"{PACKAGE}.model.second"}
    graph = {names["first"]: {names["second"]: first[0]}, names["second"]: {names["first"]: second[0]}}
    cycles = import_cycles(graph)
    assert [[found.module for found in cycle] for cycle in cycles] == [[names["second"], names["first"]]]
    assert import_cycles({names["first"]: {names["second"]: first[0]}, names["second"]: {}}) == []


def test_an_import_for_type_checkers_only_is_no_edge() -> None:
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .first import g\nfrom .third import h\n"
    assert type_checking_lines(source) == {3}

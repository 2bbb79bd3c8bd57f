# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""The shape of the library (README "Architecture"): packages import in one direction, never a script.

Every import in ``lit_qa/`` counts, also those inside functions and under ``TYPE_CHECKING``: a lazy import
hides a cycle from Python's import system, not from a reader.
"""

import ast
from pathlib import Path

import pytest

LIBRARY = Path(__file__).resolve().parents[1] / "lit_qa"
SCRIPT_FOLDERS = ("finetune", "evaluate", "generate", "scripts", "benchmarks")
# The README's diagram, bottom to top: a package may import only from packages listed before it.
LAYERS = ("errors", "files", "precision", "models", "quantize", "checkpoints", "data", "generation", "evaluation",
          "training", "cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(LIBRARY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
    return found


def package_of(module: str) -> str | None:
    """``lit_qa.training.loop`` -> ``training``; ``lit_qa.errors`` -> ``errors``; None outside lit_qa."""
    parts = module.split(".")
    return parts[1] if parts[0] == "lit_qa" and len(parts) > 1 else None


def library_modules() -> dict[str, set[str]]:
    return {module_name(path): imported_modules(path) for path in sorted(LIBRARY.rglob("*.py"))}


def package_graph(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, imports in modules.items():
        source = package_of(module)
        if source is None:  # lit_qa/__init__.py: re-exports only
            continue
        graph.setdefault(source, set()).update(
            target for target in map(package_of, imports) if target is not None and target != source
        )
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that starts and ends at the same node, or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target] if target in path else [node, target]
            if target not in state and (cycle := visit(target, path + [target])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


def test_no_library_module_imports_a_script():
    offenders = [
        f"{module} imports {imported}"
        for module, imports in library_modules().items()
        for imported in sorted(imports)
        if imported.split(".")[0] in SCRIPT_FOLDERS
    ]
    assert not offenders, "lit_qa/ must not import the standalone scripts:\n" + "\n".join(offenders)


def test_package_graph_has_no_cycle_and_follows_the_layers():
    graph = package_graph(library_modules())
    assert set(graph) == set(LAYERS), "a package was added or removed: update LAYERS and README's Architecture"
    assert find_cycle(graph) is None, f"import cycle between packages: {' -> '.join(find_cycle(graph))}"
    upward = [f"{source} imports {target}" for source, targets in graph.items() for target in sorted(targets)
              if LAYERS.index(target) > LAYERS.index(source)]  # fmt: skip
    assert not upward, "a package imports one above it in README's Architecture diagram:\n" + "\n".join(upward)


def test_module_graph_has_no_cycle():
    modules = library_modules()
    graph = {module: {m for m in imports if m in modules and m != module} for module, imports in modules.items()}
    graph.pop("lit_qa", None)  # the package's __init__ re-exports; importing lit_qa.x runs it first, always
    graph = {module: targets - {"lit_qa"} for module, targets in graph.items()}
    assert find_cycle(graph) is None, f"import cycle between modules: {' -> '.join(find_cycle(graph))}"


@pytest.mark.parametrize(
    ("graph", "has_cycle"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
        ({"a": {"a"}}, True),
        ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, False),
    ],
)
def test_find_cycle(graph, has_cycle):
    cycle = find_cycle(graph)
    assert (cycle is not None) == has_cycle
    if cycle:
        assert cycle[0] == cycle[-1] and all(b in graph[a] for a, b in zip(cycle, cycle[1:]))


def test_imports_are_found_inside_functions_and_relative(tmp_path, monkeypatch):
    package = tmp_path / "lit_qa" / "pkg"
    package.mkdir(parents=True)
    module = package / "mod.py"
    module.write_text("from . import sibling\nfrom ..other import x\n\ndef f():\n    import finetune.lora\n")
    monkeypatch.setattr(f"{__name__}.LIBRARY", tmp_path / "lit_qa")
    assert imported_modules(module) == {"lit_qa.pkg", "lit_qa.other", "finetune.lora"}

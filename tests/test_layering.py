"""The layering of pacs_ai, read from the source (issue 25 item 1): the config imports no stage,
so reading a config file pulls in neither the model nor the decoders; and no two parts import
each other, so the packages by stage read in one order, as the pipeline does.

Every import counts, including those inside functions: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pacs_ai

PACKAGE_ROOT = Path(pacs_ai.__file__).resolve().parent
# What the config may import: the vocabulary modules that import nothing of pacs_ai themselves.
SHARED_LEAVES = {"pacs_ai.errors", "pacs_ai.dicom_constants"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE_ROOT.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The pacs_ai modules a file imports, wherever the import statement is."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("pacs_ai"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "pacs_ai":
            found.add(node.module)
            # `from pacs_ai.x import y`: y may itself be a module
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if f"{node.module}.{alias.name}" in known)
    return found - {"pacs_ai"}


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, set(known)) for name, path in known.items()}


def in_config(name: str) -> bool:
    return name == "pacs_ai.config" or name.startswith("pacs_ai.config.")


def test_the_config_imports_no_stage():
    graph = import_graph()
    config_modules = [name for name in graph if in_config(name)]
    assert config_modules, "no pacs_ai.config found"
    for name in config_modules:
        outside = {target for target in graph[name] if not in_config(target)} - SHARED_LEAVES
        assert not outside, f"{name} imports {sorted(outside)}"
    for leaf in SHARED_LEAVES:
        assert not graph[leaf], f"{leaf} is meant to import nothing of pacs_ai: {graph[leaf]}"


def part_of(name: str) -> str:
    """The package by stage a module belongs to (`pacs_ai.receive`), or the module itself for
    those at the top (`pacs_ai.config`, `pacs_ai.service`)."""
    return ".".join(name.split(".")[:2])


def part_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    parts: dict[str, set[str]] = {}
    for name, targets in graph.items():
        parts.setdefault(part_of(name), set()).update(
            part_of(target) for target in targets if part_of(target) != part_of(name))
    return parts


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle in the graph as the path that closes it ([a, b, a]), or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph.get(node, ())):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = visit(node)
        if cycle:
            return cycle
    return None


def test_no_two_packages_import_each_other():
    parts = part_graph(import_graph())
    stages = [part for part in parts if (PACKAGE_ROOT / part.removeprefix("pacs_ai.")).is_dir()]
    assert len(stages) >= 10, sorted(parts)  # the packages by stage exist
    cycle = find_cycle(parts)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle_between_packages():
    """The check above is only as good as its cycle finder."""
    graph = {"pacs_ai.ops.health": {"pacs_ai.deliver.destination_echo"},
             "pacs_ai.deliver.destination_echo": {"pacs_ai.ops.metrics"},
             "pacs_ai.ops.metrics": {"pacs_ai.queue.jobs"}, "pacs_ai.queue.jobs": set()}
    assert find_cycle(part_graph(graph)) == ["pacs_ai.deliver", "pacs_ai.ops", "pacs_ai.deliver"]
    del graph["pacs_ai.ops.health"]
    assert find_cycle(part_graph(graph)) is None


def test_the_graph_reader_sees_lazy_imports():
    """The checks above are only as good as the reader: an import inside a function counts."""
    graph = import_graph()
    assert "pacs_ai.cli" in graph and graph["pacs_ai.cli"]  # imports inside main()
    service = graph[next(name for name in graph if name.endswith(".service"))]
    assert any(in_config(target) for target in service)


def test_the_module_map_says_what_each_package_imports():
    """docs/architecture.md's module map says, under each package, which parts it imports: the
    sentence is read and compared with the source, so the doc cannot drift from the code."""
    doc = (PACKAGE_ROOT.parent / "docs" / "architecture.md").read_text()
    parts = part_graph(import_graph())
    packages = [path.name for path in sorted(PACKAGE_ROOT.iterdir())
                if (path / "__init__.py").is_file() and path.name != "commands"]
    for package in packages:
        heading = doc.index(f"**`{package}/`**")
        paragraph = " ".join(doc[heading:doc.index("\n\n", heading)].split())
        said = paragraph.rsplit("Imports ", 1)[1].rstrip(".")
        said_parts = set() if said == "nothing of pacs_ai" else {
            "pacs_ai." + name.strip(" `/") for name in said.split(",")}
        assert said_parts == parts[f"pacs_ai.{package}"], (package, said)

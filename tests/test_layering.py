"""The layering of pacs_ai, read from the source (issue 25 item 1): the config imports no stage,
so reading a config file pulls in neither the model nor the decoders.

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


def test_the_graph_reader_sees_lazy_imports():
    """The checks above are only as good as the reader: an import inside a function counts."""
    graph = import_graph()
    assert "pacs_ai.cli" in graph and graph["pacs_ai.cli"]  # imports inside main()
    service = graph[next(name for name in graph if name.endswith(".service"))]
    assert any(in_config(target) for target in service)

"""The package's layers: every import (function-level ones included) goes to the module's own layer
or one before it, no modules import each other in a circle, the kernels never import
transformers, and the workflow imports only `core` and `study` (docs/contributing.md)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "kvsweep"
LAYERS = {
    "core": 0,
    "study": 1,
    "kernels": 2,
    "engine": 3,
    "analysis": 4,
    "surrogate": 5,
    "tasks": 5,
    "demo": 5,
    "stages": 6,
    "cli": 7,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("__main__",):
        return max(LAYERS.values()) + 1  # the package's entry points
    return LAYERS[parts[1]]


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of its code (absolute names)."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def kvsweep_imports() -> dict[str, set[str]]:
    """Module -> the kvsweep modules it imports (a name imported from a package that is not a
    module of it counts as the package)."""
    known = modules()
    graph = {}
    for name, path in known.items():
        graph[name] = {i for i in imports_of(path) if i in known and i != name and not name.startswith(i + ".")}
    return graph


def test_every_module_lies_in_a_layer():
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py", "__main__.py"]
    for name in modules():
        layer_of(name)  # a KeyError names a folder outside the layers


def test_imports_go_one_way():
    wrong = [
        f"{name} ({name.split('.')[1]}) imports {target}"
        for name, targets in kvsweep_imports().items()
        for target in targets
        if layer_of(target) > layer_of(name)
    ]
    assert not wrong, "\n".join(wrong)


def test_no_modules_import_each_other_in_a_circle():
    graph = kvsweep_imports()
    # Tarjan's strongly connected components.
    index, low, on_stack, stack, circles = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
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
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not circles, circles


def test_the_kernels_never_import_transformers():
    for path in (PACKAGE / "kernels").glob("*.py"):
        assert not any(i.split(".")[0] == "transformers" for i in imports_of(path)), path.name


def test_the_workflow_imports_core_and_study_only():
    texts = [(ROOT / "Snakefile").read_text(), *(p.read_text() for p in (ROOT / "workflow").rglob("*.smk"))]
    found = {m for text in texts for m in re.findall(r"^\s*(?:from|import)\s+(kvsweep[\w.]*)", text, re.M)}
    assert found and all(m.split(".")[1] in ("core", "study") for m in found), found
    assert not any(re.search(r"^\s*(?:from|import)\s+torch\b", text, re.M) for text in texts)

"""The tree's rules (DESIGN.md section 3), read from the source: ops is the base layer, imports run one way
and in no circle, fast paths are named by algorithm."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    """ramba/foo/bar.py -> ramba.foo.bar; ops/x/__init__.py -> ramba.ops.x."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "ops":
        parts.insert(0, "ramba")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def library_files() -> dict[str, Path]:
    return {module_name(p): p for folder in ("ramba", "ops") for p in sorted((ROOT / folder).rglob("*.py"))}


def imports(path: Path, name: str, top_level_only: bool) -> set[str]:
    """The modules a file imports (relative imports resolved), at module level only if top_level_only."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}
    return found


def test_ops_imports_nothing_of_ramba_outside_ramba_ops():
    for name, path in library_files().items():
        if name.startswith("ramba.ops"):
            bad = {m for m in imports(path, name, top_level_only=False)
                   if m.split(".")[0] == "ramba" and not m.startswith("ramba.ops")}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_no_fast_path_file_named_triton():
    assert not list((ROOT / "ops").rglob("triton.py"))


def test_library_import_graph_has_no_cycle():
    files = library_files()
    graph = {name: {m for m in imports(path, name, top_level_only=True) if m in files} - {name}
             for name, path in files.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_imports_run_one_way():
    """ops <- ramba <- recipes, benchmarks: the library never imports recipes or benchmarks."""
    for name, path in library_files().items():
        bad = {m for m in imports(path, name, top_level_only=False) if m.split(".")[0] in ("benchmarks", "recipes")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_benchmarks_hold_harnesses_only():
    """No model class, optimizer loop or decode loop in benchmarks/: those live in ramba and are tested there."""
    for path in sorted((ROOT / "benchmarks").rglob("*.py")):
        tree = ast.parse(path.read_text())
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b) for b in node.bases}
                assert not bases & {"nn.Module", "torch.nn.Module", "Module"}, f"{where}: model class {node.name}"
            if isinstance(node, ast.Attribute):
                assert ast.unparse(node) != "torch.optim", f"{where}:{node.lineno} builds an optimizer"
                assert node.attr != "backward", f"{where}:{node.lineno} runs a backward pass"
            if isinstance(node, (ast.For, ast.While)):
                calls = [n for n in ast.walk(node) if isinstance(n, ast.Call)]
                cached = any(k.arg == "cache" for c in calls for k in c.keywords)
                picks = any(isinstance(c.func, ast.Attribute) and c.func.attr == "argmax" for c in calls)
                assert not (cached and picks), f"{where}:{node.lineno} decodes token by token"

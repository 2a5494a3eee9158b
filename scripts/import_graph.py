"""The import graph of hfcompress between its subpackages: imports, function-level imports, the arrows with the
most imports, and the groups of subpackages caught in a cycle (of any length).

    python scripts/import_graph.py [PACKAGE_DIR] [--nested]   # --nested lists the function-level imports
"""

from __future__ import annotations

import argparse
import ast
import collections
from pathlib import Path


def imports(root: Path):
    """(subpackage, imported module, inside a function, file, line) for every import under `root`."""
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        package = parts[:-1]
        tree = ast.parse(path.read_text())
        nested = {
            id(node)
            for fn in ast.walk(tree)
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
            for node in ast.walk(fn)
            if isinstance(node, (ast.Import, ast.ImportFrom))
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = list(package[: len(package) - node.level + 1]) if node.level else []
                module = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
            elif isinstance(node, ast.Import):
                module = node.names[0].name
            else:
                continue
            owner = parts[1] if len(parts) > 2 else root.name
            yield owner, module, id(node) in nested, path, node.lineno


def subpackage(module: str, root: Path) -> str | None:
    parts = module.split(".")
    if parts[0] != root.name:
        return None
    if len(parts) > 2 or (len(parts) == 2 and (root / parts[1]).is_dir()):
        return parts[1]
    return root.name


def cycles(edges) -> list[list[str]]:
    """Strongly connected groups of more than one subpackage (Tarjan)."""
    graph = collections.defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    index, low, stack, on, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in list(graph):
        if v not in index:
            visit(v)
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", nargs="?", default=str(Path(__file__).parent.parent / "hfcompress"))
    parser.add_argument("--nested", action="store_true", help="list the function-level imports")
    args = parser.parse_args()
    root = Path(args.root)
    found = list(imports(root))
    arrows = collections.Counter()
    for owner, module, _, _, _ in found:
        target = subpackage(module, root)
        # a module of the top level (data.py, io.py) or the package itself is not a subpackage arrow
        if target not in (None, owner) and root.name not in (owner, target):
            arrows[(owner, target)] += 1
    nested = [(path, line, module) for _, module, inside, path, line in found if inside]
    print(f"imports: {len(found)}, inside functions: {len(nested)}")
    print("groups of subpackages in a cycle:", cycles(arrows) or "none")
    print("biggest arrows:", ", ".join(f"{a} -> {b} ({n})" for (a, b), n in arrows.most_common(12)))
    if args.nested:
        for path, line, module in nested:
            print(f"  {path.relative_to(root.parent)}:{line} {module}")


if __name__ == "__main__":
    main()

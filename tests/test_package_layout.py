"""The shape of the package: the core and the checkpoint name no technique, subpackages import each other in
one direction only, and a function-level import is kept for an optional heavy package."""

import ast
from pathlib import Path

import hfcompress

ROOT = Path(hfcompress.__file__).parent
TECHNIQUES = {"quantization", "pruning", "lowrank", "distillation"}
OPTIONAL = (
    "datasets",
    "peft",
    "bitsandbytes",
    "matplotlib",
    "triton",
    "compressed_tensors",
    "torch.utils.cpp_extension",
)


def _imports():
    """(subpackage, imported module, inside a function) for every import in the package."""
    found = []
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
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
            found.append((parts[1] if len(parts) > 2 else "hfcompress", module, id(node) in nested, path.name))
    return found


def _subpackage(module: str) -> str | None:
    parts = module.split(".")
    return (
        parts[1]
        if (parts[0] == "hfcompress" and len(parts) > 2) or (len(parts) == 2 and (ROOT / parts[1]).is_dir())
        else None
    )


def test_subpackages_import_each_other_in_one_direction_only():
    edges = {(a, _subpackage(m)) for a, m, _, _ in _imports() if _subpackage(m) not in (None, a)}
    assert not [(a, b) for a, b in edges if (b, a) in edges]
    reach = {a: {b for x, b in edges if x == a} for a, _ in edges}
    for _ in range(len(reach)):  # transitive closure: no longer cycles either
        reach = {a: bs | {c for b in bs for c in reach.get(b, ())} for a, bs in reach.items()}
    assert not [a for a, bs in reach.items() if a in bs]


def test_the_core_and_the_checkpoint_name_no_technique():
    for package in ("core", "checkpoint"):
        named = {_subpackage(m) for a, m, _, _ in _imports() if a == package} - {None, package}
        assert not named & TECHNIQUES, (package, named)
        assert named <= {"core"}, (package, named)


def test_function_level_imports_are_for_optional_packages_only():
    nested = [(f, m) for _, m, inside, f in _imports() if inside and not m.startswith(OPTIONAL)]
    # the experimental Triton kernel imports triton at module level, so it is imported only where it runs
    assert nested == [("kernels.py", "hfcompress.experimental.triton_w4")]

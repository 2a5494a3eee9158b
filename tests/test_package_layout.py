"""The shape of the package: the core and the checkpoint name no technique, subpackages import each other in
one direction only, and a function-level import is kept for an optional heavy package. The graph comes from
`scripts/import_graph.py`, the report the closing notes quote."""

import sys
from pathlib import Path

import hfcompress

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
from import_graph import cycles, imports, subpackage

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


def _arrows() -> set[tuple[str, str]]:
    found = {(owner, subpackage(module, ROOT)) for owner, module, *_ in imports(ROOT)}
    return {(a, b) for a, b in found if b not in (None, a) and "hfcompress" not in (a, b)}


def test_subpackages_import_each_other_in_one_direction_only():
    assert cycles(_arrows()) == []


def test_the_core_and_the_checkpoint_name_no_technique():
    arrows = _arrows()
    assert {b for a, b in arrows if a == "core"} == set()
    assert {b for a, b in arrows if a == "checkpoint"} == {"core"}
    assert not {a for a, b in arrows if b in TECHNIQUES} & {"core", "checkpoint"}


def test_function_level_imports_are_for_optional_packages_only():
    nested = [(path.name, module) for _, module, inside, path, _ in imports(ROOT) if inside]
    # the experimental Triton kernel imports triton at module level, so it is imported only where it runs
    assert [n for n in nested if not n[1].startswith(OPTIONAL)] == [("kernels.py", "hfcompress.experimental.triton_w4")]

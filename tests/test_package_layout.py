"""The shape of the package: the core and the checkpoint name no technique, subpackages import each other in
one direction only, a function-level import is kept for an optional heavy package or for keeping torch out of
`import hfcompress` and the command-line parser. The graph comes from `scripts/import_graph.py`, the report the
closing notes quote."""

import subprocess
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
    "lm_eval",
    "gguf",
    "PIL",
    "soundfile",
)
# imported where they are used, so that `import hfcompress` and building the parser import no torch
DEFERRED = {
    ("registration.py", "hfcompress.checkpoint.hf_quantizer"),  # registers when transformers' registry loads
    ("registry.py", "hfcompress.core.coverage"),  # the coverage check after a quantization
    ("registry.py", "hfcompress.core.experts"),  # fused experts held as linears while a technique runs
    ("cli.py", "hfcompress.hub.push"),  # the handler's errors, after parsing
    ("cli.py", "hfcompress.hub.record"),
    ("cli.py", "transformers.utils"),  # logging set-up, after parsing
    ("cli.py", "hfcompress.core.distributed"),  # torch.distributed, only under a launcher
    ("cli.py", "torch.distributed"),
    ("bnb_config.py", "torch"),  # `to_transformers`, not the config's fields
    ("bnb_config.py", "transformers"),
    ("tasks.py", "transformers"),  # the class a task builds, what it reads: the parser loads core.tasks
    ("wrapped_kernels.py", "hfcompress.experimental.triton_w4"),  # imports triton at module level
}


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
    assert {n for n in nested if not n[1].startswith(OPTIONAL)} == DEFERRED


def test_import_and_the_parser_import_no_torch():
    """`import hfcompress` registers everything and the command line parses without torch or transformers, so
    `--help` and argument errors answer at once; the names load when used."""
    code = (
        "import sys, hfcompress\n"
        "from hfcompress.commands.cli import build_parser\n"
        "parser = build_parser()\n"
        "print(sorted(m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules))\n"
        "print(hfcompress.GPTQConfig.__name__, hfcompress.quantization.save.save_quantized.__name__)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]"
    assert out[1] == "GPTQConfig save_quantized"
    assert out[2] == "True"

"""Print the architecture x technique matrix the README shows: every cell of `tests/architectures.py` run now
(compress a tiny model built from its config, save, reload, compare the outputs), a check mark where it passed,
the stated reason where the cell is a known gap, and the error where anything else happened.

    python scripts/architecture_matrix.py
    python scripts/architecture_matrix.py --coverage     # what RTN covers on one model of each family
"""

from __future__ import annotations

import logging
import sys
import tempfile
import warnings
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

import torch  # noqa: E402
from architectures import BUILDERS, GAPS, TECHNIQUES, run_cell  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import hfcompress  # noqa: E402
from hfcompress.core.coverage import coverage  # noqa: E402
from hfcompress.core.registry import compress  # noqa: E402


def cell(architecture: str, technique: str) -> tuple[str, str | None]:
    """(mark, note): the mark of one cell, and the reason or error it footnotes."""
    gap = GAPS.get((architecture, technique))
    try:
        with tempfile.TemporaryDirectory() as folder:
            run_cell(architecture, technique, folder)
    except Exception as e:  # a gap's refusal, or a failure to report
        if gap is not None and gap[1] in str(e):
            return "-", gap[0]
        return "✗", f"{type(e).__name__}: {str(e)[:200]}"
    return ("✓", None) if gap is None else ("✓ (gap closed?)", gap[0])


def print_coverage() -> None:
    """The coverage report of round-to-nearest on the first architecture of each family."""
    seen = set()
    for architecture, (family, build) in BUILDERS.items():
        if family in seen:
            continue
        seen.add(family)
        torch.manual_seed(0)
        model = compress(build().eval(), hfcompress.RTNConfig(bits=4, group_size=32, allow_partial=True))
        print(f"- {architecture} ({family}): {coverage(model).describe()}")


def main() -> int:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if "--coverage" in sys.argv[1:]:
        print_coverage()
        return 0
    notes: list[str] = []
    failed = 0
    print("| architecture | " + " | ".join(TECHNIQUES) + " |")
    print("| --- |" + " --- |" * len(TECHNIQUES))
    for architecture, (family, _) in BUILDERS.items():
        marks = []
        for technique in TECHNIQUES:
            mark, note = cell(architecture, technique)
            failed += mark == "✗"
            if note is not None:
                if note not in notes:
                    notes.append(note)
                mark += f" ({notes.index(note) + 1})"
            marks.append(mark)
        print(f"| {architecture} ({family}) | " + " | ".join(marks) + " |")
    print()
    for number, note in enumerate(notes, 1):
        print(f"({number}) {note}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

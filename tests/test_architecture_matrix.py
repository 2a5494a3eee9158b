"""Every architecture against every layer-by-layer technique: compressed, saved and reloaded with the same
outputs, or refused with the reason `architectures.GAPS` states (the README's matrix)."""

import re

import pytest
from architectures import BUILDERS, GAPS, TECHNIQUES, run_cell

CELLS = [(a, t) for a in BUILDERS for t in TECHNIQUES]


@pytest.mark.parametrize(("architecture", "technique"), CELLS, ids=[f"{a}-{t}" for a, t in CELLS])
def test_cell(architecture, technique, tmp_path):
    gap = GAPS.get((architecture, technique))
    if gap is None:
        run_cell(architecture, technique, tmp_path)
        return
    # a gap is refused with a message that says so, never a crash or a silent skip
    with pytest.raises(ValueError, match=re.escape(gap[1])):
        run_cell(architecture, technique, tmp_path)

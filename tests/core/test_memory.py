"""Handing freed memory back (core.memory): glibc takes the fixed mmap threshold streaming sets."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")

CHILD = """
import ctypes, torch
from hfcompress.core.memory import release_large_frees, trim_heap
assert release_large_frees(), "glibc refused M_MMAP_THRESHOLD"
x = torch.ones(1 << 20)  # 4 MiB: served from its own mapping now
assert float(x.sum()) == 1 << 20
del x
trim_heap()
print("ok")
"""


def test_release_large_frees_is_taken_by_glibc():
    # in a child: the setting is the whole process's, and the test process should keep glibc's defaults
    result = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    if "libc.so.6" in result.stderr:
        pytest.skip("not glibc")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr

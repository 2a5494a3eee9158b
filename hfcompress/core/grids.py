"""What a stored uniform grid may be: its bit widths, group sizes and scale dtypes. Plain Python, so the
configs that check them import no torch."""

from __future__ import annotations

__all__ = ["SCALE_DTYPES", "SUPPORTED_BITS", "check_grid"]

# bit widths with a packed layout that loading and the kernels support
SUPPORTED_BITS = (2, 3, 4, 8)
SCALE_DTYPES = ("float16", "bfloat16", "float32")


def check_grid(bits: int, group_size: int, scale_dtype: str) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"`bits` must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {bits!r}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or (group_size != -1 and group_size < 1):
        raise ValueError(
            f"`group_size` must be a positive integer or -1 (one group per output row), got {group_size!r}"
        )
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"`scale_dtype` must be one of {', '.join(SCALE_DTYPES)}, got {scale_dtype!r}")

"""Calibration across processes (`torchrun` or `accelerate launch`, gloo on CPU, nccl on GPUs): every rank
calibrates on its own share of the calibration batches, the statistics the solvers read (every input Hessian,
and so Wanda's norms) are summed over ranks before each solve, a solver whose rows are independent (GPTQ)
solves each rank's share of the rows and gathers the rest from the others (`row_shares`, `gather_rows`), and
rank 0 alone writes. Without an initialized process group everything here is the single-process no-op.

The result is a single process's up to the order in which the Hessian's sums are added (float32 rounding,
about 1e-7 relative, as a different thread count gives); GPTQ carries a rounding that flips on through the rest
of a row, so the codes are close in what the model computes, not bit-equal. Hessians summed in float64
(`core.hessian.Hessian`, GPTQ's `hessian_dtype`) are the single process's exactly, and so are GPTQ's codes, when
every process runs as many threads as the single one did (the thread count changes float32 products).
"""

from __future__ import annotations

import datetime
import logging
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = [
    "barrier",
    "batch_place",
    "chosen_by_main",
    "decided_by_main",
    "extremes",
    "first_windows",
    "gather_rows",
    "gathered",
    "init_from_environment",
    "is_main",
    "path_of_main",
    "rank",
    "reduce_max",
    "reduce_mean",
    "reduce_sum",
    "row_shares",
    "shard_batches",
    "summed_in_order",
    "world_size",
]

logger = logging.getLogger(__name__)

# how long a collective waits for the other ranks (a launcher stops every rank when one fails, so only a true hang
# waits this long)
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=12)

PATH_BYTES = 4096  # the longest path `path_of_main` sends (Linux's PATH_MAX)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    """Whether this process writes (rank 0, or the only process)."""
    return rank() == 0


def init_from_environment() -> bool:
    """Join the process group a launcher describes (`WORLD_SIZE` > 1 in the environment); True if it did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # the other ranks wait for rank 0 to write and evaluate a large model: longer than the default half hour
    dist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT)
    logger.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def decided_by_main(flag: bool) -> bool:
    """Rank 0's `flag` on every rank: a choice each rank makes from what it sees (the memory free now) must be one
    choice, or the ranks would run different collectives."""
    return bool(chosen_by_main(int(flag)))


def chosen_by_main(index: int) -> int:
    """Rank 0's `index` on every rank: a choice each rank makes from its own share of the data (which module a
    check on its first batch accepts) must be one choice."""
    if world_size() == 1:
        return index
    value = torch.tensor([index], dtype=torch.int64)
    dist.broadcast(value, src=0)
    return int(value.item())


def path_of_main(path: os.PathLike) -> Path:
    """Rank 0's `path` on every rank: a folder rank 0 writes that the others then read (they must see the same
    file system, as they see OUTPUT's)."""
    if world_size() == 1:
        return Path(path)
    data = torch.zeros(PATH_BYTES, dtype=torch.uint8)
    if is_main():
        raw = os.fsencode(os.path.abspath(path))
        if len(raw) > PATH_BYTES:
            raise ValueError(f"path {os.fspath(path)!r} is longer than {PATH_BYTES} bytes")
        data[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    dist.broadcast(data, src=0)
    return Path(os.fsdecode(bytes(data.tolist()).rstrip(b"\0")))


def gathered(value: int) -> list[int]:
    """Every rank's `value`, in rank order (a list of this one alone in a single process)."""
    if world_size() == 1:
        return [value]
    values = [torch.zeros(1, dtype=torch.int64) for _ in range(world_size())]
    dist.all_gather(values, torch.tensor([value], dtype=torch.int64))
    return [int(v.item()) for v in values]


def extremes(value: int) -> tuple[int, int]:
    """The smallest and the largest of every rank's `value`."""
    values = gathered(value)
    return min(values), max(values)


def barrier() -> None:
    """Wait until every rank is here (nothing with one process)."""
    if world_size() > 1:
        dist.barrier()


def shard_batches(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's share of the calibration batches: every `world_size`-th one, starting at its rank."""
    size = world_size()
    if size == 1:
        return batches
    if len(batches) < size:
        raise ValueError(
            f"{len(batches)} calibration batches cannot be shared by {size} processes: give more windows "
            "(num_samples) or smaller batches (batch_size), or run fewer processes"
        )
    return batches[rank() :: size]


def batch_place(j: int) -> int:
    """The place of this rank's batch `j` among every rank's batches in one process's order: `shard_batches`
    deals batch rank + j·size of them to this rank as its batch j."""
    return rank() + j * world_size()


def first_windows(batches: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    """This rank's share of the first `n` calibration windows of all ranks together (`batches` as
    `shard_batches` gave them): one process gets `torch.cat(batches)[:n]` split as it was batched."""
    width = len(batches[0]) if batches else 0
    kept = []
    for j, batch in enumerate(batches):
        before = batch_place(j) * width  # windows of all ranks before this batch
        if before < n:
            kept.append(batch[: n - before])
    return kept


def summed_in_order(values: dict[int, float], places: int) -> float:
    """The sum of every rank's `values` (each rank holds its own places among `places`), added in the order of
    their places: the same float however many processes hold them (adding the other ranks' zeros is exact)."""
    slots = torch.zeros(places, dtype=torch.float64)
    for place, value in values.items():
        slots[place] = value
    if world_size() > 1:
        dist.all_reduce(slots)
    return math.fsum(slots.tolist())


def reduce_mean(mean: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
    """The mean over every rank's rows, from each rank's `mean` of its `count` rows (`mean` is changed in place)."""
    if world_size() == 1:
        return mean, count
    total, n = reduce_sum(mean.mul_(count), count)
    return total.div_(max(n, 1)), n


def reduce_sum(total: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
    """The sum over every rank's rows, and their number, from each rank's `total` of its `count` rows (`total` is
    changed in place)."""
    if world_size() == 1:
        return total, count
    counts = torch.tensor([float(count)], dtype=torch.float64)
    dist.all_reduce(counts)
    dist.all_reduce(total)
    return total, int(counts.item())


def reduce_max(peaks: dict[str, torch.Tensor], widths: dict[str, int]) -> dict[str, torch.Tensor]:
    """Every rank's `peaks` (a largest value per channel, under each name of `widths`, which gives its channels;
    a name this rank never saw is missing) joined by their elementwise maximum: exact, whatever the order. The
    names no rank saw stay missing."""
    if world_size() == 1:
        return peaks
    flat = torch.full((sum(widths.values()) + len(widths),), -torch.inf)
    at = 0
    for name, width in widths.items():  # a flag after each name's channels says whether a rank saw it
        if name in peaks:
            flat[at : at + width] = peaks[name].float()
            flat[at + width] = 1
        at += width + 1
    dist.all_reduce(flat, op=dist.ReduceOp.MAX)
    joined, at = {}, 0
    for name, width in widths.items():
        if flat[at + width] > 0:
            joined[name] = flat[at : at + width].clone()
        at += width + 1
    return joined


def row_shares(rows: int) -> list[slice]:
    """The rows of a `rows`-row solve each rank takes, in rank order: consecutive runs as even as can be."""
    size = world_size()
    step = -(-rows // size)
    return [slice(min(r * step, rows), min((r + 1) * step, rows)) for r in range(size)]


def gather_rows(part: torch.Tensor, shares: list[slice]) -> torch.Tensor:
    """The rows every rank computed (rank r holds `part` = rows `shares[r]`), joined in rank order, on every
    rank."""
    if world_size() == 1:
        return part
    longest = max(s.stop - s.start for s in shares)
    padded = part.new_zeros((longest, *part.shape[1:]))
    padded[: part.shape[0]] = part
    pieces = [torch.empty_like(padded) for _ in shares]
    dist.all_gather(pieces, padded.contiguous())
    return torch.cat([piece[: s.stop - s.start] for piece, s in zip(pieces, shares, strict=True)])

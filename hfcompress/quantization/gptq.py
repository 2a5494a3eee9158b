"""GPTQ (Frantar et al., 2022) as pure tensor functions.

Notation follows the reference implementation: `W` is the weight [out, in], `H` the Hessian of the layer's
squared output error (2 X Xᵀ / n), `Hinv` the upper Cholesky factor of its inverse, `Err` the scaled
quantization error that is spread onto the columns not yet quantized.
"""

from __future__ import annotations

import functools

import torch

from ..core.hessian import accumulate_hessian, gram_upper, inverse_cholesky, symmetrize_upper
from ..core.rowwise import rows_per_block
from .grid import QuantizedWeight, grid_params, quantize_to_codes

# columns whose errors are spread by rank-1 updates before one matmul carries them further (see `gptq_quantize`)
SEGMENT = 16
# weights one pass holds in float32 (128 MiB): a wider layer's rows are solved a block at a time (see `gptq_quantize`)
PASS_ELEMENTS = 1 << 25
# how `clip_search` scores a shrunk range (see `gptq_quantize`)
CLIP_OBJECTIVES = ("hessian", "rounding")

__all__ = [
    "accumulate_hessian",
    "gptq_quantize",
    "gram_upper",
    "symmetrize_upper",
]  # the Hessian maths lives in core.hessian


def gptq_quantize(
    weight: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int = 128,
    sym: bool = False,
    act_order: bool = False,
    static_groups: bool = False,
    damp_percent: float = 0.01,
    block_size: int = 128,
    clip_search: bool = False,
    clip_objective: str = "hessian",
    mask: torch.Tensor | None = None,
    scale_dtype: torch.dtype | None = None,
    overwrite_hessian: bool = False,
) -> tuple[QuantizedWeight, float]:
    """Quantize `weight` [out, in] column by column, compensating each column's error on the rest.

    `group_size` -1 means one group per row. With `act_order` columns are visited by decreasing Hessian
    diagonal; then groups are either consecutive in that order (`g_idx` records each column's group) or,
    with `static_groups`, fixed on the original order before the pass. `clip_search` picks each group's range
    among shrunk ranges by `clip_objective`: "hessian" weighs each column's squared rounding error by what it
    costs in the GPTQ loss (1 / [H⁻¹]_jj over the columns not yet quantized, the OBS cost), "rounding" sums
    |error|^2.4 as the reference GPTQ does. `scale_dtype` rounds the scales to what that dtype stores before any
    code is chosen (see `grid_params`). Returns the quantized weight and the
    summed squared error weighted by the Hessian (the GPTQ objective, for logging).

    `mask` (bool [out, in], True where a weight is kept) quantizes a pruned weight without losing its
    sparsity: pruned weights get the zero point's code, which dequantizes to exactly 0, and their removal
    counts as error the remaining columns compensate (as SparseGPT does when it prunes).

    A layer that saw no calibration input (H all zero) is rounded to nearest. `H` is only read, unless `overwrite_hessian`: then its memory holds the inverse factor's and H is lost (for
    a wide layer, hundreds of MB fewer at the peak). `weight` is never changed.

    Rows are independent given the inverse factor: a weight of more than `PASS_ELEMENTS` is solved a block of rows
    at a time (the same codes; the float32 copy the pass works on is one block's, not the weight's).
    """
    H = H.detach().float()
    out_features, columns = weight.shape
    group = columns if group_size == -1 else group_size
    if clip_objective not in CLIP_OBJECTIVES:
        raise ValueError(f"`clip_objective` must be one of {', '.join(CLIP_OBJECTIVES)}, got {clip_objective!r}")
    if mask is not None and mask.shape != weight.shape:
        raise ValueError(f"`mask` has shape {tuple(mask.shape)}, the weight {tuple(weight.shape)}")

    diagonal = torch.diag(H).clone()
    dead = diagonal == 0
    if bool(dead.all()):  # no calibration input reached the layer (an expert no token was routed to): H = I,
        H = torch.eye(columns, device=H.device)  # which is round-to-nearest, not all its columns zeroed as dead
        diagonal, dead = H.diagonal().clone(), torch.zeros_like(dead)
    diagonal[dead] = 1
    perm = torch.argsort(diagonal, descending=True) if act_order else torch.arange(columns, device=weight.device)
    Hinv = inverse_cholesky(
        H, damp_percent, perm=perm if act_order else None, fix_dead=True, overwrite=overwrite_hessian
    )
    # group of each column in the visiting order
    g_visit = perm // group if act_order and static_groups else torch.arange(columns, device=weight.device) // group
    rows = rows_per_block(columns, PASS_ELEMENTS)
    invperm = torch.argsort(perm)
    solve = functools.partial(
        _solve_rows, Hinv=Hinv, perm=perm, invperm=invperm, dead=dead[perm], g_visit=g_visit, group=group,
        bits=bits, sym=sym, static_groups=act_order and static_groups, block_size=block_size,
        clip_search=clip_search, scale_dtype=scale_dtype,
        clip_costs=Hinv.diagonal().square().reciprocal() if clip_search and clip_objective == "hessian" else None,
    )  # fmt: skip
    n_groups = columns // group
    codes = torch.empty(weight.shape, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(out_features, n_groups, device=weight.device)
    zeros = torch.empty(out_features, n_groups, device=weight.device)
    loss = 0.0
    for r in range(0, out_features, rows):  # rows are independent: each block of them is a pass of its own
        part = slice(r, r + rows)
        keep = None if mask is None else mask[part]
        codes[part], scales[part], zeros[part], part_loss = solve(weight[part], keep)
        loss += part_loss
    return QuantizedWeight(codes, scales, zeros, g_visit[invperm].to(torch.int32), bits), loss


def _solve_rows(
    weight,
    keep,
    Hinv,
    perm,
    invperm,
    dead,
    g_visit,
    group,
    bits,
    sym,
    static_groups,
    block_size,
    clip_search,
    scale_dtype,
    clip_costs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """One GPTQ pass over a block of rows (the arguments are `gptq_quantize`'s; `dead` and `clip_costs`, the
    clip search's weight of each column or None, are in visiting order, `keep` is the block's rows of the
    mask): their codes in the original column order, scales and zeros [rows,
    groups], and their loss."""
    out_features, columns = weight.shape
    # the pass runs on Wᵀ in visiting order: a column of W is then a contiguous row, which makes each step's
    # reads and the rank-1 update of the columns after it about 2-3x faster for wide layers; it is the one
    # float32 copy of the weight the pass makes
    Wt = torch.empty(columns, out_features, device=weight.device)
    for i in range(0, columns, block_size):  # a block of rows at a time: no second copy in the weight's dtype
        Wt[i : i + block_size] = weight.detach().t().index_select(0, perm[i : i + block_size])
    Wt[dead] = 0
    keep_t = None
    if keep is not None:
        keep_t = keep.to(device=Wt.device, dtype=torch.bool).t().index_select(0, perm)
        Wt.mul_(keep_t)

    n_groups = columns // group
    scales = torch.zeros(n_groups, out_features, device=Wt.device)
    zeros = torch.zeros(n_groups, out_features, device=Wt.device)
    if static_groups:  # on the original columns: row c of W is row invperm[c] of Wᵀ
        for g, i in enumerate(range(0, columns, group)):
            visits = invperm[i : i + group]
            in_group = Wt.index_select(0, visits).t()
            costs = None if clip_costs is None else clip_costs[visits]
            scales[g], zeros[g] = grid_params(in_group, bits, sym, clip_search, scale_dtype, costs)
    group_of = g_visit.tolist()
    losses = torch.zeros(out_features, device=Wt.device)

    codes = torch.zeros(Wt.shape, dtype=torch.uint8, device=Wt.device)  # codes fit 8 bits: a quarter of float32
    scale = zero = None
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1 = Wt[i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        # within the block, columns go in segments of at most SEGMENT (and never across a group boundary, so a
        # group's range is read from fully updated columns): each column's error reaches the rest of its segment
        # at once (rank-1) and the block's later columns once per segment (one matmul), the same sums in fewer,
        # larger operations
        j1 = 0
        while j1 < i2 - i1:
            j2 = min(j1 + SEGMENT, i2 - i1, (i1 + j1) // group * group + group - i1)
            for i in range(j1, j2):
                col = i1 + i
                w = W1[i]
                if static_groups:
                    scale, zero = scales[group_of[col]], zeros[group_of[col]]
                elif col % group == 0:
                    # the group's range is taken from the columns as already updated by earlier errors
                    upcoming = torch.cat([W1[i : i + group], Wt[i2 : col + group]])
                    if keep_t is not None:  # the range of the weights that stay
                        upcoming = upcoming * keep_t[col : col + upcoming.shape[0]]
                    costs = None if clip_costs is None else clip_costs[col : col + group]
                    scale, zero = grid_params(upcoming.t(), bits, sym, clip_search, scale_dtype, costs)
                    scales[col // group], zeros[col // group] = scale, zero
                q_code = quantize_to_codes(w, scale, zero, bits)
                if keep_t is not None:
                    q_code = torch.where(keep_t[col], q_code, zero)
                codes[col] = q_code
                err = (w - (q_code - zero) * scale) / Hinv1[i, i]
                Err1[i] = err
                W1[i + 1 : j2].addr_(Hinv1[i, i + 1 : j2], err, alpha=-1)
            W1[j2:].addmm_(Hinv1[j1:j2, j2:].t(), Err1[j1:j2], alpha=-1)
            j1 = j2
        losses += Err1.square().sum(dim=0) / 2
        Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1)
    del Wt
    return codes.t()[:, invperm], scales.t(), zeros.t(), float(losses.sum())

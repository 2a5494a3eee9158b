"""Non-uniform quantization as pure tensor functions: weighted k-means, vectorized over many independent
groups (every output channel, or every group of rows) so no Python loop runs per channel.

Scalar k-means (SqueezeLLM-style) gives each output channel its own 2^bits levels; vector quantization
clusters runs of `dim` consecutive weights of a row, with 2^(bits * dim) centroids per codebook. Distances
are weighted per coordinate by input sensitivities (the diagonal of the layer's input Hessian, which
weights a weight's error by how much its input feeds the output), or uniformly without data.
"""

from __future__ import annotations

import torch

__all__ = ["codebook_dequantize", "kmeans_quantize", "vq_quantize", "weighted_kmeans"]

_CHUNK = 2**25  # points * centroids held at once
# weights of the channels fitted at once by scalar k-means: its sorting and prefix sums take about 40 bytes each
_ROWS_CHUNK = 2**22


def _init(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    groups, n, dim = points.shape
    index = torch.stack([torch.randperm(n, generator=generator)[:k] for _ in range(groups)]).to(points.device)
    return points.gather(1, index.unsqueeze(-1).expand(groups, k, dim)).clone()


def _assign(points, weights, centroids) -> torch.Tensor:
    # sum_j w_j (x_j - c_j)^2 = sum w x^2 - 2 sum (w x) c + sum w c^2; the first term does not depend on c
    # as one product with an inner dimension of 2 * dim: [w, w x] @ [c^2; -2 c]
    per_point = torch.cat([weights, weights * points], dim=2)
    per_centroid = torch.cat([centroids.pow(2), -2 * centroids], dim=2).transpose(1, 2)
    return torch.bmm(per_point, per_centroid).argmin(dim=2)


def _lloyd(points, weights, centroids, iters: int) -> torch.Tensor:
    groups, n, dim = points.shape
    k = centroids.shape[1]
    per_chunk = max(1, _CHUNK // max(1, n * k))
    assignments = torch.empty(groups, n, dtype=torch.long, device=points.device)
    for _ in range(iters):
        for start in range(0, groups, per_chunk):
            sl = slice(start, start + per_chunk)
            assignments[sl] = _assign(points[sl], weights[sl], centroids[sl])
        index = assignments.unsqueeze(-1).expand(groups, n, dim)
        totals = torch.zeros(groups, k, dim, device=points.device).scatter_add_(1, index, weights * points)
        mass = torch.zeros(groups, k, dim, device=points.device).scatter_add_(1, index, weights)
        updated = torch.where(mass > 1e-12, totals / mass.clamp(min=1e-12), centroids)
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids


def _midpoints(centroids: torch.Tensor) -> torch.Tensor:
    """The cell boundaries of sorted 1-D centroids [G, k]: [G, k - 1]."""
    return ((centroids[:, 1:] + centroids[:, :-1]) / 2).contiguous()


def _lloyd_1d(values, weights, centroids, iters: int) -> torch.Tensor:
    """Lloyd's iterations in one dimension, exact and in O(k log n) per group and iteration.

    In 1-D each centroid's cell is the interval between the midpoints to its neighbours, and a point's
    weight scales its distance to every centroid alike, so the assignment is by position alone: with the
    values sorted once, a cell is a contiguous run found by binary search, and its weighted mean comes from
    prefix sums computed once. Centroids stay sorted (a cell's mean lies between its midpoints).
    values [G, N] sorted ascending, weights [G, N] in the same order, centroids [G, k] sorted.
    """
    groups, n = values.shape
    zero = values.new_zeros(groups, 1, dtype=torch.float64)
    mass = torch.cat([zero, weights.double().cumsum(1)], dim=1)
    moment = torch.cat([zero, (weights.double() * values.double()).cumsum(1)], dim=1)
    first = torch.zeros(groups, 1, dtype=torch.long, device=values.device)
    last = torch.full((groups, 1), n, dtype=torch.long, device=values.device)
    for _ in range(iters):
        # right=True: a value on a midpoint joins the lower centroid, as argmin's first index would
        bounds = torch.cat([first, torch.searchsorted(values, _midpoints(centroids), right=True), last], dim=1)
        cell_mass = mass.gather(1, bounds[:, 1:]) - mass.gather(1, bounds[:, :-1])
        cell_moment = moment.gather(1, bounds[:, 1:]) - moment.gather(1, bounds[:, :-1])
        filled = cell_mass > 1e-12
        updated = torch.where(filled, cell_moment / cell_mass.clamp(min=1e-12), centroids.double()).float()
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids


def _kmeans_1d(points, weights, k: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, order = points[..., 0].sort(dim=1)
    n = values.shape[1]
    index = ((torch.arange(k, device=points.device) + 0.5) * n / k).long().clamp(max=n - 1)
    centroids = _lloyd_1d(values, torch.ones_like(values), values[:, index], iters)
    if weights is not None:
        sorted_weights = weights[..., 0].float().clamp(min=0).add(1e-12).gather(1, order)
        centroids = _lloyd_1d(values, sorted_weights, centroids, iters)
    assignments = torch.searchsorted(_midpoints(centroids), points[..., 0].contiguous(), side="left")
    return centroids.unsqueeze(-1), assignments


def weighted_kmeans(
    points: torch.Tensor, weights: torch.Tensor | None, k: int, iters: int = 25, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means run independently in each of G groups at once.

    points [G, N, dim], weights [G, N, dim] (per coordinate, >= 0) or None. Returns centroids [G, k, dim]
    and assignments [G, N] (int64). With weights, unweighted k-means runs first and the weighted iterations
    start from its centroids: Lloyd never increases the objective, so the result is at least as good, under
    the weighted objective, as the unweighted solution (a weighted start alone can get stuck much worse when
    a few points weigh a thousand times more than the rest). A centroid that loses all its points keeps its
    place.
    """
    points = points.float()
    groups, n, dim = points.shape
    k = min(k, n)
    if dim == 1:
        return _kmeans_1d(points, None if weights is None else weights.expand_as(points), k, iters)
    uniform = torch.ones_like(points)
    centroids = _init(points, k, torch.Generator().manual_seed(seed))
    centroids = _lloyd(points, uniform, centroids, iters)
    if weights is not None:
        weights = weights.float().expand_as(points).clamp(min=0) + 1e-12
        centroids = _lloyd(points, weights, centroids, iters)
    else:
        weights = uniform
    per_chunk = max(1, _CHUNK // max(1, n * k))
    assignments = torch.empty(groups, n, dtype=torch.long, device=points.device)
    for start in range(0, groups, per_chunk):
        sl = slice(start, start + per_chunk)
        assignments[sl] = _assign(points[sl], weights[sl], centroids[sl])
    return centroids, assignments


def kmeans_quantize(
    W: torch.Tensor, bits: int, sensitivity: torch.Tensor | None = None, iters: int = 25
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scalar k-means per output channel: codes [out, in] (values < 2^bits) and codebook [out, 2^bits].
    `sensitivity` [in] weights every input column (e.g. the Hessian diagonal)."""
    rows, cols = W.shape
    per_chunk = max(1, _ROWS_CHUNK // cols)  # channels are independent: a chunk at a time, the same result
    codes = torch.empty(rows, cols, dtype=torch.long, device=W.device)
    codebook = torch.empty(rows, 2**bits, device=W.device)
    for start in range(0, rows, per_chunk):
        chunk = W[start : start + per_chunk].float().unsqueeze(-1)
        weights = None if sensitivity is None else sensitivity.float().reshape(1, cols, 1).expand_as(chunk)
        centroids, codes[start : start + per_chunk] = weighted_kmeans(chunk, weights, 2**bits, iters)
        codebook[start : start + per_chunk] = centroids[..., 0]
    return codes, codebook


def vq_quantize(
    W: torch.Tensor, bits: int, dim: int, groups: int = 1, sensitivity: torch.Tensor | None = None, iters: int = 25
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vector quantization of runs of `dim` consecutive weights of each row, at `bits` bits per weight:
    codes [out, in / dim] (values < 2^(bits*dim)) and codebooks [groups, 2^(bits*dim), dim], the rows split
    into `groups` consecutive groups with one codebook each."""
    rows, cols = W.shape
    if cols % dim:
        raise ValueError(f"vector dimension {dim} does not divide the {cols} input features")
    if rows % groups:
        raise ValueError(f"{groups} codebook groups do not divide the {rows} output rows")
    points = W.float().reshape(groups, (rows // groups) * (cols // dim), dim)
    weights = None
    if sensitivity is not None:
        per_vector = sensitivity.float().reshape(1, cols // dim, dim).expand(rows, cols // dim, dim)
        weights = per_vector.reshape(groups, -1, dim)
    centroids, codes = weighted_kmeans(points, weights, 2 ** (bits * dim), iters)
    return codes.reshape(rows, cols // dim), centroids


def codebook_dequantize(codes: torch.Tensor, codebook: torch.Tensor, rows_per_book: int) -> torch.Tensor:
    """Weights from codes [out, n] and codebooks [books, k, dim] (one book per `rows_per_book` rows):
    [out, n * dim]."""
    rows, n = codes.shape
    books, k, dim = codebook.shape
    flat = codebook.reshape(books * k, dim)
    offsets = (torch.arange(rows, device=codes.device) // rows_per_book * k).unsqueeze(1)
    return flat[(codes.long() + offsets)].reshape(rows, n * dim)

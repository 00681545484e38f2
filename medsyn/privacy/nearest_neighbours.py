"""Exact k-nearest-neighbour search between two image sets, in blocks, as matrix products.

A naive loop compares one generated image with every training image at a time; here a block of queries meets
all references in one float32 matrix product, ||q - r||^2 = ||q||^2 + ||r||^2 - 2 q.r, on images centred on
the references' mean (which keeps the norms, and so the rounding, at the scale of the distances). The result is
then made exact: every candidate whose float32 distance could, within the float32 rounding bound, be among the
k nearest is re-measured from its differences (exact integers for uint8 images, float64 otherwise), and the k
nearest of those are returned. The bound is the worst case for any summation order (Higham's gamma_n =
n u / (1 - n u) with u = 2^-24), plus what converting float64 values to float32 moved each vector, so near-ties
are all re-checked, however many there are. Everything runs in stored units (0..255 for uint8, exact in
float32) and is scaled to [0, 1] at the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from tqdm.auto import tqdm

from .image_arrays import as_image_stack, common_representation

UNIT_ROUNDOFF = 2.0**-24  # float32


def rounding_bound_coefficient(dims: int) -> float:
    """c such that the float32 squared distance of centred vectors errs by at most c (||q||^2 + ||r||^2).

    The dot product errs by at most gamma_D |q||r| <= gamma_D (||q||^2 + ||r||^2) / 2, each norm by gamma_D of
    itself, the centring and the final sum by a few u of the same: 3 gamma_D + 16 u covers all with margin.
    """
    gamma = dims * UNIT_ROUNDOFF / (1 - dims * UNIT_ROUNDOFF)
    return 3 * gamma + 16 * UNIT_ROUNDOFF


def _vectors(values, name: str) -> torch.Tensor:
    """Feature vectors (N, D) as a CPU tensor: floats in their own precision, integers as float64; checked."""
    vectors = torch.as_tensor(np.asarray(values) if not torch.is_tensor(values) else values).cpu()
    if len(vectors) == 0:
        raise ValueError(f"{name}: need a non-empty set of vectors, got shape {tuple(vectors.shape)}")
    if not vectors.is_floating_point():
        return vectors.double()
    if not torch.isfinite(vectors).all():
        raise ValueError(f"{name}: vectors contain NaN or Inf")
    return vectors


def _flat_pair(queries, references) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Both sets as (N, D), and the value that means 1.0 (255 for uint8 images, else 1). Images are brought to one
    dtype; feature vectors keep their own (the exact re-check widens each pair)."""
    if np.ndim(queries) == 2 and np.ndim(references) == 2:  # feature vectors, used as they are
        q, r = _vectors(queries, "queries"), _vectors(references, "references")
        if q.shape[1] != r.shape[1]:
            raise ValueError(f"queries have {q.shape[1]} values per vector but references {r.shape[1]}")
        return q, r, 1.0
    q, r = common_representation(as_image_stack(queries, "queries"), as_image_stack(references, "references"))
    return q.reshape(len(q), -1), r.reshape(len(r), -1), 255.0 if q.dtype == torch.uint8 else 1.0


class PreparedReferences:
    """Reference vectors (N, D) made ready for the search once: centred float32 copy, norms and how far the float32
    conversion moved each. A caller that searches the same references many times (a QA gate, one shifted index per
    move) prepares them once; each search then costs its matrix product. Holds the vectors twice (stored and
    centred float32)."""

    def __init__(self, vectors: torch.Tensor, device: torch.device | str | None = None, one: float = 1.0):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.raw = vectors.to(self.device)  # the stored values, for the exact re-check
        self.centre = (self.raw.sum(0, dtype=torch.float64) / len(self.raw)).to(torch.float32)
        self.centred, self.moved = _as_float32(self.raw)
        self.centred -= self.centre
        self.norms = self.centred.square().sum(1)
        self.one = one

    @classmethod
    def of_vectors(cls, vectors, device: torch.device | str | None = None) -> PreparedReferences:
        """Feature vectors (N, D), in any float precision, prepared."""
        return cls(_vectors(vectors, "references"), device)

    def __len__(self) -> int:
        return len(self.raw)


def _exact_dtype(stored: torch.dtype) -> torch.dtype:
    """Where differences are exact: float32 for uint8 (integers up to 255, squares up to 65,025), else float64;
    their squares are then summed in float64."""
    return torch.float32 if stored == torch.uint8 else torch.float64


def _exact_squared(queries: torch.Tensor, references: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor,
                   chunk: int = 16) -> torch.Tensor:
    """Squared distances of the pairs (queries[rows[i]], references[columns[i]]) in stored units, exactly.

    uint8: differences and their squares are exact in float32 and their sum (< 2^53) exact in float64; other
    dtypes are compared in float64. Small chunks keep the temporaries in cache (3-10x faster than whole blocks).
    """
    wide = _exact_dtype(queries.dtype)
    out = torch.empty(len(rows), dtype=torch.float64, device=queries.device)
    for start in range(0, len(rows), chunk):
        part = slice(start, start + chunk)
        difference = queries.index_select(0, rows[part]).to(wide)
        difference -= references.index_select(0, columns[part]).to(wide)
        out[part] = (difference * difference).sum(1, dtype=torch.float64)
    return out


def _as_float32(stored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A float32 copy of ``stored``, and how far (L2, per row) the conversion moved each row when it was not exact
    (float64 input); None when every value is exactly representable (uint8, float16, bfloat16, float32)."""
    converted = stored.to(torch.float32, copy=True)
    if stored.dtype != torch.float64:
        return converted, None
    return converted, (stored - converted.double()).norm(dim=1)


def _blocks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


@contextmanager
def _full_float32_matmul():
    """TF32 or bf16 matmuls would break the rounding bound; use full float32 inside the search."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


@torch.no_grad()
def nearest_neighbours(
    queries: np.ndarray | torch.Tensor,
    references: np.ndarray | torch.Tensor,
    k: int = 1,
    block_size: int = 1024,
    device: torch.device | str | None = None,
    exclude_self: bool = False,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """For each query image, its k nearest reference images by RMS pixel difference, exactly.

    The distance is ||q - r|| / sqrt(D) on images scaled to [0, 1]: the root-mean-square difference per pixel,
    comparable across resolutions (0 for a copy, about 0.1 for visibly different slices). Ties go to the lower
    reference index.

    Args:
        queries, references: image stacks of one size per image, in any layout and dtype ``as_image_stack``
            accepts (each side may differ), or feature vectors (N, D) for a search in an encoder's feature
            space (used as they are); or ``PreparedReferences`` (searched on their own device).
        k: neighbours per query.
        block_size: queries per matrix product; memory is about block_size x len(references) floats.
        device: where to compute (default: CUDA when available).
        exclude_self: queries and references are the same set; skip each image's match with itself.
        progress: show a progress bar over blocks.

    Returns:
        distances (N, k) float64 ascending, and indices (N, k) into ``references``.
    """
    if isinstance(references, PreparedReferences):
        prepared, q = references, _vectors(queries, "queries")
        if q.shape[1] != prepared.raw.shape[1]:
            raise ValueError(f"queries have {q.shape[1]} values per vector but references {prepared.raw.shape[1]}")
    else:
        q, r, one = _flat_pair(queries, references)
        prepared = PreparedReferences(r, device, one)
    if not 1 <= k <= len(prepared) - int(exclude_self):
        raise ValueError(f"k={k} needs at least {k + int(exclude_self)} references, got {len(prepared)}")
    if exclude_self and len(q) != len(prepared):
        raise ValueError("exclude_self needs the queries to be the references")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    device, one, dims = prepared.device, prepared.one, q.shape[1]
    ref_raw, centre, ref, ref_moved, ref_norms = (prepared.raw, prepared.centre, prepared.centred, prepared.moved,
                                                  prepared.norms)
    coefficient = rounding_bound_coefficient(dims)
    distances, indices = [], []
    with _full_float32_matmul():
        for block_rows in tqdm(list(_blocks(len(q), block_size)), desc="nearest neighbours", disable=not progress):
            raw = q[block_rows].to(device)
            block, block_moved = _as_float32(raw)
            block -= centre
            block_norms = block.square().sum(1, keepdim=True)
            squared = block_norms + ref_norms - 2 * block @ ref.T
            bound = coefficient * (block_norms + ref_norms)
            if ref_moved is not None or block_moved is not None:
                # |d - d32| <= moved_q + moved_r, so |d^2 - d32^2| <= m (2 d32 + m) with m their sum
                moved = (0 if block_moved is None else block_moved[:, None]) + (
                    0 if ref_moved is None else ref_moved[None])
                moved = moved.to(torch.float32) * (1 + 4 * UNIT_ROUNDOFF)
                bound += moved * (2 * (squared + bound).clamp(min=0).sqrt() + moved)
            if exclude_self:
                own = torch.arange(block_rows.start, block_rows.stop, device=device)
                squared[torch.arange(len(own), device=device), own] = float("inf")
            kth_upper = (squared + bound).topk(k, dim=1, largest=False).values[:, -1:]
            # Every reference that could, within rounding, be among the k nearest; at least k per row.
            pairs, columns = ((squared - bound) <= kth_upper).nonzero(as_tuple=True)  # row-major, columns ascending
            exact = _exact_squared(raw, ref_raw, pairs, columns)
            order = exact.sort(stable=True).indices  # ties keep the lower reference index first
            order = order[pairs[order].sort(stable=True).indices]  # then group by row
            counts = torch.bincount(pairs, minlength=len(raw))
            first = (counts.cumsum(0) - counts)[:, None] + torch.arange(k, device=device)
            chosen = order[first]
            distances.append((exact[chosen] / (dims * one**2)).sqrt().cpu())
            indices.append(columns[chosen].cpu())
    return torch.cat(distances).numpy(), torch.cat(indices).numpy()


def _shifted(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """(..., H, W, C) images moved down by dy and right by dx pixels, the uncovered band filled with 0."""
    if dy == dx == 0:
        return images
    height, width = images.shape[-3:-1]
    out = torch.zeros_like(images)
    out[..., max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0), :] = (
        images[..., max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0), :])
    return out


def _overlap(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """(..., H, W, C) images with the band that a move by (dy, dx) uncovers set to 0, so that a moved reference
    (zero-filled there) is compared on the pixels both images have."""
    out = images.clone()
    height, width = images.shape[-3:-1]
    if dy > 0:
        out[..., :dy, :, :] = 0
    elif dy < 0:
        out[..., height + dy :, :, :] = 0
    if dx > 0:
        out[..., :, :dx, :] = 0
    elif dx < 0:
        out[..., :, width + dx :, :] = 0
    return out


def one_pixel_moves(max_shift: int) -> list[tuple[int, int]]:
    """Every (dy, dx) with |dy|, |dx| <= ``max_shift`` except (0, 0), nearest moves first."""
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    span = range(-max_shift, max_shift + 1)
    return sorted(((dy, dx) for dy in span for dx in span if (dy, dx) != (0, 0)), key=lambda m: (max(map(abs, m)), m))


def shift_tolerant_nearest(
    queries: np.ndarray | torch.Tensor,
    references: np.ndarray | torch.Tensor,
    max_shift: int,
    k: int = 1,
    unshifted: tuple[np.ndarray, np.ndarray] | None = None,
    **search,
) -> tuple[np.ndarray, np.ndarray]:
    """For each query, its k nearest references when each reference may move by up to ``max_shift`` pixels in
    each direction: the distance is the smallest, over moves, RMS difference on [0, 1] where the moved reference
    and the query overlap, exactly.

    A copy moved by a pixel is as far from its original as a different patient's slice by plain RMS distance;
    here it is at the distance of whatever else changed, whatever filled the uncovered band (black, wrapped
    around, repeated edge). The search is exact: for each move the whole reference set, moved, is searched with
    ``nearest_neighbours`` against the queries with that band blanked ((2 max_shift + 1)^2 searches), and a
    reference among the k nearest under its best move is among the k nearest of that move's search. Re-checking
    only the plain nearest few missed most 1-pixel copies at 16-32 px, where a move changes an image more than
    the difference between two patients.

    Args:
        queries, references: image stacks as ``nearest_neighbours`` takes them (not feature vectors).
        max_shift: the largest move in pixels along each axis.
        k: neighbours per query (distinct references, each at its best move).
        unshifted: the plain search's (distances, indices) with at least k columns, if already done.
        search: passed to ``nearest_neighbours`` (block_size, device, progress).

    Returns:
        distances (N, k) ascending and indices (N, k) into ``references``; ties keep the smaller move, then the
        lower index.
    """
    moves = one_pixel_moves(max_shift)
    q, r = common_representation(as_image_stack(queries, "queries"), as_image_stack(references, "references"))
    found = [unshifted if unshifted is not None else nearest_neighbours(q, r, k=k, **search)]
    found = [(found[0][0][:, :k], found[0][1][:, :k])]
    height, width = q.shape[1:3]
    for dy, dx in moves:
        distances, indices = nearest_neighbours(_overlap(q, dy, dx), _shifted(r, dy, dx), k=k, **search)
        overlap_share = (height - abs(dy)) * (width - abs(dx)) / (height * width)
        found.append((distances / np.sqrt(overlap_share), indices))
    # (N, moves * k), the plain search first, so ties keep the smaller move
    return distinct_nearest(np.concatenate([d for d, _ in found], 1), np.concatenate([i for _, i in found], 1), k)


def distinct_nearest(distances: np.ndarray, indices: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k nearest distinct references from candidate columns (several searches side by side, a
    reference possibly in more than one): its best distance each, ascending; ties keep the earlier column."""
    order = np.argsort(distances, axis=1, kind="stable")
    best_d, best_i = np.empty((len(distances), k)), np.empty((len(distances), k), dtype=np.int64)
    for row in range(len(distances)):
        seen, filled = set(), 0
        for column in order[row]:
            index = int(indices[row, column])
            if index in seen:
                continue
            seen.add(index)
            best_d[row, filled], best_i[row, filled] = distances[row, column], index
            filled += 1
            if filled == k:
                break
    return best_d, best_i

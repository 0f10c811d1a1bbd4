"""The collectives of the stateless optimizers on sharded parameters (FSDP2 / DTensor).

A hidden matrix held as a DTensor on a one-dimensional device mesh is either replicated (each rank holds
it whole) or sharded: ``Shard(0)`` splits its rows (output units) over the ranks, ``Shard(d)`` with
``d >= 1`` a set of its columns (of the ``[shape[0], prod(shape[1:])]`` matrix). The optimizers work on
each rank's local block and obtain the statistics that span the split dimension with all-reduces that
pack the vectors of every matrix of a step into one buffer, so a collective's count depends on the
method, not on the number of matrices. Shards may be uneven (``torch.chunk`` sizes, as DTensor uses),
including empty ones.
"""

from __future__ import annotations

import functools

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..normalize import FACTOR_FLOOR

__all__ = ["Sharding", "local_parts", "all_reduce_packed", "local_abs_max", "global_abs_max", "shard_sizes", "sum_over",
           "sinkhorn_square_scalings_sharded", "gather_full", "local_block",
           "assign_owners", "owner_compute", "owner_compute_replicated"]


@dataclass(frozen=True)
class Sharding:
    """How a parameter of global ``shape`` is split over the ranks of ``group`` along ``tensor_dim``."""

    tensor_dim: int
    shape: tuple[int, ...]
    group: Any

    @property
    def dim(self) -> int:
        """The split dimension of the parameter seen as a matrix: 0 (rows) or 1 (columns)."""
        return 0 if self.tensor_dim == 0 else 1

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return self.shape[0], math.prod(self.shape[1:])

    def sizes(self) -> list[int]:
        """Each rank's extent along ``tensor_dim``."""
        return shard_sizes(self.shape[self.tensor_dim], dist.get_world_size(self.group))


def shard_sizes(size: int, world: int) -> list[int]:
    """The extents of ``size`` split in ``world`` chunks the way DTensor's ``Shard`` splits (``torch.chunk``)."""
    chunk = -(-size // world) if size else 0
    return [max(0, min(chunk, size - rank * chunk)) for rank in range(world)]


@functools.cache
def _dtensor_class() -> type:
    from torch.distributed.tensor import DTensor  # imported on first use, not with the package
    return DTensor


def _is_dtensor(t: Tensor) -> bool:
    return isinstance(t, _dtensor_class())


def local_parts(p: Tensor, owner: str) -> tuple[Tensor, Tensor, Sharding | None]:
    """(the local block of ``p``, the local block of its gradient as a matrix, its ``Sharding``).

    A plain tensor, or a DTensor replicated over its mesh, is local: the sharding is None. The local block
    of a DTensor aliases its storage, so updating it in place updates ``p``. Raises ValueError for a
    layout the optimizers do not support (a mesh of more than one dimension, partial placements).
    """
    grad = p.grad
    if not _is_dtensor(p):
        if _is_dtensor(grad):
            raise ValueError(f"{owner}: a plain parameter has a DTensor gradient")
        return p, grad.reshape(p.shape[0], -1), None
    from torch.distributed.tensor import Replicate, Shard

    mesh = p.device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"{owner}: DTensor parameters on a {mesh.ndim}-D device mesh are not supported; "
                         "shard over a 1-D mesh (FSDP2 fully_shard over one mesh dimension)")
    if not _is_dtensor(grad):
        raise ValueError(f"{owner}: a DTensor parameter has a plain gradient")
    if tuple(grad.placements) != tuple(p.placements):
        grad = grad.redistribute(mesh, p.placements)
    local, local_grad = p.to_local(), grad.to_local()
    matrix = (local.shape[0], math.prod(local.shape[1:]))  # explicit: a block may be empty
    placement = p.placements[0]
    if isinstance(placement, Replicate):
        return local, local_grad.reshape(matrix), None
    if not isinstance(placement, Shard):
        raise ValueError(f"{owner}: unsupported placement {placement} of a parameter")
    dim = placement.dim % p.ndim
    sharding = Sharding(dim, tuple(p.shape), mesh.get_group())
    return local, local_grad.reshape(matrix), sharding


def all_reduce_packed(tensors: Sequence[Tensor], group: Any, op: Any = None) -> list[Tensor]:
    """All-reduce ``tensors`` (any shapes, one device) as one flat buffer: a single collective. Returns the
    reduced tensors (new ones, in their own dtypes); an empty list costs nothing."""
    if not tensors:
        return []
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else tensors[0].dtype
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM if op is None else op, group=group)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].view(t.shape).to(t.dtype))
        start += t.numel()
    return out


def local_abs_max(X: Tensor) -> Tensor:
    """Largest |entry| of each matrix of a (b, m, n) batch, shape (b,); 0 where the block is empty."""
    if X.numel() == 0:
        return torch.zeros(X.shape[0], dtype=X.dtype, device=X.device)
    return X.abs().amax(dim=(-2, -1))


def sum_over(values: Sequence[Tensor], axes: Sequence[int], dims: Sequence[int | None], group: Any) -> list[Tensor]:
    """Complete partial sums: ``values[i]`` holds sums over matrix axis ``axes[i]`` (-1: over columns, -2:
    over rows, None: over both) of a block split along matrix dim ``dims[i]`` (None: whole). Those that
    summed over the split dim are all-reduced together, in one collective; the others are returned as given."""
    split = {-1: 1, -2: 0}
    need = [i for i, (axis, dim) in enumerate(zip(axes, dims))
            if dim is not None and (axis is None or split[axis] == dim)]
    out = list(values)
    for i, reduced in zip(need, all_reduce_packed([values[i] for i in need], group)):
        out[i] = reduced
    return out


def global_abs_max(blocks: Sequence[Tensor], group: Any) -> list[Tensor]:
    """Largest |entry| of each whole matrix, (b,) per (b, m, n) batch of local blocks: one collective."""
    return all_reduce_packed([local_abs_max(X) for X in blocks], group, dist.ReduceOp.MAX)


def sinkhorn_square_scalings_sharded(As: Sequence[Tensor], shardings: Sequence[Sharding], iters: Sequence[int],
                                     eps: Sequence[float]) -> list[tuple[Tensor, Tensor]]:
    r""":func:`multinorm.normalize.sinkhorn_square_scalings` of sharded matrices, all batches at once.

    ``As[i]`` (b, m_l, n_l) is the local block of the squares ``A = G * G`` of a batch of matrices split
    as ``shardings[i]`` says, iterated ``iters[i]`` times with ``eps[i]``. Returns the local factors
    (r (b, m_l), c (b, n_l)). The iteration is the single-process one: sums along the split dimension are
    completed by all-reduces that carry the vectors of every batch, one before the loop (the row sums of
    column-split blocks, the totals of row-split ones) and one per iteration (the column sums of row-split
    blocks, the next row sums of column-split ones): ``max(iters) + 1`` collectives in all.
    """
    states = []
    for A, sh, it, e in zip(As, shardings, iters, eps):
        m, n = sh.matrix_shape
        b = A.shape[0]
        consts = [torch.full((), value, dtype=A.dtype, device=A.device) for value in (e * e, n, m)]
        states.append({"A": A, "At": A.mT, "dim": sh.dim, "m": m, "n": n, "iters": it, "consts": consts,
                       "row_sums": A.sum(dim=-1).unsqueeze(-2),
                       "v": torch.ones(b, 1, A.shape[-1], dtype=A.dtype, device=A.device)})
    group = shardings[0].group if shardings else None
    partial = [s["row_sums"].sum(dim=-1, keepdim=True) if s["dim"] == 0 else s["row_sums"] for s in states]
    reduced = sum_over(partial, [None if s["dim"] == 0 else -1 for s in states], [s["dim"] for s in states], group)
    for s, value in zip(states, reduced):
        if s["dim"] == 0:
            total = value
        else:
            s["row_sums"] = value
            total = value.sum(dim=-1, keepdim=True)
        # k rescales G to unit entry RMS (see sinkhorn_square_scalings); u starts at k
        s["u"] = torch.where(total > 0, (s["m"] * s["n"]) / total, torch.ones_like(total)).expand_as(s["row_sums"])
        s["Av"] = s["row_sums"]
    for it in range(max(iters, default=0)):
        active = [s for s in states if it < s["iters"]]
        sums, axes = [], []
        for s in active:
            A, At, (eps2, n_t, m_t) = s["A"], s["At"], s["consts"]
            Av = s["Av"] if it == 0 or s["dim"] == 1 else torch.bmm(s["v"], At)
            s["u"] = torch.div(n_t, torch.maximum(Av, torch.div(eps2, s["u"])).clamp_(min=s["n"] * FACTOR_FLOOR))
            ATu = torch.bmm(s["u"], A)
            if s["dim"] == 0:
                sums.append(ATu)
                axes.append(-2)
            else:  # the columns are whole here; the next row sums are partial
                s["v"] = torch.div(m_t, torch.maximum(ATu, torch.div(eps2, s["v"])).clamp_(min=s["m"] * FACTOR_FLOOR))
                if it + 1 < s["iters"]:
                    sums.append(torch.bmm(s["v"], At))
                    axes.append(-1)
        pending = [s for s in active if s["dim"] == 0 or it + 1 < s["iters"]]
        for s, value in zip(pending, sum_over(sums, axes, [s["dim"] for s in pending], group)):
            if s["dim"] == 0:
                eps2, _, m_t = s["consts"]
                s["v"] = torch.div(m_t, torch.maximum(value, torch.div(eps2, s["v"])).clamp_(min=s["m"] * FACTOR_FLOOR))
            else:
                s["Av"] = value
    return [(s["u"].sqrt().squeeze(-2), s["v"].sqrt().squeeze(-2)) for s in states]


def gather_full(X: Tensor, sharding: Sharding) -> Tensor:
    """The whole matrices (b, m, n) of a batch of local blocks X (b, m_l, n_l), on every rank (one all-gather)."""
    sizes, d = sharding.sizes(), sharding.tensor_dim
    shape = list(sharding.shape)
    b = X.shape[0]
    per_rank = [b * math.prod(shape[:d] + [s] + shape[d + 1:]) for s in sizes]
    padded = max(per_rank)
    send = torch.zeros(padded, dtype=X.dtype, device=X.device)
    send[:X.numel()] = X.reshape(-1)
    chunks = [torch.empty_like(send) for _ in sizes]
    dist.all_gather(chunks, send, group=sharding.group)
    blocks = [c[:count].view([b] + shape[:d] + [s] + shape[d + 1:]) for c, count, s in zip(chunks, per_rank, sizes)]
    return torch.cat(blocks, dim=1 + d).reshape(b, *sharding.matrix_shape)


def local_block(full: Tensor, sharding: Sharding) -> Tensor:
    """This rank's block (b, m_l, n_l) of whole matrices ``full`` (b, m, n): the inverse of :func:`gather_full`."""
    sizes, d = sharding.sizes(), sharding.tensor_dim
    rank = dist.get_rank(sharding.group)
    start = sum(sizes[:rank])
    block = full.reshape(full.shape[0], *sharding.shape).narrow(1 + d, start, sizes[rank])
    return block.reshape(full.shape[0], block.shape[1], math.prod(block.shape[2:]))


def assign_owners(numels: Sequence[int], world: int) -> list[int]:
    """An owner rank per matrix: largest first, each to the rank with the fewest entries so far (ties to
    the lower rank), so the ranks share the work and no matrix is computed twice."""
    load = [0] * world
    owners = [0] * len(numels)
    for i in sorted(range(len(numels)), key=lambda i: -numels[i]):
        owners[i] = min(range(world), key=lambda r: load[r])
        load[owners[i]] += numels[i]
    return owners


def _exchange(send: list[list[Tensor]], recv_counts: list[list[int]], group: Any, dtype: torch.dtype,
              device: torch.device) -> list[list[Tensor]]:
    """``send[r]``: the tensors for rank r, in order; ``recv_counts[r]``: the sizes of those coming from rank
    r. One all-to-all; returns the received flat tensors per source rank."""
    in_splits = [sum(t.numel() for t in ts) for ts in send]
    out_splits = [sum(cs) for cs in recv_counts]
    flat = [t.reshape(-1).to(dtype) for ts in send for t in ts]
    send_buf = torch.cat(flat) if flat else torch.empty(0, dtype=dtype, device=device)
    recv_buf = torch.empty(sum(out_splits), dtype=dtype, device=device)
    dist.all_to_all_single(recv_buf, send_buf, out_splits, in_splits, group=group)
    out, start = [], 0
    for counts in recv_counts:
        pieces = []
        for c in counts:
            pieces.append(recv_buf[start:start + c])
            start += c
        out.append(pieces)
    return out


def _block_numel(sharding: Sharding, rank: int) -> int:
    shape = list(sharding.shape)
    shape[sharding.tensor_dim] = sharding.sizes()[rank]
    return math.prod(shape)


def owner_compute(blocks: Sequence[Tensor], shardings: Sequence[Sharding],
                  compute: Any) -> list[Tensor]:
    """Whole-matrix work on sharded matrices without repeating it: each matrix (its local block
    ``blocks[i]``, (m_l, n_l)) is gathered to one owner rank (:func:`assign_owners`), which calls
    ``compute(indices, matrices)`` on the whole (m, n) matrices it owns and returns their results
    (same shapes); each rank gets back its block of every result. Two all-to-alls in all."""
    group = shardings[0].group
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    dtype = torch.float64 if any(b.dtype == torch.float64 for b in blocks) else torch.float32
    device = blocks[0].device
    owners = assign_owners([math.prod(s.matrix_shape) for s in shardings], world)
    mine = [i for i, o in enumerate(owners) if o == rank]
    # the blocks go to their owners
    send = [[blocks[i] for i in range(len(blocks)) if owners[i] == r] for r in range(world)]
    recv = _exchange(send, [[_block_numel(shardings[i], r) for i in mine] for r in range(world)], group, dtype, device)
    whole = []
    for k, i in enumerate(mine):
        sh = shardings[i]
        d, shape = sh.tensor_dim, list(sh.shape)
        parts = []
        for r, size in enumerate(sh.sizes()):
            part_shape = shape[:d] + [size] + shape[d + 1:]
            parts.append(recv[r][k].view(part_shape))
        whole.append(torch.cat(parts, dim=d).reshape(sh.matrix_shape))
    results = compute(mine, whole) if mine else []
    # each rank's block of each result goes back to it
    back: list[list[Tensor]] = [[] for _ in range(world)]
    for r in range(world):
        for res, i in zip(results, mine):
            sh = shardings[i]
            start = sum(sh.sizes()[:r])
            piece = res.reshape(sh.shape).narrow(sh.tensor_dim, start, sh.sizes()[r])
            back[r].append(piece)
    mine_here = [[_block_numel(shardings[i], rank) for i in range(len(blocks)) if owners[i] == r] for r in range(world)]
    got = _exchange(back, mine_here, group, dtype, device)
    out: list[Tensor | None] = [None] * len(blocks)
    for r in range(world):
        for i, piece in zip([i for i in range(len(blocks)) if owners[i] == r], got[r]):
            out[i] = piece.view(blocks[i].shape)
    return out


def owner_compute_replicated(matrices: Sequence[Tensor], group: Any, compute: Any) -> list[Tensor]:
    """The same split for matrices every rank holds whole (DDP replicas): each rank computes the results
    of the matrices it owns, and one all-gather gives every rank all results."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    dtype = torch.float64 if any(m.dtype == torch.float64 for m in matrices) else torch.float32
    owners = assign_owners([m.numel() for m in matrices], world)
    mine = [i for i, o in enumerate(owners) if o == rank]
    results = compute(mine, [matrices[i] for i in mine]) if mine else []
    counts = [sum(matrices[i].numel() for i in range(len(matrices)) if owners[i] == r) for r in range(world)]
    send = torch.zeros(max(counts), dtype=dtype, device=matrices[0].device)
    if results:
        send[:counts[rank]] = torch.cat([res.reshape(-1).to(dtype) for res in results])
    gathered = [torch.empty_like(send) for _ in range(world)]
    dist.all_gather(gathered, send, group=group)
    out: list[Tensor | None] = [None] * len(matrices)
    for r in range(world):
        start = 0
        for i in (i for i in range(len(matrices)) if owners[i] == r):
            out[i] = gathered[r][start:start + matrices[i].numel()].view(matrices[i].shape)
            start += matrices[i].numel()
    return out
